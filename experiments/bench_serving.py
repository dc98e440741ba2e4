#!/usr/bin/env python3
"""Serving throughput and failover: dmlsys (front door + balancer + N replicas) vs nginx.

Side by side, in one run, on this machine, the same MLP (784 -> 256 -> 10, the anchor's seeded
weights) served by

  dmlsys  `python -m dmlsys.cluster up` of a gateway and N replica nodes (adaptive batching);
  nginx   nginx round-robin with upstream keepalive in front of N plain aiohttp replicas
          (shared/anchors/serving/replica.py and nginx.conf.tmpl, unchanged).

Load: wrk -t1 with the anchors' post.lua (a fixed 784-pixel body), 64 connections by default.
For each N in --replicas both systems are up at once and their runs alternate, so drift in the
machine's load hits both alike. Failover: 3 fresh replicas under load, one SIGKILLed at
--kill-at seconds; failed = non-2xx + socket errors as wrk counts them. nginx runs with its
defaults and with `proxy_next_upstream ... non_idempotent` (the anchors' two variants).

Rows (--json FILE): kind (load | failover), system (dmlsys | nginx), replicas, rps, p50_ms,
p99_ms, failed, plus variant and round. Needs nginx and wrk (apt-get install -y nginx-light wrk).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
NGINX = "/usr/sbin/nginx"
WRK = "/usr/bin/wrk"
MODEL = "bench-mlp"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, method: str = "GET", body: bytes | None = None) -> None:
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            req = urllib.request.Request(url, data=body, method=method, headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer 200 within {timeout}s")


class Procs:
    """Every process this script starts, stopped by PID at the end."""

    def __init__(self) -> None:
        self.live: list[subprocess.Popen] = []

    def spawn(self, args: list[str], logfile: Path, **kw) -> subprocess.Popen:
        p = subprocess.Popen(args, stdout=open(logfile, "ab"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **kw)
        self.live.append(p)
        return p

    def stop(self, p: subprocess.Popen) -> None:
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        if p in self.live:
            self.live.remove(p)

    def stop_all(self) -> None:
        for p in list(self.live):
            self.stop(p)


PROCS = Procs()


# -- the model, in both systems -------------------------------------------------------------------


def make_store(root: Path, anchors: Path) -> None:
    """The anchor replica's weights, saved as a dmlsys model: the very same MLP on both sides."""
    sys.path.insert(0, str(ROOT))
    import importlib.util

    from dmlsys.train.store import ModelStore

    spec = importlib.util.spec_from_file_location("anchor_replica", anchors / "replica.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    w1, b1, w2, b2 = mod.make_weights(0)
    ModelStore(root).save(MODEL, {"dense0": {"w": w1, "b": b1}, "out": {"w": w2, "b": b2}},
                          {"arch": {"kind": "mlp", "hidden": [256]}})


# -- dmlsys -------------------------------------------------------------------------------------


class Dmlsys:
    def __init__(self, work: Path, store: Path, replicas: int, args) -> None:
        self.dir = work / f"dmlsys-{replicas}-{time.monotonic_ns()}"
        self.dir.mkdir()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1/models/{MODEL}:predict"
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), "DMLSYS_LOG": "WARNING"}
        (self.dir / "spec.toml").write_text(f"""
[cluster]
name = "bench"
store = "{store}"
http = "127.0.0.1:{self.port}"

[[nodes]]
name = "gateway"
role = "gateway"
[nodes.config]
policy = "{args.policy}"
probe_period = 0.25
try_timeout = 1.0

[[nodes]]
name = "replica"
role = "replica"
replicas = {replicas}
[nodes.config]
model = "{MODEL}"
""")

    def cli(self, *a: str, timeout: float = 180) -> str:
        r = subprocess.run([PY, "-m", "dmlsys.cluster", *a], cwd=self.dir, env=self.env, capture_output=True,
                           text=True, timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(f"dmlsys.cluster {a} failed:\n{r.stdout}\n{r.stderr}")
        return r.stdout

    def up(self, attempts: int = 3) -> None:
        # `up` picks free ports and nodes bind them a moment later; on a busy machine another
        # process can take one in between. The supervisor then fails cleanly: try again.
        for attempt in range(attempts):
            try:
                self.cli("up", "--detach", "spec.toml")
                return
            except RuntimeError as e:
                if attempt == attempts - 1 or "address already in use" not in str(e):
                    raise
                log(f"  dmlsys up lost a port race; retrying ({e.args[0].splitlines()[-2].strip()[:120]})")

    def replica_pids(self) -> list[int]:
        state = json.loads((self.dir / ".dmlsys" / "state.json").read_text())
        return [n["pid"] for n in state["nodes"] if n["role"] == "replica"]

    def down(self) -> None:
        with contextlib.suppress(Exception):
            self.cli("down", timeout=120)


# -- nginx --------------------------------------------------------------------------------------


class Nginx:
    def __init__(self, work: Path, anchors: Path, replicas: int, variant: str = "defaults") -> None:
        self.dir = work / f"nginx-{replicas}-{variant}-{time.monotonic_ns()}"
        (self.dir / "tmp").mkdir(parents=True)
        self.anchors = anchors
        self.ports = [free_port() for _ in range(replicas)]
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/predict"
        self.variant = variant
        self.replicas: list[subprocess.Popen] = []
        self.master: subprocess.Popen | None = None

    def up(self) -> None:
        for p in self.ports:
            self.replicas.append(PROCS.spawn([PY, str(self.anchors / "replica.py"), "--port", str(p)],
                                             self.dir / f"replica-{p}.log"))
        for p in self.ports:
            wait_http(f"http://127.0.0.1:{p}/ready", 30)
        retry = self.variant == "retry-nonidem"
        params = " max_fails=1 fail_timeout=5s" if retry else ""
        extra = "            proxy_next_upstream error timeout http_502 non_idempotent;\n" if retry else ""
        upstream = ("    upstream pool {\n" + "".join(f"        server 127.0.0.1:{p}{params};\n" for p in self.ports)
                    + "        keepalive 64;\n        keepalive_requests 1000000;\n    }")
        server = (f"    server {{\n        listen 127.0.0.1:{self.port} backlog=1024;\n"
                  f"        location = /nginx-ready {{ return 200 'ok'; }}\n        location / {{\n"
                  f"            proxy_http_version 1.1;\n            proxy_set_header Connection \"\";\n"
                  f"            proxy_pass http://pool;\n{extra}        }}\n    }}")
        text = (self.anchors / "nginx.conf.tmpl").read_text()
        for k, v in {"workers": "1", "rundir": str(self.dir), "name": "bench", "access_log": "off",
                     "upstreams": upstream, "servers": server}.items():
            text = text.replace("{{" + k + "}}", v)
        conf = self.dir / "nginx.conf"
        conf.write_text(text)
        os.chmod(self.dir / "tmp", 0o777)
        err = str(self.dir / "error.log")
        self.master = PROCS.spawn([NGINX, "-p", str(self.dir), "-e", err, "-c", str(conf)], self.dir / "nginx.out")
        wait_http(f"http://127.0.0.1:{self.port}/nginx-ready", 10)

    def replica_pids(self) -> list[int]:
        return [p.pid for p in self.replicas]

    def down(self) -> None:
        if self.master is not None:
            PROCS.stop(self.master)
        for p in self.replicas:
            PROCS.stop(p)


# -- load ---------------------------------------------------------------------------------------


def wrk(args, url: str, body: Path, duration: float, kill_pid: int | None = None, kill_at: float = 0.0) -> dict:
    duration = max(1, int(round(duration)))
    cmd = ["timeout", "-k", "5", str(duration + 30), WRK, "-t1", f"-c{args.conns}", f"-d{duration}s",
           "--timeout", "5s", "-s", str(args.anchors / "post.lua"), url, "--", str(body), str(args.cap)]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if kill_pid is not None:
        time.sleep(kill_at)
        with contextlib.suppress(ProcessLookupError):
            os.kill(kill_pid, signal.SIGKILL)
    out, err = p.communicate(timeout=duration + 60)
    m = re.search(r"^WRKJSON (\{.*\})$", out, re.M)
    if not m:
        raise RuntimeError(f"wrk failed rc={p.returncode}: {err[-400:]} {out[-400:]}")
    r = json.loads(m.group(1))
    failed = r["status"] + r["connect"] + r["read"] + r["write"] + r["timeout"]
    return {"rps": round(r["requests"] / (r["duration_us"] / 1e6), 1), "p50_ms": r["p50_us"] / 1000,
            "p99_ms": r["p99_us"] / 1000, "failed": failed, "requests": r["requests"]}


def bodies(work: Path) -> tuple[Path, Path]:
    rng = random.Random(123)  # the anchors' body: 784 pixels with 4 decimals
    x = [round(rng.random(), 4) for _ in range(784)]
    ours, theirs = work / "body-dmlsys.json", work / "body-nginx.json"
    ours.write_text(json.dumps({"instances": [x]}, separators=(",", ":")))
    theirs.write_text(json.dumps({"x": x}, separators=(",", ":")))
    return ours, theirs


def phase_load(args, work: Path, store: Path, emit) -> None:
    ours_body, nginx_body = bodies(work)
    for n in args.replicas:
        mine, peer = Dmlsys(work, store, n, args), Nginx(work, args.anchors, n)
        try:
            log(f"load, {n} replica(s): starting both systems")
            mine.up()
            peer.up()
            wait_http(mine.url, 30, "POST", ours_body.read_bytes())
            systems = [("dmlsys", mine.url, ours_body), ("nginx", peer.url, nginx_body)]
            for name, url, body in systems:
                wrk(args, url, body, args.warmup)
            for rnd in range(args.rounds):
                for name, url, body in (systems if rnd % 2 == 0 else systems[::-1]):
                    row = {"kind": "load", "system": name, "replicas": n, "round": rnd, "conns": args.conns,
                           **wrk(args, url, body, args.duration)}
                    emit(row)
                    log(f"  {name:6s} N={n} round {rnd}: {row['rps']:8.1f} req/s p50 {row['p50_ms']:.2f} ms "
                        f"p99 {row['p99_ms']:.2f} ms failed {row['failed']}")
        finally:
            mine.down()
            peer.down()


def phase_failover(args, work: Path, store: Path, emit) -> None:
    ours_body, nginx_body = bodies(work)
    for rnd in range(args.fo_rounds):
        for variant in ("dmlsys", "defaults", "retry-nonidem"):
            system = Dmlsys(work, store, 3, args) if variant == "dmlsys" else Nginx(work, args.anchors, 3, variant)
            body = ours_body if variant == "dmlsys" else nginx_body
            try:
                system.up()
                wait_http(system.url, 30, "POST", body.read_bytes())
                victim = system.replica_pids()[1]
                row = {"kind": "failover", "system": "dmlsys" if variant == "dmlsys" else "nginx",
                       "variant": "default" if variant == "dmlsys" else variant, "replicas": 3, "round": rnd,
                       "conns": args.conns,
                       **wrk(args, system.url, body, args.fo_duration, kill_pid=victim, kill_at=args.kill_at)}
                emit(row)
                log(f"  failover {row['system']} ({row['variant']}): failed {row['failed']} of {row['requests']}, "
                    f"{row['rps']:.0f} req/s, p99 {row['p99_ms']:.1f} ms")
            finally:
                system.down()


def table(rows: list[dict], args) -> str:
    from rich.console import Console
    from rich.table import Table

    out = []
    t = Table(title=f"load: wrk -t1 -c{args.conns}, {args.duration} s runs, median over {args.rounds} round(s)")
    for col in ("replicas", "system", "req/s", "p50 ms", "p99 ms", "failed", "req/s ratio", "p99 ratio",
                "paired req/s ratios"):
        t.add_column(col, justify="right")
    md = ["| replicas | system | req/s | p50 ms | p99 ms | failed | req/s vs nginx | p99 vs nginx | "
          "req/s vs nginx, per round |", "|---|---|---|---|---|---|---|---|---|"]
    for n in args.replicas:
        med = {}
        for system in ("dmlsys", "nginx"):
            rs = [r for r in rows if r["kind"] == "load" and r["system"] == system and r["replicas"] == n]
            if rs:
                med[system] = {k: statistics.median(r[k] for r in rs) for k in ("rps", "p50_ms", "p99_ms")}
                med[system]["failed"] = sum(r["failed"] for r in rs)
        # Runs of one round are back to back, so their ratio cancels most of the machine's drift.
        by_round = {}
        for r in rows:
            if r["kind"] == "load" and r["replicas"] == n:
                by_round.setdefault(r["round"], {})[r["system"]] = r["rps"]
        paired = [v["dmlsys"] / v["nginx"] for _, v in sorted(by_round.items()) if len(v) == 2]
        for system, m in med.items():
            ratio = p99r = pr = ""
            if system == "dmlsys" and "nginx" in med:
                ratio = f"{m['rps'] / med['nginx']['rps']:.2f}x"
                p99r = f"{m['p99_ms'] / med['nginx']['p99_ms']:.2f}x"
                pr = ", ".join(f"{x:.2f}" for x in paired)
            cells = [str(n), system, f"{m['rps']:.0f}", f"{m['p50_ms']:.2f}", f"{m['p99_ms']:.2f}", str(m["failed"]),
                     ratio, p99r, pr]
            t.add_row(*cells)
            md.append("| " + " | ".join(cells) + " |")
    Console(stderr=True).print(t)
    out += md
    fo = [r for r in rows if r["kind"] == "failover"]
    if fo:
        t = Table(title=f"failover: 3 replicas, wrk -c{args.conns} for {args.fo_duration} s, SIGKILL one at {args.kill_at} s")
        for col in ("system", "variant", "failed per run", "requests per run", "req/s", "p99 ms"):
            t.add_column(col, justify="right")
        out += ["", "| system | variant | failed per run | requests per run | req/s | p99 ms |", "|---|---|---|---|---|---|"]
        for key in sorted({(r["system"], r["variant"]) for r in fo}):
            rs = [r for r in fo if (r["system"], r["variant"]) == key]
            cells = [key[0], key[1], ", ".join(str(r["failed"]) for r in rs), ", ".join(str(r["requests"]) for r in rs),
                     f"{statistics.median(r['rps'] for r in rs):.0f}", f"{statistics.median(r['p99_ms'] for r in rs):.1f}"]
            t.add_row(*cells)
            out.append("| " + " | ".join(cells) + " |")
        Console(stderr=True).print(t)
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--replicas", default="1,2,4", help="comma list of replica counts (default 1,2,4)")
    ap.add_argument("--conns", type=int, default=64, help="concurrent connections (default 64)")
    ap.add_argument("--duration", type=int, default=10, help="seconds per load run (default 10)")
    ap.add_argument("--warmup", type=int, default=3, help="unrecorded seconds per system before the runs")
    ap.add_argument("--rounds", type=int, default=2, help="alternated runs per system and N (default 2)")
    ap.add_argument("--fo-rounds", type=int, default=1, help="failover runs per system (default 1)")
    ap.add_argument("--fo-duration", type=int, default=20)
    ap.add_argument("--kill-at", type=float, default=5.0)
    ap.add_argument("--policy", default="power-of-two", help="dmlsys balancing policy")
    ap.add_argument("--phases", default="load,failover", help="comma list of: load, failover")
    ap.add_argument("--cap", type=int, default=2_000_000, help="request cap per wrk run (a safety bound)")
    ap.add_argument("--anchors", type=Path, default=ROOT.parent / "shared" / "anchors" / "serving",
                    help="folder with the peer's replica.py, nginx.conf.tmpl and post.lua")
    ap.add_argument("--json", metavar="FILE", help="write the rows as a JSON list")
    ap.add_argument("--markdown", metavar="FILE", help="write the tables as markdown")
    ap.add_argument("--tables", metavar="JSON", help="only print the tables of rows an earlier --json wrote")
    ap.add_argument("--plot", metavar="PNG", help="req/s, p99 and failover figure (default: the --json path, .png)")
    ap.add_argument("--from-json", metavar="JSON", help="only print the tables and plot the rows of an earlier --json")
    args = ap.parse_args()
    args.replicas = [int(x) for x in args.replicas.split(",")]
    import _plot  # experiments/_plot.py: matplotlib is imported only when a figure is drawn

    if args.tables or args.from_json:
        rows = json.loads(Path(args.tables or args.from_json).read_text())
        print(table(rows, args))
        if out := _plot.plot_path(args.plot, args.from_json):
            _plot.bench_serving(rows, out)
        return
    for tool in (NGINX, WRK):
        if not os.path.exists(tool):
            sys.exit(f"bench_serving: {tool} is missing: apt-get install -y nginx-light wrk")
    if not (args.anchors / "replica.py").exists():
        sys.exit(f"bench_serving: no peer replica at {args.anchors}/replica.py; pass --anchors")
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        work = Path(tmp)
        store = work / "models"
        make_store(store, args.anchors)
        def emit(row: dict) -> None:
            rows.append(row)
            if args.json:  # after every run, so a failure later keeps what was measured
                Path(args.json).write_text(json.dumps(rows, indent=1))

        try:
            for phase in args.phases.split(","):
                {"load": phase_load, "failover": phase_failover}[phase](args, work, store, emit)
        except KeyboardInterrupt:
            log("interrupted; tables of what ran so far follow")
        except Exception as e:
            log(f"stopped by {type(e).__name__}: {e}; tables of what ran so far follow")
        finally:
            PROCS.stop_all()
    text = table(rows, args)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if args.markdown:
        Path(args.markdown).write_text(text)
    if rows and (out := _plot.plot_path(args.plot, args.json)):
        _plot.bench_serving(rows, out)


if __name__ == "__main__":
    main()
