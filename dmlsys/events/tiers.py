"""Tiers: what each class of principal may do, as small value objects that combine with ``+``.

A tier is a name and a ``Policy``; a policy is built from pieces, after the cache policies in
``dmlsys.workflow.policy``::

    ANONYMOUS = Rate(1, HOUR) + Concurrency(per_principal=2) + Queue(depth=16, max_wait=30)
    AUTHENTICATED = Rate(100, SECOND) + Rate(5000, HOUR) + Concurrency(per_principal=3) + Queue(64)

* ``Rate(limit, period)``: at most ``limit`` admissions in any window of ``period`` seconds (a
  sliding window, not a fixed one: see ``dmlsys.events.limiter`` for the bound). Several rates
  all apply; an admission must fit in every one.
* ``Concurrency(per_principal, total)``: events of one principal running at once, and of the
  whole tier; ``None`` is unbounded.
* ``Queue(depth, max_wait)``: events of the tier waiting for a concurrency slot, and the longest
  one may wait before it is answered 429. ``depth=0``: no queue, full means 429 at once.
* ``Principals(max)``: how many principals the tier keeps state for (bounded memory).

Combining: rates accumulate (the same rate twice counts once); for the other pieces the one on
the right wins, so ``DEFAULT_AUTHENTICATED + Concurrency(5)`` overrides one field of a preset.

Configuration is data: ``tiers_from_config`` reads the ``[tiers.NAME]`` tables of a TOML file,
validates everything once, and names the offending field in its error::

    [tiers.anonymous]
    rates = ["1/hour"]             # or [{limit = 1, period = 3600}]
    concurrency = 2                # per principal
    total_concurrency = 8          # whole tier (optional)
    queue = 16
    max_wait = 30
    max_principals = 10000
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping

SECOND, MINUTE, HOUR, DAY = 1.0, 60.0, 3600.0, 86400.0
_UNITS = {"s": SECOND, "sec": SECOND, "second": SECOND, "seconds": SECOND,
          "m": MINUTE, "min": MINUTE, "minute": MINUTE, "minutes": MINUTE,
          "h": HOUR, "hour": HOUR, "hours": HOUR, "d": DAY, "day": DAY, "days": DAY}
_RATE_TEXT = re.compile(r"^\s*(\d+)\s*/\s*(\d*(?:\.\d+)?)\s*([a-z]+)\s*$")

MAX_LOG_ENTRIES = 1024  # per rate per principal: beyond this the log is quantized (see Rate.resolution)


class TierError(ValueError):
    """A tier's configuration is invalid; the message names the field (``tiers.anonymous.rates[0]``)."""


def _positive_int(where: str, value: Any, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise TierError(f"{where} must be a positive integer{' or None' if allow_none else ''}, got {value!r}")


def _positive_float(where: str, value: Any, *, zero: bool = False) -> None:
    ok = (not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
          and (value >= 0 if zero else value > 0))
    if not ok:
        raise TierError(f"{where} must be a finite number {'>= 0' if zero else '> 0'}, got {value!r}")


class Piece:
    """Base of the pieces a policy is built from; ``a + b`` gives a ``Policy``."""

    __slots__ = ()

    def _apply(self, policy: "Policy") -> "Policy":
        raise NotImplementedError

    def __add__(self, other: "Piece") -> "Policy":
        if not isinstance(other, Piece):
            return NotImplemented
        return other._apply(self._apply(Policy()))


@dataclasses.dataclass(frozen=True, slots=True)
class Rate(Piece):
    """At most ``limit`` admissions in any window of ``period`` seconds.

    ``resolution``: admissions are remembered with their expiry rounded *up* by less than this
    many seconds (onto a grid, or to the newest entry's expiry), so a principal's log holds at
    most ``period / resolution + 1`` entries whatever the limit. Rounding up only ever delays an admission (never over-admits); the
    price is that capacity comes back up to ``resolution`` late. ``None`` picks 0 (exact) when
    ``limit <= 1024`` and ``period / 1024`` otherwise."""

    limit: int
    period: float
    resolution: float | None = None

    def __post_init__(self) -> None:
        _positive_int("Rate.limit", self.limit)
        _positive_float("Rate.period", self.period)
        if self.resolution is not None:
            _positive_float("Rate.resolution", self.resolution, zero=True)
            if self.resolution > self.period:
                raise TierError(f"Rate.resolution must be <= Rate.period ({self.period:g}), got {self.resolution!r}")

    @property
    def grain(self) -> float:
        """The resolution in effect: 0.0 means exact (one log entry per distinct admission time)."""
        if self.resolution is not None:
            return float(self.resolution)
        return 0.0 if self.limit <= MAX_LOG_ENTRIES else self.period / MAX_LOG_ENTRIES

    @classmethod
    def parse(cls, text: str) -> "Rate":
        """``"100/second"``, ``"100/s"``, ``"1/hour"``, ``"30/5min"``."""
        m = _RATE_TEXT.match(text.lower()) if isinstance(text, str) else None
        if not m or m.group(3) not in _UNITS:
            raise TierError(f"a rate reads LIMIT/[N]UNIT with UNIT one of s, min, hour, day (e.g. '100/s', "
                            f"'30/5min'), got {text!r}")
        scale = float(m.group(2)) if m.group(2) else 1.0
        return cls(int(m.group(1)), scale * _UNITS[m.group(3)])

    def _apply(self, policy: "Policy") -> "Policy":
        rates = policy.rates if self in policy.rates else policy.rates + (self,)
        return dataclasses.replace(policy, rates=rates)

    def __str__(self) -> str:
        return f"{self.limit}/{self.period:g}s"


@dataclasses.dataclass(frozen=True, slots=True)
class Concurrency(Piece):
    """Events running at once: per principal, and for the whole tier (``None``: unbounded)."""

    per_principal: int | None = None
    total: int | None = None

    def __post_init__(self) -> None:
        _positive_int("Concurrency.per_principal", self.per_principal, allow_none=True)
        _positive_int("Concurrency.total", self.total, allow_none=True)

    def _apply(self, policy: "Policy") -> "Policy":
        return dataclasses.replace(policy, concurrency=self)


@dataclasses.dataclass(frozen=True, slots=True)
class Queue(Piece):
    """Up to ``depth`` events wait for a concurrency slot, each at most ``max_wait`` seconds."""

    depth: int = 0
    max_wait: float = 30.0

    def __post_init__(self) -> None:
        if isinstance(self.depth, bool) or not isinstance(self.depth, int) or self.depth < 0:
            raise TierError(f"Queue.depth must be an integer >= 0, got {self.depth!r}")
        _positive_float("Queue.max_wait", self.max_wait)

    def _apply(self, policy: "Policy") -> "Policy":
        return dataclasses.replace(policy, queue=self)


@dataclasses.dataclass(frozen=True, slots=True)
class Principals(Piece):
    """The tier keeps state for at most ``max`` principals at once (idle ones are evicted first)."""

    max: int = 100_000

    def __post_init__(self) -> None:
        _positive_int("Principals.max", self.max)

    def _apply(self, policy: "Policy") -> "Policy":
        return dataclasses.replace(policy, principals=self)


@dataclasses.dataclass(frozen=True, slots=True)
class Policy(Piece):
    """A whole tier's limits: the pieces combined. The empty policy limits nothing."""

    rates: tuple[Rate, ...] = ()
    concurrency: Concurrency = Concurrency()
    queue: Queue = Queue()
    principals: Principals = Principals()

    def _apply(self, policy: "Policy") -> "Policy":
        for rate in self.rates:
            policy = rate._apply(policy)
        # the right-hand side's non-default pieces win; its defaults do not erase the left's
        for name in ("concurrency", "queue", "principals"):
            mine = getattr(self, name)
            if mine != _DEFAULT_PIECES[name]:
                policy = dataclasses.replace(policy, **{name: mine})
        return policy


_DEFAULT_PIECES = {"concurrency": Concurrency(), "queue": Queue(), "principals": Principals()}


@dataclasses.dataclass(frozen=True, slots=True)
class Tier:
    """A named policy. Principals are assigned a tier by the key they present (or none: anonymous)."""

    name: str
    policy: Policy = Policy()

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", self.name):
            raise TierError(f"Tier.name must be 1-64 characters of [A-Za-z0-9_.-], got {self.name!r}")
        if isinstance(self.policy, Piece) and not isinstance(self.policy, Policy):
            object.__setattr__(self, "policy", self.policy._apply(Policy()))
        if not isinstance(self.policy, Policy):
            raise TierError(f"Tier.policy of tier {self.name!r} must be a Policy, got {type(self.policy).__name__}")


# The course's example: anonymous users get a trickle and two events at once, authenticated three.
ANONYMOUS = Tier("anonymous", Rate(1, HOUR) + Concurrency(per_principal=2) + Queue(depth=16, max_wait=30.0))
AUTHENTICATED = Tier("authenticated", Rate(100, SECOND) + Concurrency(per_principal=3) + Queue(depth=64, max_wait=30.0))
DEFAULT_TIERS = {t.name: t for t in (ANONYMOUS, AUTHENTICATED)}

_FIELDS = {"rates", "concurrency", "total_concurrency", "queue", "max_wait", "max_principals"}


def tier_from_config(name: str, table: Mapping[str, Any], where: str | None = None) -> Tier:
    """One ``[tiers.NAME]`` table -> ``Tier``; errors name ``tiers.NAME.FIELD``."""
    where = where or f"tiers.{name}"
    if not isinstance(table, Mapping):
        raise TierError(f"{where} must be a table, got {type(table).__name__}")
    unknown = sorted(set(table) - _FIELDS)
    if unknown:
        raise TierError(f"{where}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(_FIELDS))}")
    try:
        Tier(name)
    except TierError as e:
        raise TierError(f"{where}: {e}") from None
    policy = Policy()
    rates = table.get("rates", [])
    if not isinstance(rates, list):
        raise TierError(f"{where}.rates must be a list of rates ('100/s' or {{limit, period}}), got {rates!r}")
    for i, item in enumerate(rates):
        try:
            if isinstance(item, str):
                rate = Rate.parse(item)
            elif isinstance(item, Mapping):
                extra = set(item) - {"limit", "period", "resolution"}
                if extra:
                    raise TierError(f"unknown field(s) {', '.join(sorted(extra))}; known: limit, period, resolution")
                rate = Rate(item.get("limit"), item.get("period"), item.get("resolution"))
            else:
                raise TierError(f"must be '100/s' or {{limit = 100, period = 1}}, got {item!r}")
        except TierError as e:
            raise TierError(f"{where}.rates[{i}]: {e}") from None
        policy = rate._apply(policy)
    for piece, fields in ((Concurrency, {"concurrency": "per_principal", "total_concurrency": "total"}),
                          (Queue, {"queue": "depth", "max_wait": "max_wait"}),
                          (Principals, {"max_principals": "max"})):
        given = {}
        for key, arg in fields.items():
            if key in table:
                try:
                    piece(**{arg: table[key]})  # each field alone first, so the error names it
                except TierError as e:
                    raise TierError(f"{where}.{key}: {e}") from None
                given[arg] = table[key]
        if given:
            policy = piece(**given)._apply(policy)
    return Tier(name, policy)


def tiers_from_config(config: Mapping[str, Any]) -> dict[str, Tier]:
    """The ``tiers`` table of a parsed TOML document (or the document itself) -> ``{name: Tier}``."""
    tables = config.get("tiers", config) if isinstance(config, Mapping) else config
    if not isinstance(tables, Mapping) or not tables:
        raise TierError(f"tiers must be a non-empty table of [tiers.NAME] tables, got {tables!r}")
    return {name: tier_from_config(name, table) for name, table in tables.items()}
