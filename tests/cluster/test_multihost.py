"""One cluster on two hosts for real: Linux network namespaces joined by a veth pair, each host with
its own working directory (its own model store), one `up --host NAME` each.

One scenario, in the order a user would live it (the slowest test of the suite, so one cluster
for all of it): beta is up first and waits for the primary; `up` on alpha trains on beta's
workers (rank 0 saves into beta's store) and pulls the model into the cluster's store (alpha's);
serve on beta's replica, predict through alpha's gateway; scale the replica group onto both
hosts (alpha's replica loads the pulled model); kill every process of beta while requests flow:
none is lost, alpha's replica answers, beta's nodes are counted lost; beta comes back with an
empty disk and rejoins: its replica fetches the model from the cluster's store; scale back; the
primary's supervisor SIGKILLed: beta reports it lost, and rejoins when alpha is up again;
`down` on alpha stops beta too.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from tests.cluster.helpers import ROOT, alive, wait_for

NET = f"10.{150 + os.getpid() % 50}.{os.getpid() % 250}"
A, B = f"{NET}.1", f"{NET}.2"


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True)


@pytest.fixture
def hosts():
    if shutil.which("ip") is None:
        pytest.skip("iproute2 (`ip`) is not installed")
    tag = f"mh{os.getpid()}"
    a, b = f"{tag}a", f"{tag}b"
    made = _ip("netns", "add", a)
    if made.returncode != 0:
        pytest.skip(f"cannot create network namespaces here (needs root/CAP_SYS_ADMIN): {made.stderr.strip()}")
    try:
        _ip("netns", "add", b)
        _ip("link", "add", f"{tag}va", "type", "veth", "peer", "name", f"{tag}vb")
        for ns, dev, addr in ((a, f"{tag}va", A), (b, f"{tag}vb", B)):
            _ip("link", "set", dev, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        if A not in _ip("-n", a, "addr", "show", f"{tag}va").stdout:
            pytest.skip("could not configure a veth pair between namespaces")
        yield a, b
    finally:
        for ns in (a, b):
            kill_all(ns)
            _ip("netns", "del", ns)


def kill_all(ns: str) -> list[int]:
    pids = [int(p) for p in _ip("netns", "pids", ns).stdout.split()]
    for pid in pids:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
    return pids


SPEC = f"""
[cluster]
name = "two-hosts"
supervisor = "tcp://{A}:7200"
http = "{A}:7280"

[cluster.train.tiny]
arch = {{ kind = "mlp", hidden = [32] }}
epochs = 1
batch_size = 256

[hosts.alpha]
address = "{A}"
[hosts.beta]
address = "{B}"

[[nodes]]
name = "gateway"
role = "gateway"
host = "alpha"
[nodes.config]
try_timeout = 1.0
probe_period = 0.2

[[nodes]]
name = "worker"
role = "worker"
host = "beta"                     # rank 0 saves on beta: the primary pulls the model
replicas = 1
[nodes.config]
limit = 2000
test_limit = 500
single_thread = true

[[nodes]]
name = "replica"
role = "replica"
replicas = 1
hosts = ["beta", "alpha"]         # spread: replica-0 on beta, replica-1 on alpha
[nodes.config]
model = "tiny"
buckets = [1]                     # one shape to compile: each start is seconds shorter
"""

STREAM = textwrap.dedent(f"""
    import json, sys, time, urllib.request
    ok, failed, errors = 0, 0, []
    body = json.dumps({{"instances": [[0.0] * 784]}}).encode()
    end = time.monotonic() + float(sys.argv[1])
    while time.monotonic() < end:
        req = urllib.request.Request("http://{A}:7280/v1/models/tiny:predict", body,
                                     {{"Content-Type": "application/json"}})
        try:
            with urllib.request.urlopen(req, timeout=15) as r:
                json.loads(r.read())
            ok += 1
        except Exception as e:
            failed += 1
            errors.append(str(e)[:200])
        time.sleep(0.02)
    print(json.dumps({{"ok": ok, "failed": failed, "errors": errors[:5]}}))
""")


def test_two_hosts_train_serve_scale_lose_a_host_and_rejoin(hosts, tmp_path):
    ns = dict(zip(("alpha", "beta"), hosts))
    spec = tmp_path / "two.toml"
    spec.write_text(SPEC)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DMLSYS_LOG": "INFO"}
    for host in ns:
        (tmp_path / host).mkdir()

    def cluster(host: str, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        result = subprocess.run(["ip", "netns", "exec", ns[host], sys.executable, "-m", "dmlsys.cluster", *args],
                                cwd=tmp_path / host, env=env, capture_output=True, text=True, timeout=timeout)
        assert not check or result.returncode == 0, f"{host} {args}: {result.stdout}\n{result.stderr}"
        return result

    def status(host: str) -> dict:
        out = cluster(host, "status", "--json", check=False)
        return json.loads(out.stdout) if out.stdout.startswith("{") else {}

    def state(host: str) -> dict:  # what `status` shows, read from the state file (no CLI start-up)
        try:
            return json.loads((tmp_path / host / ".dmlsys" / "state.json").read_text())
        except (OSError, ValueError):
            return {}

    def rows(host: str) -> dict[str, dict]:
        return {r["name"]: r for r in state(host).get("nodes", [])}

    def predict() -> dict:
        client = ("import json, urllib.request; body = json.dumps({'instances': [[0.0] * 784]}).encode(); "
                  f"r = urllib.request.urlopen(urllib.request.Request('http://{A}:7280/v1/models/tiny:predict', body, "
                  "{'Content-Type': 'application/json'}), timeout=10); print(r.read().decode())")
        out = subprocess.run(["ip", "netns", "exec", ns["alpha"], sys.executable, "-c", client], env=env,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    stopped = False
    t0 = time.monotonic()

    def mark(what: str) -> None:
        print(f"{time.monotonic() - t0:6.1f}s {what}", flush=True)

    try:
        # beta first: it waits for the primary (alpha), which has the cluster's key from it.
        up_b = cluster("beta", "up", str(spec), "--host", "beta", "--detach", timeout=120)
        assert "waiting for the primary supervisor" in up_b.stdout, up_b.stdout
        assert state("beta")["state"] == "waiting"
        mark("beta waiting")
        cluster("beta", "keys", "export", str(tmp_path / "key.txt"))
        cluster("alpha", "keys", "import", str(tmp_path / "key.txt"))
        mark("keys")
        # alpha's `up` trains the model on beta's workers (rank 0 saves into beta's store), pulls it
        # into the cluster's store (alpha's), and returns ready only once beta's replica is.
        cluster("alpha", "up", str(spec), "--host", "alpha", "--detach", timeout=240)
        assert state("alpha")["state"] == "ready" and state("beta")["state"] == "ready"
        mark("alpha up (trained on beta, pulled)")
        models = {h: tmp_path / h / ".dmlsys" / "models" / "tiny" / "1" for h in ("alpha", "beta")}
        assert (models["alpha"] / "card.json").exists() and (models["beta"] / "card.json").exists()
        cards = [json.loads((models[h] / "card.json").read_text()) for h in ("alpha", "beta")]
        assert cards[0]["params_sha"] == cards[1]["params_sha"]
        assert "pulled model 'tiny' v1 from host beta" in (tmp_path / "alpha/.dmlsys/supervisor.log").read_text()
        seen = {r["name"]: r for r in status("beta")["nodes"]}  # `status` on any host shows every host's nodes
        assert {seen["gateway"]["host"], seen["worker-0"]["host"], seen["replica-0"]["host"]} == {"alpha", "beta"}
        assert seen["replica-0"]["host"] == "beta" and seen["gateway"]["state"] == "ready"
        assert predict()["model_version"] == 1  # through alpha's door, answered on beta

        mark("status, predict")
        # Scale onto both hosts: the new member goes to alpha (spread) and loads the pulled model.
        cluster("alpha", "scale", "replica", "2", timeout=180)
        now = rows("alpha")
        assert (now["replica-0"]["host"], now["replica-1"]["host"]) == ("beta", "alpha")
        assert now["replica-1"]["state"] == "ready"

        mark("scaled to 2")
        # Every process of beta dies while requests flow: none is lost.
        stream = subprocess.Popen(["ip", "netns", "exec", ns["alpha"], sys.executable, "-c", STREAM, "5"], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(1.5)
        assert kill_all(ns["beta"])
        out, err = stream.communicate(timeout=60)
        result = json.loads(out)
        assert result["failed"] == 0 and result["ok"] > 30, (result, err)
        lost = wait_for(lambda: (s := state("alpha")).get("hosts", {}).get("beta", {}).get("state") == "lost" and s,
                        20, "alpha to count beta lost")
        assert {r["name"]: r["state"] for r in lost["nodes"]}["replica-0"] == "lost"

        mark("beta killed, counted lost")
        # beta comes back on an empty disk and rejoins: its replica fetches the model from the
        # cluster's store, which has it only because alpha pulled it.
        shutil.rmtree(tmp_path / "beta" / ".dmlsys" / "models")
        cluster("beta", "up", str(spec), "--host", "beta", "--detach", timeout=180)
        wait_for(lambda: rows("alpha").get("replica-0", {}).get("state") == "ready", 60, "replica-0 back on beta")
        assert state("alpha")["hosts"]["beta"]["joins"] == 2
        assert "fetched model 'tiny' v1 from supervisor" in (tmp_path / "beta/.dmlsys/logs/replica-0.log").read_text()

        mark("beta back, refetched")
        # And back to one member: the fullest host (a tie: the later in `hosts`, alpha) gives one up.
        cluster("beta", "scale", "replica", "1", timeout=120)  # from beta: the primary places it
        after = rows("alpha")
        assert "replica-1" not in after and after["replica-0"]["host"] == "beta"

        mark("scaled to 1")
        # The primary's supervisor dies (its nodes with it): beta says so, keeps its own nodes,
        # and rejoins when alpha is up again (the model is in alpha's store: no training).
        os.kill(state("alpha")["supervisor"]["pid"], signal.SIGKILL)
        wait_for(lambda: (state("beta").get("error") or "").startswith("lost the primary"), 20,
                 "beta to report the primary lost")
        assert rows("beta")["gateway"]["state"] == "lost" and rows("beta")["replica-0"]["state"] == "ready"
        cluster("alpha", "up", str(spec), "--host", "alpha", "--detach", timeout=180)
        wait_for(lambda: state("beta").get("error") is None and rows("beta")["gateway"]["state"] == "ready", 20,
                 "beta to rejoin the new primary")
        assert state("alpha")["hosts"]["beta"]["state"] == "up"
        assert predict()["model_version"] == 1

        mark("primary lost and back")
        beta_pid = state("beta")["supervisor"]["pid"]
        cluster("alpha", "down", timeout=120)
        wait_for(lambda: not alive(beta_pid), 30, "beta's supervisor to stop when alpha's down stops the cluster")
        stopped = True
        mark("down")
    finally:
        if not stopped:  # the fixture kills whatever is left in the namespaces after this
            for host in ("beta", "alpha"):
                cluster(host, "down", check=False, timeout=120)
