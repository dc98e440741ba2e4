"""The gate on virtual time: a flood of anonymous clients beside authenticated ones at their limit."""

import asyncio
from collections import Counter

import pytest

from dmlsys.events.errors import EventsError, QueueFull, QueueTimeout, RateLimited, Unauthorized
from dmlsys.events.gate import EventGate
from dmlsys.events.keys import KeyInfo, KeyRing, digest
from dmlsys.events.tiers import Concurrency, Queue, Rate, Tier
from dmlsys.wire import sim

KEYS = {f"k{i}": "dmk_" + chr(ord("A") + i) * 43 for i in range(3)}
RING = KeyRing({n: KeyInfo(n, "authenticated", digest(k), "2026-01-01T00:00:00Z") for n, k in KEYS.items()})
TIERS = [Tier("anonymous", Rate(20, 1.0) + Concurrency(2, total=4) + Queue(8, max_wait=2.0)),
         Tier("authenticated", Rate(10, 1.0) + Concurrency(3, total=6) + Queue(16, max_wait=2.0))]
WORK = 0.1  # seconds an event runs in the pool


class Pool:
    """Counts what runs at once, per tier."""

    def __init__(self):
        self.now = Counter()
        self.peak = Counter()
        self.done = Counter()

    async def run(self, tier):
        self.now[tier] += 1
        self.peak[tier] = max(self.peak[tier], self.now[tier])
        try:
            await asyncio.sleep(WORK)
        finally:
            self.now[tier] -= 1
        self.done[tier] += 1


def test_a_flood_of_anonymous_clients_does_not_touch_authenticated_ones():
    async def main():
        gate, pool, loop = EventGate(TIERS, RING, sweep_every=1.0), Pool(), asyncio.get_running_loop()
        outcomes = {"anonymous": Counter(), "authenticated": Counter()}
        latency = {"anonymous": [], "authenticated": []}
        waits = []
        end = 3.0

        async def one(auth, addr):
            p = gate.identify(auth, addr)
            t0 = loop.time()
            try:
                async with gate.admission(p) as ticket:
                    waits.append(loop.time() - ticket.arrived)
                    await pool.run(p.tier)
                outcomes[p.tier]["ok"] += 1
                latency[p.tier].append(loop.time() - t0)
            except EventsError as e:
                outcomes[p.tier][type(e).__name__] += 1
                assert e.status in (429, 503) and e.retry_after >= 1

        async def flooder(addr):  # closed loop, 4 at a time, never backs off
            async def loop_one():
                while loop.time() < end:
                    await one(None, addr)
                    await asyncio.sleep(0.01)
            await asyncio.gather(*(loop_one() for _ in range(4)))

        async def member(key):  # open loop at its rate limit: 10 per second
            tasks = []
            while loop.time() < end:
                tasks.append(asyncio.create_task(one(f"Bearer {key}", "10.9.9.9")))
                await asyncio.sleep(0.1 + 1e-9)
            await asyncio.gather(*tasks)

        await asyncio.gather(*(flooder(f"10.0.0.{i}") for i in range(10)), *(member(k) for k in KEYS.values()))
        return gate, pool, outcomes, latency, waits

    gate, pool, outcomes, latency, waits = sim.run(main())
    auth = outcomes["authenticated"]
    assert set(auth) == {"ok"} and auth["ok"] >= 87, auth  # zero refusals for members at their limit
    assert max(latency["authenticated"]) <= WORK + 1e-6  # never queued behind the flood
    anon = outcomes["anonymous"]
    assert anon["ok"] > 0 and anon["RateLimited"] + anon["QueueFull"] > 300, anon
    assert pool.peak["anonymous"] <= 4 and pool.peak["authenticated"] <= 6
    assert max(waits) <= 2.0
    s = gate.statistics()
    assert sum(pool.done.values()) == s["ended"]["done"] and s["waiting"] == {"anonymous": 0, "authenticated": 0}


def test_retry_after_of_a_rate_limited_client_is_when_it_gets_in():
    async def main():
        gate, loop = EventGate([Tier("anonymous", Rate(2, 5.0))]), asyncio.get_running_loop()
        p = gate.identify(None, "10.0.0.1")
        for _ in range(2):
            async with gate.admission(p):
                pass
        await asyncio.sleep(1.2)
        with pytest.raises(RateLimited) as e:
            async with gate.admission(p):
                pass
        assert e.value.retry_after == 4  # 5 s after the burst at t=0, from t=1.2: 3.8 s rounded up
        await asyncio.sleep(e.value.retry_after - 1)
        with pytest.raises(RateLimited):
            async with gate.admission(p):
                pass
        await asyncio.sleep(1)
        async with gate.admission(p):
            return loop.time()

    assert sim.run(main()) >= 5.0


def test_waiting_clients_that_go_away_or_time_out_free_their_place():
    async def main():
        tier = Tier("anonymous", Concurrency(1) + Queue(4, max_wait=1.0))
        gate, loop = EventGate([tier]), asyncio.get_running_loop()
        p = gate.identify(None, "10.0.0.1")
        release = asyncio.Event()

        async def hold():
            async with gate.admission(p):
                await release.wait()

        async def wait_one():
            async with gate.admission(p):
                return loop.time()

        holder = asyncio.create_task(hold())
        await asyncio.sleep(0)
        quitter = asyncio.create_task(wait_one())
        patient = asyncio.create_task(wait_one())
        await asyncio.sleep(0.2)
        quitter.cancel()
        await asyncio.sleep(0.1)
        assert gate.queue.waiting("anonymous") == 1
        release.set()
        assert await patient == pytest.approx(0.3)
        await holder
        release.clear()
        holder = asyncio.create_task(hold())
        await asyncio.sleep(0)
        with pytest.raises(QueueTimeout):
            await wait_one()
        release.set()
        await holder
        return gate.statistics()

    s = sim.run(main())
    assert s["ended"] == {"done": 3, "expired": 1, "cancelled": 1, "displaced": 0}
    assert s["running"] == {"anonymous": 0}


def test_a_full_queue_is_429_and_a_bad_key_is_401():
    async def main():
        gate = EventGate([Tier("anonymous", Concurrency(1) + Queue(0))], RING)
        with pytest.raises(Unauthorized, match="tier 'authenticated'"):
            gate.identify(f"Bearer {KEYS['k0']}", None)  # a key of a tier this door does not configure
        with pytest.raises(Unauthorized):
            gate.identify("Bearer dmk_" + "Z" * 43, None)
        p = gate.identify(None, "10.0.0.1")
        async with gate.admission(p):
            with pytest.raises(QueueFull) as e:
                async with gate.admission(p):
                    pass
            assert e.value.status == 429 and e.value.retry_after >= 1

    sim.run(main())
