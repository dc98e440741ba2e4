"""A rank that stops its node right after its last collective must not strand the others.

The flake this pins (``test_ring_tcp``, 4 ranks, pass #6 under CPU load): a rank's last pass
returns once it holds the result, while its own last chunks to its successor may still wait in
ZeroMQ's send queue (the kernel's socket buffer full, the successor slow to read). The process
then stopped its node, the transport closed its sockets with ``linger=0``, the queued chunks
were dropped, and the successor timed out 30 s later naming ranks that had exited cleanly.

``QueuedTransport`` models exactly that on the simulated network: what a node sends to a peer
on its outbound connection waits in a FIFO queue that drains one message per ``drain`` seconds,
and ``close()`` drops whatever is still queued. Replies go out at once: they travel on the
reply connection, which carries no bulk data. Links have no jitter: a ZeroMQ connection
delivers in order, and the leave protocol relies on that.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

from dmlsys.collective import CollectiveError, CollectiveService, ProcessGroup
from dmlsys.node import Node
from dmlsys.wire import sim
from dmlsys.wire.sim import Link, SimNetwork
from dmlsys.wire.transport import Receiver, Route, Transport

FIFO = Link(delay=0.001, jitter=0.0)


class QueuedTransport(Transport):
    """A SimTransport whose sends to ``slow`` peers wait in a queue that ``close()`` drops."""

    def __init__(self, inner: sim.SimTransport, slow: dict[str, float]) -> None:
        self.name, self.address, self._inner, self._slow = inner.name, inner.address, inner, slow
        self._queues: dict[str, collections.deque] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self.dropped: list[bytes] = []  # the headers of what close() dropped

    def set_receiver(self, receiver: Receiver) -> None:
        self._inner.set_receiver(receiver)

    async def start(self) -> None:
        await self._inner.start()

    def add_peer(self, name: str, address: str) -> None:
        pass

    def send(self, peer: str, frames: Sequence[Any]) -> None:
        drain = self._slow.get(peer)
        if drain is None:
            self._inner.send(peer, frames)
            return
        queue = self._queues.setdefault(peer, collections.deque())
        queue.append([bytes(getattr(f, "buffer", f)) for f in frames])  # the caller may reuse its buffers
        if peer not in self._timers:
            self._timers[peer] = asyncio.get_running_loop().call_later(drain, self._drain, peer)

    def _drain(self, peer: str) -> None:
        queue = self._queues[peer]
        self._inner.send(peer, queue.popleft())
        del self._timers[peer]
        if queue:
            self._timers[peer] = asyncio.get_running_loop().call_later(self._slow[peer], self._drain, peer)

    def reply(self, route: Route, frames: Sequence[Any]) -> None:
        self._inner.reply(route, frames)

    async def close(self) -> None:  # linger=0: what is still queued is lost
        for timer in self._timers.values():
            timer.cancel()
        self.dropped = [frames[0] for q in self._queues.values() for frames in q]
        self._queues.clear()
        self._timers.clear()
        await self._inner.close()


def run(n: int, body, *, slow: dict[tuple[int, int], float], seed: int = 0, **group_kw):
    """N nodes w0..w{N-1}; sends from rank a to rank b queue ``slow[(a, b)]`` seconds a message."""

    async def main():
        net = SimNetwork(seed, link=FIFO)
        names = [f"w{i}" for i in range(n)]
        transports = [QueuedTransport(net.transport(name), {names[b]: d for (a, b), d in slow.items() if a == i})
                      for i, name in enumerate(names)]
        nodes = [Node(name, t, admin=None) for name, t in zip(names, transports)]
        for node in nodes:
            node.add_service(CollectiveService())
            await node.start()
        try:
            groups = [ProcessGroup(node, names, **group_kw) for node in nodes]
            return await body(nodes, groups, transports)
        finally:
            for node in nodes:
                await node.stop(drain_timeout=0.0)

    return sim.run(main())


@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("path", ["ring", "direct"])
@pytest.mark.parametrize("close_first", [False, True])
def test_ranks_that_stop_their_nodes_right_after_the_last_pass_leave_no_rank_without_its_result(n, path, close_first):
    """Every rank: two allreduces, then at once (maybe closing its group first, as the worker
    role does) stop its node. Rank 0's queue to rank 1 drains slowly: rank 0 holds its result
    while its last chunks to rank 1 still wait. Every rank gets the right result, nothing
    queued is dropped but maybe a leave request that is no longer needed, and nobody waits out
    a bound (the leave takes a few link delays)."""
    length = 5000 if path == "ring" else 16  # ring: several chunks per segment; direct: one message each

    async def body(nodes, groups, transports):
        loop = asyncio.get_running_loop()
        t0 = loop.time()

        async def rank(r):
            g = groups[r]
            try:
                await g.allreduce(np.ones(length), "sum")
                got = await g.allreduce(np.full(length, r + 1, np.float64), "sum")
            except CollectiveError as e:
                return e
            if close_first:
                g.close()
            await nodes[r].stop(drain_timeout=0.0)
            return got

        return await asyncio.gather(*(rank(r) for r in range(n))), loop.time() - t0, [t.dropped for t in transports]

    results, took, dropped = run(n, body, slow={(0, 1 % n): 0.01}, timeout=30.0, chunk_bytes=4096, shm=False,
                                 direct_bytes=0 if path == "ring" else 1 << 16)
    want = np.full(length, n * (n + 1) / 2)
    for r, got in enumerate(results):
        assert not isinstance(got, BaseException), f"rank {r}: {got}"
        np.testing.assert_array_equal(got, want)
    for r, headers in enumerate(dropped):  # a leave request queued behind the data, say
        assert not any(b"collective.chunk" in h for h in headers), f"rank {r} dropped chunks at close"
    assert took < 5.0, f"{took:.3f}s of virtual time: some rank waited out the leave's bound"


def test_a_pass_started_after_a_member_left_fails_at_once_naming_it():
    async def body(nodes, groups, transports):
        await asyncio.gather(*(g.allreduce(np.ones(100), "sum") for g in groups))
        loop = asyncio.get_running_loop()
        await nodes[1].stop(drain_timeout=0.0)  # rank 1 leaves after one pass
        t0 = loop.time()
        errors = await asyncio.gather(groups[0].allreduce(np.ones(100), "sum"),
                                      groups[2].allreduce(np.ones(100), "sum"), return_exceptions=True)
        return errors, loop.time() - t0

    errors, took = run(3, body, slow={}, timeout=30.0, shm=False)
    for e in errors:
        assert isinstance(e, CollectiveError), e
        assert e.missing == [1], str(e)
        assert "w1" in str(e) and "left the group" in str(e), str(e)
    assert took < 1.0, took


def test_leave_waits_no_longer_than_its_bound_for_a_member_that_crashed():
    async def body(nodes, groups, transports):
        await asyncio.gather(*(g.allreduce(np.ones(100), "sum") for g in groups))
        nodes[1].kill()  # dead without a word: it answers nothing
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await groups[0].leave(timeout=0.5)
        return loop.time() - t0

    took = run(2, body, slow={}, timeout=30.0, shm=False)
    assert 0.5 <= took < 0.6, took
