"""How many instances each function should have, from the concurrency it sees: a pure core.

After Knative's KPA (Knative Pod Autoscaler). Each function has a ``target``: events one
instance handles at once. Every tick the caller reports each function's observed concurrency
(events in flight plus events queued for it) and asks for a decision.

* **stable mode**: instances = ceil(mean concurrency over the last ``stable_window`` (60 s) /
  target). Slow to react, so a lull of a few seconds does not tear instances down.
* **panic mode**: when the ``panic_window`` (6 s) mean asks for at least ``panic_threshold``
  (2x) the instances the function has now (at least one counted, so any event at zero
  instances panics), it panics: instances = ceil(panic mean / target), and never fewer than
  the function's previous decision while the panic lasts. The panic lasts until a whole
  ``stable_window`` passes without the threshold being crossed again (Knative's rule), or a
  whole stable window passes without any event (ours: the surge is over).
* **scale to zero**: with ``min = 0``, once no event was seen for a whole stable window, both
  means are zero and the panic is over: the decision is 0.

Then ``[min, max]`` clamps each function, and the **pool** divides its ``slots`` (each instance
of a function takes ``FunctionSpec.slots``). What a function wants is its **claim** when it has
work: events in flight or waiting now (the caller's ``work``) or within the panic window (its
observed concurrency there is not zero). A function without work claims nothing: every
instance it holds is idle. Claims are served first, then what functions without work want,
each by the same rules:

1. every function first gets its ``min`` (``Autoscaler`` refuses a configuration whose mins
   do not fit);
2. claims, priority levels in descending order: within a level, every function that claims an
   instance and has none gets one first (no function of a level starves while another of the
   same level holds the whole pool: found by the hotel scenario, where the hotel's panic at the
   conference kept all six slots and the classifier waited at zero), then functions in panic
   keep what they had (up to their claim), then the level's claims are filled one instance at
   a time, round-robin, while slots last. A lower level gets what is left: a pipeline's batch
   step (low priority) yields to a serving function (high) when the pool is full and both have
   work;
3. what functions without work want, by the same rules over what the claims left.

So priority decides only between functions that both have work: the idle instances of a
function without work, whatever its priority, yield their slots to a function with events
(found by experiments/simulate.py: a high-priority function's panic held the whole pool idle
for a stable window while the low-priority one's events waited out their 30 s deadlines, 135
of 1,000 seeds). Without ``work`` every want counts as a claim (the caller knows no better).

Guarantees (tests/events/test_autoscaler.py): the decision never uses more slots than the
pool has; every function is within ``[min, max]``; a function with ``min = 0`` is at 0 once a
stable window has passed without an event; a function short of its claim is short because the
slots went to claims (of higher priority, or round-robin within its level): what other
functions hold beyond their claims and mins, plus the free slots, is less than one instance of
it; a function in panic is never scaled down, except when the pool is full and another
function's claim takes the slots (one of strictly higher priority, one of the same priority
that had no instance getting its first, or any function with work while the panicking one has
none).

Decisions are targets, not facts: the caller starts and stops instances, and passes what it
has (``current``) back in, so a slow start is not mistaken for a missing instance.
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from typing import Iterable, Mapping


class ScalingError(ValueError):
    """An autoscaler configuration is invalid; names the function and field."""


@dataclasses.dataclass(frozen=True, slots=True)
class FunctionSpec:
    """A function's scaling bounds: ``target`` events per instance, ``min``..``max`` instances,
    ``priority`` (higher wins a full pool), ``slots`` of the pool per instance."""

    name: str
    target: float = 1.0
    min: int = 0
    max: int = 4
    priority: int = 0
    slots: int = 1

    def __post_init__(self) -> None:
        where = f"function {self.name!r}"
        if not isinstance(self.target, (int, float)) or not (self.target > 0 and math.isfinite(self.target)):
            raise ScalingError(f"{where}: target must be a finite number > 0, got {self.target!r}")
        for f in ("min", "max", "priority", "slots"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ScalingError(f"{where}: {f} must be an integer, got {v!r}")
        if self.min < 0 or self.max < max(1, self.min):
            raise ScalingError(f"{where}: need 0 <= min <= max and max >= 1, got min={self.min}, max={self.max}")
        if self.slots < 1:
            raise ScalingError(f"{where}: slots must be >= 1, got {self.slots}")


@dataclasses.dataclass(frozen=True, slots=True)
class ScalingConfig:
    """Knative's KPA defaults."""

    stable_window: float = 60.0
    panic_window: float = 6.0
    panic_threshold: float = 2.0

    def __post_init__(self) -> None:
        if not 0 < self.panic_window <= self.stable_window < math.inf:
            raise ScalingError(f"need 0 < panic_window <= stable_window, got {self.panic_window!r}, "
                               f"{self.stable_window!r}")
        if not self.panic_threshold > 1.0:
            raise ScalingError(f"panic_threshold must be > 1 (2.0 = panic at twice the capacity), "
                               f"got {self.panic_threshold!r}")


class _Window:
    """Samples within the last ``width`` seconds, with their running sum."""

    __slots__ = ("width", "samples", "total")

    def __init__(self, width: float) -> None:
        self.width = width
        self.samples: deque[tuple[float, float]] = deque()
        self.total = 0.0

    def add(self, now: float, value: float) -> None:
        self.samples.append((now, value))
        self.total += value

    def mean(self, now: float) -> float:
        s = self.samples
        while s and s[0][0] + self.width <= now:  # a sample counts while t + width > now
            self.total -= s.popleft()[1]
        if not s:
            self.total = 0.0  # no drift from float sums once empty
            return 0.0
        return max(0.0, self.total / len(s))


class _Function:
    __slots__ = ("spec", "stable", "panic", "panic_since", "last_panic", "decided")

    def __init__(self, spec: FunctionSpec, cfg: ScalingConfig) -> None:
        self.spec = spec
        self.stable = _Window(cfg.stable_window)
        self.panic = _Window(cfg.panic_window)
        self.panic_since: float | None = None  # in panic mode when not None
        self.last_panic = -math.inf  # last time the threshold was crossed
        self.decided = spec.min


@dataclasses.dataclass(frozen=True, slots=True)
class Decision:
    """Instances per function; ``wanted`` before the pool divided its slots, of which ``claims``
    for the work the functions have now; who is in panic."""

    instances: Mapping[str, int]
    wanted: Mapping[str, int]
    panicking: frozenset[str]
    slots_used: int
    claims: Mapping[str, int] = dataclasses.field(default_factory=dict)


class Autoscaler:
    """Scaling decisions for functions sharing a pool of ``pool_slots``; see the module docstring.

    Raises:
        ScalingError: bad specs, duplicate names, or mins that do not fit the pool.
    """

    def __init__(self, pool_slots: int, functions: Iterable[FunctionSpec],
                 config: ScalingConfig = ScalingConfig()) -> None:
        if isinstance(pool_slots, bool) or not isinstance(pool_slots, int) or pool_slots < 0:
            raise ScalingError(f"pool_slots must be an integer >= 0, got {pool_slots!r}")
        self.pool_slots, self.config = pool_slots, config
        self._fns: dict[str, _Function] = {}
        for spec in functions:
            if spec.name in self._fns:
                raise ScalingError(f"function {spec.name!r} is configured twice")
            self._fns[spec.name] = _Function(spec, config)
        floor = sum(f.spec.min * f.spec.slots for f in self._fns.values())
        if floor > pool_slots:
            raise ScalingError(f"the functions' mins need {floor} slots but the pool has {pool_slots}: "
                               + ", ".join(f"{f.spec.name} min={f.spec.min}x{f.spec.slots}" for f in self._fns.values()))
        self._now = -math.inf

    def add(self, spec: FunctionSpec) -> None:
        """Deploy a function while running, or change one's spec (its windows are kept).

        Raises:
            ScalingError: the mins would no longer fit the pool (nothing changes then).
        """
        specs = {n: f.spec for n, f in self._fns.items()} | {spec.name: spec}
        floor = sum(s.min * s.slots for s in specs.values())
        if floor > self.pool_slots:
            raise ScalingError(f"function {spec.name!r}: the functions' mins would need {floor} slots but the pool "
                               f"has {self.pool_slots}")
        if spec.name in self._fns:
            self._fns[spec.name].spec = spec
        else:
            self._fns[spec.name] = _Function(spec, self.config)

    def _fn(self, name: str) -> _Function:
        try:
            return self._fns[name]
        except KeyError:
            raise ScalingError(f"unknown function {name!r}; configured: {', '.join(self._fns)}") from None

    def observe(self, name: str, now: float, concurrency: float) -> None:
        """One sample of the function's concurrency (in flight + queued), e.g. once a second."""
        if not (concurrency >= 0 and math.isfinite(concurrency)):
            raise ScalingError(f"function {name!r}: concurrency must be a finite number >= 0, got {concurrency!r}")
        now = max(now, self._now)
        self._now = now
        f = self._fn(name)
        f.stable.add(now, concurrency)
        f.panic.add(now, concurrency)

    def decide(self, now: float, current: Mapping[str, int] | None = None,
               work: Mapping[str, float] | None = None) -> Decision:
        """Instances per function now. ``current``: instances each has (starting ones count);
        defaults to the previous decision. ``work``: each function's events now (in flight +
        waiting; the caller's measure, e.g. the larger of now and the last tick's mean): one
        with work, now or within the panic window, claims what it wants; one without claims
        nothing (module docstring). Without ``work`` every want is a claim."""
        now = max(now, self._now)
        self._now = now
        cfg, wanted, panicking = self.config, {}, set()
        for name, f in self._fns.items():
            spec = f.spec
            have = current.get(name, f.decided) if current is not None else f.decided
            stable_mean = f.stable.mean(now)
            want_stable = math.ceil(stable_mean / spec.target - 1e-9)
            panic_load = f.panic.mean(now) / spec.target  # instances' worth of work, unrounded (as Knative)
            want_panic = math.ceil(panic_load - 1e-9)
            if panic_load / max(1, have) >= cfg.panic_threshold or (have == 0 and want_panic > 0):
                f.last_panic = now
                if f.panic_since is None:
                    f.panic_since = now
            elif f.panic_since is not None and (now - f.last_panic >= cfg.stable_window or stable_mean == 0):
                # Knative ends a panic a stable window after the threshold was last crossed; we
                # also end it once a whole stable window saw no event (the surge is over), so
                # that scale-to-zero comes one stable window after the last event, not up to a
                # panic window later.
                f.panic_since = None
            if f.panic_since is not None:
                panicking.add(name)
                want = max(want_panic, f.decided)  # no scaling down while in panic
            else:
                want = want_stable
            wanted[name] = min(spec.max, max(spec.min, want))
        if work is None:
            claims = wanted
        else:
            claims = {}
            for name, f in self._fns.items():
                w = work.get(name, 0.0)
                if not (w >= 0 and math.isfinite(w)):
                    raise ScalingError(f"function {name!r}: work must be a finite number >= 0, got {w!r}")
                # All it wants, not just ceil(w / target): a busy function's headroom (the stable
                # window's instances, a panic's) is not idle, it is how it meets the next burst.
                # And work within the panic window, not just this tick: serving traffic has
                # lulls of a tick. Taking either for a batch step that always has work cost the
                # year scenario 9-12x the 429s (7 -> 63-84) at the conference spike.
                # (1e-9: the window's running sum keeps float residue after its samples leave)
                claims[name] = wanted[name] if w > 0 or f.panic.mean(now) > 1e-9 else 0
        alloc = self._divide(claims, wanted, panicking)
        for name, n in alloc.items():
            self._fns[name].decided = n
        used = sum(n * self._fns[k].spec.slots for k, n in alloc.items())
        return Decision(alloc, wanted, frozenset(panicking), used, claims)

    def _divide(self, claims: Mapping[str, int], wanted: Mapping[str, int], panicking: set[str]) -> dict[str, int]:
        """The pool's slots: mins first, then claims, then the rest of the wants, each by
        priority levels high to low (module docstring)."""
        fns = self._fns
        alloc = {n: f.spec.min for n, f in fns.items()}
        free = self.pool_slots - sum(f.spec.min * f.spec.slots for f in fns.values())
        levels = sorted({f.spec.priority for f in fns.values()}, reverse=True)
        for limit in (claims, wanted):  # work first: idle instances get only what work left
            for prio in levels:
                level = [n for n, f in fns.items() if f.spec.priority == prio]
                for n in level:  # first, one instance for each function of the level at zero that wants one
                    if alloc[n] == 0 and limit[n] > 0 and fns[n].spec.slots <= free:
                        alloc[n] = 1
                        free -= fns[n].spec.slots
                for n in level:  # then panicking functions keep what they had
                    if n in panicking:
                        keep = min(limit[n], fns[n].decided)
                        extra = max(0, min(keep - alloc[n], free // fns[n].spec.slots))
                        alloc[n] += extra
                        free -= extra * fns[n].spec.slots
                hungry = [n for n in level if alloc[n] < limit[n]]
                while hungry:  # round-robin, one instance at a time
                    nxt = []
                    for n in hungry:
                        if fns[n].spec.slots <= free:
                            alloc[n] += 1
                            free -= fns[n].spec.slots
                            if alloc[n] < limit[n]:
                                nxt.append(n)
                    hungry = nxt
        return alloc

    def statistics(self) -> dict[str, dict]:
        """Per function: the last decision, the two window means, whether in panic."""
        now = self._now
        return {n: {"instances": f.decided, "stable_mean": f.stable.mean(now), "panic_mean": f.panic.mean(now),
                    "panic": f.panic_since is not None} for n, f in self._fns.items()}

