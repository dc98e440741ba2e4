"""The executor behind ``Scheduler.run``: runs the steps the state machine says are ready.

What happens to a step — when it may start, what its result or failure sets in motion, when
it is finished — is decided by ``machine.StepMachine`` (pure, tested on its own). This module
is the I/O around it: the dispatch loop, the pool threads, Tasks, timeouts, retry sleeps and
the memo store.

The dispatch loop (``Executor.main``) pops ready steps and runs inline steps directly, queues
plain sync steps for the pool threads, and wraps everything else (coroutines, memoized steps,
timeouts, retries) in a Task. A pool thread does not hand each step back to the loop: when its
step returns, it reports the outcome to the machine itself and runs the next queued plain step
(preferring one its own step just made ready), until none is left. So a chain of plain steps
costs no thread hand-off per step, where handing back would cost two (the loop wakes the
thread, then the thread wakes the loop through its self-pipe), and a thread only wakes the loop
when the loop has something to do: a step it must run (inline, Task), a free slot for another
thread, a failure that stops the run, results for ``on_result``, or its own exit.

Hence one lock, ``Executor.lock``, held by whoever calls into the machine or touches the queues
(``ready``, ``direct_q``, ``task_q``, ``resume``, ``in_threads``); never while a step's function
runs. ``_lookup`` runs in a worker thread without it: it reads results of steps that are done,
which never change. ``on_result`` is still called on the loop, in the order the machine reported
the results (a thread's results are queued and delivered by the loop's next pass).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import threading
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
DIRECT = 1  # a plain sync function, run by a pool thread that then takes the next one
TASK = 2  # everything else (a coroutine, a memoized step, a timeout; retries): a Task of its own


class Executor:
    """Runs one plan on the running loop: ``await Executor(scheduler, plan, name).main()``."""

    def __init__(self, sched: Scheduler, plan: Plan, name: str) -> None:
        self.s, self.steps = sched, plan.steps
        on_result = self._on_result if sched.on_result is not None else None
        self.machine = m = StepMachine(plan, fail_fast=sched.config.on_failure == FAIL_FAST, on_result=on_result)
        self.report = R.RunReport(name, m.records)
        has_store = sched.store is not None
        # Plain sync steps with nothing to await around them (no memo, timeout) are run by the
        # pool threads, which keep taking the next one (see the module docstring). Retries after
        # a failure take the Task path (they need sleep). On a virtual-time loop (the simulated
        # network) a thread would race the clock: every sync step is called on the loop itself,
        # so that a run replays exactly.
        self.on_loop = getattr(asyncio.get_running_loop(), "virtual_time", False)
        direct = TASK if self.on_loop else DIRECT
        self.lanes = [TASK if has_store and s.cache.enabled else INLINE if s.inline
                      else TASK if s.is_async or s.timeout is not None else direct for s in plan.steps]
        self.limit = sched.config.concurrency  # Tasks + threads running steps at once
        self.lock = threading.Lock()
        # Guarded by the lock (with the machine):
        self.task_q: deque[int] = deque()  # ready steps waiting for a Task
        self.direct_q: deque[int] = deque()  # ready plain sync steps waiting for a pool thread
        self.resume: dict[int, tuple[list[Any], dict[str, Any]]] = {}  # arguments of a step retried in a Task
        self.in_threads = 0  # pool threads running steps
        self.poked = False  # a thread has asked the loop for a pass that has not begun yet
        self.results_q: list[tuple[str, Any, bool]] = []  # on_result calls made in threads, for the loop
        self.closed = False  # the run is over: threads report nothing more
        self.crash: BaseException | None = None  # an error of the executor itself in a pool thread
        self.tasks: set[asyncio.Task] = set()
        self.fps: dict[int, str] = {}  # value fingerprints of done steps, computed when first needed
        self.wake: asyncio.Future | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.loop_thread = threading.get_ident()
        self.executor: concurrent.futures.ThreadPoolExecutor | None = None
        self.t0 = 0.0

    @property
    def errors(self) -> dict[str, BaseException]:
        return self.machine.errors

    # ------------------------------------------------------------------ main loop
    async def main(self) -> None:
        clock = self.s.clock
        self.t0 = clock()
        self.loop = loop = asyncio.get_running_loop()
        self.loop_thread = threading.get_ident()
        limit, yield_every = self.limit, self.s.config.yield_every
        m, lanes, task_q, direct_q, tasks = self.machine, self.lanes, self.task_q, self.direct_q, self.tasks
        ready, run_inline, lock = m.ready, self._run_inline, self.lock
        try:
            while True:
                with lock:
                    self.poked = False
                    if self.crash is not None:
                        raise self.crash
                    if self.results_q:
                        self._flush_results()
                    if ready:
                        deadline = clock() + yield_every
                        n = 0
                        while ready:  # fail-fast empties it at once
                            i = ready.popleft()
                            lane = lanes[i]
                            if lane == INLINE:
                                run_inline(i)  # lets go of the lock while the step runs
                            elif lane == DIRECT:
                                direct_q.append(i)
                            else:
                                task_q.append(i)
                            n += 1
                            if n & 255 == 0 and clock() > deadline:
                                break
                    # Tasks first: a pool thread also yields its slot to a waiting Task.
                    while task_q and len(tasks) + self.in_threads < limit and not m.stopping:
                        i = task_q.popleft()
                        task = loop.create_task(self._execute(i), name=f"step:{self.steps[i].name}")
                        tasks.add(task)
                    while direct_q and len(tasks) + self.in_threads < limit and not m.stopping:
                        self._submit_thread(direct_q.popleft())
                    if m.stopping:
                        break
                    if not tasks and not ready and not self.in_threads:
                        break
                    busy = bool(ready)
                    if not busy:
                        self.wake = loop.create_future()
                if busy:
                    await asyncio.sleep(0)  # let Tasks and the progress view breathe
                else:
                    await self.wake
        finally:
            await self._shutdown()
        self.report.elapsed = clock() - self.t0

    async def _shutdown(self) -> None:
        """Cancel and await every Task this run started, then mark what never finished."""
        for t in list(self.tasks):
            t.cancel()
        while self.tasks:
            try:
                await asyncio.gather(*list(self.tasks), return_exceptions=True)
            except asyncio.CancelledError:
                # We are being cancelled while cleaning up: still wait for our children, then
                # let the cancellation continue (TaskGroup does the same).
                await asyncio.gather(*list(self.tasks), return_exceptions=True)
                raise
        with self.lock:
            self.closed = True  # threads still in a step drop its outcome from now on
            self.machine.close(self.s.clock() - self.t0)
            if self.results_q:
                self._flush_results()
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)

    def _wake(self) -> None:
        if self.wake is not None and not self.wake.done():
            self.wake.set_result(None)

    def _now(self) -> float:
        return self.s.clock() - self.t0

    # ------------------------------------------------------------------ on_result, on the loop
    def _on_result(self, name: str, value: Any, final: bool) -> None:
        """The machine's ``on_result`` (called with the lock held): the user's callback runs on
        the loop, after those queued by threads, so that each step's results keep their order."""
        if threading.get_ident() != self.loop_thread:
            self.results_q.append((name, value, final))  # the thread pokes the loop
            return
        if self.results_q:
            self._flush_results()
        self.s.on_result(name, value, final)  # type: ignore[misc]

    def _flush_results(self) -> None:
        queued, self.results_q = self.results_q, []
        for name, value, final in queued:
            self.s.on_result(name, value, final)  # type: ignore[misc]

    # ------------------------------------------------------------------ inline steps (the loop)
    def _run_inline(self, i: int) -> None:
        """Run inline step ``i`` on the loop; called and returns with the lock held."""
        m, lock = self.machine, self.lock
        args, kwargs = m.start(i, self.s.clock() - self.t0)
        m.attempt(i)
        lock.release()
        try:
            value, exc = self.steps[i].fn(*args, **kwargs), None
        except Exception as e:
            value, exc = None, e
        finally:
            lock.acquire()
        if exc is None:
            m.succeeded(i, value, self.s.clock() - self.t0)
        elif m.retryable(i, exc):
            self.resume[i] = (args, kwargs)  # the backoff sleep needs a Task
            self.task_q.append(i)
        else:
            m.failed(i, exc, self.s.clock() - self.t0)

    # ------------------------------------------------------------------ plain sync steps (pool threads)
    def _pool(self) -> concurrent.futures.ThreadPoolExecutor:
        if self.executor is None:
            self.executor = concurrent.futures.ThreadPoolExecutor(self.limit, thread_name_prefix="dmlsys-step")
        return self.executor

    def _submit_thread(self, i: int) -> None:
        """Start a pool thread on step ``i`` (the loop, holding the lock)."""
        m = self.machine
        args, kwargs = m.start(i, self.s.clock() - self.t0)
        m.attempt(i)
        self.in_threads += 1
        self._pool().submit(self._thread_work, i, args, kwargs)

    def _thread_work(self, i: int, args: list[Any], kwargs: dict[str, Any]) -> None:
        try:
            self._thread_steps(i, args, kwargs)
        except BaseException as e:  # noqa: BLE001 - a bug here: the run must fail loudly, not wait forever
            with self.lock:
                self.crash = e
                self.in_threads -= 1
            try:
                self.loop.call_soon_threadsafe(self._wake)  # type: ignore[union-attr]
            except RuntimeError:
                pass

    def _thread_steps(self, i: int, args: list[Any], kwargs: dict[str, Any]) -> None:
        """A pool thread: run step ``i``, report it, and go on with the next plain step that is
        ready, until there is none (or a Task waits for the slot, or the run is stopping)."""
        m, lock, steps, clock, t0 = self.machine, self.lock, self.steps, self.s.clock, self.t0
        ready, direct_q, lanes = m.ready, self.direct_q, self.lanes
        fn = steps[i].fn
        while True:
            try:
                value, exc = fn(*args, **kwargs), None
            except BaseException as e:  # noqa: BLE001 - the step failed; nothing else would report it
                value, exc = None, e
            with lock:
                if self.closed:
                    return  # the run ended without this step (fail-fast or cancelled)
                now = clock() - t0
                n0 = len(ready)
                if exc is None:
                    m.succeeded(i, value, now)
                elif m.retryable(i, exc):
                    self.resume[i] = (args, kwargs)  # later tries go through a Task, which can sleep
                    self.task_q.append(i)
                else:
                    m.failed(i, exc, now)
                # Route what this outcome made ready (appended to ``ready``): plain steps to the
                # threads, keeping the first for this one (its inputs are warm here); the rest
                # stays in ``ready`` for the loop.
                nxt = -1
                new = len(ready) - n0
                if new > 0:
                    made = [ready.pop() for _ in range(new)]
                    for j in reversed(made):
                        if lanes[j] != DIRECT:
                            ready.append(j)
                        elif nxt < 0:
                            nxt = j
                        else:
                            direct_q.append(j)
                if self.task_q or m.stopping:
                    if nxt >= 0:
                        direct_q.appendleft(nxt)  # a waiting Task goes first; none start when stopping
                        nxt = -1
                elif nxt < 0 and direct_q:
                    nxt = direct_q.popleft()
                if nxt < 0:
                    self.in_threads -= 1
                    poke = True
                else:
                    i = nxt
                    args, kwargs = m.start(i, now)
                    m.attempt(i)
                    fn = steps[i].fn
                    poke = bool(ready or self.results_q or (direct_q and len(self.tasks) + self.in_threads < self.limit))
                if poke:
                    poke, self.poked = not self.poked, True
            value = exc = None  # hold no reference to the last outcome while the next step runs
            if poke:
                try:
                    self.loop.call_soon_threadsafe(self._wake)  # type: ignore[union-attr]
                except RuntimeError:
                    return  # the loop is closed: the run is over
            if nxt < 0:
                return

    # ------------------------------------------------------------------ Tasks
    async def _execute(self, i: int) -> None:
        try:
            await self._execute_inner(i)
        finally:
            with self.lock:
                self.tasks.discard(asyncio.current_task())  # type: ignore[arg-type]
            self._wake()

    async def _execute_inner(self, i: int) -> None:
        m, step, lock = self.machine, self.steps[i], self.lock
        rec = m.records[i]
        key = None
        with lock:
            if m.stopping:
                return  # fail-fast stopped the run after this Task was created: start nothing
            resumed = self.resume.pop(i, None)
            if resumed is not None:
                args, kwargs = resumed  # an earlier try of this run failed outside a Task
            else:
                args, kwargs = m.start(i, self._now())
        if resumed is None and self.s.store is not None and step.cache.enabled:
            try:
                key, hit = await asyncio.to_thread(self._lookup, i, args, kwargs)
            except Exception as e:
                with lock:
                    m.failed(i, e, self._now())
                return
            rec.key = key
            if hit is not None:
                rec.cache = "hit"
                self.fps[i] = hit.entry.fingerprint
                with lock:
                    m.succeeded(i, hit.value, self._now())
                return
            rec.cache = "miss"
        while True:
            with lock:
                delay = m.backoff(i)
            if delay is not None:
                await self.s.sleep(delay)
            with lock:
                if m.stopping:
                    return  # no further tries once fail-fast stopped the run
                m.attempt(i)
            try:
                value = await self._call(i, args, kwargs)
                break
            except Exception as e:
                with lock:
                    if m.retryable(i, e):
                        continue
                    m.failed(i, e, self._now())
                return
        if key is not None:
            try:
                entry = await asyncio.to_thread(self.s.store.put, key, step.name, value)  # type: ignore[union-attr]
            except SerialError as e:
                with lock:
                    m.failed(i, CacheValueError(step.name, str(e)), self._now())
                return
            except Exception as e:
                with lock:
                    m.failed(i, e, self._now())
                return
            self.fps[i] = entry.fingerprint
        with lock:
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
