"""Two hosts for real: network namespaces joined by a veth pair shaped like a LAN, then unshaped.

Needs root (``ip netns``, ``tc``). For each link shape (``lan``: ``tc qdisc ... netem rate 1gbit
delay 0.2ms`` on both ends of the veth pair, or ``tbf rate 1gbit`` where the kernel has no
netem, recorded in the output; ``unshaped``: the veth as it is, memory speed):

  allreduce  one process per host, float32 sums over TCP across the veth: ours (a Node with a
             CollectiveService and a ProcessGroup: the socket ring) and torch.distributed gloo in
             the same two processes, timed alternately sample by sample (bench_allreduce.py's
             method: barrier, ``inner`` back-to-back ops, the slower rank's time, the median).
             2 MiB is the gradient of the fashion-mlp (512, 256): what a training step reduces.
  train      a cluster (``up --host alpha`` / ``--host beta``) with one worker per host trains
             the fashion-mlp for two epochs (ring allreduce between the two hosts): the second
             epoch's samples/s and fraction of step time spent communicating (waiting for the
             other rank included), from the trainer's own stats.
  serve      the same cluster: the gateway on alpha, a replica on each host; a closed-loop load
             generator on alpha (``--concurrency`` HTTP clients for ``--seconds``): requests/s,
             p50 and p99 latency.

    sudo python experiments/multihost.py --json docs/multihost.json     # table + docs/multihost.png
    python experiments/multihost.py --from-json docs/multihost.json     # redraw the figure only

Both hosts are one machine's namespaces: they share its cores, so compute-bound numbers
(training samples/s, serving requests/s) say what the link costs, not what two machines give.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import multiprocessing as mp
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np

SHAPES = {"lan": "netem rate 1gbit delay 0.2ms", "unshaped": None}
# Without the sch_netem module (containers often lack it) the LAN keeps its rate, not its delay.
FALLBACK = {"lan": "tbf rate 1gbit burst 256kb latency 50ms"}
SIZES = (64 << 10, 2 << 20, 16 << 20)
CLONE_NEWNET = 0x40000000


# -- two hosts ----------------------------------------------------------------------------------


class Net:
    """Namespaces ``<tag>a`` and ``<tag>b`` joined by a veth pair, 10.x.y.1 and 10.x.y.2."""

    def __init__(self) -> None:
        pid = os.getpid()
        self.tag = f"mx{pid % 100000}"
        self.ns = {"alpha": f"{self.tag}a", "beta": f"{self.tag}b"}
        self.dev = {"alpha": f"{self.tag}va", "beta": f"{self.tag}vb"}
        net = f"10.{100 + pid % 50}.{pid % 250}"
        self.addr = {"alpha": f"{net}.1", "beta": f"{net}.2"}

    def __enter__(self) -> Net:
        if shutil.which("ip") is None or shutil.which("tc") is None:
            sys.exit("needs iproute2 (`ip`, `tc`)")
        self._run("ip", "netns", "add", self.ns["alpha"])
        self._run("ip", "netns", "add", self.ns["beta"])
        self._run("ip", "link", "add", self.dev["alpha"], "type", "veth", "peer", "name", self.dev["beta"])
        for host in ("alpha", "beta"):
            ns, dev = self.ns[host], self.dev[host]
            self._run("ip", "link", "set", dev, "netns", ns)
            self._run("ip", "-n", ns, "addr", "add", f"{self.addr[host]}/24", "dev", dev)
            self._run("ip", "-n", ns, "link", "set", dev, "up")
            self._run("ip", "-n", ns, "link", "set", "lo", "up")
        return self

    def __exit__(self, *exc) -> None:
        for ns in self.ns.values():
            for pid in subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)  # what our clusters left behind in our namespaces
                except ProcessLookupError:
                    pass
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)

    def shape(self, shape: str) -> str:
        """Apply ``shape`` to both ends of the veth pair; returns the qdisc actually applied."""
        applied = "none"
        for host in ("alpha", "beta"):
            ns, dev = self.ns[host], self.dev[host]
            subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root"], capture_output=True)
            for qdisc in (SHAPES[shape], FALLBACK.get(shape)):
                if not qdisc:
                    continue
                out = subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root",
                                      *qdisc.split()], capture_output=True, text=True)
                if out.returncode == 0:
                    applied = qdisc
                    break
                print(f"tc qdisc {qdisc}: {out.stderr.strip()}", file=sys.stderr)
            else:
                if SHAPES[shape]:
                    sys.exit(f"cannot shape the link as {shape!r}")
        return applied

    def exec(self, host: str, *argv: str, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.ns[host], *argv], **kw)

    @staticmethod
    def _run(*argv: str) -> None:
        out = subprocess.run(argv, capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"{' '.join(argv)}: {out.stderr.strip()} (needs root)")


def enter_netns(name: str) -> None:
    """Move this process (its only thread) into network namespace ``name`` before any socket exists."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {name}")
    finally:
        os.close(fd)


# -- allreduce: ours and gloo in the same two processes -------------------------------------------


def _allreduce_worker(rank: int, ns: str, dev: str, addrs: list[str], port: int, cfg: dict, conn) -> None:
    enter_netns(ns)
    signal.alarm(600)
    import uvloop

    try:
        result = uvloop.run(_allreduce(rank, dev, addrs, port, cfg, conn))
        if rank == 0:
            conn.send(("ok", result))
    except BaseException as e:
        conn.send(("error", f"rank {rank}: {type(e).__name__}: {e}"))
        raise


async def _allreduce(rank: int, dev: str, addrs: list[str], port: int, cfg: dict, conn) -> list[dict]:
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from dmlsys.assembly import ZmqTransports, build_node
    from dmlsys.collective import CollectiveService, ProcessGroup
    from dmlsys.node import Member

    names = ["r0", "r1"]
    node = build_node(Member(names[rank], "", f"tcp://{addrs[rank]}:0"), ZmqTransports(), services=[CollectiveService()])
    await node.start()
    conn.send(("address", node.transport.address))
    node.directory.update(Member(n, "", a) for n, a in conn.recv().items())
    group = ProcessGroup(node, names, timeout=120)
    os.environ["GLOO_SOCKET_IFNAME"] = dev
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://{addrs[0]}:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=300))
    await group.barrier()
    rows = []
    for nbytes in cfg["sizes"]:
        n = nbytes // 4
        buf = np.arange(n, dtype=np.float32) % 97 + rank  # sums of small integers: exact in float32
        want = 2 * (np.arange(n, dtype=np.float32) % 97) + 1
        ok_ours = bool(np.array_equal(await group.allreduce(buf, "sum"), want))
        t = torch.from_numpy(buf.copy())
        dist.all_reduce(t)
        ok_gloo = bool(np.array_equal(t.numpy(), want))
        tbuf = torch.from_numpy(buf.copy())

        async def gloo_op(tbuf=tbuf):
            dist.all_reduce(tbuf)  # synchronous: blocks this loop, as nothing else runs now

        impls = {"ours": lambda buf=buf: group.allreduce(buf, "sum"), "gloo": gloo_op}
        inner = max(1, min(20, (8 << 20) // nbytes))
        for fn in impls.values():
            await fn()
        per = {k: [] for k in impls}
        for i in range(cfg["samples"]):
            for name in (list(impls) if i % 2 == 0 else list(impls)[::-1]):
                dist.barrier()
                t0 = time.perf_counter()
                for _ in range(inner):
                    await impls[name]()
                per[name].append((time.perf_counter() - t0) / inner)
        for name, times in per.items():
            slowest = await group.allreduce(np.array(times), "max")
            rows.append({"impl": name, "bytes": nbytes, "inner": inner, "times": slowest.tolist(),
                         "verified": ok_ours if name == "ours" else ok_gloo})
    await group.barrier()
    dist.destroy_process_group()
    group.close()
    await node.stop()
    return rows


def run_allreduce(net: Net, args: argparse.Namespace) -> list[dict]:
    ctx = mp.get_context("spawn")
    port = 29500 + os.getpid() % 1000
    cfg = {"sizes": args.sizes, "samples": args.samples}
    addrs = [net.addr["alpha"], net.addr["beta"]]
    pipes = [ctx.Pipe() for _ in range(2)]
    procs = [ctx.Process(target=_allreduce_worker, daemon=True,
                         args=(r, net.ns[h], net.dev[h], addrs, port, cfg, pipes[r][1]))
             for r, h in enumerate(("alpha", "beta"))]
    for p in procs:
        p.start()
    try:
        addresses = {}
        for r, (conn, _) in enumerate(pipes):
            kind, value = conn.recv()
            if kind != "address":
                raise RuntimeError(value)
            addresses[f"r{r}"] = value
        for conn, _ in pipes:
            conn.send(addresses)
        kind, value = pipes[0][0].recv()
        if kind != "ok":
            raise RuntimeError(value)
        return value
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()


# -- a cluster across the two hosts: training and serving ------------------------------------------

SPEC = """
[cluster]
name = "multihost"
supervisor = "tcp://{a}:7300"
http = "{a}:7380"

[cluster.train.fashion-mlp]
arch = {{ kind = "mlp", hidden = [512, 256] }}
epochs = 2                        # the table reports the last: the first one compiles
batch_size = 128

[hosts.alpha]
address = "{a}"
[hosts.beta]
address = "{b}"

[[nodes]]
name = "gateway"
role = "gateway"
host = "alpha"

[[nodes]]
name = "worker"
role = "worker"
replicas = 2
hosts = ["alpha", "beta"]         # one per host
[nodes.config]
limit = {limit}
test_limit = 2000
single_thread = true
timeout = 300                     # a fresh worker's first compile, on a loaded machine

[[nodes]]
name = "replica"
role = "replica"
replicas = 2
hosts = ["alpha", "beta"]         # one per host
[nodes.config]
model = "fashion-mlp"
"""


class Cluster:
    def __init__(self, net: Net, tmp: Path, limit: int) -> None:
        self.net, self.tmp = net, tmp
        self.spec = tmp / "multihost.toml"
        self.spec.write_text(SPEC.format(a=net.addr["alpha"], b=net.addr["beta"], limit=limit))
        self.env = {**os.environ, "PYTHONPATH": str(ROOT)}
        for host in ("alpha", "beta"):
            (tmp / host).mkdir()

    def cli(self, host: str, *args: str, timeout: float = 600) -> str:
        out = self.net.exec(host, sys.executable, "-m", "dmlsys.cluster", *args, cwd=self.tmp / host, env=self.env,
                            capture_output=True, text=True, timeout=timeout)
        if out.returncode != 0:
            raise RuntimeError(f"{host}: {' '.join(args)}: {out.stdout}\n{out.stderr}")
        return out.stdout

    def up(self) -> None:
        self.cli("alpha", "up", str(self.spec), "--host", "alpha", "--detach")
        self.cli("alpha", "keys", "export", str(self.tmp / "key.txt"))
        self.cli("beta", "keys", "import", str(self.tmp / "key.txt"))
        self.cli("beta", "up", str(self.spec), "--host", "beta", "--detach")
        deadline = time.monotonic() + 300
        while json.loads(self.cli("alpha", "status", "--json"))["state"] != "ready":
            if time.monotonic() > deadline:
                raise RuntimeError("the cluster did not get ready in 300 s")
            time.sleep(1)

    def train(self) -> dict:
        code = textwrap.dedent("""
            import json, sys
            from pathlib import Path
            from dmlsys.cluster.__main__ import tell_supervisor
            _, reply = tell_supervisor(Path(".dmlsys"), "train", {"model": "fashion-mlp"}, timeout=1800)
            print(json.dumps(reply))
        """)
        out = self.net.exec("alpha", sys.executable, "-c", code, cwd=self.tmp / "alpha", env=self.env,
                            capture_output=True, text=True, timeout=1800)
        if out.returncode != 0:
            raise RuntimeError(out.stderr)
        return json.loads(out.stdout.strip().splitlines()[-1])

    def load(self, seconds: float, concurrency: int) -> dict:
        url = f"http://{self.net.addr['alpha']}:7380/v1/models/fashion-mlp:predict"
        out = self.net.exec("alpha", sys.executable, __file__, "load", url, "--seconds", str(seconds),
                            "--concurrency", str(concurrency), env=self.env, capture_output=True, text=True,
                            timeout=seconds + 120)
        if out.returncode != 0:
            raise RuntimeError(out.stderr)
        return json.loads(out.stdout)

    def down(self) -> None:
        for host in ("alpha", "beta"):
            try:
                self.cli(host, "down", timeout=120)
            except Exception as e:  # the namespaces are killed anyway
                print(f"down on {host}: {e}", file=sys.stderr)


async def _load(url: str, seconds: float, concurrency: int) -> dict:
    import aiohttp

    rng = np.random.default_rng(0)
    bodies = [json.dumps({"instances": [rng.random(784).round(3).tolist()]}).encode() for _ in range(16)]
    latencies: list[float] = []
    errors = 0
    end = time.monotonic() + seconds

    async def client(i: int, session) -> None:
        nonlocal errors
        k = i
        while time.monotonic() < end:
            t0 = time.perf_counter()
            try:
                async with session.post(url, data=bodies[k % len(bodies)],
                                        headers={"Content-Type": "application/json"}) as r:
                    await r.read()
                    if r.status != 200:
                        errors += 1
                        continue
            except aiohttp.ClientError:
                errors += 1
                continue
            latencies.append(time.perf_counter() - t0)
            k += 1

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        t0 = time.monotonic()
        await asyncio.gather(*(client(i, session) for i in range(concurrency)))
        took = time.monotonic() - t0
    latencies.sort()
    q = lambda f: latencies[min(len(latencies) - 1, int(f * len(latencies)))] if latencies else float("nan")
    return {"requests": len(latencies), "errors": errors, "rps": len(latencies) / took,
            "p50_ms": q(0.5) * 1e3, "p99_ms": q(0.99) * 1e3}


# -- report -------------------------------------------------------------------------------------


def fmt_size(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB"


def build_rows(raw: dict) -> list[dict]:
    rows = []
    for shape, parts in raw.items():
        rows.append({"shape": shape, "kind": "link", "what": f"qdisc: {parts.get('qdisc')}"})
        by = {}
        for r in parts.get("allreduce", []):
            by.setdefault(r["bytes"], {})[r["impl"]] = r
        for nbytes, impls in sorted(by.items()):
            ours, gloo = impls["ours"], impls["gloo"]
            ratio = statistics.median(g / o for g, o in zip(gloo["times"], ours["times"]))
            t = statistics.median(ours["times"])
            tg = statistics.median(gloo["times"])
            rows.append({"shape": shape, "what": f"allreduce {fmt_size(nbytes)}", "kind": "allreduce", "bytes": nbytes,
                         "ours_ms": t * 1e3, "gloo_ms": tg * 1e3, "ours_gbps": nbytes * 8 / t / 1e9,
                         "gloo_gbps": nbytes * 8 / tg / 1e9, "x_gloo": ratio,
                         "verified": ours["verified"] and gloo["verified"]})
        if "train" in parts:
            tr = parts["train"]
            rows.append({"shape": shape, "what": "train fashion-mlp, 1 worker per host", "kind": "train",
                         "samples_per_s": tr.get("samples_per_s"), "comm_fraction": tr.get("comm_fraction"),
                         "test_accuracy": tr.get("test_accuracy"), "workers": tr.get("workers")})
        if "serve" in parts:
            rows.append({"shape": shape, "what": "serve: gateway on alpha, replica on each host", "kind": "serve",
                         **parts["serve"]})
    return rows


def print_table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="two hosts (network namespaces, veth); provisional: a loaded 2-core machine")
    for col in ("link", "what", "ours", "gloo", "x gloo", "notes"):
        table.add_column(col, justify="right" if col in ("ours", "gloo", "x gloo") else "left")
    for r in rows:
        if r["kind"] == "link":
            table.add_row(r["shape"], r["what"], "", "", "", "")
        elif r["kind"] == "allreduce":
            table.add_row(r["shape"], r["what"], f"{r['ours_ms']:.2f} ms ({r['ours_gbps']:.2f} Gb/s)",
                          f"{r['gloo_ms']:.2f} ms ({r['gloo_gbps']:.2f} Gb/s)", f"{r['x_gloo']:.2f}",
                          "" if r["verified"] else "NOT VERIFIED")
        elif r["kind"] == "train":
            table.add_row(r["shape"], r["what"], f"{r['samples_per_s'] or 0:.0f} samples/s", "-", "-",
                          f"comm {100 * (r['comm_fraction'] or 0):.0f}% of step time, "
                          f"test acc {r['test_accuracy'] or 0:.3f}")
        else:
            table.add_row(r["shape"], r["what"], f"{r['rps']:.0f} req/s", "-", "-",
                          f"p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, errors {r['errors']}")
    Console(width=160).print(table)


def plot(rows: list[dict], path: Path) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from _plot import OURS, PEER, _pyplot, _save

    plt = _pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    ar = [r for r in rows if r["kind"] == "allreduce"]
    sizes = sorted({r["bytes"] for r in ar})
    ax = axes[0]
    width = 0.2
    for i, shape in enumerate(shapes):
        for j, (impl, color) in enumerate((("ours", OURS), ("gloo", PEER))):
            vals = [next((r[f"{impl}_gbps"] for r in ar if r["shape"] == shape and r["bytes"] == s), 0) for s in sizes]
            xs = [k + (2 * i + j - 1.5) * width for k in range(len(sizes))]
            ax.bar(xs, vals, width, color=color, alpha=1.0 if shape == shapes[0] else 0.55,
                   label=f"{impl} ({shape})")
    ax.set_xticks(range(len(sizes)), [fmt_size(s) for s in sizes])
    ax.set_ylabel("allreduce algbw (Gb/s)")
    ax.set_title("allreduce across two hosts")
    ax.legend(fontsize=7)
    tr = [r for r in rows if r["kind"] == "train"]
    axes[1].bar([r["shape"] for r in tr], [r["samples_per_s"] or 0 for r in tr], color=OURS)
    for k, r in enumerate(tr):
        axes[1].text(k, (r["samples_per_s"] or 0), f"comm {100 * (r['comm_fraction'] or 0):.0f}%", ha="center",
                     va="bottom", fontsize=8)
    axes[1].set_ylabel("training samples/s")
    axes[1].set_title("data parallel, 1 worker per host")
    sv = [r for r in rows if r["kind"] == "serve"]
    axes[2].bar([r["shape"] for r in sv], [r["p50_ms"] for r in sv], color=OURS, label="p50")
    axes[2].bar([r["shape"] for r in sv], [r["p99_ms"] - r["p50_ms"] for r in sv], bottom=[r["p50_ms"] for r in sv],
                color=OURS, alpha=0.4, label="p99")
    for k, r in enumerate(sv):
        axes[2].text(k, r["p99_ms"], f"{r['rps']:.0f} req/s", ha="center", va="bottom", fontsize=8)
    axes[2].set_ylabel("latency (ms)")
    axes[2].set_title("serving: door on alpha, replicas on both")
    axes[2].legend(fontsize=7)
    _save(plt, fig, path)


# -- main ---------------------------------------------------------------------------------------


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "load":  # the load generator, run inside alpha's namespace
        p = argparse.ArgumentParser(prog="multihost.py load")
        p.add_argument("cmd")
        p.add_argument("url")
        p.add_argument("--seconds", type=float, default=5.0)
        p.add_argument("--concurrency", type=int, default=16)
        a = p.parse_args()
        print(json.dumps(asyncio.run(_load(a.url, a.seconds, a.concurrency))))
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="lan,unshaped", help="link shapes, in order (lan, unshaped)")
    p.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=list(SIZES),
                   help="allreduce sizes in bytes, comma-separated")
    p.add_argument("--samples", type=int, default=7)
    p.add_argument("--seconds", type=float, default=6.0, help="serving load per shape")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--limit", type=int, default=12000, help="training samples per epoch")
    p.add_argument("--no-cluster", action="store_true", help="allreduce only")
    p.add_argument("--workdir", help="keep the two hosts' working directories (logs) here instead of a temporary one")
    p.add_argument("--json")
    p.add_argument("--plot")
    p.add_argument("--from-json")
    args = p.parse_args()
    if args.from_json:
        rows = json.loads(Path(args.from_json).read_text())["rows"]
        print_table(rows)
        plot(rows, Path(args.plot or Path(args.from_json).with_suffix(".png")))
        return 0
    raw: dict[str, dict] = {}
    with Net() as net, tempfile.TemporaryDirectory(prefix="multihost_") as tmp:
        if args.workdir:
            tmp = args.workdir
            shutil.rmtree(tmp, ignore_errors=True)
            Path(tmp).mkdir(parents=True)
        cluster = None
        try:
            if not args.no_cluster:
                cluster = Cluster(net, Path(tmp), args.limit)
                cluster.up()  # trains the first version on alpha's worker, serves it on both hosts
            for shape in args.shapes.split(","):
                qdisc = net.shape(shape)
                print(f"link {shape}: {qdisc}", file=sys.stderr)
                raw[shape] = {"qdisc": qdisc, "allreduce": run_allreduce(net, args)}
                if cluster is not None:
                    raw[shape]["train"] = cluster.train()
                    raw[shape]["serve"] = cluster.load(args.seconds, args.concurrency)
        finally:
            if cluster is not None:
                cluster.down()
    rows = build_rows(raw)
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "raw": raw, "machine": os.uname().nodename,
                                               "cpus": os.cpu_count()}, indent=2))
    target = Path(args.plot) if args.plot else Path(args.json).with_suffix(".png") if args.json else None
    if target is not None:
        plot(rows, target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
