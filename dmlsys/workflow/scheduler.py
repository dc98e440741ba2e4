"""The asyncio scheduler: runs a validated DAG with fan-out, fan-in, async edges and memoization.

How a step runs depends on what it is:

* ``inline=True`` sync function, not memoized — called directly by the dispatch loop the moment
  its inputs are ready: no Task, no thread. This is the fast path (a few µs per step) meant for
  cheap glue (select, merge, format). The loop yields to other tasks every ``yield_every`` s.
* plain sync function — called in a thread of the run's pool (``concurrency`` threads), so a
  long step never blocks the loop and the other steps keep going. A thread whose step returns
  goes on with the next ready plain step itself (one its step just made ready first), so a
  chain of plain steps does not bounce through the loop at every step;
* ``async def`` — awaited in its own Task on the loop (e.g. an RPC to a cluster node);
* memoized steps (a ``cache`` policy and a store) and retried steps run in a Task too, because
  looking up the store and sleeping between attempts must not block the loop.

At most ``concurrency`` Tasks (thread or coroutine steps) run at once; inline steps run on the
loop between them. Every Task is created and awaited by the run: when the run ends — normally,
by failure under ``fail_fast``, or by being cancelled itself — no Task it started is left
behind (structured concurrency, as in ``asyncio.TaskGroup``). A thread cannot be interrupted in
Python: a sync step that timed out or was cancelled keeps its thread until the function
returns; its result is then discarded. Write long steps as coroutines if they must stop promptly.

Failure policies (``RunConfig.on_failure``):

* ``"fail_fast"`` — the first failure (after its retries) cancels every running step and
  starts nothing new;
* ``"continue"`` — steps that depend on a failure are *skipped*; everything else finishes.
  An ``AsCompleted`` edge only needs ``k`` sources to succeed.

Either way, ``run`` raises ``WorkflowFailed`` (with ``.errors`` and the partial ``.result``)
when some step failed, unless ``raise_on_failure=False``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sys
import time
from typing import Any, Awaitable, Callable

from . import report as R
from .dag import Plan, Workflow
from .engine import CONTINUE, FAIL_FAST, Executor
from .errors import WorkflowFailed
from .store import MemoStore

__all__ = ["CONTINUE", "FAIL_FAST", "RunConfig", "RunResult", "Scheduler", "run"]


@dataclasses.dataclass(frozen=True, slots=True)
class RunConfig:
    concurrency: int = 8  # Tasks (thread or coroutine steps) running at once
    on_failure: str = FAIL_FAST  # or CONTINUE
    raise_on_failure: bool = True
    progress: bool | None = None  # live table; None = when stdout is a terminal
    yield_every: float = 0.005  # seconds of back-to-back inline steps before yielding the loop

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError(f"RunConfig.concurrency must be >= 1, got {self.concurrency}")
        if self.on_failure not in (FAIL_FAST, CONTINUE):
            raise ValueError(f"RunConfig.on_failure must be {FAIL_FAST!r} or {CONTINUE!r}, got {self.on_failure!r}")


@dataclasses.dataclass(slots=True)
class RunResult:
    """Final results of the steps that finished (``done``), and the report of every step."""

    results: dict[str, Any]
    report: R.RunReport

    def __getitem__(self, name: str) -> Any:
        return self.results[name]


OnResult = Callable[[str, Any, bool], None]  # (step, value, final)


class Scheduler:
    """Runs workflows. Reusable: each ``run`` call has its own state.

    ``store`` enables memoization for steps with a cache policy; ``clock`` times the report;
    ``sleep`` waits between retries (inject a fake for tests); ``on_result(step, value, final)``
    is called on the loop after every successful run of a step (``final=False`` for the
    intermediate results of an ``AsCompleted`` step); keep it cheap: pool threads wait while it
    runs."""

    def __init__(self, config: RunConfig = RunConfig(), *, store: MemoStore | None = None,
                 clock: Callable[[], float] = time.perf_counter,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 on_result: OnResult | None = None) -> None:
        self.config = config
        self.store = store
        self.clock = clock
        self.sleep = sleep
        self.on_result = on_result

    async def run(self, workflow: Workflow | Plan) -> RunResult:
        """Validate (if given a Workflow) and run. Raises InvalidWorkflow before anything runs."""
        plan = workflow.validate() if isinstance(workflow, Workflow) else workflow
        name = workflow.name if isinstance(workflow, Workflow) else "workflow"
        state = Executor(self, plan, name)
        show = self.config.progress if self.config.progress is not None else sys.stdout.isatty()
        if show:
            from .progress import live_view

            async with live_view(state.report):
                await state.main()
        else:
            await state.main()
        result = RunResult(state.machine.results(), state.report)
        if state.errors and self.config.raise_on_failure:
            raise WorkflowFailed(state.errors, result)
        return result


def run(workflow: Workflow | Plan, config: RunConfig | None = None, **kwargs: Any) -> RunResult:
    """Synchronous convenience: ``asyncio.run(Scheduler(config, **kwargs).run(workflow))``."""
    return asyncio.run(Scheduler(config or RunConfig(), **kwargs).run(workflow))
