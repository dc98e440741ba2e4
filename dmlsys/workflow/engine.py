"""The engine behind ``Scheduler.run``: the mutable state of one run and its event handlers.

Steps are addressed by their index in the plan. The dispatch loop (``RunState.main``) runs
inline steps directly, hands plain sync steps to the thread pool with a completion callback,
and wraps everything else (coroutines, memoized steps, retries) in a Task. Completion handlers
(``_succeeded`` -> ``_finalize``, ``_fail``, ``_skip``) run on the loop thread and only move
counters and queues, so no locking is needed; ``_lookup`` alone runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
from collections import deque
from typing import TYPE_CHECKING, Any, Awaitable, Mapping, Sequence

from . import report as R
from .dag import AsCompleted, Latest, Plan
from .errors import CacheKeyError, CacheValueError, StepTimeout
from .memo import NotCanonical, cache_key, code_version, fingerprint
from .policy import KeyContext
from .serial import SerialError
from .store import Hit

if TYPE_CHECKING:
    from .scheduler import Scheduler

FAIL_FAST, CONTINUE = "fail_fast", "continue"
_MISSING: Any = object()


class RunState:
    """The mutable state of one run. Steps are addressed by their index in the plan."""

    def __init__(self, sched: Scheduler, plan: Plan, name: str) -> None:
        self.s, self.plan, self.steps = sched, plan, plan.steps
        n = len(plan.steps)
        index = plan.index
        self.records = [R.StepRecord(s.name) for s in plan.steps]
        self.report = R.RunReport(name, self.records)
        self.results: list[Any] = [_MISSING] * n
        self.fps: list[str | None] = [None] * n  # value fingerprints, computed when first needed
        self.errors: dict[str, BaseException] = {}
        self.memo = [sched.store is not None and s.cache.enabled for s in plan.steps]
        # Edges. Positional/keyword inputs are ints (a regular edge: the dep's final result) or
        # ("async", edge id). reg_children / async_children drive completion propagation.
        self.edges: list[list[AsCompleted]] = [[] for _ in range(n)]
        self.pos: list[tuple] = []
        self.kw: list[tuple] = []
        if not any(s.has_async_edges for s in plan.steps):
            # The common case, kept lean (10,000-step DAGs): the plan's edges are the regular edges.
            self.waiting = [len(d) for d in plan.deps]
            self.reg_children: Sequence[Sequence[int]] = plan.children
            self.async_children: list[list[tuple[int, int]]] = [[] for _ in range(n)]
            for s in plan.steps:
                self.pos.append(tuple([index[e] for e in s.args]))
                self.kw.append(tuple([(k, index[e]) for k, e in s.kwargs]) if s.kwargs else ())
        else:
            self._general_edges()
        self.has_async = [bool(e) for e in self.edges]
        self.arrived: list[list[dict[str, Any]]] = [[{} for _ in e] for e in self.edges]
        self.settled: list[list[int]] = [[0] * len(e) for e in self.edges]
        self.total_arrivals = [0] * n
        self.used = [0] * n  # arrivals seen by the latest run
        self.emitted = [0] * n  # the run whose result Latest edges last received
        self.queued = [False] * n
        self.inline_q: deque[int] = deque()
        self.task_q: deque[int] = deque()
        self.retry_from = [0] * n  # attempts already made inline before handing over to a Task
        self.tasks: set[asyncio.Task] = set()
        # Plain sync steps with nothing to await around them (no memo, timeout) go straight to
        # the thread pool, with a callback instead of a Task: half the overhead of a Task that
        # awaits run_in_executor. Retries after a failure take the Task path (they need sleep).
        self.direct = [not (s.inline or s.is_async or s.timeout is not None or m)
                       for s, m in zip(plan.steps, self.memo)]
        self.in_threads = 0
        self.closed = False
        self.stopping = False
        self.wake: asyncio.Future | None = None
        self.executor: concurrent.futures.ThreadPoolExecutor | None = None
        self.t0 = 0.0

    def _general_edges(self) -> None:
        plan, index, n = self.plan, self.plan.index, len(self.plan.steps)
        self.waiting = [0] * n
        reg_children: list[list[int]] = [[] for _ in range(n)]
        self.async_children = [[] for _ in range(n)]
        for i, s in enumerate(plan.steps):
            def spec(edge: Any) -> Any:
                if isinstance(edge, AsCompleted):
                    self.edges[i].append(edge)
                    for src in edge.steps:
                        self.async_children[index[src]].append((i, len(self.edges[i]) - 1))
                    return ("async", len(self.edges[i]) - 1)
                return index[edge]
            self.pos.append(tuple(spec(e) for e in s.args))
            self.kw.append(tuple((k, spec(e)) for k, e in s.kwargs))
            regular = {x for x in self.pos[i] + tuple(v for _, v in self.kw[i]) if isinstance(x, int)}
            self.waiting[i] = len(regular)
            for d in sorted(regular):
                reg_children[d].append(i)
        self.reg_children = reg_children

    # ------------------------------------------------------------------ main loop
    async def main(self) -> None:
        self.t0 = self.s.clock()
        loop = asyncio.get_running_loop()
        limit, yield_every, clock = self.s.config.concurrency, self.s.config.yield_every, self.s.clock
        for i in range(len(self.steps)):
            if not self.steps[i].deps:
                self._enqueue(i)
        try:
            while True:
                if self.inline_q and not self.stopping:
                    deadline = clock() + yield_every
                    q, run_inline = self.inline_q, self._run_inline
                    n = 0
                    while q:
                        run_inline(q.popleft())
                        n += 1
                        if n & 255 == 0 and clock() > deadline:
                            break
                while self.task_q and len(self.tasks) + self.in_threads < limit and not self.stopping:
                    i = self.task_q.popleft()
                    if self.direct[i] and not self.retry_from[i]:
                        self._submit_thread(i, loop)
                    else:
                        task = loop.create_task(self._execute(i), name=f"step:{self.steps[i].name}")
                        self.tasks.add(task)
                if self.stopping:
                    break
                if not self.tasks and not self.inline_q and not self.in_threads:
                    break
                if self.inline_q:
                    await asyncio.sleep(0)  # let Tasks and the progress view breathe
                else:
                    self.wake = loop.create_future()
                    await self.wake
        finally:
            await self._shutdown()
        self.report.elapsed = clock() - self.t0

    async def _shutdown(self) -> None:
        """Cancel and await every Task this run started, then mark what never finished."""
        for t in self.tasks:
            t.cancel()
        while self.tasks:
            try:
                await asyncio.gather(*list(self.tasks), return_exceptions=True)
            except asyncio.CancelledError:
                # We are being cancelled while cleaning up: still wait for our children, then
                # let the cancellation continue (TaskGroup does the same).
                await asyncio.gather(*list(self.tasks), return_exceptions=True)
                raise
        self.closed = True  # late callbacks from abandoned threads are ignored from now on
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)
        now = self.s.clock() - self.t0
        for r in self.records:
            if r.state not in R.FINAL_STATES:
                r.state, r.end = R.CANCELLED, now

    def _enqueue(self, i: int) -> None:
        if self.stopping or self.queued[i]:
            return
        self.queued[i] = True
        s = self.steps[i]
        if s.inline and not self.memo[i]:
            self.inline_q.append(i)
        else:
            self.task_q.append(i)

    def _wake(self) -> None:
        if self.wake is not None and not self.wake.done():
            self.wake.set_result(None)

    # ------------------------------------------------------------------ calling a step
    def _arguments(self, i: int) -> tuple[list[Any], dict[str, Any]]:
        results = self.results
        if self.has_async[i]:
            self.used[i] = self.total_arrivals[i]
            arrived = self.arrived[i]

            def val(x: Any) -> Any:
                if isinstance(x, int):
                    return results[x]
                got = arrived[x[1]]
                return next(iter(got.values())) if isinstance(self.edges[i][x[1]], Latest) else dict(got)

            args = [val(x) for x in self.pos[i]]
            kwargs = {k: val(x) for k, x in self.kw[i]}
        else:
            args = [results[x] for x in self.pos[i]]
            kwargs = {k: results[x] for k, x in self.kw[i]}
        params = self.steps[i].params
        if params:
            kwargs.update(params)
        return args, kwargs

    def _run_inline(self, i: int) -> None:
        self.queued[i] = False
        step, rec = self.steps[i], self.records[i]
        args, kwargs = self._arguments(i)
        rec.state = R.RUNNING
        if rec.start is None:
            rec.start = self.s.clock() - self.t0
        rec.attempts += 1
        try:
            value = step.fn(*args, **kwargs)
        except Exception as e:
            if step.retry.attempts > 1 and isinstance(e, step.retry.on):
                self.retry_from[i] = 1  # the backoff sleep needs a Task
                self.queued[i] = True
                self.task_q.append(i)
            else:
                self._fail(i, e)
            return
        self._succeeded(i, value)

    def _pool(self) -> concurrent.futures.ThreadPoolExecutor:
        if self.executor is None:
            self.executor = concurrent.futures.ThreadPoolExecutor(self.s.config.concurrency,
                                                                  thread_name_prefix="dmlsys-step")
        return self.executor

    def _submit_thread(self, i: int, loop: asyncio.AbstractEventLoop) -> None:
        self.queued[i] = False
        step, rec = self.steps[i], self.records[i]
        args, kwargs = self._arguments(i)
        rec.state = R.RUNNING
        if rec.start is None:
            rec.start = self.s.clock() - self.t0
        rec.attempts += 1
        self.in_threads += 1
        done = self._thread_done
        fn = step.fn

        def work() -> None:  # in a pool thread
            try:
                value, exc = fn(*args, **kwargs), None
            except Exception as e:
                value, exc = None, e
            try:
                loop.call_soon_threadsafe(done, i, value, exc)
            except RuntimeError:
                pass  # the loop is closed: the run ended without us (fail-fast or cancelled)

        self._pool().submit(work)

    def _thread_done(self, i: int, value: Any, exc: Exception | None) -> None:
        if self.closed:
            return
        self.in_threads -= 1
        if exc is None:
            self._succeeded(i, value)
        elif self.steps[i].retry.attempts > 1 and isinstance(exc, self.steps[i].retry.on):
            self.retry_from[i] = 1  # later attempts go through a Task, which can sleep
            self.queued[i] = True
            self.task_q.append(i)
        else:
            self._fail(i, exc)
        self._wake()

    async def _execute(self, i: int) -> None:
        try:
            await self._execute_inner(i)
        finally:
            self.tasks.discard(asyncio.current_task())  # type: ignore[arg-type]
            self._wake()

    async def _execute_inner(self, i: int) -> None:
        self.queued[i] = False
        step, rec = self.steps[i], self.records[i]
        rec.state = R.RUNNING
        if rec.start is None:
            rec.start = self.s.clock() - self.t0
        args, kwargs = self._arguments(i)
        key = None
        if self.memo[i]:
            try:
                key, hit = await asyncio.to_thread(self._lookup, i, args, kwargs)
            except Exception as e:
                self._fail(i, e)
                return
            rec.key = key
            if hit is not None:
                rec.cache = "hit"
                self.fps[i] = hit.entry.fingerprint
                self._succeeded(i, hit.value)
                return
            rec.cache = "miss"
        attempt, self.retry_from[i] = self.retry_from[i], 0
        retry = step.retry
        while True:
            if attempt:
                await self.s.sleep(retry.delay(attempt))
            attempt += 1
            rec.attempts += 1
            try:
                value = await self._call(i, args, kwargs)
                break
            except Exception as e:
                if attempt < retry.attempts and isinstance(e, retry.on):
                    continue
                self._fail(i, e)
                return
        if key is not None:
            try:
                entry = await asyncio.to_thread(self.s.store.put, key, step.name, value)  # type: ignore[union-attr]
            except SerialError as e:
                self._fail(i, CacheValueError(step.name, str(e)))
                return
            except Exception as e:
                self._fail(i, e)
                return
            self.fps[i] = entry.fingerprint
        self._succeeded(i, value)

    async def _call(self, i: int, args: list[Any], kwargs: dict[str, Any]) -> Any:
        step = self.steps[i]
        if step.inline:
            return step.fn(*args, **kwargs)
        if step.is_async:
            aw: Awaitable[Any] = step.fn(*args, **kwargs)
        else:
            aw = asyncio.get_running_loop().run_in_executor(self._pool(), functools.partial(step.fn, *args, **kwargs))
        if step.timeout is None:
            return await aw
        try:
            async with asyncio.timeout(step.timeout):
                return await aw
        except TimeoutError as e:
            raise StepTimeout(step.name, step.timeout) from e

    # ------------------------------------------------------------------ memoization (in a thread)
    def _fp(self, j: int) -> str:
        fp = self.fps[j]
        if fp is None:
            fp = self.fps[j] = fingerprint(self.results[j])
        return fp

    def _lookup(self, i: int, args: list[Any], kwargs: dict[str, Any]) -> tuple[str, Hit | None]:
        """Cache key and store lookup for one run of step ``i`` (runs in a worker thread)."""
        step, index = self.steps[i], self.plan.index

        def fp_of(spec: Any, value: Any, what: str) -> Any:
            try:
                if isinstance(spec, int):
                    return self._fp(spec)
                edge = self.edges[i][spec[1]]
                if isinstance(edge, Latest):  # a partial result: the step's cached fp may be older
                    return [(edge.step, fingerprint(value))]
                # An async edge: which sources this run saw, in arrival order, and their values.
                return [(src, self._fp(index[src])) for src in value]
            except NotCanonical as e:
                raise CacheKeyError(step.name, what, str(e)) from None

        def inputs() -> Mapping[str, Any]:
            return {"args": [fp_of(x, args[n], f"positional input {n}") for n, x in enumerate(self.pos[i])],
                    "kwargs": {k: fp_of(x, kwargs[k], f"input {k!r}") for k, x in self.kw[i]}}

        def code() -> str:
            try:
                return code_version(step.fn, step.version)
            except NotCanonical as e:
                raise CacheKeyError(step.name, "its code", str(e)) from None

        ctx = KeyContext(step.name, step.params, code, inputs)
        try:
            key = cache_key(step.name, step.cache.parts(ctx))
        except NotCanonical as e:
            raise CacheKeyError(step.name, "its params or a probe's result", str(e)) from None
        return key, self.s.store.get(key, max_age=step.cache.max_age)  # type: ignore[union-attr]

    # ------------------------------------------------------------------ completion
    def _succeeded(self, i: int, value: Any) -> None:
        """One run of step ``i`` returned ``value``: final unless an async edge expects more."""
        rec = self.records[i]
        rec.runs += 1
        self.results[i] = value
        if self.has_async[i]:
            more = self.total_arrivals[i] > self.used[i]
            if more or not self._all_settled(i):
                rec.state = R.PARTIAL
                if self.s.on_result is not None:
                    self.s.on_result(rec.name, value, False)
                self._stream(i, final=False)
                if more:
                    self._enqueue(i)
                return
        self._finalize(i)

    def _stream(self, i: int, final: bool) -> None:
        """Pass step ``i``'s newest result on to the steps with a ``Latest`` edge on it."""
        fresh = self.emitted[i] != self.records[i].runs
        self.emitted[i] = self.records[i].runs
        for c, e in self.async_children[i]:
            if not isinstance(self.edges[c][e], Latest):
                continue
            if fresh:
                self.arrived[c][e][self.records[i].name] = self.results[i]
                self.total_arrivals[c] += 1
            if final:
                self.settled[c][e] += 1
            if fresh or final:
                self._check_async(c)

    def _finalize(self, i: int) -> None:
        rec = self.records[i]
        rec.state = R.DONE
        rec.end = self.s.clock() - self.t0
        value = self.results[i]
        if self.s.on_result is not None:
            self.s.on_result(rec.name, value, True)
        waiting, has_async = self.waiting, self.has_async
        for c in self.reg_children[i]:
            waiting[c] -= 1
            if waiting[c] == 0:
                if has_async[c]:
                    self._check_async(c)
                else:
                    self._enqueue(c)
        for c, e in self.async_children[i]:
            if isinstance(self.edges[c][e], Latest):
                continue  # _stream below
            self.arrived[c][e][rec.name] = value
            self.settled[c][e] += 1
            self.total_arrivals[c] += 1
            self._check_async(c)
        self._stream(i, final=True)

    def _all_settled(self, i: int) -> bool:
        return all(n == len(e.steps) for n, e in zip(self.settled[i], self.edges[i]))

    def _check_async(self, c: int) -> None:
        """Re-decide an async-edge step after one of its sources settled."""
        rec = self.records[c]
        if rec.state in R.FINAL_STATES or self.stopping or self.queued[c] or rec.state == R.RUNNING:
            return  # a running step re-checks when its run ends
        edges, arrived, settled = self.edges[c], self.arrived[c], self.settled[c]
        if rec.state == R.PENDING:
            if any(len(arrived[e]) + len(edge.steps) - settled[e] < edge.k for e, edge in enumerate(edges)):
                self._skip(c)  # k successes are out of reach
            elif self.waiting[c] == 0 and all(len(arrived[e]) >= edge.k for e, edge in enumerate(edges)):
                self._enqueue(c)
        elif rec.state == R.PARTIAL:
            if self.total_arrivals[c] > self.used[c]:
                self._enqueue(c)
            elif self._all_settled(c):
                self._finalize(c)  # the last run already saw every source that succeeded

    def _fail(self, i: int, exc: BaseException) -> None:
        rec = self.records[i]
        rec.state, rec.end = R.FAILED, self.s.clock() - self.t0
        rec.error = f"{type(exc).__name__}: {exc}"
        self.errors[rec.name] = exc
        if self.s.config.on_failure == FAIL_FAST:
            self.stopping = True
            self.inline_q.clear()  # ends the inline batch loop at once
            self.task_q.clear()
            self._wake()
        else:
            self._propagate_skip(i)

    def _skip(self, i: int) -> None:
        rec = self.records[i]
        if rec.state != R.PENDING:
            return
        rec.state, rec.end = R.SKIPPED, self.s.clock() - self.t0
        self._propagate_skip(i)

    def _propagate_skip(self, i: int) -> None:
        for c in self.reg_children[i]:
            self._skip(c)
        for c, e in self.async_children[i]:
            self.settled[c][e] += 1
            self._check_async(c)
