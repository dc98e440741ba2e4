"""Lifecycle (starting -> alive -> ready -> draining -> stopped), readiness gates, the built-in
"node" service, and the admin HTTP endpoints."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from prometheus_client import generate_latest

from dmlsys.node import Node, RemoteError, Service, State

from tests.node.helpers import Echo, Net


class Loader(Service):
    """A service that is not ready until its model is 'loaded'."""

    name = "loader"

    async def start(self, node):
        await super().start(node)
        self.model = node.gate("model", "model m3 not loaded yet")
        self.peers = node.gate("peers", "waiting for 2 peers")

    def status(self):
        return {"loaded": self.model.is_open}


def test_states_follow_the_gates(net):
    async def main():
        node = Node("a", net.transport("a"))
        loader = node.add_service(Loader())
        assert node.state is State.STARTING
        await node.start()
        net.nodes.append(node)
        assert node.state is State.ALIVE
        assert node.failing_gates == {"model": "model m3 not loaded yet", "peers": "waiting for 2 peers"}
        loader.model.open()
        assert node.state is State.ALIVE and list(node.failing_gates) == ["peers"]
        loader.peers.open()
        assert node.state is State.READY and node.failing_gates == {}
        loader.peers.close("lost peer w2")
        assert node.state is State.ALIVE and node.failing_gates == {"peers": "lost peer w2"}
        loader.peers.open()
        await node.drain()
        assert node.state is State.DRAINING
        loader.model.close("reloading")  # gates no longer move a draining node
        assert node.state is State.DRAINING
        await node.stop()
        assert node.state is State.STOPPED

    net.run(main)


def test_gates_are_named_once_and_closed_with_a_reason(net):
    async def main():
        node = await net.node("a")
        gate = node.gate("g", "starting")
        with pytest.raises(ValueError, match="already has a gate named 'g'"):
            node.gate("g")
        with pytest.raises(ValueError, match="needs a reason"):
            gate.close("")
        with pytest.raises(RuntimeError, match="before start"):
            node.add_service(Echo())

    net.run(main)


def test_drain_lets_in_flight_handlers_finish_and_their_replies_arrive(net):
    async def main():
        b = await net.node("b", Echo())
        a = await net.node("a")
        calls = [asyncio.ensure_future(a.call("b", "echo", "slow", {"s": 0.2, "tag": f"t{i}"}, timeout=5))
                 for i in range(3)]
        while len(b.service("echo").started) < 3:
            await asyncio.sleep(0.01)
        await b.drain(timeout=5)
        assert b.state is State.DRAINING and b.status()["in_flight"] == 0
        assert sorted(b.service("echo").finished) == ["t0", "t1", "t2"]
        assert await asyncio.gather(*calls) == ["t0", "t1", "t2"]
        await b.stop()
        assert b.state is State.STOPPED

    net.run(main)


def test_the_node_service_answers_probes(net):
    async def main():
        b = Node("b", net.transport("b"), role="replica")
        b.add_service(Loader())
        await b.start()
        net.nodes.append(b)
        a = await net.node("a")
        if net.sim is None:
            a.transport.add_peer("b", b.transport.address)
        status = await a.call("b", "node", "status", timeout=5)
        assert (status["name"], status["role"], status["state"]) == ("b", "replica", "alive")
        assert status["failing_gates"] == {"model": "model m3 not loaded yet", "peers": "waiting for 2 peers"}
        assert status["services"]["loader"] == {"loaded": False}
        assert await a.call("b", "node", "ping", timeout=5) == {"state": "alive", "failing_gates": status["failing_gates"]}

    net.run(main)


def test_admin_endpoints_report_liveness_readiness_metrics_and_status():
    net = Net("zmq")

    async def main():
        b = await net.node("b", Echo(), admin=True)
        a = await net.node("a")
        gate = b.gate("model", "model m3 not loaded yet")
        b.metrics.gauge("queue_depth", "Requests waiting", lambda: 7)
        async with aiohttp.ClientSession() as http:
            async def get(path):
                async with http.get(b.admin_url + path) as r:
                    return r.status, (await r.json() if r.content_type == "application/json" else await r.text())

            assert await get("/healthz") == (200, {"name": "b", "state": "alive"})
            status, body = await get("/readyz")
            assert status == 503 and body["failing_gates"] == {"model": "model m3 not loaded yet"}
            gate.open()
            assert (await get("/readyz"))[0] == 200

            await a.call("b", "echo", "echo", 1, timeout=5)
            with pytest.raises(RemoteError):
                await a.call("b", "echo", "fail", 1, timeout=5)
            status, text = await get("/metrics")
            assert status == 200
            for line in ('dmlsys_messages_in_total{node="b"} 2.0', 'dmlsys_messages_out_total{node="b"} 2.0',
                         'dmlsys_errors_total{kind="handler",node="b"} 1.0', 'dmlsys_queue_depth{node="b"} 7.0'):
                assert line in text, f"{line!r} missing from /metrics:\n{text}"
            assert 'dmlsys_bytes_in_total{node="b"}' in text and 'dmlsys_bytes_out_total{node="b"}' in text
            a_text = generate_latest(a.metrics.registry).decode()  # the caller keeps the latency histogram
            assert 'dmlsys_rpc_seconds_bucket{le="+Inf",method="echo.echo",node="a"} 1.0' in a_text
            assert 'dmlsys_rpc_seconds_count{method="echo.fail",node="a"} 1.0' in a_text

            status, body = await get("/status")
            assert status == 200 and body["name"] == "b" and body["state"] == "ready"
            assert body["metrics"]["messages_in"] == 2 and body["zmq"] == b.transport.address

            await b.drain()
            status, body = await get("/readyz")
            assert status == 503 and body["state"] == "draining"
            assert (await get("/healthz"))[0] == 200, "a draining node is still alive"

    net.run(main)


def test_an_admin_port_in_use_names_the_node_and_leaves_nothing_running():
    async def main():
        first = Node("a", Net("zmq").transport("a"), admin=("127.0.0.1", 0))
        await first.start()
        port = int(first.admin_url.rsplit(":", 1)[1])
        second = Node("b", Net("zmq").transport("b"), admin=("127.0.0.1", port))
        try:
            with pytest.raises(OSError, match=f"the admin HTTP of node 'b' cannot listen on 127.0.0.1:{port}"):
                await second.start()
            assert second.state is State.STOPPED
        finally:
            await first.stop()

    asyncio.run(main())
