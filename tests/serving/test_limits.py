"""Limits: whatever the front door accepts gets an answer, and over a limit the answer is an
error naming it, at once; nothing over a limit counts against a healthy replica.

Each test pins one hole found in issue 13 (the header that vanished, the unbounded replica
queue, the batch that one bad field failed, the slow client, the connection flood).
"""

import asyncio
import json
import time

import aiohttp
import numpy as np

from dmlsys.node import Directory, Node, State
from dmlsys.serving import messages
from dmlsys.serving.balancer import BalancerConfig
from dmlsys.serving.errors import QueueFull
from dmlsys.serving.gateway import GatewayConfig, GatewayService
from dmlsys.serving.replica import ModelService, ReplicaConfig
from dmlsys.wire import sim
from dmlsys.wire.sim import SimNetwork
from tests.serving.helpers import body, fake_runtime, members
from tests.serving.test_sim import Cluster

MiB = 1 << 20


async def door(scenario, replica_config=None, **config):
    """A gateway on a real port in front of one replica r0 (model m) on the simulated network."""
    net = SimNetwork(0)
    r0 = Node("r0", net.transport("r0"), role="replica")
    r0.add_service(ModelService(ReplicaConfig("m", "unused", **(replica_config or {})),
                                loader=lambda s, m, v: fake_runtime(m, 3), offload=False))
    await r0.start()
    gw = Node("gw", net.transport("gw"), role="gateway", directory=Directory(members({"r0": "m"})))
    svc = GatewayService(GatewayConfig(http="127.0.0.1:0", balancer=BalancerConfig(probe_period=0.05), **config))
    gw.add_service(svc)
    await gw.start()
    try:
        async with aiohttp.ClientSession() as session:
            await scenario(session, svc, r0)
        assert gw.state is State.READY
    finally:
        await gw.stop(0)
        await r0.stop(0)


def padded(size: int) -> bytes:
    """A valid one-instance request, padded with whitespace (valid JSON) to ``size`` bytes."""
    raw = body(1)
    return raw[:-1] + b" " * (size - len(raw)) + raw[-1:]


def test_a_body_over_the_wire_header_limit_but_under_the_door_limit_is_answered_at_once():
    """1.5 MB of valid JSON: the door accepts it, so a replica must answer it (it used to travel in
    a message header over the receivers' 1 MiB limit, vanish, and end in a 504 after 10 s)."""

    async def scenario(s, svc, r0):
        payload = padded(3 * MiB // 2)
        for _ in range(4):  # more than the 3 failures that would eject the only replica
            started = time.monotonic()
            async with s.post(f"{svc.url}/v1/models/m:predict", data=payload) as r:
                assert r.status == 200, await r.text()
                assert (await r.json())["predictions"][0]["class"] == 3
            assert time.monotonic() - started < 2.0
        replica = svc.balancer.pools["m"].replicas["r0"]
        assert replica.failures == 0 and replica.ejections == 0 and replica.in_flight == 0

    asyncio.run(door(scenario))


def test_a_body_over_the_door_limit_gets_413_naming_the_limit_and_never_reaches_a_replica():
    async def scenario(s, svc, r0):
        for payload in (padded(5 * MiB), b"{" + b" " * (4 * MiB)):
            async with s.post(f"{svc.url}/v1/models/m:predict", data=payload) as r:
                assert r.status == 413
                assert str(4 * MiB) in (await r.json())["error"]
        assert r0.service("model").requests == 0
        async with s.post(f"{svc.url}/v1/models/m:predict", data=body(1)) as r:
            assert r.status == 200

    asyncio.run(door(scenario))


def test_a_request_of_many_instances_and_its_large_answer_both_travel_as_frames():
    async def scenario(s, svc, r0):
        payload = body(300)
        assert len(payload) > messages.INLINE_MAX
        async with s.post(f"{svc.url}/v1/models/m:predict", data=payload) as r:
            assert r.status == 200, await r.text()
            raw = await r.read()
        assert len(raw) > messages.INLINE_MAX and len(json.loads(raw)["predictions"]) == 300

    asyncio.run(door(scenario, replica_config={"max_instances": 300}, max_instances=300))


def test_a_full_coalesced_message_of_the_largest_inline_bodies_fits_the_wire():
    """Requests for one replica in one turn: split into messages of at most MAX_ITEMS, each
    under the header limit even when every body is as large as may travel inline."""

    async def scenario():
        c = Cluster(11, n=1, config=BalancerConfig(max_in_flight=1000, try_timeout=1.0))
        await c.start()
        loop = asyncio.get_running_loop()
        big = padded(messages.INLINE_MAX)
        assert messages.carry(big) is big  # inline, the largest that is
        n = 3 * messages.MAX_ITEMS + 1
        replies = await asyncio.gather(*(c.balancer.predict("m", {"json": big, "max_instances": 4},
                                                            deadline=loop.time() + 5) for _ in range(n)))
        assert len(replies) == n and c.balancer.retries == 0
        await c.stop()

    sim.run(scenario())


def test_a_full_replica_queue_is_retried_elsewhere_and_never_counts_against_the_replica():
    async def scenario():
        c = Cluster(12, n=2, config=BalancerConfig(max_in_flight=1000, try_timeout=1.0), max_queue=4)
        await c.start()
        loop = asyncio.get_running_loop()
        results = await asyncio.gather(*(c.balancer.predict("m", {"json": body(1), "max_instances": 4},
                                                            deadline=loop.time() + 5) for _ in range(40)),
                                       return_exceptions=True)
        refused = [r for r in results if not isinstance(r, dict)]
        assert all(isinstance(e, QueueFull) and e.status == 503 for e in refused), refused[:3]
        assert 8 <= len(results) - len(refused) < 40  # each replica took its 4 (and more once drained)
        for r in c.balancer.pools["m"].replicas.values():
            assert r.failures == 0 and not r.ejected(loop.time()) and r.in_flight == 0
        await c.stop()

    sim.run(scenario())


async def replica(max_queue: int = 1024):
    net = SimNetwork(1)
    r0 = Node("r0", net.transport("r0"), role="replica")
    r0.add_service(ModelService(ReplicaConfig("m", "unused", max_queue=max_queue),
                                loader=lambda s, m, v: fake_runtime(m, 3), offload=False))
    client = Node("c", net.transport("c"))
    await r0.start()
    await client.start()
    await asyncio.sleep(0.01)  # the fake load
    return r0, client


def test_one_bad_field_in_a_coalesced_message_fails_only_its_own_request():
    async def scenario():
        r0, c = await replica()
        good = {"json": body(1), "max_instances": 4}
        items = [good, {"json": body(1), "max_instances": "four"}, {"x": np.float32(1.0)},
                 {"x": np.zeros((2, 784), np.int32)}, {"json": body(1), "max_instances": 0}, good,
                 {"x": np.zeros((1, 784), np.float32)}]
        reply = await c.call("r0", "model", "predict_many", {"items": items}, timeout=5)
        errors = [res.get("error") for res in reply["results"]]
        assert errors == [None, "BadInput", "BadInput", "BadInput", "BadInput", None, None], reply
        assert "max_instances" in reply["results"][1]["message"]
        await c.stop(0)
        await r0.stop(0)

    sim.run(scenario())


def test_the_replica_queue_is_bounded_and_says_so():
    async def scenario():
        r0, c = await replica(max_queue=3)
        items = [{"json": body(1), "max_instances": 4}] * 5
        reply = await c.call("r0", "model", "predict_many", {"items": items}, timeout=5)
        errors = [res.get("error") for res in reply["results"]]
        assert errors == [None, None, None, "QueueFull", "QueueFull"]
        assert "max_queue=3" in reply["results"][3]["message"]
        assert r0.service("model").status()["refused"] == 2
        reply = await c.call("r0", "model", "predict_many", {"items": items[:3]}, timeout=5)
        assert all("error" not in res for res in reply["results"])  # drained: room again
        await c.stop(0)
        await r0.stop(0)

    sim.run(scenario())


def test_a_client_that_sends_its_body_too_slowly_gets_408_and_the_slot_back():
    async def scenario(s, svc, r0):
        host, port = svc.url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"POST /v1/models/m:predict HTTP/1.1\r\nHost: x\r\nContent-Length: 10000\r\n\r\n{\"inst")
        await writer.drain()
        started = time.monotonic()
        head = await asyncio.wait_for(reader.read(200), 5)
        assert head.startswith(b"HTTP/1.1 408"), head
        assert 0.2 <= time.monotonic() - started < 2.0
        writer.close()
        async with s.post(f"{svc.url}/v1/models/m:predict", data=body(1)) as r:
            assert r.status == 200

    asyncio.run(door(scenario, read_timeout=0.3))


def test_connections_over_the_cap_get_503_naming_the_limit_and_idle_ones_are_closed():
    async def scenario(s, svc, r0):
        host, port = svc.url.removeprefix("http://").split(":")
        slow = []
        for _ in range(2):  # two clients that start a request and never finish its headers
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(b"POST /v1/models/m:predict HTTP/1.1\r\nHost: x\r\n")
            slow.append((reader, writer))
        await asyncio.sleep(0.05)
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(1000), 5)
        assert answer.startswith(b"HTTP/1.1 503") and b"max_connections=2" in answer, answer
        writer.close()
        assert svc.status()["connections_refused"] == 1
        for reader, _ in slow:  # the idle timeout closes them
            assert await asyncio.wait_for(reader.read(1000), 5) == b""
        for _, w in slow:
            w.close()
        async with aiohttp.ClientSession() as fresh:
            async with fresh.post(f"{svc.url}/v1/models/m:predict", data=body(1)) as r:
                assert r.status == 200

    asyncio.run(door(scenario, max_connections=2, idle_timeout=0.5))
