"""Admission: which request gets a replica's in-flight slot, and who waits for one.

A replica takes at most ``max_in_flight`` requests at once (the pool's limit). When every
eligible replica of a model is full, a request waits in that model's FIFO queue; at most
``max_queue`` wait, and past that a request is refused at once with ``Overloaded`` (503). A
waiting request ends one of three ways: a slot frees and it is first in line (``release``
wakes exactly one waiter), its deadline passes (``DeadlineExceeded``), or no replica could take
it any more (``NoReplicaReady``).

Fairness: a new request picks a replica directly only when nobody waits. A retry (``tried`` is
not empty) has waited its turn once already and does not queue behind newcomers; when only a
replica it tried is free, it takes that one rather than none.
"""

from __future__ import annotations

import asyncio
import collections
import random

from dmlsys.serving.errors import DeadlineExceeded, NoReplicaReady, Overloaded
from dmlsys.serving.policies import Pool, Replica


class Admission:
    def __init__(self, *, max_queue: int = 1024, rng: random.Random | None = None, retry_after: float = 1.0) -> None:
        self.max_queue = max_queue
        self.rng = rng or random.Random()
        self.retry_after = retry_after  # what a NoReplicaReady tells the client
        self.refused = 0  # requests refused with NoReplicaReady or Overloaded
        self._queues: dict[str, collections.deque] = {}

    def queued(self, model: str) -> int:
        return len(self._queues.get(model, ()))

    def _queue(self, model: str) -> collections.deque:
        q = self._queues.get(model)
        if q is None:
            q = self._queues[model] = collections.deque()
        return q

    def try_acquire(self, pool: Pool, now: float, key: str | None, tried: list[str]) -> Replica | None:
        """A replica with a slot taken for this request, without waiting; or None."""
        waiting = self._queues.get(pool.model)
        r = pool.pick(now, self.rng, key, exclude=tried) if not waiting or tried else None
        if r is None and tried:  # nobody else: the one we tried beats no one
            r = pool.pick(now, self.rng, key)
        if r is not None:
            r.in_flight += 1
        return r

    async def acquire(self, pool: Pool, deadline: float, key: str | None, tried: list[str]) -> Replica:
        """A replica with a slot taken for this request, waiting in line if need be.

        ``deadline`` is loop time. Raises NoReplicaReady, Overloaded or DeadlineExceeded.
        """
        loop = asyncio.get_running_loop()
        waiters = self._queue(pool.model)
        while True:
            now = loop.time()
            r = self.try_acquire(pool, now, key, tried)
            if r is not None:
                return r
            if not pool.saturated(now) and not waiters:
                self.refused += 1
                raise NoReplicaReady(pool.model, pool.why_none(now), retry_after=self.retry_after)
            if len(waiters) >= self.max_queue:
                self.refused += 1
                raise Overloaded(pool.model, self.max_queue)
            fut = loop.create_future()
            waiters.append(fut)
            timer = loop.call_later(max(0.0, deadline - now), _expire, fut)
            try:
                if not await fut:
                    raise DeadlineExceeded(f"deadline passed while queued for a replica of {pool.model!r}")
            finally:
                timer.cancel()
                if fut in waiters:
                    waiters.remove(fut)
            # Woken as first in line: pick without yielding to the queue (it may hold others).
            now = loop.time()
            r = pool.pick(now, self.rng, key, exclude=tried) or (pool.pick(now, self.rng, key) if tried else None)
            if r is not None:
                r.in_flight += 1
                return r
            if not pool.saturated(now):
                raise NoReplicaReady(pool.model, pool.why_none(now), retry_after=self.retry_after)

    def release(self, pool: Pool, r: Replica) -> None:
        r.in_flight -= 1
        if self._queues.get(pool.model):  # somebody waits (rarely): wake the first
            self.wake(pool.model)

    def wake(self, model: str) -> None:
        """Let the first in line for ``model`` try again (a slot freed, or a replica turned ready)."""
        waiters = self._queues.get(model)
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(True)
                return


def _expire(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(False)
