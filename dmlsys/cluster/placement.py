"""Where a group's members run: a pure function from hosts, capacity and the members placed so far
to the members to start (with their hosts) and the members to stop.

    plan = place(Group("replica", ("alpha", "beta"), "spread"), current={"replica-0": "alpha"},
                 target=3, capacity={"alpha": 2, "beta": None}, used={"alpha": 1})
    plan.add      # (("replica-1", "beta"), ("replica-2", "alpha")) ... see below for the order
    plan.remove   # ()

Guarantees (property-tested in tests/cluster/test_placement.py):

* **Capacity is never exceeded.** A host's capacity counts every node it runs (``used``: the
  single nodes and other groups' members already there, plus this group's). When the allowed
  hosts cannot hold ``target`` members, ``place`` raises ``PlacementError`` naming the group,
  the target, and each host's room; nothing is half-placed.
* **spread balances.** Each new member goes to the allowed host with the fewest members of
  this group that still has room (ties: the earlier host in the group's ``hosts``). From a
  balanced start the counts of hosts with room differ by at most one.
* **pack fills in order.** Each new member goes to the first allowed host with room.
* **Scale down removes from the fullest host first** (spread): each removal takes the host with
  the most members of this group (ties: the later host in ``hosts``), and there the member with
  the highest index. Under pack, the last host in ``hosts`` that has members goes first, the
  reverse of filling, so the group stays packed.
* **Deterministic.** The same inputs give the same plan on every host: ``up`` on each host can
  compute the initial placement of the whole spec without asking anyone.

New members take the lowest free index, so after removals from the middle (``replica-1`` on
the fullest host) the next scale-up reuses that name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from dmlsys.cluster.errors import ClusterError

POLICIES = ("spread", "pack")


class PlacementError(ClusterError):
    """The allowed hosts have no room for the members asked for."""


@dataclasses.dataclass(frozen=True)
class Group:
    """A group as placement sees it: its name (members are NAME-0, NAME-1, ...), the hosts it may
    run on in order of preference, and the policy."""

    name: str
    hosts: tuple[str, ...]
    policy: str = "spread"

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"placement policy {self.policy!r}: one of {', '.join(POLICIES)}")
        if not self.hosts or len(set(self.hosts)) != len(self.hosts):
            raise ValueError(f"group {self.name!r}: hosts must be a non-empty list without repeats, got {self.hosts}")


@dataclasses.dataclass(frozen=True)
class Plan:
    add: tuple[tuple[str, str], ...]  # (member name, host), in the order they were placed
    remove: tuple[str, ...]  # member names, in the order they were taken

    def apply(self, current: Mapping[str, str]) -> dict[str, str]:
        after = {m: h for m, h in current.items() if m not in self.remove}
        after.update(self.add)
        return after


def index_of(group: str, member: str) -> int | None:
    prefix = f"{group}-"
    rest = member[len(prefix):] if member.startswith(prefix) else ""
    return int(rest) if rest.isdigit() else None


def place(group: Group, current: Mapping[str, str], target: int, *,
          capacity: Mapping[str, int | None] | None = None, used: Mapping[str, int] | None = None) -> Plan:
    """Members to add (with their hosts) and to remove so that ``group`` has ``target`` members.

    ``current``: this group's members now, name -> host. ``capacity``: host -> how many nodes
    it may run in all (None or absent: no limit). ``used``: host -> nodes it runs that are not
    this group's members. Hosts of ``current`` not in ``group.hosts`` keep their members (a
    spec edited under a running cluster) but get no new ones.

    Raises:
        PlacementError: not enough room; names every allowed host's free slots.
        ValueError: a negative target.
    """
    if target < 0:
        raise ValueError(f"group {group.name!r}: target must be >= 0, got {target}")
    capacity = capacity or {}
    used = used or {}
    counts = {h: 0 for h in group.hosts}
    for host in current.values():
        counts[host] = counts.get(host, 0) + 1

    def room(host: str) -> float:
        cap = capacity.get(host)
        return float("inf") if cap is None else cap - used.get(host, 0) - counts[host]

    n = len(current)
    if target > n:
        free = sum(max(room(h), 0) for h in group.hosts)
        if free < target - n:
            rooms = ", ".join(f"{h}: {'unlimited' if room(h) == float('inf') else max(int(room(h)), 0)} free"
                              for h in group.hosts)
            raise PlacementError(f"group {group.name!r}: no room for {target - n} more member(s) to reach {target} "
                                 f"({rooms}); raise [hosts.NAME] capacity or add hosts to nodes.{group.name}.hosts")
        taken = {index_of(group.name, m) for m in current}
        order = {h: i for i, h in enumerate(group.hosts)}
        add: list[tuple[str, str]] = []
        index = 0
        for _ in range(target - n):
            while index in taken:
                index += 1
            open_hosts = [h for h in group.hosts if room(h) > 0]
            if group.policy == "spread":
                host = min(open_hosts, key=lambda h: (counts[h], order[h]))
            else:
                host = open_hosts[0]
            name = f"{group.name}-{index}"
            taken.add(index)
            counts[host] += 1
            add.append((name, host))
        return Plan(tuple(add), ())
    if target < n:
        by_host: dict[str, list[str]] = {}
        for member, host in current.items():
            by_host.setdefault(host, []).append(member)
        for members in by_host.values():
            members.sort(key=lambda m: (index_of(group.name, m) is None, index_of(group.name, m) or 0, m))
        # Hosts outside group.hosts (the spec moved the group) lose members first, then the rest.
        rank = {h: i for i, h in enumerate(group.hosts)}
        remove: list[str] = []
        for _ in range(n - target):
            hosts = [h for h, ms in by_host.items() if ms]
            if group.policy == "spread":
                host = max(hosts, key=lambda h: (h not in rank, len(by_host[h]), rank.get(h, -1)))
            else:
                host = max(hosts, key=lambda h: (h not in rank, rank.get(h, -1)))
            remove.append(by_host[host].pop())
        return Plan((), tuple(remove))
    return Plan((), ())


def place_all(groups: Sequence[tuple[Group, int]], *, capacity: Mapping[str, int | None] | None = None,
              used: Mapping[str, int] | None = None) -> dict[str, str]:
    """The initial placement of several groups, in order: member name -> host. What ``up``
    computes on every host from the spec alone (the same answer everywhere)."""
    used = dict(used or {})
    placed: dict[str, str] = {}
    for group, target in groups:
        plan = place(group, {}, target, capacity=capacity, used=used)
        for member, host in plan.add:
            placed[member] = host
            used[host] = used.get(host, 0) + 1
    return placed
