"""The dashboard's actions: the supervisor's admin handlers, only for a page of its own.

A stand-in supervisor records what it is asked; the dashboard runs in this process on a free
loopback port. Pinned down: a confirmed scale and drain reach the supervisor's ``scale`` and
``pool_stop``; its refusal comes back as the page's error; a request naming another host
(DNS rebinding), from another origin, or not JSON (a cross-site form) is refused and reaches
nothing; the state and the event stream carry the nodes the supervisor reports.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path

import aiohttp
import pytest

from dmlsys.cluster.dashboard import Dashboard
from dmlsys.cluster.spec import parse

SPEC = parse({"cluster": {"name": "t"}, "nodes": [{"name": "replica", "role": "replica", "replicas": 2}]}, "t.toml")


@dataclasses.dataclass
class FakeSupervisor:
    spec: object = SPEC
    link: object = None
    node: object = None
    procs: dict = dataclasses.field(default_factory=dict)  # nothing local to look at
    state_dir: Path = Path("/nonexistent")
    asked: list = dataclasses.field(default_factory=list)

    def status_document(self):
        return {"cluster": "t", "state": "ready", "error": None, "supervisor": {"pid": 1}, "http": None,
                "nodes": [{"name": f"replica-{i}", "role": "replica", "state": "ready", "pid": 100 + i,
                           "restarts": i, "host": "local", "admin": None} for i in range(2)]}

    async def scale(self, group, replicas):
        self.asked.append(("scale", group, replicas))
        if replicas > 64:
            raise ValueError(f"replicas must be from 0 to 64, got {replicas}")
        return []

    async def pool_stop(self, name):
        self.asked.append(("drain", name))
        return {"name": name}


def run(check, state_dir: Path = Path("/nonexistent")):
    async def main():
        sup = FakeSupervisor(state_dir=state_dir)
        dash = Dashboard(sup, "127.0.0.1:0", period=0.05)
        await dash.start()
        try:
            async with aiohttp.ClientSession() as http:
                await check(sup, dash, http)
        finally:
            await dash.stop()
    asyncio.run(main())


def test_scale_and_drain_reach_the_supervisors_handlers():
    async def check(sup, dash, http):
        async with http.post(f"{dash.url}/api/scale", json={"group": "replica", "replicas": 3}) as r:
            assert r.status == 200 and (await r.json())["ok"]
        async with http.post(f"{dash.url}/api/drain", json={"name": "replica-1"}) as r:
            assert r.status == 200
        async with http.post(f"{dash.url}/api/scale", json={"group": "replica", "replicas": 99}) as r:
            assert r.status == 409 and "0 to 64" in (await r.json())["error"]
        assert sup.asked == [("scale", "replica", 3), ("drain", "replica-1"), ("scale", "replica", 99)]
    run(check)


@pytest.mark.parametrize("headers, body, status", [
    ({"Host": "evil.example:80"}, json.dumps({"group": "replica", "replicas": 3}), 421),
    ({"Origin": "http://evil.example"}, json.dumps({"group": "replica", "replicas": 3}), 403),
    ({"Content-Type": "application/x-www-form-urlencoded"}, "group=replica&replicas=3", 415),
    ({}, json.dumps({"group": "replica", "replicas": "3"}), 400),
])
def test_an_action_from_anywhere_but_its_own_page_is_refused(headers, body, status):
    async def check(sup, dash, http):
        h = {"Content-Type": "application/json", **headers}
        async with http.post(f"{dash.url}/api/scale", data=body, headers=h) as r:
            assert r.status == status
        assert sup.asked == []
    run(check)


def test_the_state_and_the_event_stream_carry_the_nodes():
    async def check(sup, dash, http):
        async with http.get(f"{dash.url}/events") as r:
            assert r.headers["Content-Type"].startswith("text/event-stream")
            line = await asyncio.wait_for(r.content.readline(), 5)
            doc = json.loads(line.removeprefix(b"data: "))
        assert [n["name"] for n in doc["nodes"]] == ["replica-0", "replica-1"]
        assert doc["groups"] == {"replica": {"role": "replica", "replicas": 2}}
        async with http.get(f"{dash.url}/") as r:
            assert r.status == 200 and "<script src=\"/static/app.js\">" in await r.text()
        async with http.get(f"{dash.url}/static/app.js") as r:
            assert r.status == 200
    run(check)


def test_a_pipeline_report_in_the_state_directory_shows_as_a_timeline_with_its_cache_hits(tmp_path):
    (tmp_path / "runs").mkdir()
    steps = [{"name": "ingest", "state": "done", "start": 0.0, "end": 0.0, "cache": "hit", "attempts": 0},
             {"name": "train_cnn", "state": "done", "start": 0.1, "end": 4.0, "cache": "miss", "attempts": 1}]
    (tmp_path / "runs" / "last.json").write_text(json.dumps({"wall_s": 4.2, "hits": ["ingest"], "steps": steps}))

    async def check(sup, dash, http):
        await dash.refresh()
        async with http.get(f"{dash.url}/api/state") as r:
            runs = (await r.json())["runs"]
        assert [(st["name"], st["cache"]) for st in runs[0]["steps"]] == [("ingest", "hit"), ("train_cnn", "miss")]
        assert runs[0]["hits"] == ["ingest"] and runs[0]["name"] == "last"
    run(check, tmp_path)


def test_a_workers_epochs_and_an_events_nodes_queue_come_from_what_they_expose():
    """Two stand-in nodes' admin ports (/status, /metrics) and a worker's train.progress: the
    picture carries the worker's epochs, the events node's gate and pool, and a rate."""
    from aiohttp import web

    statuses = {
        "worker-0": {"uptime_s": 5.0, "in_flight": 1, "services": {"train": {"job": "j1", "epochs_done": 2}},
                     "metrics": {"messages_in": 10}},
        "events": {"uptime_s": 7.0, "in_flight": 0, "services": {"events": {
            "gate": {"waiting": {"anonymous": 3}, "refused": {"anonymous:rate": 42}},
            "pool": {"slots": 4, "slots_used": 2, "instances": {"fashion": 2}}}}, "metrics": {"messages_in": 5}},
    }

    class Node:
        async def call(self, peer, service, method, body, timeout):
            assert (peer, service, method) == ("worker-0", "train", "progress")
            return {"job": "j1", "model": "fashion-mlp", "epochs_total": 5,
                    "epochs": [{"epoch": 1, "loss": 0.6, "test_accuracy": 0.8}, {"epoch": 2, "loss": 0.4, "test_accuracy": 0.85}]}

    async def main():
        app = web.Application()
        async def status(request):
            return web.json_response(statuses[request.match_info["node"]])

        async def metrics(request):
            return web.Response(text="")

        app.router.add_get("/{node}/status", status)
        app.router.add_get("/{node}/metrics", metrics)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        admin = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        spec = parse({"cluster": {"name": "t"}, "nodes": [{"name": "worker", "role": "worker", "replicas": 1},
                                                           {"name": "events", "role": "events"}]}, "t.toml")
        sup = FakeSupervisor(spec=spec, node=Node(), procs={"worker-0": None, "events": None})
        sup.status_document = lambda: {
            "cluster": "t", "state": "ready", "error": None, "supervisor": {"pid": 1}, "http": None,
            "nodes": [{"name": n, "role": r, "state": "ready", "pid": 10 + i, "restarts": 0, "admin": f"{admin}/{n}"}
                      for i, (n, r) in enumerate((("worker-0", "worker"), ("events", "events")))]}
        dash = Dashboard(sup, "127.0.0.1:0", period=3600)
        await dash.start()
        try:
            await dash.refresh()
            statuses["worker-0"]["metrics"]["messages_in"] = 30
            await asyncio.sleep(0.05)
            await dash.refresh()
            return dash.snapshot
        finally:
            await dash.stop()
            await runner.cleanup()

    snap = asyncio.run(main())
    job = snap["training"][0]
    assert (job["worker"], job["model"], job["epochs_total"], len(job["epochs"])) == ("worker-0", "fashion-mlp", 5, 2)
    events = snap["sections"]["events"]["events"]["events"]
    assert events["gate"]["refused"] == {"anonymous:rate": 42} and events["pool"]["slots_used"] == 2
    worker = next(n for n in snap["nodes"] if n["name"] == "worker-0")
    assert worker["uptime_s"] == 5.0 and worker["group"] == "worker"
    assert worker["points"][-1]["rate"] > 0  # 20 more messages between the two looks


def test_a_shard_is_not_drained_its_keys_would_go_with_it():
    spec = parse({"cluster": {"name": "t"}, "nodes": [{"name": "shard", "role": "shard", "replicas": 2}]}, "t.toml")

    async def check(sup, dash, http):
        sup.spec = spec
        sup.status_document = lambda: {"cluster": "t", "state": "ready", "error": None, "supervisor": {"pid": 1},
                                       "http": None, "nodes": [{"name": "shard-1", "role": "shard", "state": "ready",
                                                                "pid": 5, "restarts": 0, "admin": None}]}
        await dash.refresh()
        assert dash.snapshot["nodes"][0]["drainable"] is False
        async with http.post(f"{dash.url}/api/drain", json={"name": "shard-1"}) as r:
            assert r.status == 409 and "scale its group down" in (await r.json())["error"]
        assert sup.asked == []
    run(check)
