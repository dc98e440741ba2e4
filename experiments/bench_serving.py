#!/usr/bin/env python3
"""Serving throughput, balancer CPU and failover: dmlsys's gateway against nginx, in one run.

Two comparisons, side by side, on this machine, with the same MLP (784 -> 256 -> 10, the anchor's
seeded weights) everywhere:

  same-replicas  (the headline: balancer against balancer) one dmlsys cluster of N replica nodes
                 whose replicas also listen on HTTP (role config `http`), fronted in turn by
                   dmlsys  its gateway (HTTP door + balancer, ZeroMQ to the replicas, as in a cluster);
                   nginx   round-robin, and least_conn, with keepalive to the replicas' HTTP.
                 The replicas are the very same processes: same parse, same batching, same model.
  system         (today's pair, its own rows) the dmlsys cluster through its gateway against nginx
                 round-robin in front of N plain aiohttp replicas (shared/anchors/serving/replica.py and
                 nginx.conf.tmpl, unchanged): what each side gets as built, replicas included.

Load: wrk -t1 with the anchors' post.lua (a fixed 784-pixel body), 64 connections by default. For
each N every balancer is up at once and their runs alternate, the order rotated every round, so
drift in the machine's load hits all alike. Each load row carries the balancer's CPU per request:
utime + stime from /proc/PID/stat over the run, divided by the requests it answered (the gateway
process; for nginx the sum of its processes), and the replicas' likewise.

Failover: 3 replicas under load, one SIGKILLed at --kill-at seconds; failed = non-2xx + socket
errors as wrk counts them. Same-replicas: our gateway, and nginx with its defaults and with
`proxy_next_upstream error timeout http_502 non_idempotent` over the same replicas (the killed one
is restarted by the cluster's supervisor, on the same port, for all three); system: nginx's two
variants over the anchor's replicas. --fo-rounds runs of each (default 3).

Rows (--json FILE): kind (load | failover), variant (same-replicas | system), system (dmlsys | nginx),
policy, replicas, round, rps, p50_ms, p99_ms, failed, requests, cpu_us_per_req (the balancer),
replicas_cpu_us_per_req; failover rows also fo_variant. --baseline TREE adds the same-replicas load rows of a
cluster run from another checkout (system dmlsys-baseline, with tree), alternated with the rest: a code
change's before/after from one run. Needs nginx and wrk
(apt-get install -y nginx-light wrk).
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

from _proc import children, cpu_seconds  # experiments/_proc.py

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
    """A gateway and N replica nodes, each replica also on HTTP at a port fixed here (a restarted
    replica comes back on it, so nginx in front of them recovers as the gateway does)."""

    def __init__(self, work: Path, store: Path, replicas: int, args, root: Path = ROOT) -> None:
        self.dir = work / f"dmlsys-{replicas}-{time.monotonic_ns()}"
        self.dir.mkdir()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1/models/{MODEL}:predict"
        self.http_ports = [free_port() for _ in range(replicas)]
        self.env = {**os.environ, "PYTHONPATH": str(root), "DMLSYS_LOG": "WARNING"}
        nodes = "".join(f"""
[[nodes]]
name = "replica-{i}"
role = "replica"
[nodes.config]
model = "{MODEL}"
http = "127.0.0.1:{p}"
""" for i, p in enumerate(self.http_ports))
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
{nodes}""")

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
                break
            except RuntimeError as e:
                if attempt == attempts - 1 or "address already in use" not in str(e):
                    raise
                log(f"  dmlsys up lost a port race; retrying ({e.args[0].splitlines()[-2].strip()[:120]})")
        for p in self.http_ports:
            wait_http(f"http://127.0.0.1:{p}/v1/models/{MODEL}", 60)

    def nodes(self, role: str) -> list[int]:
        state = json.loads((self.dir / ".dmlsys" / "state.json").read_text())
        return [n["pid"] for n in state["nodes"] if n["role"] == role]

    def replica_pids(self) -> list[int]:
        return self.nodes("replica")

    def balancer_pids(self) -> list[int]:
        return self.nodes("gateway")

    def down(self) -> None:
        with contextlib.suppress(Exception):
            self.cli("down", timeout=120)


# -- nginx --------------------------------------------------------------------------------------


class AnchorReplicas:
    """N of the anchor's plain aiohttp replicas (POST /predict {"x": [...]})."""

    def __init__(self, work: Path, anchors: Path, replicas: int) -> None:
        self.dir = work / f"anchor-{replicas}-{time.monotonic_ns()}"
        self.dir.mkdir()
        self.anchors = anchors
        self.http_ports = [free_port() for _ in range(replicas)]
        self.procs: list[subprocess.Popen] = []

    def up(self) -> None:
        for p in self.http_ports:
            self.procs.append(PROCS.spawn([PY, str(self.anchors / "replica.py"), "--port", str(p)],
                                          self.dir / f"replica-{p}.log"))
        for p in self.http_ports:
            wait_http(f"http://127.0.0.1:{p}/ready", 30)

    def replica_pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def down(self) -> None:
        for p in self.procs:
            PROCS.stop(p)


class Nginx:
    """One nginx (1 worker, upstream keepalive 64) in front of ``ports``, from the anchors' template.
    policy: round-robin | least_conn; retry: proxy_next_upstream ... non_idempotent."""

    def __init__(self, work: Path, anchors: Path, ports: list[int], path: str, policy: str = "round-robin",
                 retry: bool = False) -> None:
        self.dir = work / f"nginx-{len(ports)}-{policy}-{time.monotonic_ns()}"
        (self.dir / "tmp").mkdir(parents=True)
        self.anchors = anchors
        self.ports = ports
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}{path}"
        self.policy = policy
        self.retry = retry
        self.master: subprocess.Popen | None = None

    def up(self) -> None:
        params = " max_fails=1 fail_timeout=5s" if self.retry else ""
        extra = "            proxy_next_upstream error timeout http_502 non_idempotent;\n" if self.retry else ""
        lc = "        least_conn;\n" if self.policy == "least_conn" else ""
        upstream = ("    upstream pool {\n" + lc + "".join(f"        server 127.0.0.1:{p}{params};\n" for p in self.ports)
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

    def balancer_pids(self) -> list[int]:
        return [self.master.pid, *children(self.master.pid)] if self.master else []

    def down(self) -> None:
        if self.master is not None:
            PROCS.stop(self.master)


# -- load ---------------------------------------------------------------------------------------


def wrk(args, url: str, body: Path, duration: float, kill_pid: int | None = None, kill_at: float = 0.0,
        balancer: list[int] | None = None, replicas: list[int] | None = None) -> dict:
    duration = max(1, int(round(duration)))
    cmd = ["timeout", "-k", "5", str(duration + 30), WRK, "-t1", f"-c{args.conns}", f"-d{duration}s",
           "--timeout", "5s", "-s", str(args.anchors / "post.lua"), url, "--", str(body), str(args.cap)]
    b0, r0 = cpu_seconds(balancer or []), cpu_seconds(replicas or [])
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if kill_pid is not None:
        time.sleep(kill_at)
        with contextlib.suppress(ProcessLookupError):
            os.kill(kill_pid, signal.SIGKILL)
    out, err = p.communicate(timeout=duration + 60)
    b1, r1 = cpu_seconds(balancer or []), cpu_seconds(replicas or [])
    m = re.search(r"^WRKJSON (\{.*\})$", out, re.M)
    if not m:
        raise RuntimeError(f"wrk failed rc={p.returncode}: {err[-400:]} {out[-400:]}")
    r = json.loads(m.group(1))
    failed = r["status"] + r["connect"] + r["read"] + r["write"] + r["timeout"]
    n = max(1, r["requests"])
    row = {"rps": round(r["requests"] / (r["duration_us"] / 1e6), 1), "p50_ms": r["p50_us"] / 1000,
           "p99_ms": r["p99_us"] / 1000, "failed": failed, "requests": r["requests"]}
    if balancer:
        row["cpu_us_per_req"] = round((b1 - b0) * 1e6 / n, 1)
    if replicas and kill_pid is None:
        row["replicas_cpu_us_per_req"] = round((r1 - r0) * 1e6 / n, 1)
    return row


def bodies(work: Path) -> tuple[Path, Path]:
    rng = random.Random(123)  # the anchors' body: 784 pixels with 4 decimals
    x = [round(rng.random(), 4) for _ in range(784)]
    ours, theirs = work / "body-dmlsys.json", work / "body-nginx.json"
    ours.write_text(json.dumps({"instances": [x]}, separators=(",", ":")))
    theirs.write_text(json.dumps({"x": x}, separators=(",", ":")))
    return ours, theirs


PREDICT = f"/v1/models/{MODEL}:predict"
BASELINE = "dmlsys-baseline"  # rows of --baseline's cluster


def phase_load(args, work: Path, store: Path, emit) -> None:
    ours_body, anchor_body = bodies(work)
    for n in args.replicas:
        cluster = Dmlsys(work, store, n, args)
        anchor = AnchorReplicas(work, args.anchors, n) if "system" in args.variants else None
        ups = [cluster]
        try:
            log(f"load, {n} replica(s): starting the cluster, the nginxes{' and the anchor replicas' if anchor else ''}")
            cluster.up()
            wait_http(cluster.url, 30, "POST", ours_body.read_bytes())
            # (row fields, url, body, balancer pids, replica pids)
            runs = []
            if "same-replicas" in args.variants:
                runs.append(({"variant": "same-replicas", "system": "dmlsys", "policy": args.policy},
                             cluster.url, ours_body, cluster.balancer_pids, cluster.replica_pids))
                if args.baseline is not None:  # the same cluster from another tree: before/after in one run
                    base = Dmlsys(work, store, n, args, root=args.baseline)
                    ups.append(base)
                    base.up()
                    wait_http(base.url, 30, "POST", ours_body.read_bytes())
                    runs.append(({"variant": "same-replicas", "system": BASELINE, "policy": args.policy,
                                  "tree": str(args.baseline)}, base.url, ours_body, base.balancer_pids,
                                 base.replica_pids))
                for policy in ("round-robin", "least_conn"):
                    ng = Nginx(work, args.anchors, cluster.http_ports, PREDICT, policy)
                    ups.append(ng)
                    ng.up()
                    runs.append(({"variant": "same-replicas", "system": "nginx", "policy": policy}, ng.url, ours_body,
                                 ng.balancer_pids, cluster.replica_pids))
            if anchor is not None:
                ups.append(anchor)
                anchor.up()
                ng = Nginx(work, args.anchors, anchor.http_ports, "/predict")
                ups.append(ng)
                ng.up()
                runs.append(({"variant": "system", "system": "dmlsys", "policy": args.policy}, cluster.url, ours_body,
                             cluster.balancer_pids, cluster.replica_pids))
                runs.append(({"variant": "system", "system": "nginx", "policy": "round-robin"}, ng.url, anchor_body,
                             ng.balancer_pids, anchor.replica_pids))
            for _, url, body, _, _ in runs:
                wrk(args, url, body, args.warmup)
            for rnd in range(args.rounds):
                k = rnd % len(runs)  # rotate the order every round
                for fields, url, body, bpids, rpids in runs[k:] + runs[:k]:
                    row = {"kind": "load", **fields, "replicas": n, "round": rnd, "conns": args.conns,
                           **wrk(args, url, body, args.duration, balancer=bpids(), replicas=rpids())}
                    emit(row)
                    log(f"  {row['variant']:13s} {row['system']:6s} {row['policy']:12s} N={n} round {rnd}: "
                        f"{row['rps']:8.1f} req/s p50 {row['p50_ms']:.2f} ms p99 {row['p99_ms']:.2f} ms "
                        f"balancer {row['cpu_us_per_req']:.0f} us/req replicas {row['replicas_cpu_us_per_req']:.0f} "
                        f"us/req failed {row['failed']}")
        finally:
            for u in reversed(ups):
                u.down()
            if anchor is not None:
                anchor.down()


def phase_failover(args, work: Path, store: Path, emit) -> None:
    ours_body, anchor_body = bodies(work)
    cases = []
    if "same-replicas" in args.variants:
        cases += [("same-replicas", "dmlsys", "default"), ("same-replicas", "nginx", "defaults"),
                  ("same-replicas", "nginx", "retry-nonidem")]
    if "system" in args.variants:
        cases += [("system", "nginx", "defaults"), ("system", "nginx", "retry-nonidem")]
    for rnd in range(args.fo_rounds):
        for variant, system, fo_variant in cases:
            ups = []
            try:
                if variant == "same-replicas":
                    replicas = Dmlsys(work, store, 3, args)
                    ups.append(replicas)
                    replicas.up()
                    wait_http(replicas.url, 30, "POST", ours_body.read_bytes())
                    body = ours_body
                    if system == "dmlsys":
                        url, bpids = replicas.url, replicas.balancer_pids
                    else:
                        ng = Nginx(work, args.anchors, replicas.http_ports, PREDICT, retry=fo_variant != "defaults")
                else:
                    replicas = AnchorReplicas(work, args.anchors, 3)
                    ups.append(replicas)
                    replicas.up()
                    body = anchor_body
                    ng = Nginx(work, args.anchors, replicas.http_ports, "/predict", retry=fo_variant != "defaults")
                if system == "nginx":
                    ups.append(ng)
                    ng.up()
                    url, bpids = ng.url, ng.balancer_pids
                wait_http(url, 30, "POST", body.read_bytes())
                victim = replicas.replica_pids()[1]
                row = {"kind": "failover", "variant": variant, "system": system, "fo_variant": fo_variant,
                       "policy": args.policy if system == "dmlsys" else "round-robin", "replicas": 3, "round": rnd,
                       "conns": args.conns, **wrk(args, url, body, args.fo_duration, kill_pid=victim,
                                                  kill_at=args.kill_at, balancer=bpids())}
                emit(row)
                log(f"  failover {variant} {system} ({fo_variant}) round {rnd}: failed {row['failed']} of "
                    f"{row['requests']}, {row['rps']:.0f} req/s, p99 {row['p99_ms']:.1f} ms")
            finally:
                for u in reversed(ups):
                    u.down()


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else ""


def table(rows: list[dict], args) -> str:
    from rich.console import Console
    from rich.table import Table

    out = []
    load = [r for r in rows if r["kind"] == "load"]
    cols = ("variant", "replicas", "balancer", "req/s", "p50 ms", "p99 ms", "failed", "balancer CPU us/req",
            "replicas CPU us/req", "dmlsys req/s vs this", "dmlsys CPU/req vs this", "dmlsys req/s vs this, per round")
    t = Table(title=f"load: wrk -t1 -c{args.conns}, {args.duration} s runs, medians over the rounds")
    for col in cols:
        t.add_column(col, justify="right")
    md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for variant in ("same-replicas", "system"):
        for n in sorted({r["replicas"] for r in load}):
            groups: dict[tuple, list[dict]] = {}
            for r in load:
                if r["variant"] == variant and r["replicas"] == n:
                    groups.setdefault((r["system"], r["policy"]), []).append(r)
            ours = next((g for k, g in groups.items() if k[0] == "dmlsys"), None)

            def med(g, k):
                vals = [r[k] for r in g if r.get(k) is not None]
                return statistics.median(vals) if vals else float("nan")

            for (system, policy), g in sorted(groups.items(), key=lambda kv: kv[0][0] != "dmlsys"):
                rr = pr = cr = ""
                if system != "dmlsys" and ours:
                    rr = _ratio(med(ours, "rps"), med(g, "rps"))
                    cr = _ratio(med(ours, "cpu_us_per_req"), med(g, "cpu_us_per_req"))
                    # Runs of one round are close in time, so their ratio cancels most of the drift.
                    mine = {r["round"]: r["rps"] for r in ours}
                    pr = ", ".join(f"{mine[r['round']] / r['rps']:.2f}" for r in sorted(g, key=lambda r: r["round"])
                                   if r["round"] in mine and r["rps"])
                cells = [variant, str(n), f"{system} {policy}", f"{med(g, 'rps'):.0f}", f"{med(g, 'p50_ms'):.2f}",
                         f"{med(g, 'p99_ms'):.2f}", str(sum(r["failed"] for r in g)), f"{med(g, 'cpu_us_per_req'):.0f}",
                         f"{med(g, 'replicas_cpu_us_per_req'):.0f}", rr, cr, pr]
                t.add_row(*cells)
                md.append("| " + " | ".join(cells) + " |")
    if load:
        Console(stderr=True).print(t)
        out += md
    fo = [r for r in rows if r["kind"] == "failover"]
    if fo:
        t = Table(title=f"failover: 3 replicas, wrk -c{args.conns} for {args.fo_duration} s, SIGKILL one at {args.kill_at} s")
        cols = ("variant", "balancer", "on failure", "failed per run", "requests per run", "req/s", "p99 ms")
        for col in cols:
            t.add_column(col, justify="right")
        out += ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        keys = sorted({(r["variant"], r["system"], r["fo_variant"]) for r in fo},
                      key=lambda k: (k[0] != "same-replicas", k[1] != "dmlsys", k[2]))
        for key in keys:
            rs = [r for r in fo if (r["variant"], r["system"], r["fo_variant"]) == key]
            cells = [key[0], key[1], key[2], ", ".join(str(r["failed"]) for r in rs),
                     ", ".join(str(r["requests"]) for r in rs),
                     f"{statistics.median(r['rps'] for r in rs):.0f}", f"{statistics.median(r['p99_ms'] for r in rs):.1f}"]
            t.add_row(*cells)
            out.append("| " + " | ".join(cells) + " |")
        Console(stderr=True).print(t)
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--replicas", default="1,2,4", help="comma list of replica counts (default 1,2,4)")
    ap.add_argument("--variants", default="same-replicas,system", help="comma list of: same-replicas, system")
    ap.add_argument("--conns", type=int, default=64, help="concurrent connections (default 64)")
    ap.add_argument("--duration", type=int, default=10, help="seconds per load run (default 10)")
    ap.add_argument("--warmup", type=int, default=3, help="unrecorded seconds per balancer before the runs")
    ap.add_argument("--rounds", type=int, default=2, help="alternated runs per balancer and N (default 2)")
    ap.add_argument("--fo-rounds", type=int, default=3, help="failover runs per variant (default 3)")
    ap.add_argument("--fo-duration", type=int, default=20)
    ap.add_argument("--kill-at", type=float, default=5.0)
    ap.add_argument("--policy", default="power-of-two", help="dmlsys balancing policy")
    ap.add_argument("--phases", default="load,failover", help="comma list of: load, failover")
    ap.add_argument("--cap", type=int, default=2_000_000, help="request cap per wrk run (a safety bound)")
    ap.add_argument("--anchors", type=Path, default=ROOT.parent / "shared" / "anchors" / "serving",
                    help="folder with the peer's replica.py, nginx.conf.tmpl and post.lua")
    ap.add_argument("--baseline", type=Path, metavar="TREE",
                    help="also run a dmlsys cluster from this checkout (e.g. `git archive REV | tar -x -C TREE`), "
                         f"alternated with the rest: rows with system {BASELINE!r} (same-replicas load only; "
                         "its own N replicas, of that tree's code), so before/after comes from one run")
    ap.add_argument("--json", metavar="FILE", help="write the rows as a JSON list")
    ap.add_argument("--markdown", metavar="FILE", help="write the tables as markdown")
    ap.add_argument("--tables", metavar="JSON", help="only print the tables of rows an earlier --json wrote")
    ap.add_argument("--plot", metavar="PNG", help="req/s, p99, CPU and failover figure (default: the --json path, .png)")
    ap.add_argument("--from-json", metavar="JSON", help="only print the tables and plot the rows of an earlier --json")
    args = ap.parse_args()
    args.replicas = [int(x) for x in args.replicas.split(",")]
    args.variants = set(args.variants.split(","))
    import _plot  # experiments/_plot.py: matplotlib is imported only when a figure is drawn

    if args.tables or args.from_json:
        rows = json.loads(Path(args.tables or args.from_json).read_text())
        print(table(rows, args))
        if out := _plot.plot_path(args.plot, args.from_json):
            _plot.bench_serving([r for r in rows if r["system"] != BASELINE], out)
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
        _plot.bench_serving([r for r in rows if r["system"] != BASELINE], out)


if __name__ == "__main__":
    main()
