"""One rank of a process group, as its own OS process, for the real-network tests.

Protocol on stdio (one JSON object per line):
  out  {"zmq": ADDRESS}                   once bound (tcp port 0)
  in   {"peers": {NAME: ADDRESS, ...}}    every rank's address
  out  {"ok": PASS}                       after each allreduce that returned
  out  {"error": TYPE, "missing": [...], "message": ..., "at": TIME}   if one raised; then exit

Modes: ``check`` runs --passes allreduces of seeded random arrays (``array_for``) and saves
each result to --out/rank{R}_pass{P}.npy; ``loop`` allreduces --length float32s until a
collective fails (the SIGKILL test).

    python tests/collective/rank_proc.py --rank 0 --size 3 --mode check --out DIR
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from anywhere, as a plain script

from dmlsys.collective import CollectiveError, CollectiveService, ProcessGroup  # noqa: E402
from dmlsys.node import Node  # noqa: E402
from dmlsys.wire.zmq_transport import ZmqTransport  # noqa: E402

DTYPES = ["float32", "float64", "int32", "int64", "uint8", "float16"]


def array_for(rank: int, pass_: int) -> np.ndarray:
    """Pass p uses dtype DTYPES[p % 6] and a length that varies with p; values depend on rank."""
    rng = np.random.default_rng(1000 * pass_ + rank)
    dtype = np.dtype(DTYPES[pass_ % len(DTYPES)])
    length = [0, 1, 2, 1000, 123_457, 3][pass_ % 6] + pass_
    if dtype.kind in "iu":
        return rng.integers(0, 100, length).astype(dtype)
    return (rng.standard_normal(length) * 10).astype(dtype)


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


async def main(args: argparse.Namespace) -> None:
    name = f"r{args.rank}"
    node = Node(name, ZmqTransport(name, "tcp://127.0.0.1:0"), admin=None)
    node.add_service(CollectiveService())
    await node.start()
    emit(zmq=node.transport.address)
    peers = json.loads(await asyncio.to_thread(sys.stdin.readline))["peers"]
    for peer, address in peers.items():
        if peer != name:
            node.transport.add_peer(peer, address)
    group = ProcessGroup(node, [f"r{i}" for i in range(args.size)], timeout=args.timeout, chunk_bytes=256 << 10)
    try:
        if args.mode == "check":
            for p in range(args.passes):
                out = await group.allreduce(array_for(args.rank, p), "sum")
                np.save(Path(args.out) / f"rank{args.rank}_pass{p}.npy", out, allow_pickle=False)
                emit(ok=p)
        else:
            x = np.ones(args.length, np.float32)
            p = 0
            while True:
                await group.allreduce(x, "sum")
                emit(ok=p)
                p += 1
    except CollectiveError as e:
        emit(error=type(e).__name__, missing=e.missing, message=str(e), at=time.time())
    finally:
        await node.stop(drain_timeout=0.5)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--mode", choices=["check", "loop"], default="check")
    parser.add_argument("--passes", type=int, default=6)
    parser.add_argument("--length", type=int, default=1 << 20, help="floats per allreduce in loop mode")
    parser.add_argument("--timeout", type=float, default=3.0, help="the group's collective timeout, seconds")
    parser.add_argument("--out", default=".", help="where check mode saves results")
    asyncio.run(main(parser.parse_args()))
