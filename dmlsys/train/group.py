"""The process-group interface the trainer averages gradients through, and two local groups.

:class:`Group` is all the trainer needs from :mod:`dmlsys.collective`: a rank, a size and two
collectives on pytrees of numpy arrays. ``dmlsys.collective.ProcessGroup`` satisfies it over
the network; here are two that need none:

* :class:`LocalGroup`: one worker (rank 0 of 1); every collective is the identity.
* :class:`InProcessGroup`: N workers as asyncio tasks in one process, meeting at a shared
  rendezvous. It sums in rank order, so every rank gets the bitwise-identical result, as
  the real ring promises. Tests use it to check that N workers train exactly like one.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol, runtime_checkable

import jax
import numpy as np

from dmlsys.arrays import OPS

from .errors import InvalidArgument, TrainError


@runtime_checkable
class Group(Protocol):
    rank: int
    size: int

    async def allreduce(self, tree: Any, op: str = "sum") -> Any: ...

    async def broadcast(self, tree: Any, root: int = 0) -> Any: ...


class LocalGroup:
    """A group of one: rank 0 of size 1. Collectives return their input unchanged."""

    rank = 0
    size = 1

    async def allreduce(self, tree: Any, op: str = "sum") -> Any:
        if op not in OPS:
            raise InvalidArgument(f"unknown op {op!r}; known: {', '.join(OPS)}")
        return tree

    async def broadcast(self, tree: Any, root: int = 0) -> Any:
        if root != 0:
            raise InvalidArgument(f"broadcast root {root} out of range for group size 1")
        return tree


class _Rendezvous:
    """Where the ranks of an :class:`InProcessGroup` meet, one round per collective call."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.rounds: dict[int, dict[int, Any]] = {}
        self.results: dict[int, asyncio.Future] = {}

    def arrive(self, round_: int, rank: int, value: Any, combine) -> asyncio.Future:
        slot = self.rounds.setdefault(round_, {})
        fut = self.results.get(round_)
        if fut is None:
            fut = self.results[round_] = asyncio.get_running_loop().create_future()
        slot[rank] = value
        if len(slot) == self.size:
            try:
                fut.set_result(combine([slot[r] for r in range(self.size)]))
            except Exception as exc:  # every rank sees the same failure
                fut.set_exception(exc)
            # Every rank already holds `fut`; forget the round so a long run keeps no history.
            del self.rounds[round_], self.results[round_]
        return fut


class InProcessGroup:
    """One rank of N simulated workers living in the same event loop.

    Create all ranks at once and run one trainer per rank as a task::

        groups = InProcessGroup.create(4)
        await asyncio.gather(*(Trainer(arch, hp, group=g).fit(ds, 1) for g in groups))

    Ranks must call the same collectives in the same order (as with any real group).
    """

    def __init__(self, rank: int, size: int, rendezvous: _Rendezvous, timeout: float = 30.0) -> None:
        self.rank, self.size = rank, size
        self.timeout = timeout
        self._rv = rendezvous
        self._round = 0
        self.calls = 0  # collectives issued: lets tests count communication rounds

    @classmethod
    def create(cls, size: int, *, timeout: float = 30.0) -> list[InProcessGroup]:
        """All ``size`` ranks; a collective waits at most ``timeout`` seconds for the others."""
        if size < 1:
            raise InvalidArgument(f"group size must be >= 1, got {size}")
        rv = _Rendezvous(size)
        return [cls(r, size, rv, timeout) for r in range(size)]

    async def _collective(self, value: Any, combine) -> Any:
        self._round += 1
        self.calls += 1
        round_ = self._round
        fut = self._rv.arrive(round_, self.rank, value, combine)
        try:
            result = await asyncio.wait_for(asyncio.shield(fut), self.timeout)
        except TimeoutError:
            arrived = self._rv.rounds.get(round_, {})
            missing = [r for r in range(self.size) if r not in arrived]
            raise TrainError(
                f"rank {self.rank}: collective #{round_} waited {self.timeout:g}s for rank(s) {missing}; "
                "a worker failed or calls collectives in a different order"
            ) from None
        # Every rank gets its own copy, as it would from the network.
        return jax.tree_util.tree_map(np.array, result)

    async def allreduce(self, tree: Any, op: str = "sum") -> Any:
        if op not in OPS:
            raise InvalidArgument(f"unknown op {op!r}; known: {', '.join(OPS)}")
        fn = OPS[op]
        size = self.size

        def combine(trees: list[Any]) -> Any:
            def reduce(*leaves):
                acc = np.array(leaves[0])
                for leaf in leaves[1:]:  # fixed rank order: identical on every rank
                    acc = fn(acc, leaf)
                return acc / size if op == "mean" else acc
            return jax.tree_util.tree_map(reduce, *trees)

        return await self._collective(jax.tree_util.tree_map(np.asarray, tree), combine)

    async def broadcast(self, tree: Any, root: int = 0) -> Any:
        if not 0 <= root < self.size:
            raise InvalidArgument(f"broadcast root {root} out of range for group size {self.size}")
        return await self._collective(tree, lambda trees: trees[root])
