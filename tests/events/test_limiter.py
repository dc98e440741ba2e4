"""The limiter core: the sliding-window bound, exact Retry-After, concurrency caps, lossless eviction."""

import copy
import math
from fractions import Fraction

import pytest
from hypothesis import given, settings, strategies as st

from dmlsys.events.limiter import Limiter, expiry_of
from dmlsys.events.tiers import Concurrency, Principals, Rate, Tier, TierError

FAST = settings(max_examples=150, deadline=None)

# Periods and offsets chosen to make float rounding bite: 0.1 + 1.0 is not 1.1, 1e6 + 0.3 loses bits.
periods = st.sampled_from([0.1, 0.3, 1.0, 1.7, 2.5, 3.0])
offsets = st.sampled_from([0.0, 0.1, 1e6 + 0.3, 12345.678])
rates = st.builds(lambda n, p, g: Rate(n, p, None if g is None else min(g, p)),
                  st.integers(1, 5), periods, st.sampled_from([None, 0.0, 0.05, 0.25]))
steps = st.lists(st.tuples(st.sampled_from([0.0, 0.0, 0.01, 0.1, 0.3, 0.7, 1.0, 1.3, -0.2]),
                           st.integers(0, 2)), min_size=1, max_size=80)


def tier_of(rs, **kw):
    policy = Concurrency(**kw) if kw else Concurrency()
    for r in rs:
        policy = policy + r
    return Tier("t", policy)


def clock(offset, deltas):
    """Absolute times from deltas; negative deltas make the clock step back (the limiter clamps)."""
    t, out = offset, []
    for d in deltas:
        t += d
        out.append(t)
    return out


def max_in_window(times: list[float], period: float) -> int:
    """Exact (rational) maximum number of times in any half-open window [s, s + period)."""
    xs = sorted(Fraction(t) for t in times)
    p, best, j = Fraction(period), 0, 0
    for i, a in enumerate(xs):
        j = max(j, i)
        while j < len(xs) and xs[j] < a + p:
            j += 1
        best = max(best, j - i)
    return best


@FAST
@given(st.floats(-1e9, 1e9, allow_nan=False), st.floats(1e-6, 1e6, allow_nan=False),
       st.sampled_from([0.0, 0.0, 0.01, 0.3]))
def test_expiry_is_the_first_float_at_or_after_the_exact_sum(a, p, grain):
    e = expiry_of(a, p, grain)
    assert Fraction(e) >= Fraction(a) + Fraction(p)
    if grain == 0.0:
        assert Fraction(math.nextafter(e, -math.inf)) < Fraction(a) + Fraction(p)


@FAST
@given(st.lists(rates, min_size=1, max_size=2), offsets, steps)
def test_no_window_of_any_rate_ever_holds_more_than_its_limit(rs, offset, seq):
    tier = tier_of(rs)
    lim = Limiter([tier])
    admitted: dict[str, list[float]] = {}
    seen = -math.inf
    for now, (d, who) in zip(clock(offset, [d for d, _ in seq]), seq):
        seen = max(seen, now)  # the time the limiter decides at: the clock clamped to never go back
        key = f"p{who}"
        if lim.admit("t", key, now):
            admitted.setdefault(key, []).append(seen)
    for times in admitted.values():
        for r in tier.policy.rates:
            assert max_in_window(times, r.period) <= r.limit


@FAST
@given(st.lists(rates, min_size=1, max_size=2), offsets, steps)
def test_retry_after_is_never_early_and_an_admission_at_it_succeeds(rs, offset, seq):
    lim = Limiter([tier_of(rs)])
    for now, (d, who) in zip(clock(offset, [d for d, _ in seq]), seq):
        key = f"p{who}"
        if lim.admit("t", key, now):
            continue
        at = lim.retry_after("t", key, now)
        assert at >= now
        decided = max(now, lim._now)  # the clamped clock the refusal was decided at
        for probe in (decided, (decided + at) / 2, math.nextafter(at, -math.inf)):
            if decided <= probe < at:  # still refused before it (on a copy: a probe moves the clock)
                assert not copy.deepcopy(lim).admit("t", key, probe)
        at_copy = copy.deepcopy(lim)
        assert at_copy.admit("t", key, at), "an admission at retry_after must succeed when nothing intervened"


@FAST
@given(st.integers(1, 3), st.one_of(st.none(), st.integers(1, 5)),
       st.lists(st.tuples(st.booleans(), st.integers(0, 3)), max_size=60))
def test_concurrency_never_exceeds_either_cap_and_is_refused_only_at_a_cap(per, total, ops):
    lim = Limiter([tier_of([], per_principal=per, total=total)])
    held = {k: 0 for k in range(4)}
    for take, who in ops:
        key = f"p{who}"
        if take:
            free = held[who] < per and (total is None or sum(held.values()) < total)
            assert lim.can_acquire("t", key) == free
            assert lim.acquire("t", key, 0.0) == free
            held[who] += free
        elif held[who]:
            lim.release("t", key)
            held[who] -= 1
        assert lim.in_flight("t", key) == held[who] <= per
        assert lim.in_flight("t") == sum(held.values()) <= (total or 10**9)


def test_release_without_a_slot_is_an_error_naming_the_principal():
    lim = Limiter([tier_of([], per_principal=1)])
    with pytest.raises(TierError, match="'bob'"):
        lim.release("t", "bob")


@FAST
@given(st.lists(rates, min_size=1, max_size=2), offsets, steps)
def test_sweeping_idle_principals_never_changes_a_decision(rs, offset, seq):
    tier = tier_of(rs)
    kept, swept = Limiter([tier]), Limiter([tier])
    for now, (d, who) in zip(clock(offset, [d for d, _ in seq]), seq):
        assert kept.admit("t", f"p{who}", now) == swept.admit("t", f"p{who}", now)
        assert kept.retry_after("t", f"p{who}", now) == swept.retry_after("t", f"p{who}", now)
        swept.sweep(now)


def test_memory_is_bounded_by_the_principal_table_and_idle_principals_make_room():
    tier = Tier("t", Rate(1, 1.0) + Principals(max=10))
    lim = Limiter([tier])
    for i in range(10):
        assert lim.admit("t", f"p{i}", 0.0)
    assert not lim.admit("t", "newcomer", 0.5), "table full of non-idle principals: refuse, never evict early"
    assert lim.retry_after("t", "newcomer", 0.5) == 1.0
    assert lim.statistics().principals["t"] == 10
    for i in range(1000):  # a flood of new principals after the old ones went idle
        lim.admit("t", f"q{i}", 2.0 + i)
        assert lim.statistics().principals["t"] <= 10
    assert lim.statistics().evicted >= 990


def test_an_unknown_tier_is_named_with_the_known_ones():
    lim = Limiter([tier_of([Rate(1, 1.0)])])
    with pytest.raises(TierError, match=r"unknown tier 'gold'.*configured tiers: t"):
        lim.admit("gold", "p", 0.0)


def test_a_burst_of_the_full_limit_is_admitted_then_exactly_one_per_expiry():
    lim = Limiter([Tier("t", Rate(100, 1.0))])
    assert all(lim.admit("t", "p", 5.0) for _ in range(100))
    assert not lim.admit("t", "p", 5.999)
    assert lim.retry_after("t", "p", 5.5) == 6.0
    assert lim.admit("t", "p", 6.0)  # the whole burst shared one ledger entry and expires together


@FAST
@given(st.lists(rates, min_size=1, max_size=2), offsets, steps, st.integers(1, 3))
def test_sweeping_a_budget_at_a_time_never_changes_a_decision_and_visits_everyone(rs, offset, seq, budget):
    tier = tier_of(rs)
    kept, swept = Limiter([tier]), Limiter([tier])
    now = offset
    for now, (d, who) in zip(clock(offset, [d for d, _ in seq]), seq):
        assert kept.admit("t", f"p{who}", now) == swept.admit("t", f"p{who}", now)
        swept.sweep(now, budget=budget)
    later = max(now, swept._now) + max(r.period for r in tier.policy.rates) + 1.0
    for _ in range(3):  # three principals at most: a budget of one visits all within three sweeps
        swept.sweep(later, budget=budget)
    assert swept.statistics().principals["t"] == 0
