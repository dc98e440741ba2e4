"""Functions over a shared pool: the asyncio shell that runs events on instances and scales them.

``FunctionPool`` ties the three cores together on one node:

* ``invoke(function, body, deadline)`` runs one event: on the ready instance with the fewest in
  flight (``Pool.pick``), by RPC. With no ready instance the event *waits* (a cold start is hidden
  behind the wait, never a drop) until one is ready or its deadline passes. When the instance
  dies under it (``RpcTimeout``, ``PeerUnreachable``: no answer, or the supervisor said the
  process is gone) the instance is written off and the event retried on another one, so an
  accepted event is answered or fails with an error the caller sees (``FunctionUnavailable``,
  503), never silently lost. Retrying means a function may run an event twice (it may have died
  after running it): functions must be idempotent, as stateless predictions are. An error the
  function itself raised (``RemoteError``) is the caller's answer and is not retried.
* every ``tick`` seconds (and at once when an event finds its function at zero instances) the
  control loop reports each function's concurrency (in flight + waiting, time-weighted mean over
  the tick; at zero instances at least the events waiting) to the ``Autoscaler``,
  asks for a decision, and carries out what ``Pool.reconcile`` says: ``Start`` and ``Stop``
  through the ``Launcher`` (the supervisor in production, in-process nodes in tests). With the
  decision goes each function's *work* (the larger of its events now and the tick's mean): a
  function with none, now or within the panic window, holds only idle instances, and those
  yield their slots to a function with events whatever the priorities (the autoscaler's
  claims). A drained instance's last event ending while events wait also runs a step at once:
  its slots are free now.

The launcher's contract: ``start(function, instance)`` returns the peer name of an instance
that answers ``<service>.<method>`` once it is ready (raise if it cannot start);
``stop(instance)`` stops it (idempotent; a dead one is simply forgotten). When the launcher
learns that an instance died, it calls ``instance_died(instance)``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from typing import Any, Protocol

from dmlsys.events.autoscaler import Autoscaler
from dmlsys.events.errors import EventsError
from dmlsys.events.pool import Pool, Start, Stop, Undrain
from dmlsys.node import Node
from dmlsys.node.errors import PeerUnreachable, RpcTimeout

log = logging.getLogger(__name__)


class FunctionUnavailable(EventsError):
    """No instance of the function answered before the event's deadline (none ready, or each died)."""

    status = 503

    def __init__(self, function: str, why: str, retry_after: int = 1) -> None:
        super().__init__(f"function {function!r}: {why}; retry after {retry_after}s")
        self.function, self.retry_after = function, retry_after


class Launcher(Protocol):
    async def start(self, function: str, instance: str) -> str: ...

    async def stop(self, instance: str) -> None: ...


class FunctionPool:
    """Events run on autoscaled instances of functions sharing one pool; see the module docstring."""

    def __init__(self, node: Node, pool: Pool, scaler: Autoscaler, launcher: Launcher, *, tick: float = 1.0,
                 try_timeout: float = 10.0, service: str = "function", method: str = "invoke",
                 history: int = 3600) -> None:
        self.node, self.pool, self.scaler, self.launcher = node, pool, scaler, launcher
        self.tick, self.try_timeout, self.service, self.method = tick, try_timeout, service, method
        self.in_flight = collections.Counter()
        self.waiting = collections.Counter()
        # the time-weighted mean of in flight + waiting since the last tick, per function: what the
        # autoscaler is fed (an instantaneous sample of a bursty count panics at random; Knative's
        # queue-proxy reports averages too)
        self._area: collections.Counter = collections.Counter()
        self._marked: dict[str, float] = {}
        self._window_start: dict[str, float] = {}
        self.retries = 0
        self.peers: dict[str, str] = {}  # instance -> peer name, once ready
        # (time, {function: instances live}) per tick: the "slots in use over time" of status
        self.timeline: collections.deque = collections.deque(maxlen=history)
        self._changed = asyncio.Condition()
        self._kick = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self._loop_task: asyncio.Task | None = None
        self._stopping = False

    # ------------------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        self._loop_task = asyncio.get_running_loop().create_task(self._control_loop())

    async def stop(self) -> None:
        """Stop the control loop, then every instance; waits for all of it (no task outlives us)."""
        if self._loop_task is not None:
            # the flag as well as the cancel: Python 3.11's wait_for returns normally, swallowing
            # the cancellation, when its future completes at the same moment (a kick as we stop),
            # and the loop would then tick on forever with stop() waiting for it
            self._stopping = True
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks))
        for inst in list(self.pool.instances):
            self.pool.failed(inst)
            with contextlib.suppress(Exception):
                await self.launcher.stop(inst)

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------------- control loop
    async def _control_loop(self) -> None:
        while not self._stopping:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._kick.wait(), self.tick)
            self._kick.clear()
            if self._stopping:
                return
            try:
                await self.step()
            except Exception:  # a bug here must not stop scaling for good
                log.exception("function pool: control step failed")

    async def step(self) -> None:
        """One control step: observe, decide, reconcile, act."""
        now = asyncio.get_running_loop().time()
        current, work = {}, {}
        for f in self.pool.specs:
            self._account(f)
            start = self._window_start.get(f, now)
            level = float(self.in_flight[f] + self.waiting[f])
            mean = self._area[f] / (now - start) if now - start > 1e-9 else level
            if not self.pool.live(f):
                mean = max(mean, level)  # an event waits at zero: scale from zero now, however brief
            self.scaler.observe(f, now, mean)
            # the work it has: events now, or during the tick (a function whose events come and go
            # between ticks is not idle); instances beyond it yield to a function with events
            work[f] = max(mean, level)
            self._area[f], self._window_start[f] = 0.0, now
            current[f] = len(self.pool.live(f))
        decision = self.scaler.decide(now, current, work)
        actions = self.pool.reconcile(decision.instances, now)
        for a in actions:
            if isinstance(a, Start):
                self._spawn(self._start(a.function, a.instance))
            elif isinstance(a, Stop):
                self.peers.pop(a.instance, None)
                self._spawn(self._stop(a.instance))
        if any(isinstance(a, Undrain) for a in actions):
            await self._notify()
        # (Drain needs no action here: the pool routes no new events to a draining instance)
        self.timeline.append((now, {f: len(self.pool.live(f)) for f in self.pool.specs}))

    async def _start(self, function: str, instance: str) -> None:
        try:
            peer = await self.launcher.start(function, instance)
        except Exception as e:
            log.warning("function pool: instance %s of %s failed to start: %s", instance, function, e)
            self.pool.failed(instance)
            return
        if self.pool.ready(instance, asyncio.get_running_loop().time()) is None:
            await self.launcher.stop(instance)  # stopped (scaled down) while it was starting
            return
        self.peers[instance] = peer
        await self._notify()

    async def _stop(self, instance: str) -> None:
        try:
            await self.launcher.stop(instance)
        except Exception as e:
            log.warning("function pool: stopping instance %s failed: %s", instance, e)

    def _account(self, function: str) -> None:
        """Add the current level's time to the function's area; call before the level changes."""
        now = asyncio.get_running_loop().time()
        last = self._marked.get(function, now)
        self._area[function] += (self.in_flight[function] + self.waiting[function]) * (now - last)
        self._marked[function] = now
        self._window_start.setdefault(function, now)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def kick(self) -> None:
        """Run a control step now, not at the next tick (a function was just deployed, say)."""
        self._kick.set()

    def instance_died(self, instance: str) -> None:
        """The launcher saw the instance's process exit: write it off (its events retry elsewhere)."""
        self.peers.pop(instance, None)
        self.pool.failed(instance)
        self._kick.set()  # replace it now, not at the next tick

    # ------------------------------------------------------------------------- events
    async def invoke(self, function: str, body: Any, *, deadline: float) -> Any:
        """Run one event on an instance of ``function``; see the module docstring.

        Raises:
            FunctionUnavailable: no instance answered before ``deadline`` (503).
            RemoteError: the function raised; its answer to the caller.
        """
        if function not in self.pool.specs:
            raise FunctionUnavailable(function, f"not deployed; deployed: {', '.join(self.pool.specs)}")
        loop = asyncio.get_running_loop()
        self._account(function)
        self.waiting[function] += 1
        waiting = True
        try:
            while True:
                inst = self.pool.pick(function)
                if inst is None or inst.id not in self.peers:
                    if not self.pool.live(function):
                        self._kick.set()  # scale from zero now
                    left = deadline - loop.time()
                    if left <= 0:
                        raise FunctionUnavailable(function, "no instance became ready before the deadline")
                    # The wait's own timer firing *is* the deadline: asyncio runs a timer once it
                    # is within the clock's resolution (1 ns), so loop.time() may still read a
                    # hair before ``deadline`` then. Recomputing ``left`` and waiting again would
                    # re-arm a sub-resolution timer that fires at once, forever: under virtual
                    # time the clock never moves (a livelock, 38 of 1,000 seeds of
                    # experiments/simulate.py), on a real loop it spins until the clock passes.
                    async with self._changed:
                        try:
                            await asyncio.wait_for(self._changed.wait(), left)
                        except TimeoutError:
                            raise FunctionUnavailable(function, "no instance became ready before the deadline") from None
                    continue
                self._account(function)
                self.waiting[function] -= 1
                waiting = False
                self.pool.begin(inst.id)
                self.in_flight[function] += 1
                left = deadline - loop.time()
                try:
                    return await self.node.call(self.peers[inst.id], self.service, self.method, body,
                                                timeout=max(0.001, min(self.try_timeout, left)))
                except (RpcTimeout, PeerUnreachable) as e:
                    # a try that timed out after all the time left ended at the deadline (its timer
                    # may fire a hair early, as above): no retry with a sub-resolution timeout
                    if loop.time() >= deadline or (isinstance(e, RpcTimeout) and left <= self.try_timeout):
                        raise FunctionUnavailable(function, f"the last try failed at the deadline ({e})") from None
                    log.info("function pool: instance %s of %s lost (%s); retrying elsewhere", inst.id, function, e)
                    if inst.id in self.pool.instances:
                        self.peers.pop(inst.id, None)
                        self.pool.failed(inst.id)
                        self._spawn(self._stop(inst.id))  # a slow one is stopped; a dead one forgotten
                        self._kick.set()
                    self.retries += 1
                finally:
                    self._account(function)
                    self.in_flight[function] -= 1
                    stop = self.pool.end(inst.id)
                    if stop is not None:
                        self.peers.pop(stop.instance, None)
                        self._spawn(self._stop(stop.instance))
                        if any(self.waiting.values()):
                            self._kick.set()  # its slots are free now: start what the waiting need
                self._account(function)
                self.waiting[function] += 1
                waiting = True
        finally:
            if waiting:
                self._account(function)
                self.waiting[function] -= 1

    def statistics(self) -> dict:
        """For status and /metrics: instances per function and state, cold starts, retries."""
        cold = {f: (sorted(v)[len(v) // 2] if v else None) for f, v in self.pool.cold_starts.items()}
        return {"instances": self.pool.counts(), "slots_used": self.pool.used(), "slots": self.pool.slots,
                "in_flight": dict(self.in_flight), "waiting": dict(self.waiting), "retries": self.retries,
                "cold_start_median_s": cold}
