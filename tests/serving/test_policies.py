"""The balancer's pure core: what every policy may pick, fairness, least load, ejection backoff."""

import random

import pytest
from hypothesis import given, settings, strategies as st

from dmlsys.serving.policies import (POLICIES, ConsistentHash, EjectionConfig, LeastConnections, Pool, RoundRobin,
                                     make_policy)

FAST = settings(max_examples=60, deadline=None)

replica_state = st.fixed_dictionaries({
    "ready": st.booleans(), "draining": st.booleans(), "in_flight": st.integers(0, 5),
    "ejected_for": st.sampled_from([0.0, 0.0, 5.0]), "serving": st.booleans(),
})


def pool_from(states, policy, limit=4):
    pool = Pool("m", make_policy(policy), max_in_flight=limit)
    pool.set_members(f"r{i}" for i in range(len(states)))
    for i, s in enumerate(states):
        r = pool.replicas[f"r{i}"]
        r.ready, r.draining, r.in_flight, r.serving = s["ready"], s["draining"], s["in_flight"], s["serving"]
        r.ejected_until = 100.0 + s["ejected_for"]
    return pool


@FAST
@given(st.lists(replica_state, min_size=1, max_size=6), st.sampled_from(sorted(POLICIES)),
       st.one_of(st.none(), st.text(max_size=5)), st.integers(0, 2**32))
def test_every_policy_picks_only_ready_unejected_replicas_under_their_limit(states, policy, key, seed):
    pool = pool_from(states, policy)
    now = 100.0
    pick = pool.pick(now, random.Random(seed), key)
    ok = [r for r in pool.replicas.values()
          if r.ready and not r.draining and not r.ejected(now) and r.in_flight < pool.max_in_flight]
    if ok:
        assert pick in ok
    elif any(r.ready for r in pool.replicas.values()):
        assert pick is None  # ready ones exist but are full, draining or ejected: queue or 503
    else:  # degraded: only replicas still answering (reloading) and otherwise eligible
        assert pick is None or (pick.serving and not pick.draining and not pick.ejected(now)
                                and pick.in_flight < pool.max_in_flight)


@FAST
@given(st.integers(1, 7), st.integers(0, 60), st.integers(0, 6))
def test_round_robin_is_fair_over_any_run_of_picks(n, picks, warmup):
    pool = pool_from([{"ready": True, "draining": False, "in_flight": 0, "ejected_for": 0.0, "serving": True}] * n,
                     RoundRobin.name, limit=1000)
    rng = random.Random(0)
    for _ in range(warmup):  # fairness holds from any starting point, not only from a fresh policy
        pool.pick(100.0, rng)
    counts = {name: 0 for name in pool.replicas}
    for _ in range(picks):
        counts[pool.pick(100.0, rng).name] += 1
    assert max(counts.values()) - min(counts.values()) <= 1


@FAST
@given(st.lists(replica_state, min_size=1, max_size=6), st.integers(0, 2**32))
def test_least_connections_never_picks_a_busier_replica_than_another_ready_one(states, seed):
    pool = pool_from(states, LeastConnections.name, limit=100)
    pick = pool.pick(100.0, random.Random(seed))
    eligible = pool.eligible(100.0)
    if eligible:
        assert pick.in_flight == min(r.in_flight for r in eligible)


@FAST
@given(st.integers(1, 10), st.floats(0.1, 5), st.floats(5, 60))
def test_ejection_backoff_grows_then_caps(k, base, cap):
    cfg = EjectionConfig(consecutive_failures=2, base_ejection=base, max_ejection=cap)
    pool = Pool("m", make_policy("round-robin"), ejection=cfg)
    pool.set_members(["a", "b"])
    r = pool.replicas["a"]
    now, durations = 0.0, []
    for _ in range(k):
        assert not pool.record_failure(r, now)  # one failure is not enough
        assert pool.record_failure(r, now)
        durations.append(r.ejected_until - now)
        now = r.ejected_until + 0.001  # fails again right after coming back
    assert all(b >= a - 1e-9 for a, b in zip(durations, durations[1:]))
    assert durations[0] == pytest.approx(base) and max(durations) <= cap + 1e-9


def test_ejection_never_removes_more_than_the_allowed_fraction():
    pool = Pool("m", make_policy("round-robin"), ejection=EjectionConfig(consecutive_failures=1,
                                                                        max_ejected_fraction=0.5))
    pool.set_members(["a", "b", "c", "d"])
    ejected = [pool.record_failure(pool.replicas[n], 0.0) for n in "abcd"]
    assert ejected == [True, True, False, False]


def test_a_healthy_spell_resets_the_backoff():
    cfg = EjectionConfig(consecutive_failures=1, base_ejection=1.0, max_ejection=10.0)
    pool = Pool("m", make_policy("round-robin"), ejection=cfg)
    pool.set_members(["a", "b"])
    r = pool.replicas["a"]
    pool.record_failure(r, 0.0)
    pool.record_failure(r, 1.5)
    assert r.ejected_until - 1.5 == pytest.approx(2.0)
    pool.record_failure(r, 100.0)  # long after: starts again from the base
    assert r.ejected_until - 100.0 == pytest.approx(1.0)


@FAST
@given(st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=40), st.integers(2, 6))
def test_consistent_hash_moves_only_the_keys_of_a_replica_that_leaves(keys, n):
    names = [f"r{i}" for i in range(n)]
    ring = ConsistentHash(vnodes=32)
    ring.rebuild(names)
    before = {k: ring.owner(k, set(names)) for k in keys}
    after = {k: ring.owner(k, set(names) - {"r0"}) for k in keys}
    for k in keys:
        if before[k] != "r0":
            assert after[k] == before[k]
        assert after[k] != "r0"


def test_consistent_hash_sends_a_key_to_the_same_replica_every_time():
    pool = pool_from([{"ready": True, "draining": False, "in_flight": 0, "ejected_for": 0.0, "serving": True}] * 4,
                     ConsistentHash.name)
    rng = random.Random(1)
    assert len({pool.pick(100.0, rng, "user-42").name for _ in range(20)}) == 1


def test_unknown_policy_names_the_choices():
    with pytest.raises(ValueError, match="round-robin"):
        make_policy("random")
