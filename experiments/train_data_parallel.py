"""Data-parallel training throughput: 1 worker vs N workers, and where the step time goes.

Starts N worker processes itself (the ``worker`` role's services on a node over ZeroMQ,
``ipc://`` by default), and from a driver node in this process runs a training job on them
with :func:`dmlsys.collective.job.train_on_workers`: the same path ``python -m dmlsys.cluster
train`` takes. For each model and each N it reports training samples/s and the fraction of
step time spent in the gradient allreduce (``EpochStats.comm_fraction``), averaged over the
epochs after the first (the first one compiles and fills the batch cache), with the ratio to
N=1::

    python experiments/train_data_parallel.py                         # mlp + cnn, N = 1, 2
    python experiments/train_data_parallel.py --models mlp --workers 1,2,4 --epochs 3 --json dp.json
    python experiments/train_data_parallel.py --single-thread         # XLA on one core per worker

With N workers on one host the workers share its cores: the table measures the overhead of
the ring (communication) and what is left of the compute speedup on this machine, not what
N hosts would do.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, as a plain script

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from dmlsys.assembly import ZmqTransports, build_node  # noqa: E402
from dmlsys.node import Member, Node  # noqa: E402

MODELS = {
    "mlp": {"kind": "mlp", "hidden": [512, 256]},
    "cnn": {"kind": "cnn", "channels": [32, 64], "dense": 128},
}


# -- worker mode: one worker node, until stdin closes ------------------------------------------


async def serve_worker(name: str, bind: str, store: str, config: dict) -> None:
    node = build_node(Member(name, "worker", bind, config=config), ZmqTransports(), store=store, state_dir=store)
    await node.start()
    print(json.dumps({"zmq": node.transport.address}), flush=True)
    loop = asyncio.get_running_loop()
    peers = json.loads(await loop.run_in_executor(None, sys.stdin.readline))["peers"]
    # The driver runs the jobs: a client, which train.run admits (workers may not start jobs).
    node.directory.update(Member(peer, "client" if peer == "driver" else "worker", address)
                          for peer, address in peers.items())
    print(json.dumps({"ready": name}), flush=True)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)

    def watch_stdin() -> None:  # stdin closing means the driver is gone: exit, don't linger
        sys.stdin.read()
        loop.call_soon_threadsafe(stop.set)

    # a daemon thread, not the loop's executor: a blocked read must not hold up exit on SIGTERM
    threading.Thread(target=watch_stdin, daemon=True).start()
    await stop.wait()
    await node.stop(drain_timeout=1)


# -- driver ------------------------------------------------------------------------------------


class Workers:
    """N worker processes and a driver node wired to them; all stopped by ``close``."""

    def __init__(self, n: int, args: argparse.Namespace, tmp: Path) -> None:
        self.names = [f"worker-{i}" for i in range(n)]
        self.tmp = tmp
        config = {"timeout": args.timeout}
        if args.single_thread:
            config["single_thread"] = True
        if args.data_dir:
            config["data_dir"] = args.data_dir
        self.procs = []
        for name in self.names:
            cmd = [sys.executable, __file__, "--serve-worker", name, "--bind", self.bind(args.transport, name),
                   "--store", str(tmp / "store"), "--worker-config", json.dumps(config)]
            self.procs.append(subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
        self.driver: Node | None = None
        self.transport = args.transport

    def bind(self, transport: str, name: str) -> str:
        return f"ipc://{self.tmp}/{name}" if transport == "ipc" else "tcp://127.0.0.1:0"

    async def start(self) -> Node:
        self.driver = build_node(Member("driver", "client", self.bind(self.transport, "driver")), ZmqTransports())
        await self.driver.start()
        addresses = {"driver": self.driver.transport.address}
        for name, proc in zip(self.names, self.procs):
            addresses[name] = (await self._line(proc))["zmq"]
        self.driver.directory.update(Member(name, "worker", address) for name, address in addresses.items())
        for proc in self.procs:
            proc.stdin.write(json.dumps({"peers": addresses}) + "\n")
            proc.stdin.flush()
        for name, proc in zip(self.names, self.procs):
            await self._line(proc)  # {"ready": name}
        return self.driver

    @staticmethod
    async def _line(proc: subprocess.Popen) -> dict:
        text = await asyncio.to_thread(proc.stdout.readline)
        if not text:
            raise RuntimeError(f"worker process {proc.pid} exited with {proc.wait()} before it was ready")
        return json.loads(text)

    async def close(self) -> None:
        if self.driver is not None:
            await self.driver.stop(drain_timeout=0.5)
        for proc in self.procs:
            proc.stdin.close()  # EOF: the worker stops its node and exits
        for proc in self.procs:
            try:
                await asyncio.to_thread(proc.wait, 10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            proc.stdout.close()


async def run_one(model: str, n: int, args: argparse.Namespace, console: Console) -> dict:
    from dmlsys.collective.job import train_on_workers

    tmp = Path(tempfile.mkdtemp(prefix="dp-", dir="/tmp"))  # short: ipc paths are limited to ~100 bytes
    workers = Workers(n, args, tmp)
    try:
        driver = await workers.start()
        hyperparams = {"batch_size": args.batch_size, "lr": args.lr, "epochs": args.epochs, "seed": 0}
        t0 = time.perf_counter()
        with console.status(f"{model}: training on {n} worker(s), {args.epochs} epochs"):
            result = await train_on_workers(driver, workers.names, model=f"dp-{model}-n{n}", arch=MODELS[model],
                                            hyperparams=hyperparams, limit=args.limit, test_limit=args.test_limit)
        wall = time.perf_counter() - t0
    finally:
        await workers.close()
        shutil.rmtree(tmp, ignore_errors=True)
    later = result["history"][1:] or result["history"]  # epoch 1 compiles and fills the cache
    sps = sum(h["samples_per_s"] for h in later) / len(later)
    comm = sum(h["comm_fraction"] for h in later) / len(later)
    step_ms = 1000 * args.batch_size / sps
    return {"model": model, "n": n, "batch_size": args.batch_size, "epochs": args.epochs,
            "samples_per_s": sps, "comm_fraction": comm, "step_ms": step_ms, "comm_ms": comm * step_ms,
            "test_accuracy": result["test_accuracy"], "wall_s": wall, "transport": args.transport,
            "single_thread": args.single_thread, "history": result["history"]}


def table(rows: list[dict]) -> Table:
    t = Table(title="data-parallel training (epochs after the first)")
    for col in ("model", "workers", "samples/s", "vs 1 worker", "step ms", "comm ms", "comm fraction", "test acc"):
        t.add_column(col, justify="left" if col == "model" else "right")
    base = {r["model"]: r["samples_per_s"] for r in rows if r["n"] == 1}
    for r in rows:
        ratio = f"{r['samples_per_s'] / base[r['model']]:.2f}x" if r["model"] in base else "-"
        t.add_row(r["model"], str(r["n"]), f"{r['samples_per_s']:,.0f}", ratio, f"{r['step_ms']:.1f}",
                  f"{r['comm_ms']:.1f}", f"{r['comm_fraction']:.1%}", f"{r['test_accuracy']:.4f}")
    return t


def markdown(rows: list[dict], args: argparse.Namespace) -> str:
    base = {r["model"]: r["samples_per_s"] for r in rows if r["n"] == 1}
    lines = [f"Measured {time.strftime('%Y-%m-%d')} on {platform.machine()}, {os.cpu_count()} CPU cores, "
             f"ZeroMQ over {args.transport}, global batch {args.batch_size}, {args.epochs} epochs, "
             f"{'one XLA thread per worker' if args.single_thread else 'XLA default threads'}, "
             f"train limit {args.limit or 'none (60,000)'}.", "",
             "| model | workers | samples/s | vs 1 worker | step ms | comm ms | comm fraction | test acc |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ratio = f"{r['samples_per_s'] / base[r['model']]:.2f}x" if r["model"] in base else "-"
        lines.append(f"| {r['model']} | {r['n']} | {r['samples_per_s']:,.0f} | {ratio} | {r['step_ms']:.1f} | "
                     f"{r['comm_ms']:.1f} | {r['comm_fraction']:.1%} | {r['test_accuracy']:.4f} |")
    return "\n".join(lines)


async def drive(args: argparse.Namespace) -> list[dict]:
    console = Console(stderr=True)
    rows = []
    for model in args.models.split(","):
        if model not in MODELS:
            raise SystemExit(f"--models: unknown model {model!r} (known: {', '.join(MODELS)})")
        for n in [int(x) for x in args.workers.split(",")]:
            rows.append(await run_one(model, n, args, console))
            r = rows[-1]
            console.print(f"{model} n={n}: {r['samples_per_s']:,.0f} samples/s, comm {r['comm_fraction']:.1%}, "
                          f"test acc {r['test_accuracy']:.4f} ({r['wall_s']:.0f}s)")
    console.print(table(rows))
    print(markdown(rows, args))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="mlp,cnn", help="comma-separated: mlp, cnn (default: %(default)s)")
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run; the first is not measured")
    parser.add_argument("--batch-size", type=int, default=128, help="global batch, split among the workers")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--limit", type=int, default=None, help="train on the first samples only")
    parser.add_argument("--test-limit", type=int, default=None, help="test on the first samples only")
    parser.add_argument("--transport", choices=["ipc", "tcp"], default="ipc")
    parser.add_argument("--single-thread", action="store_true", help="one XLA thread per worker")
    parser.add_argument("--timeout", type=float, default=60.0, help="collective timeout in the workers, seconds")
    parser.add_argument("--data-dir", default=None, help="Fashion-MNIST directory (default: the usual places)")
    parser.add_argument("--json", metavar="FILE", help="write the rows as a JSON list")
    parser.add_argument("--plot", metavar="PNG", help="bar chart of samples/s (default: the --json path with .png)")
    parser.add_argument("--from-json", metavar="FILE", help="only plot the rows an earlier --json wrote")
    # worker mode: how the driver starts each worker process
    parser.add_argument("--serve-worker", metavar="NAME", help=argparse.SUPPRESS)
    parser.add_argument("--bind", help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    parser.add_argument("--worker-config", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_worker:
        asyncio.run(serve_worker(args.serve_worker, args.bind, args.store, json.loads(args.worker_config)))
        return 0
    import _plot  # experiments/_plot.py: matplotlib is imported only when a figure is drawn

    if args.from_json:
        _plot.train_data_parallel(_plot.load_json(args.from_json), _plot.plot_path(args.plot, args.from_json))
        return 0
    rows = asyncio.run(drive(args))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if out := _plot.plot_path(args.plot, args.json):
        _plot.train_data_parallel(rows, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
