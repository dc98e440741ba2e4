"""A function instance: one node process that runs one model's events (the ``function`` role).

Why it exists beside the serving replica: a function is scaled from zero, and what a user pays
for that is the time from the scaling decision to the first answer. Measured on this machine
(docs/events.md, "Cold start"): importing JAX is most of a fresh process's start (5 s of the
6-8 s under load; 1.5 s on a quiet machine), then compiling the model once per batch shape.
So an instance is built to be *started before it is needed* and told its model later:

* **a spare** (no ``model`` in its config) imports JAX, initialises the backend and compiles a
  throwaway program while nobody waits; it is ready as a spare. ``load {"model"}`` then costs
  reading the parameters and one compilation, which JAX's persistent compilation cache turns
  into a disk read (``compile_cache``): ~0.1-0.5 s.
* **one bucket first**: the first event needs one compiled shape, not seven. ``load`` compiles
  the smallest bucket and answers; the other buckets compile in a background thread, and until
  they are done an event is padded to the nearest compiled bucket or split into pieces of it.

Models: a Fashion-MNIST classifier of ``dmlsys.train.models`` (input (n, 784), answer the
label and its probability) or the hotel-price regressor of ``dmlsys.events.hotel`` (input rows
of (day, days ahead, nights, room), answer prices), told apart by the card's ``arch.kind``.

RPCs (service ``function``): ``invoke {"instances": [...]}`` -> ``{"predictions", ...}``;
``load {"model", "version"?}`` (the supervisor, the CLI and ``events`` nodes only);
``info``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from dmlsys.events.errors import EventsError
from dmlsys.node import ADMIN, Service, allow, rpc
from dmlsys.wire.sim import to_thread

log = logging.getLogger(__name__)

BUCKETS = (1, 8, 32)
MAX_INSTANCES = 256
LOADERS = ADMIN | allow(roles=("events",))


class FunctionError(EventsError):
    """A function instance cannot do what it was asked (no model loaded, bad input); names it."""

    status = 400


def compile_cache(path: str | os.PathLike | None) -> None:
    """Point JAX's persistent compilation cache at ``path`` (None or "off": leave it off).

    Every program is cached, however fast it compiled (min compile time 0): a function's
    programs are small, and the cold start is made of exactly those small compilations.
    (The serving runtime has the same lines: ``dmlsys.serving.runtime`` sits a layer above.)
    """
    if path is None or str(path) == "off":
        return
    import jax

    Path(path).mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def warm_up() -> float:
    """Import JAX, start its backend, compile and run a throwaway program; returns seconds."""
    started = time.perf_counter()
    import jax
    import jax.numpy as jnp

    np.asarray(jax.jit(lambda x: x * 2 + 1)(jnp.ones(4)))
    return time.perf_counter() - started


@dataclasses.dataclass
class Loaded:
    """One model version ready to run: a jitted function per compiled bucket."""

    model: str
    version: int | None
    task: str  # "classification" | "regression"
    in_dim: int
    fn: Callable[[np.ndarray], Any]
    buckets: tuple[int, ...]
    compiled: set[int]
    labels: tuple[str, ...] = ()
    load_seconds: float = 0.0

    def compile(self, bucket: int) -> None:
        np.asarray(self.fn(np.zeros((bucket, self.in_dim), np.float32)))
        self.compiled.add(bucket)

    def run(self, x: np.ndarray) -> np.ndarray:
        """Outputs for ``x`` (n, in_dim): padded to the smallest compiled bucket that fits, or in
        pieces of the largest compiled one (never a compilation on the event's path)."""
        ready = sorted(self.compiled)
        top = ready[-1]
        n = x.shape[0]
        if n > top:
            return np.concatenate([self.run(x[i:i + top]) for i in range(0, n, top)])
        bucket = next(b for b in ready if b >= n)
        if bucket != n:
            padded = np.zeros((bucket, x.shape[1]), np.float32)
            padded[:n] = x
            x = padded
        return np.asarray(self.fn(x))[:n]


def load_model(store: str | os.PathLike, model: str, version: int | None = None,
               buckets: tuple[int, ...] = BUCKETS) -> Loaded:
    """Read ``model`` from the store and compile its smallest bucket (blocking).

    Raises:
        FunctionError: the model or its architecture is missing or unknown; says which.
    """
    started = time.perf_counter()
    import jax
    import jax.numpy as jnp

    from dmlsys.events import hotel
    from dmlsys.train.store import ModelStore

    try:
        params, card = ModelStore(store).load(model, version)
    except Exception as e:
        raise FunctionError(f"cannot load model {model!r} version {version or 'latest'} from {store}: "
                            f"{type(e).__name__}: {e}") from e
    params = jax.tree_util.tree_map(jnp.asarray, params)
    arch = card.get("arch") or {}
    if arch.get("kind") == hotel.ARCH["kind"]:
        def fn(x):
            return jnp.exp(hotel.apply(params, x))
        task, in_dim, labels = "regression", int(arch.get("features", hotel.N_FEATURES)), ()
    else:
        from dmlsys.train.models import LABELS, build

        try:
            net = build(arch)
        except Exception as e:
            raise FunctionError(f"model {model!r}: {e}") from e

        def fn(x):
            return jax.nn.softmax(net.apply(params, x), axis=-1)
        task, in_dim, labels = "classification", 784, tuple(LABELS)
    buckets = tuple(sorted({int(b) for b in buckets}))
    out = Loaded(model, card.get("version"), task, in_dim, jax.jit(fn), buckets, set(), labels)
    out.compile(buckets[0])
    out.load_seconds = time.perf_counter() - started
    return out


class FunctionService(Service):
    """Runs one model's events; a spare until told its model. See the module docstring."""

    name = "function"

    def __init__(self, *, store: str | os.PathLike, cache_dir: str | None, model: str | None = None,
                 version: int | None = None, buckets: tuple[int, ...] = BUCKETS,
                 max_instances: int = MAX_INSTANCES) -> None:
        self.store, self.cache_dir, self.model, self.version = store, cache_dir, model, version
        self.buckets, self.max_instances = buckets, max_instances
        self.loaded: Loaded | None = None
        self.warm_seconds: float | None = None
        self.served = 0
        self._lock = asyncio.Lock()
        self._warming: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()

    async def start(self, node) -> None:
        await super().start(node)
        what = f"loading {self.model}" if self.model else "warming up JAX (a spare)"
        self.gate = node.gate("function", what)
        self._warming = asyncio.get_running_loop().create_task(self._warm())
        self._tasks.add(self._warming)

    async def stop(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _spawn(self, coro) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    async def _warm(self) -> None:
        def work() -> float:
            compile_cache(self.cache_dir)
            return warm_up()
        self.warm_seconds = await to_thread(work)
        if self.model:
            try:
                await self._load(self.model, self.version)
            except FunctionError as e:
                self.gate.close(f"load failed: {e}")
                log.error("function %s: %s", self.node.name, e)
                return
        self.gate.open()
        log.info("function instance %s ready in %.2fs (%s)", self.node.name, self.warm_seconds,
                 f"model {self.model}" if self.model else "spare")

    async def _load(self, model: str, version: int | None) -> Loaded:
        async with self._lock:
            if self.loaded is not None and self.loaded.model == model and version in (None, self.loaded.version):
                return self.loaded
            loaded = await to_thread(load_model, self.store, model, version, self.buckets)
            self.loaded, self.model = loaded, model
            self._spawn(self._compile_rest(loaded))
            return loaded

    async def _compile_rest(self, loaded: Loaded) -> None:
        for b in loaded.buckets[1:]:
            await to_thread(loaded.compile, b)

    # -- rpcs -------------------------------------------------------------------------------

    @rpc(allow=LOADERS)
    async def load(self, body: Any) -> dict[str, Any]:
        """``{"model", "version"?}``: become an instance of that model (a spare's cold start)."""
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            raise FunctionError('load takes {"model": name, "version": int or null}')
        if self.loaded is not None and self.loaded.model != body["model"]:
            raise FunctionError(f"instance {self.node.name} already runs {self.loaded.model!r}; start another")
        if self._warming is not None and not self._warming.done():  # told before its warm-up finished
            await asyncio.shield(self._warming)
        loaded = await self._load(body["model"], body.get("version"))
        return {"model": loaded.model, "version": loaded.version, "load_seconds": loaded.load_seconds,
                "compiled": sorted(loaded.compiled)}

    @rpc
    def invoke(self, body: Any) -> dict[str, Any]:
        """``{"instances": rows}`` -> ``{"model", "version", "predictions"}`` (+ ``"scores"`` for a
        classifier: the probability of each predicted label)."""
        loaded = self.loaded
        if loaded is None:
            raise FunctionError(f"instance {self.node.name} has no model loaded yet")
        rows = body.get("instances") if isinstance(body, dict) else None
        if rows is None:
            raise FunctionError('invoke takes {"instances": [[...], ...]}')
        x = np.asarray(rows, np.float32)
        if x.ndim == 1:
            x = x[None, :]
        n = x.shape[0]
        if not 1 <= n <= self.max_instances:
            raise FunctionError(f"{n} instances; this function takes 1 to {self.max_instances} per event")
        if loaded.task == "regression":
            from dmlsys.events.hotel import features

            if x.shape[1] != 4:
                raise FunctionError(f"model {loaded.model!r} takes rows of 4 (day, days ahead, nights, room), "
                                    f"got {x.shape[1]}")
            out = loaded.run(features(x))
            self.served += n
            return {"model": loaded.model, "version": loaded.version,
                    "predictions": [round(float(v), 2) for v in out]}
        x = x.reshape(n, -1)
        if x.shape[1] != loaded.in_dim:
            raise FunctionError(f"model {loaded.model!r} takes {loaded.in_dim} values per instance, got {x.shape[1]}")
        scores = loaded.run(x)
        top = scores.argmax(axis=1)
        self.served += n
        return {"model": loaded.model, "version": loaded.version,
                "predictions": [loaded.labels[i] for i in top],
                "scores": [round(float(scores[j, i]), 4) for j, i in enumerate(top)]}

    @rpc
    def info(self, body=None) -> dict[str, Any]:
        return self.status()

    def status(self) -> dict[str, Any]:
        ld = self.loaded
        return {"function": {"model": ld.model if ld else None, "version": ld.version if ld else None,
                             "compiled": sorted(ld.compiled) if ld else [], "warm_seconds": self.warm_seconds,
                             "load_seconds": ld.load_seconds if ld else None, "served": self.served}}
