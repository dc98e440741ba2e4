"""Two gateways behind one front door (a gateway group: SO_REUSEPORT on the shared port), real
processes: a rollout through the CLI reaches both (neither reloads the other's replicas back), a
gateway SIGKILLed under load leaves the door open, and the restarted one follows the cluster's pin."""

import asyncio
import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request

from dmlsys.cluster.spec import free_port
from tests.cluster.helpers import wait_for
from tests.serving.helpers import make_store, mlp_params

SPEC = """
[cluster]
name = "pair-test"
store = "store"
http = "127.0.0.1:{port}"
[[nodes]]
name = "gateway"
role = "gateway"
replicas = 2
[nodes.config]
probe_period = 0.2
[[nodes]]
name = "replica"
role = "replica"
replicas = 2
[nodes.config]
model = "tiny"
"""


def _predict(base: str, timeout: float = 10) -> int:
    body = json.dumps({"instances": [[0.0] * 784]}).encode()
    req = urllib.request.Request(f"{base}/v1/models/tiny:predict", body, {"Content-Type": "application/json",
                                                                          "Connection": "close"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())["model_version"]


def _pins(cli, name: str) -> dict:
    from dmlsys.cluster.__main__ import ask, cluster_key

    row = next(n for n in cli.status()["nodes"] if n["name"] == name)
    return asyncio.run(ask(name, row["zmq"], "serving", "pins", {}, timeout=5,
                           keys=cluster_key(cli.cwd / ".dmlsys")))["pinned"]


def _row(cli, name: str) -> dict:
    return next(n for n in cli.status()["nodes"] if n["name"] == name)


def test_a_rollout_reaches_both_gateways_and_a_killed_one_leaves_the_door_open(cli):
    from dmlsys.train.store import ModelStore

    make_store(cli.cwd / "store", versions=2)  # the replicas come up on the latest: v2
    port = free_port()
    cli("up", cli.write_spec(SPEC.format(port=port)), "--detach", timeout=180)
    base = f"http://127.0.0.1:{port}"
    wait_for(lambda: all(_pins(cli, g).get("tiny") == 2 for g in ("gateway-0", "gateway-1")), 10, "pins on v2")

    # A rollout back to v1, asked of the supervisor: one gateway runs it, both pin v1.
    out = json.loads(cli("rollout", "tiny", "--version", "1", timeout=120).stdout)
    assert out["pinned"] == 1 and sorted(out["gateways"]) == ["gateway-0", "gateway-1"], out
    assert all(v == "ok" for v in out["gateways"].values()), out
    assert {_pins(cli, "gateway-0")["tiny"], _pins(cli, "gateway-1")["tiny"]} == {1}
    # Neither gateway undoes it: a few sync and probe periods later every answer is still v1,
    # whichever gateway the kernel hands the connection to.
    time.sleep(2.5)
    assert {_predict(base) for _ in range(30)} == {1}

    # SIGKILL gateway-0 under load from four clients, one new connection per request.
    results: list[tuple[float, float, str]] = []  # (start, end, outcome) of each request
    stop = threading.Event()

    def client():
        while not stop.is_set():
            t = time.monotonic()
            try:
                outcome = f"v{_predict(base, timeout=15)}"
            except urllib.error.HTTPError as e:
                outcome = f"http {e.code}"
            except (ConnectionError, urllib.error.URLError) as e:  # refused or reset: the client knows at once
                outcome = type(getattr(e, "reason", e)).__name__
            results.append((t, time.monotonic(), outcome))
            time.sleep(0.02)

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        victim = _row(cli, "gateway-0")["pid"]
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        time.sleep(2.0)
    finally:
        stop.set()
        for t in threads:
            t.join(20)
    before = [r for t, end, r in results if end < killed_at]
    after = [r for t, end, r in results if t > killed_at + 0.3]  # connections made once the kernel knows
    at_kill = [r for t, end, r in results if end >= killed_at and t <= killed_at + 0.3]
    assert before and set(before) == {"v1"}, set(before)
    assert len(after) > 20 and set(after) == {"v1"}, {r: after.count(r) for r in set(after)}
    # What the dying process held is answered at once by a reset (never silence): at most one per client.
    assert sum(r != "v1" for r in at_kill) <= len(threads), at_kill

    # The supervisor restarts gateway-0; it starts on the cluster's pin (v1), not on the first
    # version it sees. A replica restarted now loads the latest (v2): both gateways reload it to v1.
    wait_for(lambda: _row(cli, "gateway-0")["state"] == "ready" and _row(cli, "gateway-0")["pid"] != victim,
             60, "gateway-0 restarted and ready")
    assert _pins(cli, "gateway-0")["tiny"] == 1
    ModelStore(cli.cwd / "store").save("tiny", mlp_params(7), {"arch": {"kind": "mlp", "hidden": [16]}})  # v3
    replica = _row(cli, "replica-0")["pid"]
    os.kill(replica, signal.SIGKILL)
    wait_for(lambda: _row(cli, "replica-0")["state"] == "ready" and _row(cli, "replica-0")["pid"] != replica,
             60, "replica-0 restarted and ready")
    time.sleep(1.5)
    assert {_predict(base) for _ in range(30)} == {1}
    assert {_pins(cli, "gateway-0")["tiny"], _pins(cli, "gateway-1")["tiny"]} == {1}
