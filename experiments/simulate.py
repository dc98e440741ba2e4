"""Every protocol on the simulated network, over many seeds, with its invariants checked.

Each seed draws its own faults from a seeded ``random.Random``: a link that drops, duplicates
and reorders (``Link(drop, duplicate, jitter)``), a partition for a while, a node crashed and
restarted. The protocol runs under ``dmlsys.wire.sim.run`` (virtual time: a 30 s timeout costs
no wall time, and the same seed replays the same run), and its invariants are checked:

============  ===========================================================================
protocol      invariants
============  ===========================================================================
rpc           every call ends by its deadline (answer or typed error), with its own answer
              (never another call's), once; no pending call is left behind
collective    every rank that returns holds the same bytes, equal to the reduction; a
              rank that fails raises ``CollectiveError`` naming a rank or a member; nobody
              hangs past the timeout; without drops or crashes, every rank returns
balancer      every request ends by its deadline with a reply or one typed ``ServingError``
              (none lost); a reply comes from a version that was pinned when it was sent
              (never the rollout's before it began); without drops, partitions or crashes
              nothing fails
functions     (dmlsys.events FunctionPool) every accepted event ends with its own result or
              ``FunctionUnavailable`` within its deadline; kills alone fail none (with one
              slot too: the high-priority function's 3 s of traffic ends long before the
              30 s deadline, and its idle instance must then yield); no function's events
              wait at zero instances for more than a tick beside an instance whose function
              has had no event for a panic window and two ticks (8 s); the pool's slots
              are never exceeded
============  ===========================================================================

    python experiments/simulate.py --seeds 1000             # 1,000 seeds per protocol
    python experiments/simulate.py --seeds 5 --only rpc     # one protocol
    python experiments/simulate.py --seeds 200 --json sim.json

A failing seed is printed with its faults and violations; rerun it alone with ``--seed-start S
--seeds 1``. Exit status 1 when any invariant failed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dmlsys.node import Node, NodeError, Service, rpc
from dmlsys.wire import sim
from dmlsys.wire.sim import Link, SimNetwork

EPS = 0.05  # virtual seconds of slack on "by its deadline" (delivery of the error itself)
SPIN_LIMIT = 50_000  # loop iterations at one virtual instant, in a row, that make a livelock


class Livelock(Exception):
    """The virtual clock stopped: the loop kept running callbacks at one instant without end."""


class _WatchedSelector(sim._VirtualSelector):
    """The simulation's selector, which also notices when the clock stops moving: something
    reschedules itself at the same instant forever (a wait of less than the clock's resolution
    that never expires, say). A real loop would burn a core there; we stop and say where."""

    def __init__(self) -> None:
        super().__init__()
        self._spins = 0
        self._at = -1.0

    def select(self, timeout=None):
        if timeout == 0 and self.now == self._at:
            self._spins += 1
            if self._spins > SPIN_LIMIT:
                raise Livelock(f"virtual time stuck at t={self.now!r} for {SPIN_LIMIT} loop iterations")
        else:
            self._spins, self._at = 0, self.now
        return super().select(timeout)


class _Loop(sim.VirtualTimeLoop):
    def __init__(self) -> None:
        self._virtual = _WatchedSelector()
        asyncio.SelectorEventLoop.__init__(self, self._virtual)


def _run(main):
    """``sim.run`` on a loop that raises Livelock instead of spinning forever."""
    loop = _Loop()
    try:
        return loop.run_until_complete(main)
    finally:
        # What a livelock leaves pending is closed here, where it is known, rather than by the
        # garbage collector later with a loop long gone (noise in somebody else's test).
        loop.set_exception_handler(lambda loop, context: None)
        for task in asyncio.all_tasks(loop):
            with contextlib.suppress(BaseException):
                task.get_coro().close()
        loop.close()


def _faults(rng: random.Random, *, lossy: bool = True) -> dict[str, Any]:
    """A seed's faults. A third of the seeds get a clean-but-reordering network (the protocol
    must then succeed outright); the rest get drops, duplicates, a partition and a crash."""
    calm = rng.random() < 1 / 3
    return {
        "calm": calm,
        "drop": 0.0 if calm or not lossy else rng.choice([0.0, 0.01, 0.05, 0.2]),
        "duplicate": rng.choice([0.0, 0.02, 0.1]),
        "jitter": rng.choice([0.0, 0.001, 0.005]),
        "partition": None if calm else (rng.uniform(0.2, 2.0), rng.uniform(0.1, 2.0)),  # (at, for)
        "crash": None if calm else (rng.uniform(0.2, 2.0), rng.uniform(0.1, 2.0)),  # (at, down for)
    }


def _link(f: dict) -> Link:
    return Link(drop=f["drop"], duplicate=f["duplicate"], jitter=f["jitter"])


# -- rpc ---------------------------------------------------------------------------------------


class _Echo(Service):
    name = "echo"

    @rpc
    async def echo(self, body):
        await asyncio.sleep(body["s"])
        return body["tag"]


def sim_rpc(seed: int) -> tuple[dict, list[str]]:
    rng = random.Random(seed)
    f = _faults(rng)
    bad: list[str] = []

    async def main():
        net = SimNetwork(seed, link=_link(f))
        loop = asyncio.get_running_loop()
        server = Node("s", net.transport("s"), admin=None)
        server.add_service(_Echo())
        await server.start()
        client = Node("c", net.transport("c"), admin=None)
        await client.start()
        nodes = {"s": server}
        outcomes: dict[int, str] = {}

        async def call(i: int):
            await asyncio.sleep(rng.uniform(0, 3.0))
            timeout = rng.uniform(0.2, 3.0)
            work = rng.uniform(0, 0.5)
            t0 = loop.time()
            try:
                got = await client.call("s", "echo", "echo", {"tag": f"t{i}", "s": work}, timeout=timeout)
                outcome = "ok" if got == f"t{i}" else f"WRONG ANSWER {got!r}"
            except (NodeError, TimeoutError) as e:
                outcome = type(e).__name__
            took = loop.time() - t0
            if took > timeout + EPS:
                bad.append(f"call {i} ended after {took:.3f}s, deadline {timeout:.3f}s ({outcome})")
            if i in outcomes:
                bad.append(f"call {i} ended twice")
            outcomes[i] = outcome
            if f["calm"] and timeout > work + 0.1 and outcome != "ok":
                bad.append(f"calm network, call {i} ({work:.2f}s of work, {timeout:.2f}s timeout): {outcome}")

        async def chaos():
            if f["partition"]:
                await asyncio.sleep(f["partition"][0])
                net.partition({"c"}, {"s"})
                await asyncio.sleep(f["partition"][1])
                net.heal()
            if f["crash"]:
                await asyncio.sleep(f["crash"][0])
                net.crash("s")
                nodes["s"].kill()
                await asyncio.sleep(f["crash"][1])
                again = Node("s", net.transport("s"), admin=None)
                again.add_service(_Echo())
                await again.start()
                nodes["s"] = again

        n = 40
        await asyncio.gather(*(call(i) for i in range(n)), chaos())
        await asyncio.sleep(5.0)  # late duplicates and replies arrive, and must change nothing
        if len(outcomes) != n:
            bad.append(f"{n - len(outcomes)} calls never ended")
        bad.extend(f"call {i}: {o}" for i, o in outcomes.items() if o.startswith("WRONG"))
        left = len(client._pending) if hasattr(client._pending, "__len__") else 0
        if left:
            bad.append(f"{left} pending calls left in the client's table")
        await client.stop(0)
        for node in nodes.values():
            if node.state.value != "stopped":
                await node.stop(0)
        return {"ok": sum(o == "ok" for o in outcomes.values()), "calls": n}

    stats = _run(main())
    return {**f, **stats}, bad


# -- collective --------------------------------------------------------------------------------


def sim_collective(seed: int) -> tuple[dict, list[str]]:
    from dmlsys.collective import CollectiveError, CollectiveService, ProcessGroup

    rng = random.Random(seed)
    f = _faults(rng)
    f["partition"] = None  # a partition is a crash as far as a ring is concerned; crashes cover it
    n = rng.randrange(2, 6)
    timeout = 5.0
    shape = rng.choice([(1,), (7,), (300,), (4, 50)])
    crash_rank = rng.randrange(n) if f["crash"] else None
    bad: list[str] = []
    npr = np.random.default_rng(seed)
    xs = [npr.standard_normal(shape) for _ in range(n)]

    async def main():
        net = SimNetwork(seed, link=_link(f))
        loop = asyncio.get_running_loop()
        names = [f"w{i}" for i in range(n)]
        nodes = [Node(name, net.transport(name), admin=None) for name in names]
        for node in nodes:
            node.add_service(CollectiveService())
            await node.start()
        groups = [ProcessGroup(node, names, timeout=timeout, chunk_bytes=rng.choice([64, 1024, 1 << 20]))
                  for node in nodes]
        t0 = loop.time()

        async def rank(g):
            try:
                return await g.allreduce(xs[g.rank], "sum")
            except CollectiveError as e:
                return e

        async def chaos():
            if crash_rank is not None:
                await asyncio.sleep(f["crash"][0] / 100)  # within the pass: it takes milliseconds
                net.crash(names[crash_rank])
                nodes[crash_rank].kill()

        results = (await asyncio.gather(*(rank(g) for g in groups), chaos()))[:n]
        took = loop.time() - t0
        for node in nodes:
            if node.state.value != "stopped":
                await node.stop(drain_timeout=0.1)
        return results, took

    results, took = _run(main())
    alive = [r for i, r in enumerate(results) if i != crash_rank]
    arrays = [r for r in alive if isinstance(r, np.ndarray)]
    errors = [r for r in alive if not isinstance(r, np.ndarray)]
    if arrays:
        if any(a.tobytes() != arrays[0].tobytes() for a in arrays):
            bad.append("ranks returned different bytes")
        if not np.allclose(arrays[0], np.sum(xs, axis=0)):
            bad.append("the result is not the sum")
    for e in errors:
        if not isinstance(e, Exception) or not any(w in str(e) for w in ("rank", "w0", "w1", "w2", "w3", "w4")):
            bad.append(f"an error that names no rank: {type(e).__name__}: {e}")
    if took > timeout + 2.5:
        bad.append(f"the pass took {took:.2f}s with a {timeout}s timeout")
    if f["drop"] == 0 and crash_rank is None and errors:
        bad.append(f"no drops, no crash, yet {len(errors)} ranks failed: {errors[0]}")
    return {**f, "ranks": n, "ok": len(arrays), "failed": len(errors)}, bad


# -- balancer ----------------------------------------------------------------------------------


LABELS = tuple(f"c{i}" for i in range(10))


def _fake_runtime(model: str, version: int):
    from dmlsys.serving.runtime import Runtime

    def fn(x):
        s = np.full((x.shape[0], 10), 0.01, np.float32)
        s[:, version % 10] = 0.91
        return s

    return Runtime(model, version, {"version": version}, LABELS, (1, 2, 4, 8, 16, 32, 64), fn)


BODY = json.dumps({"instances": [[0.5] * 784]}).encode()


def sim_balancer(seed: int) -> tuple[dict, list[str]]:
    from dmlsys.node import Directory, Member
    from dmlsys.serving.balancer import Balancer, BalancerConfig
    from dmlsys.serving.errors import ServingError
    from dmlsys.serving.replica import ModelService, ReplicaConfig

    rng = random.Random(seed)
    f = _faults(rng)
    rollout = rng.random() < 0.5
    names = ["r0", "r1", "r2"]
    latest = {"m": 1}
    bad: list[str] = []
    rolled = {"started": None, "done": None}

    def loader(store, model, version):
        return _fake_runtime(model, version or latest[model])

    async def main():
        net = SimNetwork(seed, link=_link(f))
        loop = asyncio.get_running_loop()
        directory = Directory([Member(n, "replica", f"sim://{n}", config={"model": "m"}) for n in names]
                              + [Member("gw", "gateway", "sim://gw")])
        replicas: dict[str, Node] = {}

        async def start_replica(name):
            node = Node(name, net.transport(name), role="replica", directory=directory, admin=None)
            node.add_service(ModelService(ReplicaConfig("m", "unused"), loader=loader, offload=False))
            await node.start()
            replicas[name] = node

        for name in names:
            await start_replica(name)
        gw = Node("gw", net.transport("gw"), role="gateway", directory=directory, admin=None)
        balancer = Balancer(gw, BalancerConfig(probe_period=0.2, try_timeout=1.0))
        await gw.start()
        await balancer.start()
        outcomes: list[str] = []

        async def request(i: int):
            await asyncio.sleep(i * 0.05)
            deadline = rng.uniform(1.0, 5.0)
            t0 = loop.time()
            sent_after_rollout = rolled["started"] is not None
            try:
                reply = await balancer.predict("m", {"json": BODY, "max_instances": 4}, deadline=t0 + deadline)
                v = reply.get("version")
                if v == 2 and not sent_after_rollout and (rolled["started"] is None or rolled["started"] > loop.time()):
                    bad.append(f"request {i} answered by v2 before the rollout began")
                if v not in ((1, 2) if rollout else (1,)):
                    bad.append(f"request {i} answered by unpinned version {v}")
                outcomes.append("ok")
            except ServingError as e:
                outcomes.append(f"{e.status}")
            except Exception as e:  # noqa: BLE001 - an untyped error is the finding
                bad.append(f"request {i}: untyped {type(e).__name__}: {e}")
                outcomes.append("untyped")
            took = loop.time() - t0
            if took > deadline + EPS:
                bad.append(f"request {i} ended after {took:.3f}s, deadline {deadline:.3f}s")

        async def chaos():
            if rollout:
                await asyncio.sleep(rng.uniform(0.3, 1.5))
                latest["m"] = 2
                rolled["started"] = loop.time()
                try:
                    await balancer.rollout("m", None)
                except ServingError:
                    pass  # a rollout may stop part-way under faults; requests must still be answered
            if f["partition"]:
                await asyncio.sleep(f["partition"][0])
                victim = rng.choice(names)
                net.partition({"gw", *(n for n in names if n != victim)}, {victim})
                await asyncio.sleep(f["partition"][1])
                net.heal()
            if f["crash"]:
                await asyncio.sleep(f["crash"][0])
                victim = rng.choice(names)
                net.crash(victim)
                replicas[victim].kill()
                gw.peer_lost(victim, "crashed") if rng.random() < 0.5 else None  # the supervisor's word, or not
                await asyncio.sleep(f["crash"][1])
                await start_replica(victim)

        n = 60
        await asyncio.gather(*(request(i) for i in range(n)), chaos())
        if len(outcomes) != n:
            bad.append(f"{n - len(outcomes)} requests never ended")
        if f["calm"] and f["drop"] == 0 and any(o != "ok" for o in outcomes):
            bad.append(f"calm network, yet outcomes {sorted(set(outcomes))}")
        await balancer.stop()
        await gw.stop(0)
        for node in replicas.values():
            if node.state.value == "stopped":
                await node.service("model").stop()
            await node.stop(0)
        return {"ok": outcomes.count("ok"), "requests": n, "rollout": rollout}

    stats = _run(main())
    return {**f, **stats}, bad


# -- events: the function pool -----------------------------------------------------------------


def sim_functions(seed: int) -> tuple[dict, list[str]]:
    from dmlsys.events.autoscaler import Autoscaler, FunctionSpec, ScalingConfig
    from dmlsys.events.functions import FunctionPool, FunctionUnavailable
    from dmlsys.events.invariants import watch_starvation
    from dmlsys.events.pool import Pool

    tick = 1.0
    # a function without an event for a panic window claims nothing at the next step (within a
    # tick more): once its instance has idled that long (2 ticks of slack), nobody waits beside it
    # for more than a tick
    idle_for, starve_bound = ScalingConfig().panic_window + 2 * tick, tick

    rng = random.Random(seed)
    f = {"kills": rng.randrange(0, 10), "slots": rng.randrange(1, 5), "events": 100}
    bad: list[str] = []

    class Doubler(Service):
        name = "function"

        @rpc
        async def invoke(self, body):
            await asyncio.sleep(0.05)
            return {"y": body["x"] * 2}

    class Launcher:
        def __init__(self, net, gateway):
            self.net, self.gateway = net, gateway
            self.nodes: dict[str, Node | None] = {}
            self.peak = 0
            self.pool = None

        async def start(self, function, instance):
            self.nodes[instance] = None
            self.peak = max(self.peak, len(self.nodes))
            await asyncio.sleep(0.5)
            if instance not in self.nodes:
                raise RuntimeError(f"{instance} was stopped while starting")
            node = Node(instance, self.net.transport(instance), admin=None)
            node.add_service(Doubler())
            await node.start()
            self.nodes[instance] = node
            self.net.on_crash(instance, lambda: (self.gateway.peer_lost(instance, "crashed"),
                                                 self.pool.instance_died(instance)))
            return instance

        async def stop(self, instance):
            node = self.nodes.pop(instance, None)
            if node is not None:
                await node.stop(0)

        def kill(self, instance):
            node = self.nodes.pop(instance, None)
            if node is not None:
                node.kill()
                self.net.crash(instance)

    async def main():
        net = SimNetwork(seed, link=Link(jitter=rng.choice([0.0, 0.002])))
        loop = asyncio.get_running_loop()
        gw = Node("gw", net.transport("gw"), admin=None)
        await gw.start()
        specs = [FunctionSpec("classify", target=2.0, min=0, max=4, priority=10),
                 FunctionSpec("regress", target=2.0, min=0, max=4, priority=0)]
        launcher = Launcher(net, gw)
        fp = FunctionPool(gw, Pool(f["slots"], specs), Autoscaler(f["slots"], specs, ScalingConfig()), launcher,
                          tick=tick, try_timeout=2.0)
        launcher.pool = fp
        await fp.start()
        results: dict[int, Any] = {}
        watcher = loop.create_task(watch_starvation(fp, starved, idle_for))

        async def event(i):
            await asyncio.sleep(i * 0.03)
            try:
                r = await fp.invoke("classify" if i % 2 else "regress", {"x": i}, deadline=loop.time() + 30.0)
                results[i] = "ok" if r["y"] == 2 * i else f"WRONG {r!r}"
            except FunctionUnavailable as e:
                results[i] = f"unavailable: {e}"

        async def chaos():
            for _ in range(f["kills"]):
                await asyncio.sleep(rng.uniform(0.3, 1.0))
                alive = [i for i, nd in launcher.nodes.items() if nd is not None]
                if alive:
                    launcher.kill(rng.choice(alive))

        try:  # the last event's deadline is 33 s in; far past it, whatever is still waiting is stuck
            await asyncio.wait_for(asyncio.gather(*(event(i) for i in range(f["events"])), chaos()), 120.0)
        except TimeoutError:
            stuck = sorted(set(range(f["events"])) - set(results))
            bad.append(f"{len(stuck)} events never ended (deadline 30 s, waited 120 s): {stuck[:8]}; "
                       f"pool: {fp.statistics()}")
        watcher.cancel()
        await fp.stop()
        await gw.stop(0)
        for node in list(launcher.nodes.values()):
            if node is not None:
                await node.stop(0)
        return results, launcher.peak

    starved: dict[str, float] = {}
    results, peak = _run(main())
    bad.extend([f"event {i}: {r}" for i, r in results.items() if r.startswith("WRONG")][:3])
    bad.extend([f"event {i}: {r}" for i, r in results.items() if r != "ok"][:3])  # kills alone fail nothing
    bad.extend(f"{fn}'s events waited {s:.2f}s at zero instances beside another function's instance idle for over "
               f"{idle_for:g}s (bound {starve_bound:g}s)" for fn, s in starved.items() if s > starve_bound)
    if peak > f["slots"]:
        bad.append(f"{peak} instances alive or starting on a pool of {f['slots']} slots")
    return {**f, "ok": sum(r == "ok" for r in results.values()),
            "starved_s": round(max(starved.values(), default=0.0), 3)}, bad


PROTOCOLS = {"rpc": sim_rpc, "collective": sim_collective, "balancer": sim_balancer, "functions": sim_functions}


def one(protocol: str, seed: int) -> tuple[int, dict, list[str]]:
    """One seed of one protocol: (seed, its faults, the invariants it broke)."""
    import logging

    logging.disable(logging.WARNING)  # faults make nodes log a lot; the invariants are what we report
    try:
        faults, bad = PROTOCOLS[protocol](seed)
    except Exception as e:  # noqa: BLE001 - a crash of the harness or protocol is a failure too
        faults, bad = {}, [f"raised {type(e).__name__}: {e}"]
    return seed, faults, bad


def run(protocol: str, seeds: range, *, verbose: bool = True, jobs: int = 1) -> dict:
    """Runs ``protocol`` on every seed; its row: seeds, failures (with the first few), wall time."""
    t0 = time.perf_counter()
    failures: list[dict] = []
    if jobs > 1:
        import concurrent.futures

        with concurrent.futures.ProcessPoolExecutor(jobs) as pool:
            outcomes = list(pool.map(one, [protocol] * len(seeds), seeds, chunksize=8))
    else:
        outcomes = (one(protocol, seed) for seed in seeds)
    for seed, faults, bad in outcomes:
        if bad:
            failures.append({"seed": seed, "faults": faults, "violations": bad[:5]})
            if verbose:
                print(f"  {protocol} seed {seed}: {bad[:3]} with {faults}", flush=True)
    wall = time.perf_counter() - t0
    return {"protocol": protocol, "seeds": len(seeds), "failed_seeds": len(failures), "wall_s": round(wall, 2),
            "ms_per_seed": round(1000 * wall / max(1, len(seeds)), 1), "failures": failures[:10]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=100, help="seeds per protocol (default 100)")
    p.add_argument("--seed-start", type=int, default=0)
    p.add_argument("--only", action="append", choices=sorted(PROTOCOLS))
    p.add_argument("--jobs", type=int, default=1, help="processes running seeds side by side")
    p.add_argument("--json", help="write the rows to FILE")
    args = p.parse_args(argv)
    rows = []
    for protocol in args.only or list(PROTOCOLS):
        row = run(protocol, range(args.seed_start, args.seed_start + args.seeds), jobs=args.jobs)
        rows.append(row)
        print(f"{protocol:11s} seeds={row['seeds']:5d} failed={row['failed_seeds']:4d} wall={row['wall_s']:7.1f}s "
              f"({row['ms_per_seed']} ms/seed)", flush=True)
    print("\n| protocol | seeds | seeds failing an invariant | wall s | ms/seed |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['protocol']} | {r['seeds']} | {r['failed_seeds']} | {r['wall_s']} | {r['ms_per_seed']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 1 if any(r["failed_seeds"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
