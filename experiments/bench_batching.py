"""Measure the caching pattern: the first epoch prepares batches, later epochs are served from memory.

For each configuration (batch size, flatten, augmentation) the script times, over the full
60,000-image training set and with a consumer that only touches each batch:

* ``epoch 1``: per-batch preparation (gather the shard's uint8 pixels, scale to float32,
  flatten) while filling the cache;
* ``cached``: the median later epoch, served from the cache (augmentation still applied);
* ``no cache``: the median epoch of the same loader with the cache off (every epoch prepares),
  the peer the cache is measured against: ``speedup = no cache / cached``.

It also reports memory: what the cache holds, and what transforming the whole set up front
(no batching pattern) would hold at once, against one batch with the batching pattern.

    python experiments/bench_batching.py --json /tmp/batching.json --doc docs/training.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from dmlsys.train import data
from dmlsys.train.batching import BatchConfig, BatchLoader, prepare

MiB = 1 << 20


def time_epoch(loader: BatchLoader, epoch: int) -> float:
    t0 = time.perf_counter()
    checksum = 0.0
    for batch in loader.epoch(epoch):
        checksum += float(batch.x.flat[0])  # touch the batch so nothing is skipped lazily
    return time.perf_counter() - t0


def measure(ds: data.Dataset, batch: int, flatten: bool, augment: bool, epochs: int) -> dict:
    cfg = BatchConfig(batch, flatten=flatten, augment=augment)
    cached = BatchLoader(ds.train_images, ds.train_labels, cfg)
    first = time_epoch(cached, 0)
    warm = [time_epoch(cached, e) for e in range(1, epochs)]
    plain = BatchLoader(ds.train_images, ds.train_labels, BatchConfig(batch, flatten=flatten, augment=augment,
                                                                      cache=False))
    nocache = [time_epoch(plain, e) for e in range(1, epochs)]
    per_sample = 28 * 28 * 4 + 4
    return {
        "batch": batch, "flatten": flatten, "augment": augment, "epochs": epochs,
        "first_epoch_s": first, "cached_epoch_s": statistics.median(warm),
        "nocache_epoch_s": statistics.median(nocache),
        "speedup": statistics.median(nocache) / statistics.median(warm),
        "first_over_cached": first / statistics.median(warm),
        "cache_mib": cached.stats()["cached_bytes"] / MiB,
        "batch_mib": batch * per_sample / MiB,
    }


def whole_set_up_front(ds: data.Dataset) -> dict:
    """The anti-pattern: transform everything before training; its time and resident size."""
    t0 = time.perf_counter()
    x, y = prepare(ds.train_images, ds.train_labels, flatten=True)
    return {"seconds": time.perf_counter() - t0, "mib": (x.nbytes + y.nbytes) / MiB}


def markdown(rows: list[dict], upfront: dict, raw_mib: float, n: int) -> str:
    lines = [
        f"Measured {time.strftime('%Y-%m-%d')} on {platform.machine()}, {os.cpu_count()} CPU cores; "
        f"{n:,} training images, a consumer that only touches each batch; medians over the later epochs.",
        "",
        "| batch | flatten | augment | epoch 1 (prepare + fill cache) | cached epoch | no-cache epoch | "
        "speedup (no cache / cached) | cache size | one batch |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['batch']} | {'yes' if r['flatten'] else 'no'} | {'yes' if r['augment'] else 'no'} | "
            f"{r['first_epoch_s'] * 1e3:.0f} ms | {r['cached_epoch_s'] * 1e3:.1f} ms | "
            f"{r['nocache_epoch_s'] * 1e3:.0f} ms | **{r['speedup']:.1f}×** | {r['cache_mib']:.0f} MiB | "
            f"{r['batch_mib']:.2f} MiB |"
        )
    lines += [
        "",
        f"Without the batching pattern, transforming the whole set up front takes "
        f"{upfront['seconds'] * 1e3:.0f} ms and holds {upfront['mib']:.0f} MiB of float32 at once, next to "
        f"the {raw_mib:.0f} MiB of raw uint8 pixels; the batching pattern holds one batch at a time "
        "(the cache, when on, is the deliberate exception: it trades that memory for speed).",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=4, help="epochs per configuration (>= 2; default 4)")
    p.add_argument("--batches", default="64,256", help="comma-separated batch sizes (default 64,256)")
    p.add_argument("--limit", type=int, help="use only the first N training samples")
    p.add_argument("--json", metavar="FILE", help="write the rows as a JSON list")
    p.add_argument("--doc", metavar="MD", help="rewrite the results section of this markdown file")
    p.add_argument("--plot", metavar="PNG", help="epoch times per configuration (default: the --json path, .png)")
    p.add_argument("--from-json", metavar="FILE", help="only plot what an earlier --json wrote (no measuring)")
    args = p.parse_args(argv)
    import _docs  # experiments/_docs.py
    import _plot  # experiments/_plot.py: matplotlib is imported only when a figure is drawn

    if args.from_json:
        _plot.bench_batching(_plot.load_json(args.from_json), _plot.plot_path(args.plot, args.from_json))
        return 0
    if args.epochs < 2:
        p.error("--epochs must be >= 2 (one to fill the cache, one to serve from it)")
    ds = data.load(limit=args.limit, test_limit=0)
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        for flatten, augment in ((True, False), (False, False), (False, True)):
            rows.append(measure(ds, batch, flatten, augment, args.epochs))
    upfront = whole_set_up_front(ds)
    table = Table(title=f"batching + caching, {ds.num_train} samples")
    for col in ("batch", "flatten", "augment", "epoch 1 ms", "cached ms", "no-cache ms", "speedup", "cache MiB"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["batch"]), str(r["flatten"]), str(r["augment"]), f"{r['first_epoch_s'] * 1e3:.0f}",
                      f"{r['cached_epoch_s'] * 1e3:.1f}", f"{r['nocache_epoch_s'] * 1e3:.0f}",
                      f"{r['speedup']:.1f}x", f"{r['cache_mib']:.0f}")
    console = Console()
    console.print(table)
    console.print(f"whole set up front: {upfront['seconds'] * 1e3:.0f} ms, {upfront['mib']:.0f} MiB resident")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "whole_set_up_front": upfront}, indent=2))
    if out := _plot.plot_path(args.plot, args.json):
        _plot.bench_batching({"rows": rows, "whole_set_up_front": upfront}, out)
    if args.doc:
        _docs.replace_section(Path(args.doc), "bench_batching",
                              markdown(rows, upfront, ds.train_images.nbytes / MiB, ds.num_train))
        console.print(f"wrote results to {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
