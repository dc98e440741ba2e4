"""A loaded model version, compiled and warmed up: ``Runtime.predict(x) -> scores``.

JAX compiles one program per input shape, so a batch of 13 would trigger a fresh compile in
the middle of serving. As TensorFlow Serving does with ``allowed_batch_sizes``, we pad every
batch up to the next of a few bucket sizes and compile all of them at load time: after
``load`` returns, no request ever waits for the compiler.

Compiled programs are kept in JAX's persistent compilation cache, beside the model store
(``<store>/../jax-cache``: ``.dmlsys/jax-cache`` in a cluster; ``$DMLSYS_JAX_CACHE`` to move it,
``off`` for none), so a restarted replica or a second one reads them from disk instead of
compiling: measured here, loading fashion-mlp with its seven buckets went from 7.4 s to 1.0 s
under load (docs/events.md, "Cold start").
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from dmlsys.serving.errors import ModelLoadError

BUCKETS = (1, 2, 4, 8, 16, 32, 64)


@dataclasses.dataclass(frozen=True)
class Runtime:
    """An immutable, ready-to-run model version. Swapping versions swaps the whole object."""

    model: str
    version: int | None
    card: dict[str, Any]
    labels: tuple[str, ...]
    buckets: tuple[int, ...]
    fn: Callable[[np.ndarray], np.ndarray]  # (bucket, 784) float32 -> (bucket, 10) scores
    load_seconds: float = 0.0

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Scores (softmax probabilities) for ``x`` of shape (n, 784), any n >= 1."""
        n = x.shape[0]
        top = self.buckets[-1]
        if n > top:
            return np.concatenate([self.predict(x[i:i + top]) for i in range(0, n, top)])
        bucket = next(b for b in self.buckets if b >= n)
        if bucket != n:
            padded = np.zeros((bucket, x.shape[1]), np.float32)
            padded[:n] = x
            x = padded
        return np.asarray(self.fn(x))[:n]


def load(store: str | Path, model: str, version: int | None = None,
         buckets: Sequence[int] = BUCKETS) -> Runtime:
    """Load ``model`` at ``version`` (None: latest) from the store, compile every bucket, warm up.

    Blocking (seconds of JAX compilation): the replica runs it in a thread.

    Raises:
        ModelLoadError: the model, version or architecture is missing or broken; says which.
    """
    started = time.perf_counter()
    try:
        import jax
        import jax.numpy as jnp

        compile_cache(store)

        from dmlsys.train.models import LABELS, build
        from dmlsys.train.store import ModelStore

        params, card = ModelStore(store).load(model, version)
        net = build(card["arch"])
    except Exception as e:  # ModelNotFound, StoreError, UnknownArchitecture, KeyError...
        raise ModelLoadError(f"cannot load model {model!r} version {version or 'latest'} from {store}: "
                             f"{type(e).__name__}: {e}") from e
    params = jax.tree_util.tree_map(jnp.asarray, params)

    @jax.jit
    def scores(x):
        return jax.nn.softmax(net.apply(params, x), axis=-1)

    buckets = tuple(sorted(set(int(b) for b in buckets)))
    for b in buckets:  # compile and run each shape once, so serving never compiles
        np.asarray(scores(np.zeros((b, 784), np.float32)))
    return Runtime(model, int(card.get("version", version or 0)) or None, card, tuple(LABELS), buckets,
                   scores, time.perf_counter() - started)


def compile_cache(store: str | Path) -> None:
    """Turn on JAX's persistent compilation cache for this process (see the module docstring).
    Every program is cached however fast it compiled: a model's programs are small, and a
    replica's start is made of exactly those. A directory that cannot be made leaves it off."""
    import os

    import jax

    where = os.environ.get("DMLSYS_JAX_CACHE") or str(Path(store).resolve().parent / "jax-cache")
    if where == "off":
        return
    try:
        Path(where).mkdir(parents=True, exist_ok=True)
    except OSError:
        return
    jax.config.update("jax_compilation_cache_dir", where)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
