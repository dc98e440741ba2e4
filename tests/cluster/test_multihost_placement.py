"""Placement of a group's members on hosts: a pure function, its guarantees as properties."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dmlsys.cluster.placement import Group, PlacementError, index_of, place, place_all

HOSTS = ("alpha", "beta", "gamma", "delta")


@st.composite
def setups(draw):
    hosts = tuple(draw(st.lists(st.sampled_from(HOSTS), min_size=1, max_size=4, unique=True)))
    policy = draw(st.sampled_from(["spread", "pack"]))
    capacity = {h: draw(st.one_of(st.none(), st.integers(0, 6))) for h in hosts}
    used = {h: draw(st.integers(0, 2)) for h in hosts}
    steps = draw(st.lists(st.integers(0, 12), min_size=1, max_size=6))
    return Group("replica", hosts, policy), capacity, used, steps


def _counts(group: Group, placed: dict[str, str]) -> dict[str, int]:
    counts = {h: 0 for h in group.hosts}
    for host in placed.values():
        counts[host] += 1
    return counts


@settings(max_examples=150, deadline=None)
@given(setups())
def test_scaling_never_exceeds_capacity_and_reaches_the_target_or_refuses_whole(setup):
    group, capacity, used, steps = setup
    placed: dict[str, str] = {}
    for target in steps:
        try:
            plan = place(group, placed, target, capacity=capacity, used=used)
        except PlacementError as e:
            assert group.name in str(e) and str(target) in str(e)
            continue  # refused: nothing changed
        placed = plan.apply(placed)
        assert len(placed) == target
        assert len({index_of(group.name, m) for m in placed}) == target  # names unique
        for host, count in _counts(group, placed).items():
            if capacity[host] is not None and count:  # (other nodes may overfill a host; we add none there)
                assert used[host] + count <= capacity[host], (host, count, capacity, used)


@settings(max_examples=150, deadline=None)
@given(setups())
def test_spread_keeps_hosts_with_room_within_one_of_each_other(setup):
    group, capacity, used, steps = setup
    group = Group(group.name, group.hosts, "spread")
    placed: dict[str, str] = {}
    for target in steps:
        try:
            placed = place(group, placed, target, capacity=capacity, used=used).apply(placed)
        except PlacementError:
            continue
        counts = _counts(group, placed)
        top = max(counts.values())
        # Every host below the top by 2 or more is full: spread put nothing more there only for lack of room.
        for h, c in counts.items():
            if c <= top - 2:
                assert capacity[h] is not None and used[h] + c >= capacity[h], (counts, capacity, used)


@settings(max_examples=150, deadline=None)
@given(setups(), st.data())
def test_spread_scale_down_takes_from_the_fullest_host_first(setup, data):
    group = Group(setup[0].name, setup[0].hosts, "spread")
    n = data.draw(st.integers(1, 12))
    placed = {f"replica-{i}": data.draw(st.sampled_from(group.hosts)) for i in range(n)}
    target = data.draw(st.integers(0, n - 1))
    plan = place(group, placed, target)
    assert len(plan.remove) == n - target and not plan.add
    now = dict(placed)
    for member in plan.remove:
        counts = _counts(group, now)
        assert counts[now[member]] == max(counts.values())
        del now[member]


@settings(max_examples=100, deadline=None)
@given(setups())
def test_placement_is_deterministic(setup):
    group, capacity, used, steps = setup
    a: dict[str, str] = {}
    b: dict[str, str] = {}
    for target in steps:
        try:
            pa = place(group, a, target, capacity=capacity, used=used)
        except PlacementError:
            with pytest.raises(PlacementError):
                place(group, dict(b), target, capacity=dict(capacity), used=dict(used))
            continue
        pb = place(group, dict(b), target, capacity=dict(capacity), used=dict(used))
        assert pa == pb
        a, b = pa.apply(a), pb.apply(b)


def test_pack_fills_the_first_host_then_the_next_and_empties_in_reverse():
    group = Group("replica", ("alpha", "beta"), "pack")
    placed = place(group, {}, 3, capacity={"alpha": 2}).apply({})
    assert placed == {"replica-0": "alpha", "replica-1": "alpha", "replica-2": "beta"}
    assert place(group, placed, 2, capacity={"alpha": 2}).remove == ("replica-2",)


def test_spread_alternates_and_a_freed_name_is_reused():
    group = Group("replica", ("alpha", "beta"))
    placed = place(group, {}, 3).apply({})
    assert placed == {"replica-0": "alpha", "replica-1": "beta", "replica-2": "alpha"}
    down = place(group, placed, 2)
    assert down.remove == ("replica-2",)  # alpha is the fullest
    up = place(group, {"replica-0": "alpha", "replica-2": "beta"}, 3)
    assert up.add == (("replica-1", "alpha"),)


def test_no_room_names_the_group_and_each_hosts_free_slots():
    with pytest.raises(PlacementError, match=r"'replica'.*alpha: 0 free, beta: 1 free"):
        place(Group("replica", ("alpha", "beta")), {}, 3, capacity={"alpha": 1, "beta": 1}, used={"alpha": 1})


def test_place_all_accounts_for_earlier_groups():
    placed = place_all([(Group("worker", ("alpha", "beta")), 2), (Group("replica", ("alpha", "beta"), "pack"), 2)],
                       capacity={"alpha": 2, "beta": 2})
    assert placed == {"worker-0": "alpha", "worker-1": "beta", "replica-0": "alpha", "replica-1": "beta"}
