"""Shard processes for the real-process tests: a shard node on ZeroMQ (ipc://) whose directory
follows a JSON members file (what the supervisor's refresh does in a cluster)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

from dmlsys.sharding.app import ShardedApp, identity_merge, identity_split


def slow_identity() -> ShardedApp:
    """The identity app, each part taking 50 ms on its shard: long enough to kill a shard mid-request."""

    def handle(key, part, state):
        time.sleep(0.05)
        return part, None

    return ShardedApp("slow-identity", identity_split, handle, identity_merge)


def members_of(path: Path):
    from dmlsys.node import Member

    return [Member(**m) for m in json.loads(path.read_text())]


def shard_main(name: str, address: str, members_file: str, state_dir: str, app: str, vnodes: int) -> None:
    import uvloop

    from dmlsys.node import Directory, Node
    from dmlsys.sharding.shard import ShardConfig, ShardService
    from dmlsys.wire.zmq_transport import ZmqTransport

    path = Path(members_file)

    async def main() -> None:
        node = Node(name, ZmqTransport(name, address), role="shard", directory=Directory(members_of(path)))
        node.add_service(ShardService(ShardConfig(state_dir, app=app, vnodes=vnodes, fsync=False, call_timeout=2.0)))
        await node.start()
        while True:  # until SIGKILL or SIGTERM
            await asyncio.sleep(0.05)
            try:
                node.directory.update(members_of(path))
            except (json.JSONDecodeError, FileNotFoundError):
                pass  # the test is rewriting it

    uvloop.run(main())
