"""The sharded-services scenario: tag every garment on a 5,600 x 5,600 Fashion-MNIST canvas.

A canvas holds ``--garments`` test images pasted at random, non-overlapping positions
(``dmlsys.sharding.canvas.make_canvas``, which keeps the truth). Two ways to tag it, side by side
in one run, alternated:

  replica   one process tags the whole canvas at once (what a replica without a memory cap does)
  router    the sharding router splits it into overlapping tiles (cores of --cell pixels plus a
            16-pixel margin), sends them over ZeroMQ to 1, 2 or 4 shard processes, merges and
            cleans up (each garment once, none cut at a tile edge)
  http      the same with 4 shards, but as a client sees it: the canvas POSTed as a PNG to the
            router's door (POST /v1/models/canvas:tag), decoded there, answered as JSON

A replica with an input cap (--replica-cap bytes, default 16 MiB) refuses the canvas: the run
prints the 413 it would answer (dmlsys.sharding.door.check_input, what a capped replica calls).

Both use the same detector and the same classifier (a numpy softmax regression trained here on
the 60,000 training images, about 0.84 test accuracy), so precision and recall differ only if
tiling loses or duplicates garments. Detection matches a garment when the found centre is within
2 pixels; "tagged" also needs the class right.

The machine is shared (2 cores, other work running): times are provisional, and more shards than
cores cannot help. Read the precision/recall columns as exact, the times as indicative.

    python experiments/sharded_canvas.py --json docs/sharded_canvas.json   # also writes the .png
    python experiments/sharded_canvas.py --post http://127.0.0.1:8100        # one canvas to a running
                                                                           # cluster (cluster/sharding.toml)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SHARD_COUNTS = (1, 2, 4)


def shard_process(name: str, model: str, state_dir: str, queue, stop) -> None:
    """One shard node on ZeroMQ, serving the canvas app until ``stop`` is set."""
    os.environ["DMLSYS_CANVAS_MODEL"] = model
    import uvloop

    from dmlsys.node import Directory, Member, Node
    from dmlsys.sharding.canvas import canvas
    from dmlsys.sharding.shard import ShardConfig, ShardService
    from dmlsys.wire.zmq_transport import ZmqTransport

    async def main() -> None:
        # The router is in our directory so that our transport admits it.
        node = Node(name, ZmqTransport(name, "tcp://127.0.0.1:0"), role="shard",
                    directory=Directory([Member("router", "router", "tcp://127.0.0.1:9")]))
        node.add_service(ShardService(ShardConfig(state_dir, fsync=False), app=canvas()))
        await node.start()
        queue.put((name, node.transport.address))
        while not stop.is_set():
            await asyncio.sleep(0.1)
        await node.stop(1)

    uvloop.run(main())


async def run_router(addresses: dict[str, str], canvas_img, cell: int, reps: int, counts, app) -> dict:
    from dmlsys.node import Directory, Member, Node
    from dmlsys.sharding.router import RouterConfig, RouterService
    from dmlsys.wire.zmq_transport import ZmqTransport

    node = Node("router", ZmqTransport("router", "tcp://127.0.0.1:0"), role="router",
                directory=Directory([Member(n, "shard", a) for n, a in addresses.items()]))
    # One router service, its ring swapped between runs: the first n shards.
    routers = {n: sorted(addresses)[:n] for n in counts}
    svc = RouterService(RouterConfig(part_timeout=600.0, deadline=600.0, http="127.0.0.1:0"), app=app)
    node.add_service(svc)
    await node.start()
    out: dict[int, dict] = {n: {"seconds": [], "answer": None} for n in counts}
    for rep in range(reps + 1):  # rep 0 warms up (connections, imports on the shards)
        for n in counts:
            for m in list(svc.ring.names):
                svc.ring.remove(m)
            for m in routers[n]:
                svc.ring.add(m)
            t0 = time.perf_counter()
            answer = await svc.run({"canvas": canvas_img, "cell": cell})
            if rep:
                out[n]["seconds"].append(time.perf_counter() - t0)
            out[n]["answer"] = answer
            print(f"  router, {n} shard(s), rep {rep}: {time.perf_counter() - t0:.2f}s", file=sys.stderr)
        # The same through the HTTP door, all shards: PNG decode on the router, JSON back.
        from dmlsys.sharding import png

        body, n = png.encode(canvas_img), max(counts)
        for m in list(svc.ring.names):
            svc.ring.remove(m)
        for m in routers[n]:
            svc.ring.add(m)
        http = out.setdefault("http", {"seconds": [], "answer": None, "shards": n, "png_bytes": len(body)})
        t0 = time.perf_counter()
        doc = await post(f"{svc.door.url}/v1/models/canvas:tag?cell={cell}", body)
        if rep:
            http["seconds"].append(time.perf_counter() - t0)
        http["answer"] = [[g["y"], g["x"], g["class"]] for g in doc["garments"]]
        print(f"  http, {n} shard(s), rep {rep}: {time.perf_counter() - t0:.2f}s", file=sys.stderr)
    await node.stop(1)
    return out


async def post(url: str, body: bytes) -> dict:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        async with session.post(url, data=body, headers={"Content-Type": "image/png"},
                                timeout=aiohttp.ClientTimeout(total=600)) as reply:
            doc = await reply.json()
            if reply.status != 200:
                raise RuntimeError(f"{url}: {reply.status} {doc}")
            return doc


def post_to_cluster(args) -> None:
    """--post URL: one canvas to a running router's door; precision, recall and time."""
    from dmlsys.sharding import png
    from dmlsys.sharding.canvas import make_canvas, score
    from dmlsys.train import data

    ds = data.load()
    img, truth = make_canvas(ds.test_images, ds.test_labels, size=args.size, count=args.garments, seed=args.seed)
    body = png.encode(img)
    t0 = time.perf_counter()
    doc = asyncio.run(post(f"{args.post.rstrip('/')}/v1/models/canvas:tag?cell={args.cell}", body))
    seconds = time.perf_counter() - t0
    s = score(np.array([[g["y"], g["x"], g["class"]] for g in doc["garments"]]), truth, tolerance=2)
    print(f"{args.size}x{args.size} canvas, {args.garments} garments, {len(body)} bytes of PNG: {seconds:.2f}s through "
          f"{doc['shards']} shard(s), {doc['parts']} tiles; precision {s['precision']:.4f} recall {s['recall']:.4f} "
          f"tag precision {s['tag_precision']:.4f} tag recall {s['tag_recall']:.4f}")


def plot(rows: list[dict], path: Path) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    import _plot

    plt = _plot._pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6.5, 4))
    labels = [("one replica\n(whole canvas)" if r["config"] == "replica" else
               f"HTTP PNG\n{r['shards']} shard(s)" if r["config"] == "http" else f"router\n{r['shards']} shard(s)")
              for r in rows]
    colours = [_plot.PEER if r["config"] == "replica" else _plot.OURS_ALT if r["config"] == "http" else _plot.OURS
               for r in rows]
    bars = ax.bar(range(len(rows)), [r["seconds"] for r in rows], color=colours)
    _plot._label_bars(ax, bars)
    for i, r in enumerate(rows):
        ax.annotate(f"P {r['precision']:.3f}\nR {r['recall']:.3f}\ntag R {r['tag_recall']:.3f}",
                    (i, 0), xytext=(0, 4), textcoords="offset points", ha="center", fontsize=7, color="white")
    ax.set_xticks(range(len(rows)), labels)
    ax.set_ylabel("seconds per canvas (lower is better)")
    load = f"; load average {rows[0]['loadavg']:.0f} on {rows[0]['nproc']} cores" if "loadavg" in rows[0] else ""
    ax.set_title(f"Tagging a {rows[0]['size']}² canvas with {rows[0]['garments']} garments (median{load})", fontsize=9)
    _plot._save(plt, fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=5600)
    ap.add_argument("--garments", type=int, default=3000)
    ap.add_argument("--cell", type=int, default=700, help="tile core side in pixels (default 700: 64 tiles)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("--plot", metavar="PNG")
    ap.add_argument("--from-json", metavar="FILE")
    ap.add_argument("--replica-cap", type=int, default=16 << 20, help="a capped replica's max input bytes")
    ap.add_argument("--post", metavar="URL", help="send one canvas to a running router's door and score it")
    args = ap.parse_args()
    if args.post:
        return post_to_cluster(args)
    sys.path.insert(0, str(Path(__file__).parent))
    import _plot

    if args.from_json:
        out = _plot.plot_path(args.plot, args.from_json)
        return plot(_plot.load_json(args.from_json), out) if out else None

    from rich.console import Console
    from rich.table import Table

    from dmlsys.sharding.canvas import SoftmaxTagger, canvas_app, make_canvas, score, tiles
    from dmlsys.train import data

    ds = data.load()
    t0 = time.perf_counter()
    tagger = SoftmaxTagger.fit(ds.train_images, ds.train_labels)
    accuracy = float((tagger(ds.test_images) == ds.test_labels).mean())
    print(f"classifier: trained in {time.perf_counter() - t0:.1f}s, test accuracy {accuracy:.4f}", file=sys.stderr)
    img, truth = make_canvas(ds.test_images, ds.test_labels, size=args.size, count=args.garments, seed=args.seed)
    app = canvas_app(tagger)
    rows = []
    from dmlsys.sharding.door import check_input
    from dmlsys.sharding.errors import InputTooLarge

    try:
        check_input(img.nbytes, args.replica_cap, where="replica max_input_bytes")
        refusal = None
    except InputTooLarge as e:
        refusal = f"413 {e}"
    print(f"a replica capped at {args.replica_cap} bytes: {refusal or 'takes it'}", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        model = str(Path(tmp) / "tagger.npz")
        tagger.save(model)
        ctx = mp.get_context("spawn")
        queue, stop = ctx.Queue(), ctx.Event()
        procs = [ctx.Process(target=shard_process, args=(f"s{i}", model, str(Path(tmp) / f"s{i}"), queue, stop))
                 for i in range(max(SHARD_COUNTS))]
        for p in procs:
            p.start()
        try:
            addresses = dict(queue.get(timeout=120) for _ in procs)
            replica_times, replica_answer = [], None
            router = {}
            for rep in range(args.reps + 1):
                t0 = time.perf_counter()  # the replica: the whole canvas as one tile, in one process
                replica_answer = app.cleanup(app.merge([app.handle(k, p, None)[0]
                                                        for k, p in app.split({"canvas": img, "cell": args.size})]))
                if rep:
                    replica_times.append(time.perf_counter() - t0)
                print(f"  replica rep {rep}: {time.perf_counter() - t0:.2f}s", file=sys.stderr)
            router = asyncio.run(run_router(addresses, img, args.cell, args.reps, SHARD_COUNTS, app))
        finally:
            stop.set()
            for p in procs:
                p.join(10)
                if p.is_alive():
                    p.kill()
    base = {"size": args.size, "garments": args.garments, "cell": args.cell, "reps": args.reps,
            "classifier_accuracy": accuracy}
    s = score(np.array(replica_answer), truth, tolerance=2)
    rows.append({**base, "config": "replica", "shards": 0, "tiles": 1, "seconds": statistics.median(replica_times),
                 **{k: s[k] for k in ("precision", "recall", "tag_precision", "tag_recall")}})
    n_tiles = len(tiles(args.size, args.size, args.cell))
    for n in SHARD_COUNTS:
        s = score(np.array(router[n]["answer"]), truth, tolerance=2)
        rows.append({**base, "config": "router", "shards": n, "tiles": n_tiles,
                     "seconds": statistics.median(router[n]["seconds"]),
                     **{k: s[k] for k in ("precision", "recall", "tag_precision", "tag_recall")}})
    http = router["http"]
    s = score(np.array(http["answer"]), truth, tolerance=2)
    rows.append({**base, "config": "http", "shards": http["shards"], "tiles": n_tiles, "png_bytes": http["png_bytes"],
                 "seconds": statistics.median(http["seconds"]),
                 **{k: s[k] for k in ("precision", "recall", "tag_precision", "tag_recall")}})
    for r in rows:
        r["replica_cap"], r["replica_refusal"] = args.replica_cap, refusal
        r["loadavg"], r["nproc"] = os.getloadavg()[0], os.cpu_count()
    t = Table(title=f"{args.size}² canvas, {args.garments} garments, tiles of {args.cell} px cores; "
                    f"median of {args.reps}; classifier accuracy {accuracy:.3f}")
    headers = ["config", "shards", "tiles", "seconds", "vs replica", "precision", "recall", "tag precision",
               "tag recall"]
    for h in headers:
        t.add_column(h, justify="right")
    md = []
    for r in rows:
        cells = [r["config"], str(r["shards"] or "—"), str(r["tiles"]), f"{r['seconds']:.2f}",
                 f"{r['seconds'] / rows[0]['seconds']:.2f}×", f"{r['precision']:.4f}", f"{r['recall']:.4f}",
                 f"{r['tag_precision']:.4f}", f"{r['tag_recall']:.4f}"]
        t.add_row(*cells)
        md.append(cells)
    Console().print(t)
    print(f"\nmachine: nproc={os.cpu_count()} loadavg={' '.join(f'{x:.2f}' for x in os.getloadavg())}\n")
    print("| " + " | ".join(headers) + " |\n|" + "---|" * len(headers))
    for cells in md:
        print("| " + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    if out := _plot.plot_path(args.plot, args.json):
        plot(rows, out)


if __name__ == "__main__":
    main()
