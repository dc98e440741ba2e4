"""A router and shards on one SimNetwork, for the sharding tests."""

import asyncio

from dmlsys.node import Directory, Member, Node
from dmlsys.sharding.router import RouterConfig, RouterService
from dmlsys.sharding.shard import ShardConfig, ShardService
from dmlsys.wire.sim import SimNetwork

VNODES = 64  # router and shards must agree; few points keep the rings cheap to build


class Cluster:
    """A router node and shard nodes, each with its own directory, on one SimNetwork."""

    def __init__(self, seed: int, shards: list[str], app, tmp_path, part_timeout: float = 1.0) -> None:
        self.net = SimNetwork(seed)
        self.app, self.tmp = app, tmp_path
        self.members = [Member("router", "router", "sim://router")] + [Member(s, "shard", f"sim://{s}") for s in shards]
        self.shards: dict[str, Node] = {}
        self.router_node = Node("router", self.net.transport("router"), role="router",
                                directory=Directory(self.members))
        self.router = RouterService(RouterConfig(vnodes=VNODES, part_timeout=part_timeout, deadline=10.0),
                                    app=app())
        self.router_node.add_service(self.router)

    async def start_shard(self, name: str) -> Node:
        node = Node(name, self.net.transport(name), role="shard", directory=Directory(self.members))
        node.add_service(ShardService(ShardConfig(str(self.tmp / name), vnodes=VNODES, call_timeout=1.0,
                                                  fsync=False), app=self.app()))
        await node.start()
        self.shards[name] = node
        return node

    def shard(self, name: str) -> ShardService:
        return self.shards[name].service("shard")  # type: ignore[return-value]

    async def start(self) -> None:
        for m in self.members:
            if m.role == "shard":
                await self.start_shard(m.name)
        await self.router_node.start()

    def publish(self) -> None:
        """Every node learns the current member list (what the supervisor's refresh does)."""
        for node in [self.router_node, *self.shards.values()]:
            if node.state.value != "stopped":
                node.directory.update(self.members)

    async def add_shard(self, name: str) -> None:
        self.members.append(Member(name, "shard", f"sim://{name}"))
        await self.start_shard(name)
        self.publish()

    async def settle(self) -> None:
        """Let membership-driven pushes finish."""
        await asyncio.sleep(0.5)

    async def stop(self) -> None:
        await self.router_node.stop(0)
        for node in self.shards.values():
            await node.stop(0)
