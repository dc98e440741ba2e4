"""The assembly point: members in, running nodes out.

Every place that runs dmlsys nodes builds them here: the node processes under the supervisor
(one member each), the supervisor's own node, the CLI's short-lived client, the pipeline's
in-process serving fleet and worker groups, the experiments and the tests. The same members run
on ZeroMQ or on a ``SimNetwork``: only the transport factory differs.

::

    system = System(ZmqTransports(), store=".dmlsys/models")
    system.add("replica-0", "replica", config={"model": "fashion-mlp"})
    system.add("gateway", "gateway", config={"http": "127.0.0.1:0"})
    async with system:                      # started in the order added, stopped in reverse
        reply = await system.node("gateway").call("replica-0", "model", "predict", body)

Order: nodes start in the order they were added, so add what others depend on first (replicas
before the gateway that probes them); they stop in reverse order, so the door stops taking
requests before what stands behind it goes. Once a node has bound, its real address (a picked
port) is put in every node's directory.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

from dmlsys.node import ConfigError, Directory, Member, Node, Service
from dmlsys.wire import DEFAULT_LIMITS, Limits

from .roles import RoleContext, factory
from .transports import Transports


def build_node(member: Member, transports: Transports, *, store: str | Path = ".dmlsys/models",
               state_dir: str | Path = ".dmlsys", http: str | None = None, directory: Directory | None = None,
               services: Sequence[Service] = (), limits: Limits = DEFAULT_LIMITS) -> Node:
    """One node for ``member``: its transport, its admin endpoint, its role's services (none
    for the roles "" and "client"), then ``services``.

    Raises ConfigError whose key is relative to the member: ``role`` or ``config.KEY``."""
    admin = None
    if member.admin:
        host, port = member.admin.rsplit(":", 1)
        admin = (host, int(port))
    node = Node(member.name, transports(member.name, member.address), role=member.role, admin=admin,
                limits=limits, directory=directory)
    if member.role not in ("", "client", "supervisor"):
        build = factory(member.role)
        ctx = RoleContext(member.name, member.role, dict(member.config), Path(store), Path(state_dir), http)
        try:
            role_services = build(ctx)
        except ConfigError as e:
            raise ConfigError(f"config.{e.key}", e.expected) from None
        for service in role_services:
            node.add_service(service)
    for service in services:
        node.add_service(service)
    return node


class System:
    """The nodes of one running system, built from members by their roles.

    ``add`` builds a node (not started); ``start`` starts them in order; ``spawn`` adds and
    starts one while the system runs; ``retire`` drains and stops one; ``stop`` stops every
    node in reverse order. Every node's directory lists every member, with bound addresses.
    """

    def __init__(self, transports: Transports, *, store: str | Path = ".dmlsys/models",
                 state_dir: str | Path = ".dmlsys", http: str | None = None,
                 supervisor: str | None = None, limits: Limits = DEFAULT_LIMITS) -> None:
        self.transports = transports
        self.store = str(store)
        self.state_dir = str(state_dir)
        self.http = http
        self.supervisor = supervisor  # a supervisor node's name, whose member list directories follow
        self.limits = limits
        self._nodes: dict[str, Node] = {}
        self._members: dict[str, Member] = {}
        self._started: list[str] = []  # names, in start order

    # -- composition ----------------------------------------------------------------------

    def add(self, name: str, role: str = "", *, config: dict[str, Any] | None = None, address: str | None = None,
            admin: str | None = None, services: Sequence[Service] = ()) -> Node:
        """Build node ``name`` with ``role``'s services plus ``services``. Raises ConfigError
        (key ``nodes.NAME.role`` or ``nodes.NAME.config.KEY``) or ValueError for a taken name."""
        member = Member(name, role, address or self.transports.default_address(name), admin,
                        config=dict(config or {}))
        return self.add_member(member, services=services)

    def add_member(self, member: Member, *, services: Sequence[Service] = ()) -> Node:
        if member.name in self._nodes:
            raise ValueError(f"this system already has a node named {member.name!r}")
        try:
            node = build_node(member, self.transports, store=self.store, state_dir=self.state_dir, http=self.http,
                              directory=Directory(self._members.values(), supervisor=self.supervisor),
                              services=services, limits=self.limits)
        except ConfigError as e:
            raise ConfigError(f"nodes.{member.name}.{e.key}", e.expected) from None
        self._nodes[member.name] = node
        self._members[member.name] = member
        return node

    def node(self, name: str) -> Node:
        return self._nodes[name]

    @property
    def nodes(self) -> list[Node]:
        return list(self._nodes.values())

    def members(self, role: str | None = None) -> list[Member]:
        return [m for m in self._members.values() if role is None or m.role == role]

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Start every node not yet started, in the order added. If one fails, the ones this
        call started are stopped again and the error is raised."""
        fresh = [name for name in self._nodes if name not in self._started]
        try:
            for name in fresh:
                await self._start_one(name)
        except BaseException:
            for name in reversed(fresh):
                if name in self._started:
                    self._started.remove(name)
                    await self._nodes[name].stop(drain_timeout=0)
            raise
        self._publish()

    async def spawn(self, name: str, role: str = "", **kwargs: Any) -> Node:
        """``add`` and start one node while the system runs; every directory learns of it."""
        node = self.add(name, role, **kwargs)
        try:
            await self._start_one(name)
        except BaseException:
            self._nodes.pop(name, None)
            self._members.pop(name, None)
            raise
        self._publish()
        return node

    async def retire(self, name: str, *, drain_timeout: float = 10.0) -> None:
        """Take ``name`` out of every directory first (no new work reaches it), then stop it."""
        node = self._nodes.pop(name)
        self._members.pop(name, None)
        self._publish()
        if name in self._started:
            self._started.remove(name)
            await node.stop(drain_timeout=drain_timeout)

    async def stop(self, *, drain_timeout: float = 5.0) -> None:
        """Stop every started node in reverse start order (the door before what is behind it)."""
        for name in reversed(list(self._started)):
            self._started.remove(name)
            await self._nodes[name].stop(drain_timeout=drain_timeout)

    async def __aenter__(self) -> "System":
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()

    async def _start_one(self, name: str) -> None:
        node = self._nodes[name]
        await node.start()
        self._started.append(name)
        # A picked port (":0") is known only now: that is the address peers must use.
        self._members[name] = dataclasses.replace(self._members[name], address=node.transport.address)

    def _publish(self) -> None:
        members = list(self._members.values())
        for node in self._nodes.values():
            node.directory.update(members)

