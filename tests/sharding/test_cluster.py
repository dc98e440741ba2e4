"""Real processes through the cluster CLI: a router and shards `up` from a spec; a shard SIGKILLed
during a large request; a key's state through a restart, `scale shard 3` and `scale shard 2`."""

import asyncio
import json
import os
import signal
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest

from dmlsys.cluster.__main__ import client_node, cluster_key
from dmlsys.node import RemoteError
from dmlsys.sharding import png
from dmlsys.sharding.canvas import SoftmaxTagger, make_canvas, score
from dmlsys.sharding.ring import HashRing
from tests.cluster.helpers import Cli, alive, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

VNODES = 64

CANVAS_SPEC = """
[cluster]
name = "canvas"
[[nodes]]
name = "router"
role = "router"
[nodes.config]
app = "dmlsys.sharding.canvas:canvas"
app_options = {{ model = "{model}" }}
http = "127.0.0.1:0"
max_body_bytes = 1000000
part_timeout = 5.0
deadline = 60.0
vnodes = 64
[[nodes]]
name = "shard"
role = "shard"
replicas = 2
[nodes.config]
app = "dmlsys.sharding.canvas:canvas"
app_options = {{ model = "{model}" }}
fsync = false
vnodes = 64
"""

COUNTER_SPEC = """
[cluster]
name = "counter"
[[nodes]]
name = "router"
role = "router"
[nodes.config]
app = "dmlsys.sharding.app:counter"
part_timeout = 2.0
vnodes = 64
[[nodes]]
name = "shard"
role = "shard"
replicas = 2
[nodes.config]
app = "dmlsys.sharding.app:counter"
fsync = false
call_timeout = 2.0
vnodes = 64
"""


@pytest.fixture
def cli(tmp_path):
    cli = Cli(tmp_path)
    yield cli
    pids = cli.pids()
    cli("down", check=False, timeout=90)
    for pid in pids:  # whatever down missed is still ours to stop
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def call(cli: Cli, node: str, service: str, method: str, body=None, timeout: float = 30.0):
    """One RPC from a CLI-like client (the cluster key's "cli" principal) to a node of the cluster."""
    address = f"ipc://{cli.cwd.resolve()}/.dmlsys/sock/{node}"  # one host: nodes listen on Unix sockets there

    async def go():
        async with client_node({node: address}, keys=cluster_key(cli.cwd / ".dmlsys")) as client:
            return await client.call(node, service, method, body, timeout=timeout)

    return asyncio.run(go())


def shard_rows(cli: Cli) -> dict[str, dict]:
    return {n["name"]: n for n in cli.status()["nodes"] if n["role"] == "shard"}


def post(url: str, body: bytes, content_type: str, timeout: float = 60.0) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_canvas_over_http_and_a_shard_sigkilled_mid_request(cli, tmp_path):
    from dmlsys.train import data

    ds = data.load()
    model = tmp_path / "tagger.npz"  # a quick classifier: detection, not accuracy, is under test
    SoftmaxTagger.fit(ds.train_images[:3000], ds.train_labels[:3000], epochs=1).save(model)
    cli("up", cli.write_spec(CANVAS_SPEC.format(model=model)), "--detach")
    door = call(cli, "router", "node", "status")["services"]["router"]["http"]
    url = f"{door}/v1/models/canvas:tag"

    small, small_truth = make_canvas(ds.test_images, ds.test_labels, size=420, count=40, seed=5)
    status, doc = post(url + "?cell=140", png.encode(small), "image/png")
    assert status == 200, doc
    found = np.array([[g["y"], g["x"], g["class"]] for g in doc["garments"]])
    s = score(found, small_truth, tolerance=2)
    assert (s["precision"], s["recall"], doc["parts"], doc["shards"]) == (1.0, 1.0, 9, 2)

    status, doc = post(url, json.dumps({"canvas": small.tolist(), "cell": 140}).encode(), "application/json")
    assert status == 200 and doc["count"] == len(small_truth)
    status, doc = post(url.replace("canvas:tag", "fashion-mlp:tag"), b"[]", "application/json")
    assert status == 404 and "canvas:tag" in doc["error"]

    # What a gateway's hook does: hand the body to router.http by RPC, as a uint8 array frame.
    reply = call(cli, "router", "router", "http", {"model": "canvas", "verb": "tag", "content_type": "image/png",
                                                   "body": np.frombuffer(png.encode(small), np.uint8),
                                                   "params": {"cell": "140"}})
    assert reply["status"] == 200 and reply["json"]["count"] == len(small_truth)

    # A large request (196 tiles: both shards busy for seconds); SIGKILL shard-1 once it has begun.
    big, truth = make_canvas(ds.test_images, ds.test_labels, size=2800, count=1200, seed=6)
    body = png.encode(big)
    # As JSON it is ~16 MB of text: over the door's cap, refused by name before it is parsed.
    status, doc = post(url, json.dumps(big.tolist()).encode(), "application/json")
    assert status == 413 and "max_body_bytes = 1000000" in doc["error"]
    victim = shard_rows(cli)["shard-1"]
    out: dict = {}

    async def kill_when_busy():
        async with client_node({"shard-1": victim["zmq"]}, keys=cluster_key(cli.cwd / ".dmlsys")) as client:
            async def handled():
                return (await client.call("shard-1", "node", "status", None, timeout=5))["services"]["shard"]["handled"]

            before = await handled()
            worker.start()
            while await handled() < before + 3:
                await asyncio.sleep(0.02)
        os.kill(victim["pid"], signal.SIGKILL)

    worker = threading.Thread(target=lambda: out.update(r=post(url + "?cell=200", body, "image/png", 120)))
    asyncio.run(asyncio.wait_for(kill_when_busy(), 60))
    worker.join(120)
    status, doc = out["r"]
    if status == 200:  # through the retry: every garment, once
        found = np.array([[g["y"], g["x"], g["class"]] for g in doc["garments"]])
        s = score(found, truth, tolerance=2)
        assert (s["precision"], s["recall"], doc["count"]) == (1.0, 1.0, len(truth))
    else:  # or the named error: which part, which shard; never a partial answer
        assert status == 503 and doc["part"] is not None and doc["shard"] and "part " in doc["error"], doc
    router = call(cli, "router", "node", "status")["services"]["router"]
    assert router["retries"] >= 1


def test_a_keys_state_survives_restart_scale_up_and_scale_down(cli):
    cli("up", cli.write_spec(COUNTER_SPEC), "--detach")
    keys = [f"user-{i}" for i in range(30)]

    def add(request_id: str) -> dict:
        def attempt():
            try:
                return call(cli, "router", "router", "request", {"request": {"add": {k: 1.0 for k in keys}},
                                                                 "id": request_id})
            except RemoteError as e:  # a shard restarting: the named error; the same id resumes
                assert e.type == "PartFailed", e
                return None
        return wait_for(attempt, 30, f"request {request_id} to succeed", interval=0.5)

    def held() -> dict[str, list[str]]:
        return {name: call(cli, name, "shard", "keys") for name in sorted(shard_rows(cli))}

    assert add("r1") == {k: 1.0 for k in keys}
    rows = shard_rows(cli)
    assert sum(r["keys"] for r in rows.values()) == len(keys) and all(r["keys"] and r["bytes"] for r in rows.values())
    table = cli("status").stdout
    assert "keys" in table and "bytes" in table

    # SIGKILL a shard: the supervisor restarts it, its keys come back from its snapshot.
    victim = rows["shard-1"]
    os.kill(victim["pid"], signal.SIGKILL)
    wait_for(lambda: (r := shard_rows(cli)["shard-1"])["state"] == "ready" and r["pid"] != victim["pid"], 30,
             "shard-1 to be restarted")
    assert add("r2") == {k: 2.0 for k in keys}

    # Scale up: only the keys the ring now gives shard-2 move, with their sums.
    before = held()
    cli("scale", "shard", "3")
    ring = HashRing(["shard-0", "shard-1", "shard-2"], vnodes=VNODES)
    want = {name: sorted(k for k in keys if ring.lookup(k) == name) for name in ring.names}
    wait_for(lambda: held() == want, 30, "shard-2's keys to move to it")
    assert want["shard-2"] and all(set(want[n]) <= set(before[n]) for n in before)
    assert add("r3") == {k: 3.0 for k in keys}

    # Scale down: shard-2 hands its keys back before it stops; they are served at once.
    cli("scale", "shard", "2")
    assert add("r4") == {k: 4.0 for k in keys}
    assert held() == before
    rows = shard_rows(cli)
    assert set(rows) == {"shard-0", "shard-1"} and sum(r["keys"] for r in rows.values()) == len(keys)
