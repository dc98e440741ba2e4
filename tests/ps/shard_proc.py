"""One parameter-server shard as its own OS process, for the real-process tests.

Prints ``{"zmq": ADDRESS}`` once bound, then serves until killed (SIGKILL in the tests) or
until stdin closes (then it drains: checkpoint and exit).

    python tests/ps/shard_proc.py --name ps0 --state DIR [--checkpoint-every 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from anywhere, as a plain script

from dmlsys.node import Node
from dmlsys.ps.server import PsConfig, PsService
from dmlsys.wire.zmq_transport import ZmqTransport


async def main(args: argparse.Namespace) -> None:
    node = Node(args.name, ZmqTransport(args.name, "tcp://127.0.0.1:0"), admin=None)
    node.add_service(PsService(PsConfig(args.state, checkpoint_every=args.checkpoint_every,
                                              drop_timeout=60.0)))
    await node.start()
    print(json.dumps({"zmq": node.transport.address}), flush=True)
    await asyncio.to_thread(sys.stdin.read)  # until the test closes our stdin
    await node.stop(drain_timeout=1.0)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", required=True)
    parser.add_argument("--state", required=True)
    parser.add_argument("--checkpoint-every", type=int, default=5)
    asyncio.run(main(parser.parse_args()))
