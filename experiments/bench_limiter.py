#!/usr/bin/env python
"""Rate limiters side by side: dmlsys.events.Limiter vs aiolimiter and `limits` (moving window).

Two measurements, all limiters alternated within each repetition (this machine is shared:
read the ratios, not the absolute numbers):

(1) Decisions per second, one coroutine in a tight loop, fresh limiter and event loop per run:
    admit     a limit never reached during the loop;
    reject    limit 100/s: after the first 100, every decision is a refusal;
    users     limit 100/s over 1,000 keys, round-robin (per-principal limits).
    aiolimiter: ``await acquire()`` to admit; its non-blocking check ``has_capacity()`` on the
    reject path (acquire never refuses, it waits); a dict of limiters for the users path.
    limits: ``await MovingWindowRateLimiter(MemoryStorage()).hit(item, key)``.
    ours: ``Limiter.admit(tier, key, time.monotonic())``, called from the same coroutine loop.

(2) Accuracy: limit 100 per 1 s, --workers acquirers hammering for --duration seconds.
    aiolimiter acquirers await acquire(); limits acquirers retry after a random 0-2x --retry-ms;
    ours retry at the exact retry_after the limiter answers. Each admission is stamped right
    after the decision with the clock the limiter uses (as in the peer anchor); for ours also the
    decision time itself. max_in_window = the most admissions in any window [t, t + 1 s): over
    the limit is a violation. Scenarios: "hammer" (all start at t=0) and "late-burst" (one
    admission at t=0, the burst at t=0.9 s: the adversarial case for a bucket that refilled).

    python experiments/bench_limiter.py --json docs/bench_limiter.json       # -> and .png
    python experiments/bench_limiter.py --from-json docs/bench_limiter.json  # re-plot only

Target: ours >= 1x aiolimiter's decisions/s, with max_in_window <= limit.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from aiolimiter import AsyncLimiter  # noqa: E402
from limits import RateLimitItemPerSecond  # noqa: E402
from limits.aio import storage as aio_storage  # noqa: E402
from limits.aio import strategies as aio_strategies  # noqa: E402

from dmlsys.events.limiter import Limiter  # noqa: E402
from dmlsys.events.tiers import Rate, Tier  # noqa: E402

IMPLS = ("dmlsys", "aiolimiter", "limits-moving-window")
PATHS = ("admit", "reject", "users")


# ----------------------------------------------------------------------------- (1) throughput
def throughput_case(impl: str, path: str, n: int, users: int):
    """An async callable running n decisions, returning how many were admitted."""
    limit = 10**9 if path == "admit" else 100
    keys = [f"user-{i}" for i in range(users if path == "users" else 1)]
    nk = len(keys)

    if impl == "dmlsys":
        async def run():
            lim = Limiter([Tier("t", Rate(limit, 1.0))])
            admit, clock, ok = lim.admit, time.monotonic, 0
            for i in range(n):
                ok += admit("t", keys[i % nk], clock())
            return ok
    elif impl == "aiolimiter":
        if path == "admit":
            async def run():
                lim = AsyncLimiter(limit, 1)
                for _ in range(n):
                    await lim.acquire()
                return n
        elif path == "reject":
            async def run():
                lim = AsyncLimiter(limit, 1)
                for _ in range(limit):
                    await lim.acquire()
                ok = 0
                for _ in range(n):
                    ok += lim.has_capacity()
                return ok
        else:  # users: a dict of limiters; has_capacity then acquire, so a full one refuses instead of waiting
            async def run():
                lims = {k: AsyncLimiter(limit, 1) for k in keys}
                ok = 0
                for i in range(n):
                    lim = lims[keys[i % nk]]
                    if lim.has_capacity():
                        await lim.acquire()
                        ok += 1
                return ok
    else:
        async def run():
            lim = aio_strategies.MovingWindowRateLimiter(aio_storage.MemoryStorage())
            item = RateLimitItemPerSecond(limit)
            ok = 0
            for i in range(n):
                ok += await lim.hit(item, keys[i % nk])
            return ok
    return run


# ----------------------------------------------------------------------------- (2) accuracy
async def hammer(impl: str, rate: int, workers: int, duration: float, retry: float, prime_gap: float):
    """(stamps after each decision, decision times or None), seconds since the start."""
    loop = asyncio.get_running_loop()
    stamps: list[float] = []
    decided: list[float] | None = None
    rnd = random.Random(1).random
    if impl == "aiolimiter":
        lim = AsyncLimiter(rate, 1)
        clock = loop.time  # the clock aiolimiter uses

        async def once() -> bool:
            await lim.acquire()
            return True

        async def worker():
            while True:
                await lim.acquire()
                t = clock()
                if t >= end:
                    return
                stamps.append(t)
    elif impl == "limits-moving-window":
        mlim = aio_strategies.MovingWindowRateLimiter(aio_storage.MemoryStorage())
        item = RateLimitItemPerSecond(rate)
        clock = time.time  # the clock limits' memory storage uses

        async def once() -> bool:
            return await mlim.hit(item, "user-0")

        async def worker():
            while True:
                ok = await mlim.hit(item, "user-0")
                t = clock()
                if t >= end:
                    return
                if ok:
                    stamps.append(t)
                else:
                    await asyncio.sleep(2 * retry * rnd())
    else:
        olim = Limiter([Tier("t", Rate(rate, 1.0))])
        clock = time.monotonic
        decided = []

        async def once() -> bool:
            now = clock()
            decided.append(now)
            return olim.admit("t", "user-0", now)

        async def worker():
            while True:
                now = clock()
                if olim.admit("t", "user-0", now):
                    t = clock()
                    if t >= end:
                        return
                    stamps.append(t)
                    decided.append(now)
                else:
                    if now >= end:
                        return
                    await asyncio.sleep(olim.retry_after("t", "user-0", now) - now)

    start = clock()
    end = start + duration
    if prime_gap:
        assert await once()
        stamps.append(clock())
        await asyncio.sleep(prime_gap)
    tasks = [asyncio.create_task(worker()) for _ in range(workers)]
    await asyncio.sleep(max(0.0, end - clock()))
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return [s - start for s in stamps], (None if decided is None else [s - start for s in decided])


def max_in_window(stamps: list[float], width: float = 1.0) -> int:
    s = sorted(stamps)
    return max((bisect.bisect_left(s, t + width, lo=i) - i for i, t in enumerate(s)), default=0)


def run_fresh(loop_kind: str, fn, *a):
    if loop_kind == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    else:
        factory = asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as r:
        return r.run(fn(*a))


# ----------------------------------------------------------------------------- plot
def plot(rows: list[dict], path: Path) -> None:
    sys.path.insert(0, str(ROOT / "experiments"))
    import _plot

    plt = _plot._pyplot()
    if plt is None:
        return
    import numpy as np

    colour = {"dmlsys": _plot.OURS, "aiolimiter": _plot.PEER, "limits-moving-window": _plot.FLOOR}
    impls = [i for i in IMPLS if any(r["impl"] == i for r in rows)]
    paths = [p for p in PATHS if any(r["path"] == p for r in rows)]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.9), gridspec_kw={"width_ratios": [3, 2]})
    x, w = np.arange(len(paths)), 0.8 / max(1, len(impls))
    every = []
    for i, impl in enumerate(impls):
        vals = [next((r["decisions_per_s"] / 1e3 for r in rows if r["impl"] == impl and r["path"] == p), np.nan)
                for p in paths]
        bars = ax1.bar(x + (i - (len(impls) - 1) / 2) * w, vals, w, label=impl, color=colour[impl])
        _plot._label_bars(ax1, bars)
        every += vals
    _plot._log_if_wide(ax1, every, "k decisions/s ({scale}higher is better)")
    ax1.set_xticks(x, paths)
    ax1.set_title("Decisions per second, one coroutine", fontsize=10)
    ax1.legend(fontsize=8)
    scen = [s for s in ("hammer", "late-burst") if any(f"max_in_window_{s}" in r for r in rows)]
    x2 = np.arange(len(scen))
    for i, impl in enumerate(impls):
        r0 = next(r for r in rows if r["impl"] == impl)
        vals = [r0.get(f"max_in_window_{s}", np.nan) for s in scen]
        bars = ax2.bar(x2 + (i - (len(impls) - 1) / 2) * w, vals, w, label=impl, color=colour[impl])
        _plot._label_bars(ax2, bars)
    lim = next((r.get("accuracy_limit") for r in rows if r.get("accuracy_limit")), None)
    if lim:
        ax2.axhline(lim, ls="--", lw=1, color="black", label=f"limit {lim}")
    ax2.set_ylim(0, max([r.get(f"max_in_window_{s}", 0) for r in rows for s in scen] + [lim or 1]) * 1.35)
    ax2.set_xticks(x2, scen)
    ax2.set_ylabel("max admitted in any 1 s window (≤ limit)")
    ax2.set_title("Accuracy, worst run", fontsize=10)
    ax2.legend(fontsize=7, ncols=2, loc="upper left")
    fig.tight_layout()
    _plot._save(plt, fig, path)


def verdict(worst: int, shorter: int, limit: int) -> str:
    if worst <= limit:
        return "never over the limit"
    if shorter <= limit:
        return "over only at the window edge (stamp jitter)"
    return "OVER-ADMITS"


# ----------------------------------------------------------------------------- docs
def markdown(rows: list[dict]) -> str:
    """The results tables for docs/events.md, from the rows (so --from-json can rewrite them)."""
    get = {(r["impl"], r["path"]): r for r in rows}
    r0 = rows[0]
    out = [f"Decisions per second, median of {r0['reps']} alternating runs ({r0['loop']} loop), one coroutine; "
           f"ratio = ours / peer (medians). 1-minute load average when it ended: {r0.get('loadavg', 'not recorded')}.", "",
           "| path | dmlsys | aiolimiter | limits (moving window) | dmlsys / aiolimiter | dmlsys / limits |",
           "|---|---:|---:|---:|---:|---:|"]
    for path in PATHS:
        v = {i: get[(i, path)]["decisions_per_s"] for i in IMPLS if (i, path) in get}
        if len(v) < len(IMPLS):
            continue
        out.append(f"| {path} | {v['dmlsys'] / 1e3:,.0f}k | {v['aiolimiter'] / 1e3:,.0f}k | "
                   f"{v['limits-moving-window'] / 1e3:,.0f}k | {v['dmlsys'] / v['aiolimiter']:.2f}x | "
                   f"{v['dmlsys'] / v['limits-moving-window']:.2f}x |")
    if "max_in_window" in r0:
        out += ["", f"Accuracy: limit {r0['accuracy_limit']} per 1 s; the most admissions seen in any 1 s window "
                "(worst run; stamps taken right after each decision with the limiter's own clock).", "",
                "| limiter | hammer | late burst | either, windows 1 ms shorter | mean admitted/s (hammer) | verdict |",
                "|---|---:|---:|---:|---:|---|"]
        for impl in IMPLS:
            r = get.get((impl, "admit"))
            if r is None:
                continue
            shorter = r.get("max_in_shorter_window", r["max_in_window"])
            out.append(f"| {impl} | {r['max_in_window_hammer']} | {r['max_in_window_late-burst']} | {shorter} | "
                       f"{r['admitted_per_s_hammer']:.1f} | {verdict(r['max_in_window'], shorter, r['accuracy_limit'])} |")
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5, help="alternating repetitions (default 5)")
    ap.add_argument("--decisions", type=int, default=50_000, help="decisions per throughput run (default 50,000)")
    ap.add_argument("--users", type=int, default=1000, help="keys for the users path (default 1000)")
    ap.add_argument("--rate", type=int, default=100, help="accuracy: limit per second (default 100)")
    ap.add_argument("--workers", type=int, default=1000, help="accuracy: concurrent acquirers (default 1,000)")
    ap.add_argument("--duration", type=float, default=3.0, help="accuracy: seconds of hammering (default 3)")
    ap.add_argument("--accuracy-reps", type=int, default=2, help="accuracy repetitions (default 2)")
    ap.add_argument("--retry-ms", type=float, default=10.0, help="accuracy: mean back-off of a refused `limits` acquirer")
    ap.add_argument("--prime-gap", type=float, default=0.9, help="late-burst: gap before the burst (default 0.9 s)")
    ap.add_argument("--tolerance-ms", type=float, default=1.0,
                    help="accuracy: also count windows this much shorter than 1 s (default 1 ms)")
    ap.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    ap.add_argument("--skip-accuracy", action="store_true")
    ap.add_argument("--json", metavar="FILE", help="write the rows as a JSON list")
    ap.add_argument("--plot", metavar="PNG", help="figure (default: the --json path with .png)")
    ap.add_argument("--doc", metavar="MD", help="rewrite the bench_limiter section of this markdown file")
    ap.add_argument("--from-json", metavar="FILE", help="only plot (and --doc) the rows an earlier --json wrote")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "experiments"))
    import _plot

    import _docs

    if args.from_json:
        rows = _plot.load_json(args.from_json)
        if args.doc:
            _docs.replace_section(Path(args.doc), "bench_limiter", markdown(rows))
        return plot(rows, _plot.plot_path(args.plot, args.from_json))

    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=True)
    cases = {(i, p): throughput_case(i, p, args.decisions, args.users) for p in PATHS for i in IMPLS}
    for fn in cases.values():  # warm-up
        run_fresh(args.loop, fn)
    dps: dict[tuple[str, str], list[float]] = {k: [] for k in cases}
    admitted = {}
    for rep in range(args.reps):
        console.print(f"throughput rep {rep + 1}/{args.reps}")
        order = list(cases.items())
        if rep % 2:
            order.reverse()  # alternate the order too, so no one always runs right after a GC-heavy peer
        for key, fn in order:
            t0 = time.perf_counter()
            admitted[key] = run_fresh(args.loop, fn)
            dps[key].append(args.decisions / (time.perf_counter() - t0))

    acc: dict[str, dict[str, list[int]]] = {i: {"hammer": [], "late-burst": [], "hammer_decided": [],
                                                "late-burst_decided": [], "tol": [], "rate": []} for i in IMPLS}
    if not args.skip_accuracy:
        for rep in range(args.accuracy_reps):
            for scen, gap in (("hammer", 0.0), ("late-burst", args.prime_gap)):
                for impl in IMPLS:
                    console.print(f"accuracy {scen} rep {rep + 1}/{args.accuracy_reps}: {impl}")
                    stamps, decided = run_fresh(args.loop, hammer, impl, args.rate, args.workers, args.duration,
                                                args.retry_ms / 1e3, gap)
                    acc[impl][scen].append(max_in_window(stamps))
                    # windows 1 ms shorter: tells stamp jitter at the window's edge from real bursts
                    acc[impl]["tol"].append(max_in_window(stamps, 1.0 - args.tolerance_ms / 1e3))
                    if decided is not None:
                        acc[impl][f"{scen}_decided"].append(max_in_window(decided))
                    if scen == "hammer":
                        acc[impl]["rate"].append(len(stamps) / args.duration)

    rows = []
    for impl in IMPLS:
        for path in PATHS:
            v = dps[(impl, path)]
            row = {"impl": impl, "path": path, "decisions_per_s": round(statistics.median(v), 1),
                   "decisions_per_s_min": round(min(v), 1), "decisions_per_s_max": round(max(v), 1),
                   # "limit": what max_in_window is judged against (the accuracy run's), when measured
                   "limit": 10**9 if path == "admit" else 100, "throughput_limit": 10**9 if path == "admit" else 100,
                   "admitted_last_run": admitted[(impl, path)],
                   "reps": args.reps, "loop": args.loop, "loadavg": round(os.getloadavg()[0], 2)}
            if not args.skip_accuracy:
                row["accuracy_limit"] = row["limit"] = args.rate
                row["max_in_window"] = max(acc[impl]["hammer"] + acc[impl]["late-burst"])
                for scen in ("hammer", "late-burst"):
                    row[f"max_in_window_{scen}"] = max(acc[impl][scen])
                    if acc[impl][f"{scen}_decided"]:
                        row[f"max_in_window_{scen}_decision_times"] = max(acc[impl][f"{scen}_decided"])
                row["max_in_shorter_window"] = max(acc[impl]["tol"])
                row["shorter_window_s"] = 1.0 - args.tolerance_ms / 1e3
                row["admitted_per_s_hammer"] = round(statistics.median(acc[impl]["rate"]), 1)
            rows.append(row)

    t = Table(title=f"Decisions/s, median of {args.reps} alternating runs ({args.loop} loop; provisional: shared machine)")
    for col in ("path", *IMPLS, "dmlsys / aiolimiter", "dmlsys / limits"):
        t.add_column(col, justify="left" if col == "path" else "right")
    for path in PATHS:
        med = {i: statistics.median(dps[(i, path)]) for i in IMPLS}
        # ratio: the median of per-repetition ratios (adjacent runs share the machine's load)
        ra = statistics.median(o / a for o, a in zip(dps[("dmlsys", path)], dps[("aiolimiter", path)]))
        rl = statistics.median(o / a for o, a in zip(dps[("dmlsys", path)], dps[("limits-moving-window", path)]))
        t.add_row(path, *(f"{med[i] / 1e3:,.0f}k" for i in IMPLS), f"{ra:.2f}x {'ok' if ra >= 1 else 'MISSED'}",
                  f"{rl:.2f}x")
    Console(width=150).print(t)
    if not args.skip_accuracy:
        t2 = Table(title=f"Accuracy: limit {args.rate} per 1 s, {args.workers:,} acquirers for {args.duration:g} s, "
                         f"worst of {args.accuracy_reps} runs")
        for col in ("impl", "max in any 1 s window: hammer", "late-burst",
                    f"either, {1000 - args.tolerance_ms:g} ms windows", "mean admitted/s", "verdict"):
            t2.add_column(col, justify="left" if col == "impl" else "right")
        for impl in IMPLS:
            a = acc[impl]
            worst = max(a["hammer"] + a["late-burst"])
            extra = (f" (decision times: {max(a['hammer_decided'])}, {max(a['late-burst_decided'])})"
                     if a["hammer_decided"] else "")
            t2.add_row(impl, f"{max(a['hammer'])}", f"{max(a['late-burst'])}{extra}", f"{max(a['tol'])}",
                       f"{statistics.median(a['rate']):.1f}", verdict(worst, max(a["tol"]), args.rate))
        Console(width=150).print(t2)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    if out := _plot.plot_path(args.plot, args.json):
        plot(rows, out)
    if args.doc:
        _docs.replace_section(Path(args.doc), "bench_limiter", markdown(rows))


if __name__ == "__main__":
    main()
