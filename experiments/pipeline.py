"""The end-to-end pipeline cold, memoized, and with one model's hyperparameters changed.

Three runs of ``dmlsys.pipeline`` against one fresh memo store and model store:

1. **cold**     — empty cache: ingest, three trainings, serve, aggregate all run;
2. **memoized** — same config: ingest and every training are cache hits; serve + aggregate run
                  (serving is the point of a run, so it is never memoized);
3. **changed**  — one model's hyperparameter changed (``--change``, default
                  ``mlp_small.lr=0.003``): that training reruns, the others stay cached.

It prints a table (run, wall time, ratio to the cold run, steps that ran, cache hits, ensemble
accuracy, when the first model was served vs when the slowest training ended) and writes the
rows with ``--json FILE``.

    python experiments/pipeline.py                          # 10,000 train / 2,500 test, 1 epoch
    python experiments/pipeline.py --limit 60000 --epochs 2 --json /tmp/pipeline.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from dmlsys.pipeline import DEFAULT_MODELS, PipelineConfig, apply_overrides, run_pipeline  # noqa: E402


def row(run: str, r, cold_wall: float | None) -> dict:
    trains = {n: rec.end for n, rec in r.report.records.items() if n.startswith("train_")}
    slowest = max(trains, key=lambda n: trains[n])
    return {
        "run": run, "wall_s": round(r.wall, 2),
        "vs_cold": round(r.wall / cold_wall, 3) if cold_wall else 1.0,
        "ran": r.ran(), "hits": r.hits(),
        "serve_runs": r.report["serve"].runs,
        "first_served_s": round(r.timeline[0]["t"], 2), "first_served": r.timeline[0]["serving"],
        "slowest_train": slowest, "slowest_train_end_s": round(trains[slowest], 2),
        "models": {n: {"accuracy": round(m["test_accuracy"], 4), "version": m["version"], "train": m["train"]}
                   for n, m in r.models.items()},
        "served": [s["name"] for s in r.serving],
        "ensemble_accuracy": round(r.ensemble["ensemble_accuracy"], 4),
        "served_accuracy": {n: round(a, 4) for n, a in r.ensemble["accuracy"].items()},
        # for the Gantt figure: each step's span on the run clock, and when each serve run finished
        "steps": [{"name": n, "start": rec.start, "end": rec.end, "state": rec.state, "cache": rec.cache,
                   "runs": rec.runs} for n, rec in r.report.records.items()],
        "timeline": [{"t": ev["t"], "serving": ev["serving"]} for ev in r.timeline],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--limit", type=int, default=10_000, help="training images (default 10,000; 60000 = all)")
    p.add_argument("--test-limit", type=int, help="test images (default: limit // 4, at most 10,000)")
    p.add_argument("--epochs", type=int, default=1, help="epochs per model (default 1)")
    p.add_argument("--change", default="mlp_small.lr=0.003", help="the override of run 3 (MODEL.KEY=VALUE)")
    p.add_argument("--serve", choices=("nodes", "local"), default="nodes", help="serving fleet (default nodes)")
    p.add_argument("--concurrency", type=int, default=4, help="steps at once (default 4)")
    p.add_argument("--trainer", choices=("threads", "workers"), default="threads",
                   help="threads (default) or the collective trainer on worker nodes (--workers per model)")
    p.add_argument("--workers", type=int, default=2, help="with --trainer workers: ranks per model (default 2)")
    p.add_argument("--workdir", help="keep cache and store here (default: a temporary directory, removed)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="live table of the steps (default: when stdout is a terminal)")
    p.add_argument("--json", metavar="FILE", help="write the rows as a JSON list")
    p.add_argument("--plot", metavar="PNG", help="Gantt chart of the steps per run (default: the --json path, .png)")
    p.add_argument("--from-json", metavar="FILE", help="only plot the rows an earlier --json wrote (no runs)")
    args = p.parse_args(argv)
    import _plot  # experiments/_plot.py: matplotlib is imported only when a figure is drawn

    if args.from_json:
        _plot.pipeline(_plot.load_json(args.from_json), _plot.plot_path(args.plot, args.from_json))
        return 0
    console = Console(width=max(Console().width, 130))

    with tempfile.TemporaryDirectory(prefix="dmlsys-pipeline-") as tmp:
        work = Path(args.workdir or tmp)
        base = PipelineConfig(limit=args.limit, test_limit=args.test_limit or min(10_000, max(1, args.limit // 4)),
                              epochs=args.epochs, store=str(work / "models"), cache_root=str(work / "cache"),
                              concurrency=args.concurrency, serve=args.serve, progress=args.progress,
                              trainer=args.trainer, workers=args.workers)
        if args.workdir and (work / "cache").exists():
            console.print(f"[yellow]{work / 'cache'} exists: the 'cold' run will not be cold[/]")
        changed = dataclasses.replace(base, models=apply_overrides(DEFAULT_MODELS, [args.change]))
        rows = []
        for run, config in (("cold", base), ("memoized", base), (f"changed {args.change}", changed)):
            console.rule(run)
            r = run_pipeline(config)
            rows.append(row(run, r, rows[0]["wall_s"] if rows else None))

    table = Table(title=f"pipeline: {base.limit} train / {base.test_limit} test images, {base.epochs} epoch(s), "
                        f"serve={base.serve}")
    for col in ("run", "wall", "vs cold", "ran", "cache hits", "first served", "slowest training ends",
                "ensemble acc"):
        table.add_column(col, justify="right" if col in ("wall", "vs cold", "ensemble acc") else "left")
    def short(steps: list[str]) -> str:  # train_cnn -> cnn: the table must fit a terminal
        return ", ".join(s.removeprefix("train_") for s in steps) or "-"

    for x in rows:
        table.add_row(x["run"], f"{x['wall_s']:.1f}s", f"{x['vs_cold']:.2f}×", short(x["ran"]), short(x["hits"]),
                      f"{x['first_served_s']:.1f}s {short(x['first_served'])}",
                      f"{x['slowest_train_end_s']:.1f}s {short([x['slowest_train']])}", f"{x['ensemble_accuracy']:.4f}")
    console.print(table)
    last = rows[-1]
    console.print("models: " + "; ".join(f"{n} {m['accuracy']:.4f} v{m['version']}" for n, m in last["models"].items())
                  + f"; served {', '.join(last['served'])}")
    console.print(f"[dim]{platform.python_version()} on {platform.machine()}, {time.strftime('%Y-%m-%d %H:%M')}[/]")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
        console.print(f"wrote {args.json}")
    if out := _plot.plot_path(args.plot, args.json):
        _plot.pipeline(rows, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
