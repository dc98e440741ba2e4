"""The shard's optimizer step and log append run off its event loop: while a slow update is
being computed, the shard answers other workers' pulls and the node answers pings; the update
is acknowledged only once it is in, and a pull of the pusher's next step sees it.

Real time (a plain asyncio loop over the simulated network): a VirtualTimeLoop runs offloaded
work inline (``dmlsys.wire.sim.to_thread``), which is what the simulation tests rely on."""

from __future__ import annotations

import asyncio
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from dmlsys.node import Node
from dmlsys.ps.client import PsClient
from dmlsys.ps.clock import ASP
from dmlsys.ps.server import PsConfig, PsService, ShardJob
from dmlsys.wire.sim import SimNetwork

SLOW = 0.6  # seconds one update takes in this test


def test_a_slow_update_does_not_block_pulls_or_pings(monkeypatch):
    computing = threading.Event()
    on_loop: list[bool] = []
    real_compute = ShardJob.compute

    def slow_compute(self, update):
        on_loop.append(threading.current_thread() is threading.main_thread())
        computing.set()
        time.sleep(SLOW)
        return real_compute(self, update)

    monkeypatch.setattr(ShardJob, "compute", slow_compute)

    async def main():
        with tempfile.TemporaryDirectory(prefix="dmlsys-ps-") as tmp:
            net = SimNetwork(0)
            shard = Node("ps0", net.transport("ps0"), admin=None)
            shard.add_service(PsService(PsConfig(str(Path(tmp) / "ps0"), fsync=False)))
            workers = [Node(f"w{i}", net.transport(f"w{i}"), admin=None) for i in range(2)]
            for n in [shard, *workers]:
                await n.start()
            try:
                params = {"w": np.zeros((64, 8), np.float32)}
                clients = [PsClient(n, ["ps0"], job="offload", call_timeout=10.0, deadline=20.0) for n in workers]
                await asyncio.gather(*(c.open(params, workers=["w0", "w1"], consistency=ASP,
                                              optimizer={"hyperparams": {"optimizer": "sgd", "lr": 1.0}})
                                       for c in clients))
                await clients[0].pull(0)
                started = time.monotonic()
                push = asyncio.ensure_future(clients[0].push(0, {"w": np.ones((64, 8), np.float32)}, n=1))
                while not computing.is_set():
                    await asyncio.sleep(0.005)
                pulled = await clients[1].pull(0)  # ASP: nothing to wait for but the shard's loop
                pinged = await workers[1].call("ps0", "node", "ping", {}, timeout=5.0)
                answered = time.monotonic() - started
                assert not push.done()
                await push
                acked = time.monotonic() - started
                after = await clients[0].pull(1)  # read-my-writes: the update is in
                return answered, acked, pulled.values["w"], after.values["w"], pinged
            finally:
                for n in [*workers, shard]:
                    await n.stop(drain_timeout=0.1)

    answered, acked, before, after, pinged = asyncio.run(main())
    assert on_loop == [False]  # the one update ran on a worker thread
    assert answered < SLOW / 2 < SLOW <= acked, (answered, acked)
    np.testing.assert_array_equal(before, 0.0)  # a read during the update sees none of it
    np.testing.assert_array_equal(after, -1.0)  # sgd lr 1, gradient sum 1 over n = 1
    assert pinged is not None
