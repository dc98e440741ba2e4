"""A process group of N simulated nodes, built and torn down in one call.

    def test_x():
        run_groups(3, lambda groups: asyncio.gather(*(g.barrier() for g in groups)))

Everything runs on the virtual-time loop (``dmlsys.wire.sim.run``): a 30 s collective timeout
costs no wall time, and the seeded network (delay 1 ms, jitter 1 ms: chunks arrive reordered)
makes every run replayable.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any, Awaitable, Callable

import numpy as np

from dmlsys.assembly import SimTransports, System
from dmlsys.collective import CollectiveService, ProcessGroup
from dmlsys.node import Node
from dmlsys.wire import sim
from dmlsys.wire.sim import Link, SimNetwork


@dataclasses.dataclass
class SimGroup:
    net: SimNetwork
    names: list[str]
    nodes: list[Node]
    groups: list[ProcessGroup]

    def crash(self, rank: int) -> None:
        """Rank ``rank`` dies as a process would: its link goes dark and its node stops dead."""
        self.net.crash(self.names[rank])
        self.nodes[rank].kill()

    async def each(self, fn: Callable[[ProcessGroup], Awaitable[Any]]) -> list[Any]:
        """``fn(group)`` on every rank at once; exceptions are returned, not raised."""
        return await asyncio.gather(*(fn(g) for g in self.groups), return_exceptions=True)


def run_groups(n: int, body: Callable[[SimGroup], Awaitable[Any]], *, seed: int = 0, link: Link | None = None,
               **group_kw: Any) -> Any:
    """Start N nodes named w0..w{N-1} with a ProcessGroup each, run ``body``, stop them all."""

    async def main() -> Any:
        net = SimNetwork(seed, link=link) if link is not None else SimNetwork(seed)
        names = [f"w{i}" for i in range(n)]
        system = System(SimTransports(net))
        nodes = [system.add(name, services=[CollectiveService()]) for name in names]
        await system.start()
        try:
            groups = [ProcessGroup(node, names, **group_kw) for node in nodes]
            return await body(SimGroup(net, names, nodes, groups))
        finally:
            await system.stop(drain_timeout=0.1)

    return sim.run(main())


def random_array(rng: np.random.Generator, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """Values that exercise the dtype: the full range for integers (sums wrap, as numpy's do),
    moderate finite values for floats, both parts for complex."""
    dtype = np.dtype(dtype)
    if dtype.kind == "b":
        return rng.integers(0, 2, shape).astype(bool)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
    real = rng.standard_normal(shape) * 100
    if dtype.kind == "c":
        real = real + 1j * rng.standard_normal(shape) * 100
    return np.asarray(real).astype(dtype)


def reference(arrays: list[np.ndarray], op: str) -> np.ndarray:
    """What the group must compute, in numpy: the ufunc folded in the array's own dtype (so
    integer sums wrap like the ring's), ``mean`` as that sum over N."""
    ufunc = {"sum": np.add, "mean": np.add, "max": np.maximum, "min": np.minimum}[op]
    acc = arrays[0].copy()
    for a in arrays[1:]:
        ufunc(acc, a, out=acc)
    if op == "mean":
        acc = acc / len(arrays) if acc.dtype.kind in "biu" else acc / acc.dtype.type(len(arrays))
    return np.asarray(acc)


def assert_matches(got: np.ndarray, arrays: list[np.ndarray], op: str) -> None:
    """``got`` equals ``reference(arrays, op)``: exactly for integers and booleans; for floats
    within N machine epsilons of the inputs' magnitudes, since the ring adds in another order
    than numpy (and a cancelling sum has a tiny result but not a tiny rounding error)."""
    got, want = np.asarray(got), reference(arrays, op)
    assert got.shape == want.shape, (got.shape, want.shape)
    assert got.dtype == want.dtype, (got.dtype, want.dtype)
    if want.dtype.kind in "biu":
        np.testing.assert_array_equal(got, want)
        return
    # Widen before abs: abs(int8(-128)) overflows to -128 and made the tolerance negative.
    magnitude = sum(np.abs(a.astype(np.complex128)) for a in arrays)
    if op == "mean":
        magnitude = magnitude / len(arrays)
    tolerance = float(np.finfo(want.dtype).eps) * 2 * len(arrays) * magnitude
    error = np.abs(got.astype(np.complex128) - want.astype(np.complex128))
    assert np.all(error <= tolerance), f"max error {error.max()} over tolerance"


def assert_bitwise_identical(results: list[np.ndarray]) -> None:
    first = np.asarray(results[0])
    for rank, r in enumerate(results[1:], 1):
        r = np.asarray(r)
        assert r.dtype == first.dtype and r.shape == first.shape, f"rank {rank}: {r.dtype}{r.shape} vs {first.dtype}{first.shape}"
        assert r.tobytes() == first.tobytes(), f"rank {rank} differs from rank 0"
