#!/usr/bin/env python
"""Scheduling overhead per step of the dmlsys workflow scheduler vs Dask and a bare-asyncio floor.

No-op steps, three DAG shapes (deterministic, seed 0):
  chain    1,000 steps, each depending on the previous one;
  fan      1 -> 10,000 -> 1 (10,002 steps): a root, 10,000 steps on it, a sink on all of them;
  layered  10,000 steps in 100 layers of 100, each depending on 3 random steps of the layer before.
Each shape twice: every step the same function, and every step a distinct function (its own
code object and signature, made anew before every timed run: nothing a scheduler memoizes per
function, within a run or across runs, can be reused).

Like with like, two pairs:
  inline-vs-sync       ours-inline   dmlsys Scheduler.run, steps inline=True (run on the event loop)
                       dask-sync     dask.compute(..., scheduler="sync") (run in the calling thread)
  threads-vs-threads   ours-threads  dmlsys Scheduler.run, plain sync steps in its thread pool
                       dask-threads  dask.compute(..., scheduler="threads")
  asyncio              the floor: one asyncio.Task per step awaiting its dependencies' Tasks
Timed: ours = validation + scheduling + running (building the functions and the Step objects
is not timed); dask = dask.compute alone on Delayed objects over one low-level dict graph
(optimisation + scheduling + running), as in the anchor measurement (shared/anchors/dag).

Before/after in one run: ``--baseline DIR`` adds runners base-inline and base-threads, ours on
the dmlsys tree under DIR (e.g. ``git archive <commit> dmlsys | tar -x -C DIR``), alternated
with the others; their rows carry ``"code": "baseline"`` (the others ``"current"``).

Every repetition runs every runner once, in a fresh subprocess each (other benchmarks sharing
a process inflate the asyncio numbers several-fold), alternating the runners' order from one
repetition to the next, each after a warm-up run. µs per step = wall time / number of steps;
the table gives the median over repetitions and ours/dask per pair. Target: ours <= 0.5x dask
in both pairs on every shape.
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
RUNNERS = ("ours-inline", "dask-sync", "ours-threads", "dask-threads", "asyncio")
BASE_RUNNERS = ("base-inline", "base-threads")  # ours on the --baseline tree
PAIRS = {"inline-vs-sync": ("ours-inline", "dask-sync"), "threads-vs-threads": ("ours-threads", "dask-threads")}
BASE_PAIRS = {"inline-vs-sync": ("base-inline", "dask-sync"), "threads-vs-threads": ("base-threads", "dask-threads")}


def noop(*args):
    return None


def step_functions(n: int, distinct: bool) -> list:
    """``n`` no-op functions: the same one n times, or n distinct ones (own code, own name)."""
    if not distinct:
        return [noop] * n
    namespace: dict = {}
    exec("\n".join(f"def noop_{i}(*args):\n    return None" for i in range(n)), namespace)
    return [namespace[f"noop_{i}"] for i in range(n)]


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
def make_ours(dag, functions, inline: bool):
    """``functions()`` gives the step functions for one run (the same list, or fresh ones)."""
    sys.path.insert(0, os.environ.get("BENCH_DAG_DMLSYS_ROOT", str(ROOT)))
    from dmlsys.workflow import RunConfig, Scheduler, Step, Workflow

    names = [f"s{i}" for i in range(len(dag))]
    sched = Scheduler(RunConfig(progress=False, concurrency=8))

    def once() -> float:
        fns = functions()
        wf = Workflow("bench", [Step(names[i], fns[i], [names[j] for j in ds], inline=inline)
                                for i, ds in enumerate(dag)])
        with asyncio.Runner() as r:
            t0 = time.perf_counter()
            r.run(sched.run(wf))
            return time.perf_counter() - t0

    return once


def make_dask(dag, functions, scheduler: str):
    import dask
    from dask.delayed import Delayed
    from dask.highlevelgraph import HighLevelGraph

    counter = [0]

    def once() -> float:
        counter[0] += 1
        prefix = f"bench{counter[0]}"
        fns = functions()
        keys = [f"{prefix}-{i}" for i in range(len(dag))]
        dsk = {keys[i]: (fns[i], *[keys[j] for j in ds]) for i, ds in enumerate(dag)}
        hlg = HighLevelGraph.from_collections(prefix, dsk, dependencies=())
        objs = [Delayed(keys[i], hlg, layer=prefix) for i in sinks_of(dag)]
        t0 = time.perf_counter()
        dask.compute(*objs, scheduler=scheduler)
        return time.perf_counter() - t0

    return once


def make_asyncio(dag, functions):
    sinks = sinks_of(dag)

    async def main(fns) -> None:
        tasks: list[asyncio.Task] = []

        async def step(fn, deps):
            return fn(*[await d for d in deps])

        for i, ds in enumerate(dag):
            tasks.append(asyncio.ensure_future(step(fns[i], [tasks[j] for j in ds])))
        for i in sinks:
            await tasks[i]

    def once() -> float:
        fns = functions()
        with asyncio.Runner() as r:
            t0 = time.perf_counter()
            r.run(main(fns))
            return time.perf_counter() - t0

    return once


def child(runner: str, shape: str, reps: int, distinct: bool) -> None:
    dag = SHAPES[shape][1]()
    shared = step_functions(len(dag), False)
    fns = (lambda: step_functions(len(dag), True)) if distinct else (lambda: shared)
    once = {"ours-inline": lambda: make_ours(dag, fns, True), "ours-threads": lambda: make_ours(dag, fns, False),
            "dask-sync": lambda: make_dask(dag, fns, "sync"), "dask-threads": lambda: make_dask(dag, fns, "threads"),
            "asyncio": lambda: make_asyncio(dag, fns)}[runner]()
    once()  # warm-up: imports, caches, thread pools
    times = [once() for _ in range(reps)]
    json.dump({"us_per_step": [t / len(dag) * 1e6 for t in times], "steps": len(dag)}, sys.stdout)


# ----------------------------------------------------------------------------- parent
def measure(runner: str, shape: str, distinct: bool, reps: int = 1, baseline: str | None = None) -> list[float]:
    env = dict(os.environ)
    if runner in BASE_RUNNERS:
        env["BENCH_DAG_DMLSYS_ROOT"] = str(baseline)
        runner = runner.replace("base-", "ours-")
    cmd = [sys.executable, __file__, "--child", runner, shape, "--reps", str(reps)] + (["--distinct"] if distinct else [])
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900, env=env)
    if out.returncode != 0:
        raise SystemExit(f"{runner} on {shape} failed:\n{out.stderr}")
    return json.loads(out.stdout)["us_per_step"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5, help="repetitions; each runs every runner once (default 5)")
    ap.add_argument("--shapes", default="chain,fan,layered", help="comma-separated shapes (default all)")
    ap.add_argument("--runners", default=",".join(RUNNERS), help=f"comma-separated subset of {','.join(RUNNERS)}")
    ap.add_argument("--functions", choices=("shared", "distinct", "both"), default="both",
                    help="every step the same function, each its own, or both (default)")
    ap.add_argument("--baseline", metavar="DIR", help="also run ours on the dmlsys tree under DIR (before/after)")
    ap.add_argument("--json", metavar="FILE", help="write the rows as a JSON list to FILE")
    ap.add_argument("--plot", metavar="PNG", help="bar chart of µs per step (default: the --json path with .png)")
    ap.add_argument("--from-json", metavar="FILE", help="only plot the rows an earlier --json wrote")
    ap.add_argument("--child", nargs=2, metavar=("RUNNER", "SHAPE"), help=argparse.SUPPRESS)
    ap.add_argument("--distinct", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child[0], args.child[1], args.reps, args.distinct)
    import _plot  # experiments/_plot.py: matplotlib is imported only when a figure is drawn

    if args.from_json:
        rows = [r for r in _plot.load_json(args.from_json) if r.get("code", "current") == "current"]
        return _plot.bench_dag(rows, _plot.plot_path(args.plot, args.from_json))

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
    if args.baseline:
        if not (Path(args.baseline) / "dmlsys" / "workflow").is_dir():
            ap.error(f"--baseline {args.baseline}: no dmlsys/workflow under it")
        runners += [b for b, o in zip(BASE_RUNNERS, ("ours-inline", "ours-threads")) if o in runners]
    kinds = {"shared": [False], "distinct": [True], "both": [False, True]}[args.functions]
    console = Console(stderr=True)
    samples: dict[tuple[str, str, bool], list[float]] = {}
    cases = [(s, d) for s in shapes for d in kinds]
    with Progress(console=console, transient=True) as progress:
        bar = progress.add_task("measuring", total=len(cases) * len(runners) * args.reps)
        for rep in range(args.reps):
            order = runners if rep % 2 == 0 else runners[::-1]  # alternate who goes first
            for s, d in cases:
                for r in order:
                    progress.update(bar, description=f"rep {rep + 1}: {r} on {s}{' (distinct)' if d else ''}")
                    samples.setdefault((r, s, d), []).extend(measure(r, s, d, baseline=args.baseline))
                    progress.advance(bar)

    def med(r: str, s: str, d: bool) -> float | None:
        xs = samples.get((r, s, d))
        return statistics.median(xs) if xs else None

    rows = []
    pairs = [("current", p, o, k) for p, (o, k) in PAIRS.items()]
    if args.baseline:
        pairs += [("baseline", p, o, k) for p, (o, k) in BASE_PAIRS.items()]
    for s, d in cases:
        for code, pair, ours_r, dask_r in pairs:
            ours, dask_ = med(ours_r, s, d), med(dask_r, s, d)
            if (ours is None and dask_ is None) or (code == "baseline" and ours is None):
                continue
            rows.append({
                "shape": SHAPES[s][0], "pair": pair, "distinct_functions": d, "code": code,
                "ours": ours_r, "peer": dask_r, "ours_us_per_step": ours, "dask_us_per_step": dask_,
                "ours_over_dask": ours / dask_ if ours and dask_ else None,
                "asyncio_us_per_step": med("asyncio", s, d), "reps": args.reps,
                "spread": {k: (min(samples[(k, s, d)]), max(samples[(k, s, d)]))
                           for k in (ours_r, dask_r) if (k, s, d) in samples},
            })

    def f(x: float | None, unit: str = "") -> str:
        return "—" if x is None else f"{x:.1f}{unit}" if x >= 10 else f"{x:.2f}{unit}"

    t = Table(title=f"µs per no-op step, median of {args.reps} alternated repetitions, each run in a fresh process")
    headers = ["shape", "functions", "pair", "code", "ours", "dask", "ours/dask", "asyncio floor"]
    for h in headers:
        t.add_column(h, justify="left" if h in ("shape", "functions", "pair", "code") else "right")
    table_rows = [[row["shape"], "distinct" if row["distinct_functions"] else "shared", row["pair"], row["code"],
                   f(row["ours_us_per_step"]), f(row["dask_us_per_step"]), f(row["ours_over_dask"], "×"),
                   f(row["asyncio_us_per_step"])] for row in rows]
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
        _plot.bench_dag([r for r in rows if r["code"] == "current"], out)


if __name__ == "__main__":
    main()
