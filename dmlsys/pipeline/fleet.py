"""Where the pipeline's ``serve`` step puts its models: a small serving fleet inside one process.

Two fleets with one interface (``start``, ``ensure``, ``predict``, ``stop``):

* ``NodeFleet`` — the real thing, built by the assembly point (``dmlsys.assembly.System``) with
  the cluster's own roles: one ``replica`` node per served model version (load, compile,
  adaptive batching) and a ``gateway`` node (balancer with readiness probes, plus its HTTP
  front door on a free port), on the caller's event loop. On ZeroMQ, predictions travel gateway
  balancer -> ZeroMQ -> replica and back, exactly as in a cluster; only the processes are
  shared. On a ``SimNetwork`` the same nodes run on virtual time, and the gateway has no HTTP
  door. A served model is added to every directory, and traffic reaches it once a probe sees it
  ready; a model that drops out of the top two is taken out of the directories first (no new
  requests), then its node drains and stops.
* ``LocalFleet`` — the fallback: the model's ``apply`` function, jitted, called in a thread.
  Same answers, no nodes; for machines where binding sockets is not wanted.

``ensure(wanted)`` makes the fleet serve exactly ``wanted`` (model name -> version): it is what
the pipeline's asynchronous ``serve`` step calls on every arrival of a trained model.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Mapping

import numpy as np

from dmlsys.assembly import System, Transports, ZmqTransports
from dmlsys.serving.errors import ServingError
from dmlsys.workflow import WorkflowError

log = logging.getLogger(__name__)

CHUNK = 256  # instances per predict request, and the one batch shape the replicas compile


class ServeError(WorkflowError):
    """A model could not be served or asked for predictions; the message names the model."""


class NodeFleet:
    """Replica nodes + a gateway node, in this process, built by the assembly point."""

    def __init__(self, store: str, *, replicas: int = 1, ready_timeout: float = 180.0,
                 transports: Transports | None = None) -> None:
        self.store = str(store)
        self.replicas = replicas
        self.ready_timeout = ready_timeout
        self.system = System(transports or ZmqTransports(), store=self.store)
        self.service: Any = None  # the gateway's GatewayService
        self.nodes: dict[tuple[str, int], list[str]] = {}  # (model, version) -> replica node names

    @property
    def url(self) -> str | None:
        """The gateway's HTTP front door (KServe v1), while the fleet runs (None on SimNetwork)."""
        return self.service.url if self.service is not None else None

    async def start(self) -> None:
        # Short probe period: the pipeline waits for a new replica to be seen ready, and a
        # long try timeout: a replica computes a whole CHUNK of CNN predictions per request.
        http = "127.0.0.1:0" if self.system.transports.kind == "zmq" else "off"
        gateway = self.system.add("gateway", "gateway", config={
            "http": http, "deadline": 120.0, "max_instances": CHUNK, "probe_period": 0.1, "probe_timeout": 2.0,
            "try_timeout": 60.0})
        await self.system.start()
        self.service = gateway.service("serving")

    async def ensure(self, wanted: Mapping[str, int]) -> None:
        """Serve exactly ``wanted`` (model -> version): start what is missing, wait until the
        balancer sees it ready, then retire what is no longer wanted."""
        fresh: list[tuple[str, int]] = []
        for model, version in wanted.items():
            if (model, version) in self.nodes:
                continue
            started = self.nodes[(model, version)] = []  # so that stop() finds them whatever happens
            for i in range(self.replicas):
                name = f"replica-{model}-v{version}-{i}"
                await self.system.spawn(name, "replica", config={
                    "model": model, "version": version, "max_instances": CHUNK, "buckets": [CHUNK]})
                started.append(name)
            fresh.append((model, version))
        for model, version in fresh:
            await self._wait_ready(model, version)
        for key in [k for k in self.nodes if wanted.get(k[0]) != k[1]]:
            for name in self.nodes.pop(key):
                await self.system.retire(name, drain_timeout=10.0)

    async def _wait_ready(self, model: str, version: int) -> None:
        names = set(self.nodes[(model, version)])
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.ready_timeout
        while True:
            info = self.service.balancer.models().get(model, {})
            if names <= set(info.get("ready_replicas", ())):
                return
            for name in names:
                svc = self.system.node(name).service("model")
                if svc.phase == "failed":
                    raise ServeError(f"replica {name} cannot serve {model} v{version}: {svc.last_error}")
            if loop.time() > deadline:
                raise ServeError(f"{model} v{version} not ready on {sorted(names)} within {self.ready_timeout:g}s; "
                                 "the replicas are still compiling or stuck: see their logs")
            await asyncio.sleep(0.05)

    async def predict(self, model: str, x: np.ndarray) -> tuple[np.ndarray, set[int]]:
        """Scores for ``x`` (n, 28, 28) float32, sent through the balancer in CHUNK-sized requests,
        all in flight at once (the replica batches what queues up). Returns the scores and the
        set of versions that answered."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 120.0
        flat = np.ascontiguousarray(x.reshape(len(x), -1), np.float32)
        try:
            replies = await asyncio.gather(*(
                self.service.balancer.predict(model, {"x": flat[i:i + CHUNK]}, deadline=deadline)
                for i in range(0, len(flat), CHUNK)))
        except ServingError as e:
            raise ServeError(f"predicting with {model}: {type(e).__name__}: {e}") from e
        if not replies:
            return np.zeros((0, 10), np.float32), set()
        return np.concatenate([r["scores"] for r in replies]), {r["version"] for r in replies}

    def served(self) -> dict[str, list[str]]:
        return {f"{m} v{v}": list(names) for (m, v), names in self.nodes.items()}

    async def stop(self) -> None:
        # The gateway first (no new requests), then the replicas behind it: they were spawned
        # after the gateway, so reverse start order alone would stop them first.
        if self.service is not None:
            await self.system.retire("gateway", drain_timeout=5.0)
            self.service = None
        await self.system.stop(drain_timeout=5.0)
        self.nodes.clear()


class LocalFleet:
    """The fallback: each served model is its jitted ``apply`` + softmax, called in a thread."""

    def __init__(self, store: str, **_: Any) -> None:
        self.store = str(store)
        self.fns: dict[tuple[str, int], Any] = {}
        self.url = None

    async def start(self) -> None:
        pass

    async def ensure(self, wanted: Mapping[str, int]) -> None:
        for model, version in wanted.items():
            if (model, version) not in self.fns:
                self.fns[(model, version)] = await asyncio.to_thread(self._load, model, version)
        for key in [k for k in self.fns if wanted.get(k[0]) != k[1]]:
            del self.fns[key]

    def _load(self, model: str, version: int) -> Any:
        import jax

        from dmlsys.train.models import build
        from dmlsys.train.store import ModelStore

        params, card = ModelStore(self.store).load(model, version)
        apply = build(card["arch"]).apply
        return jax.jit(lambda x: jax.nn.softmax(apply(params, x), axis=-1))

    async def predict(self, model: str, x: np.ndarray) -> tuple[np.ndarray, set[int]]:
        found = [(k, f) for k, f in self.fns.items() if k[0] == model]
        if not found:
            raise ServeError(f"{model} is not served; served: {sorted(m for m, _ in self.fns)}")
        (_, version), fn = found[0]

        def run() -> np.ndarray:
            flat = np.asarray(x, np.float32).reshape(len(x), -1)
            return np.concatenate([np.asarray(fn(flat[i:i + CHUNK])) for i in range(0, len(flat), CHUNK)])

        return await asyncio.to_thread(run), {version}

    def served(self) -> dict[str, list[str]]:
        return {f"{m} v{v}": ["in-process"] for m, v in self.fns}

    async def stop(self) -> None:
        self.fns.clear()


FLEETS = {"nodes": NodeFleet, "local": LocalFleet}
