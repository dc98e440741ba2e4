"""The HTTP front door: the KServe v1 contract and every error status, and the node stays up."""

import asyncio
import json

import aiohttp

from dmlsys.node import Directory, Node, State
from dmlsys.serving.balancer import BalancerConfig
from dmlsys.serving.gateway import GatewayConfig, GatewayService
from dmlsys.serving.replica import ModelService, ReplicaConfig
from dmlsys.wire.sim import SimNetwork

from tests.serving.helpers import body, fake_runtime, members


async def door(scenario, *, deadline=10.0):
    """A gateway on a real port, replicas r0 (model m, ready) and ghost (model g, never started)."""
    net = SimNetwork(0)
    r0 = Node("r0", net.transport("r0"), role="replica")
    r0.add_service(ModelService(ReplicaConfig("m", "unused"), loader=lambda s, m, v: fake_runtime(m, 3),
                                offload=False))
    await r0.start()
    gw = Node("gw", net.transport("gw"), role="gateway", directory=Directory(members({"r0": "m", "ghost": "g"})))
    svc = GatewayService(GatewayConfig(http="127.0.0.1:0", deadline=deadline, max_body_bytes=64 * 1024,
                                       max_instances=4,
                                       balancer=BalancerConfig(probe_period=0.05, probe_timeout=0.05,
                                                               try_timeout=0.2)))
    gw.add_service(svc)
    await gw.start()
    try:
        async with aiohttp.ClientSession() as session:
            await scenario(session, svc.url, net)
        assert gw.state is State.READY  # whatever came in, the gateway is still up
    finally:
        await gw.stop(0)
        await r0.stop(0)


def test_predict_returns_kserve_v1_predictions_with_the_version():
    async def scenario(s, url, net):
        async with s.post(f"{url}/v1/models/m:predict", data=body(2)) as r:
            assert r.status == 200 and r.headers["X-Model-Version"] == "3"
            doc = await r.json()
        assert doc["model"] == "m" and doc["model_version"] == 3
        assert [p["class"] for p in doc["predictions"]] == [3, 3]
        assert doc["predictions"][0]["label"] == "Dress" and len(doc["predictions"][0]["scores"]) == 10
        nested = json.dumps({"instances": [[[0.0] * 28] * 28]}).encode()
        async with s.post(f"{url}/v1/models/m:predict", data=nested) as r:
            assert r.status == 200

    asyncio.run(door(scenario))


def test_model_listing_and_details():
    async def scenario(s, url, net):
        async with s.get(f"{url}/v1/models") as r:
            names = [m["name"] for m in (await r.json())["models"]]
        assert names == ["g", "m"]
        async with s.get(f"{url}/v1/models/m") as r:
            doc = await r.json()
        assert doc["version"] == 3 and doc["ready_replicas"] == ["r0"]
        async with s.get(f"{url}/v1/models/zzz") as r:
            assert r.status == 404 and "served models" in (await r.json())["error"]

    asyncio.run(door(scenario))


def test_bad_input_gets_400_with_the_reason_and_a_body_over_the_limit_413():
    cases = [
        (b"{not json", "not valid JSON"),
        (json.dumps({"instances": [[1, 2, 3]]}).encode(), "length 3"),
        (json.dumps({"instances": [["x"] * 784]}).encode(), "not a number"),
        (json.dumps({"instances": [[0] * 784] * 5}).encode(), "limit is 4"),
        (json.dumps({"nope": 1}).encode(), "missing"),
    ]

    async def scenario(s, url, net):
        for payload, reason in cases:
            async with s.post(f"{url}/v1/models/m:predict", data=payload) as r:
                assert r.status == 400, (payload[:40], r.status)
                assert reason in (await r.json())["error"]
        async with s.post(f"{url}/v1/models/m:predict", data=body(1), headers={"X-Deadline-Ms": "soon"}) as r:
            assert r.status == 400
        async with s.post(f"{url}/v1/models/m:predict", data=b" " * (64 * 1024 + 10)) as r:
            assert r.status == 413 and "limit of 65536 bytes" in (await r.json())["error"]
        async with s.post(f"{url}/v1/models/m:predict", data=body(1)) as r:
            assert r.status == 200  # and the door still serves

    asyncio.run(door(scenario))


def test_unknown_model_is_404_and_no_ready_replica_is_503_with_retry_after():
    async def scenario(s, url, net):
        async with s.post(f"{url}/v1/models/zzz:predict", data=body(1)) as r:
            assert r.status == 404 and "served models: g, m" in (await r.json())["error"]
        async with s.post(f"{url}/v1/models/g:predict", data=body(1)) as r:
            assert r.status == 503 and int(r.headers["Retry-After"]) >= 1
            assert "ghost not ready" in (await r.json())["error"]

    asyncio.run(door(scenario))


def test_a_passed_deadline_is_504():
    async def scenario(s, url, net):
        net.partition({"gw"}, {"r0"})  # r0 looks ready until the next probe; tries time out
        async with s.post(f"{url}/v1/models/m:predict", data=body(1), headers={"X-Deadline-Ms": "150"}) as r:
            assert r.status == 504, await r.text()
        net.heal()

    asyncio.run(door(scenario))


def test_a_replica_answer_without_a_json_body_or_with_a_malformed_version_is_answered_502():
    from dmlsys.serving.gateway import _ok

    assert (_ok({"version": 3, "body": b"{}"}).status, _ok({"version": 3, "body": b"{}"}).headers) == (
        200, b"X-Model-Version: 3\r\n")
    for reply in ({"version": "1\r\nX-Injected: yes", "body": b"{}"}, {"version": [1], "body": b"{}"},
                  {"version": 1, "body": "text"}, {"version": 1}):
        answer = _ok(reply)
        assert answer.status == 502 and answer.headers is None, reply  # nothing of it in a header line
