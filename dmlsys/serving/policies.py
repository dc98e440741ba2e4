"""The balancer's pure core: which replica of a model gets the next request.

No sockets, no clocks, no global randomness: time (``now``) and a ``random.Random`` are passed
in, so every decision can be replayed and property-tested.

A ``Pool`` holds the replicas of one model as the balancer last saw them (ready, draining, in
flight, ejected) and answers ``pick``. It filters first and then lets a ``Policy`` choose, so
that every policy inherits the same guarantee:

    a pick is always a replica that is ready, not draining, not ejected and under its
    in-flight limit; or None when there is no such replica.

(One deliberate exception, ``degraded`` picks: when no replica of a model is ready but some
are still answering with an older model while they reload, those are used rather than
failing the request. A reloading replica keeps serving its old version until the new one is
warm, so its answers are whole answers.)

Policies (one small interface, ``pick(candidates, key, rng)``; candidates are never empty):

* ``RoundRobin``: the next replica by name after the one picked last. Over any run of picks
  from an unchanged set, counts differ by at most one.
* ``LeastConnections``: the fewest requests in flight; ties broken at random.
* ``PowerOfTwo`` (default): two distinct candidates sampled at random, the less loaded wins.
  Mitzenmacher's "power of two choices": the maximum load drops from O(log n / log log n) to
  O(log log n) while looking at only two replicas, so it needs no global scan and, unlike
  least-connections, does not stampede every balancer onto the same idle replica.
* ``ConsistentHash``: the request key's owner on the hash ring of ``dmlsys.sharding.ring``
  (stable xxh3_64 placement, weighted virtual nodes); past an ineligible owner, the next replica
  along the key's walk. A replica leaving moves only its own keys. Without a key, power-of-two.

Outlier ejection follows Envoy's: ``consecutive_failures`` failures in a row eject a replica
for ``base_ejection * times_ejected`` seconds (capped at ``max_ejection``), never ejecting more
than ``max_ejected_fraction`` of the pool (at least one replica may always be ejected).
"""

from __future__ import annotations

import dataclasses
import random
from typing import Iterable, Protocol, Sequence

from dmlsys.sharding.ring import DEFAULT_VNODES, HashRing


@dataclasses.dataclass(slots=True)
class Replica:
    """One replica as the balancer sees it."""

    name: str
    ready: bool = False  # the last probe said ready
    serving: bool = False  # can answer at all (ready, or reloading with its old model)
    draining: bool = False  # no new requests (rollout, leaving, or the replica said so)
    version: int | None = None
    in_flight: int = 0
    failures: int = 0  # consecutive failed requests
    ejections: int = 0  # how many times ejected; the next ejection lasts longer
    ejected_until: float = 0.0

    def ejected(self, now: float) -> bool:
        return now < self.ejected_until


@dataclasses.dataclass(frozen=True, slots=True)
class EjectionConfig:
    """Passive outlier detection (Envoy's ``consecutive_5xx``, ``base_ejection_time``...)."""

    consecutive_failures: int = 3
    base_ejection: float = 1.0
    max_ejection: float = 30.0
    max_ejected_fraction: float = 0.5

    def __post_init__(self) -> None:
        if self.consecutive_failures < 1:
            raise ValueError(f"consecutive_failures must be >= 1, got {self.consecutive_failures}")
        if not 0 < self.base_ejection <= self.max_ejection:
            raise ValueError(f"need 0 < base_ejection <= max_ejection, got {self.base_ejection}, {self.max_ejection}")
        if not 0.0 <= self.max_ejected_fraction <= 1.0:
            raise ValueError(f"max_ejected_fraction is in [0, 1], got {self.max_ejected_fraction}")

    def duration(self, times_ejected: int) -> float:
        """How long the ``times_ejected``-th ejection lasts: grows linearly, then caps."""
        return min(self.base_ejection * max(1, times_ejected), self.max_ejection)


class Policy(Protocol):
    name: str

    def pick(self, candidates: Sequence[Replica], key: str | None, rng: random.Random) -> Replica: ...


class RoundRobin:
    name = "round-robin"

    def __init__(self) -> None:
        self._last: str | None = None

    def pick(self, candidates: Sequence[Replica], key: str | None, rng: random.Random) -> Replica:
        # Candidates come sorted by name: take the first one after the last pick, wrapping. Keyed
        # by name rather than by index, so a replica joining or leaving does not reset fairness.
        chosen = candidates[0]
        if self._last is not None:
            for r in candidates:
                if r.name > self._last:
                    chosen = r
                    break
        self._last = chosen.name
        return chosen


class LeastConnections:
    name = "least-connections"

    def pick(self, candidates: Sequence[Replica], key: str | None, rng: random.Random) -> Replica:
        low = min(r.in_flight for r in candidates)
        return rng.choice([r for r in candidates if r.in_flight == low])


class PowerOfTwo:
    name = "power-of-two"

    def pick(self, candidates: Sequence[Replica], key: str | None, rng: random.Random) -> Replica:
        n = len(candidates)
        if n == 1:
            return candidates[0]
        # Two distinct indices, uniform over pairs: b is drawn from the n - 1 others. (Two
        # rng.random() calls: a third of the cost of rng.sample, on the gateway's hot path.)
        a = int(rng.random() * n)
        b = int(rng.random() * (n - 1))
        if b >= a:
            b += 1
        ra, rb = candidates[a], candidates[b]
        return rb if rb.in_flight < ra.in_flight else ra


class ConsistentHash:
    """The key's owner on a ``dmlsys.sharding.ring.HashRing`` of every known replica; when the
    owner is not eligible, the next replica along the key's walk (the one that would own the key
    were the owner gone), so a replica leaving or ejected moves only its own keys."""

    name = "consistent-hash"

    def __init__(self, vnodes: int = DEFAULT_VNODES) -> None:
        if vnodes < 1:
            raise ValueError(f"vnodes must be >= 1, got {vnodes}")
        self.vnodes = vnodes
        self._ring = HashRing(vnodes=vnodes)
        self._fallback = PowerOfTwo()

    def rebuild(self, names: Iterable[str]) -> None:
        """Place every known replica on the ring (eligible or not, so keys stay put while one is ejected)."""
        names = set(names)
        known = set(self._ring.names)
        for gone in known - names:
            self._ring.remove(gone)
        for new in sorted(names - known):
            self._ring.add(new)

    def owner(self, key: str, eligible: set[str]) -> str | None:
        if not len(self._ring):
            return None
        for name in self._ring.walk(key):
            if name in eligible:
                return name
        return None

    def pick(self, candidates: Sequence[Replica], key: str | None, rng: random.Random) -> Replica:
        if key is None:
            return self._fallback.pick(candidates, key, rng)
        by_name = {r.name: r for r in candidates}
        if not by_name.keys() <= set(self._ring.names):
            self.rebuild(set(self._ring.names) | set(by_name))
        return by_name[self.owner(key, set(by_name))]  # type: ignore[index]


POLICIES = {cls.name: cls for cls in (RoundRobin, LeastConnections, PowerOfTwo, ConsistentHash)}
DEFAULT_POLICY = PowerOfTwo.name


def make_policy(name: str) -> Policy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown balancing policy {name!r}; choose one of: {', '.join(POLICIES)}") from None


class Pool:
    """The replicas of one model, the policy that chooses among them, and their ejection state."""

    def __init__(self, model: str, policy: Policy | None = None, *, max_in_flight: int = 64,
                 ejection: EjectionConfig = EjectionConfig()) -> None:
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        self.model = model
        self.policy = policy or PowerOfTwo()
        self.max_in_flight = max_in_flight
        self.ejection = ejection
        self.replicas: dict[str, Replica] = {}
        self._sorted: list[Replica] = []

    # -- membership and probes ------------------------------------------------------------

    def set_members(self, names: Iterable[str]) -> None:
        """Replicas now in the directory. New ones start not ready: they wait for a probe."""
        names = set(names)
        for gone in set(self.replicas) - names:
            del self.replicas[gone]
        for name in names - set(self.replicas):
            self.replicas[name] = Replica(name)
        self._resort()

    def _resort(self) -> None:
        self._sorted = sorted(self.replicas.values(), key=lambda r: r.name)
        if isinstance(self.policy, ConsistentHash):
            self.policy.rebuild(self.replicas)

    def observe(self, name: str, *, ready: bool, serving: bool, draining: bool = False,
                version: int | None = None) -> None:
        """What an active probe found. A probe failure is ``ready=False, serving=False``."""
        r = self.replicas.get(name)
        if r is None:
            return
        r.ready, r.serving, r.version = ready, serving, version
        r.draining = draining

    # -- choosing -------------------------------------------------------------------------

    def eligible(self, now: float) -> list[Replica]:
        limit = self.max_in_flight
        return [r for r in self._sorted if r.ready and not r.draining and now >= r.ejected_until
                and r.in_flight < limit]

    def pick(self, now: float, rng: random.Random, key: str | None = None,
             exclude: Iterable[str] = ()) -> Replica | None:
        """A replica for the next request, or None (see ``why_none``). ``exclude``: tried already."""
        candidates = self.eligible(now)
        if exclude:
            exclude = set(exclude)
            candidates = [r for r in candidates if r.name not in exclude]
        if not candidates and not any(r.ready for r in self._sorted):
            # Degraded: nobody is ready, but a reloading replica still answers with its old model.
            candidates = [r for r in self._sorted if r.serving and not r.draining and not r.ejected(now)
                          and r.in_flight < self.max_in_flight and r.name not in exclude]
        if not candidates:
            return None
        return self.policy.pick(candidates, key, rng)

    def saturated(self, now: float) -> bool:
        """Some replica could take the request but for its in-flight limit: worth queueing for."""
        return any(r.ready and not r.draining and not r.ejected(now) for r in self._sorted)

    def why_none(self, now: float) -> str:
        if not self.replicas:
            return "the model has no replicas"
        parts = []
        for r in self._sorted:
            if r.ejected(now):
                parts.append(f"{r.name} ejected for {r.ejected_until - now:.1f}s more")
            elif r.draining:
                parts.append(f"{r.name} draining")
            elif not r.ready:
                parts.append(f"{r.name} not ready")
            else:
                parts.append(f"{r.name} at its limit of {self.max_in_flight} in flight")
        return ", ".join(parts)

    # -- outcomes -------------------------------------------------------------------------

    def record_success(self, r: Replica) -> None:
        r.failures = 0

    def record_failure(self, r: Replica, now: float) -> bool:
        """Count a failed request; eject the replica if it failed too often. True if ejected."""
        r.failures += 1
        if r.failures < self.ejection.consecutive_failures or r.ejected(now):
            return False
        ejected = sum(1 for x in self._sorted if x.ejected(now))
        allowed = max(1, int(self.ejection.max_ejected_fraction * len(self._sorted)))
        if ejected >= allowed:
            return False
        # A replica healthy for a whole max_ejection since its last ejection starts afresh.
        if r.ejections and now - r.ejected_until > self.ejection.max_ejection:
            r.ejections = 0
        r.ejections += 1
        r.ejected_until = now + self.ejection.duration(r.ejections)
        r.failures = 0
        return True

    def summary(self, now: float) -> dict:
        return {
            "policy": self.policy.name,
            "replicas": {r.name: {"ready": r.ready, "draining": r.draining, "version": r.version,
                                  "in_flight": r.in_flight, "ejected_for": round(max(0.0, r.ejected_until - now), 3)}
                         for r in self._sorted},
        }
