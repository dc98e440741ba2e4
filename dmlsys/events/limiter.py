"""Rate and concurrency limits per principal: a pure core. Time is passed in as ``now``.

Think of each rate as a principal's *ledger* of recent admissions: every admission is written
down with the moment it stops counting (its *expiry*, the admission time plus the period), and
an admission is granted only while fewer than ``limit`` entries are still unexpired.

The guarantee (sliding window, not fixed)::

    for every rate (limit L, period P) of a principal's tier and every real t, the number of
    admissions with time in [t, t + P) is at most L.

Proof. Decision times never decrease (``now`` is clamped to the largest seen). Each admission
at time a is written with an expiry E >= a + P *as real numbers*: the float sum a + P is
rounded up with an exact TwoSum error term, and a quantized ledger (``Rate.resolution``) rounds
it up further onto its grid. An entry is dropped only when its expiry <= now. Suppose L + 1
admissions a_0 <= ... <= a_L fell in one window [t, t + P). When a_L was decided, each of
a_0 .. a_(L-1) had expiry E_i >= a_i + P >= t + P > a_L, so none had been dropped: L entries
were unexpired and a_L would have been refused. Contradiction. (aiolimiter's leaky bucket
admits its full capacity again as soon as the bucket drains, hence 2L - 1 in one window; a
GCRA with burst tolerance L does the same. Their only exact setting is zero burst: strict
pacing at one event per P / L. The ledger keeps full bursts *and* the exact bound.)

When the next admission is possible (``retry_after``): if the ledger holds L entries, the
earliest expiry E_0, else now. It is exact. Not early: before E_0 every entry is unexpired, so
L entries count and admission is refused. Not late: at E_0 the first entry (at least one
admission) expires, fewer than L remain, and admission succeeds if nothing else was admitted
in between. With several rates, the latest of their answers (each rate only gains room while
nothing is admitted). The clamp matters for this too: a clock that steps back is treated as
standing still, so no decision is ever taken "before" one already taken.

Cost and memory. A decision is a dict lookup and, per rate, a comparison against the earliest
expiry (plus popping what expired, amortized O(1)); no allocation on a refusal. A ledger holds
at most ``min(L, P / resolution + 1)`` entries: exact up to L = 1024 by default, quantized
beyond (``Rate.grain``). Equal expiries share one entry with a count, so a burst decided at
one instant is one entry. A principal with one rate costs about 400 bytes (tracemalloc, 20,000
anonymous principals), so the default table of 100,000 principals per tier stays under 40 MB.

Principals come and go. A principal whose ledgers have all expired and who has nothing in
flight is *idle*; forgetting an idle principal loses nothing (a fresh one is identical), so
idle principals are evicted by ``sweep(now)`` and whenever a tier's table reaches its
``Principals.max``. When the table is full of non-idle principals a new principal is refused
(counted in ``statistics().refused_full``) rather than evicting one early, which could
over-admit. That refusal's ``retry_after`` is an estimate (when the earliest ledger in the
table empties), not a promise: size the table above the number of principals a tier expects.

Concurrency is a count of events in flight per principal and per tier, taken with
``acquire`` and given back with ``release``; neither ever exceeds the tier's
``Concurrency`` caps.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Iterable, Mapping

from dmlsys.events.tiers import Rate, Tier, TierError

_INF = math.inf


def expiry_of(admitted: float, period: float, grain: float) -> float:
    """The smallest float (on the grid of ``grain``, when > 0) that is >= admitted + period exactly."""
    s = admitted + period
    # TwoSum (Knuth): err is the exact rounding error of s, so admitted + period == s + err in reals
    bp = s - admitted
    err = (admitted - (s - bp)) + (period - bp)
    if err > 0.0:
        s = math.nextafter(s, _INF)
    if grain > 0.0:
        q = math.ceil(s / grain) * grain
        while q < s:  # the product rounded down: step to the next grid point
            q += grain
        s = q
    return s


class _Ledger:
    """One rate of one principal: unexpired admissions, oldest first, as a flat list
    ``[expiry, count, expiry, count, ...]`` read from ``head`` (a list, not a deque: an empty
    deque costs 600 bytes, and there is one of these per principal per rate)."""

    __slots__ = ("limit", "period", "grain", "log", "head", "total")

    def __init__(self, rate: Rate) -> None:
        self.limit, self.period, self.grain = rate.limit, float(rate.period), rate.grain
        self.log: list = []
        self.head = 0
        self.total = 0  # admissions in log[head:]

    def room(self, now: float) -> bool:
        """Drop what expired by ``now``; True when one more admission fits."""
        log, h = self.log, self.head
        n = len(log)
        while h < n and log[h] <= now:
            self.total -= log[h + 1]
            h += 2
        if h:
            if h == n:
                log.clear()
                h = 0
            elif h >= 64 and 2 * h >= n:  # amortized O(1): at least half the list is spent
                del log[:h]
                h = 0
            self.head = h
        return self.total < self.limit

    def record(self, now: float) -> float:
        log = self.log
        live = len(log) > self.head
        if self.grain and live and now + self.period < log[-2]:
            # Quantized: the newest entry's expiry is later than this admission's exact one (the
            # float sum is below it, so the real sum is too) and earlier than it plus ``grain``
            # (it was made for an admission no later than this one): share it, skip the rounding.
            log[-1] += 1
            self.total += 1
            return log[-2]
        e = expiry_of(now, self.period, self.grain)
        if live and log[-2] == e:
            log[-1] += 1
        else:
            log.append(e)
            log.append(1)
        self.total += 1
        return e

    def next_room(self, now: float) -> float:
        """When one more admission fits (``now`` if it fits now). Call after ``room(now)``."""
        return self.log[self.head] if self.total >= self.limit else now


class _Principal:
    __slots__ = ("ledgers", "in_flight", "free_at")

    def __init__(self, rates: tuple[Rate, ...]) -> None:
        self.ledgers = tuple(_Ledger(r) for r in rates)
        self.in_flight = 0
        self.free_at = -_INF  # when every ledger is empty (the latest expiry written)


@dataclasses.dataclass(frozen=True, slots=True)
class LimiterStatistics:
    """A snapshot for /metrics: per tier, principals tracked and events in flight; counters."""

    principals: Mapping[str, int]
    in_flight: Mapping[str, int]
    admitted: int
    refused_rate: int
    refused_full: int
    evicted: int


class _TierState:
    __slots__ = ("tier", "rates", "per_principal", "total", "max_principals", "table", "in_flight", "next_sweep")

    def __init__(self, tier: Tier) -> None:
        p = tier.policy
        self.tier = tier
        self.rates = p.rates
        self.per_principal = p.concurrency.per_principal if p.concurrency.per_principal is not None else 1 << 62
        self.total = p.concurrency.total if p.concurrency.total is not None else 1 << 62
        self.max_principals = p.principals.max
        self.table: dict[str, _Principal] = {}
        self.in_flight = 0
        self.next_sweep = -_INF  # a sweep before this frees nobody (see _enter)


class Limiter:
    """Per-principal rate and concurrency limits for a set of tiers. Not thread-safe (one event loop).

    ``now`` is any non-decreasing clock in seconds (the service passes ``time.monotonic()``)::

        lim = Limiter([ANONYMOUS, AUTHENTICATED])
        if lim.admit("authenticated", "key:alice", now):      # a rate admission, consumed
            if lim.acquire("authenticated", "key:alice"):       # a concurrency slot
                ...                                             # run, then release()
        else:
            retry_at = lim.retry_after("authenticated", "key:alice", now)   # exact

    Raises:
        TierError: a tier name that is not configured (every method taking ``tier``).
    """

    __slots__ = ("_tiers", "_now", "_admitted", "_refused_rate", "_refused_full", "_evicted")

    def __init__(self, tiers: Iterable[Tier] | Mapping[str, Tier]) -> None:
        tiers = list(tiers.values()) if isinstance(tiers, Mapping) else list(tiers)
        if not tiers:
            raise TierError("Limiter needs at least one tier")
        self._tiers: dict[str, _TierState] = {}
        for t in tiers:
            if not isinstance(t, Tier):
                raise TierError(f"Limiter tiers must be Tier objects, got {type(t).__name__}")
            if t.name in self._tiers:
                raise TierError(f"tier {t.name!r} is configured twice")
            self._tiers[t.name] = _TierState(t)
        self._now = -_INF
        self._admitted = self._refused_rate = self._refused_full = self._evicted = 0

    # ------------------------------------------------------------------------- lookup
    def _state(self, tier: str) -> _TierState:
        try:
            return self._tiers[tier]
        except KeyError:
            raise TierError(f"unknown tier {tier!r}; configured tiers: {', '.join(sorted(self._tiers))}") from None

    def _clock(self, now: float) -> float:
        if now > self._now:
            self._now = now
            return now
        return self._now

    def _enter(self, ts: _TierState, principal: str, now: float) -> _Principal | None:
        """A new principal's state, or None when the tier's table is full of non-idle principals."""
        if len(ts.table) >= ts.max_principals and now >= ts.next_sweep:
            self._sweep_tier(ts, now)
        if len(ts.table) >= ts.max_principals:
            return None
        st = ts.table[principal] = _Principal(ts.rates)
        ts.next_sweep = -_INF  # it may be idle soon: next_sweep stays a lower bound on the first eviction
        return st

    def _sweep_tier(self, ts: _TierState, now: float) -> int:
        idle = [k for k, p in ts.table.items() if p.in_flight == 0 and p.free_at <= now]
        for k in idle:
            del ts.table[k]
        # Until the earliest remaining ledger empties, another sweep could only free principals
        # whose in-flight count dropped to zero; release() resets this when that happens.
        ts.next_sweep = min((p.free_at for p in ts.table.values() if p.in_flight == 0), default=_INF)
        self._evicted += len(idle)
        return len(idle)

    # ------------------------------------------------------------------------- rate
    def admit(self, tier: str, principal: str, now: float) -> bool:
        """Consume one admission of every rate of ``tier`` for ``principal`` if all have room."""
        if now > self._now:
            self._now = now
        else:
            now = self._now
        try:
            ts = self._tiers[tier]
        except KeyError:
            ts = self._state(tier)
        st = ts.table.get(principal)
        if st is None:
            st = self._enter(ts, principal, now)
            if st is None:
                self._refused_full += 1
                return False
        ledgers = st.ledgers
        for led in ledgers:
            # _Ledger.room inlined: a refusal by a full ledger is a few comparisons, no allocation
            log, h = led.log, led.head
            n = len(log)
            while h < n and log[h] <= now:
                led.total -= log[h + 1]
                h += 2
            if h:
                if h == n:
                    log.clear()
                    h = 0
                elif h >= 64 and 2 * h >= n:
                    del log[:h]
                    h = 0
                led.head = h
            if led.total >= led.limit:
                self._refused_rate += 1
                return False
        free_at = st.free_at
        for led in ledgers:
            e = led.record(now)
            if e > free_at:
                free_at = e
        st.free_at = free_at
        self._admitted += 1
        return True

    def would_admit(self, tier: str, principal: str, now: float) -> bool:
        """What ``admit`` would answer, consuming nothing."""
        return self.retry_after(tier, principal, now) <= self._clock(now)

    def retry_after(self, tier: str, principal: str, now: float) -> float:
        """The earliest time ``admit`` would succeed (``now`` when it would now); exact for rate limits.

        For a principal refused because the tier's table is full, the time the earliest ledger
        in the table empties: an estimate (see the module docstring)."""
        now = self._clock(now)
        ts = self._state(tier)
        st = ts.table.get(principal)
        if st is None:
            if len(ts.table) < ts.max_principals:
                return now
            self._sweep_tier(ts, now)
            if len(ts.table) < ts.max_principals:
                return now
            return ts.next_sweep if ts.next_sweep < _INF else now + min((r.period for r in ts.rates), default=1.0)
        at = now
        for led in st.ledgers:
            led.room(now)
            r = led.next_room(now)
            if r > at:
                at = r
        return at

    # ------------------------------------------------------------------------- concurrency
    def acquire(self, tier: str, principal: str, now: float | None = None) -> bool:
        """Take a concurrency slot for ``principal``: False when the principal or the tier is at its cap."""
        ts = self._state(tier)
        st = ts.table.get(principal)
        if st is None:
            st = self._enter(ts, principal, self._now if now is None else self._clock(now))
            if st is None:
                self._refused_full += 1
                return False
        if st.in_flight >= ts.per_principal or ts.in_flight >= ts.total:
            return False
        st.in_flight += 1
        ts.in_flight += 1
        return True

    def release(self, tier: str, principal: str) -> None:
        """Give back a slot taken by ``acquire``.

        Raises:
            TierError: ``principal`` holds no slot in ``tier`` (a double release is a bug upstream).
        """
        ts = self._state(tier)
        st = ts.table.get(principal)
        if st is None or st.in_flight <= 0:
            raise TierError(f"release of {principal!r} in tier {tier!r}, which holds no concurrency slot")
        st.in_flight -= 1
        ts.in_flight -= 1
        if st.in_flight == 0 and st.free_at < ts.next_sweep:
            ts.next_sweep = st.free_at

    def can_acquire(self, tier: str, principal: str) -> bool:
        """Whether ``acquire`` would succeed now (both caps have room)."""
        ts = self._state(tier)
        st = ts.table.get(principal)
        held = st.in_flight if st is not None else 0
        return held < ts.per_principal and ts.in_flight < ts.total

    def under_own_cap(self, tier: str, principal: str) -> bool:
        """Whether ``principal`` is under its per-principal cap (the tier's total aside)."""
        ts = self._state(tier)
        st = ts.table.get(principal)
        return (st.in_flight if st is not None else 0) < ts.per_principal

    def tracked(self, tier: str, principal: str) -> bool:
        """Whether the tier holds state for ``principal`` (False for a new or evicted one)."""
        return principal in self._state(tier).table

    def in_flight(self, tier: str, principal: str | None = None) -> int:
        """Slots held by ``principal`` in ``tier``, or by the whole tier when ``principal`` is None."""
        ts = self._state(tier)
        if principal is None:
            return ts.in_flight
        st = ts.table.get(principal)
        return st.in_flight if st is not None else 0

    # ------------------------------------------------------------------------- housekeeping
    def sweep(self, now: float, budget: int | None = None) -> int:
        """Forget idle principals (nothing in flight, every ledger expired); returns how many.

        ``budget``: look at no more than this many principals per tier, from the front of the
        table, moving the ones kept to the back: a service calling this every second with a
        budget of a thousand never stalls its loop for a long scan, and still visits every
        principal in turn. ``None`` scans everything."""
        now = self._clock(now)
        if budget is None:
            return sum(self._sweep_tier(ts, now) for ts in self._tiers.values())
        evicted = 0
        for ts in self._tiers.values():
            table = ts.table
            for k in list(itertools.islice(table, budget)):
                st = table.pop(k)
                if st.in_flight == 0 and st.free_at <= now:
                    evicted += 1
                else:
                    table[k] = st  # to the back: the next sweep looks at others first
        self._evicted += evicted
        return evicted

    def tier(self, name: str) -> Tier:
        return self._state(name).tier

    @property
    def tiers(self) -> tuple[str, ...]:
        return tuple(self._tiers)

    def statistics(self) -> LimiterStatistics:
        return LimiterStatistics(
            principals={n: len(ts.table) for n, ts in self._tiers.items()},
            in_flight={n: ts.in_flight for n, ts in self._tiers.items()},
            admitted=self._admitted, refused_rate=self._refused_rate, refused_full=self._refused_full,
            evicted=self._evicted)
