"""The chaos suite: real faults against a real cluster under load from real clients.

A cluster is brought up with ``python -m dmlsys.cluster up --detach`` on a spec in a temporary
directory (two gateways sharing the front door's port, two workers, three replicas of a tiny
model that ``up`` trains first).
Load comes from client threads, each with its own keep-alive HTTP connection, posting one-instance
predicts at a steady pace. Then each scenario injects its fault while the load runs:

=======================  ====================================================================
scenario                 fault
=======================  ====================================================================
replica-kill             SIGKILL replica-0
replicas-kill-2          SIGKILL replica-0 and replica-1 at once
replica-stop             SIGSTOP replica-0 for 10 s, then SIGCONT (a hung process, not a dead one)
gateway-kill             SIGKILL gateway-0 of the two that share the HTTP port (SO_REUSEPORT)
gateway-single-kill      the baseline: a cluster with one gateway; SIGKILL it (the door closes)
worker-kill-training     SIGKILL worker-1 during ``train`` of a second model; then ``train`` again
supervisor-kill          SIGKILL the supervisor; then ``up`` again
fuzz                     100,000 fuzzed messages (seeded: truncated, oversized, wrong types, random
                         bytes, hostile bodies) to every node's ZeroMQ address in turn, supervisor
                         included, authenticated with the cluster key so they reach the decoder
disk-full-save           ModelStore.save into a full tmpfs
disk-full-cache          MemoStore.put (the workflow cache) into a full tmpfs
net-loss                 gateway and supervisor on one host, replicas on another (two network
                         namespaces joined by a veth pair): 5 % of the packets each host receives
                         on the veth dropped for 10 s (``iptables -m statistic``)
net-delay                the same hosts: 100 ms added each way for 10 s by a delaying TCP relay
                         (``experiments/_relay.py``: this kernel has no sch_netem)
link-slow                the same hosts; the link shaped to 1 Mbit/s (``tc tbf``) for 10 s
net-partition            the same hosts; the veth pair down both ways for 10 s
net-loss-training        ``train`` on workers on both hosts with 5 % loss the whole run
net-delay-training       ``train`` on workers on both hosts with 100 ms delay each way the whole run
net-partition-training   ``train`` on workers on both hosts; the link down 10 s, 2 s in
=======================  ====================================================================

For each: requests ``sent``, ``ok`` (200), ``failed`` (an HTTP error with a JSON body naming the
cause, or a connection refused before the request was accepted), ``lost`` (sent and never
answered: the connection dropped after the request was written, or no answer within the
client's timeout; must be 0), ``recover_s`` (from the fault to the end of the last request that
did not succeed; ``null``: still failing when the scenario ended) and ``intact`` (every node ready
again, the model store's versions all load, and the scenario's own state check).

    python experiments/chaos.py --quick                # every scenario, shorter, fewer fuzz messages
    python experiments/chaos.py --only gateway-kill --json chaos.json
    python experiments/chaos.py                        # full: 100,000 fuzzed messages per role

Needs root for the network namespaces and tmpfs mounts, and ``iptables`` for the loss and the
delay (``apt-get install -y iptables``; this script installs nothing); those scenarios say why
they were skipped when they cannot run. Between the two hosts every TCP connection passes a
relay in the namespace that opened it (an ``iptables -t nat ... REDIRECT`` rule): it forwards at
once, except during net-delay. Leaves nothing behind: every cluster is brought down, every
process it started is killed by pid, namespaces and mounts are removed.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Self

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL = "tiny"
SOURCE = ROOT  # the tree whose dmlsys the clusters run (--tree: a patched copy, to measure a change)
BODY = json.dumps({"instances": [[0.5] * 784]}).encode()

SPEC = """
[cluster]
name = "chaos"
store = "{store}"
http = "127.0.0.1:{port}"
[cluster.train.tiny]
arch = {{ kind = "mlp", hidden = [16] }}
epochs = 1
batch_size = 256
[cluster.train.tiny-long]
arch = {{ kind = "mlp", hidden = [64] }}
epochs = {long_epochs}
batch_size = 128
[[nodes]]
name = "gateway"
role = "gateway"
replicas = {gateways}
[nodes.config]
try_timeout = 1.0
probe_period = 0.25
[[nodes]]
name = "worker"
role = "worker"
replicas = {workers}
[[nodes]]
name = "replica"
role = "replica"
replicas = {replicas}
[nodes.config]
model = "tiny"
"""


# -- the cluster -------------------------------------------------------------------------------


class Cluster:
    """One cluster brought up with the CLI in its own directory; ``down()`` leaves nothing running."""

    def __init__(self, root: Path, name: str, *, store: Path, gateways: int | None = None, workers: int = 2,
                 replicas: int = 3, long_epochs: int = 4, prefix: list[str] | None = None, text: str | None = None):
        from dmlsys.cluster.spec import free_port

        self.dir = root / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.prefix = prefix or []
        self.env = {**os.environ, "PYTHONPATH": str(SOURCE), "DMLSYS_LOG": "INFO"}
        spec = text or SPEC.format(store=store, port=self.port, workers=workers, replicas=replicas,
                                   long_epochs=long_epochs, gateways=gateways or 1)
        if gateways is None:
            spec = spec.replace("replicas = 1\n[nodes.config]\ntry_timeout", "[nodes.config]\ntry_timeout")
        (self.dir / "spec.toml").write_text(spec)
        self.seen: set[int] = set()

    def cli(self, *args: str, timeout: float = 300, check: bool = True, state: str | None = None):
        cmd = [*self.prefix, sys.executable, "-m", "dmlsys.cluster", *(["--state-dir", state] if state else []), *args]
        r = subprocess.run(cmd, cwd=self.dir, env=self.env, check=False, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} exited {r.returncode}: {r.stderr[-2000:]}")
        return r

    def up(self, *extra: str, state: str | None = None) -> float:
        t = time.monotonic()
        self.cli("up", "spec.toml", "--detach", *extra, timeout=600, state=state)
        self.remember()
        return time.monotonic() - t

    def state(self, state_dir: str = ".dmlsys") -> dict:
        try:
            return json.loads((self.dir / state_dir / "state.json").read_text())
        except (OSError, ValueError):
            return {}

    def remember(self, state_dir: str = ".dmlsys") -> None:
        doc = self.state(state_dir)
        self.seen.update(p for p in [doc.get("supervisor", {}).get("pid"), *(n.get("pid") for n in doc.get("nodes", []))]
                         if p)

    def pid(self, name: str, state_dir: str = ".dmlsys") -> int | None:
        doc = self.state(state_dir)
        if name == "supervisor":
            return doc.get("supervisor", {}).get("pid")
        return next((n.get("pid") for n in doc.get("nodes", []) if n["name"] == name), None)

    def nodes(self, state_dir: str = ".dmlsys") -> list[dict]:
        return self.state(state_dir).get("nodes", [])

    def all_ready(self, state_dir: str = ".dmlsys", host: str | None = None) -> bool:
        """Every node (of ``host``: a host's state file lists the others' nodes without pids) is
        ready with a live process."""
        nodes = [n for n in self.nodes(state_dir) if host is None or n.get("host") == host]
        return bool(nodes) and all(n["state"] == "ready" and n.get("pid") and alive(n["pid"]) for n in nodes)

    def signal(self, name: str, sig: int) -> int:
        pid = self.pid(name)
        if not pid:
            raise RuntimeError(f"no pid for {name} in state.json")
        self.remember()
        os.kill(pid, sig)
        return pid

    def down(self, state: str | None = None) -> None:
        self.remember(state or ".dmlsys")
        self.cli("down", "--timeout", "20", check=False, timeout=120, state=state)
        for pid in self.seen:  # whatever down missed is still ours to stop
            if alive(pid):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGCONT)
                    os.kill(pid, signal.SIGKILL)


def alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_for(predicate, timeout: float, interval: float = 0.2) -> float | None:
    """Seconds until ``predicate()`` held, or None after ``timeout``."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if predicate():
            return time.monotonic() - t0
        time.sleep(interval)
    return None


def store_intact(store: Path) -> bool:
    """Every version of every model in the store loads."""
    from dmlsys.train.store import ModelStore

    s = ModelStore(store)
    try:
        for name in s.models() if hasattr(s, "models") else [p.name for p in store.iterdir() if p.is_dir()]:
            for v in s.versions(name):
                s.load(name, v)
    except Exception as e:  # noqa: BLE001 - any failure to load is the finding
        print(f"  store not intact: {type(e).__name__}: {e}", file=sys.stderr)
        return False
    return True


# -- load --------------------------------------------------------------------------------------


class Load:
    """``clients`` threads, each posting predicts at ``rate`` per second on its own keep-alive
    connection to ``host:port``; every request's outcome is recorded with its times."""

    def __init__(self, host: str, port: int, *, clients: int = 4, rate: float = 10.0, timeout: float = 30.0,
                 prefix_ns: str | None = None) -> None:
        self.host, self.port, self.clients, self.rate, self.timeout = host, port, clients, rate, timeout
        self.records: list[tuple[float, float, str, str]] = []  # (start, end, outcome, detail)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> Self:
        for i in range(self.clients):
            t = threading.Thread(target=self._client, args=(i,), daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(self.timeout + 5)

    def _client(self, i: int) -> None:
        conn: http.client.HTTPConnection | None = None
        period = 1.0 / self.rate
        nxt = time.monotonic() + random.Random(i).random() * period
        while not self._stop.is_set():
            time.sleep(max(0.0, nxt - time.monotonic()))
            nxt += period
            start = time.monotonic()
            if conn is None:
                conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
                try:
                    conn.connect()
                except OSError as e:  # never accepted: a clear failure, not a loss
                    conn = None
                    self._record(start, "failed", f"connect: {type(e).__name__}")
                    continue
            try:
                conn.request("POST", f"/v1/models/{MODEL}:predict", BODY, {"Content-Type": "application/json",
                                                                         "X-Deadline-Ms": "5000"})
            except OSError as e:  # the request never went out whole: the server never had it
                conn.close()
                conn = None
                self._record(start, "failed", f"send: {type(e).__name__}")
                continue
            try:
                r = conn.getresponse()
                body = r.read()
            except (OSError, http.client.HTTPException) as e:  # written, never answered
                conn.close()
                conn = None
                self._record(start, "lost", f"{type(e).__name__}")
                continue
            if r.status == 200:
                self._record(start, "ok", "200")
            else:
                try:
                    why = json.loads(body)["error"][:80]
                except (ValueError, KeyError, TypeError):
                    why = body[:80].decode("latin-1")
                self._record(start, "failed", f"{r.status} {why}")
            if r.getheader("Connection", "").lower() == "close":
                conn.close()
                conn = None

    def _record(self, start: float, outcome: str, detail: str) -> None:
        with self._lock:
            self.records.append((start, time.monotonic(), outcome, detail))

    def ok_since(self, t: float) -> bool:
        with self._lock:
            return any(s >= t and o == "ok" for s, _, o, _ in self.records)

    def summary(self, fault_at: float, end: float | None = None) -> dict:
        with self._lock:
            recs = [r for r in self.records if end is None or r[0] <= end]
        bad = [r for r in recs if r[2] != "ok" and r[1] >= fault_at]
        last_ok = max((r[1] for r in recs if r[2] == "ok"), default=0.0)
        if not bad:
            recover = 0.0
        elif last_ok > max(r[1] for r in bad):
            recover = max(r[1] for r in bad) - fault_at
        else:
            recover = None
        details: dict[str, int] = {}
        for r in recs:
            if r[2] != "ok":
                details[f"{r[2]}: {r[3]}"] = details.get(f"{r[2]}: {r[3]}", 0) + 1
        return {"sent": len(recs), "ok": sum(r[2] == "ok" for r in recs),
                "failed": sum(r[2] == "failed" for r in recs), "lost": sum(r[2] == "lost" for r in recs),
                "recover_s": None if recover is None else round(recover, 2), "errors": details}


# -- scenarios ---------------------------------------------------------------------------------


class Suite:
    def __init__(self, args) -> None:
        self.args = args
        self.quick = args.quick
        self.root = Path(tempfile.mkdtemp(prefix="dmlsys-chaos-"))
        self.store = self.root / "store"
        self.rows: list[dict] = []
        self.main: Cluster | None = None

    def row(self, scenario: str, summary: dict | None, intact: bool | None, note: str = "") -> dict:
        if summary is not None:  # one line per kind of error: paths and numbers vary
            errors: dict[str, int] = {}
            for k, v in summary.get("errors", {}).items():
                k = re.sub(r"/\S+", "PATH", k)
                errors[k] = errors.get(k, 0) + v
            summary = {**summary, "errors": errors}
        s = summary or {"sent": 0, "ok": 0, "failed": 0, "lost": 0, "recover_s": None, "errors": {}}
        row = {"scenario": scenario, "sent": s["sent"], "ok": s["ok"], "failed": s["failed"], "lost": s["lost"],
               "recover_s": s["recover_s"], "intact": intact, "note": note, "errors": s.get("errors", {})}
        self.rows.append(row)
        print(f"{scenario:22s} sent={row['sent']:5d} ok={row['ok']:5d} failed={row['failed']:4d} lost={row['lost']:3d} "
              f"recover_s={row['recover_s']} intact={intact} {note}", flush=True)
        for k, v in sorted(s.get("errors", {}).items(), key=lambda kv: -kv[1])[:4]:
            print(f"{'':22s}   {v:5d} x {k}", flush=True)
        return row

    def cluster(self) -> Cluster:
        if self.main is None:
            c = Cluster(self.root, "main", store=self.store, gateways=2, long_epochs=2 if self.quick else 4)
            t = c.up()
            print(f"cluster up in {t:.1f}s ({c.dir})", flush=True)
            self.main = c
        return self.main

    def settle(self, c: Cluster, timeout: float = 120) -> bool:
        return wait_for(lambda: c.all_ready(), timeout) is not None

    def under_load(self, c: Cluster, fault, *, after: float, settle: float = 120, name: str,
                   check=lambda: True, clients: int = 4, host: str = "127.0.0.1", ready=None) -> dict:
        """Load; ``fault()`` after 2 s; keep loading ``after`` s, then until every node is ready
        again and a request succeeded; the row."""
        with Load(host, c.port, clients=clients) as load:
            time.sleep(2.0)
            t0 = time.monotonic()
            note = fault() or ""
            time.sleep(after)
            ready = wait_for(ready or c.all_ready, settle) is not None
            wait_for(lambda: load.ok_since(time.monotonic() - 0.5), 30)
            time.sleep(1.0)
        return self.row(name, load.summary(t0), ready and store_intact(self.store) and bool(check()), note)

    # each scenario -----------------------------------------------------------------------------

    def replica_kill(self) -> None:
        c = self.cluster()
        self.under_load(c, lambda: f"killed pid {c.signal('replica-0', signal.SIGKILL)}", after=5, name="replica-kill")

    def replicas_kill_2(self) -> None:
        c = self.cluster()

        def fault():
            return f"killed pids {c.signal('replica-0', signal.SIGKILL)}, {c.signal('replica-1', signal.SIGKILL)}"

        self.under_load(c, fault, after=5, name="replicas-kill-2")

    def replica_stop(self) -> None:
        c = self.cluster()

        def fault():
            pid = c.signal("replica-0", signal.SIGSTOP)
            threading.Timer(10.0, lambda: os.kill(pid, signal.SIGCONT)).start()
            return f"stopped pid {pid} for 10 s"

        self.under_load(c, fault, after=12, name="replica-stop")

    def gateway_kill(self) -> None:
        c = self.cluster()  # two gateways on one port: the other takes every new connection
        self.under_load(c, lambda: f"killed gateway-0 pid {c.signal('gateway-0', signal.SIGKILL)} (of a pair)",
                        after=3, name="gateway-kill")

    def gateway_single_kill(self) -> None:
        """The baseline: one gateway, the only listener on the port."""
        c = Cluster(self.root, "single", store=self.store, gateways=None, workers=0, replicas=2)
        spec = (c.dir / "spec.toml").read_text().replace('[[nodes]]\nname = "worker"\nrole = "worker"\nreplicas = 0\n', "")
        (c.dir / "spec.toml").write_text(spec)
        try:
            c.up()
            self.under_load(c, lambda: f"killed pid {c.signal('gateway', signal.SIGKILL)} (the only gateway)", after=3,
                            name="gateway-single-kill")
        finally:
            c.down()

    def worker_kill_training(self) -> None:
        """``train`` of a second model; worker-1 is SIGKILLed in its epochs. What happens to the
        job (it fails naming the worker, or finishes), how long until a ``train`` succeeds again
        (the retry waits for the restarted worker), and whether the store gains only whole
        versions."""
        c = self.cluster()
        result: dict = {}
        before = _versions(self.store, "tiny-long")

        def train(key: str) -> None:
            t = time.monotonic()
            r = c.cli("train", "tiny-long", check=False, timeout=900)
            lines = [ln for ln in (r.stdout + r.stderr).strip().splitlines() if ln.strip()]
            result[key] = {"rc": r.returncode, "s": round(time.monotonic() - t, 1), "out": lines[-1][-220:] if lines else "",
                           "end": time.monotonic()}

        def fault():
            t = threading.Thread(target=train, args=("first",), daemon=True)
            t.start()
            time.sleep(6.0 if self.quick else 10.0)  # into the epochs
            pid = c.signal("worker-1", signal.SIGKILL)
            result["killed_at"] = time.monotonic()
            t.join(900)
            if result["first"]["rc"] != 0:  # not resumed: train again once the worker is back
                wait_for(lambda: c.all_ready(), 120)
                train("retry")
                result["retrained_after_s"] = round(time.monotonic() - result["killed_at"], 1)
            return f"killed worker-1 pid {pid} during train"

        def check():
            after = _versions(self.store, "tiny-long")
            first, retry = result["first"], result.get("retry")
            after_kill = first["end"] - result["killed_at"]
            result["note"] = (f"; train exit {first['rc']} after {first['s']} s ({after_kill:.1f} s after the kill): "
                              f"{first['out']}"
                              + (f"; train again: exit {retry['rc']} in {retry['s']} s, a new version "
                                 f"{result['retrained_after_s']} s after the kill" if retry else "")
                              + f"; versions {before} -> {after}")
            resumed = first["rc"] == 0
            return resumed and len(after) == len(before) + 1

        row = self.under_load(c, fault, after=2, name="worker-kill-training", check=check)
        row["note"] += result.get("note", "")
        print(f"  {result.get('note', '')}", flush=True)

    def supervisor_kill(self) -> None:
        c = self.cluster()
        pids = [n["pid"] for n in c.nodes() if n.get("pid")]
        state: dict = {}

        def fault():
            pid = c.signal("supervisor", signal.SIGKILL)
            gone = wait_for(lambda: not any(alive(p) for p in pids), 60)
            state["orphans"] = [p for p in pids if alive(p)]
            t = c.up()
            return f"killed pid {pid}; nodes gone after {gone if gone is None else round(gone, 1)} s; up again in {t:.1f} s"

        self.under_load(c, fault, after=2, settle=180, name="supervisor-kill",
                        check=lambda: not state["orphans"])

    def fuzz(self) -> None:
        c = self.cluster()
        count = self.args.fuzz
        result: dict = {}

        def fault():
            before = {n["name"]: n["pid"] for n in c.nodes()}
            before["supervisor"] = c.pid("supervisor")
            t = time.monotonic()
            sent, replies = fuzz_cluster(c, count, seed=self.args.seed)
            result.update(before=before, sent=sent, replies=replies)
            return f"{sent} fuzzed messages in {time.monotonic() - t:.0f} s, {replies} error replies"

        def check():
            now = {n["name"]: n["pid"] for n in c.nodes()}
            now["supervisor"] = c.pid("supervisor")
            died = [k for k, v in result["before"].items() if now.get(k) != v or not alive(v)]
            if died:
                print(f"  fuzz: processes replaced or dead: {died}", flush=True)
            return not died

        self.under_load(c, fault, after=2, name="fuzz", check=check)

    def disk_full(self) -> None:
        for name, fn in (("disk-full-save", _disk_full_save), ("disk-full-cache", _disk_full_cache)):
            mnt = self.root / f"tmpfs-{name}"
            mnt.mkdir()
            m = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], check=False, capture_output=True,
                               text=True)
            if m.returncode != 0:
                self.row(name, None, None, f"skipped: cannot mount a tmpfs here: {m.stderr.strip()[:120]}")
                continue
            try:
                self.row(*fn(mnt))
            finally:
                subprocess.run(["umount", "-l", str(mnt)], check=False, capture_output=True)

    def netem(self) -> None:
        run_netem(self)

    def close(self) -> None:
        if self.main is not None:
            self.main.down()
        shutil.rmtree(self.root, ignore_errors=True)


def _versions(store: Path, name: str) -> list[int]:
    from dmlsys.train.store import ModelStore

    try:
        return ModelStore(store).versions(name)
    except Exception:  # noqa: BLE001
        return []


# -- disk full ---------------------------------------------------------------------------------


def _disk_full_save(mnt: Path):
    """Saves of 1 MB versions into a 4 MB tmpfs until one fails: the failure must be a clear
    OSError (ENOSPC), leave no version half-written, and every earlier version must load."""
    import numpy as np

    from dmlsys.train.store import ModelStore

    s = ModelStore(mnt / "store")
    sent = ok = failed = 0
    errors: dict[str, int] = {}
    t0 = time.monotonic()
    recover = None
    for i in range(12):
        sent += 1
        try:
            s.save("m", {"w": np.full((256, 1024), i, np.float32)}, {"i": i})
            ok += 1
        except OSError as e:
            failed += 1
            key = f"failed: {type(e).__name__}: {str(e)[:120]}"
            errors[key] = errors.get(key, 0) + 1
    leftovers = [p.name for p in (mnt / "store" / "m").iterdir() if p.name.startswith(".")]
    intact = True
    for v in s.versions("m"):
        params, card = s.load("m", v)
        intact &= float(params["w"][0, 0]) == card["i"]
    # Free space: the next save must work (recovery).
    for v in s.versions("m")[:-1]:
        shutil.rmtree(mnt / "store" / "m" / str(v))
    try:
        t1 = time.monotonic()
        s.save("m", {"w": np.zeros((4,), np.float32)}, {"i": -1})
        recover = round(time.monotonic() - t1, 3)
    except OSError:
        intact = False
    note = f"{ok} versions saved before the disk filled; leftover temp dirs: {leftovers or 'none'}"
    del t0
    return "disk-full-save", {"sent": sent, "ok": ok, "failed": failed, "lost": 0, "recover_s": recover,
                              "errors": errors}, intact and not leftovers, note


def _disk_full_cache(mnt: Path):
    import numpy as np

    from dmlsys.workflow.store import MemoStore

    sent = ok = failed = 0
    errors: dict[str, int] = {}
    with MemoStore(mnt / "cache") as s:
        for i in range(12):
            sent += 1
            try:
                s.put(f"{i:02d}" + "k" * 30, "train", {"w": np.full((256, 1024), i, np.float32)})
                ok += 1
            except Exception as e:  # noqa: BLE001 - the type is the finding
                failed += 1
                key = f"failed: {type(e).__name__}: {str(e)[:90]}"
                errors[key] = errors.get(key, 0) + 1
        intact = True
        for i in range(ok):
            hit = s.get(f"{i:02d}" + "k" * 30)
            intact &= hit is not None and float(hit.value["w"][0, 0]) == i
        leftovers = [p.name for p in (mnt / "cache" / "blobs").rglob(".*tmp")]
    return "disk-full-cache", {"sent": sent, "ok": ok, "failed": failed, "lost": 0, "recover_s": 0.0,
                               "errors": errors}, intact and not leftovers, \
        f"{ok} entries stored before the disk filled; leftover temp files: {leftovers or 'none'}"


# -- fuzz --------------------------------------------------------------------------------------


def fuzz_messages(rng: random.Random, n: int):
    """``n`` bad messages (lists of frames): truncated, oversized, wrong types, random bytes."""
    import msgpack

    from dmlsys.wire.codec import Kind, Message, encode

    good = encode(Message(Kind.REQUEST, 1, "node.ping", "fuzz", {"x": 1}, 1.0))[0]
    methods = ["node.ping", "node.status", "model.predict", "model.predict_many", "serving.models", "cluster.members",
               "collective.allreduce", "train.start", "echo.echo", "nosuch.thing", "", "a" * 300]
    for _ in range(n):
        k = rng.randrange(8)
        if k == 0:  # random bytes
            yield [rng.randbytes(rng.randrange(0, 200))]
        elif k == 1:  # a good header, truncated
            yield [good[: rng.randrange(len(good))]]
        elif k == 2:  # the right shape, fields of the wrong types
            fields = [1, rng.choice([0, 1, 2, 3, 9, "x", None]), rng.choice([rng.randrange(1 << 40), "id", -1, 2.5]),
                      rng.choice(methods + [3, None]), rng.choice(["fuzz", 7, None]),
                      rng.choice([None, {}, [], "x", {"json": 5}, {"x": "no"}, {"items": [1, 2]}]),
                      rng.choice([1.0, -1.0, float("nan"), "dl", 1e12])][: rng.randrange(3, 8)]
            yield [msgpack.packb(fields, use_bin_type=True)]
        elif k == 3:  # an array reference to a frame that is missing, too short, or of a bad dtype
            ext = msgpack.ExtType(1, msgpack.packb([rng.choice(["<f4", "|S0", "<U0", "|V0", "O", "xx", "<f8"]),
                                                    [rng.randrange(-2, 1 << 20) for _ in range(rng.randrange(3))],
                                                    rng.randrange(-1, 3)]))
            head = msgpack.packb([1, 0, 5, rng.choice(methods), "fuzz", {"x": ext}, 1.0], use_bin_type=True)
            yield [head, *[rng.randbytes(rng.randrange(64)) for _ in range(rng.randrange(3))]]
        elif k == 4:  # oversized header (over 1 MiB) or too many frames
            if rng.random() < 0.5:
                yield [b"\x96" + b"\xc4" * (1 << 20) + b"x"]
            else:
                yield [good] + [b""] * 5000
        elif k == 5:  # deep nesting
            depth = rng.randrange(100, 5000)
            yield [b"\x91" * depth + b"\xc0"]
        elif k == 6:  # huge claimed container sizes, never delivered
            yield [b"\x96\x01\x00\x01\xa9node.ping\xa4fuzz\xdf\xff\xff\xff\xff"]
        else:  # a valid request with a hostile body
            body = rng.choice([{"json": b"{" * 10000}, {"json": b"[" + b"1," * 5000 + b"]", "max_instances": 10 ** 9},
                               {"x": None}, {"items": [{"json": b"x"}] * 40}, "x" * 70000, [[]] * 1000])
            yield encode(Message(Kind.REQUEST, rng.randrange(1 << 30), rng.choice(methods), "fuzz", body, 2.0))


def fuzz_cluster(c: Cluster, count: int, seed: int) -> tuple[int, int]:
    """``count`` fuzzed messages in all, to every node's ZeroMQ address in turn (the supervisor's
    too), sent as an authenticated member (``cli-*``) so that they reach the decoder rather
    than stop at the handshake. Returns (sent, replies)."""
    import asyncio

    from dmlsys.cluster import keys as cluster_keys
    from dmlsys.wire.zmq_transport import ZmqTransport

    doc = c.state()
    peers = {n["name"]: n["zmq"] for n in doc["nodes"]}
    peers["supervisor"] = doc["supervisor"]["zmq"]
    key = cluster_keys.load(c.dir / ".dmlsys")
    replies = [0]

    async def main() -> int:
        t = ZmqTransport(f"cli-fuzz{os.getpid()}", "tcp://127.0.0.1:0", keys=key, hwm=1000)
        t.set_receiver(lambda frames, *route: replies.__setitem__(0, replies[0] + 1))
        await t.start()
        sent = 0
        try:
            for peer, address in peers.items():
                t.add_peer(peer, address)
            rng = random.Random(seed)
            order = list(peers)
            for i, frames in enumerate(fuzz_messages(rng, count)):
                peer = order[i % len(order)]  # every node in turn
                while True:
                    try:
                        t.send(peer, frames)
                        break
                    except Exception:  # noqa: BLE001 - a full queue: let it drain
                        await asyncio.sleep(0.01)
                sent += 1
                if i % 50 == 0:
                    await asyncio.sleep(0)  # let replies in
                if i % 1000 == 999:
                    await asyncio.sleep(0.05)  # keep the load's requests moving on this 2-core machine
            await asyncio.sleep(2.0)
        finally:
            await t.close()
        return sent

    return asyncio.run(main()), replies[0]


# -- network namespaces ------------------------------------------------------------------------


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], check=False, capture_output=True, text=True)


@contextlib.contextmanager
def two_hosts():
    """Two network namespaces joined by a veth pair: yields (ns_a, dev_a, addr_a, ns_b, dev_b, addr_b)."""
    tag = f"dch{os.getpid() % 100000}"
    subnet = f"10.{210 + os.getpid() % 40}.{os.getpid() % 250}"
    a, b = f"{tag}a", f"{tag}b"
    made = _ip("netns", "add", a)
    if made.returncode != 0:
        raise RuntimeError(f"cannot create network namespaces (needs root): {made.stderr.strip()}")
    try:
        _ip("netns", "add", b)
        _ip("link", "add", f"{tag}va", "type", "veth", "peer", "name", f"{tag}vb")
        for ns, dev, addr in ((a, f"{tag}va", f"{subnet}.1"), (b, f"{tag}vb", f"{subnet}.2")):
            _ip("link", "set", dev, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield a, f"{tag}va", f"{subnet}.1", b, f"{tag}vb", f"{subnet}.2"
    finally:
        for ns in (a, b):
            for pid in _ip("netns", "pids", ns).stdout.split():
                if alive(int(pid)):
                    with contextlib.suppress(OSError):
                        os.kill(int(pid), signal.SIGKILL)
            _ip("netns", "del", ns)


class Unsupported(Exception):
    """This machine cannot inject the fault (no iptables, say)."""


LOSS = 0.05
RELAY_PORT, RELAY_MARK, DELAY_MS = 7199, "0x64", 100


def _iptables(ns: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", ns, "iptables", *args], check=False, capture_output=True, text=True)


def loss(ns: str, dev: str, on: bool) -> None:
    """5 % of the packets ``ns`` receives on ``dev`` dropped (netem's ``loss 5%``, on input)."""
    rule = ["INPUT", "-i", dev, "-m", "statistic", "--mode", "random", "--probability", str(LOSS), "-j", "DROP"]
    while _iptables(ns, "-D", *rule).returncode == 0:  # none left over
        pass
    if on:
        r = _iptables(ns, "-A", *rule)
        if r.returncode != 0:
            raise RuntimeError(f"iptables -A {' '.join(rule)} in {ns}: {r.stderr.strip()}")


def start_relay(ns: str, other: str) -> subprocess.Popen:
    """The delaying relay (experiments/_relay.py) in ``ns``, and the NAT rule that sends every
    TCP connection ``ns`` opens to ``other`` through it."""
    relay = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, str(ROOT / "experiments" / "_relay.py"),
                              str(RELAY_PORT), str(DELAY_MS)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    first = relay.stdout.readline()
    if not first.startswith("relay on"):
        relay.kill()
        raise RuntimeError(f"the relay in {ns} did not start: {first.strip()}")
    r = _iptables(ns, "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", other, "-m", "mark", "!", "--mark", RELAY_MARK,
                  "-j", "REDIRECT", "--to-ports", str(RELAY_PORT))
    if r.returncode != 0:
        relay.kill()
        raise RuntimeError(f"iptables -t nat REDIRECT in {ns}: {r.stderr.strip()}")
    return relay


def slow(ns: str, dev: str, on: bool) -> None:
    """A slow link: ``tbf`` at 1 Mbit/s with up to 400 ms of queue (packets over it are dropped),
    the kernel's own shaping where netem is missing."""
    subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root"], check=False, capture_output=True)
    if on:
        r = subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", "1mbit",
                            "burst", "32kbit", "latency", "400ms"], check=False, capture_output=True, text=True)
        if r.returncode != 0:
            raise Unsupported(f"tc tbf: {r.stderr.strip()}")


def link(ns: str, dev: str, up: bool) -> None:
    """A partition: the veth end goes down (every packet on it is lost) and comes back."""
    _ip("-n", ns, "link", "set", dev, "up" if up else "down")


NETNS_SPEC = """
[cluster]
name = "chaos-2h"
store = "{store}"
http = "{a}:{http}"
supervisor = "tcp://{a}:{p0}"
[cluster.train.tiny]
arch = {{ kind = "mlp", hidden = [16] }}
epochs = 1
batch_size = 256
[cluster.train.tiny-long]
arch = {{ kind = "mlp", hidden = [64] }}
epochs = {long_epochs}
batch_size = 128
[hosts.alpha]
address = "{a}"
[hosts.beta]
address = "{b}"
[[nodes]]
name = "gateway"
role = "gateway"
host = "alpha"
zmq = "tcp://{a}:{p1}"
[nodes.config]
try_timeout = 1.0
probe_period = 0.25
[[nodes]]
name = "worker-a"
role = "worker"
host = "alpha"
zmq = "tcp://{a}:{p2}"
[[nodes]]
name = "worker-b"
role = "worker"
host = "beta"
zmq = "tcp://{b}:{p3}"
[[nodes]]
name = "replica-0"
role = "replica"
host = "beta"
zmq = "tcp://{b}:{p4}"
[nodes.config]
model = "tiny"
[[nodes]]
name = "replica-1"
role = "replica"
host = "beta"
zmq = "tcp://{b}:{p5}"
[nodes.config]
model = "tiny"
"""


NET_SCENARIOS = ["net-loss", "net-delay", "link-slow", "net-partition", "net-loss-training", "net-delay-training",
                 "net-partition-training"]


def run_netem(suite: Suite) -> None:
    names = NET_SCENARIOS
    if shutil.which("ip") is None or shutil.which("tc") is None:
        for n in names:
            suite.row(n, None, None, "skipped: `ip`/`tc` not installed (apt-get install -y iproute2)")
        return
    if shutil.which("iptables") is None:
        for n in names:
            suite.row(n, None, None, "skipped: `iptables` not installed (apt-get install -y iptables): the loss, "
                                     "and the relay that delays, need it")
        return
    try:
        hosts = two_hosts()
        ns_a, dev_a, a, ns_b, dev_b, b = hosts.__enter__()
    except RuntimeError as e:
        for n in names:
            suite.row(n, None, None, f"skipped: {e}")
        return
    try:
        _netem_scenarios(suite, ns_a, dev_a, a, ns_b, dev_b, b)
    finally:
        hosts.__exit__(None, None, None)


def _netem_scenarios(suite: Suite, ns_a, dev_a, a, ns_b, dev_b, b) -> None:
    suite.cluster()  # trains tiny into the shared store first, on this host
    c = Cluster(suite.root, "two-hosts", store=suite.store, prefix=["ip", "netns", "exec", ns_a],
                text=NETNS_SPEC.format(store=suite.store, a=a, b=b, http=8000, p0=7100, p1=7101, p2=7102, p3=7103,
                                       p4=7104, p5=7105, long_epochs=2 if suite.quick else 4))
    c.port = 8000
    beta = Cluster(suite.root, "two-hosts", store=suite.store, prefix=["ip", "netns", "exec", ns_b],
                   text=(c.dir / "spec.toml").read_text())
    relays: list[subprocess.Popen] = []
    try:
        # Before anything connects: every connection between the hosts goes through a relay
        # (it forwards at once until net-delay turns its delay on).
        relays = [start_relay(ns_a, b), start_relay(ns_b, a)]
        # Host alpha first (the supervisor and the door), then beta with alpha's cluster key.
        errors = []
        for cl, args in ((c, ("up", "spec.toml", "--host", "alpha", "--detach")),
                         (c, ("keys", "export", str(c.dir / "key.txt"))),
                         (beta, ("keys", "import", str(c.dir / "key.txt"))),
                         (beta, ("up", "spec.toml", "--host", "beta", "--detach"))):
            r = cl.cli(*args, state="sa" if cl is c else "sb", check=False, timeout=600)
            if r.returncode != 0:
                errors.append(f"{args[0]}: {r.stderr.strip()[-200:]}")
                break
        if errors:
            for n in NET_SCENARIOS:
                suite.row(n, None, None, f"skipped: two-host up failed: {errors[0]}")
            return
        c.remember("sa")
        beta.remember("sb")

        def ready() -> bool:
            return c.all_ready("sa", "alpha") and beta.all_ready("sb", "beta")

        wait_for(ready, 120)
        def both(fn, *args):
            fn(ns_a, dev_a, *args)
            fn(ns_b, dev_b, *args)

        def delay(on: bool) -> None:
            for relay in relays:
                relay.send_signal(signal.SIGUSR1 if on else signal.SIGUSR2)

        faults = {
            "net-loss": (lambda: both(loss, True), lambda: both(loss, False),
                         f"iptables statistic DROP {LOSS:.0%} of input"),
            "net-delay": (lambda: delay(True), lambda: delay(False), f"relay delay {DELAY_MS} ms each way"),
            "link-slow": (lambda: both(slow, True), lambda: both(slow, False), "tc tbf 1 Mbit/s, 400 ms queue"),
            "net-partition": (lambda: both(link, False), lambda: both(link, True), "veth down (partition)"),
        }
        hold = 10
        for name, (inject, heal, what) in faults.items():
            try:
                inject()
            except Unsupported as e:
                heal()
                suite.row(name, None, None, f"skipped: {e}")
                continue
            heal()

            def fault(inject=inject, heal=heal, what=what):
                inject()
                threading.Timer(hold, heal).start()
                return f"{what} both ways for {hold} s"

            with _in_netns(ns_a):
                suite.under_load(c, fault, after=hold + 2, name=name, host=a, ready=ready)
        # data-parallel training across the two hosts (worker-a, worker-b): 5 % loss the whole
        # run; 100 ms of delay the whole run; then a 10 s partition 2 s in (undisturbed, the
        # quick recipe trains in ~7 s on the quiet 2-core machine: 8 s in missed the run there)
        for name, inject, heal, what in (
                ("net-loss-training", lambda: both(loss, True), lambda: both(loss, False),
                 f"{LOSS:.0%} loss (iptables) the whole run"),
                ("net-delay-training", lambda: delay(True), lambda: delay(False),
                 f"{DELAY_MS} ms delay (relay) each way the whole run"),
                ("net-partition-training", lambda: [threading.Timer(t, lambda up=up: both(link, up)).start()
                                                    for t, up in ((2.0, False), (12.0, True))],
                 lambda: None, "a 10 s partition 2 s in")):
            result: dict = {}

            def fault(inject=inject, heal=heal, what=what, result=result):
                t = time.monotonic()
                inject()
                try:
                    r = c.cli("train", "tiny-long", check=False, timeout=600, state="sa")
                    rc, lines = r.returncode, [ln for ln in (r.stdout + r.stderr).strip().splitlines() if ln.strip()]
                except subprocess.TimeoutExpired:
                    rc, lines = None, ["still training after 600 s"]
                finally:
                    heal()
                result.update(rc=rc, s=time.monotonic() - t, out=lines[-1][-200:] if lines else "")
                return f"train across hosts with {what}: exit {rc} in {result['s']:.0f} s: {result['out']}"

            with _in_netns(ns_a):
                suite.under_load(c, fault, after=2, name=name, host=a, ready=ready,
                                 check=lambda result=result: result.get("rc") == 0)
    finally:
        for ns, dev in ((ns_a, dev_a), (ns_b, dev_b)):
            slow(ns, dev, False)
            loss(ns, dev, False)
            link(ns, dev, True)
        for relay in relays:
            relay.send_signal(signal.SIGUSR2)
        beta.down(state="sb")
        c.down(state="sa")
        for relay in relays:
            relay.kill()  # `ip netns exec` execs the relay: this pid is the relay's
            relay.wait()


@contextlib.contextmanager
def _in_netns(ns: str):
    """This thread (and the load's threads it starts) in network namespace ``ns``: setns on
    the calling thread; new threads inherit it."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    own = os.open(f"/proc/self/task/{threading.get_native_id()}/ns/net", os.O_RDONLY)
    target = os.open(f"/var/run/netns/{ns}", os.O_RDONLY)
    try:
        if libc.setns(target, 0x40000000) != 0:  # CLONE_NEWNET
            raise OSError(ctypes.get_errno(), f"setns into {ns}")
        yield
    finally:
        libc.setns(own, 0x40000000)
        os.close(own)
        os.close(target)


# -- main --------------------------------------------------------------------------------------

SCENARIOS = {
    "replica-kill": Suite.replica_kill, "replicas-kill-2": Suite.replicas_kill_2, "replica-stop": Suite.replica_stop,
    "gateway-kill": Suite.gateway_kill, "fuzz": Suite.fuzz, "worker-kill-training": Suite.worker_kill_training,
    "disk-full": Suite.disk_full, "gateway-single-kill": Suite.gateway_single_kill, "netem": Suite.netem,
    "supervisor-kill": Suite.supervisor_kill,  # last on the main cluster: it brings the cluster up anew
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=(
        "Needs root (network namespaces, tmpfs mounts), iproute2 (`ip`, `tc`) and, for the loss and delay "
        "between the two hosts, iptables: apt-get install -y iproute2 iptables (nothing is installed here)."))
    p.add_argument("--only", action="append", choices=sorted(SCENARIOS), help="run only this scenario (repeatable)")
    p.add_argument("--quick", action="store_true", help="shorter training, 5,000 fuzzed messages")
    p.add_argument("--fuzz", type=int, help="fuzzed messages in all, every node in turn (default 100,000; --quick 5,000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the rows to FILE")
    p.add_argument("--tree", help="run the clusters from this source tree (a directory holding dmlsys/) instead "
                                  "of this one: to measure a proposed change without touching the tree")
    args = p.parse_args(argv)
    global SOURCE
    if args.tree:
        SOURCE = Path(args.tree).resolve()
    args.fuzz = args.fuzz or (5_000 if args.quick else 100_000)
    suite = Suite(args)
    t0 = time.monotonic()
    try:
        for name in args.only or list(SCENARIOS):
            print(f"== {name}", flush=True)
            try:
                SCENARIOS[name](suite)
            except Exception as e:  # noqa: BLE001 - one scenario's breakage is a row, not the end
                suite.row(name, None, False, f"scenario failed: {type(e).__name__}: {str(e)[-300:]}")
    finally:
        suite.close()
    print(f"\n{len(suite.rows)} rows in {time.monotonic() - t0:.0f} s")
    print_table(suite.rows)
    if args.json:
        Path(args.json).write_text(json.dumps(suite.rows, indent=1))
    return 1 if any(r["lost"] for r in suite.rows) else 0


def print_table(rows: list[dict]) -> None:
    print("| scenario | sent | ok | failed | lost | recover_s | intact | note |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        rec = "—" if r["recover_s"] is None else f"{r['recover_s']:g}"
        intact = {True: "yes", False: "**no**", None: "—"}[r["intact"]]
        print(f"| {r['scenario']} | {r['sent']} | {r['ok']} | {r['failed']} | {r['lost']} | {rec} | {intact} | "
              f"{r['note'].replace('|', '/')} |")


if __name__ == "__main__":
    sys.exit(main())
