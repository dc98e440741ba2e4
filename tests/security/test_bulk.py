"""The bulk path on real sockets: large messages between keyed members over TCP go sealed on the
bulk socket and arrive exactly; the bulk socket, which anyone can reach, delivers nothing that
was not sealed under a session a member offered inside its CURVE connection."""

from __future__ import annotations

import asyncio
import multiprocessing as mp

import numpy as np
import prometheus_client
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dmlsys.node import Directory, Node, Service, oneway, rpc
from dmlsys.wire import bulk, curve
from dmlsys.wire.bulk import BULK_MIN_BYTES, BulkSession
from dmlsys.wire.codec import Kind
from dmlsys.wire.curve import ClusterKey
from dmlsys.wire.zmq_transport import ZmqTransport
from tests.security.helpers import Guarded, cluster, eventually, forged

BIG = 3 * (1 << 20) + 5  # bytes: several chunks and pieces, and an odd tail


@pytest.fixture
def key():
    return ClusterKey.generate()


@pytest.fixture(autouse=True)
def short_park(monkeypatch):
    monkeypatch.setattr(curve, "ZAP_PARK_SECONDS", 0.3)


def arrays(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.random(BIG // 8, dtype=np.float64), rng.integers(-5, 5, (3, 7, 11), dtype=np.int16),
            np.frombuffer(rng.bytes(BIG), np.uint8)[1:].view("u1"), np.array(np.float32(np.nan)),
            np.zeros((0, 4), ">i4")]


def same(a: list, b: list) -> bool:
    return all(x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes() for x, y in zip(a, b))


async def bulk_ready(a, b):
    """A first large call (by CURVE, while the session is offered), then the session is up."""
    await a.call("b", "guarded", "echo", np.zeros(BULK_MIN_BYTES, np.uint8), timeout=10)
    await eventually(lambda: a.transport._bulk_out.get("b") and a.transport._bulk_out["b"].current)


def test_large_messages_go_sealed_on_the_bulk_socket_and_round_trip_exactly(key, tmp_path):
    async def main():
        async with cluster(key, "tcp", tmp_path) as c:
            guarded = Guarded()
            b = await c.add("b", "", guarded)
            a = await c.add("a")
            await bulk_ready(a, b)
            sent = arrays()
            got = await a.call("b", "guarded", "echo", sent, timeout=10)  # large request, large reply
            assert same(sent, got)
            assert guarded.ran[-1] == ("echo", "a")  # the sender is the principal of the session
            assert a.transport.bulk_stats["sealed"] >= 1 and b.transport.bulk_stats["opened"] >= 1
            assert b.transport.bulk_stats["sealed"] >= 1 and a.transport.bulk_stats["opened"] >= 1  # the reply
            assert a.transport.bulk_stats["rejected"] == b.transport.bulk_stats["rejected"] == 0

    asyncio.run(main())


def test_a_session_dies_with_its_curve_connection_and_a_new_one_is_offered(key, tmp_path):
    async def main():
        async with cluster(key, "tcp", tmp_path) as c:
            await c.add("b", "", Guarded())
            a = await c.add("a")
            await bulk_ready(a, c.nodes["b"])
            old = a.transport._bulk_out["b"].current.session.sid
            address = c.nodes["b"].transport.address
            await c.nodes.pop("b").stop(drain_timeout=0)  # b goes; a new b comes on the same address,
            await eventually(lambda: "b" not in a.transport._bulk_out)  # so only the monitor can tell
            new_b = Node("b", ZmqTransport("b", address, keys=key), directory=Directory(c.members.values()))
            new_b.add_service(Guarded())
            await new_b.start()
            c.nodes["b"] = new_b
            await bulk_ready(a, new_b)
            assert a.transport._bulk_out["b"].current.session.sid != old
            sent = arrays(1)
            assert same(sent, await a.call("b", "guarded", "echo", sent, timeout=10))

    asyncio.run(main())


def bulk_endpoint(node) -> str:
    return f"tcp://127.0.0.1:{node.transport._bulk_port}"


def test_a_peer_without_the_key_cannot_get_a_bulk_message_delivered(key, tmp_path):
    """It can reach the bulk port and read session ids off the wire; it has no session key."""

    async def main():
        async with cluster(key, "tcp", tmp_path) as c:
            guarded = Guarded()
            b = await c.add("b", "", guarded)
            a = await c.add("a")
            await bulk_ready(a, b)
            await a.call("b", "guarded", "echo", arrays(), timeout=10)  # one real bulk message went by
            ran = len(guarded.ran)
            real = a.transport._bulk_out["b"].current.session
            ctx = zmq.Context()
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(bulk_endpoint(b))
            payload = [np.ones(BIG, np.uint8)]
            shutdown = forged(Kind.REQUEST, 1, "guarded.shutdown", "a", payload)
            guessed = BulkSession(real.sid, bytes(32), "a", offerer=True)  # the real id, a guessed key,
            guessed._send_next = 1 << 40  # and counters ahead of the real ones
            attempts = [
                shutdown,  # unencrypted: what a node would send without keys
                *guessed.seal(shutdown),
                *BulkSession(real.sid, real.key, "a", offerer=True).seal(shutdown),  # a replay of counter 0
                [b"DMB2" + bytes(40), b"\0\0\0\0", b"x" * 100],  # garbage with the right magic
            ]
            for frames in attempts:
                sock.send_multipart([bytes(memoryview(f).cast("B")) for f in frames])
            await eventually(lambda: b.transport.bulk_stats["rejected"] >= len(attempts) - 1)
            await asyncio.sleep(0.2)
            assert len(guarded.ran) == ran  # no handler ran
            assert b.transport.bulk_stats["rejected_replayed"] >= 1
            assert b.transport.bulk_stats["rejected_tampered"] >= 1
            exported = prometheus_client.generate_latest(b.metrics.registry).decode()
            rejected = b.transport.bulk_stats["rejected"]
            assert f'dmlsys_transport_events_total{{kind="bulk_rejected",node="b"}} {rejected:.1f}' in exported
            sent = arrays(2)  # and the real session still works
            assert same(sent, await a.call("b", "guarded", "echo", sent, timeout=10))
            sock.close(linger=0)
            ctx.term()

    asyncio.run(main())


def test_an_offer_counts_only_inside_a_curve_connection(key, tmp_path):
    """OFFER frames on the bulk socket, or from a node without keys, make no session."""

    async def main():
        async with cluster(key, "tcp", tmp_path) as c:
            b = await c.add("b", "", Guarded())
            ctx = zmq.Context()
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(bulk_endpoint(b))
            sock.send_multipart(bulk.offer_frames(BulkSession.make("a")))
            await eventually(lambda: b.transport.bulk_stats["rejected"] >= 1)
            assert not b.transport._bulk_in
            sock.close(linger=0)
            ctx.term()

    asyncio.run(main())


# -- hypothesis: whatever an outsider sends to the bulk socket, no handler runs ------------------

frames_st = st.lists(st.one_of(st.binary(max_size=80), st.just(b"DMB2"), st.just(b"\0\0\0\0")), min_size=1, max_size=4)


@given(messages=st.lists(frames_st, min_size=1, max_size=4), with_sid=st.booleans())
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
def test_whatever_an_outsider_sends_to_the_bulk_socket_no_handler_runs(bulk_target, messages, with_sid):
    loop, b, guarded, endpoint, sid = bulk_target
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    before = b.transport.bulk_stats["rejected"]
    for frames in messages:
        if with_sid:  # a preamble naming the live session, the rest of the bytes the attacker's
            frames = [b"DMB2\0" + sid + b"".join(frames)[:40].ljust(28, b"\0") + b"\0" * 8, *frames[1:]]
        sock.send_multipart(frames)
    deadline = loop.time() + 5
    while b.transport.bulk_stats["rejected"] < before + len(messages) and loop.time() < deadline:
        asyncio.run_coroutine_threadsafe(asyncio.sleep(0.01), loop).result()
    sock.close(linger=0)
    assert guarded.ran == []


@pytest.fixture(scope="module")
def bulk_target():
    import threading

    key = ClusterKey.generate()
    loop = asyncio.new_event_loop()
    box: dict = {}
    started = threading.Event()

    async def setup():
        c = cluster(key, "tcp", None)
        box["cm"] = c
        cl = await c.__aenter__()
        box["guarded"] = Guarded()
        box["b"] = await cl.add("b", "", box["guarded"])
        a = await cl.add("a")
        box["a"] = a

    def run():
        asyncio.set_event_loop(loop)
        loop.run_until_complete(setup())
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    started.wait(10)
    a, b = box["a"], box["b"]
    # A session between a and b (a's first large message offers it), then the attacker's turn.
    asyncio.run_coroutine_threadsafe(
        a.call("b", "guarded", "echo", np.zeros(BULK_MIN_BYTES, np.uint8), timeout=10), loop).result(15)

    async def wait_ready():
        await eventually(lambda: a.transport._bulk_out.get("b") and a.transport._bulk_out["b"].current)

    asyncio.run_coroutine_threadsafe(wait_ready(), loop).result(15)
    box["guarded"].ran.clear()
    sid = a.transport._bulk_out["b"].current.session.sid
    try:
        yield loop, b, box["guarded"], bulk_endpoint(b), sid
    finally:
        asyncio.run_coroutine_threadsafe(box["cm"].__aexit__(None, None, None), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


# -- real processes ------------------------------------------------------------------------------


def _server(address_q, key_text: str) -> None:
    import uvloop

    from dmlsys.node import Directory, Member, Node, Service, rpc
    from dmlsys.wire.zmq_transport import ZmqTransport

    class Echo(Service):
        name = "echo"

        @rpc
        def back(self, body):
            return body

        @rpc
        def stats(self, body):
            return dict(self.transport.bulk_stats)

        @rpc
        def quit(self, body):
            asyncio.get_running_loop().call_soon(done.set)

    async def main():
        global done
        done = asyncio.Event()
        transport = ZmqTransport("server", "tcp://127.0.0.1:0", keys=ClusterKey.from_text(key_text))
        node = Node("server", transport, directory=Directory([Member("client", "", "tcp://127.0.0.1:9")]))
        service = Echo()
        service.transport = transport
        node.add_service(service)
        await node.start()
        address_q.put(transport.address)
        await asyncio.wait_for(done.wait(), 60)
        await node.stop(drain_timeout=1)

    uvloop.run(main())


def test_real_processes_over_tcp_with_curve_move_large_arrays_exactly_by_the_bulk_path(key):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=_server, args=(q, key.to_text()), daemon=True)
    proc.start()

    async def main():
        from dmlsys.node import Directory, Member, Node
        from dmlsys.wire.zmq_transport import ZmqTransport

        address = q.get(timeout=30)
        transport = ZmqTransport("client", "tcp://127.0.0.1:0", keys=key)
        node = Node("client", transport, directory=Directory())
        await node.start()
        node.directory.update([Member("server", "", address)])
        try:
            for seed in range(3):
                sent = arrays(seed)
                assert same(sent, await node.call("server", "echo", "back", sent, timeout=20))
            stats = await node.call("server", "echo", "stats", None, timeout=10)
            assert stats.get("opened", 0) >= 2 and stats.get("sealed", 0) >= 2 and not stats.get("rejected")
            assert transport.bulk_stats["sealed"] >= 2 and transport.bulk_stats["opened"] >= 2
            await node.call("server", "echo", "quit", None, timeout=10)
        finally:
            await node.stop(drain_timeout=0)

    try:
        asyncio.run(main())
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join()


def test_keys_rotate_without_losing_a_message_and_old_sessions_are_let_go(key, tmp_path, monkeypatch):
    monkeypatch.setattr(bulk, "ROTATE_BYTES", 1)  # every large message asks for a new session

    async def main():
        async with cluster(key, "tcp", tmp_path) as c:
            b = await c.add("b", "", Guarded())
            a = await c.add("a")
            await bulk_ready(a, b)
            seen = set()
            for seed in range(6):
                sent = arrays(seed)
                assert same(sent, await a.call("b", "guarded", "echo", sent, timeout=10))
                seen.add(a.transport._bulk_out["b"].current.session.sid)
            assert len(seen) >= 3  # rotated, and every message still arrived exactly
            assert len(b.transport._bulk_in) <= 2  # the acceptor keeps the newest two of a connection
            assert b.transport.bulk_stats["rejected"] == 0

    asyncio.run(main())


class Recorder(Service):
    name = "recorder"

    def __init__(self) -> None:
        self.seen: list[int] = []

    @oneway
    def note(self, body):
        self.seen.append(body["i"])

    @rpc
    def count(self, body):
        return len(self.seen)


def test_large_and_small_messages_to_a_peer_arrive_in_the_order_they_were_sent(key, tmp_path):
    """Large ones take the bulk connection, small ones CURVE: a MARK keeps their order."""

    async def main():
        async with cluster(key, "tcp", tmp_path) as c:
            recorder = Recorder()
            b = await c.add("b", "", recorder, Guarded())
            a = await c.add("a")
            await bulk_ready(a, b)
            rng = np.random.default_rng(3)
            sizes = [int(n) for n in rng.choice([0, 10, BULK_MIN_BYTES, 3 << 20], 40)]
            for i, n in enumerate(sizes):
                a.send("b", "recorder", "note", {"i": i, "a": np.ones(n, np.uint8)})
            await eventually(lambda: len(recorder.seen) == len(sizes), timeout=20)
            assert recorder.seen == list(range(len(sizes)))
            assert b.transport.bulk_stats["opened"] >= sizes.count(3 << 20)
            assert not b.transport._sequencers  # nothing left waiting

    asyncio.run(main())
