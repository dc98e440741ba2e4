"""Figures for the experiment scripts: one function per script, drawn from the rows its --json writes.

Every script takes ``--plot FILE.png`` (default: the --json path with ``.png``) and
``--from-json FILE`` (re-plot an earlier run's rows without measuring again), so the figures in
docs/ are redrawn from the committed JSON in a second:

    python experiments/bench_dag.py --from-json docs/bench_dag.json        # -> docs/bench_dag.png

matplotlib is a bench-only dependency (``pip install -e '.[bench]'``), imported lazily with the
Agg backend (no display needed). When it is missing a script prints one line and skips the
figure: a benchmark that ran for ten minutes must not fail over its picture.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

OURS, PEER, FLOOR, OURS_ALT = "#1f77b4", "#ff7f0e", "#7f7f7f", "#9ecae1"  # one colour per role, in every figure


def plot_path(plot: str | None, *json_paths: str | None) -> Path | None:
    """Where the figure goes: --plot if given, else the first JSON path with .png, else nowhere."""
    if plot:
        return Path(plot)
    for p in json_paths:
        if p:
            return Path(p).with_suffix(".png")
    return None


def _pyplot():
    """matplotlib.pyplot on the Agg backend, or None (after one line saying how to get it)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot skipped: matplotlib is not installed (pip install -e '.[bench]')", file=sys.stderr)
        return None
    plt.rcParams.update({"figure.dpi": 110, "axes.grid": True, "grid.alpha": 0.3, "axes.axisbelow": True,
                         "axes.spines.top": False, "axes.spines.right": False, "legend.frameon": False})
    return plt


def _save(plt, fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    print(f"plot written to {path}", file=sys.stderr)


def _num(v: float) -> str:
    """Three significant digits without exponents: 108, 49.5, 9.29, 0.31."""
    return f"{v:.0f}" if v >= 100 else f"{v:.3g}"


def _log_if_wide(ax, values, label: str) -> None:
    """Log y axis when the values span more than a decade (else bars of 4 and 6 read as equal-ish)."""
    vals = [v for v in values if v and v == v and v > 0]
    wide = bool(vals) and max(vals) / min(vals) > 10
    if wide:
        ax.set_yscale("log")
        ax.set_ylim(top=ax.get_ylim()[1] * 1.6)
    else:
        ax.set_ylim(0, max(vals + [1]) * 1.15)
    ax.set_ylabel(label.format(scale="log scale, " if wide else ""))


def _label_bars(ax, bars, fmt=_num, tops=None) -> None:
    """Each bar's value above it (above ``tops[i]``, a whisker's end, when given)."""
    for i, b in enumerate(bars):
        h = b.get_height()
        if h and h == h:  # skip 0 and NaN
            y = max(h, tops[i]) if tops is not None else h
            ax.annotate(fmt(h), (b.get_x() + b.get_width() / 2, y), xytext=(0, 2),
                        textcoords="offset points", ha="center", va="bottom", fontsize=7)


# ----------------------------------------------------------------------------- bench_dag
def bench_dag(rows: list[dict], path: Path) -> None:
    """Per pair (inline-vs-sync, threads-vs-threads): grouped bars, ours and Dask's µs per step
    for each shape and function kind, log scale; whiskers = min..max of repetitions."""
    plt = _pyplot()
    if plt is None:
        return
    import numpy as np

    pairs = [p for p in ("inline-vs-sync", "threads-vs-threads") if any(r.get("pair") == p for r in rows)]
    fig, axes = plt.subplots(1, len(pairs), figsize=(6 * len(pairs), 4.4), squeeze=False)
    for ax, pair in zip(axes[0], pairs):
        mine = [r for r in rows if r.get("pair") == pair]
        x, w = np.arange(len(mine)), 0.38
        every: list[float] = []
        for i, (col, who, colour) in enumerate((("ours_us_per_step", "ours", OURS), ("dask_us_per_step", "peer", PEER))):
            vals = [r.get(col) or np.nan for r in mine]
            lo_hi = [r.get("spread", {}).get(r.get(who)) for r in mine]
            err = np.array([[v - s[0], s[1] - v] if s and v == v else [0, 0] for v, s in zip(vals, lo_hi)]).T
            label = ("dmlsys " if who == "ours" else "Dask ") + (mine[0][who].split("-", 1)[1] if mine else "")
            bars = ax.bar(x + (i - 0.5) * w, vals, w, label=label, color=colour, yerr=err, capsize=2,
                          error_kw={"elinewidth": 0.8, "alpha": 0.6})
            _label_bars(ax, bars, tops=[v + e for v, e in zip(vals, err[1])])
            every += [v + e for v, e in zip(vals, err[1])] + vals
        _log_if_wide(ax, every, "µs per step ({scale}lower is better)")
        ax.set_xticks(x, [f"{r['shape'].split(' ')[0]}{' distinct' if r['distinct_functions'] else ''}"
                          + (f"\n{r['ours_over_dask']:.2f}×" if r.get("ours_over_dask") else "") for r in mine],
                      fontsize=8)
        ax.set_title(pair, fontsize=10)
        ax.legend(fontsize=8)
    reps = rows[0].get("reps", "?") if rows else "?"
    fig.suptitle(f"Scheduling overhead per no-op step, like with like (median of {reps} alternated repetitions)")
    _save(plt, fig, path)


# ----------------------------------------------------------------------------- bench_serving
def bench_serving(rows: list[dict], path: Path) -> None:
    """Balancer against balancer on the same replicas (solid) and today's pair (dashed): req/s,
    p99 and the balancer's CPU per request vs replicas (median line, each round a dot), and
    failed requests on failover."""
    plt = _pyplot()
    if plt is None:
        return
    import statistics

    load = [r for r in rows if r["kind"] == "load"]
    fo = [r for r in rows if r["kind"] == "failover"]
    panels = (3 if load else 0) + (1 if fo else 0)
    if not panels:
        print("plot skipped: no rows to plot", file=sys.stderr)
        return
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.9), squeeze=False)
    axes = list(axes[0])

    def series_of(r):  # (variant, system, policy) -> label, colour, line style
        variant, system, policy = r.get("variant", "system"), r["system"], r.get("policy", "")
        if system == "dmlsys":
            return (f"dmlsys gateway ({variant})", OURS if variant == "same-replicas" else OURS_ALT,
                    "-" if variant == "same-replicas" else "--")
        if variant == "same-replicas":
            return (f"nginx {policy} (same replicas)", PEER if policy == "round-robin" else "#d62728", "-")
        return ("nginx + aiohttp replicas (system)", FLOOR, "--")

    if load:
        ns = sorted({r["replicas"] for r in load})
        labels = {}
        for r in load:
            labels.setdefault(series_of(r), []).append(r)
        for ax, key, ylabel, title in (
                (axes[0], "rps", "requests per second (higher is better)", "Throughput"),
                (axes[1], "p99_ms", "p99 latency, ms (lower is better)", "p99 latency"),
                (axes[2], "cpu_us_per_req", "balancer CPU µs per request (lower is better)", "Balancer CPU")):
            for (label, colour, style), rs in labels.items():
                pts = [(r["replicas"], r[key]) for r in rs if r.get(key) is not None]
                if not pts:
                    continue
                xs = [n for n in ns if any(p[0] == n for p in pts)]
                med = [statistics.median(v for m, v in pts if m == n) for n in xs]
                ax.plot(xs, med, style, marker="o", color=colour, label=label)
                ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=10, color=colour, alpha=0.4)
            ax.set_xticks(ns)
            ax.set_xlabel("replicas")
            ax.set_ylabel(ylabel, fontsize=8)
            ax.set_ylim(bottom=0)
            conns = load[0].get("conns")
            ax.set_title(f"{title}, wrk -c{conns}" if conns else title, fontsize=9)
        axes[0].legend(fontsize=6)
    if fo:
        ax = axes[-1]
        keys = sorted({(r.get("variant", "system"), r["system"], r.get("fo_variant", r.get("variant"))) for r in fo},
                      key=lambda k: (k[0] != "same-replicas", k[1] != "dmlsys", k[2]))
        def of(k):
            return [r for r in fo if (r.get("variant", "system"), r["system"], r.get("fo_variant", r.get("variant"))) == k]
        failed = [statistics.median(r["failed"] for r in of(k)) for k in keys]
        reqs = [statistics.median(r["requests"] for r in of(k)) for k in keys]
        colours = [OURS if k[1] == "dmlsys" else (PEER if k[0] == "same-replicas" else FLOOR) for k in keys]
        bars = ax.bar(range(len(keys)), failed, color=colours)
        for b, f, n in zip(bars, failed, reqs):
            ax.annotate(f"{f:g} of {n:,.0f}", (b.get_x() + b.get_width() / 2, f), xytext=(0, 2),
                        textcoords="offset points", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(keys)), [f"{s}\n{v}\n({w})" for w, s, v in keys], fontsize=6)
        ax.set_ylabel("failed requests per run, median (lower is better)", fontsize=8)
        ax.set_ylim(0, max(failed + [1]) * 1.25)
        ax.set_title(f"Failover: {fo[0]['replicas']} replicas, one SIGKILLed", fontsize=9)
        ax.grid(axis="x", visible=False)
    fig.tight_layout()
    _save(plt, fig, path)


# ----------------------------------------------------------------------------- train_accuracy
def train_accuracy(rows: list[dict], path: Path) -> None:
    """Test accuracy per epoch with each model's target dashed; loss per epoch beside it if recorded."""
    plt = _pyplot()
    if plt is None:
        return
    has_loss = any(r.get("per_epoch_test_loss") for r in rows)
    fig, axes = plt.subplots(1, 2 if has_loss else 1, figsize=(10 if has_loss else 5.5, 4), squeeze=False)
    acc_ax = axes[0][0]
    colours = dict(zip(("mlp", "cnn"), (OURS, PEER)))
    for r in rows:
        c = colours.get(r["model"], FLOOR)
        ys = r["per_epoch_test_accuracy"]
        acc_ax.plot(range(1, len(ys) + 1), ys, "-o", ms=3, color=c, label=f"{r['model']} test accuracy")
        acc_ax.axhline(r["target"], ls="--", lw=1, color=c, label=f"{r['model']} target {r['target']:.2f}")
        if has_loss:
            loss_ax = axes[0][1]
            if r.get("per_epoch_train_loss"):
                tl = r["per_epoch_train_loss"]
                loss_ax.plot(range(1, len(tl) + 1), tl, "-o", ms=3, color=c, label=f"{r['model']} train loss")
            if r.get("per_epoch_test_loss"):
                te = r["per_epoch_test_loss"]
                loss_ax.plot(range(1, len(te) + 1), te, ":s", ms=3, color=c, label=f"{r['model']} test loss")
    acc_ax.set_xlabel("epoch")
    acc_ax.set_ylabel("test accuracy (10,000 images)")
    acc_ax.set_title("Fashion-MNIST test accuracy per epoch")
    acc_ax.legend(fontsize=8, loc="lower right")
    if has_loss:
        loss_ax.set_xlabel("epoch")
        loss_ax.set_ylabel("cross-entropy loss")
        loss_ax.set_title("Loss per epoch (train: mean over the epoch)")
        loss_ax.legend(fontsize=8)
    epochs = max((len(r["per_epoch_test_accuracy"]) for r in rows), default=1)
    for ax in axes[0]:  # whole epochs only
        ax.set_xticks(range(1, epochs + 1, max(1, epochs // 12)))
    fig.tight_layout()
    _save(plt, fig, path)


# ----------------------------------------------------------------------------- bench_batching
def bench_batching(doc: dict, path: Path) -> None:
    """Epoch time per configuration: first (prepare + fill cache), cached, no cache; log scale."""
    plt = _pyplot()
    if plt is None:
        return
    import numpy as np

    rows = doc["rows"]
    series = [("first_epoch_s", "epoch 1 (prepare + fill cache)", FLOOR),
              ("cached_epoch_s", "later epoch, cached", OURS), ("nocache_epoch_s", "later epoch, no cache", PEER)]
    x, w = np.arange(len(rows)), 0.27
    fig, ax = plt.subplots(figsize=(9.5, 4.2))
    for i, (key, label, colour) in enumerate(series):
        bars = ax.bar(x + (i - 1) * w, [r[key] * 1e3 for r in rows], w, label=label, color=colour)
        _label_bars(ax, bars, lambda v: f"{v:.0f}" if v >= 10 else f"{v:.1f}")
    _log_if_wide(ax, [r[k] * 1e3 for r in rows for k, _, _ in series], "ms per epoch ({scale}lower is better)")
    ax.set_xticks(x, [f"batch {r['batch']}\n{'flattened' if r['flatten'] else '28×28'}"
                      f"{' + flips' if r['augment'] else ''}\nspeedup {r['speedup']:.1f}×" for r in rows],
                  fontsize=8)
    ax.set_title("Preparing the training set's batches, per epoch: first vs cached vs no cache")
    ax.legend(fontsize=8, ncols=3, loc="upper center", bbox_to_anchor=(0.5, -0.2))
    _save(plt, fig, path)


# ----------------------------------------------------------------------------- pipeline
def pipeline(rows: list[dict], path: Path) -> None:
    """One Gantt panel per run: each step's bar from start to end (ran vs cache hit), serve runs marked."""
    plt = _pyplot()
    if plt is None:
        return
    rows = [r for r in rows if r.get("steps")]
    if not rows:
        print("plot skipped: these rows carry no step times (rerun experiments/pipeline.py to record them)",
              file=sys.stderr)
        return
    from matplotlib.patches import Patch

    colour = {"ran": OURS, "hit": "#2ca02c", "other": "#d62728"}
    fig, axes = plt.subplots(len(rows), 1, figsize=(9, 1.0 + 1.9 * len(rows)), squeeze=False)
    for ax, r in zip(axes[:, 0], rows):
        steps = r["steps"]
        names = [s["name"] for s in steps]
        for y, s in enumerate(steps):
            if s["start"] is None or s["end"] is None:
                continue
            kind = "hit" if s["cache"] == "hit" else "ran" if s["state"] == "done" else "other"
            ax.barh(y, max(s["end"] - s["start"], 0), left=s["start"], height=0.6, color=colour[kind])
            if s["end"] - s["start"] < 0.01 * r["wall_s"]:  # too short to see as a bar: a dot marks it
                ax.plot(s["start"], y, "o", ms=4, color=colour[kind])
        if "serve" in names:
            y = names.index("serve")
            for ev in r.get("timeline", []):
                ax.plot(ev["t"], y, "v", ms=7, color="black")
                ax.annotate(", ".join(ev["serving"]), (ev["t"], y), xytext=(0, 7), textcoords="offset points",
                            ha="center", fontsize=6.5)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.set_ylim(len(names) - 0.4, -0.9)  # first step on top, room for the serve labels
        ax.set_xlim(0, max([s["end"] or 0 for s in steps] + [0.001]) * 1.06)
        ax.set_title(f"{r['run']}: {r['wall_s']:.1f} s wall (incl. fleet start/stop), "
                     f"{r['vs_cold']:.2f}× cold", fontsize=9, loc="left")
        ax.grid(axis="y", visible=False)
    axes[-1, 0].set_xlabel("seconds since the workflow began (each panel its own scale)")
    fig.legend(handles=[Patch(color=colour["ran"], label="ran"), Patch(color=colour["hit"], label="cache hit"),
                        Patch(color=colour["other"], label="failed / skipped"),
                        plt.Line2D([], [], marker="v", ls="", color="black", label="serve run finished (serving)")],
               loc="upper right", ncols=4, fontsize=8)
    fig.suptitle("Pipeline steps over time", x=0.01, ha="left", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    _save(plt, fig, path)


# ----------------------------------------------------------------------------- bench_rpc
def bench_rpc(rows: list[dict], path: Path) -> None:
    """One panel per metric: dmlsys vs raw pyzmq for each transport, the ratio under each pair."""
    plt = _pyplot()
    if plt is None:
        return
    import numpy as np

    metrics = [m for m in ("latency", "throughput", "array") if any(r["metric"] == m for r in rows)]
    transports = sorted({r["transport"] for r in rows}, key=["tcp", "ipc"].index)
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.4 * len(metrics), 3.6), squeeze=False)
    better = {"latency": "lower is better", "throughput": "higher is better", "array": "higher is better"}
    for ax, metric in zip(axes[0], metrics):
        got = {r["transport"]: r for r in rows if r["metric"] == metric}
        x = np.arange(len(transports))
        for i, (key, label, colour) in enumerate((("ours", "dmlsys", OURS), ("raw", "raw pyzmq", PEER))):
            bars = ax.bar(x + (i - 0.5) * 0.38, [got[t][key] for t in transports], 0.38, label=label, color=colour)
            _label_bars(ax, bars)
        unit = got[transports[0]]["unit"]
        ax.set_ylim(0, max(max(got[t]["ours"], got[t]["raw"]) for t in transports) * 1.2)
        ax.set_xticks(x, [f"{t}\nratio {got[t]['ratio']:.2f}×" for t in transports])
        ax.set_title(f"{metric} ({unit}, {better[metric]})", fontsize=9)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"dmlsys RPC vs raw pyzmq (medians of {rows[0].get('repeats', '?')} alternating runs)", fontsize=10)
    _save(plt, fig, path)


# ----------------------------------------------------------------------------- train_data_parallel
def train_data_parallel(rows: list[dict], path: Path) -> None:
    """samples/s per worker count for each model and XLA threading, comm fraction on each bar
    (the first row of each configuration, as the tables in docs/collective.md)."""
    plt = _pyplot()
    if plt is None:
        return
    import numpy as np

    first: dict[tuple, dict] = {}
    for r in rows:
        first.setdefault((r["model"], bool(r.get("single_thread")), r["n"]), r)
    models = list(dict.fromkeys(m for m, _, _ in first))
    counts = sorted({n for _, _, n in first})
    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 3.8), squeeze=False)
    for ax, model in zip(axes[0], models):
        x = np.arange(len(counts))
        for i, (single, label, colour) in enumerate(((False, "XLA default threads", OURS),
                                                     (True, "one XLA thread per worker", OURS_ALT))):
            got = [first.get((model, single, n)) for n in counts]
            bars = ax.bar(x + (i - 0.5) * 0.38, [g["samples_per_s"] if g else np.nan for g in got], 0.38,
                          label=label, color=colour)
            _label_bars(ax, bars, fmt=lambda v: f"{v:,.0f}")
            for b, g in zip(bars, got):
                if g and g["n"] > 1:
                    ax.annotate(f"comm {g['comm_fraction']:.0%}", (b.get_x() + b.get_width() / 2, b.get_height() / 2),
                                ha="center", fontsize=7, rotation=90, color="white")
        ax.set_xticks(x, [f"{n} worker{'s' if n > 1 else ''}" for n in counts])
        ax.set_ylabel("samples/s (higher is better)")
        ax.set_title(model, fontsize=10)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Data-parallel training throughput over ZeroMQ (global batch fixed)", fontsize=10)
    _save(plt, fig, path)


# ----------------------------------------------------------------------------- bench_allreduce
def bench_allreduce(rows: list[dict], path: Path) -> None:
    """busbw against buffer size, one panel per world size: the fair pair (our socket path over
    TCP, gloo over TCP) in solid lines, Open MPI's tcp BTL dashed, the shared-memory rows
    (ours, MPI's vader) dotted; the x gloo ratio of the fair pair under each size."""
    plt = _pyplot()
    if plt is None:
        return
    worlds = sorted({r["n"] for r in rows})
    fig, axes = plt.subplots(1, len(worlds), figsize=(4.6 * len(worlds), 3.8), squeeze=False)
    for ax, n in zip(axes[0], worlds):
        mine = [r for r in rows if r["n"] == n]
        sizes = sorted({r["bytes"] for r in mine})
        x = {b: i for i, b in enumerate(sizes)}
        fair = sorted((r for r in mine if r.get("headline")), key=lambda r: r["bytes"])
        shm = sorted((r for r in mine if r["path"] == "shm"), key=lambda r: r["bytes"])
        series = [
            ("dmlsys ring/direct, tcp", fair, "ours_busbw", OURS, "-"),
            ("gloo, tcp", fair, "gloo_busbw", PEER, "-"),
            ("Open MPI, tcp BTL", fair, "mpi_tcp_busbw", FLOOR, "--"),
            ("dmlsys shm", shm, "ours_busbw", OURS_ALT, ":"),
            ("Open MPI, vader (shm)", fair, "mpi_shm_busbw", "#bbbbbb", ":"),
        ]
        for label, rs, key, colour, style in series:
            pts = [(x[r["bytes"]], r[key]) for r in rs if key in r]
            if pts:
                ax.plot(*zip(*pts), style, marker="o", ms=3, color=colour, label=label)
        ticks = []
        for b in sizes:
            head = next((r for r in fair if r["bytes"] == b), None)
            ratio = f"\n{head['ours_vs_gloo']:.2f}× gloo" if head and "ours_vs_gloo" in head else ""
            ticks.append(f"{b >> 20} MiB{ratio}" if b >= 1 << 20 else f"{b >> 10} KiB{ratio}")
        ax.set_xticks(range(len(sizes)), ticks, fontsize=7)
        ax.set_ylabel("busbw, GB/s (higher is better)")
        ax.set_title(f"N = {n}", fontsize=10)
    axes[0][0].legend(fontsize=7)
    machine = rows[0].get("machine", "") if rows else ""
    fig.suptitle("allreduce busbw over loopback (float32 sum, no keys)" + (f"\n{machine}" if machine else ""),
                 fontsize=8, y=1.05)
    _save(plt, fig, path)


def load_json(path: str) -> Any:
    import json

    return json.loads(Path(path).read_text())


def ps_vs_allreduce(rows: list[dict[str, Any]], path: Path) -> None:
    """experiments/ps_vs_allreduce.py: step time and bytes per step of each configuration, the
    collective's bars in the peer colour; refused configurations marked, not drawn."""
    plt = _pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.42 * len(rows) + 1.5), sharey=True)
    labels = [f"{r['model']} · {r['via']}" + (f" {r['consistency']}" if r.get("consistency") else "")
              + (f" ×{r['shards']}" if r.get("shards") else "") for r in rows]
    colours = [PEER if r["via"] == "allreduce" else OURS for r in rows]
    y = list(range(len(rows)))[::-1]
    for ax, key, title, scale in ((axes[0], "step_ms", "step time (ms)", 1.0),
                                  (axes[1], "bytes_per_step", "KiB per step, rank 0 in + out", 1 / 1024)):
        values = [(r.get(key) or 0) * scale for r in rows]
        bars = ax.barh(y, values, color=colours)
        for yi, r, v in zip(y, rows, values):
            ax.text(v, yi, " refused (memory cap)" if r.get("error") else f" {_num(v)}" if v else "",
                    va="center", fontsize=8)
        del bars
        ax.set_title(title)
        ax.set_yticks(y, labels, fontsize=8)
    fig.suptitle("parameter servers (blue) vs ring allreduce (orange), 2 workers, one process (provisional)")
    _save(plt, fig, path)
