"""Parameter servers vs the collective (ring allreduce), side by side in one run (issue 9).

With 2 workers on Fashion-MNIST: the MLP and the CNN through the collective and through
parameter servers (1 and 2 shards; BSP and SSP s=2); the wide hashed-feature model (a table over
the per-worker memory cap) through the parameter servers only, and the collective's refusal of
it (the collective worker's own ``train.run`` with the cap: its error is the row's ``error``); a
shard sweep (1, 2, 4) for the MLP under BSP; BSP vs SSP(2) with one worker slowed 2x (it sleeps
as long as its gradient took, after each one; the CNN by default, where compute dominates a step),
and with transient stragglers (at each step one worker drawn at random is slowed so).

Everything runs in this one process over the simulated network in real time (no added delay or
loss; every message is copied and hashed, as the simulation does): both sides pay the same
transport, and the workers' gradients (both sides) and the shards' updates run in threads of
this one process, sharing its cores and event loop, so step times are the whole job's per step,
not one worker's on its own machine. ``step_ms``: the last epoch's training time per step
(the first epoch compiles); ``bytes_per_step``: bytes rank 0 sent plus received during the last
epoch, per step; ``accuracy``: test accuracy after the same number of steps;
``cpu_ms_per_step`` (an extra key): the process's CPU time per step over the last epoch, all workers and shards together (the
overhead each side adds, and less at the mercy of other load than the wall time).

    python experiments/ps_vs_allreduce.py --quick                 # a few minutes
    python experiments/ps_vs_allreduce.py --json docs/ps_vs_allreduce.json --plot docs/ps_vs_allreduce.png

The default run trains on the first 12,800 images (100 steps of 128 per epoch) for 2 epochs and
tests on all 10,000, about 10 minutes on 2 quiet cores; ``--limit 0 --epochs 3`` is the whole
data (hours). ``--parts compare,slowed`` (etc.) runs only some parts.
    python experiments/ps_vs_allreduce.py --from-json docs/ps_vs_allreduce.json   # re-plot only
    python experiments/ps_vs_allreduce.py --accuracy cnn --consistency ssp --staleness 2   # full data, recipe
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from rich.console import Console
from rich.table import Table

from experiments import _plot

WORKERS = ["w0", "w1"]
LIMIT, EPOCHS = 12800, 2  # the default run: 100 steps per epoch, the second measured
ARCHS = {"mlp": {"kind": "mlp", "hidden": [512, 256]}, "cnn": {"kind": "cnn", "channels": [32, 64], "dense": 128}}


def _network():
    from dmlsys.wire.sim import SimNetwork

    class CountingNetwork(SimNetwork):
        """Counts the bytes each node sends and receives."""

        def __init__(self) -> None:
            super().__init__(0)
            self.bytes: dict[str, int] = {}

        def _transmit(self, src, dst, frames, route) -> None:
            n = sum(memoryview(f).nbytes if not isinstance(f, (bytes, bytearray)) else len(f) for f in frames)
            self.bytes[src] = self.bytes.get(src, 0) + n
            self.bytes[dst] = self.bytes.get(dst, 0) + n
            super()._transmit(src, dst, frames, route)

    return CountingNetwork()


class Meter:
    """Rank 0's bytes and time over the last epoch."""

    def __init__(self, net, steps: int) -> None:
        self.net, self.steps = net, steps
        self.marks: list[tuple[float, int, float, float]] = []  # (time, bytes, train seconds, process CPU)
        self.cpu0 = time.process_time()

    def on_epoch(self, stats) -> None:
        self.marks.append((time.perf_counter(), self.net.bytes.get("w0", 0), stats.seconds, time.process_time()))

    def result(self, start_bytes: int) -> tuple[float | None, float | None]:
        if not self.marks:
            return None, None
        before = self.marks[-2][1] if len(self.marks) > 1 else start_bytes
        # the last epoch's wall time (training + rank 0's evaluation) per step
        return self.marks[-1][2] / self.steps * 1e3, (self.marks[-1][1] - before) / self.steps

    def cpu_ms(self) -> float | None:
        """The process's CPU time per step over the last epoch (every worker's and shard's work,
        rank 0's evaluation included): less at the mercy of other load than wall time."""
        if not self.marks:
            return None
        before = self.marks[-2][3] if len(self.marks) > 1 else self.cpu0
        return (self.marks[-1][3] - before) / self.steps * 1e3


async def _nodes(net, names, services=lambda name: []):
    from dmlsys.node import Node

    nodes = []
    for name in names:
        node = Node(name, net.transport(name), admin=None)
        for s in services(name):
            node.add_service(s)
        await node.start()
        nodes.append(node)
    return nodes


async def run_allreduce(arch, hp, ds, steps) -> dict[str, Any]:
    from dmlsys.collective.group import CollectiveService, ProcessGroup
    from dmlsys.train.trainer import Trainer

    net = _network()
    nodes = await _nodes(net, WORKERS, lambda n: [CollectiveService()])
    meter = Meter(net, steps)
    try:
        groups = [ProcessGroup(n, WORKERS, name="job", timeout=120.0, shm=False) for n in nodes]
        trainers = [Trainer(arch, hp, group=g, progress=False, on_epoch=meter.on_epoch if r == 0 else None)
                    for r, g in enumerate(groups)]
        results = await asyncio.gather(*(t.fit(ds, resume=False) for t in trainers))
        for g in groups:
            g.close()
    finally:
        for n in nodes:
            await n.stop(drain_timeout=0.1)
    step_ms, bps = meter.result(0)
    return {"step_ms": step_ms, "bytes_per_step": bps, "accuracy": results[0].test_accuracy,
            "cpu_ms_per_step": meter.cpu_ms()}


async def run_ps(arch, hp, ds, steps, shards: int, consistency, slow: str | None = None,
                 on_epoch=None) -> dict[str, Any]:
    from dmlsys.ps.server import PsConfig, PsService
    from dmlsys.ps.trainer import PsTrainer

    net = _network()
    with tempfile.TemporaryDirectory(prefix="dmlsys-psx-") as tmp:
        shard_names = [f"ps{i}" for i in range(shards)]
        nodes = await _nodes(net, shard_names, lambda n: [PsService(PsConfig(str(Path(tmp) / n), fsync=False))])
        nodes += await _nodes(net, WORKERS)
        meter = Meter(net, steps)
        try:
            trainers = [PsTrainer(arch, hp, node=nodes[shards + r], shards=shard_names, workers=WORKERS, job="job",
                                  consistency=consistency, progress=False, offload=True,
                                  on_epoch=_both(meter.on_epoch, on_epoch) if r == 0 else None)
                        for r in range(len(WORKERS))]
            if slow == "w1":
                _slow_down(trainers[1])
            elif slow == "stragglers":
                for rank, trainer in enumerate(trainers):
                    _slow_down(trainer, lambda k, rank=rank: random.Random(k).randrange(len(WORKERS)) == rank)
            results = await asyncio.gather(*(t.fit(ds) for t in trainers))
        finally:
            for n in nodes:
                await n.stop(drain_timeout=0.1)
    step_ms, bps = meter.result(0)
    return {"step_ms": step_ms, "bytes_per_step": bps, "accuracy": results[0].card["test_accuracy"],
            "cpu_ms_per_step": meter.cpu_ms()}


def _both(*fns):
    def call(stats) -> None:
        for fn in fns:
            if fn is not None:
                fn(stats)

    return call


def _slow_down(trainer, when=lambda k: True) -> None:
    """This worker takes twice as long for its k-th gradient when ``when(k)``: it sleeps as long
    as the gradient took."""
    run = trainer._run
    count = itertools.count()

    async def slow(fn, *args):
        t0 = time.perf_counter()
        out = await run(fn, *args)
        if fn == trainer._host_grads and when(next(count)):
            await asyncio.sleep(time.perf_counter() - t0)
        return out

    trainer._run = slow


async def refuse_wide_on_collective(arch: dict, cap: int) -> str:
    """The collective worker's train.run with the cap: the error it answers (or '' if it ran)."""
    from dmlsys.collective.roles import TrainingService, WorkerConfig
    from dmlsys.node import RemoteError

    net = _network()
    with tempfile.TemporaryDirectory(prefix="dmlsys-psx-") as tmp:
        nodes = await _nodes(net, ["w0"], lambda n: [TrainingService(WorkerConfig(store=tmp, memory_cap=cap))])
        nodes += await _nodes(net, ["cli"])  # train.run is for the CLI / supervisor
        try:
            body = {"job": "wide", "members": ["w0"], "model": "wide", "arch": arch, "hyperparams": {}}
            await nodes[1].call("w0", "train", "run", body, timeout=60)
            return ""
        except RemoteError as e:
            return e.message
        finally:
            for n in nodes:
                await n.stop(drain_timeout=0.1)


async def run_wide(ds, rows: int, cap: int, steps: int, batch: int, shards: int) -> dict[str, Any]:
    from dmlsys.ps.client import PsClient
    from dmlsys.ps.clock import BSP
    from dmlsys.ps.server import PsConfig, PsService
    from dmlsys.ps.wide import MemoryCap, WideConfig, WideWorker, specs

    config = WideConfig(rows=rows)
    net = _network()
    with tempfile.TemporaryDirectory(prefix="dmlsys-psx-") as tmp:
        shard_names = [f"ps{i}" for i in range(shards)]
        nodes = await _nodes(net, shard_names, lambda n: [PsService(PsConfig(str(Path(tmp) / n), fsync=False))])
        nodes += await _nodes(net, WORKERS)
        try:
            clients = [PsClient(nodes[shards + r], shard_names, job="wide") for r in range(len(WORKERS))]
            await asyncio.gather(*(c.open({"emb": specs(config)[0], "b": np.zeros(10, np.float32)}, workers=WORKERS,
                                          tables=["emb"], consistency=BSP,
                                          optimizer={"hyperparams": {"optimizer": "adam", "lr": 0.02}})
                                   for c in clients))
            wide = [WideWorker(c, config, MemoryCap(cap)) for c in clients]
            n = len(WORKERS)
            marks = []

            async def work(r):
                for t in range(steps):
                    if r == 0:
                        marks.append((time.perf_counter(), net.bytes.get("w0", 0)))
                    lo, hi = (t * batch + r * batch // n) % len(ds.train_labels), None
                    hi = lo + batch // n
                    await wide[r].step(t, ds.train_images[lo:hi], ds.train_labels[lo:hi])

            await asyncio.gather(*(work(r) for r in range(n)))
            end = (time.perf_counter(), net.bytes.get("w0", 0))
            half = marks[len(marks) // 2]  # the second half: past the first pulls' warm-up
            k = steps - len(marks) // 2
            accuracy = await wide[0].evaluate(steps, ds.test_images, ds.test_labels.astype(np.int64))
            peak = max(w.peak_bytes for w in wide)
        finally:
            for node in nodes:
                await node.stop(drain_timeout=0.1)
    return {"step_ms": (end[0] - half[0]) / k * 1e3, "bytes_per_step": (end[1] - half[1]) / k,
            "accuracy": accuracy, "peak_worker_bytes": peak}


def row(model, via, consistency, shards, result=None, error=None, note=None) -> dict[str, Any]:
    out = {"model": model, "via": via, "consistency": consistency, "workers": len(WORKERS), "shards": shards,
           "step_ms": None, "bytes_per_step": None, "accuracy": None}
    if result:
        out.update(result)
    if error:
        out["error"] = error
    if note:
        out["note"] = note
    return out


async def drive(args: argparse.Namespace, console: Console) -> list[dict]:
    from dmlsys.ps.clock import BSP, ssp
    from dmlsys.train import data
    from dmlsys.train.memory import param_bytes
    from dmlsys.train.trainer import Hyperparams

    ds = data.load(args.data_dir, limit=args.limit, test_limit=args.test_limit)
    hp = Hyperparams(lr=1e-3, batch_size=args.batch_size, epochs=args.epochs)
    steps = args.limit // args.batch_size if args.limit else 60000 // args.batch_size
    archs = ARCHS
    rows: list[dict] = []

    async def add(label, coro, *key):
        console.print(f"[dim]{label}…[/dim]")
        t0 = time.perf_counter()
        rows.append(row(*key, result=await coro))
        console.print(f"[dim]  {label}: {time.perf_counter() - t0:.1f}s[/dim]")

    parts = set(args.parts.split(","))
    for name in args.models.split(",") if "compare" in parts else ():
        arch = archs[name]
        # alternated: collective, then each PS configuration, in one run
        await add(f"{name} allreduce", run_allreduce(arch, hp, ds, steps), name, "allreduce", None, None)
        for shards in (1, 2):
            await add(f"{name} ps {shards} bsp", run_ps(arch, hp, ds, steps, shards, BSP), name, "ps", "bsp", shards)
            await add(f"{name} ps {shards} ssp2", run_ps(arch, hp, ds, steps, shards, ssp(2)), name, "ps", "ssp", shards)
    # shard sweep (MLP, BSP): 1 and 2 are above; 4 here
    if "sweep" in parts:
        await add("mlp ps 4 bsp", run_ps(archs["mlp"], hp, ds, steps, 4, BSP), "mlp", "ps", "bsp", 4)
    # one worker slowed 2x: BSP vs SSP(2)
    for cons, label in ((BSP, "bsp"), (ssp(2), "ssp")) if "slowed" in parts else ():
        await add(f"{args.slow_model} slowed {label}", run_ps(archs[args.slow_model], hp, ds, steps, 2, cons, slow="w1"),
                  f"{args.slow_model} (w1 slowed 2x)", "ps", label, 2)
    # transient stragglers: at each step one worker, drawn at random, is slowed 2x
    for cons, label in ((BSP, "bsp"), (ssp(2), "ssp")) if "stragglers" in parts else ():
        await add(f"{args.slow_model} stragglers {label}",
                  run_ps(archs[args.slow_model], hp, ds, steps, 2, cons, slow="stragglers"),
                  f"{args.slow_model} (a random worker slowed 2x each step)", "ps", label, 2)
    if "wide" not in parts:
        return rows
    # the large model
    wide_arch = {"kind": "wide", "rows": args.wide_rows}
    cap = args.memory_cap
    error = await refuse_wide_on_collective(wide_arch, cap)
    rows.append(row("wide", "allreduce", None, None, error=error or None,
                    note=f"{param_bytes(wide_arch)} parameter bytes, cap {cap}"))
    wide_steps = max(8, steps * args.epochs)
    wide = await run_wide(ds, args.wide_rows, cap, wide_steps, args.batch_size, 2)
    rows.append(row("wide", "ps", "bsp", 2, result=wide))
    return rows


# The collective's accuracy recipes (cluster/ps.toml, docs/training.md), for --accuracy.
RECIPES = {"mlp": ({"kind": "mlp", "hidden": [512, 256]}, {"epochs": 12, "schedule": "cosine"}),
           "cnn": ({"kind": "cnn", "channels": [32, 64], "dense": 128},
                   {"epochs": 6, "schedule": "cosine", "augment": True})}


async def accuracy_run(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    """One model through 2 shards on full data with the collective's recipe: per-epoch test accuracy."""
    from dmlsys.ps.clock import Consistency
    from dmlsys.train import data
    from dmlsys.train.trainer import Hyperparams

    arch, recipe = RECIPES[args.accuracy]
    hp = Hyperparams(lr=1e-3, batch_size=128, **{**recipe, **({"epochs": args.epochs} if args.epochs else {})})
    consistency = Consistency(args.consistency, args.staleness if args.consistency == "ssp" else 0)
    ds = data.load(args.data_dir, limit=args.limit, test_limit=args.test_limit)
    history: list = []

    def on_epoch(stats) -> None:
        history.append(stats.test_accuracy)
        console.print(f"epoch {stats.epoch}/{hp.epochs}: test accuracy {stats.test_accuracy:.4f} ({stats.seconds:.0f}s)")

    t0 = time.perf_counter()
    result = await run_ps(arch, hp, ds, len(ds.train_labels) // hp.batch_size, 2, consistency, on_epoch=on_epoch)
    out = {"model": args.accuracy, "via": "ps", "consistency": consistency.model, "staleness": consistency.bound,
           "workers": len(WORKERS), "shards": 2, "epochs": hp.epochs, "accuracy": result["accuracy"],
           "per_epoch": history, "seconds": round(time.perf_counter() - t0, 1)}
    console.print(out)
    return out


def table(rows: list[dict], console: Console) -> None:
    base = {r["model"]: r["step_ms"] for r in rows if r["via"] == "allreduce" and r["step_ms"]}
    cpu = {r["model"]: r.get("cpu_ms_per_step") for r in rows if r["via"] == "allreduce" and r["step_ms"]}
    t = Table(title="parameter servers vs allreduce, 2 workers (provisional; one process, simulated network)")
    for col in ("model", "via", "consistency", "shards", "step ms", "vs allreduce", "CPU ms/step", "vs allreduce",
                "KiB/step (rank 0)", "accuracy"):
        t.add_column(col, justify="right" if col not in ("model", "via", "consistency") else "left")
    for r in rows:
        b = base.get(r["model"])
        t.add_row(r["model"], r["via"], r["consistency"] or "-", str(r["shards"] or "-"),
                  f"{r['step_ms']:.1f}" if r["step_ms"] else "refused*" if r.get("error") else "-",
                  f"{r['step_ms'] / b:.2f}x" if r["step_ms"] and b and r["via"] == "ps" else "-",
                  *_cpu_cells(r, cpu.get(r["model"]), "x"),
                  f"{r['bytes_per_step'] / 1024:.0f}" if r["bytes_per_step"] else "-",
                  f"{r['accuracy']:.4f}" if r["accuracy"] is not None else "-")
    console.print(t)
    for r in rows:
        if r.get("error"):
            console.print(f"* {r['model']} via {r['via']}: {r['error']}")
    for what, tag in (("one worker slowed 2x", "(w1 slowed"), ("stragglers", "(a random worker")):
        slowed = {r["consistency"]: r["step_ms"] for r in rows if tag in r["model"] and r["step_ms"]}
        if {"bsp", "ssp"} <= set(slowed):
            console.print(f"{what}: SSP(2) step {slowed['ssp']:.1f} ms vs BSP {slowed['bsp']:.1f} ms "
                          f"({slowed['bsp'] / slowed['ssp']:.2f}x)")


def _cpu_cells(r: dict, base: float | None, times: str) -> list[str]:
    c = r.get("cpu_ms_per_step")
    return [f"{c:.1f}" if c else "-", f"{c / base:.2f}{times}" if c and base and r["via"] == "ps" else "-"]


def markdown(rows: list[dict]) -> str:
    base = {r["model"]: r["step_ms"] for r in rows if r["via"] == "allreduce" and r["step_ms"]}
    cpu = {r["model"]: r.get("cpu_ms_per_step") for r in rows if r["via"] == "allreduce" and r["step_ms"]}
    lines = [("| model | via | consistency | shards | step ms | vs allreduce | CPU ms/step | vs allreduce "
             "| KiB/step (rank 0) | accuracy |"),
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        b = base.get(r["model"])
        lines.append("| " + " | ".join([
            r["model"], r["via"], r["consistency"] or "-", str(r["shards"] or "-"),
            f"{r['step_ms']:.1f}" if r["step_ms"] else "refused" if r.get("error") else "-",
            f"{r['step_ms'] / b:.2f}×" if r["step_ms"] and b and r["via"] == "ps" else "-",
            *_cpu_cells(r, cpu.get(r["model"]), "×"),
            f"{r['bytes_per_step'] / 1024:.0f}" if r["bytes_per_step"] else "-",
            f"{r['accuracy']:.4f}" if r["accuracy"] is not None else "-"]) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few steps on small data (a few minutes)")
    parser.add_argument("--models", default="mlp,cnn", help="comma-separated: mlp, cnn (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=None,
                        help=f"epochs per run; the last is measured (default {EPOCHS}; --quick 2)")
    parser.add_argument("--batch-size", type=int, default=128, help="global batch, split among the workers")
    parser.add_argument("--limit", type=int, default=None,
                        help=f"train on the first samples only (default {LIMIT}: {LIMIT // 128} steps per epoch at "
                             f"batch 128, so that the whole run takes about 10 minutes on 2 quiet cores; 0: all 60000)")
    parser.add_argument("--parts", default="compare,sweep,slowed,stragglers,wide",
                        help="which parts to run (default: %(default)s)")
    parser.add_argument("--test-limit", type=int, default=None, help="test on the first samples only")
    parser.add_argument("--slow-model", choices=("mlp", "cnn"), default="cnn",
                        help="model of the slowed-worker runs (default: %(default)s, where compute dominates a step)")
    parser.add_argument("--wide-rows", type=int, default=1 << 22, help="hash buckets of the wide model's table")
    parser.add_argument("--memory-cap", type=int, default=64 << 20, help="per-worker parameter bytes (default 64 MiB)")
    parser.add_argument("--data-dir", default=None, help="Fashion-MNIST directory (default: the usual places)")
    parser.add_argument("--json", help="write the rows to this file")
    parser.add_argument("--plot", help="figure path (default: the --json path with .png)")
    parser.add_argument("--from-json", help="re-plot and re-print an earlier run's rows; measure nothing")
    parser.add_argument("--markdown", action="store_true", help="also print the table as markdown")
    parser.add_argument("--accuracy", choices=sorted(RECIPES),
                        help="instead of the comparison: this model through 2 shards on the full data with the "
                             "collective's recipe (mlp 12 epochs, cnn 6 with flips; --epochs overrides), "
                             "per-epoch test accuracy")
    parser.add_argument("--consistency", choices=("bsp", "ssp", "asp"), default="ssp", help="for --accuracy")
    parser.add_argument("--staleness", type=int, default=2, help="for --accuracy with ssp (default: %(default)s)")
    args = parser.parse_args()
    if args.accuracy:
        out = asyncio.run(accuracy_run(args, Console()))
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
        return
    args.epochs = args.epochs or EPOCHS
    if args.limit is None and not args.quick:
        args.limit = LIMIT
    args.limit = args.limit or None
    if args.quick:
        args.limit = args.limit or 1024
        args.test_limit = args.test_limit or 500
        args.epochs = 2
    console = Console()
    if args.from_json:
        rows = json.loads(Path(args.from_json).read_text())
    else:
        rows = asyncio.run(drive(args, console))
    table(rows, console)
    if args.markdown:
        print(markdown(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    path = _plot.plot_path(args.plot, args.json, args.from_json)
    if path:
        _plot.ps_vs_allreduce(rows, path)


if __name__ == "__main__":
    main()
