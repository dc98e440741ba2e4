"""A node process for tests: ZeroMQ on tcp port 0, admin HTTP on port 0, the Echo service.

Prints one JSON line {"pid", "zmq", "admin"} on stdout once ready, then serves until SIGTERM.

    python tests/node/echo_node.py --name b
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from anywhere, as a plain script

from dmlsys.node import Node  # noqa: E402
from dmlsys.wire.zmq_transport import ZmqTransport  # noqa: E402
from tests.node.helpers import Echo  # noqa: E402


async def main(name: str) -> None:
    node = Node(name, ZmqTransport(name, "tcp://127.0.0.1:0"), admin=("127.0.0.1", 0))
    node.add_service(Echo())
    await node.start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print(json.dumps({"pid": os.getpid(), "zmq": node.transport.address, "admin": node.admin_url}), flush=True)
    await stop.wait()
    await node.stop(drain_timeout=1)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default="b", help="node name (also its ZeroMQ identity)")
    asyncio.run(main(parser.parse_args().name))
