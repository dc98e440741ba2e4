"""The executor behind ``Scheduler.run``: runs the steps the state machine says are ready.

What happens to a step — when it may start, what its result or failure sets in motion, when
it is finished — is decided by ``machine.StepMachine`` (pure, tested on its own). This module
is the I/O around it: the dispatch loop, the thread pool, Tasks, timeouts, retry sleeps and the
memo store.

The dispatch loop (``Executor.main``) pops ready steps and runs inline steps directly, hands
plain sync steps to the thread pool with a completion callback, and wraps everything else
(coroutines, memoized steps, retries) in a Task. Every call into the machine happens on the
loop thread, so no locking is needed; ``_lookup`` alone runs in a worker thread (it reads
results of steps that are done, which never change).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
from collections import deque
from typing import TYPE_CHECKING, Any, Awaitable, Mapping

from . import report as R
from .dag import Latest, Plan
from .errors import CacheKeyError, CacheValueError, StepTimeout
from .machine import StepMachine
from .memo import NotCanonical, cache_key, code_version, fingerprint
from .policy import KeyContext
from .serial import SerialError
from .store import Hit

if TYPE_CHECKING:
    from .scheduler import Scheduler

FAIL_FAST, CONTINUE = "fail_fast", "continue"

# How the executor runs a step (its lane), fixed for the run:
INLINE = 0  # a cheap sync function, called by the dispatch loop itself
DIRECT = 1  # a plain sync function, sent to the thread pool with a completion callback
TASK = 2  # everything else (a coroutine, a memoized step, a timeout; retries): a Task of its own


class Executor:
    """Runs one plan on the running loop: ``await Executor(scheduler, plan, name).main()``."""

    def __init__(self, sched: Scheduler, plan: Plan, name: str) -> None:
        self.s, self.steps = sched, plan.steps
        self.machine = m = StepMachine(plan, fail_fast=sched.config.on_failure == FAIL_FAST,
                                       on_result=sched.on_result)
        self.report = R.RunReport(name, m.records)
        has_store = sched.store is not None
        # Plain sync steps with nothing to await around them (no memo, timeout) go straight to
        # the thread pool, with a callback instead of a Task: half the overhead of a Task that
        # awaits run_in_executor. Retries after a failure take the Task path (they need sleep).
        # On a virtual-time loop (the simulated network) a thread would race the clock: every
        # sync step is called on the loop itself, so that a run replays exactly.
        self.on_loop = getattr(asyncio.get_running_loop(), "virtual_time", False)
        direct = TASK if self.on_loop else DIRECT
        self.lanes = [TASK if has_store and s.cache.enabled else INLINE if s.inline
                      else TASK if s.is_async or s.timeout is not None else direct for s in plan.steps]
        self.task_q: deque[int] = deque()
        self.resume: dict[int, tuple[list[Any], dict[str, Any]]] = {}  # arguments of a step retried in a Task
        self.fps: dict[int, str] = {}  # value fingerprints of done steps, computed when first needed
        self.tasks: set[asyncio.Task] = set()
        self.in_threads = 0
        self.closed = False
        self.wake: asyncio.Future | None = None
        self.executor: concurrent.futures.ThreadPoolExecutor | None = None
        self.t0 = 0.0

    @property
    def errors(self) -> dict[str, BaseException]:
        return self.machine.errors

    # ------------------------------------------------------------------ main loop
    async def main(self) -> None:
        clock = self.s.clock
        self.t0 = clock()
        loop = asyncio.get_running_loop()
        limit, yield_every = self.s.config.concurrency, self.s.config.yield_every
        m, lanes, task_q, tasks = self.machine, self.lanes, self.task_q, self.tasks
        ready, run_inline = m.ready, self._run_inline
        try:
            while True:
                if ready:
                    deadline = clock() + yield_every
                    n = 0
                    while ready:  # fail-fast empties it at once
                        i = ready.popleft()
                        if lanes[i] == INLINE:
                            run_inline(i)
                        else:
                            task_q.append(i)
                        n += 1
                        if n & 255 == 0 and clock() > deadline:
                            break
                while task_q and len(tasks) + self.in_threads < limit and not m.stopping:
                    i = task_q.popleft()
                    if lanes[i] == DIRECT and i not in self.resume:
                        self._submit_thread(i, loop)
                    else:
                        task = loop.create_task(self._execute(i), name=f"step:{self.steps[i].name}")
                        tasks.add(task)
                if m.stopping:
                    break
                if not tasks and not ready and not self.in_threads:
                    break
                if ready:
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
        self.machine.close(self.s.clock() - self.t0)

    def _wake(self) -> None:
        if self.wake is not None and not self.wake.done():
            self.wake.set_result(None)

    def _now(self) -> float:
        return self.s.clock() - self.t0

    # ------------------------------------------------------------------ calling a step
    def _run_inline(self, i: int) -> None:
        m = self.machine
        args, kwargs = m.start(i, self.s.clock() - self.t0)
        m.attempt(i)
        try:
            value = self.steps[i].fn(*args, **kwargs)
        except Exception as e:
            if m.retryable(i, e):
                self.resume[i] = (args, kwargs)  # the backoff sleep needs a Task
                self.task_q.append(i)
            else:
                m.failed(i, e, self.s.clock() - self.t0)
            return
        m.succeeded(i, value, self.s.clock() - self.t0)

    def _pool(self) -> concurrent.futures.ThreadPoolExecutor:
        if self.executor is None:
            self.executor = concurrent.futures.ThreadPoolExecutor(self.s.config.concurrency,
                                                                  thread_name_prefix="dmlsys-step")
        return self.executor

    def _submit_thread(self, i: int, loop: asyncio.AbstractEventLoop) -> None:
        m = self.machine
        args, kwargs = m.start(i, self.s.clock() - self.t0)
        m.attempt(i)
        self.in_threads += 1
        done = self._thread_done
        fn = self.steps[i].fn

        def work() -> None:  # in a pool thread
            try:
                value, exc = fn(*args, **kwargs), None
            except Exception as e:
                value, exc = None, e
            try:
                loop.call_soon_threadsafe(done, i, value, exc, args, kwargs)
            except RuntimeError:
                pass  # the loop is closed: the run ended without us (fail-fast or cancelled)

        self._pool().submit(work)

    def _thread_done(self, i: int, value: Any, exc: Exception | None, args: list[Any], kwargs: dict[str, Any]) -> None:
        if self.closed:
            return
        self.in_threads -= 1
        m = self.machine
        if exc is None:
            m.succeeded(i, value, self.s.clock() - self.t0)
        elif m.retryable(i, exc):
            self.resume[i] = (args, kwargs)  # later tries go through a Task, which can sleep
            self.task_q.append(i)
        else:
            m.failed(i, exc, self.s.clock() - self.t0)
        self._wake()

    async def _execute(self, i: int) -> None:
        try:
            await self._execute_inner(i)
        finally:
            self.tasks.discard(asyncio.current_task())  # type: ignore[arg-type]
            self._wake()

    async def _execute_inner(self, i: int) -> None:
        m, step = self.machine, self.steps[i]
        rec = m.records[i]
        key = None
        resumed = self.resume.pop(i, None)
        if resumed is not None:
            args, kwargs = resumed  # an earlier try of this run failed outside a Task
        else:
            args, kwargs = m.start(i, self._now())
            if self.s.store is not None and step.cache.enabled:
                try:
                    key, hit = await asyncio.to_thread(self._lookup, i, args, kwargs)
                except Exception as e:
                    m.failed(i, e, self._now())
                    return
                rec.key = key
                if hit is not None:
                    rec.cache = "hit"
                    self.fps[i] = hit.entry.fingerprint
                    m.succeeded(i, hit.value, self._now())
                    return
                rec.cache = "miss"
        while True:
            delay = m.backoff(i)
            if delay is not None:
                await self.s.sleep(delay)
            m.attempt(i)
            try:
                value = await self._call(i, args, kwargs)
                break
            except Exception as e:
                if m.retryable(i, e):
                    continue
                m.failed(i, e, self._now())
                return
        if key is not None:
            try:
                entry = await asyncio.to_thread(self.s.store.put, key, step.name, value)  # type: ignore[union-attr]
            except SerialError as e:
                m.failed(i, CacheValueError(step.name, str(e)), self._now())
                return
            except Exception as e:
                m.failed(i, e, self._now())
                return
            self.fps[i] = entry.fingerprint
        m.succeeded(i, value, self._now())

    async def _call(self, i: int, args: list[Any], kwargs: dict[str, Any]) -> Any:
        step = self.steps[i]
        if step.inline or (self.on_loop and not step.is_async):
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
        fp = self.fps.get(j)
        if fp is None:
            fp = self.fps[j] = fingerprint(self.machine.nodes[j].result)
        return fp

    def _lookup(self, i: int, args: list[Any], kwargs: dict[str, Any]) -> tuple[str, Hit | None]:
        """Cache key and store lookup for one run of step ``i`` (runs in a worker thread)."""
        node = self.machine.nodes[i]
        step, index = node.step, self.machine.plan.index

        def fp_of(spec: Any, value: Any, what: str) -> Any:
            try:
                if isinstance(spec, int):
                    return self._fp(spec)
                edge = node.inputs.edges[spec[1]]  # type: ignore[union-attr]
                if isinstance(edge, Latest):  # a partial result: the step's cached fp may be older
                    return [(edge.step, fingerprint(value))]
                # An async edge: which sources this run saw, in arrival order, and their values.
                return [(src, self._fp(index[src])) for src in value]
            except NotCanonical as e:
                raise CacheKeyError(step.name, what, str(e)) from None

        def inputs() -> Mapping[str, Any]:
            return {"args": [fp_of(x, args[n], f"positional input {n}") for n, x in enumerate(node.pos)],
                    "kwargs": {k: fp_of(x, kwargs[k], f"input {k!r}") for k, x in node.kw}}

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
