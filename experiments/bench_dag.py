#!/usr/bin/env python
"""Scheduling overhead per step of the dmlsys workflow scheduler vs Dask and a bare-asyncio floor.

No-op steps, three DAG shapes (deterministic, seed 0):
  chain    1,000 steps, each depending on the previous one;
  fan      1 -> 10,000 -> 1 (10,002 steps): a root, 10,000 steps on it, a sink on all of them;
  layered  10,000 steps in 100 layers of 100, each depending on 3 random steps of the layer before.

Runners, each measured in a fresh subprocess of its own (other benchmarks sharing a process
inflate the asyncio numbers several-fold), warm-up run first, then --reps timed runs:
  ours         dmlsys.workflow Scheduler.run on inline steps (the fast path for cheap sync work);
               timed: validation + scheduling + running (building the Step objects is not timed)
  ours-thread  the same steps without inline=True: each runs in the scheduler's thread pool
  dask         dask.compute(..., scheduler="threads") on Delayed objects over one low-level dict
               graph (timed: dask.compute alone = optimisation + scheduling + running), as in
               the anchor measurement
  asyncio      the floor: one asyncio.Task per step awaiting its dependencies' Tasks

µs per step = wall time / number of steps; the table gives the median over reps and the
ratios ours/dask and ours/asyncio. Target: ours <= 0.5x dask on every shape.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNNERS = ("ours", "ours-thread", "dask", "asyncio")


def noop(*args):
    return None


# ----------------------------------------------------------------------------- DAGs
def dag_chain(n: int = 1000) -> list[tuple[int, ...]]:
    return [()] + [(i - 1,) for i in range(1, n)]


def dag_fan(width: int = 10_000) -> list[tuple[int, ...]]:
    return [()] + [(0,)] * width + [tuple(range(1, width + 1))]


def dag_layered(n: int = 10_000, width: int = 100, k: int = 3, seed: int = 0) -> list[tuple[int, ...]]:
    rng = random.Random(seed)
    return [() if i < width else tuple(rng.sample(range((i // width - 1) * width, (i // width) * width), k))
            for i in range(n)]


SHAPES = {"chain": ("chain 1,000", dag_chain), "fan": ("fan 1→10,000→1", dag_fan),
          "layered": ("layered 10,000 (~3 deps)", dag_layered)}


def sinks_of(dag) -> list[int]:
    used = {j for ds in dag for j in ds}
    return [i for i in range(len(dag)) if i not in used]


# ----------------------------------------------------------------------------- runners (child side)
def make_ours(dag, inline: bool):
    sys.path.insert(0, str(ROOT))
    from dmlsys.workflow import RunConfig, Scheduler, Step, Workflow

    names = [f"s{i}" for i in range(len(dag))]
    steps = [Step(names[i], noop, [names[j] for j in ds], inline=inline) for i, ds in enumerate(dag)]
    sched = Scheduler(RunConfig(progress=False, concurrency=8))

    def once() -> float:
        wf = Workflow("bench", steps)
        with asyncio.Runner() as r:
            t0 = time.perf_counter()
            r.run(sched.run(wf))
            return time.perf_counter() - t0

    return once


def make_dask(dag):
    import dask
    from dask.delayed import Delayed
    from dask.highlevelgraph import HighLevelGraph

    counter = [0]

    def once() -> float:
        counter[0] += 1
        prefix = f"bench{counter[0]}"
        keys = [f"{prefix}-{i}" for i in range(len(dag))]
        dsk = {keys[i]: (noop, *[keys[j] for j in ds]) for i, ds in enumerate(dag)}
        hlg = HighLevelGraph.from_collections(prefix, dsk, dependencies=())
        objs = [Delayed(keys[i], hlg, layer=prefix) for i in sinks_of(dag)]
        t0 = time.perf_counter()
        dask.compute(*objs, scheduler="threads")
        return time.perf_counter() - t0

    return once


def make_asyncio(dag):
    sinks = sinks_of(dag)

    async def main() -> None:
        tasks: list[asyncio.Task] = []

        async def step(deps):
            return noop(*[await d for d in deps])

        for ds in dag:
            tasks.append(asyncio.ensure_future(step([tasks[j] for j in ds])))
        for i in sinks:
            await tasks[i]

    def once() -> float:
        with asyncio.Runner() as r:
            t0 = time.perf_counter()
            r.run(main())
            return time.perf_counter() - t0

    return once


def child(runner: str, shape: str, reps: int) -> None:
    dag = SHAPES[shape][1]()
    once = {"ours": lambda: make_ours(dag, True), "ours-thread": lambda: make_ours(dag, False),
            "dask": lambda: make_dask(dag), "asyncio": lambda: make_asyncio(dag)}[runner]()
    once()  # warm-up: imports, caches, thread pools
    times = [once() for _ in range(reps)]
    json.dump({"us_per_step": [t / len(dag) * 1e6 for t in times], "steps": len(dag)}, sys.stdout)


# ----------------------------------------------------------------------------- parent
def measure(runner: str, shape: str, reps: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", runner, shape, "--reps", str(reps)],
                         capture_output=True, text=True, cwd=ROOT, timeout=900)
    if out.returncode != 0:
        raise SystemExit(f"{runner} on {shape} failed:\n{out.stderr}")
    return json.loads(out.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5, help="timed runs per runner and shape (default 5)")
    ap.add_argument("--shapes", default="chain,fan,layered", help="comma-separated shapes (default all)")
    ap.add_argument("--runners", default=",".join(RUNNERS), help=f"comma-separated subset of {','.join(RUNNERS)}")
    ap.add_argument("--json", metavar="FILE", help="write the rows as a JSON list to FILE")
    ap.add_argument("--plot", metavar="PNG", help="bar chart of µs per step (default: the --json path with .png)")
    ap.add_argument("--from-json", metavar="FILE", help="only plot the rows an earlier --json wrote")
    ap.add_argument("--child", nargs=2, metavar=("RUNNER", "SHAPE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child[0], args.child[1], args.reps)
    import _plot  # experiments/_plot.py: matplotlib is imported only when a figure is drawn

    if args.from_json:
        return _plot.bench_dag(_plot.load_json(args.from_json), _plot.plot_path(args.plot, args.from_json))

    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    shapes = [s for s in args.shapes.split(",") if s]
    runners = [r for r in args.runners.split(",") if r]
    for s in shapes:
        if s not in SHAPES:
            ap.error(f"unknown shape {s!r}; choose from {', '.join(SHAPES)}")
    for r in runners:
        if r not in RUNNERS:
            ap.error(f"unknown runner {r!r}; choose from {', '.join(RUNNERS)}")
    console = Console(stderr=True)
    med: dict[tuple[str, str], float] = {}
    spread: dict[tuple[str, str], tuple[float, float]] = {}
    with Progress(console=console, transient=True) as progress:
        bar = progress.add_task("measuring", total=len(shapes) * len(runners))
        for s in shapes:
            for r in runners:
                progress.update(bar, description=f"{r} on {s}")
                res = measure(r, s, args.reps)
                med[(r, s)] = statistics.median(res["us_per_step"])
                spread[(r, s)] = (min(res["us_per_step"]), max(res["us_per_step"]))
                progress.advance(bar)

    def cell(r: str, s: str) -> float | None:
        return med.get((r, s))

    rows = []
    for s in shapes:
        ours, dask_, floor, thr = cell("ours", s), cell("dask", s), cell("asyncio", s), cell("ours-thread", s)
        rows.append({
            "shape": SHAPES[s][0], "ours_us_per_step": ours, "ours_thread_us_per_step": thr,
            "dask_us_per_step": dask_, "asyncio_us_per_step": floor,
            "ours_over_dask": ours / dask_ if ours and dask_ else None,
            "ours_thread_over_dask": thr / dask_ if thr and dask_ else None,
            "ours_over_asyncio": ours / floor if ours and floor else None,
            "reps": args.reps,
            "spread": {r: spread[(r, s)] for r in runners},
        })

    def f(x: float | None, unit: str = "") -> str:
        return "—" if x is None else f"{x:.1f}{unit}" if x >= 10 else f"{x:.2f}{unit}"

    t = Table(title=f"µs per step, median of {args.reps} runs, each runner in a fresh process")
    headers = ["shape", "ours", "ours-thread", "dask threaded", "asyncio floor", "ours/dask", "ours-thread/dask",
               "ours/asyncio"]
    for h in headers:
        t.add_column(h, justify="left" if h == "shape" else "right")
    table_rows = [[row["shape"], f(row["ours_us_per_step"]), f(row["ours_thread_us_per_step"]),
                   f(row["dask_us_per_step"]), f(row["asyncio_us_per_step"]), f(row["ours_over_dask"], "×"),
                   f(row["ours_thread_over_dask"], "×"), f(row["ours_over_asyncio"], "×")] for row in rows]
    for tr in table_rows:
        t.add_row(*tr)
    Console().print(t)
    try:
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "n/a"
    print(f"\nmachine: nproc={os.cpu_count()} loadavg={load} python={platform.python_version()}\n")
    print("| " + " | ".join(headers) + " |\n|" + "---|" * len(headers))
    for tr in table_rows:
        print("| " + " | ".join(tr) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
        print(f"\nrows written to {args.json}")
    if out := _plot.plot_path(args.plot, args.json):
        _plot.bench_dag(rows, out)


if __name__ == "__main__":
    main()
