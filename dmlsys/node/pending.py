"""Calls waiting for their reply, each with a deadline, under one timer.

A call_later per call costs a timer handle and two heap operations inside the loop, a tenth of a
small RPC's CPU on the caller. Instead the deadlines live in a heap of ``(expiry, id)`` here,
with one loop timer armed for the earliest. A call that completes leaves its heap entry behind
(removing from the middle of a heap is O(n)): stale entries are skipped when they surface, and
the heap is rebuilt whenever they outnumber the live ones, so memory stays O(calls pending).
"""

from __future__ import annotations

import asyncio
import heapq
import math
from typing import Callable, Iterator

from dmlsys.node.errors import RpcTimeout

Entry = tuple  # (future, peer, "service.method", timeout)


class PendingCalls:
    __slots__ = ("_calls", "_heap", "_timer", "_armed_at")

    def __init__(self) -> None:
        self._calls: dict[int, Entry] = {}
        self._heap: list[tuple[float, int]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._armed_at = math.inf

    def add(self, loop: asyncio.AbstractEventLoop, msg_id: int, fut: asyncio.Future, peer: str, method: str,
            timeout: float) -> None:
        """Wait for ``msg_id``'s reply until ``timeout`` seconds from now, then fail ``fut`` with RpcTimeout."""
        self._calls[msg_id] = (fut, peer, method, timeout)
        expiry = loop.time() + timeout
        heapq.heappush(self._heap, (expiry, msg_id))
        if expiry < self._armed_at:
            self._arm(loop, expiry)
        if len(self._heap) > 2 * len(self._calls) + 1024:
            self._heap = [e for e in self._heap if e[1] in self._calls]
            heapq.heapify(self._heap)

    def get(self, msg_id: int) -> Entry | None:
        return self._calls.get(msg_id)

    def pop(self, msg_id: int) -> Entry | None:
        return self._calls.pop(msg_id, None)

    def fail_peer(self, peer: str, make_error: Callable[[], BaseException]) -> int:
        """Fail every call waiting on ``peer`` (it is known to be gone); return how many.
        Their heap entries go stale and are skipped as usual."""
        lost = [msg_id for msg_id, (_, p, _, _) in self._calls.items() if p == peer]
        for msg_id in lost:
            fut = self._calls.pop(msg_id)[0]
            if not fut.done():
                fut.set_exception(make_error())
        return len(lost)

    def fail_all(self, make_error: Callable[[], BaseException]) -> None:
        """Fail every waiting call (the node stopped) and forget them."""
        for fut, *_ in self._calls.values():
            if not fut.done():
                fut.set_exception(make_error())
        self._calls.clear()
        self._heap.clear()
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._armed_at = None, math.inf

    def __len__(self) -> int:
        return len(self._calls)

    def __iter__(self) -> Iterator[int]:
        return iter(self._calls)

    def _arm(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = loop.call_at(when, self._expire, loop)
        self._armed_at = when

    def _expire(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer, self._armed_at = None, math.inf
        # uvloop's clock ticks in milliseconds and may fire a timer just before its time by
        # that clock; without the slack we would re-arm for the same instant until it ticks.
        now = loop.time() + (getattr(loop, "_clock_resolution", None) or 0.001)
        heap, calls = self._heap, self._calls
        while heap and heap[0][0] <= now:
            _, msg_id = heapq.heappop(heap)
            entry = calls.get(msg_id)
            if entry is not None and not entry[0].done():
                fut, peer, method, timeout = entry
                fut.set_exception(RpcTimeout(peer, method, timeout))
        while heap and heap[0][1] not in calls:  # arm for a live call, not a finished one
            heapq.heappop(heap)
        if heap:
            self._arm(loop, heap[0][0])
