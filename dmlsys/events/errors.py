"""What the event queue answers instead of running an event, one class per answer the client gets.

Each error carries its HTTP status and, where there is one, ``retry_after``: seconds from now,
already rounded *up* to whole seconds as the ``Retry-After`` header needs (rounding down would
send the client back before it can be admitted). The front door maps them with
``status``/``retry_after`` alone, as it does ``dmlsys.serving.errors``.
"""

from __future__ import annotations

import math


class EventsError(Exception):
    """Base of every error :mod:`dmlsys.events` raises to a client. ``status`` is the HTTP status."""

    status = 500
    retry_after: int | None = None  # whole seconds, for the Retry-After header


def retry_seconds(at: float, now: float) -> int:
    """Whole seconds from ``now`` until ``at``, rounded up (never early), at least 1."""
    return max(1, math.ceil(at - now - 1e-12)) if at > now else 1


class Unauthorized(EventsError):
    """The Authorization header is malformed, or names a key that is unknown or revoked."""

    status = 401


class RateLimited(EventsError):
    """The principal's tier allows no more events now; ``retry_after`` is exact (rounded up)."""

    status = 429

    def __init__(self, principal: str, tier: str, rate: str, retry_after: int) -> None:
        super().__init__(f"rate limit of tier {tier!r} reached for {principal} ({rate}); retry after {retry_after}s")
        self.principal, self.tier, self.retry_after = principal, tier, retry_after


class QueueFull(EventsError):
    """The tier's queue is full (or this event was pushed out by a fairer one); ``retry_after``
    is an estimate from recent service times, not a promise."""

    status = 429

    def __init__(self, tier: str, depth: int, retry_after: int, why: str = "is full") -> None:
        super().__init__(f"the queue of tier {tier!r} ({depth} events) {why}; retry after {retry_after}s")
        self.tier, self.retry_after = tier, retry_after


class TooManyPrincipals(EventsError):
    """The tier tracks as many principals as its ``max_principals`` allows and none is idle."""

    status = 429

    def __init__(self, tier: str, retry_after: int) -> None:
        super().__init__(f"tier {tier!r} is tracking its maximum number of principals; retry after {retry_after}s")
        self.tier, self.retry_after = tier, retry_after


class QueueTimeout(EventsError):
    """The event waited ``max_wait`` seconds in the queue without a free slot: the pool is saturated."""

    status = 503

    def __init__(self, tier: str, waited: float, retry_after: int) -> None:
        super().__init__(f"no slot of tier {tier!r} came free within {waited:g}s; retry after {retry_after}s")
        self.tier, self.retry_after = tier, retry_after
