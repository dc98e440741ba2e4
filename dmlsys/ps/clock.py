"""Per-worker clocks and the read rule of BSP, SSP and ASP. Pure: time is passed in.

Each shard keeps one ``Clock`` per job. A worker's **clock** is the number of steps it has
pushed to this shard: pushing step ``t`` moves it from ``t`` to ``t + 1``. Before computing step
``c`` a worker **reads** (pulls) at clock ``c``. The job's **floor** is the least clock among the
live workers: every update of every step below the floor is in this shard's parameters (for
BSP the server applies a step's summed update the moment the floor passes it, see
``Tick.completed``).

**The read rule.** Worker ``w`` may read at clock ``c`` when

    clock[w] >= c                    (its own pushes are in: read-my-writes)
    floor    >= c - s                (no live worker is more than s steps behind the reader)

with ``s = 0`` for BSP, the configured staleness for SSP, and no second condition for ASP.

**Guarantee** (Ho et al., "More Effective Distributed ML via a Stale Synchronous Parallel
Parameter Server", NIPS 2013): a read at clock ``c`` sees every update of every live worker's
steps ``0 .. c-s-1``; under BSP, exactly the updates of steps ``0 .. c-1`` (a worker cannot push
step ``c`` before it has read at ``c``, and step ``c`` is applied only when every live worker has
pushed it). So a worker under SSP never computes on parameters more than ``s`` clocks old, and
no worker gets more than ``s + 1`` steps ahead of the slowest. ``tests/ps/test_clock.py``
checks both against random interleavings.

**Dead workers.** A worker silent for the drop timeout while others wait on it is dropped
(``laggards`` names it, the shell logs and calls ``drop``): the floor ignores it from then on,
and its later pushes are refused (``WorkerDropped``), since under BSP its step was already
applied without it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Iterable

from dmlsys.ps.errors import PsError, WorkerDropped

MODELS = ("bsp", "ssp", "asp")


@dataclasses.dataclass(frozen=True, slots=True)
class Consistency:
    """A job's consistency model: ``bsp`` (staleness 0), ``ssp`` (staleness s >= 0), ``asp`` (none)."""

    model: str = "bsp"
    staleness: int = 0

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise PsError(f"consistency: one of {', '.join(MODELS)}, got {self.model!r}")
        if not isinstance(self.staleness, int) or isinstance(self.staleness, bool) or self.staleness < 0:
            raise PsError(f"staleness: an integer >= 0, got {self.staleness!r}")
        if self.model == "bsp" and self.staleness:
            raise PsError(f"bsp means staleness 0, got {self.staleness}; use model 'ssp' for a bound > 0")

    @property
    def bound(self) -> int | None:
        """How many clocks behind the reader the slowest worker may be; None: unbounded (ASP)."""
        return None if self.model == "asp" else self.staleness

    @property
    def aggregates(self) -> bool:
        """BSP sums a step's pushes and applies them as one update (so N workers compute what one
        worker does on the global batch); SSP and ASP apply each push as it comes."""
        return self.model == "bsp"


BSP = Consistency("bsp", 0)
ASP = Consistency("asp", 0)


def ssp(staleness: int) -> Consistency:
    return Consistency("ssp", staleness)


@dataclasses.dataclass(frozen=True, slots=True)
class Tick:
    """What one event changed: steps whose every live worker has now pushed (in order), and the
    parked reads that may now be answered."""

    completed: tuple[int, ...] = ()
    released: tuple[Hashable, ...] = ()
    duplicate: bool = False  # the push was already counted (a retry): ack it, apply nothing


class Clock:
    """The clocks of one job's workers on one shard, and the reads waiting on them."""

    __slots__ = ("_parked", "clocks", "consistency", "dropped", "last_heard")

    def __init__(self, workers: Iterable[str], consistency: Consistency = BSP, *, now: float = 0.0) -> None:
        names = list(workers)
        if not names or len(set(names)) != len(names):
            raise PsError(f"workers: distinct names, at least one, got {names}")
        self.consistency = consistency
        self.clocks: dict[str, int] = {w: 0 for w in names}
        self.dropped: dict[str, int] = {}  # worker -> its clock when dropped
        self.last_heard: dict[str, float] = {w: now for w in names}
        self._parked: dict[Hashable, tuple[str, int, int]] = {}  # token -> (worker, clock, at_least)

    # -- questions ---------------------------------------------------------------------------

    @property
    def floor(self) -> int:
        """The least clock among live workers (every clock, once all are dropped)."""
        live = [c for w, c in self.clocks.items() if w not in self.dropped]
        return min(live) if live else max(self.clocks.values())

    def may_read(self, worker: str, clock: int, at_least: int = 0) -> bool:
        """Whether ``worker`` may read at ``clock`` now (the module docstring's rule), and, when
        asked, with every live worker's steps below ``at_least`` in (the final read of a job)."""
        self._check(worker)
        if self.clocks[worker] < clock:
            return False
        floor = self.floor
        if floor < at_least:
            return False
        bound = self.consistency.bound
        return bound is None or floor >= clock - bound

    def laggards(self, now: float, timeout: float) -> list[str]:
        """Live workers at the floor that were last heard from more than ``timeout`` ago while a
        read waits on the floor: the ones to drop."""
        if not self._parked:
            return []
        floor = self.floor
        return [w for w, c in self.clocks.items()
                if w not in self.dropped and c == floor and now - self.last_heard[w] > timeout]

    @property
    def parked(self) -> int:
        return len(self._parked)

    # -- events ------------------------------------------------------------------------------

    def read(self, worker: str, clock: int, token: Hashable, now: float | None = None, at_least: int = 0) -> bool:
        """A read at ``clock``: True to answer it now, False when it is parked under ``token``
        until an event releases it (or ``cancel``)."""
        self._check(worker)
        if now is not None:
            self.last_heard[worker] = max(self.last_heard[worker], now)
        if self.may_read(worker, clock, at_least):
            return True
        self._parked[token] = (worker, clock, at_least)
        return False

    def cancel(self, token: Hashable) -> None:
        self._parked.pop(token, None)

    def push(self, worker: str, clock: int, now: float = 0.0) -> Tick:
        """``worker`` pushed its step ``clock``. Raises WorkerDropped for a dropped worker and
        PsError for a step that skips one (a push lost without the worker knowing)."""
        self._check(worker)
        mine = self.clocks[worker]
        self.last_heard[worker] = max(self.last_heard[worker], now)
        if clock < mine:
            return Tick(duplicate=True)
        if clock > mine:
            raise PsError(f"worker {worker!r} pushed step {clock} but this shard has its steps up to "
                          f"{mine - 1} only; a push in between was lost")
        before = self.floor
        self.clocks[worker] = mine + 1
        return self._after(before)

    def peek_push(self, worker: str, clock: int) -> Tick:
        """What ``push(worker, clock)`` would return (its ``completed`` and ``duplicate``; no
        released reads), without changing anything: a shard computes the update first and moves
        the clock after, so that no read is let through before the values it needs are in."""
        self._check(worker)
        mine = self.clocks[worker]
        if clock < mine:
            return Tick(duplicate=True)
        if clock > mine:
            raise PsError(f"worker {worker!r} pushed step {clock} but this shard has its steps up to "
                          f"{mine - 1} only; a push in between was lost")
        return Tick(tuple(range(self.floor, self._floor_with({worker: mine + 1}))))

    def peek_drop(self, worker: str) -> Tick:
        """What ``drop(worker)`` would complete, without changing anything (see ``peek_push``)."""
        if worker not in self.clocks:
            raise PsError(f"no worker {worker!r} in this job (workers: {', '.join(self.clocks)})")
        if worker in self.dropped:
            return Tick()
        return Tick(tuple(range(self.floor, self._floor_with({}, also_dropped=worker))))

    def _floor_with(self, clocks: dict[str, int], also_dropped: str | None = None) -> int:
        merged = {**self.clocks, **clocks}
        live = [c for w, c in merged.items() if w not in self.dropped and w != also_dropped]
        return min(live) if live else max(merged.values())

    def drop(self, worker: str) -> Tick:
        """Take ``worker`` out of the floor (a dead worker must not stall the others)."""
        if worker not in self.clocks:
            raise PsError(f"no worker {worker!r} in this job (workers: {', '.join(self.clocks)})")
        if worker in self.dropped:
            return Tick()
        before = self.floor
        self.dropped[worker] = self.clocks[worker]
        released = [t for t, (w, _, _) in self._parked.items() if w == worker]
        for t in released:
            del self._parked[t]  # its own reads are answered with WorkerDropped by the shell
        tick = self._after(before)
        return Tick(tick.completed, tuple(released) + tick.released)

    def _after(self, before: int) -> Tick:
        after = self.floor
        released = [t for t, (w, c, least) in self._parked.items() if self.may_read(w, c, least)]
        for t in released:
            del self._parked[t]
        return Tick(tuple(range(before, after)), tuple(released))

    def _check(self, worker: str) -> None:
        if worker not in self.clocks:
            raise PsError(f"no worker {worker!r} in this job (workers: {', '.join(self.clocks)})")
        if worker in self.dropped:
            raise WorkerDropped(f"worker {worker!r} was dropped from the barrier at clock {self.dropped[worker]}")

    # -- durable form -------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {"model": self.consistency.model, "staleness": self.consistency.staleness,
                "clocks": dict(self.clocks), "dropped": dict(self.dropped)}

    @classmethod
    def from_dict(cls, d: dict, *, now: float = 0.0) -> Clock:
        clock = cls(list(d["clocks"]), Consistency(d["model"], int(d["staleness"])), now=now)
        clock.clocks = {str(w): int(c) for w, c in d["clocks"].items()}
        clock.dropped = {str(w): int(c) for w, c in d["dropped"].items()}
        return clock
