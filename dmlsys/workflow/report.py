"""What a run records about each step (pure data), and how it is shown.

Step states, in the order a step normally goes through them::

    pending -> running -> done
                       -> partial  (an async-edge step between runs: has a result, waits for more)
                       -> failed   (its last attempt raised or timed out)
    pending -> skipped             (a dependency failed or was skipped; policy "continue")
    pending/running -> cancelled   (another step failed under "fail_fast", or the run was cancelled)

``cache`` is ``"hit"`` (result loaded from the memo store), ``"miss"`` (computed, then stored),
or ``"off"`` (the step is not memoized, or no store was given).
"""

from __future__ import annotations

from typing import Any, Iterable

PENDING, RUNNING, PARTIAL, DONE, FAILED, SKIPPED, CANCELLED = (
    "pending", "running", "partial", "done", "failed", "skipped", "cancelled")
FINAL_STATES = frozenset({DONE, FAILED, SKIPPED, CANCELLED})


class StepRecord:
    """One step's history in one run. Times are seconds since the run started (run clock)."""

    __slots__ = ("name", "state", "start", "end", "attempts", "runs", "cache", "key", "error")

    def __init__(self, name: str) -> None:
        self.name = name
        self.state = PENDING
        self.start: float | None = None  # first attempt of the first run began
        self.end: float | None = None  # reached a final state
        self.attempts = 0  # calls of the function, over all runs and retries
        self.runs = 0  # successful runs (> 1 only for steps with an AsCompleted edge)
        self.cache = "off"
        self.key: str | None = None  # cache key of the last run, when memoized
        self.error: str | None = None  # "Type: message" of the last failure

    @property
    def duration(self) -> float | None:
        return None if self.start is None or self.end is None else self.end - self.start

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}

    def __repr__(self) -> str:
        return f"StepRecord({self.name!r}, {self.state}, attempts={self.attempts}, cache={self.cache})"


class RunReport:
    """Every step's record, in topological order, plus the run's own wall time."""

    __slots__ = ("workflow", "records", "elapsed")

    def __init__(self, workflow: str, records: Iterable[StepRecord]) -> None:
        self.workflow = workflow
        self.records = {r.name: r for r in records}
        self.elapsed: float | None = None

    def __getitem__(self, name: str) -> StepRecord:
        return self.records[name]

    def states(self) -> dict[str, str]:
        return {n: r.state for n, r in self.records.items()}

    def ran(self) -> list[str]:
        """Steps whose function was actually called (cache hits and skips excluded)."""
        return [n for n, r in self.records.items() if r.attempts > 0]

    def hits(self) -> list[str]:
        return [n for n, r in self.records.items() if r.cache == "hit"]

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.records.values():
            out[r.state] = out.get(r.state, 0) + 1
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"workflow": self.workflow, "elapsed": self.elapsed,
                "steps": [r.to_dict() for r in self.records.values()]}

    def table(self, limit: int | None = None) -> Any:
        """A rich Table: step, state, time, cache, attempts. With ``limit``, the running steps
        and the most recently changed ones, so a 10,000-step run still fits a screen."""
        from rich.table import Table

        records = list(self.records.values())
        title = f"{self.workflow}: " + ", ".join(f"{v} {k}" for k, v in sorted(self.counts().items()))
        if limit is not None and len(records) > limit:
            def recency(r: StepRecord) -> float:
                if r.state == RUNNING:
                    return float("inf")
                return r.end if r.end is not None else (r.start if r.start is not None else float("-inf"))
            records = sorted(records, key=recency, reverse=True)[:limit]
        t = Table(title=title)
        for col, just in (("step", "left"), ("state", "left"), ("time", "right"), ("cache", "left"), ("attempts", "right")):
            t.add_column(col, justify=just)
        style = {DONE: "green", FAILED: "red", RUNNING: "yellow", PARTIAL: "cyan", SKIPPED: "dim", CANCELLED: "magenta"}
        for r in records:
            d = r.duration
            t.add_row(r.name, f"[{style.get(r.state, '')}]{r.state}[/]" if r.state in style else r.state,
                      "" if d is None else f"{d:.3f}s", r.cache, str(r.attempts))
        return t
