"""Hash ring benchmark: dmlsys.sharding vs uhashring (ketama) and a jump-hash reference, one run.

For 10 and 100 members and 1,000,000 string keys ("key:0" ... "key:999999"), each placement:

  lookups_per_s        one key at a time, str in, member out (hashing included), on --single-keys keys
  batch_lookups_per_s  the whole 1M-key list at once, str in, members out (hashing included). The
                       peers have no batch call: their figure is their per-key call looped over the batch
  max_over_mean        the most keys any member holds over the mean, all 1M keys
  moved_add            fraction of keys whose member changes when one member joins (ideal 1/(n+1))
  moved_remove         ... when one member leaves (ideal 1/n): a middle member for rings; the last
                       bucket for jump hash, which can remove no other

Placements: ``uhashring-ketama`` (uhashring 2.5, hash_fn="ketama": 160 points per member),
``jump-reference`` (the jump-consistent-hash C extension on xxh3_64 of the key), ``ours-ring``
(HashRing, default vnodes), ``ours-jump`` (JumpHash, vectorized batch), ``ours-bounded``
(BoundedLoads on the default ring, eps 0.25: max/mean of keys placed one by one, which must stay
<= 1.25; its rate is assignments per second).

Timings alternate between implementations within each repetition; the medians are reported.
The machine is shared: read the ratios, and rerun on a quiet machine before quoting figures.

    python experiments/bench_hashring.py --json docs/bench_hashring.json      # also writes the .png
    python experiments/bench_hashring.py --from-json docs/bench_hashring.json  # re-plot only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from collections.abc import Callable

import numpy as np

from dmlsys.sharding.ring import DEFAULT_EPS, DEFAULT_VNODES, BoundedLoads, HashRing, JumpHash, key_hash

IMPLS = ("uhashring-ketama", "jump-reference", "ours-ring", "ours-jump", "ours-bounded")
PEERS = ("uhashring-ketama", "jump-reference")


def names_for(n: int) -> list[str]:
    return [f"node-{i:03d}" for i in range(n)]


class Impl:
    """One placement under test: how to build it for a member list, and its two lookup paths."""

    def __init__(self, name: str, build: Callable[[list[str]], object], single: Callable, batch: Callable | None,
                 remove_last: bool = False) -> None:
        self.name, self.build, self.single, self.batch, self.remove_last = name, build, single, batch, remove_last


def make_impls(which: list[str]) -> list[Impl]:
    out = []
    for name in which:
        if name == "uhashring-ketama":
            from uhashring import HashRing as UHashRing

            def uh_single(ring, keys):
                get = ring.get_node
                return [get(k) for k in keys]

            out.append(Impl(name, lambda nodes: UHashRing(nodes=nodes, hash_fn="ketama"), uh_single, uh_single))
        elif name == "jump-reference":
            import jump

            def jr_single(nodes, keys):
                h, n = jump.hash, len(nodes)
                return [nodes[h(key_hash(k), n)] for k in keys]

            out.append(Impl(name, list, jr_single, jr_single, remove_last=True))
        elif name == "ours-ring":
            out.append(Impl(name, HashRing, lambda r, keys: [r.lookup(k) for k in keys],
                            lambda r, keys: r.lookup_batch(keys)))
        elif name == "ours-jump":
            out.append(Impl(name, JumpHash, lambda r, keys: [r.lookup(k) for k in keys],
                            lambda r, keys: r.lookup_batch(keys), remove_last=True))
        elif name == "ours-bounded":
            def bounded_assign(nodes, keys):
                b = BoundedLoads(HashRing(nodes), eps=DEFAULT_EPS)
                return [b.assign(k) for k in keys]

            out.append(Impl(name, list, bounded_assign, None))
        else:
            raise SystemExit(f"unknown implementation {name!r}; choose from {', '.join(IMPLS)}")
    return out


def fraction_moved(a, b) -> float:
    return float(np.mean(np.asarray(a, dtype=object) != np.asarray(b, dtype=object)))


def max_over_mean(assigned, n: int) -> float:
    counts = Counter(assigned.tolist() if isinstance(assigned, np.ndarray) else assigned)
    return max(counts.values()) / (len(assigned) / n)


def quality(impl: Impl, n: int, keys: list[str], bounded_keys: int) -> dict:
    nodes = names_for(n)
    if impl.name == "ours-bounded":  # placement of keys held at once; membership moves are not its question
        sub = keys[:bounded_keys]
        placed = impl.single(nodes, sub)
        return {"max_over_mean": max_over_mean(placed, n), "moved_add": None, "moved_remove": None}
    look = impl.batch
    base = look(impl.build(nodes), keys)
    added = look(impl.build(nodes + [f"node-{n:03d}"]), keys)
    gone = nodes[-1] if impl.remove_last else nodes[n // 2]
    removed = look(impl.build([x for x in nodes if x != gone]), keys)
    return {"max_over_mean": max_over_mean(base, n), "moved_add": fraction_moved(base, added),
            "moved_remove": fraction_moved(base, removed)}


def throughput(impls: list[Impl], n: int, keys: list[str], single_keys: int, bounded_keys: int, reps: int,
               progress) -> dict[str, dict[str, list[float]]]:
    nodes = names_for(n)
    built = {i.name: i.build(nodes) for i in impls}
    sub = keys[:single_keys]
    times = {i.name: {"single": [], "batch": []} for i in impls}
    for rep in range(reps + 1):  # rep 0 warms up and is not counted
        for i in impls:
            progress(f"{n} members, rep {rep}/{reps}: {i.name}")
            if i.name == "ours-bounded":
                few = keys[:bounded_keys]
                t0 = time.perf_counter()
                i.single(nodes, few)
                rate = len(few) / (time.perf_counter() - t0)
                if rep:
                    times[i.name]["single"].append(rate)
                continue
            t0 = time.perf_counter()
            i.single(built[i.name], sub)
            single = len(sub) / (time.perf_counter() - t0)
            t0 = time.perf_counter()
            i.batch(built[i.name], keys)
            batch = len(keys) / (time.perf_counter() - t0)
            if rep:
                times[i.name]["single"].append(single)
                times[i.name]["batch"].append(batch)
    return times


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


# ----------------------------------------------------------------------------- figure
def plot(rows: list[dict], path: Path) -> None:
    """Left: lookups/s single and batch per placement (log). Right: max/mean and moved vs ideal."""
    sys.path.insert(0, str(Path(__file__).parent))
    import _plot

    plt = _plot._pyplot()
    if plt is None:
        return
    members = sorted({r["members"] for r in rows})
    impls = [i for i in IMPLS if any(r["impl"] == i for r in rows)]
    colour = {"uhashring-ketama": _plot.PEER, "jump-reference": _plot.FLOOR, "ours-ring": _plot.OURS,
              "ours-jump": _plot.OURS_ALT, "ours-bounded": "#2ca02c"}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    w = 0.8 / len(impls)
    for ax, field, title in ((axes[0], "lookups_per_s", "one key per call"),
                             (axes[1], "batch_lookups_per_s", "a batch per call (peers loop)")):
        every = []
        for k, impl in enumerate(impls):
            vals = [next((r[field] for r in rows if r["impl"] == impl and r["members"] == m), None) or np.nan
                    for m in members]
            bars = ax.bar(np.arange(len(members)) + (k - (len(impls) - 1) / 2) * w, [v / 1e6 for v in vals], w,
                          label=impl, color=colour[impl])
            _plot._label_bars(ax, bars)
            every += [v / 1e6 for v in vals]
        _plot._log_if_wide(ax, every, "M lookups/s ({scale}higher is better)")
        ax.set_xticks(np.arange(len(members)), [f"{m} members" for m in members])
        ax.set_title(f"Lookup rate, {title}", fontsize=9)
    ax = axes[2]
    for k, impl in enumerate(impls):
        for m_i, m in enumerate(members):
            r = next((r for r in rows if r["impl"] == impl and r["members"] == m), None)
            if r is None:
                continue
            x = m_i + (k - (len(impls) - 1) / 2) * w
            ax.bar(x, r["max_over_mean"], w, color=colour[impl], label=impl if m_i == 0 else None)
            if r.get("moved_add") is not None:
                ax.annotate(f"+{r['moved_add'] / r['ideal_add']:.2f}×\n−{r['moved_remove'] / r['ideal_remove']:.2f}×",
                            (x, r["max_over_mean"]), xytext=(0, 2), textcoords="offset points", ha="center",
                            va="bottom", fontsize=6)
    ax.axhline(1.10, color=_plot.FLOOR, lw=0.8, ls="--")
    ax.set_ylim(1.0, max(r["max_over_mean"] for r in rows) * 1.08)
    ax.set_xticks(np.arange(len(members)), [f"{m} members" for m in members])
    ax.set_ylabel("max / mean keys per member (lower is better)")
    ax.set_title("Balance (dashed: 1.10 target)\nlabels: moved on +add / −remove, × ideal", fontsize=9)
    axes[0].legend(fontsize=8, ncols=len(impls), loc="upper center", bbox_to_anchor=(1.7, -0.12))
    _plot._save(plt, fig, path)


# ----------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keys", type=int, default=1_000_000, help="string keys (default 1,000,000)")
    ap.add_argument("--members", default="10,100", help="member counts (default 10,100)")
    ap.add_argument("--single-keys", type=int, default=200_000, help="keys timed one at a time (default 200,000)")
    ap.add_argument("--bounded-keys", type=int, default=200_000, help="keys placed by ours-bounded (default 200,000)")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions, alternated (default 3)")
    ap.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated subset of {','.join(IMPLS)}")
    ap.add_argument("--json", metavar="FILE", help="write the rows as a JSON list to FILE")
    ap.add_argument("--plot", metavar="PNG", help="figure (default: the --json path with .png)")
    ap.add_argument("--from-json", metavar="FILE", help="only plot the rows an earlier --json wrote")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    import _plot

    if args.from_json:
        out = _plot.plot_path(args.plot, args.from_json)
        return plot(_plot.load_json(args.from_json), out) if out else None

    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=True)
    impls = make_impls([x for x in args.impls.split(",") if x])
    keys = [f"key:{i}" for i in range(args.keys)]
    rows = []
    with console.status("measuring") as status:
        for n in (int(x) for x in args.members.split(",")):
            times = throughput(impls, n, keys, min(args.single_keys, args.keys), min(args.bounded_keys, args.keys),
                               args.reps, lambda s: status.update(s))
            for i in impls:
                status.update(f"{n} members: balance and movement, {i.name}")
                q = quality(i, n, keys, min(args.bounded_keys, args.keys))
                rows.append({"impl": i.name, "members": n, "lookups_per_s": median(times[i.name]["single"]),
                             "batch_lookups_per_s": median(times[i.name]["batch"]), **q,
                             "ideal_add": 1 / (n + 1), "ideal_remove": 1 / n})

    def f(x, unit="", digits=3):
        return "—" if x is None else f"{x:.{digits}g}{unit}"

    def peer(row, impl, field):
        p = next((r for r in rows if r["impl"] == impl and r["members"] == row["members"]), None)
        return p and p[field] and row[field] and row[field] / p[field]

    headers = ["impl", "members", "M lookups/s", "M batch lookups/s", "batch / uhashring", "max/mean",
               "moved add (× ideal)", "moved remove (× ideal)"]
    table_rows = []
    for r in rows:
        table_rows.append([
            r["impl"], str(r["members"]), f(r["lookups_per_s"] and r["lookups_per_s"] / 1e6),
            f(r["batch_lookups_per_s"] and r["batch_lookups_per_s"] / 1e6),
            f(peer(r, "uhashring-ketama", "batch_lookups_per_s"), "×"), f(r["max_over_mean"], digits=4),
            "—" if r["moved_add"] is None else f"{r['moved_add']:.4f} ({r['moved_add'] / r['ideal_add']:.2f}×)",
            "—" if r["moved_remove"] is None
            else f"{r['moved_remove']:.4f} ({r['moved_remove'] / r['ideal_remove']:.2f}×)"])
    t = Table(title=f"{args.keys:,} keys; rates are medians of {args.reps} alternated reps "
                    f"(single: {args.single_keys:,} keys); default vnodes {DEFAULT_VNODES}")
    for h in headers:
        t.add_column(h, justify="left" if h == "impl" else "right")
    for tr in table_rows:
        t.add_row(*tr)
    Console().print(t)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\nmachine: nproc={os.cpu_count()} loadavg={load} python={platform.python_version()}\n")
    print("| " + " | ".join(headers) + " |\n|" + "---|" * len(headers))
    for tr in table_rows:
        print("| " + " | ".join(tr) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
        print(f"\nrows written to {args.json}")
    if out := _plot.plot_path(args.plot, args.json):
        plot(rows, out)


if __name__ == "__main__":
    main()
