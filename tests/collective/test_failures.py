"""Failure is loud and bounded: a crashed or absent rank, or ranks that disagree, make every
surviving rank raise ``CollectiveError`` within the group's timeout (virtual time)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dmlsys.collective import CollectiveError
from tests.collective.helpers import run_groups

TIMEOUT = 30.0


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 8), victim=st.integers(0, 7), when=st.floats(0.0, 1.0), length=st.integers(1, 2000),
       seed=st.integers(0, 2**16))
def test_a_rank_crashed_at_any_point_makes_every_other_rank_raise_naming_it_within_the_timeout(
        n, victim, when, length, seed):
    """Ranks allreduce in a loop (as training does) and one dies at a random moment. Every
    result returned before the error is the right one; then every survivor raises, naming
    the dead rank, no later than the timeout after the pass it was in began."""
    victim %= n

    async def body(sg):
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await sg.each(lambda g: g.allreduce(np.ones(length), "sum"))  # one clean pass: how long?
        crash_at = loop.time() + when * 3 * (loop.time() - t0)
        loop.call_at(crash_at, sg.crash, victim)

        async def train(g):
            for i in range(10_000):
                started = loop.time()
                try:
                    got = await g.allreduce(np.full(length, i + g.rank, np.float64), "sum")
                except CollectiveError as e:
                    return e, started, loop.time()
                assert np.array_equal(got, np.full(length, n * i + n * (n - 1) / 2)), f"rank {g.rank}, pass {i}"
            raise AssertionError("the crash never stopped the loop")

        survivors = [g for g in sg.groups if g.rank != victim]
        outcome = await asyncio.gather(*(train(g) for g in survivors))
        return crash_at, outcome

    crash_at, outcome = run_groups(n, body, seed=seed, timeout=TIMEOUT, chunk_bytes=4096)
    for error, started, raised in outcome:
        assert error.missing == [victim], str(error)
        assert f"w{victim}" in str(error)
        assert raised - started <= TIMEOUT + 1e-6, (started, raised)
        assert raised >= crash_at


def test_a_rank_that_never_calls_makes_the_others_raise_within_the_timeout():
    """An alive rank that never joins the collective: every caller raises within the timeout,
    and the rank right after the absent one names it."""
    n, absent = 4, 1

    async def body(sg):
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        present = [g for g in sg.groups if g.rank != absent]
        results = await asyncio.gather(*(g.allreduce(np.ones(10)) for g in present), return_exceptions=True)
        return results, loop.time() - t0

    results, elapsed = run_groups(n, body, timeout=5.0)
    assert elapsed <= 5.0 + 1e-6
    assert all(isinstance(r, CollectiveError) for r in results), results
    after_absent = results[absent]  # rank absent+1 is at index `absent` among the present ranks
    assert absent in after_absent.missing and "alive" in str(after_absent)


@pytest.mark.parametrize("case", [
    pytest.param(lambda g: g.allreduce(np.ones(6, np.float32), "max" if g.rank == 2 else "sum"), id="op"),
    pytest.param(lambda g: g.allreduce(np.ones(6, np.float64 if g.rank == 1 else np.float32)), id="dtype"),
    pytest.param(lambda g: g.allreduce(np.ones(7 if g.rank == 0 else 6, np.float32)), id="size"),
    pytest.param(lambda g: g.allreduce(np.ones((2, 3) if g.rank == 0 else (3, 2), np.float32)), id="shape"),
    pytest.param(lambda g: g.allreduce({"a": np.ones(2), "b": np.ones(4)} if g.rank == 1
                                       else {"a": np.ones(4), "b": np.ones(2)}), id="tree-layout"),
    pytest.param(lambda g: g.allgather(np.ones(3, np.int32 if g.rank else np.int64)), id="allgather-dtype"),
    pytest.param(lambda g: g.barrier() if g.rank == 1 else g.allreduce(np.ones(1, np.uint8)), id="kind"),
])
def test_ranks_that_disagree_all_raise_a_clear_error(case):
    async def body(sg):
        return await sg.each(case)

    results = run_groups(3, body, timeout=TIMEOUT)
    for rank, r in enumerate(results):
        assert isinstance(r, CollectiveError), f"rank {rank} returned {r!r}"
        assert "disagree" in str(r), str(r)


def test_after_a_failed_pass_the_group_still_works_for_the_next_one():
    """A disagreement is the caller's bug, not the group's: the next matching call succeeds."""

    async def body(sg):
        first = await sg.each(lambda g: g.allreduce(np.ones(4), "max" if g.rank == 0 else "sum"))
        second = await sg.each(lambda g: g.allreduce(np.ones(4), "sum"))
        return first, second

    first, second = run_groups(3, body, timeout=TIMEOUT)
    assert all(isinstance(r, CollectiveError) for r in first)
    for r in second:
        np.testing.assert_array_equal(r, np.full(4, 3.0))


def test_a_disagreement_names_the_rank_whose_message_showed_it():
    async def body(sg):
        return await sg.each(lambda g: g.allreduce(np.ones(4), "max" if g.rank == 1 else "sum"))

    r0, r1 = run_groups(2, body, timeout=TIMEOUT)
    assert "rank 1 (w1) called allreduce(max" in str(r0), str(r0)
    assert "rank 0 (w0) called allreduce(sum" in str(r1), str(r1)


def test_closing_a_group_fails_its_pass_in_progress_at_once_and_later_calls_too():
    async def body(sg):
        loop = asyncio.get_running_loop()
        g0 = sg.groups[0]
        waiting = asyncio.ensure_future(g0.allreduce(np.ones(10)))  # rank 1 never joins
        await asyncio.sleep(1.0)
        t0 = loop.time()
        g0.close()
        first = await asyncio.gather(waiting, return_exceptions=True)
        later = await asyncio.gather(g0.allreduce(np.ones(10)), return_exceptions=True)
        return first[0], later[0], loop.time() - t0

    first, later, elapsed = run_groups(2, body, timeout=TIMEOUT)
    assert isinstance(first, CollectiveError) and "closed" in str(first), first
    assert isinstance(later, CollectiveError) and "closed" in str(later), later
    assert elapsed < 1.0


def test_a_rank_the_supervisor_reports_dead_fails_the_pass_at_once_naming_it():
    """With a supervisor in the cluster, a rank's death is news at once (node.peer_lost): the
    survivors raise naming it well before the group's timeout."""
    from dmlsys.collective import CollectiveService, ProcessGroup
    from dmlsys.node import Directory, Node
    from dmlsys.wire import sim
    from dmlsys.wire.sim import SimNetwork

    async def main():
        loop = asyncio.get_running_loop()
        net = SimNetwork(3)
        names = ["w0", "w1", "w2"]
        nodes = [Node(n, net.transport(n), admin=None, directory=Directory(supervisor="supervisor")) for n in names]
        sup = Node("supervisor", net.transport("supervisor"), admin=None)
        for node in nodes:
            node.add_service(CollectiveService())
            await node.start()
        await sup.start()
        try:
            groups = [ProcessGroup(node, names, timeout=TIMEOUT) for node in nodes]
            t0 = loop.time()
            waiting = [asyncio.ensure_future(g.allreduce(np.ones(1000))) for g in groups[:2]]  # w2 is dead
            await asyncio.sleep(0.5)
            net.crash("w2")
            nodes[2].kill()
            for name in names[:2]:
                sup.send(name, "node", "peer_lost", {"name": "w2", "reason": "exited with code -9"})
            results = await asyncio.gather(*waiting, return_exceptions=True)
            return results, loop.time() - t0
        finally:
            for node in [*nodes, sup]:
                await node.stop(drain_timeout=0.1)

    results, elapsed = sim.run(main())
    assert elapsed < 2.0, elapsed
    for r in results:
        assert isinstance(r, CollectiveError) and r.missing == [2], r
        assert "rank 2 (w2) exited with code -9" in str(r) or "aborted by" in str(r), str(r)
