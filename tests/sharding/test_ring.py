"""The hash ring's guarantees: stable placement, minimal movement, balance, bounded loads."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from dmlsys.sharding.errors import EmptyRing, MembershipError
from dmlsys.sharding.ring import (DEFAULT_VNODES, BoundedLoads, HashRing, JumpHash, jump_hash, jump_hash_batch,
                                  key_hash, key_hashes)

FAST = settings(max_examples=60, deadline=None)
ROOT = Path(__file__).resolve().parents[2]

keys_st = st.lists(st.one_of(st.text(max_size=12), st.binary(max_size=12)), min_size=1, max_size=60, unique=True)
names_st = st.lists(st.text(st.characters(codec="utf-8"), min_size=1, max_size=6), min_size=1, max_size=8,
                    unique=True)


def placement(kind: str, names, vnodes: int = 40):
    return HashRing(names, vnodes=vnodes) if kind == "ring" else JumpHash(names)


# -- stable across processes ------------------------------------------------------------------

PROBE_KEYS = [f"user-{i}" for i in range(500)] + ["", "ünïcödé", "🙂"]
PROBE_MEMBERS = [f"shard-{i}" for i in range(7)]

CHILD = """
import json, sys
from dmlsys.sharding.ring import HashRing, JumpHash, key_hash
keys, members = json.loads(sys.stdin.read())
ring, jump = HashRing(members), JumpHash(members)
print(json.dumps({"hash": [key_hash(k) for k in keys], "ring": [ring.lookup(k) for k in keys],
                  "jump": [jump.lookup(k) for k in keys]}))
"""


@pytest.fixture(scope="module")
def other_process():
    """What a fresh interpreter with a different hash salt computes for the probe keys."""
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", CHILD], input=json.dumps([PROBE_KEYS, PROBE_MEMBERS]),
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=60, check=True)
    return json.loads(out.stdout)


def test_lookups_are_identical_in_another_process(other_process):
    ring, jump = HashRing(PROBE_MEMBERS), JumpHash(PROBE_MEMBERS)
    assert other_process["hash"] == [key_hash(k) for k in PROBE_KEYS]
    assert other_process["ring"] == list(ring.lookup_batch(PROBE_KEYS))
    assert other_process["jump"] == list(jump.lookup_batch(PROBE_KEYS))


def test_key_hash_is_xxh3_64_of_the_utf8_bytes():
    # A fixed value: if this changes, every deployed placement would move its keys.
    assert key_hash("user-42") == key_hash(b"user-42") == 0x50FE4B21CF7B09CD
    with pytest.raises(TypeError, match="str or bytes"):
        key_hash(42)  # type: ignore[arg-type]


# -- batch == single --------------------------------------------------------------------------


@FAST
@given(st.sampled_from(["ring", "jump"]), names_st, keys_st)
def test_batch_lookup_equals_single_lookups(kind, names, keys):
    p = placement(kind, names)
    single = [p.lookup(k) for k in keys]
    assert list(p.lookup_batch(keys)) == single
    assert list(p.lookup_batch(key_hashes(keys))) == single  # pre-hashed keys too
    assert [p.names[i] for i in p.index_batch(keys)] == single


def test_batch_lookup_equals_single_lookups_on_a_big_default_ring():
    # The default ring's bucket table is large (2**20): both of its paths, pure bucket and search.
    ring = HashRing([f"node-{i:03d}" for i in range(100)])
    keys = [f"key:{i}" for i in range(20_000)]
    assert list(ring.lookup_batch(keys)) == [ring.lookup(k) for k in keys]


@FAST
@given(st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=50), st.integers(1, 300))
def test_jump_batch_equals_scalar_jump(hashes, buckets):
    arr = np.array(hashes, dtype=np.uint64)
    assert jump_hash_batch(arr, buckets).tolist() == [jump_hash(h, buckets) for h in hashes]


def test_jump_agrees_with_the_reference_c_implementation():
    jump = pytest.importorskip("jump")  # jump-consistent-hash, a bench-only peer
    hashes = key_hashes([f"k{i}" for i in range(2000)])
    for n in (1, 2, 7, 100, 1000):
        assert jump_hash_batch(hashes, n).tolist() == [jump.hash(int(h), n) for h in hashes]


# -- minimal movement -------------------------------------------------------------------------


@FAST
@given(st.sampled_from(["ring", "jump"]), names_st, keys_st, st.text(min_size=1, max_size=6))
def test_adding_a_member_moves_keys_only_to_it(kind, names, keys, new):
    if new in names:
        return
    p = placement(kind, names)
    before = list(p.lookup_batch(keys))
    p.add(new)
    after = list(p.lookup_batch(keys))
    assert all(a == b or a == new for b, a in zip(before, after))


@FAST
@given(names_st, keys_st, st.data())
def test_removing_a_member_moves_only_its_keys(names, keys, data):
    if len(names) < 2:
        return
    gone = data.draw(st.sampled_from(names))
    ring = HashRing(names, vnodes=40)
    before = list(ring.lookup_batch(keys))
    ring.remove(gone)
    after = list(ring.lookup_batch(keys))
    for b, a in zip(before, after):
        assert a != gone
        assert a == b or b == gone


@FAST
@given(names_st, keys_st)
def test_removing_the_last_jump_member_moves_only_its_keys_back(names, keys):
    if len(names) < 2:
        return
    jump = JumpHash(names[:-1])
    before = list(jump.lookup_batch(keys))
    jump.add(names[-1])
    jump.remove(names[-1])
    assert list(jump.lookup_batch(keys)) == before


@FAST
@given(names_st, keys_st, st.data(), st.sampled_from([0.25, 0.5, 2.0, 3.0]))
def test_changing_a_weight_moves_keys_only_to_or_from_that_member(names, keys, data, weight):
    m = data.draw(st.sampled_from(names))
    ring = HashRing(names, vnodes=40)
    before = list(ring.lookup_batch(keys))
    ring.set_weight(m, weight)
    after = list(ring.lookup_batch(keys))
    assert all(a == b or m in (a, b) for b, a in zip(before, after))


@FAST
@given(st.sampled_from(["ring", "jump"]), names_st, st.text(max_size=8))
def test_walk_starts_at_the_owner_and_meets_every_member_once(kind, names, key):
    p = placement(kind, names)
    order = list(p.walk(key))
    assert order[0] == p.lookup(key)
    assert sorted(order) == sorted(names)


def test_walk_past_the_owner_is_who_owns_the_key_once_the_owner_is_gone():
    ring = HashRing([f"s{i}" for i in range(6)], vnodes=64)
    for k in (f"k{i}" for i in range(300)):
        first, second = list(ring.walk(k))[:2]
        smaller = HashRing([m for m in ring.names if m != first], vnodes=64)
        assert smaller.lookup(k) == second


# -- balance ----------------------------------------------------------------------------------


def arc_shares(ring: HashRing) -> np.ndarray:
    """Each member's exact fraction of the circle (the expected share of uniformly hashed keys)."""
    pts = ring._points.astype(np.float64) / 2.0**64
    arcs = np.diff(np.concatenate([[pts[-1] - 1.0], pts]))  # arc ending at point i belongs to its owner
    return np.bincount(ring._owner, weights=arcs, minlength=len(ring.names))


@pytest.mark.parametrize("naming", ["node-{:03d}", "shard-{}", "10.0.0.{}:5000"])
def test_default_vnodes_keep_max_over_mean_under_1_10_at_100_members(naming):
    ring = HashRing([naming.format(i) for i in range(100)])
    assert ring.vnodes == DEFAULT_VNODES
    shares = arc_shares(ring)
    assert shares.sum() == pytest.approx(1.0)
    assert shares.max() / shares.mean() <= 1.10


def test_weights_scale_a_members_share():
    ring = HashRing({"big": 3.0, "a": 1.0, "b": 1.0, "c": 1.0})
    shares = dict(zip(ring.names, arc_shares(ring)))
    assert shares["big"] == pytest.approx(0.5, abs=0.05)
    counts = np.bincount(ring.index_batch([f"k{i}" for i in range(60_000)]), minlength=4)
    assert counts[ring.names.index("big")] / counts.sum() == pytest.approx(0.5, abs=0.05)


# -- errors -----------------------------------------------------------------------------------


def test_empty_placements_say_so():
    for p in (HashRing(), JumpHash()):
        with pytest.raises(EmptyRing, match="no members"):
            p.lookup("k")
        with pytest.raises(EmptyRing):
            p.lookup_batch(["k"])


def test_membership_errors_name_the_member():
    ring = HashRing(["a"])
    with pytest.raises(MembershipError, match="'a' is already"):
        ring.add("a")
    with pytest.raises(MembershipError, match="'zz' is not a member"):
        ring.remove("zz")
    with pytest.raises(MembershipError, match="weight"):
        ring.add("b", weight=0)
    jump = JumpHash(["a", "b", "c"])
    with pytest.raises(MembershipError, match="only remove its last member \\('c'\\), not 'a'"):
        jump.remove("a")


# -- bounded loads ----------------------------------------------------------------------------

ops_st = st.lists(st.tuples(st.sampled_from(["assign", "assign", "assign", "release", "add", "remove"]),
                            st.integers(0, 40)), max_size=120)


@settings(max_examples=80, deadline=None)
@given(st.sampled_from(["ring", "jump"]), st.integers(1, 5), st.sampled_from([0.0, 0.1, 0.25, 1.0]), ops_st)
def test_bounded_loads_never_exceed_the_cap_for_any_sequence(kind, n, eps, ops):
    names = [f"m{i}" for i in range(n)]
    b = BoundedLoads(placement(kind, names, vnodes=16), eps=eps)
    held: dict[str, str] = {}
    joined = n
    for op, x in ops:
        moves = []
        if op == "assign" and f"k{x}" not in held:
            held[f"k{x}"] = b.assign(f"k{x}")
        elif op == "release" and held:
            key = sorted(held)[x % len(held)]
            moves = b.release(key)
            del held[key]
        elif op == "add":
            moves = b.add(f"m{joined}")
            joined += 1
        elif op == "remove" and len(b.placement) > 1:
            names_now = b.placement.names
            gone = names_now[-1] if kind == "jump" else names_now[x % len(names_now)]
            moves = b.remove(gone)
        for mv in moves:
            assert held[mv.key] == mv.source and mv.target != mv.source
            held[mv.key] = mv.target
        # The caller's view (assignments plus the moves it was told of) matches the holder's.
        assert held == {k: b.holder(k) for k in held}
        loads = b.loads()
        assert sum(loads.values()) == len(held)
        for member, load in loads.items():
            assert load <= b.cap(member), (member, load, b.cap(member), loads)


def test_bounded_loads_with_room_to_spare_is_plain_consistent_hashing():
    ring = HashRing([f"m{i}" for i in range(4)], vnodes=64)
    b = BoundedLoads(ring, eps=100.0)
    keys = [f"k{i}" for i in range(50)]
    assert [b.assign(k) for k in keys] == [ring.lookup(k) for k in keys]


def test_bounded_loads_rejects_double_assignment_and_unknown_release():
    b = BoundedLoads(HashRing(["a"]))
    b.assign("k")
    with pytest.raises(KeyError, match="already assigned to 'a'"):
        b.assign("k")
    with pytest.raises(KeyError, match="'nope' is not assigned"):
        b.release("nope")
