"""What a node accepts is bounded, and whatever it refuses is answered at once with an error
that names the limit: a caller never waits out its timeout to learn that it asked too much."""

from __future__ import annotations

import asyncio

import msgpack
import pytest
import zmq

from dmlsys.node import Node, NodeLimits, RemoteError
from dmlsys.wire.codec import ARRAY_EXT, PROTOCOL_VERSION, Kind, Limits, WireError, decode
from dmlsys.wire.zmq_transport import ZmqTransport

from tests.node.helpers import Echo, Net, eventually


async def raw_client(net: Net, server: Node):
    """An endpoint that sends hand-made frames to ``server`` and collects the replies it gets."""
    replies: list = []
    raw = net.transport("raw")
    raw.set_receiver(lambda frames, route: replies.append(decode(frames)))
    await raw.start()
    raw.add_peer(server.name, server.transport.address)
    return raw, replies


def request(msg_id: int, method: str, body, *deadline) -> list[bytes]:
    return [msgpack.packb([PROTOCOL_VERSION, int(Kind.REQUEST), msg_id, method, "raw", body, *deadline],
                          use_bin_type=True)]


def test_a_request_over_the_receivers_header_limit_is_answered_at_once_naming_the_limit(net):
    async def main():
        b = await net.node("b", Echo(), limits=Limits(max_header_bytes=2048))
        a = await net.node("a")
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(RemoteError) as info:
            await a.call("b", "echo", "echo", "x" * 4096, timeout=30)
        assert loop.time() - started < 5, "the refusal is the reply, not a timeout"
        assert info.value.type == "WireError" and "Limits.max_header_bytes" in info.value.message
        assert b.metrics.errors["bad_message"] == 1
        assert await a.call("b", "echo", "echo", "small", timeout=5) == "small"

    net.run(main)


def test_a_header_over_the_senders_own_limit_is_refused_before_it_is_sent(net):
    async def main():
        b = await net.node("b", Echo())
        a = await net.node("a", limits=Limits(max_header_bytes=2048))
        with pytest.raises(WireError, match="Limits.max_header_bytes"):
            await a.call("b", "echo", "echo", "x" * 4096, timeout=30)
        assert not a._pending and a.metrics.messages_out == 0 and b.metrics.messages_in == 0

    net.run(main)


def test_a_zero_itemsize_array_is_refused_with_a_reply_not_echoed_as_megabytes(net):
    async def main():
        b = await net.node("b", Echo())
        raw, replies = await raw_client(net, b)
        try:
            s0 = msgpack.ExtType(ARRAY_EXT, msgpack.packb(["S0", [4_000_000], 1]))
            raw.send("b", request(7, "echo.echo", s0, 5.0) + [b""])
            await eventually(lambda: replies)
        finally:
            await raw.close()
        (reply,) = replies
        assert reply.kind is Kind.ERROR and reply.id == 7
        assert reply.body["type"] == "WireError" and "no bytes per item" in reply.body["message"]

    net.run(main)


def test_a_node_at_max_in_flight_answers_busy_naming_the_limit(net):
    async def main():
        b = await net.node("b", Echo(), node_limits=NodeLimits(max_in_flight=2))
        a = await net.node("a")
        slow = [asyncio.ensure_future(a.call("b", "echo", "slow", {"s": 0.5, "tag": t}, timeout=5)) for t in "xy"]
        await eventually(lambda: len(b._tasks) == 2)
        with pytest.raises(RemoteError) as info:
            await a.call("b", "echo", "slow", {"s": 0.5, "tag": "z"}, timeout=5)
        assert info.value.type == "NodeBusy"
        assert "node b busy: 2 in flight (limit 2" in info.value.message
        assert await a.call("b", "echo", "echo", "inline handlers still answer", timeout=5)
        assert await asyncio.gather(*slow) == ["x", "y"]
        assert await a.call("b", "echo", "slow", {"s": 0.01, "tag": "w"}, timeout=5) == "w"
        assert b.metrics.errors["busy"] == 1 and sorted(b.service("echo").started) == ["w", "x", "y"]

    net.run(main)


def test_a_request_that_states_no_deadline_runs_no_longer_than_the_default(net):
    async def main():
        b = await net.node("b", Echo(), node_limits=NodeLimits(default_deadline_s=0.5))
        raw, replies = await raw_client(net, b)
        try:
            raw.send("b", request(1, "echo.slow", {"s": 60, "tag": "forever"}))  # no "dl" field
            raw.send("b", request(2, "echo.who", None))
            await eventually(lambda: len(replies) == 2, timeout=5)
        finally:
            await raw.close()
        by_id = {r.id: r for r in replies}
        assert by_id[1].kind is Kind.ERROR and by_id[1].body["type"] == "TimeoutError"
        assert by_id[2].body["has_deadline"] is True
        assert b.service("echo").cancelled == ["forever"]

    net.run(main)


def test_node_limits_are_validated():
    with pytest.raises(ValueError, match="max_in_flight"):
        NodeLimits(max_in_flight=0)
    with pytest.raises(ValueError, match="default_deadline_s"):
        NodeLimits(default_deadline_s=float("inf"))


def test_frames_past_the_limit_are_read_and_dropped_not_gathered():
    """One message of 20,000 empty frames would be 20,000 Python objects: the transport keeps one
    past the limit, and the refusal names the limit."""

    async def main():
        limits = Limits(max_frames=8)
        b = Node("b", ZmqTransport("b", "tcp://127.0.0.1:0", limits=limits), limits=limits)
        b.add_service(Echo())
        seen: list[int] = []
        deliver = b._on_frames
        b.transport.set_receiver(lambda frames, route: (seen.append(len(frames)), deliver(frames, route)))
        await b.start()
        sock = zmq.Context.instance().socket(zmq.DEALER)
        try:
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(b.transport.address)
            sock.send_multipart(request(5, "echo.echo", None, 5.0) + [b""] * 20_000)
            assert await asyncio.wait_for(asyncio.to_thread(sock.poll, 5000), 6), "no reply to a refused request"
            reply = decode(sock.recv_multipart())
        finally:
            sock.close()
            await b.stop(drain_timeout=0)
        assert seen == [9]
        assert reply.kind is Kind.ERROR and reply.id == 5 and "Limits.max_frames" in reply.body["message"]

    asyncio.run(main())
