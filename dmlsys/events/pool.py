"""The shared pool's bookkeeping: which instances exist, where events go, what to start and stop.

A pure core: the shell (not built yet) starts and stops node processes and reports back. The
pool has ``slots``; an instance of a function takes ``FunctionSpec.slots`` of them from the
moment it is asked to start until it is gone, draining included, so the slots in use are the
slots the machines really hold.

An instance is ``starting`` (asked to start, loading), ``ready`` (takes events), or
``draining`` (takes no new events; stopped once its last event ends). ``reconcile(target, now)``
turns the autoscaler's decision into actions:

* too many live (starting + ready) instances of a function: drain the cheapest to lose first:
  starting ones (no events, no warm state), then ready ones with the fewest events in flight.
  An idle one is stopped at once (``Stop``); a busy one is drained (``Drain``) and stopped by
  ``end`` when its last event ends. Never is an instance stopped with events in flight.
* too few: first take back draining instances of the function (warm, already paid for: a scale
  down followed by a scale up costs no cold start), then ``Start`` new ones while free slots
  last, higher-priority functions first. A function short of slots waits for draining
  instances of others to finish: the pool is never oversubscribed, even for a moment.

A failed instance (``failed``) is forgotten and its slots freed; the next ``reconcile`` with the
same target starts a replacement. Its events in flight are the shell's to retry elsewhere (the
count is returned so it knows how many).

``pick(function)`` is where an event goes: the ready, non-draining instance with the fewest in
flight (ties: the oldest); None when there is none ready, in which case the event waits in the
queue for the cold start rather than failing. Cold starts (asked -> ready) are recorded per
function for status and metrics.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Mapping

from dmlsys.events.autoscaler import FunctionSpec, ScalingError

STARTING, READY, DRAINING = "starting", "ready", "draining"


@dataclasses.dataclass(slots=True)
class Instance:
    id: str
    function: str
    slots: int
    state: str
    asked: float  # when Start was planned
    ready_at: float | None = None
    in_flight: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class Start:
    function: str
    instance: str  # the id the shell reports back with


@dataclasses.dataclass(frozen=True, slots=True)
class Drain:
    instance: str  # send it no new events


@dataclasses.dataclass(frozen=True, slots=True)
class Undrain:
    instance: str  # takes events again


@dataclasses.dataclass(frozen=True, slots=True)
class Stop:
    instance: str  # idle: stop its process


class PoolError(ValueError):
    """A call that does not fit the pool's state (unknown instance, event ended twice); names it."""


class Pool:
    """Instances of several functions in ``slots`` shared slots; see the module docstring."""

    def __init__(self, slots: int, functions: Mapping[str, FunctionSpec] | list[FunctionSpec]) -> None:
        specs = list(functions.values()) if isinstance(functions, Mapping) else list(functions)
        if isinstance(slots, bool) or not isinstance(slots, int) or slots < 0:
            raise ScalingError(f"pool slots must be an integer >= 0, got {slots!r}")
        self.slots = slots
        self.specs = {s.name: s for s in specs}
        self.instances: dict[str, Instance] = {}
        self.cold_starts: dict[str, list[float]] = {s.name: [] for s in specs}
        self._ids = itertools.count(1)

    def add(self, spec: FunctionSpec) -> None:
        """A function deployed while the pool runs (or a new spec for one: slots must not change)."""
        old = self.specs.get(spec.name)
        if old is not None and old.slots != spec.slots:
            raise ScalingError(f"function {spec.name!r} has instances of {old.slots} slot(s); cannot change to {spec.slots}")
        self.specs[spec.name] = spec
        self.cold_starts.setdefault(spec.name, [])

    # ------------------------------------------------------------------------- views
    def used(self) -> int:
        return sum(i.slots for i in self.instances.values())

    def live(self, function: str) -> list[Instance]:
        return [i for i in self.instances.values() if i.function == function and i.state != DRAINING]

    def counts(self) -> dict[str, dict[str, int]]:
        """Per function: instances starting, ready, draining (for status and /metrics)."""
        out = {f: {STARTING: 0, READY: 0, DRAINING: 0} for f in self.specs}
        for i in self.instances.values():
            out[i.function][i.state] += 1
        return out

    def _get(self, instance: str) -> Instance:
        try:
            return self.instances[instance]
        except KeyError:
            raise PoolError(f"unknown instance {instance!r} (stopped, failed, or never started)") from None

    # ------------------------------------------------------------------------- reconcile
    def reconcile(self, target: Mapping[str, int], now: float) -> list[Start | Drain | Undrain | Stop]:
        """Actions that move live instance counts towards ``target`` (the autoscaler's decision)."""
        actions: list[Start | Drain | Undrain | Stop] = []
        for f in self.specs:  # shrink first: what it frees may let others grow
            live = self.live(f)
            extra = len(live) - target.get(f, 0)
            if extra <= 0:
                continue
            # cheapest to lose first: starting, then ready with the fewest in flight, newest first
            live.sort(key=lambda i: (i.state != STARTING, i.in_flight, -i.asked, i.id))
            for inst in live[:extra]:
                if inst.in_flight == 0:
                    del self.instances[inst.id]
                    actions.append(Stop(inst.id))
                else:
                    inst.state = DRAINING
                    actions.append(Drain(inst.id))
        by_priority = sorted(self.specs.values(), key=lambda s: (-s.priority, s.name))
        for spec in by_priority:  # take back warm draining instances before paying for cold starts
            short = target.get(spec.name, 0) - len(self.live(spec.name))
            if short <= 0:
                continue
            draining = sorted((i for i in self.instances.values() if i.function == spec.name and i.state == DRAINING),
                              key=lambda i: (-i.in_flight, i.asked))
            for inst in draining[:short]:
                inst.state = READY if inst.ready_at is not None else STARTING
                actions.append(Undrain(inst.id))
        free = self.slots - self.used()
        for spec in by_priority:
            short = target.get(spec.name, 0) - len(self.live(spec.name))
            while short > 0 and spec.slots <= free:
                inst = Instance(f"{spec.name}-{next(self._ids)}", spec.name, spec.slots, STARTING, now)
                self.instances[inst.id] = inst
                actions.append(Start(spec.name, inst.id))
                free -= spec.slots
                short -= 1
        return actions

    # ------------------------------------------------------------------------- what the shell reports
    def ready(self, instance: str, now: float) -> float | None:
        """The instance loaded and takes events; returns its cold start (seconds since asked), or
        None when it was stopped meanwhile (a race the shell need not treat as an error)."""
        inst = self.instances.get(instance)
        if inst is None:
            return None
        if inst.ready_at is None:
            inst.ready_at = now
            self.cold_starts[inst.function].append(now - inst.asked)
        if inst.state == STARTING:
            inst.state = READY
        return now - inst.asked

    def failed(self, instance: str) -> int:
        """The instance died: forget it, free its slots. Returns its events in flight (to retry)."""
        inst = self.instances.pop(instance, None)
        return inst.in_flight if inst is not None else 0

    # ------------------------------------------------------------------------- events
    def pick(self, function: str) -> Instance | None:
        """The ready, non-draining instance of ``function`` with the fewest events in flight."""
        best = None
        for i in self.instances.values():
            if i.function == function and i.state == READY and (
                    best is None or (i.in_flight, i.asked) < (best.in_flight, best.asked)):
                best = i
        return best

    def begin(self, instance: str) -> None:
        inst = self._get(instance)
        if inst.state != READY:
            raise PoolError(f"instance {instance!r} is {inst.state}: it takes no new events")
        inst.in_flight += 1

    def end(self, instance: str) -> Stop | None:
        """An event on ``instance`` ended (answered or failed). A draining instance whose last event
        this was is stopped: the ``Stop`` is returned. An instance already gone (failed) is ignored."""
        inst = self.instances.get(instance)
        if inst is None:
            return None
        if inst.in_flight <= 0:
            raise PoolError(f"instance {instance!r} ended an event it was not running")
        inst.in_flight -= 1
        if inst.state == DRAINING and inst.in_flight == 0:
            del self.instances[instance]
            return Stop(instance)
        return None
