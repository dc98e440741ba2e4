"""``python -m dmlsys.pipeline [options]`` (also ``python -m dmlsys.cluster pipeline``): run the
end-to-end pipeline (see app.py) and print its tables."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Sequence

from dmlsys.workflow import DEFAULT_ROOT


def build_parser(prog: str = "python -m dmlsys.pipeline") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog=prog,
        description="The end-to-end pipeline: ingest Fashion-MNIST, train three models at once, serve the first at "
                    "once and the best two as the others finish (replica + gateway nodes on ZeroMQ), and ensemble "
                    "their predictions on the test set. Memoized: a rerun skips what has not changed.")
    add_pipeline_arguments(ap)
    return ap


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def add_pipeline_arguments(ap: argparse.ArgumentParser) -> None:
    """The pipeline's options, for any parser that runs it (this CLI, the cluster CLI)."""
    ap.add_argument("--limit", type=_positive, help="train on the first N images (default: all 60,000); "
                                                    "also tests on the first N//4 unless --test-limit")
    ap.add_argument("--test-limit", type=_positive, help="test on the first M images (default: all 10,000)")
    ap.add_argument("--epochs", type=_positive, default=2, help="epochs per model (default 2)")
    ap.add_argument("--store", default=os.environ.get("DMLSYS_STORE") or ".dmlsys/models",
                    help="model store directory (default $DMLSYS_STORE or .dmlsys/models)")
    ap.add_argument("--cache-root", default=str(DEFAULT_ROOT), help=f"memo store directory (default {DEFAULT_ROOT})")
    ap.add_argument("--concurrency", type=_positive, default=4,
                    help="steps running at once (default 4: three trainings and serve)")
    ap.add_argument("--top", type=_positive, default=2, help="models to serve and ensemble (default 2)")
    ap.add_argument("--serve", choices=("nodes", "local"), default="nodes",
                    help="nodes: replica + gateway nodes on ZeroMQ (default); local: in-process fallback")
    ap.add_argument("--replicas", type=_positive, default=1, help="replica nodes per served model (default 1)")
    ap.add_argument("--trainer", choices=("threads", "workers"), default="threads",
                    help="threads: each model trains in a thread of this process (default); workers: the "
                         "collective trainer, data-parallel over --workers worker nodes per model")
    ap.add_argument("--workers", type=_positive, default=2, help="with --trainer workers: ranks per model (default 2)")
    ap.add_argument("--hp", action="append", default=[], metavar="MODEL.KEY=VALUE",
                    help="change one model's hyperparameter or arch field, e.g. cnn.lr=0.002 or "
                         "mlp_small.hidden=[64] (repeatable); models: mlp_small, mlp_wide, cnn")
    ap.add_argument("--data-dir", help="Fashion-MNIST directory (default: $DMLSYS_DATA, then the Debian package)")
    ap.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                    help="live table of the steps (default: when stdout is a terminal)")
    ap.add_argument("--json", metavar="FILE", help="write the result (steps, models, timeline, ensemble) as JSON")


def pipeline_config(args: argparse.Namespace):  # -> PipelineConfig
    """A PipelineConfig from parsed ``add_pipeline_arguments`` options. Raises PipelineError."""
    from .app import DEFAULT_MODELS, PipelineConfig, apply_overrides

    test_limit = args.test_limit
    if test_limit is None and args.limit is not None:
        test_limit = max(1, args.limit // 4)
    return PipelineConfig(models=apply_overrides(DEFAULT_MODELS, args.hp), limit=args.limit, test_limit=test_limit,
                          epochs=args.epochs, top=args.top, data_dir=args.data_dir, store=args.store,
                          cache_root=args.cache_root, concurrency=args.concurrency, serve=args.serve,
                          replicas=args.replicas, progress=args.progress, trainer=args.trainer,
                          workers=args.workers)


def pipeline_command(args: argparse.Namespace) -> int:
    """Run the pipeline, print its tables, write --json. 0 on success, 1 on failure."""
    from rich.console import Console

    from dmlsys.workflow import WorkflowError, WorkflowFailed

    from .app import run_pipeline

    console = Console()
    try:
        config = pipeline_config(args)
        result = run_pipeline(config)
    except WorkflowFailed as e:
        if not (args.progress or (args.progress is None and console.is_terminal)):
            console.print(e.result.report.table())
        console.print(f"[red]pipeline failed: {e}[/]")
        return 1
    except WorkflowError as e:  # PipelineError, ServeError, InvalidWorkflow...
        console.print(f"[red]pipeline: {e}[/]")
        return 1
    if not (args.progress or (args.progress is None and console.is_terminal)):
        console.print(result.report.table())  # the live view already left it on screen otherwise
    console.print(result.table())
    for ev in result.timeline:
        console.print(f"  t={ev['t']:6.2f}s  trained {', '.join(ev['arrived'])}  ->  serving {', '.join(ev['serving'])}")
    http = result.ensemble.get("http")
    if http:
        console.print(f"  front door {http['url']}: {http['same_classes']}/{http['instances']} HTTP answers "
                      "match the balancer's")
    console.print(f"  ran: {', '.join(result.ran())}; cache hits: {', '.join(result.hits()) or '-'}")
    if args.json:
        doc = {"config": dataclasses.asdict(config), **result.to_dict()}
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2, default=str)
        console.print(f"  wrote {args.json}")
    return 0


def main(argv: Sequence[str] | None = None, prog: str = "python -m dmlsys.pipeline") -> int:
    return pipeline_command(build_parser(prog).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
