#!/usr/bin/env python
"""The course's event-driven scenario (issue 11): functions over a shared pool vs static allocations.

Two measurements:

``cold-start`` (real processes): what scale-from-zero costs. A supervisor runs an ``events`` node and
the ``function`` group; the fashion classifier is deployed with min 0, and each repetition sends
one event while the function has no instance and waits for the answer. The client's time (HTTP
in, gate, the scaling decision, a spare told its model, the first answer out) bounds the cold
start from above. Beside it: a fresh replica process's start to first answer, its model compiled
without and with the persistent compilation cache.

    python experiments/event_driven.py cold-start --json docs/event_cold_start.json

``year`` (simulated network, virtual time, calibrated): a compressed year of hotel traffic
(weekly and seasonal waves, evening peaks, the Thanksgiving and Christmas booking peaks, and an
unannounced conference spike in September) for the hotel-price regressor, steady traffic for the
Fashion-MNIST classifier, and (in the shared pool only) a low-priority batch step that takes
whatever the pool has free. Three allocations:

  (a) static-average   instances fixed at what the average load needs
  (b) static-peak      instances fixed at what the Christmas peak needs
  (c) autoscaled       one shared pool, each function 0..max, KPA stable/panic windows, priorities

Each event goes through the real ``EventGate`` (a tier per function: bounded concurrency, a
bounded queue: 429 when full) and the real ``FunctionPool``/``Autoscaler``/``Pool``, to instances
on ``dmlsys.wire.sim.SimNetwork``. What is simulated is the instance's work: each event holds its
instance for a service time drawn around the one measured on real instances (``--hotel-ms``,
``--fashion-ms``), and a start costs the measured spare cold start (``--cold-start``). The year
is compressed (``--day`` seconds per day); the service and cold-start times are not, and the KPA
windows keep Knative's 10:1 ratio at ``--stable`` seconds.

    python experiments/event_driven.py year --json docs/event_driven.json          # -> .png too
    python experiments/event_driven.py year --from-json docs/event_driven.json     # re-plot only

``train-hotel``: the hotel-price regressor (``dmlsys.events.hotel``) into a model store, so that
``python -m dmlsys.cluster deploy hotel-price`` serves it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np

from dmlsys.events import hotel

# ---------------------------------------------------------------------------------------- traffic

THANKSGIVING, CHRISTMAS, CONFERENCE = hotel.THANKSGIVING, hotel.CHRISTMAS, 262  # day of the year


def hotel_load(day: float) -> float:
    """Hotel-price requests, as a multiple of the year's average (roughly): day is fractional."""
    d = int(day) % 365
    frac = day - math.floor(day)
    weekly = {4: 1.3, 5: 1.3, 6: 0.8}.get(d % 7, 1.0)  # searches peak Fri/Sat, dip on Sunday
    season = 1.0 + 0.3 * math.sin(2 * math.pi * (d - 105) / 365)
    diurnal = 1.0 + 0.6 * math.sin(2 * math.pi * (frac - 0.45))  # evenings busiest
    holidays = 1.0
    if THANKSGIVING - 12 <= d <= THANKSGIVING:  # people book in the fortnight before
        holidays += 2.0 * (1 - (THANKSGIVING - d) / 12)
    if CHRISTMAS - 20 <= d <= CHRISTMAS + 2:
        holidays += 3.0 * min(1.0, (d - (CHRISTMAS - 20)) / 10)
    if CONFERENCE <= day < CONFERENCE + 1.5:  # unannounced: a step, not a ramp
        holidays += 5.0
    return 0.62 * weekly * season * diurnal * holidays


def arrivals(rate_at, horizon: float, rng: random.Random, peak: float):
    """Poisson arrivals with time-varying rate (Lewis-Shedler thinning): a sorted list of times."""
    t, out = 0.0, []
    while True:
        t += rng.expovariate(peak)
        if t >= horizon:
            return out
        if rng.random() * peak <= rate_at(t):
            out.append(t)


# ---------------------------------------------------------------------------------------- simulation

def run_config(name: str, args, seed: int) -> dict:
    """One allocation over the whole compressed year on virtual time; its timeline and totals."""
    from dmlsys.events.autoscaler import Autoscaler, FunctionSpec, ScalingConfig
    from dmlsys.events.errors import EventsError
    from dmlsys.events.functions import FunctionPool, FunctionUnavailable
    from dmlsys.events.gate import EventGate
    from dmlsys.events.keys import Principal
    from dmlsys.events.pool import Pool
    from dmlsys.events.tiers import Concurrency, Principals, Queue, Tier
    from dmlsys.node import Node, Service, rpc
    from dmlsys.wire import sim
    from dmlsys.wire.sim import SimNetwork

    day = args.day
    horizon = 365 * day
    s_hotel, s_fashion, s_batch = args.hotel_ms / 1e3, args.fashion_ms / 1e3, args.batch_ms / 1e3
    cap_hotel = 1.0 / s_hotel  # events/s one instance can serve
    hotel_avg = args.hotel_load * cap_hotel  # at load multiplier 1
    fashion_rate = args.fashion_load / s_fashion
    # sizes: what the average and the Christmas peak need (target: 1 event in flight per instance)
    mean_mult = statistics.fmean(hotel_load(d / 24) for d in range(365 * 24))
    peak_mult = max(hotel_load(d / 24) for d in range(330 * 24, 362 * 24))
    n_avg_h = max(1, math.ceil(hotel_avg * mean_mult * s_hotel))
    n_peak_h = max(1, math.ceil(hotel_avg * peak_mult * s_hotel / args.utilization))
    n_fashion = max(1, math.ceil(args.fashion_load / args.utilization))
    if name == "static-average":
        specs = [FunctionSpec("hotel", min=n_avg_h, max=n_avg_h), FunctionSpec("fashion", min=1, max=1)]
    elif name == "static-peak":
        specs = [FunctionSpec("hotel", min=n_peak_h, max=n_peak_h),
                 FunctionSpec("fashion", min=n_fashion, max=n_fashion)]
    else:
        specs = [FunctionSpec("hotel", min=0, max=args.slots, priority=1, target=args.target),
                 FunctionSpec("fashion", min=0, max=args.slots, priority=1, target=args.target),
                 FunctionSpec("batch", min=0, max=args.slots, priority=-1, target=1.0)]
    slots = args.slots if name == "autoscaled" else sum(s.max for s in specs)
    service = {"hotel": s_hotel, "fashion": s_fashion, "batch": s_batch}

    class SimFunction(Service):
        name = "function"

        def __init__(self, fn: str, busy: dict, rng: random.Random) -> None:
            self.fn, self.busy, self.rng = fn, busy, rng
            self.lock = asyncio.Lock()

        @rpc
        async def invoke(self, body):
            async with self.lock:  # one event at a time: an instance is one core
                s = service[self.fn] * self.rng.lognormvariate(0, 0.25)
                await asyncio.sleep(s)
                self.busy[self.fn] += s
                return {"ok": True}

    async def main() -> dict:
        net = SimNetwork(seed)
        loop = asyncio.get_running_loop()
        door = Node("events", net.transport("events"))
        await door.start()
        rng = random.Random(seed)
        busy = {f: 0.0 for f in service}

        class Launcher:
            def __init__(self):
                self.nodes = {}

            async def start(self, function, instance):
                self.nodes[instance] = None
                await asyncio.sleep(args.cold_start * rng.uniform(0.8, 1.25))
                if instance not in self.nodes:
                    raise RuntimeError("stopped while starting")
                node = Node(instance, net.transport(instance))
                node.add_service(SimFunction(function, busy, random.Random(rng.random())))
                await node.start()
                self.nodes[instance] = node
                return instance

            async def stop(self, instance):
                node = self.nodes.pop(instance, None)
                if node is not None:
                    await node.stop(0)

        cfg = ScalingConfig(stable_window=args.stable, panic_window=args.stable / 10)
        fp = FunctionPool(door, Pool(slots, specs), Autoscaler(slots, specs, cfg), Launcher(), tick=args.stable / 60,
                          try_timeout=args.deadline)
        # the gate: a tier per function; at most 2 events per instance it may have, a bounded queue
        tiers = [Tier(s.name, Concurrency(per_principal=64, total=2 * s.max) + Queue(depth=args.queue, max_wait=2.0)
                      + Principals(max=10_000)) for s in specs]
        gate = EventGate(tiers, anonymous_tier="hotel")
        await fp.start()
        while any(len(fp.pool.live(s.name)) < s.min or fp.pool.counts()[s.name]["starting"] for s in specs):
            await asyncio.sleep(0.1)  # the static allocations are up before the year starts
        t0 = loop.time()
        buckets = int(365 / args.sample_days)
        bucket_s = horizon / buckets
        tl = {"arrivals": {}, "ok": {}, "r429": {}, "dropped": {}, "lat": {}, "instances": {}}
        for f in service:
            for k in tl:
                tl[k][f] = [[] for _ in range(buckets)] if k == "lat" else [0.0] * buckets
        inst_seconds = {f: 0.0 for f in service}
        tasks: set = set()

        async def event(fn: str, principal: str):
            t = loop.time() - t0
            b = min(buckets - 1, int(t / bucket_s))
            tl["arrivals"][fn][b] += 1
            p = Principal(principal, fn)
            try:
                async with gate.admission(p):
                    await fp.invoke(fn, {"x": 1}, deadline=loop.time() + args.deadline)
                tl["ok"][fn][b] += 1
                tl["lat"][fn][b].append(loop.time() - t0 - t)
            except FunctionUnavailable:
                tl["dropped"][fn][b] += 1
            except EventsError as e:
                if e.status == 429:
                    tl["r429"][fn][b] += 1
                else:  # 503: accepted, waited max_wait in the queue, never ran
                    tl["dropped"][fn][b] += 1

        def spawn(coro):
            t = loop.create_task(coro)
            tasks.add(t)
            t.add_done_callback(tasks.discard)

        hrng, frng = random.Random(seed + 1), random.Random(seed + 2)
        h_times = arrivals(lambda t: hotel_avg * hotel_load(t / day), horizon, hrng, hotel_avg * 6.5)
        f_times = arrivals(lambda t: fashion_rate, horizon, frng, fashion_rate)
        stream = sorted([(t, "hotel") for t in h_times] + [(t, "fashion") for t in f_times])

        async def batch_worker():  # the pipeline's batch step: always has work, lowest priority
            while True:
                with contextlib.suppress(EventsError):
                    async with gate.admission(Principal("batch", "batch")):
                        await fp.invoke("batch", {"x": 1}, deadline=loop.time() + 3600)
                    b = min(buckets - 1, int((loop.time() - t0) / bucket_s))
                    tl["ok"]["batch"][b] += 1

        async def sampler():
            step = 0.05
            while True:
                await asyncio.sleep(step)
                if loop.time() - t0 >= horizon:
                    continue  # the year is over: the last events drain, the timeline has ended
                b = min(buckets - 1, int((loop.time() - t0) / bucket_s))
                for f in service:
                    n = sum(1 for i in fp.pool.instances.values() if i.function == f)
                    inst_seconds[f] += n * step
                    tl["instances"][f][b] += n * step / bucket_s

        spawn(sampler())
        if name == "autoscaled":
            for _ in range(args.batch_workers):
                spawn(batch_worker())
        for t, fn in stream:
            delay = t0 + t - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            spawn(event(fn, f"{fn[0]}{rng.randrange(5000)}"))
        while any(not t.done() for t in tasks if t.get_coro().__name__ == "event"):
            await asyncio.sleep(1.0)
        for t in list(tasks):
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await fp.stop()
        await door.stop(0)
        return {"tl": tl, "inst_seconds": inst_seconds, "busy": busy, "retries": fp.retries,
                "cold_starts": {f: len(v) for f, v in fp.pool.cold_starts.items()}}

    started = time.perf_counter()
    out = sim.run(main())
    wall = time.perf_counter() - started
    tl = out["tl"]
    rows = []
    for f in ("hotel", "fashion", "batch"):
        if f == "batch" and name != "autoscaled":
            continue
        lat = [x for b in tl["lat"][f] for x in b]
        arrived = sum(tl["arrivals"][f])
        inst_s = out["inst_seconds"][f]
        rows.append({
            "config": name, "function": f, "events": int(arrived if f != "batch" else sum(tl["ok"][f])),
            "ok": int(sum(tl["ok"][f])), "r429": int(sum(tl["r429"][f])), "dropped": int(sum(tl["dropped"][f])),
            "p50_ms": round(1e3 * float(np.percentile(lat, 50)), 1) if lat else None,
            "p99_ms": round(1e3 * float(np.percentile(lat, 99)), 1) if lat else None,
            "instance_seconds": round(inst_s, 1), "utilization": round(out["busy"][f] / inst_s, 3) if inst_s else None,
            "cold_starts": out["cold_starts"].get(f, 0),
        })
    series = {
        "t_days": [round((i + 0.5) * args.sample_days, 2) for i in range(len(tl["arrivals"]["hotel"]))],
        "instances": tl["instances"],
        "arrivals_per_s": {f: [round(v / (args.sample_days * day), 2) for v in tl["arrivals"][f]] for f in service},
        "p99_ms": {f: [round(1e3 * float(np.percentile(b, 99)), 1) if b else None for b in tl["lat"][f]] for f in service},
        "r429": tl["r429"], "dropped": tl["dropped"],
    }
    sizes = {"hotel_static_average": n_avg_h, "hotel_static_peak": n_peak_h, "fashion_static_peak": n_fashion}
    return {"config": name, "rows": rows, "series": series, "slots": slots, "sizes": sizes,
            "retries": out["retries"], "wall_s": round(wall, 1)}


# ---------------------------------------------------------------------------------------- cold start (real)

def cold_start(args) -> dict:
    import aiohttp

    from dmlsys.cluster.spec import load
    from dmlsys.cluster.supervisor import Supervisor

    work = Path(tempfile.mkdtemp(prefix="dmlsys-cold-"))
    store = Path(args.store) if args.store else work / "store"
    if not args.store:
        import jax

        from dmlsys.train.models import build
        from dmlsys.train.store import ModelStore

        net = build({"kind": "mlp"})
        ModelStore(store).save("fashion-mlp", net.init(jax.random.PRNGKey(0)), {"arch": net.arch})
    result: dict = {"replica": [], "function": [], "function_no_spare": []}

    # a fresh replica process: start -> first answer, compile cache off / on (alternated)
    script = ("import time,sys; t=time.perf_counter(); import jax; i=time.perf_counter()-t; "
              "from dmlsys.serving import runtime; import numpy as np; l=time.perf_counter(); "
              "r=runtime.load(sys.argv[1],'fashion-mlp'); r.predict(np.zeros((1,784),np.float32)); "
              "print(i, time.perf_counter()-l, time.perf_counter()-t)")
    import subprocess

    cache = work / "jax-cache"
    parts = set(args.parts.split(","))
    for rep in range(args.reps + 1 if "replica" in parts else 0):
        for mode in ("off", "cache"):
            env = {**os.environ, "DMLSYS_JAX_CACHE": "off" if mode == "off" else str(cache), "PYTHONPATH": str(ROOT)}
            out = subprocess.run([sys.executable, "-c", script, str(store)], env=env, capture_output=True, text=True,
                                 check=True).stdout.split()
            if rep > 0:  # the first round fills the cache
                result["replica"].append({"mode": mode, "import_s": float(out[0]), "load_s": float(out[1]),
                                          "total_s": float(out[2])})
            print(f"replica {mode}: {out}", file=sys.stderr)

    spec = f"""
[cluster]
name = "cold"
store = "{store}"
[[nodes]]
name = "events"
role = "events"
[nodes.config]
http = "127.0.0.1:0"
slots = 2
spares = {{spares}}
tick = 0.1
stable_window = 2.0
panic_window = 0.2
[nodes.config.tiers.anonymous]
rates = ["1000/s"]
concurrency = 4
[[nodes]]
name = "function"
role = "function"
replicas = {{replicas}}
"""

    async def run(spares: int, reps: int, key: str) -> None:
        d = work / f"c{spares}"
        d.mkdir()
        (d / "spec.toml").write_text(spec.format(spares=spares, replicas=spares))  # no spare: no process waits
        old = os.getcwd()
        os.chdir(d)
        sup = Supervisor(load(d / "spec.toml"), d / ".dmlsys")
        try:
            await sup.up()
            await sup.node.call("events", "events", "deploy", {"model": "fashion-mlp", "min": 0, "max": 1}, timeout=10)
            async with aiohttp.ClientSession() as http:
                for rep in range(reps + 1):
                    while True:  # at zero instances, a warmed spare waiting (when we keep spares)
                        st = await sup.node.call("events", "events", "status", None, timeout=5)
                        inst = st["pool"]["instances"]["fashion-mlp"]
                        if sum(inst.values()) == 0 and st["spares"] >= spares:
                            break
                        await asyncio.sleep(0.2)
                    await asyncio.sleep(1.0)
                    t = time.perf_counter()
                    async with http.post(st["url"] + "/v1/functions/fashion-mlp:invoke",
                                         json={"instances": [[0.0] * 784]}) as r:
                        await r.read()
                        status = r.status
                    first = time.perf_counter() - t
                    st = await sup.node.call("events", "events", "status", None, timeout=5)
                    row = {"first_answer_s": round(first, 3), "status": status,
                           "asked_to_ready_s": st["pool"]["cold_start_median_s"]["fashion-mlp"],
                           "spare_load_s": (st.get("load_seconds") or [None])[-1]}
                    print(f"{key} rep {rep}: {row}", file=sys.stderr)
                    if rep > 0 or spares == 0:  # rep 0 fills the compile cache
                        result[key].append(row)
        finally:
            await sup.down()
            os.chdir(old)

    if "function" in parts:
        asyncio.run(run(1, args.reps, "function"))
    if "no-spare" in parts:
        asyncio.run(run(0, max(1, args.reps // 3), "function_no_spare"))
    return result


# ---------------------------------------------------------------------------------------- short real version

REAL_SPEC = """
[cluster]
name = "year"
store = "{store}"
[[nodes]]
name = "events"
role = "events"
[nodes.config]
http = "127.0.0.1:0"
slots = {slots}
spares = 2
tick = 0.2
stable_window = {stable}
panic_window = {panic}
deadline = 10.0
[nodes.config.tiers.anonymous]
rates = ["1/hour"]
[nodes.config.tiers.authenticated]
rates = ["100000/s"]
concurrency = 64
total_concurrency = 64
queue = 256
max_wait = 5
[[nodes]]
name = "function"
role = "function"
replicas = 2
"""


def real(args) -> dict:
    """The same three allocations with real processes, over HTTP, for a short stretch of the year
    (--from-day..--to-day in --seconds): one cluster, the functions re-deployed per allocation."""
    import aiohttp

    from dmlsys.cluster.spec import load
    from dmlsys.cluster.supervisor import Supervisor
    from dmlsys.events.keys import KeyFile
    from dmlsys.events.service import keys_path

    work = Path(tempfile.mkdtemp(prefix="dmlsys-year-"))
    (work / "spec.toml").write_text(REAL_SPEC.format(store=Path(args.store).resolve(), slots=args.slots,
                                                     stable=args.stable, panic=args.stable / 10))
    key = KeyFile(keys_path(work / ".dmlsys")).add("site", "authenticated")
    span = args.to_day - args.from_day
    day = args.seconds / span
    rows_per_event = args.rows
    allocations = {"static-average": {"hotel-price": (1, 1), "fashion-mlp": (1, 1)},
                   "static-peak": {"hotel-price": (args.peak, args.peak), "fashion-mlp": (1, 1)},
                   "autoscaled": {"hotel-price": (0, args.slots), "fashion-mlp": (0, args.slots)}}
    results = []

    async def main():
        old = os.getcwd()
        os.chdir(work)
        sup = Supervisor(load(work / "spec.toml"), work / ".dmlsys")
        try:
            await sup.up()
            st = await sup.node.call("events", "events", "status", None, timeout=5)
            base = st["url"]
            rng = random.Random(args.seed)
            for name in args.configs.split(","):
                for fn, (lo, hi) in allocations[name].items():
                    await sup.node.call("events", "events", "deploy", {"model": fn, "min": lo, "max": hi}, timeout=10)
                while True:  # static: wait for the allocation; autoscaled: let the last one drain away
                    st = await sup.node.call("events", "events", "status", None, timeout=5)
                    live = {f: c["ready"] + c["starting"] + c["draining"] for f, c in st["pool"]["instances"].items()}
                    if all(live[f] == lo for f, (lo, hi) in allocations[name].items() if hi == lo or lo == 0) and \
                            all(st["pool"]["instances"][f]["starting"] == 0 for f in live):
                        break
                    await asyncio.sleep(0.5)
                res = await replay(name, base, rng, sup)
                results.append(res)
                print(f"{name}: {json.dumps({k: v for k, v in res.items() if k != 'series'})}", file=sys.stderr)
        finally:
            await sup.down()
            os.chdir(old)

    async def replay(name, base, rng, sup):
        hotel_rate = args.hotel_rate  # requests/s at load multiplier 1
        lat = {"hotel-price": [], "fashion-mlp": []}
        status = {"hotel-price": {}, "fashion-mlp": {}}
        series = {"t": [], "instances": {"hotel-price": [], "fashion-mlp": []}, "hotel_rate": []}
        inst_seconds = {"hotel-price": 0.0, "fashion-mlp": 0.0}
        images = np.zeros((1, 784)).tolist()
        headers = {"Authorization": f"Bearer {key}"}
        conn = aiohttp.TCPConnector(limit=256)
        async with aiohttp.ClientSession(connector=conn, headers=headers) as http:
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            tasks = []

            async def one(fn, body):
                t = loop.time()
                try:
                    async with http.post(f"{base}/v1/functions/{fn}:invoke", json=body) as r:
                        await r.read()
                        code = r.status
                except Exception:  # noqa: BLE001 - a connection error is a dropped request here
                    code = 599
                status[fn][code] = status[fn].get(code, 0) + 1
                if code == 200:
                    lat[fn].append(loop.time() - t)

            async def sampler():
                while True:
                    await asyncio.sleep(0.5)
                    st = await sup.node.call("events", "events", "status", None, timeout=5)
                    series["t"].append(round(loop.time() - t0, 1))
                    for f in inst_seconds:
                        c = st["pool"]["instances"][f]
                        n = c["ready"] + c["starting"] + c["draining"]
                        series["instances"][f].append(n)
                        inst_seconds[f] += 0.5 * n
                    series["hotel_rate"].append(round(hotel_rate * hotel_load(args.from_day + (loop.time() - t0) / day), 1))

            sampling = loop.create_task(sampler())
            times = sorted([(t, "hotel-price") for t in arrivals(
                lambda t: hotel_rate * hotel_load(args.from_day + t / day), args.seconds, rng, hotel_rate * 6.5)]
                + [(t, "fashion-mlp") for t in arrivals(lambda t: args.fashion_rate, args.seconds, rng, args.fashion_rate)])
            for t, fn in times:
                delay = t0 + t - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                if fn == "hotel-price":
                    body = {"instances": hotel.bookings(rows_per_event, rng.randrange(1 << 30)).tolist()}
                else:
                    body = {"instances": images}
                tasks.append(loop.create_task(one(fn, body)))
            await asyncio.gather(*tasks)
            sampling.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampling
        rows = []
        for fn in lat:
            xs = lat[fn]
            n = sum(status[fn].values())
            rows.append({"config": name, "function": fn, "events": n, "ok": status[fn].get(200, 0),
                         "r429": status[fn].get(429, 0), "dropped": n - status[fn].get(200, 0) - status[fn].get(429, 0),
                         "p50_ms": round(1e3 * float(np.percentile(xs, 50)), 1) if xs else None,
                         "p99_ms": round(1e3 * float(np.percentile(xs, 99)), 1) if xs else None,
                         "instance_seconds": round(inst_seconds[fn], 1), "utilization": None, "cold_starts": None})
        return {"config": name, "rows": rows, "series": series}

    asyncio.run(main())
    return {"args": vars(args), "configs": results, "rows": [r for c in results for r in c["rows"]]}


# ---------------------------------------------------------------------------------------- output

def table_year(doc: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"A compressed year ({doc['args']['day']} s per day), simulated network, calibrated service times")
    for c in ("config", "function", "events", "ok", "429", "dropped", "p50 ms", "p99 ms", "instance-s", "utilization",
              "cold starts"):
        t.add_column(c, justify="left" if c in ("config", "function") else "right")
    for r in doc["rows"]:
        t.add_row(r["config"], r["function"], f"{r['events']:,}", f"{r['ok']:,}", f"{r['r429']:,}", f"{r['dropped']:,}",
                  str(r["p50_ms"]), str(r["p99_ms"]), f"{r['instance_seconds']:,.0f}",
                  f"{r['utilization']:.0%}" if r["utilization"] is not None else "-", str(r["cold_starts"]))
    Console().print(t)


def markdown_year(doc: dict) -> str:
    lines = ["| allocation | function | events | answered | 429 | dropped | p50 ms | p99 ms | instance-s | utilization |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in doc["rows"]:
        util = f"{r['utilization']:.0%}" if r["utilization"] is not None else "-"
        lines.append(f"| {r['config']} | {r['function']} | {r['events']:,} | {r['ok']:,} | {r['r429']:,} | "
                     f"{r['dropped']:,} | {r['p50_ms']} | {r['p99_ms']} | {r['instance_seconds']:,.0f} | {util} |")
    return "\n".join(lines)


def plot_year(doc: dict, path: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _plot import _pyplot, _save

    plt = _pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(4, 1, figsize=(10, 11), sharex=True)
    colors = {"static-average": "#ff7f0e", "static-peak": "#7f7f7f", "autoscaled": "#1f77b4"}
    first = doc["configs"][0]["series"]
    x = first["t_days"]
    ax = axes[0]
    ax.plot(x, first["arrivals_per_s"]["hotel"], label="hotel-price requests/s", color="#2ca02c")
    ax.plot(x, first["arrivals_per_s"]["fashion"], label="classifier requests/s", color="#9467bd")
    for d, what in ((THANKSGIVING, "Thanksgiving"), (CHRISTMAS, "Christmas"), (CONFERENCE, "conference")):
        ax.axvline(d, color="#999", lw=0.8, ls=":")
        ax.text(d, ax.get_ylim()[1] * 0.9 if ax.get_ylim()[1] else 1, what, fontsize=8, ha="right", rotation=90)
    ax.set_ylabel("requests/s")
    ax.legend(loc="upper left")
    for c in doc["configs"]:
        s = c["series"]
        total = [sum(s["instances"][f][i] for f in ("hotel", "fashion")) for i in range(len(x))]
        axes[1].plot(x, total, label=c["config"], color=colors[c["config"]])
        if c["config"] == "autoscaled":
            axes[1].plot(x, [s["instances"]["batch"][i] + total[i] for i in range(len(x))], color=colors["autoscaled"],
                         ls="--", lw=0.8, label="autoscaled + batch step")
        axes[2].plot(x, [v if v is not None else float("nan") for v in s["p99_ms"]["hotel"]], color=colors[c["config"]],
                     label=c["config"])
        axes[3].plot(x, [s["r429"]["hotel"][i] + s["dropped"]["hotel"][i] for i in range(len(x))],
                     color=colors[c["config"]], label=c["config"])
    axes[1].set_ylabel("instances (serving)")
    axes[1].legend(loc="upper left")
    axes[2].set_ylabel("hotel p99 ms")
    axes[2].set_yscale("log")
    axes[3].set_ylabel("hotel 429 + dropped")
    axes[3].set_yscale("symlog")
    axes[3].set_xlabel("day of the (compressed) year")
    fig.suptitle("Hotel-price + classifier functions: static allocations vs the autoscaled shared pool")
    _save(plt, fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    y = sub.add_parser("year")
    y.add_argument("--day", type=float, default=2.0, help="virtual seconds per day (default 2)")
    y.add_argument("--hotel-ms", type=float, default=8.0, help="service time of a hotel-price event (measured)")
    y.add_argument("--fashion-ms", type=float, default=5.0, help="service time of a classifier event (measured)")
    y.add_argument("--batch-ms", type=float, default=200.0, help="service time of a batch-step chunk")
    y.add_argument("--hotel-load", type=float, default=0.6, help="hotel traffic at multiplier 1, in instances")
    y.add_argument("--fashion-load", type=float, default=0.4, help="classifier traffic, in instances")
    y.add_argument("--utilization", type=float, default=0.7, help="what static-peak sizing aims at, at the peak")
    y.add_argument("--cold-start", type=float, default=0.6, help="seconds from a start to ready (measured)")
    y.add_argument("--stable", type=float, default=6.0, help="KPA stable window (panic: a tenth)")
    y.add_argument("--target", type=float, default=1.0, help="events in flight per instance the autoscaler aims at")
    y.add_argument("--slots", type=int, default=6, help="the shared pool's slots (autoscaled)")
    y.add_argument("--batch-workers", type=int, default=3, help="the batch step's parallelism (autoscaled only)")
    y.add_argument("--queue", type=int, default=64, help="the gate's queue per function")
    y.add_argument("--deadline", type=float, default=5.0, help="seconds an event may take before it is dropped")
    y.add_argument("--sample-days", type=float, default=1.0)
    y.add_argument("--seed", type=int, default=0)
    y.add_argument("--configs", default="static-average,static-peak,autoscaled")
    y.add_argument("--json")
    y.add_argument("--plot")
    y.add_argument("--from-json")
    h = sub.add_parser("train-hotel", help="train the hotel-price regressor into a model store")
    h.add_argument("--store", default=".dmlsys/models")
    h.add_argument("--steps", type=int, default=1500)
    r = sub.add_parser("real", help="a short stretch of the year with real processes over HTTP")
    r.add_argument("--store", required=True, help="a model store with fashion-mlp and hotel-price (train-hotel)")
    r.add_argument("--from-day", type=float, default=318.0)
    r.add_argument("--to-day", type=float, default=365.0)
    r.add_argument("--seconds", type=float, default=60.0, help="wall seconds the stretch is replayed in")
    r.add_argument("--hotel-rate", type=float, default=25.0, help="hotel requests/s at load multiplier 1")
    r.add_argument("--fashion-rate", type=float, default=10.0)
    r.add_argument("--rows", type=int, default=64, help="bookings priced per hotel request")
    r.add_argument("--slots", type=int, default=4)
    r.add_argument("--peak", type=int, default=3, help="hotel instances of static-peak")
    r.add_argument("--stable", type=float, default=6.0)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--configs", default="static-average,static-peak,autoscaled")
    r.add_argument("--json")
    c = sub.add_parser("cold-start")
    c.add_argument("--reps", type=int, default=5)
    c.add_argument("--store", help="a model store holding fashion-mlp (default: a random one in a temp dir)")
    c.add_argument("--parts", default="replica,function,no-spare")
    c.add_argument("--json")
    args = ap.parse_args()
    import logging

    logging.basicConfig(level=logging.ERROR)  # the pool logs each start cancelled by a scale-down: routine here

    if args.cmd == "train-hotel":
        from dmlsys.train.store import ModelStore

        t = time.perf_counter()
        params, card = hotel.train(steps=args.steps)
        version = ModelStore(args.store).save("hotel-price", params, card)
        print(f"hotel-price v{version} in {args.store}: held-out MAE {card['val_mae']:.2f} "
              f"({card['val_mape']:.1%} of the price), trained in {time.perf_counter() - t:.1f} s")
        return
    if args.cmd == "real":
        doc = real(args)
        if args.json:
            Path(args.json).write_text(json.dumps(doc))
        print(markdown_year(doc))
        return
    if args.cmd == "cold-start":
        res = cold_start(args)
        summary = {}
        for k in ("function", "function_no_spare"):
            xs = [r["first_answer_s"] for r in res[k]]
            if xs:
                summary[k] = {"median_first_answer_s": statistics.median(xs), "max_first_answer_s": max(xs), "n": len(xs)}
        for mode in ("off", "cache") if res["replica"] else ():
            xs = [r["total_s"] for r in res["replica"] if r["mode"] == mode]
            ls = [r["load_s"] for r in res["replica"] if r["mode"] == mode]
            summary[f"replica_{mode}"] = {"median_total_s": statistics.median(xs), "median_load_s": statistics.median(ls)}
        res["summary"] = summary
        print(json.dumps(summary, indent=2))
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=2))
        return

    if args.from_json:
        doc = json.loads(Path(args.from_json).read_text())
    else:
        configs = [run_config(n, args, args.seed) for n in args.configs.split(",")]
        for c in configs:
            print(f"{c['config']}: simulated in {c['wall_s']} s", file=sys.stderr)
        doc = {"args": vars(args), "configs": configs, "rows": [r for c in configs for r in c["rows"]]}
        if args.json:
            Path(args.json).write_text(json.dumps(doc))
    table_year(doc)
    print(markdown_year(doc))
    path = Path(args.plot) if args.plot else (Path(args.json or args.from_json).with_suffix(".png")
                                               if (args.json or args.from_json) else None)
    if path is not None:
        plot_year(doc, path)


if __name__ == "__main__":
    main()
