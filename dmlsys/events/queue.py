"""The event queue's pure core: admit, wait in a bounded fair queue, or refuse. Time is passed in.

An event of a principal (a key's name, or an anonymous client address) in a tier is *offered*.
It either runs at once, waits, or is refused; a waiting event later runs, times out or is
cancelled. Each accepted event ends in exactly one of: done (``release``), timed out
(``expire``), cancelled (``cancel``), or pushed out by a fairer one (``displaced``): none is lost.

Decision on ``offer(tier, principal, now)``:

1. the tier's concurrency has room (the principal under ``per_principal``, the tier under
   ``total``) and nothing of this tier waits for which a slot would be free: take a rate
   admission (``Limiter.admit``) and run; refused -> 429 with the exact Retry-After;
2. else the queue has room: take a rate admission and wait;
3. else the queue is full: when some principal has more events waiting than this one's principal
   would have after joining, the newest waiting event of the principal with the most is pushed
   out (429) and this one waits in its place ("longest queue drop"); otherwise 429 with an
   estimated Retry-After.

A rate admission is consumed only by an event that runs or waits, never by a refused one.

Guarantees, each a property test in tests/events/test_queue.py:

* **bounds**: per tier, waiting <= ``Queue.depth``; running <= ``Concurrency.total``; per
  principal, running <= ``Concurrency.per_principal``.
* **work-conserving**: after every call, no waiting event could take a free slot (its principal
  under its cap and the tier under its total): slots never idle while someone eligible waits.
* **round-robin across principals**: the principals with eligible waiting events form a ring;
  a slot goes to the one at the front, which then goes to the back. So while principal B waits
  (eligible), every other principal of its tier is granted at most once before B: a client that
  floods gets one turn per round like everyone else. A principal at its own cap leaves the ring
  until one of its events ends (it could not use a slot anyway).
* **fair entry**: an event is refused for a full queue only when no principal of the tier has
  more waiting events than its own principal would have after joining: a flood fills the queue
  but cannot keep others out of it.
* **bounded wait**: an event waits at most ``Queue.max_wait`` (``expire(now)`` ends the rest);
  with ``depth = 0`` nothing waits at all.

Costs: offer, release, cancel and expire are O(1) amortized per event, except a full queue's
push-out, which scans the tier's waiting principals (at most ``depth`` of them).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections import OrderedDict, deque
from typing import Any

from dmlsys.events.limiter import Limiter

WAITING, RUNNING, DONE, EXPIRED, CANCELLED, DISPLACED = "waiting", "running", "done", "expired", "cancelled", "displaced"


@dataclasses.dataclass(slots=True, eq=False)
class Ticket:
    """One accepted event. ``state`` moves waiting -> running -> done, or ends early (see module doc).
    ``token`` is the service's (e.g. the future its waiter awaits); the core never touches it."""

    id: int
    tier: str
    principal: str
    arrived: float
    deadline: float  # a waiting event ends by this time
    state: str = WAITING
    started: float | None = None
    token: Any = None


@dataclasses.dataclass(frozen=True, slots=True)
class Refusal:
    """An event not accepted. ``reason``: "rate" (exact ``retry_at``), "queue_full" or
    "principals" (estimates). ``retry_at`` is an absolute time on the caller's clock."""

    tier: str
    principal: str
    reason: str
    retry_at: float


@dataclasses.dataclass(frozen=True, slots=True)
class QueueStatistics:
    waiting: dict[str, int]
    running: dict[str, int]
    accepted: int
    refused: dict[str, int]
    ended: dict[str, int]


class _TierQueue:
    """Waiting events of one tier: per principal in arrival order, all in arrival order, and the
    ring of principals whose front event could take a slot (their turn order)."""

    __slots__ = ("name", "depth", "max_wait", "by_principal", "arrivals", "ring", "in_ring", "service_ewma")

    def __init__(self, name: str, depth: int, max_wait: float) -> None:
        self.name, self.depth, self.max_wait = name, depth, max_wait
        self.by_principal: dict[str, OrderedDict[int, Ticket]] = {}
        self.arrivals: OrderedDict[int, Ticket] = OrderedDict()  # deadlines are non-decreasing in here
        self.ring: deque[str] = deque()
        self.in_ring: set[str] = set()  # may hold principals no longer eligible: checked when popped
        self.service_ewma: float | None = None  # seconds an event runs, smoothed: for Retry-After estimates

    def waiting(self) -> int:
        return len(self.arrivals)

    def push(self, t: Ticket) -> None:
        self.arrivals[t.id] = t
        mine = self.by_principal.get(t.principal)
        if mine is None:
            mine = self.by_principal[t.principal] = OrderedDict()
        mine[t.id] = t

    def remove(self, t: Ticket) -> None:
        del self.arrivals[t.id]
        mine = self.by_principal[t.principal]
        del mine[t.id]
        if not mine:
            del self.by_principal[t.principal]  # its ring entry, if any, is skipped when it comes up

    def enter_ring(self, principal: str) -> None:
        if principal not in self.in_ring:
            self.in_ring.add(principal)
            self.ring.append(principal)
        if len(self.ring) > 2 * len(self.by_principal) + 8:  # stale entries: compact, keeping the order
            live = [p for p in self.ring if p in self.by_principal]
            self.ring = deque(live)
            self.in_ring = set(live)


class EventQueue:
    """Admission, bounded fair queues and refusals for the tiers of ``limiter``. Not thread-safe.

        q = EventQueue(Limiter(tiers))
        got, pushed_out = q.offer("anonymous", "anon:10.0.0.7", now)   # answer pushed_out 429
        if isinstance(got, Refusal): answer 429 with Retry-After ceil(got.retry_at - now)
        elif got.state == RUNNING: run it, then for t in q.release(got, now): wake t (it runs now)
        else: wait for a release to grant it, or until got.deadline (then q.expire(now))
    """

    def __init__(self, limiter: Limiter) -> None:
        self.limiter = limiter
        self._tiers: dict[str, _TierQueue] = {}
        for name in limiter.tiers:
            q = limiter.tier(name).policy.queue
            self._tiers[name] = _TierQueue(name, q.depth, q.max_wait)
        self._ids = itertools.count(1)
        self._accepted = 0
        self._refused = {"rate": 0, "queue_full": 0, "principals": 0}
        self._ended = {DONE: 0, EXPIRED: 0, CANCELLED: 0, DISPLACED: 0}

    # ------------------------------------------------------------------------- offer
    def offer(self, tier: str, principal: str, now: float) -> tuple[Ticket | Refusal, list[Ticket]]:
        """Accept (running or waiting) or refuse one event. The list holds tickets this offer
        pushed out of the queue (state ``displaced``): answer them 429."""
        lim = self.limiter
        tq = self._tiers.get(tier)
        if tq is None:
            self.limiter.tier(tier)  # raises TierError naming the configured tiers
        displaced: list[Ticket] = []
        # Work conservation (see _grant) means nobody eligible waits while the tier has room, so
        # an event that can take a slot now jumps no queue by taking it.
        if lim.can_acquire(tier, principal):
            if not lim.admit(tier, principal, now):
                return self._refuse(tier, principal, now), displaced
            lim.acquire(tier, principal, now)
            t = Ticket(next(self._ids), tier, principal, now, now, RUNNING, started=now)
            self._accepted += 1
            return t, displaced
        if tq.waiting() >= tq.depth:
            victim = self._longest(tq, principal) if tq.depth else None
            if victim is None:
                self._refused["queue_full"] += 1
                return Refusal(tier, principal, "queue_full", self.estimate_free(tier, now)), displaced
            if not lim.would_admit(tier, principal, now):
                return self._refuse(tier, principal, now), displaced
            tq.remove(victim)
            victim.state = DISPLACED
            self._ended[DISPLACED] += 1
            displaced.append(victim)
        if not lim.admit(tier, principal, now):
            return self._refuse(tier, principal, now), displaced
        t = Ticket(next(self._ids), tier, principal, now, now + tq.max_wait)
        tq.push(t)
        self._accepted += 1
        if lim.under_own_cap(tier, principal):
            tq.enter_ring(principal)  # in the turn order; else it enters when one of its events ends
        return t, displaced

    def _refuse(self, tier: str, principal: str, now: float) -> Refusal:
        at = self.limiter.retry_after(tier, principal, now)
        reason = "rate" if self.limiter.tracked(tier, principal) else "principals"
        self._refused[reason] += 1
        return Refusal(tier, principal, reason, at)

    def _longest(self, tq: _TierQueue, principal: str) -> Ticket | None:
        """The newest waiting event of the principal with the most waiting, if that is more than
        ``principal`` would have after joining; else None. (After the swap the two are at most
        level, so the next offer of the one pushed out cannot push back: no ping-pong.)"""
        mine = len(tq.by_principal.get(principal, ())) + 1
        best, most = None, mine
        for p, events in tq.by_principal.items():
            if len(events) > most:
                best, most = p, len(events)
        if best is None:
            return None
        return next(reversed(tq.by_principal[best].values()))

    # ------------------------------------------------------------------------- grants
    def _grant(self, tq: _TierQueue, now: float) -> list[Ticket]:
        """Give free slots to waiting events, one per principal per turn of the ring."""
        lim, tier, granted = self.limiter, tq.name, []
        while tq.ring and lim.in_flight(tier) < self._total(tier):
            p = tq.ring.popleft()
            tq.in_ring.discard(p)
            events = tq.by_principal.get(p)
            if events is None or not lim.under_own_cap(tier, p):
                continue  # stale entry, or at its own cap: it re-enters when one of its events ends
            if not lim.acquire(tier, p, now):
                continue  # the limiter's principal table is full of others: it waits out its deadline
            t = next(iter(events.values()))
            tq.remove(t)
            t.state, t.started = RUNNING, now
            granted.append(t)
            if p in tq.by_principal and lim.under_own_cap(tier, p):
                tq.enter_ring(p)  # to the back: everyone else waiting gets a turn first
        return granted

    def _total(self, tier: str) -> int:
        total = self.limiter.tier(tier).policy.concurrency.total
        return total if total is not None else 1 << 62

    def release(self, ticket: Ticket, now: float) -> list[Ticket]:
        """A running event ended: its slot goes to the waiting events whose turn it is (returned,
        now ``running``)."""
        if ticket.state != RUNNING:
            raise ValueError(f"release of event {ticket.id} of {ticket.principal!r}, which is {ticket.state}, not running")
        ticket.state = DONE
        self._ended[DONE] += 1
        tq = self._tiers[ticket.tier]
        self.limiter.release(ticket.tier, ticket.principal)
        ran = max(0.0, now - (ticket.started if ticket.started is not None else now))
        tq.service_ewma = ran if tq.service_ewma is None else 0.8 * tq.service_ewma + 0.2 * ran
        if ticket.principal in tq.by_principal:
            tq.enter_ring(ticket.principal)  # under its cap again: back in the turn order
        return self._grant(tq, now)

    def cancel(self, ticket: Ticket, now: float) -> list[Ticket]:
        """The client went away. A waiting event leaves the queue; a running one is released.
        Returns tickets granted as a result. Ending an ended ticket does nothing."""
        if ticket.state == RUNNING:
            granted = self.release(ticket, now)
            ticket.state = CANCELLED
            self._ended[DONE] -= 1
            self._ended[CANCELLED] += 1
            return granted
        if ticket.state == WAITING:
            self._tiers[ticket.tier].remove(ticket)
            ticket.state = CANCELLED
            self._ended[CANCELLED] += 1
        return []

    def expire(self, now: float) -> list[Ticket]:
        """End every waiting event whose deadline has passed (state ``expired``); returns them."""
        out = []
        for tq in self._tiers.values():
            arr = tq.arrivals
            while arr:
                t = next(iter(arr.values()))
                if t.deadline > now:
                    break
                tq.remove(t)
                t.state = EXPIRED
                out.append(t)
        self._ended[EXPIRED] += len(out)
        return out

    def time_out(self, ticket: Ticket, now: float) -> None:
        """End one waiting event as expired: its waiter's own timer fired (possibly a hair before
        ``deadline`` by the loop's clock resolution, which ``expire`` would not count yet)."""
        if ticket.state == WAITING:
            self._tiers[ticket.tier].remove(ticket)
            ticket.state = EXPIRED
            self._ended[EXPIRED] += 1

    # ------------------------------------------------------------------------- introspection
    def estimate_free(self, tier: str, now: float) -> float:
        """When a queue slot will likely be free: the events ahead served at the recent rate.
        An estimate for Retry-After on a full queue, capped at the tier's ``max_wait``."""
        tq = self._tiers[tier]
        per = tq.service_ewma if tq.service_ewma is not None else tq.max_wait
        slots = max(1, min(self._total(tier), self.limiter.in_flight(tier) or 1))
        return now + min(tq.max_wait, per * (tq.waiting() + 1) / slots)

    def waiting(self, tier: str, principal: str | None = None) -> int:
        tq = self._tiers[tier]
        return tq.waiting() if principal is None else len(tq.by_principal.get(principal, ()))

    def waiting_tickets(self, tier: str) -> list[Ticket]:
        return list(self._tiers[tier].arrivals.values())

    def statistics(self) -> QueueStatistics:
        return QueueStatistics(
            waiting={n: tq.waiting() for n, tq in self._tiers.items()},
            running={n: self.limiter.in_flight(n) for n in self._tiers},
            accepted=self._accepted, refused=dict(self._refused), ended=dict(self._ended))
