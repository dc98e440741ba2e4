"""Where a key lives: consistent hashing as plain code (no sockets, no clocks, no randomness).

Three placements answer the same questions (``lookup`` one key, ``lookup_batch`` many,
``walk`` the members in the order a key would try them, ``add`` and ``remove``):

* ``HashRing``: every member owns ``vnodes × weight`` points on a circle of 2**64 positions; a
  key belongs to the first point at or after its own position, wrapping at the top.
* ``JumpHash``: Lamping & Veach's jump consistent hash (2014) over members numbered in the order
  they joined: no table at all, perfect balance, but only the last member may leave.
* ``BoundedLoads``: a placement plus a cap, Mirrokni, Thorup & Zadimoghaddam's consistent hashing
  with bounded loads (SODA 2018; HAProxy's ``hash-balance-factor``): a key goes to the first
  member along its walk that is under ``ceil((1 + eps) * m * w / W)`` keys, m the keys held.

The guarantees, and why they hold:

**Stable across processes, machines and runs.** A key's position is ``xxh3_64`` (seed 0) of
its bytes (a ``str`` is encoded as UTF-8 first); a member's points are ``xxh3_64`` of
``"{name}#{i}"`` for i = 0 .. its vnode count - 1. XXH3 is a specified, endian-independent
function of the bytes alone, and Python's ``hash`` (salted per process by PYTHONHASHSEED) is never
used. Points that collide are ordered by member name. So the owner of a key is a function of the
key's bytes and the membership (names, weights, vnodes) only: two processes that agree on the
membership agree on every key, with no coordination.

**Minimal movement.** Adding member m only inserts m's points. A key's owner is the first point
at or after its position; the only way that can change is if a new point now comes first, and
every new point is m's: keys move only to m, and the expected fraction moved is m's share of the
points, 1/(n+1) for equal weights. Removing m deletes only m's points, so only the keys whose
first point was m's change owner (to the next point clockwise): m's keys, expected 1/n. Changing
a weight adds or removes points of that member alone, so keys move only to or from it. For
``JumpHash`` appending bucket n moves exactly the keys whose jump sequence lands on n (expected
1/(n+1)); removing the last bucket moves only its keys back to where they were before it joined.

**Balance.** A member's share of the circle is the sum of its V arcs, each of mean 1/(nV): its
relative deviation is about 1/sqrt(V), and the largest of n members sits about sqrt(2 ln n / V)
above the mean. ``DEFAULT_VNODES = 2000`` gives max/mean of 1.04-1.08 measured at 100 members
and 1M keys for three naming schemes (``experiments/bench_hashring.py``; 1000 vnodes gave up to
1.105). 200,000 points cost 1.6 MB of uint64 and a few milliseconds to rebuild.

**Bounded loads.** ``BoundedLoads`` keeps every member at or under its cap at all times, for any
sequence of ``assign``, ``release``, ``add`` and ``remove``. An assignment raises m by one, and the
member chosen is the first on the key's walk whose load is below its cap *for the new m*; one
exists because the caps sum to at least (1 + eps) m > m - 1, the keys held before. A release,
or a new member, can lower the caps; then ``release``/``add`` move keys off members that are now
over (the most recently assigned first, each to the first member under its cap along its own
walk) and return those moves. A move lowers one member's excess by one and puts nobody over,
and a destination always exists (the other members hold fewer keys than their caps add up to),
so the repair ends with no member over. The caller applies the returned moves (sessions move
with their state); nothing ever sits above the cap in between.

Batch lookups hash the keys with one ``np.fromiter`` pass and find their points with
``np.searchsorted`` on the sorted uint64 points. A table over the top bits of the hash (about four
buckets per point) answers directly for keys whose bucket holds no point, the large majority,
and only the rest are binary-searched.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Protocol

import numpy as np
import xxhash

from dmlsys.sharding.errors import EmptyRing, MembershipError

DEFAULT_VNODES = 2000
DEFAULT_EPS = 0.25

Key = str | bytes
_xxh64 = xxhash.xxh3_64_intdigest
_MASK64 = (1 << 64) - 1
_JUMP_MUL = 2862933555777941757


# -- key hashing ------------------------------------------------------------------------------


def key_hash(key: Key) -> int:
    """The key's position on the circle: xxh3_64 (seed 0) of its bytes, str as UTF-8."""
    if isinstance(key, str):
        return _xxh64(key.encode())
    if isinstance(key, (bytes, bytearray, memoryview)):
        return _xxh64(key)
    raise TypeError(f"a key is str or bytes, got {type(key).__name__}: {key!r:.60}")


def key_hashes(keys: Iterable[Key] | np.ndarray) -> np.ndarray:
    """``key_hash`` of each key as a uint64 array; a uint64 array is taken as hashes already."""
    if isinstance(keys, np.ndarray):
        if keys.dtype != np.uint64:
            raise TypeError(f"an array of keys must hold uint64 key hashes, got dtype {keys.dtype}")
        return keys
    keys = keys if isinstance(keys, Sequence) else list(keys)
    try:  # the fast path: all str
        return np.fromiter(map(_xxh64, map(str.encode, keys)), dtype=np.uint64, count=len(keys))
    except TypeError:
        return np.fromiter(map(key_hash, keys), dtype=np.uint64, count=len(keys))


def _check_weight(member: str, weight: float) -> float:
    if not isinstance(member, str) or not member:
        raise MembershipError(f"a member is a non-empty str name, got {member!r}")
    if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight > 0):
        raise MembershipError(f"member {member!r}: weight must be a finite number > 0, got {weight!r}")
    return float(weight)


# -- the interface ----------------------------------------------------------------------------


class Placement(Protocol):
    """What ``HashRing`` and ``JumpHash`` both answer (and ``BoundedLoads`` builds on)."""

    @property
    def names(self) -> tuple[str, ...]: ...

    def weight(self, member: str) -> float: ...

    def add(self, member: str, weight: float = 1.0) -> None: ...

    def remove(self, member: str) -> None: ...

    def lookup(self, key: Key) -> str: ...

    def lookup_batch(self, keys: Iterable[Key] | np.ndarray) -> np.ndarray: ...

    def index_batch(self, keys: Iterable[Key] | np.ndarray) -> np.ndarray: ...

    def walk(self, key: Key) -> Iterator[str]: ...


# -- the ring ---------------------------------------------------------------------------------


class HashRing:
    """Members with weights on a circle of virtual nodes (see the module docstring).

    >>> ring = HashRing(["a", "b", "c"])
    >>> ring.lookup("user-42") in ("a", "b", "c")
    True
    >>> list(ring.lookup_batch(["user-42"])) == [ring.lookup("user-42")]
    True
    """

    __slots__ = ("vnodes", "_weights", "_member_points", "_names", "_points", "_owner", "_plist", "_pnames",
                 "_shift", "_pure", "_pure_list")

    def __init__(self, members: Iterable[str] | Mapping[str, float] = (), *, vnodes: int = DEFAULT_VNODES) -> None:
        if not isinstance(vnodes, int) or vnodes < 1:
            raise ValueError(f"vnodes must be an int >= 1, got {vnodes!r}")
        self.vnodes = vnodes
        self._weights: dict[str, float] = {}
        self._member_points: dict[str, np.ndarray] = {}
        items = members.items() if isinstance(members, Mapping) else ((m, 1.0) for m in members)
        for m, w in items:
            if m in self._weights:
                raise MembershipError(f"member {m!r} given twice")
            self._weights[m] = _check_weight(m, w)
            self._member_points[m] = self._points_of(m, w)
        self._rebuild()

    def __repr__(self) -> str:
        return f"HashRing({len(self._names)} members, {len(self._points)} points, vnodes={self.vnodes})"

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, member: object) -> bool:
        return member in self._weights

    @property
    def names(self) -> tuple[str, ...]:
        """Members in name order; ``index_batch`` answers indexes into this tuple."""
        return self._names

    def weight(self, member: str) -> float:
        try:
            return self._weights[member]
        except KeyError:
            raise MembershipError(f"{member!r} is not a member of the ring") from None

    def points_of(self, member: str) -> int:
        """How many points ``member`` has on the circle."""
        self.weight(member)
        return len(self._member_points[member])

    # -- membership ---------------------------------------------------------------------------

    def _points_of(self, member: str, weight: float) -> np.ndarray:
        count = max(1, round(self.vnodes * weight))
        return np.fromiter((_xxh64(f"{member}#{i}".encode()) for i in range(count)), dtype=np.uint64, count=count)

    def add(self, member: str, weight: float = 1.0) -> None:
        """Add ``member``: only keys that now belong to it move (to it)."""
        w = _check_weight(member, weight)
        if member in self._weights:
            raise MembershipError(f"{member!r} is already a member of the ring (use set_weight to change its weight)")
        self._weights[member] = w
        self._member_points[member] = self._points_of(member, w)
        self._rebuild()

    def remove(self, member: str) -> None:
        """Remove ``member``: only its keys move (each to the next point clockwise)."""
        self.weight(member)
        del self._weights[member], self._member_points[member]
        self._rebuild()

    def set_weight(self, member: str, weight: float) -> None:
        """Change a member's weight: its points i < new count stay where they were, so keys move
        only to or from this member."""
        self.weight(member)
        self._weights[member] = _check_weight(member, weight)
        self._member_points[member] = self._points_of(member, weight)
        self._rebuild()

    def _rebuild(self) -> None:
        self._names = tuple(sorted(self._weights))
        if not self._names:
            self._points = np.empty(0, np.uint64)
            self._owner = np.empty(0, np.int32)
            self._plist, self._pnames = [], []
            self._shift, self._pure = 63, np.full(2, -1, np.int32)
            self._pure_list = self._pure.tolist()
            return
        pts = np.concatenate([self._member_points[m] for m in self._names])
        own = np.repeat(np.arange(len(self._names), dtype=np.int32),
                        [len(self._member_points[m]) for m in self._names])
        order = np.lexsort((own, pts))  # by position, then (on a collision) by member name
        self._points, self._owner = pts[order], own[order]
        self._plist = self._points.tolist()
        self._pnames = [self._names[i] for i in self._owner.tolist()]
        # Bucket table over the top ``bits`` of the hash, about 4 buckets per point: a bucket with
        # no point in it lies inside one arc, so all its keys belong to the arc's owner.
        bits = min(22, max(4, math.ceil(math.log2(4 * len(pts)))))
        self._shift = 64 - bits
        starts = np.arange(1 << bits, dtype=np.uint64) << np.uint64(self._shift)
        first = np.searchsorted(self._points, starts, side="left")  # first point >= bucket start
        nxt = np.append(first[1:], len(self._points))
        owner_ext = np.append(self._owner, self._owner[0])  # index len(points) wraps to point 0
        self._pure = np.where(first == nxt, owner_ext[first], -1).astype(np.int32)
        self._pure_list = self._pure.tolist()  # the scalar path's copy: list indexing beats numpy's

    # -- lookups ------------------------------------------------------------------------------

    def _check(self) -> None:
        if not self._names:
            raise EmptyRing("the hash ring has no members: add one before looking keys up")

    def lookup(self, key: Key) -> str:
        """The member that owns ``key``."""
        self._check()
        h = key_hash(key)
        owner = self._pure_list[h >> self._shift]
        if owner >= 0:
            return self._names[owner]
        i = bisect.bisect_left(self._plist, h)
        return self._pnames[i if i < len(self._plist) else 0]

    def index_batch(self, keys: Iterable[Key] | np.ndarray) -> np.ndarray:
        """For each key (or uint64 key hash), the index of its owner in ``names``."""
        self._check()
        h = key_hashes(keys)
        out = self._pure[h >> np.uint64(self._shift)]
        miss = np.flatnonzero(out < 0)
        if len(miss):
            idx = np.searchsorted(self._points, h[miss], side="left")
            idx[idx == len(self._points)] = 0
            out[miss] = self._owner[idx]
        return out

    def lookup_batch(self, keys: Iterable[Key] | np.ndarray) -> np.ndarray:
        """The owner of each key (or uint64 key hash), as an object array of names."""
        return np.array(self._names, dtype=object)[self.index_batch(keys)]

    def walk(self, key: Key) -> Iterator[str]:
        """Every member once, in the order met going clockwise from ``key``: its owner first, then
        the member that would own it were the owner gone, and so on (a preference list)."""
        self._check()
        n, start, seen = len(self._plist), bisect.bisect_left(self._plist, key_hash(key)), set()
        for j in range(n):
            name = self._pnames[(start + j) % n]
            if name not in seen:
                seen.add(name)
                yield name
                if len(seen) == len(self._names):
                    return


# -- jump consistent hash ---------------------------------------------------------------------


def jump_hash(h: int, buckets: int) -> int:
    """Lamping & Veach's jump consistent hash of the 64-bit ``h`` into [0, buckets); the same
    arithmetic as their C++ (and the ``jump-consistent-hash`` package), so results agree bit for bit."""
    if buckets < 1:
        raise ValueError(f"buckets must be >= 1, got {buckets}")
    b, j = -1, 0
    while j < buckets:
        b = j
        h = (h * 2862933555777941757 + 1) & 0xFFFFFFFFFFFFFFFF
        j = int((b + 1) * (2147483648.0 / ((h >> 33) + 1)))  # (h >> 33) + 1 < 2**53: exact as a float
    return b


def jump_hash_batch(hashes: np.ndarray, buckets: int) -> np.ndarray:
    """``jump_hash`` of every uint64 in ``hashes``, vectorized: each round advances the keys whose
    jump has not yet passed ``buckets`` (about ln(buckets) rounds)."""
    if buckets < 1:
        raise ValueError(f"buckets must be >= 1, got {buckets}")
    out = np.empty(len(hashes), dtype=np.int64)
    pos = np.arange(len(hashes))
    h = np.array(hashes, dtype=np.uint64, copy=True)
    j = np.zeros(len(h), dtype=np.int64)
    mul, one, s33 = np.uint64(_JUMP_MUL), np.uint64(1), np.uint64(33)
    with np.errstate(over="ignore"):
        while len(pos):
            b = j
            h = h * mul + one
            j = ((b + 1).astype(np.float64) * (2147483648.0 / ((h >> s33) + one).astype(np.float64))).astype(np.int64)
            done = j >= buckets
            out[pos[done]] = b[done]
            keep = ~done
            pos, h, j = pos[keep], h[keep], j[keep]
    return out


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


class JumpHash:
    """Members numbered in the order they joined, placed by jump consistent hash.

    For the case where members are only ever appended (numbered shards of a store that only
    grows): no points to store, exact balance (each bucket gets 1/n of the keys in expectation,
    with no vnode variance). The price: only the last member may be removed, and members have
    no weights. ``walk`` past the owner rehashes the key (splitmix64 of the hash plus the round)
    so a failover target is spread evenly too.
    """

    __slots__ = ("_names", "_index")

    def __init__(self, members: Iterable[str] = ()) -> None:
        self._names: list[str] = []
        self._index: dict[str, int] = {}
        for m in members:
            self.add(m)

    def __repr__(self) -> str:
        return f"JumpHash({len(self._names)} members)"

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, member: object) -> bool:
        return member in self._index

    @property
    def names(self) -> tuple[str, ...]:
        """Members in joining order (bucket i is ``names[i]``)."""
        return tuple(self._names)

    def weight(self, member: str) -> float:
        if member not in self._index:
            raise MembershipError(f"{member!r} is not a member of the jump hash")
        return 1.0

    def add(self, member: str, weight: float = 1.0) -> None:
        """Append ``member`` as the next bucket: only keys that now belong to it move."""
        _check_weight(member, weight)
        if weight != 1.0:
            raise MembershipError(f"jump hash members have no weights ({member!r} given {weight}); use HashRing")
        if member in self._index:
            raise MembershipError(f"{member!r} is already a member of the jump hash")
        self._index[member] = len(self._names)
        self._names.append(member)

    def remove(self, member: str) -> None:
        """Remove the last member (its keys go back to where they were before it joined)."""
        self.weight(member)
        if self._names[-1] != member:
            raise MembershipError(
                f"jump hash can only remove its last member ({self._names[-1]!r}), not {member!r}: "
                "use HashRing when any member may leave")
        self._names.pop()
        del self._index[member]

    def _check(self) -> None:
        if not self._names:
            raise EmptyRing("the jump hash has no members: add one before looking keys up")

    def lookup(self, key: Key) -> str:
        self._check()
        return self._names[jump_hash(key_hash(key), len(self._names))]

    def index_batch(self, keys: Iterable[Key] | np.ndarray) -> np.ndarray:
        self._check()
        return jump_hash_batch(key_hashes(keys), len(self._names))

    def lookup_batch(self, keys: Iterable[Key] | np.ndarray) -> np.ndarray:
        return np.array(self._names, dtype=object)[self.index_batch(keys)]

    def walk(self, key: Key) -> Iterator[str]:
        self._check()
        h, n, seen = key_hash(key), len(self._names), set()
        b = jump_hash(h, n)
        for r in range(64 * n):  # a deterministic, evenly spread sequence; bounded, then fill in order
            if b not in seen:
                seen.add(b)
                yield self._names[b]
                if len(seen) == n:
                    return
            b = jump_hash(_splitmix64(h + r + 1), n)
        for b in range(n):
            if b not in seen:
                yield self._names[b]


# -- bounded loads ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Move:
    """A key that ``BoundedLoads`` moved from one member to another to keep the cap."""

    key: Key
    source: str
    target: str


class BoundedLoads:
    """Keys in flight on a placement, none of its members ever over ``ceil((1 + eps) m w / W)``.

    ``assign(key)`` places a key and returns its member; ``release(key)`` takes it out. Both,
    and ``add``/``remove`` of a member, return or apply the moves needed to keep every member
    under its cap (see the module docstring for why the cap always holds). ``eps`` trades balance
    for stickiness: small eps caps tightly but sends more keys past their first choice.

    >>> b = BoundedLoads(HashRing(["a", "b"]), eps=0.0)
    >>> sorted([b.assign("k1"), b.assign("k2")])
    ['a', 'b']
    """

    __slots__ = ("placement", "eps", "_holder", "_held", "_weights", "_total")

    def __init__(self, placement: Placement, eps: float = DEFAULT_EPS) -> None:
        if not (math.isfinite(eps) and eps >= 0):
            raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
        self.placement = placement
        self.eps = eps
        self._holder: dict[Key, str] = {}
        self._held: dict[str, dict[Key, None]] = {m: {} for m in placement.names}  # insertion-ordered
        # Membership changes go through add/remove here, so the weights can be kept at hand.
        self._weights = {m: placement.weight(m) for m in placement.names}
        self._total = sum(self._weights.values())

    def __len__(self) -> int:
        return len(self._holder)

    def holder(self, key: Key) -> str | None:
        """The member holding ``key``, or None when it is not in flight."""
        return self._holder.get(key)

    def loads(self) -> dict[str, int]:
        return {m: len(keys) for m, keys in self._held.items()}

    def cap(self, member: str, in_flight: int | None = None) -> int:
        """The most keys ``member`` may hold with ``in_flight`` keys held in all (default: now)."""
        if member not in self._weights:
            raise MembershipError(f"{member!r} is not a member of the placement")
        return self._cap(member, len(self._holder) if in_flight is None else in_flight)

    def _cap(self, member: str, in_flight: int) -> int:
        # The small tolerance keeps ceil(2.0000000000000004) at 2; it can only lower a cap by one
        # where (1+eps)·m·w/W is within 1e-9 of an integer, and the caps still sum to >= m there.
        return max(1, math.ceil((1.0 + self.eps) * in_flight * self._weights[member] / self._total - 1e-9))

    def _place(self, key: Key, in_flight: int, avoid: str | None = None) -> str:
        if not self._weights:
            raise EmptyRing("bounded loads over an empty placement: add a member first")
        for member in self.placement.walk(key):
            if member != avoid and len(self._held[member]) < self._cap(member, in_flight):
                return member
        raise AssertionError(f"no member under its cap for {key!r} with {in_flight} in flight: loads {self.loads()}")

    def assign(self, key: Key) -> str:
        """Place ``key`` on the first member along its walk that stays within its cap."""
        if key in self._holder:
            raise KeyError(f"key {key!r} is already assigned to {self._holder[key]!r}; release it first")
        member = self._place(key, len(self._holder) + 1)
        self._holder[key] = member
        self._held[member][key] = None
        return member

    def release(self, key: Key) -> list[Move]:
        """Take ``key`` out; returns the keys moved because the caps went down."""
        try:
            member = self._holder.pop(key)
        except KeyError:
            raise KeyError(f"key {key!r} is not assigned") from None
        del self._held[member][key]
        return self._repair()

    def _repair(self) -> list[Move]:
        in_flight, moves = len(self._holder), []
        if not in_flight:
            return moves
        for member, held in self._held.items():
            while len(held) > self._cap(member, in_flight):
                key = next(reversed(held))  # the most recent arrival leaves first
                target = self._place(key, in_flight, avoid=member)
                del held[key]
                self._held[target][key] = None
                self._holder[key] = target
                moves.append(Move(key, member, target))
        return moves

    def add(self, member: str, weight: float = 1.0) -> list[Move]:
        """A new member; keys move only if caps went down (a few, off members now over)."""
        self.placement.add(member, weight)
        self._held[member] = {}
        self._weights[member] = self.placement.weight(member)
        self._total = sum(self._weights.values())
        return self._repair()

    def remove(self, member: str) -> list[Move]:
        """Remove a member; its keys, and any off members the lower caps put over, are re-placed."""
        self.placement.remove(member)
        orphans = self._held.pop(member)
        del self._weights[member]
        self._total = sum(self._weights.values())
        if orphans and not self._weights:
            raise EmptyRing(f"removed {member!r}, the last member, while it held {len(orphans)} key(s)")
        moves: list[Move] = []
        for key in orphans:
            target = self._place(key, len(self._holder))
            self._held[target][key] = None
            self._holder[key] = target
            moves.append(Move(key, member, target))
        return moves + self._repair()
