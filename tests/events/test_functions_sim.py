"""Functions over a shared pool on the simulated network: instances killed at random moments lose
no accepted event; the pool is never exceeded; idle functions scale to zero; idle instances yield
to a function with waiting events. Virtual time."""

import asyncio
import random

from hypothesis import given, settings, strategies as st

from dmlsys.events.autoscaler import Autoscaler, FunctionSpec, ScalingConfig
from dmlsys.events.functions import FunctionPool, FunctionUnavailable
from dmlsys.events.invariants import watch_starvation
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


TICK = 1.0
# A function without an event for a panic window claims nothing at the next step (within a tick
# more), and its idle instances then yield. Once an instance has been idle that long (2 ticks of
# slack), no function may wait beside it for more than a tick.
IDLE_FOR = ScalingConfig().panic_window + 2 * TICK
STARVE_BOUND = TICK


@st.composite
def pools_and_traffic(draw):
    """A pool of 1-3 slots, 2-3 functions of random priorities, bursts of events, a few kills."""
    n = draw(st.integers(2, 3))
    specs = [FunctionSpec(f"f{i}", target=draw(st.sampled_from([1.0, 2.0])), min=0, max=3,
                          priority=draw(st.integers(0, 2))) for i in range(n)]
    bursts = draw(st.lists(st.tuples(st.integers(0, n - 1), st.floats(0.0, 8.0), st.integers(1, 6),
                                     st.sampled_from([0.0, 0.03, 0.3])), min_size=1, max_size=5))
    return draw(st.integers(0, 2 ** 16)), draw(st.integers(1, 3)), specs, bursts, draw(st.integers(0, 3))


def run_pool(seed, slots, specs, bursts, kills, *, deadline=30.0):
    async def main():
        net = SimNetwork(seed)
        loop, rng = asyncio.get_running_loop(), random.Random(seed)
        gw = Node("gw", net.transport("gw"), admin=None)
        await gw.start()
        launcher = SimLauncher(net, gw, slots)
        fp = FunctionPool(gw, Pool(slots, specs), Autoscaler(slots, specs, ScalingConfig()), launcher,
                          tick=TICK, try_timeout=2.0)
        launcher.pool = fp
        await fp.start()
        worst, outcomes = {}, []
        watcher = loop.create_task(watch_starvation(fp, worst, IDLE_FOR))

        async def event(f, at, x):
            await asyncio.sleep(at)
            t0 = loop.time()
            try:
                r = await fp.invoke(f, {"x": x}, deadline=t0 + deadline)
                outcomes.append("ok" if r["y"] == 2 * x else f"wrong {r}")
            except FunctionUnavailable as e:
                outcomes.append(f"{f} after {loop.time() - t0:.2f}s: {e}")

        async def chaos():
            for _ in range(kills):
                await asyncio.sleep(rng.uniform(0.3, 3.0))
                alive = [i for i, n in launcher.nodes.items() if n is not None]
                if alive:
                    launcher.kill(rng.choice(alive))

        events = [event(specs[fi].name, start + k * gap, 100 * b + k)
                  for b, (fi, start, count, gap) in enumerate(bursts) for k in range(count)]
        await asyncio.gather(*events, chaos())
        watcher.cancel()
        await fp.stop()
        await gw.stop(0)
        return worst, outcomes, launcher.peak

    return sim.run(main())


@settings(max_examples=25, deadline=None)
@given(pools_and_traffic())
def test_no_function_with_waiting_events_starves_while_slots_are_held_by_idle_instances(case):
    """Priority decides only between functions that both have work: however the pool is shared,
    a function's events never wait at zero instances (more than a tick) beside an instance of
    another function whose function has had no event for a panic window and two ticks; and the
    bursts (over by ~10 s) are all served within their 30 s."""
    seed, slots, specs, bursts, kills = case
    worst, outcomes, peak = run_pool(seed, slots, specs, bursts, kills)
    assert all(w <= STARVE_BOUND for w in worst.values()), worst
    assert [o for o in outcomes if o != "ok"] == []
    assert peak <= slots


def test_the_starvation_watch_sees_a_high_priority_panic_holding_the_pool_idle(monkeypatch):
    """The property above can fail: with the autoscaler blind to the work each function has (as
    before the fix), classify's panic holds the only slot idle and regress's event starves."""
    decide = Autoscaler.decide
    monkeypatch.setattr(Autoscaler, "decide", lambda self, now, current=None, work=None: decide(self, now, current))
    specs = [FunctionSpec("classify", target=2.0, max=3, priority=10), FunctionSpec("regress", target=2.0, max=3)]
    worst, outcomes, _ = run_pool(0, 1, specs, [(0, 0.0, 6, 0.0), (1, 2.0, 1, 0.0)], 0, deadline=20.0)
    assert worst["regress"] > 5.0 and any(o.startswith("regress") for o in outcomes)


def test_stop_ends_the_control_loop_even_when_a_kick_lands_with_the_cancellation(monkeypatch):
    """Python 3.11's wait_for swallows a cancellation that arrives as its future completes: a kick
    (here: the last event's drained instance freeing its slot) at the moment of stop() used to
    leave the control loop ticking forever and stop() waiting for it. Found by the property
    above; this is its example, replayed. Whether the kick and the cancel meet depends on the
    order of a set of tasks (by address), so before the fix this hung in about 1 run of 3."""
    stop = FunctionPool.stop

    async def bounded_stop(self):
        await asyncio.wait_for(stop(self), 5.0)  # virtual seconds: a loop left ticking moves the clock

    monkeypatch.setattr(FunctionPool, "stop", bounded_stop)
    specs = [FunctionSpec("f0", target=1.0, max=3), FunctionSpec("f1", target=1.0, max=3)]
    _, outcomes, _ = run_pool(38170, 1, specs, [(0, 2.144079551644097, 3, 0.3), (1, 2.9448639952451927, 3, 0.0)], 3)
    assert outcomes == ["ok"] * 6
