"""The event queue core: bounds, work conservation, round-robin fairness, fair entry, bounded waits."""

from collections import Counter

import pytest
from hypothesis import given, settings, strategies as st

from dmlsys.events.limiter import Limiter
from dmlsys.events.queue import (CANCELLED, DISPLACED, DONE, EXPIRED, RUNNING, WAITING, EventQueue, Refusal,
                                 Ticket)
from dmlsys.events.tiers import Concurrency, Queue, Rate, Tier

FAST = settings(max_examples=150, deadline=None)

ops = st.lists(st.one_of(
    st.tuples(st.just("offer"), st.integers(0, 4)),       # principal p0..p4 offers an event
    st.tuples(st.just("offer"), st.just(0)),               # p0 floods: offers more often
    st.tuples(st.just("release"), st.integers(0, 50)),     # the i-th running event ends
    st.tuples(st.just("cancel"), st.integers(0, 50)),      # the i-th live event's client goes away
    st.tuples(st.just("tick"), st.sampled_from([0.1, 0.5, 2.0])),
), max_size=120)

configs = st.tuples(st.integers(1, 3), st.one_of(st.none(), st.integers(1, 6)), st.integers(0, 8),
                    st.sampled_from([None, 3, 50]))


def make(per, total, depth, rate):
    policy = Concurrency(per, total) + Queue(depth, max_wait=1.0)
    if rate:
        policy = policy + Rate(rate, 1.0)
    return EventQueue(Limiter([Tier("t", policy)]))


class Run:
    """Drives a queue through ``ops`` and checks every invariant after every step."""

    def __init__(self, q: EventQueue, per, total, depth):
        self.q, self.per, self.total, self.depth = q, per, total, depth
        self.now = 0.0
        self.tickets: list[Ticket] = []
        self.since: dict[str, Counter] = {}  # B -> grants to others since B became eligible

    def eligible(self) -> set[str]:
        lim = self.q.limiter
        return {t.principal for t in self.q.waiting_tickets("t") if lim.under_own_cap("t", t.principal)}

    def step(self, op, arg):
        before = self.eligible()
        granted: list[Ticket] = []
        if op == "offer":
            got, displaced = self.q.offer("t", f"p{arg}", self.now)
            assert all(d.state == DISPLACED for d in displaced)
            if isinstance(got, Refusal):
                if got.reason == "queue_full":
                    self.check_fair_entry(f"p{arg}")
                    self.check_retry_after(f"p{arg}", got.retry_at)
                assert got.retry_at >= self.now
            else:
                self.tickets.append(got)
                if got.state == RUNNING:
                    granted.append(got)
        elif op in ("release", "cancel"):
            pool = [t for t in self.tickets if t.state == RUNNING] if op == "release" else \
                   [t for t in self.tickets if t.state in (RUNNING, WAITING)]
            if pool:
                t = pool[arg % len(pool)]
                granted = self.q.release(t, self.now) if op == "release" else self.q.cancel(t, self.now)
        else:
            self.now += arg
            for t in self.q.expire(self.now):
                assert t.state == EXPIRED and t.deadline <= self.now
        self.check_round_robin(before, granted)
        self.check_invariants()

    def check_fair_entry(self, me: str):
        mine = self.q.waiting("t", me) + 1
        assert self.q.waiting("t") >= self.depth
        assert all(self.q.waiting("t", f"p{i}") <= mine for i in range(5)), "refused while a flooder held more"

    def check_retry_after(self, me: str, at: float):
        """A full queue's Retry-After: never before the principal's exact next rate admission;
        never after the newest waiting event's deadline (all waiting now are gone by then)."""
        exact = self.q.limiter.retry_after("t", me, self.now)
        assert at >= exact, f"retry at {at}, but {me}'s next admission is at {exact}"
        waiting = self.q.waiting_tickets("t")
        if waiting:
            assert at <= max(exact, waiting[-1].deadline)

    def check_round_robin(self, before: set[str], granted: list[Ticket]):
        for b in list(self.since):
            if b not in before:
                del self.since[b]  # B stopped waiting or hit its own cap: its turn restarts
        for b in before:
            self.since.setdefault(b, Counter())
        for t in granted:
            for b, seen in self.since.items():
                if t.principal == b:
                    seen.clear()
                else:
                    seen[t.principal] += 1
                    assert seen[t.principal] <= 1, f"{t.principal} granted twice while {b} waited its turn"

    def check_invariants(self):
        q, lim = self.q, self.q.limiter
        waiting = q.waiting_tickets("t")
        assert len(waiting) <= self.depth
        running = [t for t in self.tickets if t.state == RUNNING]
        assert len(running) == lim.in_flight("t") <= (self.total or 10**9)
        per = Counter(t.principal for t in running)
        assert all(n <= self.per for n in per.values())
        tier_room = self.total is None or lim.in_flight("t") < self.total
        for t in waiting:
            assert t.state == WAITING and t.deadline > self.now
            assert not (tier_room and lim.under_own_cap("t", t.principal)), "a slot idles while an eligible event waits"
        states = Counter(t.state for t in self.tickets)  # nothing accepted is lost
        s = q.statistics()
        assert s.accepted == len(self.tickets)
        assert states[WAITING] == len(waiting) and states[RUNNING] == len(running)
        for end in (DONE, EXPIRED, CANCELLED, DISPLACED):
            assert states[end] == s.ended[end]


@FAST
@given(configs, ops)
def test_bounds_work_conservation_round_robin_and_fair_entry_hold_after_every_step(cfg, seq):
    per, total, depth, rate = cfg
    run = Run(make(per, total, depth, rate), per, total, depth)
    for op, arg in seq:
        run.step(op, arg)


@FAST
@given(configs, ops)
def test_no_event_waits_longer_than_max_wait(cfg, seq):
    per, total, depth, rate = cfg
    run = Run(make(per, total, depth, rate), per, total, depth)
    for op, arg in seq:
        run.step(op, arg)
    run.now += 1.0
    run.q.expire(run.now)
    assert run.q.waiting("t") == 0
    for t in run.tickets:
        if t.state != WAITING and t.started is not None:
            assert t.started - t.arrived <= 1.0


def test_a_flooding_client_gets_one_turn_per_round():
    q = make(per=1, total=1, depth=20, rate=None)
    first, _ = q.offer("t", "flood", 0.0)
    for _ in range(15):
        q.offer("t", "flood", 0.0)
    for who in ("a", "b"):
        q.offer("t", who, 0.0)
    order, running = [], first
    for _ in range(6):
        (running,) = q.release(running, 1.0)
        order.append(running.principal)
    # a and b queued behind 15 of flood's events, yet each waits one turn at most
    assert order == ["a", "b", "flood", "flood", "flood", "flood"]


def test_a_full_queue_pushes_out_the_flooders_newest_event_for_a_newcomer():
    q = make(per=1, total=1, depth=4, rate=None)
    q.offer("t", "flood", 0.0)  # runs
    flood = [q.offer("t", "flood", 0.0)[0] for _ in range(4)]
    got, displaced = q.offer("t", "newcomer", 0.0)
    assert got.state == WAITING and displaced == [flood[-1]] and flood[-1].state == DISPLACED
    again, _ = q.offer("t", "flood", 0.0)
    assert isinstance(again, Refusal) and again.reason == "queue_full"


def test_no_queue_means_refuse_at_once_with_an_estimate_and_rate_refusals_are_exact():
    q = make(per=1, total=None, depth=0, rate=2)
    a, _ = q.offer("t", "p", 0.0)
    full, _ = q.offer("t", "p", 0.0)
    assert isinstance(full, Refusal) and full.reason == "queue_full" and full.retry_at > 0.0
    q.release(a, 0.1)
    q.release(q.offer("t", "p", 0.2)[0], 0.3)
    limited, _ = q.offer("t", "p", 0.4)
    assert isinstance(limited, Refusal) and limited.reason == "rate" and limited.retry_at == 1.0


def test_a_full_queue_says_retry_when_it_will_have_drained_at_its_measured_rate():
    """Two slots, events served in 0.5 s: the queue drains 4 events/s. A full queue of 4 is
    gone in 1 s: Retry-After 1 s (the old estimate, service time x (waiting + 1) / slots, said 1.25 s)."""
    q = EventQueue(Limiter([Tier("t", Concurrency(4, 2) + Queue(4, max_wait=30.0))]), drain_window=6.0)
    now, running = 0.0, []
    for k in range(2):
        running.append(q.offer("t", f"p{k}", now)[0])
    while now < 8.0:  # two newcomers every 0.25 s (8/s), each served 0.5 s: 4/s drain, queue full
        now += 0.25
        for t in [t for t in running if t.started <= now - 0.5]:
            running.remove(t)
            running += q.release(t, now)
        for k in range(2):
            got, _ = q.offer("t", f"p{k}", now)
            if not isinstance(got, Refusal) and got.state == RUNNING:
                running.append(got)
    assert q.waiting("t") == 4
    full, _ = q.offer("t", "p0", now)  # p0 has as many waiting as anyone: no push-out for it
    assert isinstance(full, Refusal) and full.reason == "queue_full"
    assert full.retry_at - now == pytest.approx(1.0, rel=0.1)


def test_a_full_queue_never_says_retry_before_the_rate_would_admit():
    q = EventQueue(Limiter([Tier("t", Concurrency(1, 1) + Queue(1, max_wait=1.0) + Rate(2, 3600.0))]))
    q.offer("t", "p", 0.0)  # runs
    q.offer("t", "p", 0.0)  # waits; p's hourly rate of 2 is used up
    full, _ = q.offer("t", "p", 0.0)
    assert isinstance(full, Refusal) and full.retry_at == pytest.approx(3600.0)  # not the queue's 1 s
    other, _ = q.offer("t", "q", 0.0)
    assert isinstance(other, Refusal) and other.reason == "queue_full" and other.retry_at <= 1.0


def test_releasing_twice_is_an_error_naming_the_event():
    q = make(per=1, total=None, depth=0, rate=None)
    t, _ = q.offer("t", "p", 0.0)
    q.release(t, 0.0)
    with pytest.raises(ValueError, match="'p'.*done"):
        q.release(t, 0.0)
