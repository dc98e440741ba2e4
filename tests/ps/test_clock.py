"""The clock core against random interleavings of workers reading and pushing: the staleness
bound of SSP, the exact step of BSP, ASP never waiting on others, dead workers dropped, and no
read left parked once it may go; ``peek_push`` / ``peek_drop`` (asked by the shard before it
moves the clock) agree with the event that follows."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dmlsys.ps.clock import ASP, BSP, Clock, Consistency, ssp
from dmlsys.ps.errors import PsError, WorkerDropped

MODELS = st.one_of(st.just(BSP), st.just(ASP), st.integers(0, 4).map(ssp))


def simulate(consistency: Consistency, workers: int, steps: int, seed: int, drops: int = 0):
    """Run ``workers`` workers for ``steps`` steps each, in an order drawn from ``seed``: a
    worker reads at its clock (parked until released), then pushes. Up to ``drops`` workers die
    at random moments and are dropped. Returns the log of answered reads and what each saw."""
    rng = random.Random(seed)
    names = [f"w{i}" for i in range(workers)]
    clock = Clock(names, consistency)
    step = {w: 0 for w in names}
    phase = {w: "read" for w in names}  # read -> (parked) -> compute -> read ...
    dead: set[str] = set()
    applied: set[tuple[str, int]] = set()  # (worker, step) whose update is in the parameters
    pending: dict[int, set[str]] = {}  # BSP: pushed but not applied, by step
    reads: list[tuple[str, int, frozenset]] = []

    def apply(tick):
        for t in tick.completed:
            applied.update((w, t) for w in pending.pop(t, set()))
        for token in tick.released:
            if token not in dead:
                answer(token)

    def answer(w):
        reads.append((w, step[w], frozenset(applied)))
        phase[w] = "compute"

    while True:
        runnable = [w for w in names if w not in dead and phase[w] in ("read", "compute") and step[w] < steps]
        if not runnable:
            break
        w = rng.choice(runnable)
        if drops and rng.random() < 0.05 and len(dead) < drops:
            dead.add(w)
            peeked = clock.peek_drop(w)  # what the shard computes before it moves the clock
            tick = clock.drop(w)
            assert peeked.completed == tick.completed and not peeked.released
            apply(tick)
            continue
        if phase[w] == "read":
            if clock.read(w, step[w], token=w):
                answer(w)
            else:
                phase[w] = "parked"
        else:
            peeked = clock.peek_push(w, step[w])
            tick = clock.push(w, step[w])
            assert (peeked.completed, peeked.duplicate) == (tick.completed, tick.duplicate)
            assert clock.peek_push(w, step[w]).duplicate  # a retry of it now
            if consistency.aggregates:
                pending.setdefault(step[w], set()).add(w)
            else:
                applied.add((w, step[w]))
            step[w] += 1
            phase[w] = "read"
            apply(tick)
        for other in names:  # nothing that may read is left parked
            if phase[other] == "parked" and other not in dead:
                assert not clock.may_read(other, step[other]), (other, step[other])
        live = [x for x in names if x not in dead]
        if live and consistency.bound is not None:
            assert max(step[x] for x in live) - min(step[x] for x in live) <= consistency.bound + 1
    return names, dead, step, reads


@settings(max_examples=300, deadline=None)
@given(consistency=MODELS, workers=st.integers(1, 6), steps=st.integers(1, 12), seed=st.integers(0, 2**32),
       drops=st.integers(0, 2))
def test_no_read_at_clock_c_misses_an_update_older_than_c_minus_s(consistency, workers, steps, seed, drops):
    names, dead, _, reads = simulate(consistency, workers, steps, seed, drops)
    s = consistency.bound
    for w, c, seen in reads:
        if s is None:
            assert all((w, t) in seen for t in range(c))  # ASP still reads its own writes
            continue
        for u in names:
            if u in dead:
                continue
            for t in range(c - s):
                assert (u, t) in seen, f"{w} read at {c} without {u}'s step {t} (staleness {s})"


@settings(max_examples=200, deadline=None)
@given(workers=st.integers(1, 6), steps=st.integers(1, 10), seed=st.integers(0, 2**32))
def test_under_bsp_a_read_at_c_sees_exactly_the_steps_below_c(workers, steps, seed):
    names, _, _, reads = simulate(BSP, workers, steps, seed)
    for w, c, seen in reads:
        assert seen == {(u, t) for u in names for t in range(c)}


@settings(max_examples=200, deadline=None)
@given(consistency=MODELS, workers=st.integers(1, 6), steps=st.integers(1, 10), seed=st.integers(0, 2**32),
       drops=st.integers(0, 3))
def test_every_worker_that_is_not_dropped_finishes(consistency, workers, steps, seed, drops):
    names, dead, step, _ = simulate(consistency, workers, steps, seed, drops)
    assert all(step[w] == steps for w in names if w not in dead)


def test_asp_answers_a_read_while_another_worker_has_not_pushed_anything():
    clock = Clock(["fast", "stalled"], ASP)
    for t in range(50):
        assert clock.read("fast", t, token=t)
        clock.push("fast", t)
    assert clock.floor == 0


def test_ssp_parks_the_reader_s_plus_one_ahead_and_a_push_by_the_slowest_releases_it():
    clock = Clock(["a", "b"], ssp(2))
    for t in range(3):
        assert clock.read("a", t, token=("a", t))
        clock.push("a", t)
    assert not clock.read("a", 3, token="x")  # b is at 0: 3 - 2 > 0
    tick = clock.push("b", 0)
    assert tick.released == ("x",) and tick.completed == (0,)


def test_bsp_completes_a_step_once_when_the_last_worker_pushes_it():
    clock = Clock(["a", "b", "c"], BSP)
    assert clock.push("a", 0).completed == ()
    assert clock.push("c", 0).completed == ()
    assert clock.push("b", 0).completed == (0,)
    assert clock.push("b", 0).duplicate  # a retried push is recognised, not counted twice


def test_a_silent_worker_is_named_a_laggard_after_the_timeout_and_dropping_it_completes_the_step():
    clock = Clock(["a", "dead"], BSP, now=0.0)
    clock.push("a", 0, now=1.0)
    assert not clock.read("a", 1, token="r", now=1.0)
    assert clock.laggards(now=5.0, timeout=10.0) == []
    assert clock.laggards(now=11.0, timeout=10.0) == ["dead"]
    tick = clock.drop("dead")
    assert tick.completed == (0,) and tick.released == ("r",)
    with pytest.raises(WorkerDropped, match="'dead' was dropped from the barrier at clock 0"):
        clock.push("dead", 0)


def test_a_push_that_skips_a_step_is_refused_naming_the_worker_and_step():
    clock = Clock(["a"], ASP)
    with pytest.raises(PsError, match="worker 'a' pushed step 2"):
        clock.push("a", 2)


def test_the_durable_form_round_trips():
    clock = Clock(["a", "b"], ssp(1))
    clock.push("a", 0)
    clock.drop("b")
    again = Clock.from_dict(clock.to_dict())
    assert again.clocks == clock.clocks and again.dropped == clock.dropped
    assert again.consistency == clock.consistency


def test_bad_consistency_is_refused_with_what_to_do():
    with pytest.raises(PsError, match="use model 'ssp'"):
        Consistency("bsp", 2)
    with pytest.raises(PsError, match="one of bsp, ssp, asp"):
        Consistency("eventual")


def test_a_read_with_at_least_waits_for_every_live_worker_whatever_the_model():
    clock = Clock(["a", "b"], ASP)
    for t in range(3):
        clock.push("a", t)
    assert not clock.read("a", 3, token="final", at_least=3)
    clock.push("b", 0)
    clock.push("b", 1)
    assert clock.push("b", 2).released == ("final",)
