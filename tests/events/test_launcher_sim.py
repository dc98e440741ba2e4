"""SupervisorLauncher against a stand-in supervisor on the simulated network: a start takes a
warmed spare and tops the spares up, a start with none left waits for a whole process, a dead
instance is written off and replaced, and stopped members are removed. Virtual time."""

from __future__ import annotations

import asyncio

from dmlsys.events.autoscaler import Autoscaler, FunctionSpec, ScalingConfig
from dmlsys.events.functions import FunctionPool
from dmlsys.events.launcher import SupervisorLauncher
from dmlsys.events.pool import Pool
from dmlsys.node import Directory, Member, Node, Service, rpc
from dmlsys.wire import sim
from dmlsys.wire.sim import SimNetwork

PROCESS_START, LOAD = 5.0, 0.3  # a fresh process imports JAX; a spare only loads the model


class FakeFunction(Service):
    name = "function"

    def __init__(self):
        self.model = None

    @rpc
    async def load(self, body):
        await asyncio.sleep(LOAD)
        self.model = body["model"]
        return {"model": self.model, "version": 1, "load_seconds": LOAD}

    @rpc
    async def invoke(self, body):
        await asyncio.sleep(0.01)
        return {"model": self.model, "by": self.node.name}


class FakeCluster(Service):
    """What the launcher needs of the supervisor's ``cluster`` service."""

    name = "cluster"

    def __init__(self, net):
        self.net, self.nodes, self.started, self.stopped = net, {}, 0, []

    @rpc
    async def pool_start(self, body):
        name = next(f"{body['group']}-{i}" for i in range(64) if f"{body['group']}-{i}" not in self.nodes)
        self.nodes[name] = None
        await asyncio.sleep(PROCESS_START)
        node = Node(name, self.net.transport(name))
        node.add_service(FakeFunction())
        await node.start()
        self.nodes[name] = node
        self.started += 1
        return {"name": name, "role": "function", "zmq": node.transport.address}

    @rpc
    async def pool_stop(self, body):
        node = self.nodes.pop(body["name"], None)
        self.stopped.append(body["name"])
        if node is not None:
            await node.stop(0)
        return {"name": body["name"]}


async def setup(spares=1):
    net = SimNetwork(2)
    cluster = FakeCluster(net)
    sup = Node("supervisor", net.transport("supervisor"))
    sup.add_service(cluster)
    events = Node("events", net.transport("events"), directory=Directory([Member("supervisor", "supervisor", "sim://supervisor")]))
    await sup.start()
    await events.start()
    specs = [FunctionSpec("fashion", min=0, max=2)]
    launcher = SupervisorLauncher(events, "function", {"fashion": ("fashion-mlp", None)}, spares=spares)
    fp = FunctionPool(events, Pool(2, specs), Autoscaler(2, specs, ScalingConfig(stable_window=10, panic_window=1)),
                      launcher, tick=0.2)
    launcher.on_died = fp.instance_died
    await fp.start()
    await launcher.start_spares()
    return net, cluster, sup, events, launcher, fp


async def teardown(sup, events, launcher, fp, cluster):
    await fp.stop()
    await launcher.close()
    for node in list(cluster.nodes.values()):
        if node is not None:
            await node.stop(0)
    await events.stop(0)
    await sup.stop(0)


def test_a_start_takes_a_warmed_spare_and_tops_the_spares_up():
    async def main():
        _, cluster, sup, events, launcher, fp = await setup(spares=1)
        loop = asyncio.get_running_loop()
        await asyncio.sleep(PROCESS_START + 1)  # the spare is up before anyone needs it
        assert launcher.idle == ["function-0"]
        t0 = loop.time()
        answer = await fp.invoke("fashion", {"x": 1}, deadline=t0 + 30)
        first = loop.time() - t0
        await asyncio.sleep(PROCESS_START + 1)
        spares_after = list(launcher.idle)
        await teardown(sup, events, launcher, fp, cluster)
        return answer, first, spares_after, cluster.started

    answer, first, spares_after, started = sim.run(main())
    assert answer == {"model": "fashion-mlp", "by": "function-0"}
    assert first < LOAD + 0.5  # the spare's load, not a process start
    assert spares_after == ["function-1"] and started == 2  # topped up in the background


def test_with_no_spare_left_a_start_waits_for_a_whole_process_and_the_event_waits_with_it():
    async def main():
        _, cluster, sup, events, launcher, fp = await setup(spares=0)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        answer = await fp.invoke("fashion", {"x": 1}, deadline=t0 + 30)
        first = loop.time() - t0
        await teardown(sup, events, launcher, fp, cluster)
        return answer, first

    answer, first = sim.run(main())
    assert answer["model"] == "fashion-mlp"
    assert PROCESS_START <= first < PROCESS_START + LOAD + 1.0


def test_a_dead_instance_is_written_off_removed_and_replaced():
    async def main():
        _, cluster, sup, events, launcher, fp = await setup(spares=1)
        loop = asyncio.get_running_loop()
        await asyncio.sleep(PROCESS_START + 1)
        await fp.invoke("fashion", {"x": 1}, deadline=loop.time() + 30)
        instance, dead = next(iter(launcher.members.items()))
        cluster.nodes[dead].kill()
        events.peer_lost(dead, "exited with code -9")  # what the supervisor tells every node
        answer = await fp.invoke("fashion", {"x": 2}, deadline=loop.time() + 30)
        stopped = list(cluster.stopped)
        live, stats = set(launcher.members), fp.statistics()
        await teardown(sup, events, launcher, fp, cluster)
        return instance, dead, answer, stopped, live, stats

    instance, dead, answer, stopped, live, stats = sim.run(main())
    assert answer["model"] == "fashion-mlp"  # served by the replacement (a spare told its model)
    assert instance not in live and len(live) == 1 and stats["instances"]["fashion"]["ready"] == 1
    assert dead in stopped  # removed from the group, not restarted into a modelless process
