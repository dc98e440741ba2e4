"""hypothesis: whatever frames a peer without the cluster key sends, in whatever order and over
whichever mechanism it tries, no handler runs and nothing reaches the node."""

from __future__ import annotations

import asyncio
import threading

import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dmlsys.node import Directory, Node
from dmlsys.wire import curve
from dmlsys.wire.codec import Kind
from dmlsys.wire.curve import ClusterKey
from dmlsys.wire.zmq_transport import ZmqTransport

from tests.security.helpers import Guarded, forged, raw_dealer

KEY = ClusterKey.generate()

# Hand-made requests in the names of the principals that matter, and plain garbage.
requests = st.builds(
    lambda kind, method, sender, msg_id: forged(kind, msg_id, method, sender, {"x": 1}),
    st.sampled_from([Kind.REQUEST, Kind.ONEWAY]),
    st.sampled_from(["guarded.echo", "guarded.shutdown", "guarded.note", "node.peer_lost", "node.status"]),
    st.sampled_from(["supervisor", "cli", "cli-1", "b", "a"]),
    st.integers(1, 2**31),
)
garbage = st.lists(st.binary(max_size=64), min_size=1, max_size=5)
messages = st.lists(st.one_of(requests, garbage), min_size=1, max_size=4)
mechanisms = st.sampled_from(["null", "curve-unknown-key", "plain-as-member"])


@pytest.fixture(scope="module")
def target():
    """One keyed node on a loop of its own thread, shared by every example."""
    loop = asyncio.new_event_loop()
    started = threading.Event()
    guarded = Guarded()
    node = Node("b", ZmqTransport("b", "tcp://127.0.0.1:0", keys=KEY), directory=Directory())
    node.add_service(guarded)

    def run():
        asyncio.set_event_loop(loop)
        loop.run_until_complete(node.start())
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    original, curve.ZAP_PARK_SECONDS = curve.ZAP_PARK_SECONDS, 0.05
    thread.start()
    started.wait(10)
    ctx = zmq.Context()
    try:
        yield node, guarded, ctx
    finally:
        ctx.destroy(linger=0)
        asyncio.run_coroutine_threadsafe(node.stop(drain_timeout=0), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
        curve.ZAP_PARK_SECONDS = original


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mechanism=mechanisms, batch=messages)
def test_no_handler_runs_for_anything_an_unauthenticated_peer_sends(target, mechanism, batch):
    node, guarded, ctx = target
    sock = raw_dealer(ctx, node.transport.address, mechanism=mechanism.split("-")[0],
                      server_key=KEY.public_key("b"), identity=b"supervisor",
                      username=b"supervisor", password=KEY.token("a"))  # a member's token, not the name's
    try:
        for frames in batch:
            sock.send_multipart(frames)
        assert sock.poll(150) == 0  # no reply of any kind
    finally:
        sock.close(linger=0)
    assert guarded.ran == [] and node.metrics.messages_in == 0
