"""Functions over a shared pool on the simulated network: instances killed at random moments lose
no accepted event; the pool is never exceeded; idle functions scale to zero. Virtual time."""

import asyncio
import random

from dmlsys.events.autoscaler import Autoscaler, FunctionSpec, ScalingConfig
from dmlsys.events.functions import FunctionPool, FunctionUnavailable
from dmlsys.events.pool import Pool
from dmlsys.node import Node, Service, rpc
from dmlsys.wire import sim
from dmlsys.wire.sim import SimNetwork

COLD_START = 0.5
WORK = 0.05


class Doubler(Service):
    name = "function"

    @rpc
    async def invoke(self, body):
        await asyncio.sleep(WORK)
        return {"y": body["x"] * 2, "by": self.node.name}


class SimLauncher:
    """Instances are in-process nodes on the simulated network; counts what is really alive."""

    def __init__(self, net: SimNetwork, gateway: Node, slots: int):
        self.net, self.gateway, self.slots = net, gateway, slots
        self.nodes: dict[str, Node] = {}
        self.peak = 0
        self.pool: FunctionPool | None = None

    async def start(self, function: str, instance: str) -> str:
        self.nodes[instance] = None  # holds its slot from now on, like a process being spawned
        self.peak = max(self.peak, len(self.nodes))
        await asyncio.sleep(COLD_START)
        if instance not in self.nodes:
            raise RuntimeError(f"{instance} was stopped while starting")
        node = Node(instance, self.net.transport(instance))
        node.add_service(Doubler())
        await node.start()
        self.nodes[instance] = node
        # the supervisor's word when a process exits: calls waiting on it fail over at once
        self.net.on_crash(instance, lambda: (self.gateway.peer_lost(instance, "crashed"),
                                             self.pool.instance_died(instance)))
        return instance

    async def stop(self, instance: str) -> None:
        node = self.nodes.pop(instance, None)
        if node is not None:
            await node.stop(0)

    def kill(self, instance: str) -> None:
        node = self.nodes.pop(instance, None)
        if node is not None:
            node.kill()
            self.net.crash(instance)


async def cluster(slots=4, seed=0):
    net = SimNetwork(seed)
    gw = Node("gw", net.transport("gw"))
    await gw.start()
    specs = [FunctionSpec("classify", target=2.0, min=0, max=4, priority=10),
             FunctionSpec("regress", target=2.0, min=0, max=4, priority=0)]
    launcher = SimLauncher(net, gw, slots)
    fp = FunctionPool(gw, Pool(slots, specs), Autoscaler(slots, specs, ScalingConfig()), launcher,
                      tick=1.0, try_timeout=2.0)
    launcher.pool = fp
    await fp.start()
    return net, gw, launcher, fp


def test_instances_killed_at_random_moments_lose_no_accepted_event():
    async def main():
        net, gw, launcher, fp = await cluster(seed=3)
        loop, rng = asyncio.get_running_loop(), random.Random(3)
        results, errors = {}, []

        async def event(i):
            await asyncio.sleep(i * 0.02)
            f = "classify" if i % 2 else "regress"
            try:
                results[i] = await fp.invoke(f, {"x": i}, deadline=loop.time() + 20.0)
            except FunctionUnavailable as e:
                errors.append(e)

        async def chaos():
            for _ in range(8):
                await asyncio.sleep(rng.uniform(0.5, 2.0))
                alive = [i for i, n in launcher.nodes.items() if n is not None]
                if alive:
                    launcher.kill(rng.choice(alive))

        await asyncio.gather(*(event(i) for i in range(600)), chaos())
        stats = fp.statistics()
        await fp.stop()
        await gw.stop(0)
        return results, errors, launcher, stats

    results, errors, launcher, stats = sim.run(main())
    assert not errors and len(results) == 600
    assert all(r["y"] == 2 * i for i, r in results.items())
    assert stats["retries"] > 0  # the kills did hit events in flight, and they were retried
    assert launcher.peak <= 4  # never more instances alive or starting than the pool has slots


def test_idle_functions_scale_to_zero_after_the_stable_window_and_come_back_on_the_next_event():
    async def main():
        net, gw, launcher, fp = await cluster()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        first = await fp.invoke("classify", {"x": 1}, deadline=t0 + 10)
        cold = loop.time() - t0
        busy = fp.statistics()["instances"]["classify"]["ready"]
        await asyncio.sleep(62.0)  # one stable window (60 s) and a tick without events
        idle = fp.statistics()
        t1 = loop.time()
        again = await fp.invoke("classify", {"x": 2}, deadline=t1 + 10)
        cold_again = loop.time() - t1
        await fp.stop()
        await gw.stop(0)
        return first, cold, busy, idle, again, cold_again, launcher

    first, cold, busy, idle, again, cold_again, launcher = sim.run(main())
    assert first["y"] == 2 and again["y"] == 4 and busy >= 1
    assert cold < COLD_START + WORK + 0.1 and cold_again < COLD_START + WORK + 0.1  # scale from zero at once
    assert idle["slots_used"] == 0 and not any(n for n in launcher.nodes.values())
