"""Admission: slots in arrival order, a bounded queue, and a request never left holding a slot."""

import asyncio
import random

import pytest

from dmlsys.serving.admission import Admission
from dmlsys.serving.errors import DeadlineExceeded, NoReplicaReady, Overloaded
from dmlsys.serving.policies import Pool
from dmlsys.wire import sim


def one_replica_pool(max_in_flight: int = 1) -> Pool:
    pool = Pool("m", max_in_flight=max_in_flight)
    pool.set_members(["r0"])
    pool.observe("r0", ready=True, serving=True)
    return pool


def test_waiters_get_slots_in_arrival_order_and_one_more_is_refused_overloaded():
    async def scenario():
        pool, adm = one_replica_pool(), Admission(max_queue=3, rng=random.Random(0))
        loop = asyncio.get_running_loop()
        first = adm.try_acquire(pool, loop.time(), None, [])
        assert first is not None and adm.try_acquire(pool, loop.time(), None, []) is None
        order = []

        async def waiter(i):
            r = await adm.acquire(pool, loop.time() + 10, None, [])
            order.append(i)
            await asyncio.sleep(0.01)
            adm.release(pool, r)

        tasks = [loop.create_task(waiter(i)) for i in range(3)]
        await asyncio.sleep(0)
        assert adm.queued("m") == 3
        with pytest.raises(Overloaded, match="3 requests already wait"):
            await adm.acquire(pool, loop.time() + 10, None, [])
        adm.release(pool, first)
        await asyncio.gather(*tasks)
        assert order == [0, 1, 2] and pool.replicas["r0"].in_flight == 0 and adm.queued("m") == 0

    sim.run(scenario())


def test_a_waiter_whose_deadline_passes_leaves_the_queue_with_504():
    async def scenario():
        pool, adm = one_replica_pool(), Admission(max_queue=8)
        loop = asyncio.get_running_loop()
        held = adm.try_acquire(pool, loop.time(), None, [])
        with pytest.raises(DeadlineExceeded):
            await adm.acquire(pool, loop.time() + 0.5, None, [])
        assert adm.queued("m") == 0 and pool.replicas["r0"].in_flight == 1
        adm.release(pool, held)

    sim.run(scenario())


def test_no_ready_replica_is_refused_at_once_and_a_retry_may_reuse_the_replica_it_tried():
    async def scenario():
        pool, adm = one_replica_pool(max_in_flight=4), Admission()
        loop = asyncio.get_running_loop()
        r = adm.try_acquire(pool, loop.time(), None, ["r0"])  # only the tried one left: better than none
        assert r is not None and r.name == "r0"
        adm.release(pool, r)
        pool.observe("r0", ready=False, serving=False)
        with pytest.raises(NoReplicaReady, match="r0 not ready"):
            await adm.acquire(pool, loop.time() + 10, None, [])
        assert adm.refused == 1

    sim.run(scenario())
