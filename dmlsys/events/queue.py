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

**Retry-After for a full queue** (``estimate_free``): when the events waiting now will have left
the queue. Little's law: the waiting count over the rate at which the tier's queue drained
(events leaving it: granted, expired, cancelled) over the last ``drain_window`` seconds (6 s
by default: the autoscaler's panic window, the time scale on which the pool behind the queue
changes its capacity). Never later than the newest waiting event's deadline (by then every
event waiting now has left, served or timed out: exact), and never earlier than the limiter's
exact next admission for the principal told to retry (``Limiter.retry_after``), since the
retry would need that admission too. With no queue (``depth = 0``) a running event must end
first: one over the rate at which the tier's running events ended. With nothing measured yet:
the newest deadline (``max_wait`` away), or one second with no queue. Still an estimate of
when a place will be free, not a promise of one: other clients may take it first.

Costs: offer, release, cancel and expire are O(1) amortized per event, except a full queue's
push-out, which scans the tier's waiting principals (at most ``depth`` of them). The drain
meters keep 16 counts per tier whatever the traffic.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
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


class _RateMeter:
    """Events per second over the last ``window`` seconds, in 16 buckets (bounded memory)."""

    __slots__ = ("buckets", "count", "since", "width", "window")

    def __init__(self, window: float) -> None:
        self.window, self.width = window, window / 16
        self.buckets: deque[list] = deque()  # [bucket start, events], oldest first
        self.count = 0
        self.since: float | None = None  # when it was first asked to count: the span it can know

    def _trim(self, now: float) -> None:
        while self.buckets and self.buckets[0][0] + self.width <= now - self.window:
            self.count -= self.buckets.popleft()[1]

    def mark(self, now: float, n: int = 1) -> None:
        if self.since is None:
            self.since = now
        if self.buckets and now < self.buckets[-1][0] + self.width:
            self.buckets[-1][1] += n
        else:
            self.buckets.append([now, n])
        self.count += n
        self._trim(now)

    def start(self, now: float) -> None:
        """Something is there to be counted from now (a first event waits): 0/s is a measurement."""
        if self.since is None:
            self.since = now

    def rate(self, now: float) -> float | None:
        """Events per second over the window (or the shorter span since counting began); None
        when nothing was counted yet."""
        self._trim(now)
        if self.since is None:
            return None
        span = min(self.window, now - self.since)
        if span < self.width:
            return None  # too short a look to call it a rate
        return self.count / span


class _TierQueue:
    """Waiting events of one tier: per principal in arrival order, all in arrival order, and the
    ring of principals whose front event could take a slot (their turn order)."""

    __slots__ = ("arrivals", "by_principal", "depth", "drained", "ended", "in_ring", "max_wait", "name", "ring")

    def __init__(self, name: str, depth: int, max_wait: float, drain_window: float) -> None:
        self.name, self.depth, self.max_wait = name, depth, max_wait
        self.by_principal: dict[str, OrderedDict[int, Ticket]] = {}
        self.arrivals: OrderedDict[int, Ticket] = OrderedDict()  # deadlines are non-decreasing in here
        self.ring: deque[str] = deque()
        self.in_ring: set[str] = set()  # may hold principals no longer eligible: checked when popped
        self.drained = _RateMeter(drain_window)  # waiting events leaving the queue: for Retry-After
        self.ended = _RateMeter(drain_window)  # running events ending: Retry-After with no queue

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

    def __init__(self, limiter: Limiter, *, drain_window: float = 6.0) -> None:
        if not (drain_window > 0 and math.isfinite(drain_window)):
            raise ValueError(f"drain_window must be a finite number of seconds > 0, got {drain_window!r}")
        self.limiter = limiter
        self._tiers: dict[str, _TierQueue] = {}
        for name in limiter.tiers:
            q = limiter.tier(name).policy.queue
            self._tiers[name] = _TierQueue(name, q.depth, q.max_wait, drain_window)
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
                return Refusal(tier, principal, "queue_full", self.estimate_free(tier, now, principal)), displaced
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
        tq.drained.start(now)
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
            tq.drained.mark(now)
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
        tq.ended.mark(now)
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
            tq = self._tiers[ticket.tier]
            tq.remove(ticket)
            tq.drained.mark(now)
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
                tq.drained.mark(now)
                t.state = EXPIRED
                out.append(t)
        self._ended[EXPIRED] += len(out)
        return out

    def time_out(self, ticket: Ticket, now: float) -> None:
        """End one waiting event as expired: its waiter's own timer fired (possibly a hair before
        ``deadline`` by the loop's clock resolution, which ``expire`` would not count yet)."""
        if ticket.state == WAITING:
            tq = self._tiers[ticket.tier]
            tq.remove(ticket)
            tq.drained.mark(now)
            ticket.state = EXPIRED
            self._ended[EXPIRED] += 1

    # ------------------------------------------------------------------------- introspection
    def estimate_free(self, tier: str, now: float, principal: str | None = None) -> float:
        """When the events waiting now will have left the tier's queue (a place for a retry):
        waiting / the drain rate over ``drain_window``, at most the newest waiting event's
        deadline, at least ``principal``'s next rate admission. See the module docstring."""
        tq = self._tiers[tier]
        waiting = tq.waiting()
        if waiting:
            surely = next(reversed(tq.arrivals.values())).deadline  # every one waiting has left by then
            rate = tq.drained.rate(now)
            at = min(surely, now + waiting / rate) if rate else surely
        else:  # no queue (depth 0), or it emptied meanwhile: one running event must end
            rate = tq.ended.rate(now)
            at = now + (1.0 / rate if rate else 1.0)
        if principal is not None:
            at = max(at, self.limiter.retry_after(tier, principal, now))
        return max(at, now)

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
