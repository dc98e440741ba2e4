"""RPC between nodes, the same scenarios over the simulated network and over ZeroMQ."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from dmlsys.node import NodeStopped, PeerUnreachable, RemoteError, RpcTimeout, State
from dmlsys.node.errors import NodeError
from dmlsys.wire.zmq_transport import ZmqTransport

from tests.node.helpers import Echo, Net, eventually


def test_call_returns_the_reply_body_with_arrays(net):
    async def main():
        await net.node("b", Echo())
        a = await net.node("a")
        body = {"x": np.arange(12, dtype=np.float32).reshape(3, 4), "meta": ["m", 1, None], "big": np.ones(1 << 17)}
        got = await a.call("b", "echo", "echo", body, timeout=5)
        assert np.array_equal(got["x"], body["x"]) and got["x"].dtype == np.float32
        assert np.array_equal(got["big"], body["big"])
        assert got["meta"] == ["m", 1, None]
        assert await a.call("b", "echo", "who", None, timeout=5) == {
            "sender": "a", "method": "echo.who", "has_deadline": True}

    net.run(main)


def test_concurrent_calls_each_get_their_own_reply(net):
    async def main():
        await net.node("b", Echo())
        a = await net.node("a")
        got = await asyncio.gather(*(a.call("b", "echo", "echo", i, timeout=5) for i in range(200)))
        assert got == list(range(200))

    net.run(main)


def test_handler_exception_reaches_the_caller_typed(net):
    async def main():
        await net.node("b", Echo())
        a = await net.node("a")
        with pytest.raises(RemoteError) as info:
            await a.call("b", "echo", "fail", "model-7", timeout=5)
        err = info.value
        assert (err.type, err.message, err.peer, err.method) == ("Boom", "no such thing: model-7", "b", "echo.fail")
        assert "model-7" in str(err)
        assert a.metrics.errors["handler"] == 0 and net.nodes[0].metrics.errors["handler"] == 1

    net.run(main)


@pytest.mark.parametrize("service, method, error_type", [
    ("echo", "nope", "UnknownMethod"),
    ("nosuch", "echo", "UnknownMethod"),
    ("echo", "note", "WrongKind"),  # a one-way handler called with call()
    ("echo", "unsendable", "WireError"),  # the reply cannot be encoded
])
def test_calls_that_cannot_be_served_get_a_typed_error(net, service, method, error_type):
    async def main():
        await net.node("b", Echo())
        a = await net.node("a")
        with pytest.raises(RemoteError) as info:
            await a.call("b", service, method, None, timeout=5)
        assert info.value.type == error_type
        if error_type == "UnknownMethod":
            assert f"{service}.{method}" in info.value.message and "echo.echo" in info.value.message

    net.run(main)


def test_one_way_messages_run_their_handler_and_send_nothing_back(net):
    async def main():
        b = await net.node("b", Echo())
        a = await net.node("a")
        echo = b.service("echo")
        a.send("b", "echo", "note", {"n": np.arange(3)})
        await asyncio.wait_for(echo.got_oneway.wait(), 5)
        assert np.array_equal(echo.received[0]["n"], [0, 1, 2])
        a.send("b", "echo", "note_fails", None)  # logged on b, nothing comes back
        a.send("b", "echo", "echo", None)  # an rpc handler sent one-way: dropped and counted
        await eventually(lambda: b.metrics.errors["wrong_kind"] == 1 and b.metrics.errors["handler"] == 1)
        assert a.metrics.messages_in == 0

    net.run(main)


def test_a_call_without_a_reply_in_time_raises_rpc_timeout_and_cancels_the_handler(net):
    async def main():
        b = await net.node("b", Echo())
        a = await net.node("a")
        echo = b.service("echo")
        with pytest.raises(RpcTimeout) as info:
            await a.call("b", "echo", "slow", {"s": 10, "tag": "late"}, timeout=0.2)
        assert isinstance(info.value, TimeoutError) and info.value.peer == "b" and "0.2s" in str(info.value)
        # The callee was told the deadline: work nobody waits for is stopped, not finished.
        await eventually(lambda: echo.cancelled == ["late"], timeout=2)
        assert echo.finished == []
        assert await a.call("b", "echo", "slow", {"s": 0.01, "tag": "ok"}, timeout=5) == "ok"

    net.run(main)


def test_a_stopped_node_fails_its_pending_calls_and_refuses_new_ones(net):
    async def main():
        await net.node("b", Echo())
        a = await net.node("a")
        pending = asyncio.ensure_future(a.call("b", "echo", "slow", {"s": 5}, timeout=10))
        await asyncio.sleep(0.05)
        await a.stop(drain_timeout=0)
        with pytest.raises(NodeStopped):
            await pending
        with pytest.raises(NodeStopped):
            await a.call("b", "echo", "echo", 1)

    net.run(main)


def test_a_killed_peer_means_timeouts_not_hangs(net):
    async def main():
        b = await net.node("b", Echo())
        a = await net.node("a")
        assert await a.call("b", "echo", "echo", 1, timeout=5) == 1
        b.kill()
        if net.sim is not None:
            net.sim.crash("b")
        with pytest.raises(RpcTimeout):
            await a.call("b", "echo", "echo", 2, timeout=0.2)

    net.run(main)


def test_the_supervisors_peer_lost_fails_calls_waiting_on_that_peer_at_once(net):
    """Calls to a peer the supervisor reports gone fail now with PeerUnreachable, not at their
    timeouts; calls to other peers go on; watchers hear of it; anyone else's report is ignored."""
    from dmlsys.node import Directory

    async def main():
        loop = asyncio.get_running_loop()
        b = await net.node("b", Echo())
        c = await net.node("c", Echo())
        a = await net.node("a", directory=Directory(supervisor="supervisor"))
        sup = await net.node("supervisor")
        heard: list[str] = []
        a.on_peer_lost(lambda peer, reason: heard.append(peer))
        to_b = asyncio.ensure_future(a.call("b", "echo", "slow", {"s": 60}, timeout=30))
        to_c = asyncio.ensure_future(a.call("c", "echo", "slow", {"s": 0.5, "tag": "c"}, timeout=30))
        await eventually(lambda: b.service("echo").started)
        c.send("a", "node", "peer_lost", {"name": "b", "reason": "exited"})  # not the supervisor
        await asyncio.sleep(0.2)
        assert not to_b.done() and heard == []
        t0 = loop.time()
        sup.send("a", "node", "peer_lost", {"name": "b", "reason": "exited with code -9"})
        with pytest.raises(PeerUnreachable, match="b exited with code -9"):
            await to_b
        assert loop.time() - t0 < 1.0 and heard == ["b"]
        assert await to_c == "c"
        assert a.metrics.errors.get("not_allowed") == 1  # peer_lost is for the supervisor only

    net.run(main)


def test_unknown_peer_is_unreachable_on_zmq():
    async def main():
        a = await net.node("a")
        with pytest.raises(PeerUnreachable, match="no address known for peer 'ghost'"):
            await a.call("ghost", "echo", "echo", 1)
        with pytest.raises(PeerUnreachable):
            a.send("ghost", "echo", "note", 1)
        assert a.metrics.errors["unreachable"] == 2
        assert not a._pending, "a call that could not be sent leaves nothing pending"

    net = Net("zmq")
    net.run(main)


def test_bad_messages_are_counted_and_dropped_and_the_node_keeps_answering(net):
    async def main():
        b = await net.node("b", Echo())
        a = await net.node("a")
        evil = net.transport("evil")
        await evil.start()
        evil.add_peer("b", b.transport.address)
        garbage = [[b"\xc1"], [b"not msgpack at all"], [b""], [b"\x93\x01\x02\x03", b"extra"], [b"\x00"] * 50]
        try:
            for frames in garbage:
                evil.send("b", frames)
            await eventually(lambda: b.metrics.errors["bad_message"] == len(garbage))
        finally:
            await evil.close()
        assert await a.call("b", "echo", "echo", "still here", timeout=5) == "still here"
        assert b.state is State.READY

    net.run(main)


def test_metrics_count_messages_bytes_and_rpc_latency(net):
    async def main():
        b = await net.node("b", Echo())
        a = await net.node("a")
        for i in range(5):
            await a.call("b", "echo", "echo", b"x" * 100, timeout=5)
        assert a.metrics.rpc_seconds.count("echo.echo") == 5
        assert (a.metrics.messages_out, b.metrics.messages_in, b.metrics.messages_out, a.metrics.messages_in) == (5,) * 4
        assert a.metrics.bytes_out == b.metrics.bytes_in > 500
        assert b.metrics.bytes_out == a.metrics.bytes_in > 500

    net.run(main)


def test_errors_form_one_hierarchy():
    for cls in (RemoteError, RpcTimeout, PeerUnreachable, NodeStopped):
        assert issubclass(cls, NodeError)
    assert issubclass(RpcTimeout, TimeoutError)


def test_transport_name_must_match_node_name():
    from dmlsys.node import Node

    with pytest.raises(ValueError, match="transport is named 'x'"):
        Node("y", ZmqTransport("x", "tcp://127.0.0.1:0"))


def test_rpc_latency_is_measured_in_virtual_time_under_the_simulation():
    from dmlsys.wire.sim import Link

    net = Net("sim", link=Link(delay=0.05, jitter=0))

    async def main():
        await net.node("b", Echo())
        a = await net.node("a")
        await a.call("b", "echo", "echo", 1, timeout=5)
        return a.metrics.rpc_seconds

    hist = net.run(main)
    assert hist.count("echo.echo") == 1
    assert abs(hist._sums["echo.echo"] - 0.1) < 1e-6, "two 50 ms hops of virtual time"


def test_rpc_latency_under_uvloop_resolves_below_a_millisecond():
    uvloop = pytest.importorskip("uvloop")
    net = Net("zmq")

    async def main():
        await net.node("b", Echo())
        a = await net.node("a")
        for _ in range(20):
            await a.call("b", "echo", "echo", 1, timeout=5)
        await asyncio.sleep(0)
        return a.metrics.rpc_seconds._sums["echo.echo"]

    async def wrapped():
        try:
            return await main()
        finally:
            for node in net.nodes:
                await node.stop()

    total = uvloop.run(wrapped())
    # uvloop's loop.time() ticks in whole milliseconds: 20 fast calls would sum to a multiple of 1 ms.
    assert total > 0 and abs(total * 1000 - round(total * 1000)) > 1e-9


def test_latency_histogram_buckets_are_cumulative_and_inclusive():
    from dmlsys.node.metrics import LatencyHistogram

    hist = LatencyHistogram(bounds=(0.001, 0.01))
    for value in (0.0005, 0.001, 0.005, 2.0):
        hist.observe("s.m", value)
    family = hist.family("dmlsys_rpc_seconds", "help", "a")
    samples = {(s.name, s.labels.get("le")): s.value for s in family.samples}
    assert samples[("dmlsys_rpc_seconds_bucket", "0.001")] == 2  # le: 0.001 counts in its own bucket
    assert samples[("dmlsys_rpc_seconds_bucket", "0.01")] == 3
    assert samples[("dmlsys_rpc_seconds_bucket", "+Inf")] == 4 == hist.count("s.m")
    assert samples[("dmlsys_rpc_seconds_sum", None)] == pytest.approx(2.0065)
