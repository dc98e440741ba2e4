"""The event gate: the asyncio shell around ``EventQueue`` that the HTTP front door calls.

One gate per front door process. For each request::

    principal = gate.identify(request.headers.get("Authorization"), request.remote)   # 401
    async with gate.admission(principal):        # runs now, or waits its turn (bounded), or 429/503
        return await forward_to_the_pool(...)
    # EventsError subclasses carry .status and .retry_after (whole seconds, rounded up)

What a client sees: 401 for a bad key (``Unauthorized``); 429 with an exact Retry-After when its
tier's rate is used up (``RateLimited``); 429 when the tier's queue is full or its event was
pushed out for a fairer one (``QueueFull``), with Retry-After the time the queue will have
drained at the rate it drained over the last ``drain_window`` seconds, never past the newest
waiting event's deadline nor before the principal's next rate admission
(``EventQueue.estimate_free``); 429 with an estimate when the tier tracks too many principals
(``TooManyPrincipals``); 503 when it waited ``max_wait`` without a slot (``QueueTimeout``,
Retry-After as for a full queue). Nothing waits without bound, and every accepted event ends in exactly one
of: it ran, or one of those errors reached its waiter.

The clock is the running loop's ``time()`` (monotonic; virtual under ``dmlsys.wire.sim``).
Idle principals are forgotten a ``sweep_budget`` at a time every ``sweep_every`` seconds, from
within ``admission`` (no background task outlives the gate, and no long scan stalls the loop:
a full scan of 100,000 principals takes ~30 ms on this machine, a budget of 1,000 ~0.3 ms).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator, Iterable, Mapping

from dmlsys.events.errors import QueueFull, QueueTimeout, RateLimited, TooManyPrincipals, Unauthorized, retry_seconds
from dmlsys.events.keys import ANONYMOUS_TIER, KeyFile, KeyRing, Principal, identify
from dmlsys.events.limiter import Limiter
from dmlsys.events.queue import RUNNING, WAITING, EventQueue, Refusal, Ticket
from dmlsys.events.tiers import Tier, TierError


class EventGate:
    """Identify, admit, queue fairly or refuse; see the module docstring."""

    def __init__(self, tiers: Iterable[Tier] | Mapping[str, Tier], keys: KeyFile | KeyRing | None = None, *,
                 anonymous_tier: str = ANONYMOUS_TIER, sweep_every: float = 1.0, sweep_budget: int = 1000,
                 drain_window: float = 6.0) -> None:
        self.limiter = Limiter(tiers)
        self.queue = EventQueue(self.limiter, drain_window=drain_window)
        if anonymous_tier not in self.limiter.tiers:
            raise TierError(f"anonymous tier {anonymous_tier!r} is not configured; "
                            f"configured tiers: {', '.join(self.limiter.tiers)}")
        self.anonymous_tier = anonymous_tier
        self._keys = keys if keys is not None else KeyRing()
        self.sweep_every, self.sweep_budget = sweep_every, sweep_budget
        self._swept = -float("inf")

    @staticmethod
    def _now() -> float:
        return asyncio.get_running_loop().time()

    def identify(self, authorization: str | None, client: str | None) -> Principal:
        """The request's principal (raises ``Unauthorized``). A key whose tier is not configured
        is refused as 401 too, naming the tier, rather than silently running under another."""
        ring = self._keys.current(self._now()) if isinstance(self._keys, KeyFile) else self._keys
        p = identify(authorization, client, ring, self.anonymous_tier)
        if p.tier not in self.limiter.tiers:
            raise Unauthorized(f"the key of {p.name!r} is in tier {p.tier!r}, which this gateway does not configure")
        return p

    def _refusal_error(self, r: Refusal, now: float) -> Exception:
        secs = retry_seconds(r.retry_at, now)
        if r.reason == "rate":
            rates = ", ".join(map(str, self.limiter.tier(r.tier).policy.rates))
            return RateLimited(r.principal, r.tier, rates, secs)
        if r.reason == "principals":
            return TooManyPrincipals(r.tier, secs)
        return QueueFull(r.tier, self.limiter.tier(r.tier).policy.queue.depth, secs)

    def _wake(self, granted: list[Ticket]) -> None:
        for t in granted:
            fut = t.token
            if fut is not None and not fut.done():
                fut.set_result(None)

    @contextlib.asynccontextmanager
    async def admission(self, principal: Principal) -> AsyncIterator[Ticket]:
        """Hold a concurrency slot of the principal's tier for the block; see the module docstring.

        Raises:
            RateLimited, QueueFull, TooManyPrincipals: refused at once (429).
            QueueTimeout: waited the tier's ``max_wait`` without a slot (503).
        """
        now = self._now()
        if now - self._swept >= self.sweep_every:
            self._swept = now
            self.limiter.sweep(now, self.sweep_budget)
        got, displaced = self.queue.offer(principal.tier, principal.id, now)
        for d in displaced:
            if d.token is not None and not d.token.done():
                d.token.set_exception(QueueFull(d.tier, self.limiter.tier(d.tier).policy.queue.depth,
                                                retry_seconds(self.queue.estimate_free(d.tier, now, d.principal), now),
                                                why="pushed this event out for one of a client with fewer waiting"))
        if isinstance(got, Refusal):
            raise self._refusal_error(got, now)
        ticket = got
        if ticket.state == WAITING:
            ticket.token = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(asyncio.shield(ticket.token), max(0.0, ticket.deadline - now))
            except asyncio.TimeoutError:
                if ticket.state == WAITING:
                    self.queue.time_out(ticket, self._now())
                if ticket.state != RUNNING:
                    now = self._now()
                    raise QueueTimeout(ticket.tier, ticket.deadline - ticket.arrived, retry_seconds(
                        self.queue.estimate_free(ticket.tier, now, ticket.principal), now)) from None
            except asyncio.CancelledError:  # the client went away while waiting (or was granted at that moment)
                self._wake(self.queue.cancel(ticket, self._now()))
                raise
            # a displaced ticket's future carries QueueFull: wait_for raised it above
        try:
            yield ticket
        finally:
            if ticket.state == RUNNING:
                self._wake(self.queue.release(ticket, self._now()))

    def statistics(self) -> dict:
        """For /metrics and status: per tier waiting and running; counters of the queue and limiter."""
        q, lim = self.queue.statistics(), self.limiter.statistics()
        return {"waiting": q.waiting, "running": q.running, "principals": dict(lim.principals),
                "accepted": q.accepted, "refused": {**q.refused}, "ended": q.ended, "evicted": lim.evicted}
