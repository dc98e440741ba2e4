"""Issue 12: only members connect; who sent a message is who its connection proved to be; the
administrative RPCs answer only the supervisor, the CLI and the roles they name.

Over TCP (CURVE) and over ipc (PLAIN with a per-name token, in a private directory)."""

from __future__ import annotations

import asyncio
import logging

import pytest
import zmq

from dmlsys.node import PeerUnreachable, RemoteError, RpcTimeout
from dmlsys.wire.codec import Kind
from dmlsys.wire import curve
from dmlsys.wire.curve import ClusterKey

from tests.security.helpers import Guarded, cluster, eventually, forged, private_dir, raw_dealer

KINDS = ["tcp", "ipc"]


@pytest.fixture
def key():
    return ClusterKey.generate()


@pytest.fixture(autouse=True)
def short_park(monkeypatch):
    """Unknown keys wait ZAP_PARK_SECONDS for their name to be learnt before they are refused."""
    monkeypatch.setattr(curve, "ZAP_PARK_SECONDS", 0.3)


@pytest.fixture
def sock_dir(tmp_path):
    return private_dir(tmp_path)


@pytest.mark.parametrize("kind", KINDS)
def test_members_call_each_other_and_the_callee_knows_who_called(kind, key, sock_dir):
    async def main():
        async with cluster(key, kind, sock_dir) as c:
            guarded = Guarded()
            await c.add("b", "", guarded)
            a = await c.add("a")
            assert await a.call("b", "guarded", "echo", {"x": 1}, timeout=5) == {"x": 1}
            assert guarded.ran == [("echo", "a")]

    asyncio.run(main())


ATTACKS = [
    ("tcp", "no CURVE at all"),
    ("tcp", "a CURVE key of its own, the server's real public key"),
    ("tcp", "another cluster's key, a member's name"),
    ("ipc", "no mechanism at all"),
    ("ipc", "PLAIN as a member, a guessed token"),
    ("ipc", "another cluster's key, a member's name"),
]


@pytest.mark.parametrize("kind, attack", ATTACKS)
def test_without_the_cluster_key_nothing_connects_and_the_attempt_is_logged_and_counted(kind, attack, key, sock_dir,
                                                                                          caplog):
    async def main():
        async with cluster(key, kind, sock_dir) as c:
            guarded = Guarded()
            b = await c.add("b", "", guarded)
            await c.add("supervisor")
            endpoint = b.transport.address
            if "another cluster" in attack:
                async with cluster(ClusterKey.generate(), kind, sock_dir / "..") as evil:
                    intruder = await evil.add("supervisor-evil")
                    intruder.transport.add_peer("b", endpoint)
                    # Never an answer: the call times out, or finds no connection to queue on at all.
                    with pytest.raises((RpcTimeout, PeerUnreachable)):
                        await intruder.call("b", "guarded", "shutdown", None, timeout=0.5)
            else:
                ctx = zmq.Context()
                try:
                    mechanism = {"no CURVE at all": "null", "no mechanism at all": "null"}.get(attack)
                    if mechanism is None:
                        mechanism = "curve" if kind == "tcp" else "plain"
                    sock = raw_dealer(ctx, endpoint, mechanism=mechanism, server_key=key.public_key("b"),
                                      identity=b"supervisor", username=b"supervisor", password=b"0" * 43)
                    for i in range(3):
                        sock.send_multipart(forged(Kind.REQUEST, i + 1, "guarded.shutdown", "supervisor"))
                    await eventually(lambda: b.metrics.errors["connection_refused"] >= 1)
                    await asyncio.sleep(0.2)
                    assert sock.poll(0) == 0  # no answer of any kind
                finally:
                    ctx.destroy(linger=0)
            await eventually(lambda: b.metrics.errors["connection_refused"] >= 1)
            assert guarded.ran == [] and b.metrics.messages_in == 0
            assert b.transport.refusals.count == b.metrics.errors["connection_refused"]

    with caplog.at_level(logging.WARNING, logger="dmlsys.wire.curve"):
        asyncio.run(main())
    assert any("node 'b' refused a connection from" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("kind", KINDS)
def test_a_member_cannot_speak_as_another(kind, key, sock_dir):
    async def main():
        async with cluster(key, kind, sock_dir) as c:
            guarded = Guarded()
            b = await c.add("b", "", guarded)
            await c.add("supervisor")
            mallory = await c.add("replica-0", "replica")
            mallory.transport.send("b", forged(Kind.REQUEST, 99, "guarded.shutdown", "supervisor"))
            mallory.transport.send("b", forged(Kind.ONEWAY, 0, "guarded.note", "cli-1"))
            await eventually(lambda: b.metrics.errors["forged_sender"] == 2)
            assert guarded.ran == []
            # Under its own name it reaches the ordinary handlers, and only those.
            assert await mallory.call("b", "guarded", "echo", 1, timeout=5) == 1
            assert guarded.ran == [("echo", "replica-0")]

    asyncio.run(main())


@pytest.mark.parametrize("kind", KINDS)
def test_a_reply_counts_only_from_the_peer_the_call_went_to(kind, key, sock_dir):
    async def main():
        async with cluster(key, kind, sock_dir) as c:
            await c.add("b", "", Guarded())
            a = await c.add("a", "", Guarded())
            mallory = await c.add("m")
            call = asyncio.ensure_future(a.call("b", "guarded", "slow", 0.5, timeout=5))
            await eventually(lambda: len(a._pending) == 1)
            msg_id = next(iter(a._pending))
            # Sequential ids are easy to guess: a reply in b's name, then one in its own.
            mallory.transport.send("a", forged(Kind.REPLY, msg_id, "guarded.slow", "b", "forged"))
            mallory.transport.send("a", forged(Kind.REPLY, msg_id, "guarded.slow", "m", "forged"))
            mallory.transport.send("a", forged(Kind.ERROR, msg_id, "guarded.slow", "m", {"type": "X", "message": "y"}))
            await eventually(lambda: a.metrics.errors["forged_sender"] == 1 and a.metrics.errors["forged_reply"] == 2)
            assert not call.done()
            assert await call == "b"

    asyncio.run(main())


@pytest.mark.parametrize("kind", KINDS)
def test_admin_rpcs_answer_only_the_supervisor_the_cli_and_the_roles_named(kind, key, sock_dir):
    async def main():
        async with cluster(key, kind, sock_dir) as c:
            guarded = Guarded()
            target = await c.add("replica-0", "replica", guarded)
            callers = {name: await c.add(name, role) for name, role in
                       [("supervisor", "supervisor"), ("cli-4242", "client"), ("gateway", "gateway"),
                        ("worker-0", "worker"), ("replica-1", "replica")]}
            for name in ("worker-0", "replica-1", "gateway"):
                with pytest.raises(RemoteError) as info:
                    await callers[name].call("replica-0", "guarded", "shutdown", None, timeout=5)
                assert info.value.type == "NotAllowed"
                assert f"{name!r} may not call guarded.shutdown" in info.value.message
            with pytest.raises(RemoteError, match="NotAllowed"):
                await callers["worker-0"].call("replica-0", "guarded", "reload", None, timeout=5)
            assert target.metrics.errors["not_allowed"] == 4 and guarded.ran == []
            assert await callers["gateway"].call("replica-0", "guarded", "reload", None, timeout=5) == "reloaded"
            assert await callers["supervisor"].call("replica-0", "guarded", "shutdown", None, timeout=5) == "stopping"
            assert await callers["cli-4242"].call("replica-0", "guarded", "shutdown", None, timeout=5) == "stopping"
            assert guarded.ran == [("reload", "gateway"), ("shutdown", "supervisor"), ("shutdown", "cli-4242")]

    asyncio.run(main())


def test_without_keys_the_acl_applies_to_the_header_name(tmp_path):
    """Tests and the simulated network run without keys: the header is believed, the ACL holds."""
    from dmlsys.node import Node
    from dmlsys.wire.sim import SimNetwork, run

    async def main():
        net = SimNetwork(seed=3)
        guarded = Guarded()
        target = Node("replica-0", net.transport("replica-0"))
        target.add_service(guarded)
        worker, sup = Node("worker-0", net.transport("worker-0")), Node("supervisor", net.transport("supervisor"))
        for node in (target, worker, sup):
            await node.start()
        try:
            with pytest.raises(RemoteError, match="NotAllowed"):
                await worker.call("replica-0", "guarded", "shutdown", None, timeout=5)
            assert await sup.call("replica-0", "guarded", "shutdown", None, timeout=5) == "stopping"
            # A reply whose header names another node than the callee is not taken either.
            call = asyncio.ensure_future(sup.call("replica-0", "guarded", "slow", 1.0, timeout=5))
            await asyncio.sleep(0.1)
            msg_id = next(iter(sup._pending))
            worker.transport.send("supervisor", forged(Kind.REPLY, msg_id, "guarded.slow", "worker-0", "forged"))
            assert await call == "replica-0" and sup.metrics.errors["forged_reply"] == 1
        finally:
            for node in (target, worker, sup):
                await node.stop(drain_timeout=0)

    run(main())


def test_no_newcomer_takes_over_a_members_reply_route(key, sock_dir):
    """A member that connects claiming another's routing identity gets nothing of its replies."""

    async def main():
        async with cluster(key, "tcp", sock_dir) as c:
            await c.add("b", "", Guarded())
            a = await c.add("a")
            call = asyncio.ensure_future(a.call("b", "guarded", "slow", 0.3, timeout=5))
            await asyncio.sleep(0.05)
            ctx = zmq.Context()
            try:
                public, secret = key.keypair("m")
                sock = ctx.socket(zmq.DEALER)
                sock.setsockopt(zmq.LINGER, 0)
                sock.setsockopt(zmq.IDENTITY, b"a")
                sock.setsockopt(zmq.CURVE_SERVERKEY, key.public_key("b"))
                sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
                sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
                sock.connect(c.nodes["b"].transport.address)
                sock.send_multipart(forged(Kind.REQUEST, 1, "guarded.echo", "a"))
                assert await call == "b"
                await asyncio.sleep(0.1)
                assert sock.poll(0) == 0
            finally:
                ctx.destroy(linger=0)

    asyncio.run(main())


def test_every_admin_rpc_declares_who_may_call_it():
    """The audit: the handlers issue 12 names carry an ``allow`` that does not admit plain members."""
    from dmlsys.cluster.supervisor import ClusterService
    from dmlsys.collective.roles import TrainingService
    from dmlsys.events.instance import FunctionService
    from dmlsys.events.service import EventsService
    from dmlsys.node.service import NodeService
    from dmlsys.serving.gateway import GatewayService
    from dmlsys.serving.replica import ModelService

    expected = {
        ClusterService: ["cluster.shutdown", "cluster.scale", "cluster.train", "cluster.status", "cluster.pool_start",
                         "cluster.pool_stop"],
        EventsService: ["events.deploy", "events.status"],
        FunctionService: ["function.load"],
        GatewayService: ["serving.rollout"],
        ModelService: ["model.reload"],
        TrainingService: ["train.run"],
        NodeService: ["node.peer_lost"],
    }
    for cls, methods in expected.items():
        acl = {m: getattr(getattr(cls, m.split(".")[1]), "_dmlsys_allow", None) for m in methods}
        for method, allowed in acl.items():
            assert allowed is not None, f"{method} has no allow="
            assert not allowed.admits("replica-0", "replica") and not allowed.admits("worker-0", "worker"), method
            assert allowed.admits("supervisor", "supervisor"), method


@pytest.mark.parametrize("kind", KINDS)
def test_a_member_that_connects_before_its_name_is_known_gets_in_once_it_is(kind, key, sock_dir, monkeypatch):
    """A node learns its peers a moment after it binds, and new members a directory refresh after
    they start; libzmq never retries a refused connection, so an unknown name waits, not fails."""
    monkeypatch.setattr(curve, "ZAP_PARK_SECONDS", 5.0)

    async def main():
        async with cluster(key, kind, sock_dir) as c:
            guarded = Guarded()
            b = await c.add("b", "", guarded)
            from dmlsys.node import Directory, Node
            from dmlsys.wire.zmq_transport import ZmqTransport

            late = Node("late", ZmqTransport("late", "tcp://127.0.0.1:0", keys=key), directory=Directory())
            await late.start()
            try:
                late.transport.add_peer("b", b.transport.address)
                call = asyncio.ensure_future(late.call("b", "guarded", "echo", "hi", timeout=5))
                await asyncio.sleep(0.3)
                assert not call.done() and guarded.ran == []
                b.transport.add_peer("late", late.transport.address)  # as a directory refresh does
                assert await call == "hi"
                assert b.metrics.errors["connection_refused"] == 0
            finally:
                await late.stop(drain_timeout=0)

    asyncio.run(main())
