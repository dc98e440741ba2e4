"""One way to run a small cluster of nodes over either transport, so a test is written once.

``Net("zmq")`` gives ZmqTransports on loopback TCP port 0, run on a real asyncio loop;
``Net("sim")`` gives SimTransports on a seeded SimNetwork, run on the virtual-time loop.
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable

from dmlsys.node import Node, Service, oneway, rpc
from dmlsys.wire import sim
from dmlsys.wire.sim import Link, SimNetwork
from dmlsys.wire.transport import Transport
from dmlsys.wire.zmq_transport import ZmqTransport


class Net:
    def __init__(self, kind: str, seed: int = 0, link: Link | None = None) -> None:
        self.kind = kind
        self.sim = SimNetwork(seed, link=link) if kind == "sim" else None
        self.nodes: list[Node] = []

    def transport(self, name: str) -> Transport:
        if self.sim is not None:
            return self.sim.transport(name)
        return ZmqTransport(name, "tcp://127.0.0.1:0")

    def run(self, main: Callable[[], Awaitable[Any]]) -> Any:
        """Run ``main()`` and then stop every node it started, whatever happened."""

        async def wrapper():
            try:
                return await main()
            finally:
                for node in self.nodes:
                    await node.stop(drain_timeout=1)

        return sim.run(wrapper()) if self.sim is not None else asyncio.run(wrapper())

    async def node(self, name: str, *services: Service, admin: bool = False, **kw) -> Node:
        """A started node hosting ``services``, reachable by name from every node started before."""
        node = Node(name, self.transport(name), admin=("127.0.0.1", 0) if admin else None, **kw)
        for service in services:
            node.add_service(service)
        await node.start()
        for other in self.nodes:  # the simulation resolves names itself; ZeroMQ needs addresses
            other.transport.add_peer(name, node.transport.address)
            node.transport.add_peer(other.name, other.transport.address)
        self.nodes.append(node)
        return node


class Boom(Exception):
    """A typed error a handler raises on purpose."""


class Echo(Service):
    """The test service: echo, fail, sleep, count one-way messages."""

    name = "echo"

    def __init__(self) -> None:
        self.received: list[Any] = []
        self.got_oneway = asyncio.Event()
        self.started: list[str] = []
        self.cancelled: list[str] = []
        self.finished: list[str] = []

    @rpc
    def echo(self, body):
        return body

    @rpc
    def who(self, body, ctx):
        return {"sender": ctx.sender, "method": ctx.method, "has_deadline": ctx.deadline is not None}

    @rpc
    def fail(self, body):
        raise Boom(f"no such thing: {body}")

    @rpc
    def unsendable(self, body):
        return {1, 2, 3}

    @rpc
    async def slow(self, body):
        """Sleeps ``body["s"]`` seconds; records whether it finished or was cancelled."""
        tag = body.get("tag", "")
        self.started.append(tag)
        try:
            await asyncio.sleep(body["s"])
        except asyncio.CancelledError:
            self.cancelled.append(tag)
            raise
        self.finished.append(tag)
        return tag

    @oneway
    def note(self, body):
        self.received.append(body)
        self.got_oneway.set()

    @oneway
    def note_fails(self, body):
        raise Boom("one-way handlers fail quietly")


async def eventually(predicate: Callable[[], bool], timeout: float = 5.0, step: float = 0.01) -> None:
    """Wait until ``predicate()`` holds (loop time: virtual under the simulation)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not predicate():
        if loop.time() > end:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(step)
