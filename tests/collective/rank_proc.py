"""One rank of a process group, as its own OS process, for the real-network tests.

Protocol on stdio (one JSON object per line):
  out  {"zmq": ADDRESS}                   once bound (tcp port 0)
  in   {"peers": {NAME: ADDRESS, ...}}    every rank's address
  out  {"ok": PASS}                       after each allreduce that returned
  out  {"error": TYPE, "missing": [...], "message": ..., "at": TIME}   if one raised; then exit

Modes: ``check`` runs --passes allreduces of seeded random arrays (``array_for``, or
``odd_array_for`` with --odd) and saves each result to --out/rank{R}_pass{P}.npy; ``loop``
allreduces --length float32s until a collective fails (the SIGKILL test). ``--shm off`` keeps
the group off shared memory (the socket ring over TCP, as between hosts); ``--direct-bytes 0``
sends every size around the ring; ``--stream off`` keeps the ring's data on ZeroMQ (by default,
over tcp:// without keys, it takes a plain TCP stream per neighbour: ``dmlsys.collective.stream``).

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


# (dtype, length) of the --odd passes: lengths that no world size of 2..4 divides, nor any
# chunk, in the dtypes whose itemsizes differ (2, 4, 8 bytes), and one length shorter than the ring.
ODD = [("float16", 100_003), ("float64", 77_777), ("int32", 65_537), ("float32", 3), ("float64", 1),
       ("float16", 5), ("int32", 250_001)]


def odd_array_for(rank: int, pass_: int) -> np.ndarray:
    """Pass p of the --odd run: ``ODD[p % len(ODD)]``, values depending on rank; float16 values
    are small integers, so that their sums are exact in any order of addition."""
    rng = np.random.default_rng(7000 * pass_ + rank)
    dtype, length = ODD[pass_ % len(ODD)]
    if dtype in ("int32", "float16"):
        return rng.integers(-50, 50, length).astype(dtype)
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
    group = ProcessGroup(node, [f"r{i}" for i in range(args.size)], timeout=args.timeout,
                         chunk_bytes=args.chunk_bytes, direct_bytes=args.direct_bytes,
                         shm=False if args.shm == "off" else None,
                         stream=False if args.stream == "off" else None)
    make = odd_array_for if args.odd else array_for
    try:
        if args.mode == "check":
            for p in range(args.passes):
                out = await group.allreduce(make(args.rank, p), "sum")
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
    parser.add_argument("--odd", action="store_true", help="check mode: the odd sizes and dtypes (odd_array_for)")
    parser.add_argument("--shm", choices=["auto", "off"], default="auto",
                        help="off: never shared memory (the socket ring), auto: the group decides")
    parser.add_argument("--stream", choices=["auto", "off"], default="auto",
                        help="off: the ring's data over ZeroMQ, auto: over a plain TCP stream when every member is on tcp://")
    parser.add_argument("--chunk-bytes", type=int, default=256 << 10, help="the group's chunk_bytes")
    parser.add_argument("--direct-bytes", type=int, default=64 << 10, help="the group's direct_bytes")
    asyncio.run(main(parser.parse_args()))
