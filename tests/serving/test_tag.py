"""POST /v1/models/NAME:tag at the front door: to the sharding router when the gateway has one,
else 413 over the replicas' input cap, naming it (issue 10). On the simulated network."""

from __future__ import annotations

import numpy as np
import orjson

from dmlsys.assembly import SimTransports, System
from dmlsys.node import Service, rpc
from dmlsys.serving.http import Request
from dmlsys.sharding.png import encode as encode_png
from dmlsys.wire import sim
from dmlsys.wire.sim import SimNetwork


class FakeRouter(Service):
    """Answers ``router.http`` as the router's door would, recording what it was handed."""

    name = "router"

    def __init__(self) -> None:
        self.seen: list[dict] = []

    @rpc
    def http(self, body):
        self.seen.append(body)
        return {"status": 200, "json": {"garments": [], "bytes": int(body["body"].nbytes)}}


def tag(config: dict, body: bytes, content_type: str = "image/png"):
    async def main():
        system = System(SimTransports(SimNetwork(1)))
        router = FakeRouter()
        system.add("router", services=[router])
        gateway = system.add("gateway", "gateway", config={"http": "off", **config})
        async with system:
            reply = await gateway.service("serving")._route(
                Request("POST", "/v1/models/canvas:tag", {"content-type": content_type}, body))
        return reply, router.seen

    return sim.run(main())


def png(side: int) -> bytes:
    return encode_png(np.zeros((side, side), np.uint8))


def test_a_canvas_over_the_cap_without_a_router_is_413_naming_the_cap():
    reply, _ = tag({"replica_max_input_bytes": 1000}, png(100))  # 10,000 pixels > 1,000 bytes
    assert reply.status == 413
    assert "replica_max_input_bytes = 1000" in orjson.loads(reply.body)["error"]


def test_with_a_router_every_canvas_goes_to_it_whole_as_an_array_frame():
    body = png(300)
    reply, seen = tag({"router": "router", "replica_max_input_bytes": 1000}, body)
    assert reply.status == 200 and orjson.loads(reply.body)["bytes"] == len(body)
    [handed] = seen
    assert handed["verb"] == "tag" and handed["model"] == "canvas" and handed["content_type"] == "image/png"
    assert handed["body"].tobytes() == body


def predicts(tiers, keyfile, requests):
    """Each (authorization, client address) as a predict through a door-less gateway's route."""
    async def main():
        system = System(SimTransports(SimNetwork(2)))
        gateway = system.add("gateway", "gateway", config={"http": "off", "tiers": tiers, "api_keys": keyfile})
        out = []
        async with system:
            route = gateway.service("serving")._route
            for auth, client in requests:
                headers = {"x-deadline-ms": "200", **({"authorization": auth} if auth else {})}
                answer = route(Request("POST", "/v1/models/m:predict", headers, b'{"instances": [[0]]}', client))
                out.append(answer if hasattr(answer, "status") else await answer)
        return out

    return sim.run(main())


def test_the_event_gate_stands_in_front_of_predicts(tmp_path):
    from dmlsys.events.keys import KeyFile

    keyfile = str(tmp_path / "api-keys.json")
    key = KeyFile(keyfile).add("alice", "authenticated")
    anon, again, other, alice, forged = predicts("default", keyfile, [
        (None, "10.1.1.1"), (None, "10.1.1.1"), (None, "10.9.9.9"), (f"Bearer {key}", "10.1.1.1"),
        ("Bearer not-a-key", "10.1.1.1")])
    # Admitted ones reach the balancer (no model "m" is served here: 404 from serving, not the gate).
    assert anon.status == 404 and other.status == 404 and alice.status == 404
    assert again.status == 429 and int(again.headers["Retry-After"]) > 3000  # anonymous: 1 an hour, per address
    assert forged.status == 401
