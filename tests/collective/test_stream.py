"""The ring's plain TCP data stream (``dmlsys.collective.stream``): who may connect, and when a
group uses it. Its sums over real sockets (odd sizes, dtypes, a rank SIGKILLed mid-pass) are
``test_ring_tcp.py``'s ``stream`` cases."""

from __future__ import annotations

import asyncio
import socket

import pytest

from dmlsys.collective import CollectiveService, InvalidArgument, ProcessGroup, stream
from dmlsys.node import Node
from dmlsys.wire import sim
from dmlsys.wire.sim import SimNetwork


def test_the_listener_keeps_only_the_connection_that_shows_the_token_and_each_token_opens_one():
    async def main():
        state = stream.StreamState("127.0.0.1")
        port = state.listen()
        token = state.token
        loop = asyncio.get_running_loop()
        accepted = loop.create_task(state.accept())
        wrong = await stream.connect("127.0.0.1", port, b"x" * stream.TOKEN_BYTES)
        silent = socket.create_connection(("127.0.0.1", port))  # connects, never says a word
        right = await stream.connect("127.0.0.1", port, token)
        try:
            async with asyncio.timeout(1.0):  # the silent one holds up nobody
                sock = await accepted
            right.sendall(b"ping")
            assert sock.recv(4) == b"ping"  # the kept connection is the one with the token
            assert wrong.recv(1) == b""  # closed unheard
            assert state.token != token  # spent: a second connection needs the next offer's token
            again = await stream.connect("127.0.0.1", port, token)
            second = loop.create_task(state.accept())
            await asyncio.sleep(0.2)
            assert not second.done() and again.recv(1) == b""
            second.cancel()
            sock.close()
            again.close()
        finally:
            for s in (wrong, silent, right):
                s.close()
            state.close()

    asyncio.run(main())


class _TcpLike(sim.SimTransport):
    """A simulated endpoint that says its members live at tcp:// addresses (it never dials them)."""

    def __init__(self, net: SimNetwork, name: str, *, keys: bool, addresses: dict[str, str]) -> None:
        super().__init__(net, name)
        self.address = addresses[name]
        self._addresses = addresses
        self.authenticated = keys

    def peers(self) -> dict[str, str]:
        return {k: v for k, v in self._addresses.items() if k != self.name}


@pytest.mark.parametrize("keys, wanted, uses", [(False, None, True), (True, None, False), (True, True, True),
                                                (False, False, False)])
def test_the_ring_takes_the_stream_over_tcp_without_keys_and_with_keys_only_when_asked(keys, wanted, uses):
    async def main():
        net = SimNetwork(0)
        addresses = {"a": "tcp://127.0.0.1:5001", "b": "tcp://127.0.0.1:5002"}
        node = Node("a", _TcpLike(net, "a", keys=keys, addresses=addresses), admin=None)
        node.add_service(CollectiveService())
        await node.start()
        try:
            group = ProcessGroup(node, ["a", "b"], stream=wanted)
            assert group.uses_stream is uses
            group.close()
        finally:
            await node.stop(drain_timeout=0)

    sim.run(main())


def test_stream_true_refuses_a_member_that_is_not_on_tcp():
    async def main():
        net = SimNetwork(0)
        addresses = {"a": "tcp://127.0.0.1:5001", "b": "ipc:///tmp/b"}
        node = Node("a", _TcpLike(net, "a", keys=False, addresses=addresses), admin=None)
        node.add_service(CollectiveService())
        await node.start()
        try:
            group = ProcessGroup(node, ["a", "b"], stream=True)
            with pytest.raises(InvalidArgument, match="b is not"):
                group.uses_stream  # noqa: B018
            assert ProcessGroup(node, ["a", "b"], name="auto").uses_stream is False
        finally:
            await node.stop(drain_timeout=0)

    sim.run(main())


@pytest.mark.parametrize("wanted", [None, True])
def test_with_cluster_keys_the_ring_stays_on_curve_unless_the_group_asks_for_the_stream(wanted):
    """Real ZeroMQ with CURVE: by default the ring's data stays encrypted on ZeroMQ; with
    stream=True the offers travel over CURVE and the data over the token-checked stream."""
    import numpy as np

    from dmlsys.wire.curve import ClusterKey
    from dmlsys.wire.zmq_transport import ZmqTransport

    async def main():
        key = ClusterKey(b"k" * 32)
        nodes = [Node(n, ZmqTransport(n, "tcp://127.0.0.1:0", keys=key), admin=None) for n in ("a", "b")]
        for node in nodes:
            node.add_service(CollectiveService())
            await node.start()
        nodes[0].transport.add_peer("b", nodes[1].transport.address)
        nodes[1].transport.add_peer("a", nodes[0].transport.address)
        try:
            groups = [ProcessGroup(node, ["a", "b"], shm=False, direct_bytes=0, stream=wanted, timeout=10)
                      for node in nodes]
            xs = [np.arange(100_003, dtype=np.float32) + r for r in range(2)]
            got = await asyncio.gather(*(g.allreduce(x) for g, x in zip(groups, xs)))
            assert all(g.uses_stream is bool(wanted) for g in groups)
            for r in got:
                np.testing.assert_array_equal(r, xs[0] + xs[1])
        finally:
            for node in nodes:
                await node.stop(drain_timeout=0)

    asyncio.run(main())
