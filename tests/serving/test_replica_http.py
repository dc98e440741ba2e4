"""A replica's own HTTP endpoint (role config ``http``): the same request path as the gateway's
messages, so that another balancer can front the very same replicas."""

import asyncio

import aiohttp

from dmlsys.node import Node
from dmlsys.serving import messages
from dmlsys.serving.replica import ModelService, ReplicaConfig
from dmlsys.wire.sim import SimNetwork
from tests.serving.helpers import body, fake_runtime


async def until(condition, timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met in time")


async def replica(scenario, **config):
    net = SimNetwork(0)
    r0 = Node("r0", net.transport("r0"), role="replica")
    svc = ModelService(ReplicaConfig("m", "unused", http="127.0.0.1:0", **config),
                       loader=lambda s, m, v: fake_runtime(m, 3), offload=False)
    r0.add_service(svc)
    client = Node("c", net.transport("c"))
    await r0.start()
    await client.start()
    await until(lambda: svc.url is not None)  # loaded, then listening
    try:
        async with aiohttp.ClientSession() as session:
            await scenario(session, svc, client)
    finally:
        await client.stop(0)
        await r0.stop(0)
    assert svc._http is None  # stopped with the service


def test_http_answers_what_the_gateway_s_messages_get_byte_for_byte():
    async def scenario(s, svc, client):
        payload = body(2)
        async with s.post(f"{svc.url}/v1/models/m:predict", data=payload) as r:
            assert r.status == 200 and r.headers["X-Model-Version"] == "3"
            over_http = await r.read()
        reply = await client.call("r0", "model", "predict", {"json": payload, "max_instances": 64}, timeout=5)
        assert messages.received(reply["body"]) == over_http
        assert svc.status()["requests"] == 2 and svc.status()["http"] == svc.url

    asyncio.run(replica(scenario))


def test_http_errors_name_the_model_the_input_and_the_queue():
    async def scenario(s, svc, client):
        async with s.post(f"{svc.url}/v1/models/other:predict", data=body(1)) as r:
            assert r.status == 404 and "serves 'm'" in (await r.json())["error"]
        async with s.post(f"{svc.url}/v1/models/m:predict", data=b'{"instances": [[true]]}') as r:
            assert r.status == 400 and "instance 0" in (await r.json())["error"]
        async with s.post(f"{svc.url}/v1/models/m:predict", data=body(3)) as r:
            assert r.status == 400 and "limit is 2" in (await r.json())["error"]
        async with s.get(f"{svc.url}/v1/models/m") as r:
            assert r.status == 200 and (await r.json())["version"] == 3
        svc.phase = "reloading"  # what readiness says while a reload is under way
        async with s.get(f"{svc.url}/v1/models/m") as r:
            assert r.status == 503

    asyncio.run(replica(scenario, max_instances=2))


def test_http_listens_only_once_the_model_is_loaded_and_a_taken_port_closes_the_gate():
    async def scenario():
        net = SimNetwork(0)
        loaded = asyncio.Event()

        async def slow_load(store, model, version):
            await loaded.wait()
            return fake_runtime(model, 3)

        taken = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = taken.sockets[0].getsockname()[1]
        nodes = []
        for name, address in (("r0", "127.0.0.1:0"), ("r1", f"127.0.0.1:{port}")):
            node = Node(name, net.transport(name), role="replica")
            svc = ModelService(ReplicaConfig("m", "unused", http=address), loader=None, offload=False)
            svc._load = lambda version: slow_load(None, "m", version)
            node.add_service(svc)
            await node.start()
            nodes.append((node, svc))
        await asyncio.sleep(0.01)
        assert all(svc.url is None for _, svc in nodes)  # loading: not listening
        loaded.set()
        (r0, ok), (r1, bad) = nodes
        await until(lambda: ok.phase != "loading" and bad.phase != "loading")
        assert ok.url is not None and ok.phase == "ready"
        assert bad.url is None and bad.phase == "failed" and str(port) in bad.last_error
        assert str(port) in r1.status()["failing_gates"]["model"]
        taken.close()
        for node, _ in nodes:
            await node.stop(0)

    asyncio.run(scenario())


def test_http_requests_share_the_replica_queue_and_its_bound():
    async def scenario(s, svc, client):
        async def one():
            async with s.post(f"{svc.url}/v1/models/m:predict", data=body(1)) as r:
                return r.status, r.headers.get("Retry-After")

        results = await asyncio.gather(*(one() for _ in range(12)))
        assert {st for st, _ in results} == {200, 503}  # 12 at once: a few wait, the rest are refused
        assert all(ra == "1" for st, ra in results if st == 503)
        assert svc.status()["refused"] == sum(st == 503 for st, _ in results)

    asyncio.run(replica(scenario, max_queue=2))
