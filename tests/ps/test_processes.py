"""Real processes over ZeroMQ: a shard SIGKILLed in the middle of a job and started again on
its state directory loses no acknowledged update, and applies none twice."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dmlsys.node import Node
from dmlsys.ps.client import PsClient
from dmlsys.ps.clock import BSP
from dmlsys.wire.zmq_transport import ZmqTransport

SCRIPT = Path(__file__).with_name("shard_proc.py")
pytestmark = pytest.mark.slow


class Shard:
    """A shard process; ``kill`` is SIGKILL, ``start`` brings it back on the same state."""

    def __init__(self, name: str, state: Path) -> None:
        self.name, self.state = name, state
        self.proc: subprocess.Popen | None = None
        self.address = ""

    def start(self) -> str:
        self.proc = subprocess.Popen([sys.executable, str(SCRIPT), "--name", self.name, "--state", str(self.state),
                                      "--checkpoint-every", "4"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"shard {self.name} exited ({self.proc.wait()}) without a word")
        self.address = json.loads(line)["zmq"]
        return self.address

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.close()

    def close(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.stdin.close()  # drain and exit
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
            self.proc.wait()
            for f in (self.proc.stdin, self.proc.stdout):
                if not f.closed:
                    f.close()
            self.proc = None


def test_a_sigkilled_shard_restarted_on_its_state_loses_no_acknowledged_update(tmp_path):
    steps, workers = 12, 2
    shards = [Shard(f"ps{i}", tmp_path / f"ps{i}") for i in range(2)]
    acked: list[tuple[int, int]] = []

    async def main():
        nodes = [Node(f"w{r}", ZmqTransport(f"w{r}", "tcp://127.0.0.1:0"), admin=None) for r in range(workers)]
        try:
            for node in nodes:
                await node.start()
                for s in shards:
                    node.transport.add_peer(s.name, s.address)
            clients = [PsClient(n, [s.name for s in shards], job="killed", call_timeout=1.0, deadline=60.0)
                       for n in nodes]
            params = {"seen": np.zeros((steps, workers), np.float32)}
            await asyncio.gather(*(c.open(params, workers=[n.name for n in nodes], consistency=BSP,
                                          optimizer={"hyperparams": {"optimizer": "sgd", "lr": 1.0}})
                                   for c in clients))

            async def work(r):
                for t in range(steps):
                    await clients[r].pull(t)
                    g = np.zeros((steps, workers), np.float32)
                    g[t, r] = -float(workers)  # BSP divides a step's sum by its samples: 1 per worker
                    await clients[r].push(t, {"seen": g}, n=1)
                    acked.append((t, r))
                    await asyncio.sleep(0.02)

            async def killer():
                while len(acked) < 9:
                    await asyncio.sleep(0.01)
                shards[0].kill()  # mid-job, pushes in flight
                await asyncio.sleep(0.3)
                address = await asyncio.to_thread(shards[0].start)
                for node in nodes:
                    node.transport.add_peer(shards[0].name, address)

            await asyncio.gather(*(work(r) for r in range(workers)), killer())
            final = (await clients[0].pull(steps, floor=steps)).values["seen"]
            infos = [await clients[0].info(i) for i in range(len(shards))]
            return final, infos
        finally:
            for node in nodes:
                await node.stop(drain_timeout=0.5)

    try:
        for s in shards:
            s.start()
        final, infos = asyncio.run(main())
    finally:
        for s in shards:
            s.close()
    assert len(acked) == steps * workers
    for t, r in acked:
        assert final[t, r] == 1, f"acknowledged update (step {t}, worker {r}) is missing"
    assert final.max() == 1
    assert all(i["applied_pushes"] == steps * workers for i in infos), infos
