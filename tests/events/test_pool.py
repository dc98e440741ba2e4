"""The pool core: never oversubscribed, never stops a busy instance, events go only to ready ones."""

from collections import Counter

import pytest
from hypothesis import given, settings, strategies as st

from dmlsys.events.autoscaler import FunctionSpec
from dmlsys.events.pool import DRAINING, READY, STARTING, Drain, Pool, PoolError, Start, Stop, Undrain

FAST = settings(max_examples=150, deadline=None)
SPECS = [FunctionSpec("serve", max=6, priority=10, slots=1), FunctionSpec("regress", max=6, priority=5, slots=2),
         FunctionSpec("batch", max=6, priority=0, slots=1)]

ops = st.lists(st.one_of(
    st.tuples(st.just("reconcile"), st.tuples(st.integers(0, 6), st.integers(0, 6), st.integers(0, 6))),
    st.tuples(st.just("ready"), st.integers(0, 30)),
    st.tuples(st.just("fail"), st.integers(0, 30)),
    st.tuples(st.just("begin"), st.integers(0, 2)),
    st.tuples(st.just("end"), st.integers(0, 30)),
), max_size=80)


@FAST
@given(st.integers(0, 10), ops)
def test_the_pool_is_never_oversubscribed_and_no_busy_instance_is_ever_stopped(slots, seq):
    pool = Pool(slots, SPECS)
    busy: Counter = Counter()  # our own count of events in flight per instance
    begun = ended = lost = 0
    now = 0.0
    for op, arg in seq:
        now += 0.5
        if op == "reconcile":
            target = dict(zip(("serve", "regress", "batch"), arg))
            before = {i: inst.state for i, inst in pool.instances.items()}
            for a in pool.reconcile(target, now):
                if isinstance(a, Stop):
                    assert busy[a.instance] == 0, "stopped an instance with events in flight"
                elif isinstance(a, Drain):
                    assert busy[a.instance] > 0 and before[a.instance] == READY
                elif isinstance(a, Undrain):
                    assert before[a.instance] == DRAINING
            for f in target:  # live counts never overshoot; a shortfall means no room for one more
                live = len(pool.live(f))
                assert live <= target[f]
                if live < target[f]:
                    assert pool.slots - pool.used() < pool.specs[f].slots
        elif op == "ready":
            starting = [i for i, inst in pool.instances.items() if inst.state == STARTING]
            if starting:
                assert pool.ready(starting[arg % len(starting)], now) >= 0
        elif op == "fail":
            if pool.instances:
                victim = sorted(pool.instances)[arg % len(pool.instances)]
                n = pool.failed(victim)
                assert n == busy.pop(victim, 0)
                lost += n
        elif op == "begin":
            f = SPECS[arg].name
            inst = pool.pick(f)
            if inst is not None:
                assert inst.state == READY and inst.function == f
                assert inst.in_flight == min(i.in_flight for i in pool.instances.values()
                                             if i.function == f and i.state == READY)
                pool.begin(inst.id)
                busy[inst.id] += 1
                begun += 1
        else:
            running = sorted(i for i, n in busy.items() if n)
            if running:
                i = running[arg % len(running)]
                stop = pool.end(i)
                busy[i] -= 1
                ended += 1
                assert stop is None or (stop.instance == i and busy[i] == 0)
        assert pool.used() <= slots
        for i, inst in pool.instances.items():
            assert inst.in_flight == busy[i]
    assert begun == ended + lost + sum(busy.values())  # every event is accounted for


def test_a_failed_instance_is_replaced_on_the_next_reconcile():
    pool = Pool(2, SPECS)
    (a,) = pool.reconcile({"serve": 1}, 0.0)
    assert isinstance(a, Start)
    pool.ready(a.instance, 2.5)
    assert pool.cold_starts["serve"] == [2.5]
    pool.begin(a.instance)
    assert pool.failed(a.instance) == 1  # one event to retry elsewhere
    (b,) = pool.reconcile({"serve": 1}, 3.0)
    assert isinstance(b, Start) and b.instance != a.instance


def test_low_priority_yields_slots_as_its_events_end_and_a_warm_drainer_is_taken_back():
    pool = Pool(3, SPECS)
    starts = pool.reconcile({"batch": 3}, 0.0)
    for s in starts:
        pool.ready(s.instance, 1.0)
        pool.begin(s.instance)
    actions = pool.reconcile({"serve": 2, "batch": 1}, 2.0)
    assert sorted(type(a).__name__ for a in actions) == ["Drain", "Drain"]  # busy: drained, not killed
    assert pool.pick("serve") is None  # serving waits (queued) for slots: never oversubscribed
    drained = [a.instance for a in actions]
    assert pool.end(drained[0]) == Stop(drained[0])
    assert [type(a) for a in pool.reconcile({"serve": 2, "batch": 1}, 3.0)] == [Start]
    # demand for batch returns before the other drainer finished: it is taken back warm
    assert pool.reconcile({"serve": 1, "batch": 2}, 4.0) == [Undrain(drained[1])]
    with pytest.raises(PoolError, match="is starting"):
        pool.begin(next(i for i, inst in pool.instances.items() if inst.state == STARTING))


def test_scaling_down_stops_starting_instances_first_and_drained_ones_get_no_events():
    pool = Pool(4, SPECS)
    first, second, third = (a.instance for a in pool.reconcile({"batch": 3}, 0.0))
    pool.ready(first, 1.0)
    pool.ready(second, 1.0)
    pool.begin(first)
    assert pool.reconcile({"batch": 2}, 2.0) == [Stop(third)]  # still loading: the cheapest to lose
    assert pool.reconcile({"batch": 1}, 3.0) == [Stop(second)]  # idle before busy
    assert pool.reconcile({"batch": 0}, 4.0) == [Drain(first)]
    assert pool.pick("batch") is None  # draining: no new events, even though it is the only one left
