"""PendingCalls: one timer for every call's deadline."""

from __future__ import annotations

import asyncio

from hypothesis import given, settings, strategies as st

from dmlsys.node import RpcTimeout
from dmlsys.node.pending import PendingCalls
from dmlsys.wire import sim


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(0.01, 5), st.floats(0, 6)), min_size=1, max_size=60))
def test_each_call_gets_its_reply_or_times_out_at_its_own_deadline(calls):
    """(timeout, reply delay) pairs: a reply before the timeout wins; otherwise RpcTimeout,
    raised at the deadline itself (virtual time), whatever the mix of timeouts."""

    async def main():
        loop = asyncio.get_running_loop()
        pending = PendingCalls()
        outcomes: dict[int, tuple[str, float]] = {}

        async def one(i: int, timeout: float, delay: float):
            fut = loop.create_future()
            pending.add(loop, i, fut, "peer", "s.m", timeout)
            loop.call_later(delay, lambda: fut.done() or fut.set_result(i))
            start = loop.time()
            try:
                outcomes[i] = ("reply", await fut)
            except RpcTimeout:
                outcomes[i] = ("timeout", loop.time() - start)
            finally:
                pending.pop(i)
            assert len(pending._heap) <= 2 * len(pending) + 1025

        await asyncio.gather(*(one(i, t, d) for i, (t, d) in enumerate(calls)))
        assert len(pending) == 0
        return outcomes

    outcomes = sim.run(main())
    for i, (timeout, delay) in enumerate(calls):
        kind, value = outcomes[i]
        if delay < timeout:
            assert (kind, value) == ("reply", i)
        elif delay > timeout:
            assert kind == "timeout" and abs(value - timeout) < 1e-6


def test_finished_calls_do_not_pile_up():
    async def main():
        loop = asyncio.get_running_loop()
        pending = PendingCalls()
        for i in range(20_000):
            fut = loop.create_future()
            pending.add(loop, i, fut, "peer", "s.m", 30.0)
            fut.set_result(None)
            pending.pop(i)
        return len(pending._heap)

    assert sim.run(main()) <= 1025


def test_fail_all_fails_every_waiting_call_and_disarms():
    async def main():
        loop = asyncio.get_running_loop()
        pending = PendingCalls()
        futs = [loop.create_future() for _ in range(3)]
        for i, fut in enumerate(futs):
            pending.add(loop, i, fut, "peer", "s.m", 1.0)
        pending.fail_all(lambda: RuntimeError("stopped"))
        assert all(isinstance(f.exception(), RuntimeError) for f in futs)
        assert len(pending) == 0 and pending._timer is None

    sim.run(main())
