"""A parameter-server job on the simulated network: S shard nodes, W worker nodes, one call.

    def test_x():
        run_ps(shards=2, workers=3, body=lambda c: ...)

Shards can be crashed and restarted from their state directories (``SimPs.crash`` /
``SimPs.restart``), as the supervisor restarts a SIGKILLed process. Everything runs on the
virtual-time loop, so timeouts and backoffs cost no wall time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from dmlsys.node import Node
from dmlsys.ps.client import PsClient
from dmlsys.ps.server import PsConfig, PsService
from dmlsys.wire import sim
from dmlsys.wire.sim import Link, SimNetwork


@dataclasses.dataclass
class SimPs:
    net: SimNetwork
    root: Path
    shard_names: list[str]
    worker_names: list[str]
    shard_nodes: list[Node]
    worker_nodes: list[Node]
    config: dict[str, Any]
    restarts: int = 0

    def client(self, rank: int, job: str = "job", **kw: Any) -> PsClient:
        return PsClient(self.worker_nodes[rank], self.shard_names, job=job, **kw)

    def service(self, shard: int) -> PsService:
        return self.shard_nodes[shard].service("ps")  # type: ignore[return-value]

    def crash(self, shard: int) -> None:
        """The shard's process dies: in-flight messages to and from it are lost, its memory too."""
        self.net.crash(self.shard_names[shard])
        self.shard_nodes[shard].kill()

    async def restart(self, shard: int) -> None:
        """A fresh process for the shard, on the same name and state directory."""
        old = self.shard_nodes[shard]
        await old.stop()
        self.shard_nodes[shard] = await _shard(self.net, self.shard_names[shard], self.root, self.config)
        self.restarts += 1

    def crash_worker(self, rank: int) -> None:
        self.net.crash(self.worker_names[rank])
        self.worker_nodes[rank].kill()


async def _shard(net: SimNetwork, name: str, root: Path, config: dict[str, Any]) -> Node:
    node = Node(name, net.transport(name), admin=None)
    node.add_service(PsService(PsConfig(str(root / name), **config)))
    await node.start()
    return node


def run_ps(shards: int, workers: int, body: Callable[[SimPs], Awaitable[Any]], *, seed: int = 0,
           link: Link | None = None, **config: Any) -> Any:
    """Start shard nodes ps0.. and worker nodes w0.., run ``body``, stop them all."""
    config.setdefault("fsync", False)  # a simulated crash keeps the page cache; fsync is tested apart

    async def main() -> Any:
        with tempfile.TemporaryDirectory(prefix="dmlsys-ps-") as tmp:
            root = Path(tmp)
            net = SimNetwork(seed, link=link) if link is not None else SimNetwork(seed)
            shard_names = [f"ps{i}" for i in range(shards)]
            worker_names = [f"w{i}" for i in range(workers)]
            shard_nodes = [await _shard(net, n, root, config) for n in shard_names]
            worker_nodes = []
            for n in worker_names:
                node = Node(n, net.transport(n), admin=None)
                await node.start()
                worker_nodes.append(node)
            cluster = SimPs(net, root, shard_names, worker_names, shard_nodes, worker_nodes, config)
            try:
                return await body(cluster)
            finally:
                for node in cluster.worker_nodes + cluster.shard_nodes:
                    await node.stop(drain_timeout=0.1)

    return sim.run(main())


async def each(fns: list[Callable[[], Awaitable[Any]]]) -> list[Any]:
    return await asyncio.gather(*(f() for f in fns), return_exceptions=True)
