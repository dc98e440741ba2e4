"""Keyed nodes in this process, and the pieces of an attacker: raw sockets and hand-made frames."""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path
from typing import Any, AsyncIterator

import zmq

from dmlsys.node import ADMIN, Directory, Member, Node, Service, allow, oneway, rpc
from dmlsys.wire.codec import Kind, Message, encode
from dmlsys.wire.curve import ClusterKey
from dmlsys.wire.zmq_transport import ZmqTransport


class Guarded(Service):
    """Counts every handler run: an attack succeeded exactly when ``ran`` is not empty."""

    name = "guarded"

    def __init__(self) -> None:
        self.ran: list[tuple[str, str]] = []

    @rpc
    def echo(self, body, ctx):
        self.ran.append(("echo", ctx.sender))
        return body

    @rpc
    async def slow(self, body, ctx):
        self.ran.append(("slow", ctx.sender))
        await asyncio.sleep(float(body))
        return ctx.node.name

    @oneway
    def note(self, body, ctx):
        self.ran.append(("note", ctx.sender))

    @rpc(allow=ADMIN)
    def shutdown(self, body, ctx):
        self.ran.append(("shutdown", ctx.sender))
        return "stopping"

    @rpc(allow=ADMIN | allow(roles=("gateway",)))
    def reload(self, body, ctx):
        self.ran.append(("reload", ctx.sender))
        return "reloaded"


def address(kind: str, tmp: Path, name: str) -> str:
    return f"ipc://{tmp}/{name}.sock" if kind == "ipc" else "tcp://127.0.0.1:0"


class Cluster:
    """Nodes sharing one cluster key, each knowing every other (as the supervisor's member list
    makes them); ``roles`` gives members a role in every directory."""

    def __init__(self, key: ClusterKey | None, kind: str, tmp: Path) -> None:
        self.key, self.kind, self.tmp = key, kind, tmp
        self.nodes: dict[str, Node] = {}
        self.members: dict[str, Member] = {}

    async def add(self, name: str, role: str = "", *services: Service) -> Node:
        transport = ZmqTransport(name, address(self.kind, self.tmp, name), keys=self.key)
        node = Node(name, transport, role=role, directory=Directory())
        for service in services:
            node.add_service(service)
        await node.start()
        self.nodes[name] = node
        self.members[name] = Member(name, role, transport.address)
        for other in self.nodes.values():
            other.directory.update(self.members.values())
        return node

    async def close(self) -> None:
        for node in self.nodes.values():
            await node.stop(drain_timeout=0)


@contextlib.asynccontextmanager
async def cluster(key: ClusterKey | None, kind: str, tmp: Path) -> AsyncIterator[Cluster]:
    c = Cluster(key, kind, tmp)
    try:
        yield c
    finally:
        await c.close()


def forged(kind: Kind, msg_id: int, method: str, sender: str, body: Any = None) -> list:
    return encode(Message(kind, msg_id, method, sender, body, 5.0 if kind is Kind.REQUEST else None))


def raw_dealer(ctx: zmq.Context, endpoint: str, *, mechanism: str, server_key: bytes | None = None,
               identity: bytes | None = None, username: bytes = b"", password: bytes = b"") -> zmq.Socket:
    """A socket of a process that does not hold the cluster key (or holds another one)."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if identity is not None:
        sock.setsockopt(zmq.IDENTITY, identity)
    if mechanism == "curve":
        public, secret = zmq.curve_keypair()
        sock.setsockopt(zmq.CURVE_SERVERKEY, server_key)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
    elif mechanism == "plain":
        sock.setsockopt(zmq.PLAIN_USERNAME, username)
        sock.setsockopt(zmq.PLAIN_PASSWORD, password)
    sock.connect(endpoint)
    return sock


async def eventually(predicate, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


def private_dir(tmp: Path) -> Path:
    d = tmp / "sock"
    d.mkdir(mode=0o700)
    os.chmod(d, 0o700)
    return d
