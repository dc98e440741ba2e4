"""The state machine of one run, as plain code: which steps may start, what a result or a
failure sets in motion, when a step is finished (pure: no I/O, no threads, no clock).

An executor drives it (``engine.Executor`` with a thread pool and Tasks; the tests with a
random sequence of events). It pops step indices from ``ready``, calls ``start`` (which hands
back the step's arguments), ``attempt`` before each call of the step's function, and reports
the outcome with ``succeeded`` or ``failed``; ``retryable`` and ``backoff`` say whether and
when a failed attempt may be tried again. ``close`` ends the run. Times (``now``, seconds since
the run started) are passed in and only written to the report.

A step's states::

    pending -> ready -> running -> done
                                -> partial -> ready -> running ...   (an async-edge step, between runs)
                                -> failed
    pending -> skipped           (under "continue": an input can no longer be had)
    ready -> cancelled           (under "fail_fast", at the first failure: the queue is dropped)
    any state but a final one -> cancelled   (``close``: the run stopped or was cancelled)

``StepRecord.state`` (the report) follows the same states, except that ``ready`` is shown as
what it was before (``pending``, or ``partial`` for a rerun): it is the executor's queue, not
something a user waits on.

When a step becomes ready:

* a regular input needs its step ``done`` (its final result);
* an ``AsCompleted(..., k)`` edge needs ``k`` sources ``done``; each further source that is
  done while the step waits or runs makes it run again (arrivals during a run are coalesced
  into one rerun);
* a ``Latest(src)`` edge needs a result of ``src``, a partial one included, and reruns on each
  newer one.

A step with async edges is ``done`` when its last run saw every source that will ever arrive
(each edge *settled*: all its sources final, whatever their outcome); until then it is
``partial``, and only ``Latest`` edges see its results.

Invariants (tests/workflow/test_workflow_machine.py checks each for random DAGs, edges,
outcomes and orders of completion):

1. A step starts only from ``ready``, and becomes ready only when every regular input is
   ``done`` and every async edge has its ``k`` arrivals.
2. A step runs again only if it is retried (at most ``Retry.attempts`` calls per run, only on
   the exceptions in ``Retry.on``) or if an async edge brought an input its last run did not
   see. Every run of an async-edge step sees strictly more than the one before.
3. Each step ends in exactly one final state (``done``, ``failed``, ``skipped``,
   ``cancelled``) and never leaves it.
4. Under ``continue``, a step is skipped exactly when an input can no longer be had: a regular
   input that is not ``done``, an ``AsCompleted`` edge with fewer than ``k`` sources ``done``,
   a ``Latest`` source that ended without a single result. Every other step runs to ``done``
   or fails on its own. A ``done`` async-edge step's final run saw every source that is done.
5. Under ``fail_fast``, nothing becomes ready after the first failure, and what was ready is
   cancelled: the steps already running may still end ``done`` or ``failed``, every other
   unfinished step ends ``cancelled``, and none is skipped.
6. A step is ``ready`` exactly while it is in ``ready`` or held by the executor between
   popping it and ``start``.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable

from .dag import AsCompleted, Latest, Plan, Step
from .errors import WorkflowError
from .report import CANCELLED, DONE, FAILED, FINAL_STATES, PARTIAL, PENDING, RUNNING, SKIPPED, StepRecord

READY = "ready"
FINAL = FINAL_STATES

OnResult = Callable[[str, Any, bool], None]  # (step, value, final)
_MISSING: Any = object()


class InvalidTransition(WorkflowError):
    """The executor reported an event the machine's state does not allow (a bug in the executor)."""

    def __init__(self, step: str, state: str, event: str) -> None:
        self.step, self.state, self.event = step, state, event
        super().__init__(f"step {step!r} is {state}: it cannot be {event}")


class EdgeInputs:
    """What the async edges of one step have delivered so far. ``arrived[e]`` maps the source
    names of edge ``e`` to their results, in arrival order; ``settled[e]`` counts its sources
    that are final (done, failed or skipped); ``arrivals`` counts every delivery over all edges
    and ``used`` how many of them the latest run saw."""

    __slots__ = ("edges", "arrived", "settled", "arrivals", "used")

    def __init__(self, edges: list[AsCompleted]) -> None:
        self.edges = edges
        self.arrived: list[dict[str, Any]] = [{} for _ in edges]
        self.settled = [0] * len(edges)
        self.arrivals = 0
        self.used = 0

    def all_settled(self) -> bool:
        return all(n == len(e.steps) for n, e in zip(self.settled, self.edges))

    def value(self, e: int) -> Any:
        """The argument edge ``e`` passes: the newest result (``Latest``) or ``{source: result}``."""
        got = self.arrived[e]
        return next(iter(got.values())) if isinstance(self.edges[e], Latest) else dict(got)


class StepState:
    """One step in the machine. ``pos`` / ``kw`` say where each argument comes from: a step
    index (a regular input: that step's final result) or ``("async", e)`` (async edge ``e`` of
    ``inputs``). ``children`` need this step through a regular edge; ``async_children`` lists
    ``(child, edge, is_latest)``. ``tries`` counts the calls of the current run; ``emitted`` is
    the run whose result ``Latest`` edges last received. The executor may read these fields;
    only the machine writes them."""

    __slots__ = ("step", "record", "state", "waiting", "children", "async_children", "pos", "kw", "result",
                 "tries", "inputs", "emitted")

    def __init__(self, step: Step, waiting: int, children: Any, pos: tuple, kw: tuple) -> None:
        self.step = step
        self.record = StepRecord(step.name)
        self.state = PENDING
        self.waiting = waiting  # regular inputs not yet done
        self.children = children
        self.async_children: tuple[tuple[int, int, bool], ...] = ()
        self.pos = pos
        self.kw = kw
        self.result: Any = _MISSING
        self.tries = 0
        self.inputs: EdgeInputs | None = None
        self.emitted = 0

    def __repr__(self) -> str:
        return f"StepState({self.step.name!r}, {self.state}, waiting={self.waiting}, tries={self.tries})"


class StepMachine:
    """The state of every step of one run of ``plan``. See the module docstring."""

    def __init__(self, plan: Plan, *, fail_fast: bool = True, on_result: OnResult | None = None) -> None:
        self.plan = plan
        self.fail_fast = fail_fast
        self.on_result = on_result
        self.stopping = False  # fail-fast saw a failure: nothing becomes ready any more
        self.errors: dict[str, BaseException] = {}  # step -> the exception of its last attempt
        self.ready: deque[int] = deque()
        if any(s.has_async_edges for s in plan.steps):
            self.nodes = self._general(plan)
        else:
            # The common case, kept lean (10,000-step DAGs): the plan's edges are the regular edges.
            # Positional inputs naming each dependency once are the plan's deps, in that order.
            index = plan.index
            self.nodes = [StepState(s, len(d), c, tuple([index[e] for e in s.args]),
                                    tuple([(k, index[e]) for k, e in s.kwargs]))
                          if s.kwargs or len(s.args) != len(d) else StepState(s, len(d), c, d, ())
                          for s, d, c in zip(plan.steps, plan.deps, plan.children)]
        self.records = [n.record for n in self.nodes]
        nodes = self.nodes
        for i, d in enumerate(plan.deps):
            if not d:
                nodes[i].state = READY
                self.ready.append(i)

    @staticmethod
    def _general(plan: Plan) -> list[StepState]:
        index, n = plan.index, len(plan.steps)
        nodes: list[StepState] = []
        children: list[list[int]] = [[] for _ in range(n)]
        fed: list[list[tuple[int, int, bool]]] = [[] for _ in range(n)]
        for i, s in enumerate(plan.steps):
            edges: list[AsCompleted] = []

            def spec(edge: Any, i: int = i, edges: list[AsCompleted] = edges) -> Any:
                if isinstance(edge, AsCompleted):
                    edges.append(edge)
                    for src in edge.steps:
                        fed[index[src]].append((i, len(edges) - 1, isinstance(edge, Latest)))
                    return ("async", len(edges) - 1)
                return index[edge]

            pos = tuple(spec(e) for e in s.args)
            kw = tuple((k, spec(e)) for k, e in s.kwargs)
            regular = sorted({x for x in pos + tuple(v for _, v in kw) if isinstance(x, int)})
            for d in regular:
                children[d].append(i)
            node = StepState(s, len(regular), children[i], pos, kw)
            if edges:
                node.inputs = EdgeInputs(edges)
            nodes.append(node)
        for node, f in zip(nodes, fed):
            node.async_children = tuple(f)
        return nodes

    # ------------------------------------------------------------------ queries
    def results(self) -> dict[str, Any]:
        """Final results of the steps that are done."""
        return {n.step.name: n.result for n in self.nodes if n.state is DONE}

    def states(self) -> list[str]:
        return [n.state for n in self.nodes]

    # ------------------------------------------------------------------ the executor's events
    def start(self, i: int, now: float) -> tuple[list[Any], dict[str, Any]]:
        """Step ``i`` leaves the ready queue and runs: its arguments for this run. Async edges
        hand over what arrived so far (the run will have seen those arrivals)."""
        node = self.nodes[i]
        if node.state is not READY:
            raise InvalidTransition(node.step.name, node.state, "started")
        rec = node.record
        node.state = rec.state = RUNNING
        if rec.start is None:
            rec.start = now
        node.tries = 0
        nodes = self.nodes
        inputs = node.inputs
        if inputs is None:
            args = [nodes[x].result for x in node.pos]
            kwargs = {k: nodes[x].result for k, x in node.kw}
        else:
            inputs.used = inputs.arrivals
            args = [nodes[x].result if x.__class__ is int else inputs.value(x[1]) for x in node.pos]
            kwargs = {k: nodes[x].result if x.__class__ is int else inputs.value(x[1]) for k, x in node.kw}
        params = node.step.params
        if params:
            kwargs.update(params)
        return args, kwargs

    def attempt(self, i: int) -> None:
        """The executor is about to call step ``i``'s function (its first try or a retry)."""
        node = self.nodes[i]
        if node.state is not RUNNING:
            raise InvalidTransition(node.step.name, node.state, "attempted")
        node.tries += 1
        node.record.attempts += 1

    def retryable(self, i: int, exc: BaseException) -> bool:
        """May the failed try of running step ``i`` be tried again (``Retry.attempts`` and ``on``)?
        If not, report it with ``failed``."""
        node = self.nodes[i]
        retry = node.step.retry
        return node.state is RUNNING and node.tries < retry.attempts and isinstance(exc, retry.on)

    def backoff(self, i: int) -> float | None:
        """None before the run's first try, else the seconds to wait after the last failed one."""
        node = self.nodes[i]
        return node.step.retry.delay(node.tries) if node.tries else None

    def succeeded(self, i: int, value: Any, now: float) -> None:
        """A run of step ``i`` returned ``value``: final, unless an async edge expects more."""
        node = self.nodes[i]
        if node.state is not RUNNING:
            raise InvalidTransition(node.step.name, node.state, "succeeded")
        rec = node.record
        rec.runs += 1
        node.result = value
        inputs = node.inputs
        if inputs is not None:
            more = inputs.arrivals > inputs.used
            if more or not inputs.all_settled():
                node.state = rec.state = PARTIAL
                if self.on_result is not None:
                    self.on_result(rec.name, value, False)
                self._stream(node, final=False, now=now)
                if more and not self.stopping:
                    node.state = READY
                    self.ready.append(i)
                return
        self._finalize(node, now)

    def failed(self, i: int, exc: BaseException, now: float) -> None:
        """Step ``i``'s run failed for good (its last try raised, or the executor could not run
        it). Fail-fast stops the run; continue skips what can no longer get its inputs."""
        node = self.nodes[i]
        if node.state is not RUNNING:
            raise InvalidTransition(node.step.name, node.state, "failed")
        rec = node.record
        node.state = rec.state = FAILED
        rec.end = now
        rec.error = f"{type(exc).__name__}: {exc}"
        self.errors[rec.name] = exc
        if self.fail_fast:
            self.stopping = True
            self._cancel_ready(now)
        else:
            self._propagate_skip(node, now)

    def close(self, now: float) -> None:
        """The run is over: every step not in a final state is cancelled."""
        self.stopping = True
        self._cancel_ready(now)
        for node in self.nodes:
            if node.state not in FINAL:
                node.state = node.record.state = CANCELLED
                node.record.end = now

    def _cancel_ready(self, now: float) -> None:
        # A step is ready exactly while it is in the queue: what is dropped from it is cancelled.
        nodes = self.nodes
        for i in self.ready:
            node = nodes[i]
            node.state = node.record.state = CANCELLED
            node.record.end = now
        self.ready.clear()

    # ------------------------------------------------------------------ propagation
    def _finalize(self, node: StepState, now: float) -> None:
        rec = node.record
        node.state = rec.state = DONE
        rec.end = now
        if self.on_result is not None:
            self.on_result(rec.name, node.result, True)
        nodes, ready, stopping = self.nodes, self.ready, self.stopping
        for c in node.children:
            child = nodes[c]
            child.waiting -= 1
            if child.waiting == 0:
                if child.inputs is not None:
                    self._check_async(c, child, now)
                elif not stopping:
                    child.state = READY
                    ready.append(c)
        if node.async_children:
            name, value = rec.name, node.result
            for c, e, latest in node.async_children:
                if latest:
                    continue  # _stream below
                child = nodes[c]
                inputs = child.inputs
                inputs.arrived[e][name] = value  # type: ignore[union-attr]
                inputs.settled[e] += 1  # type: ignore[union-attr]
                inputs.arrivals += 1  # type: ignore[union-attr]
                self._check_async(c, child, now)
            self._stream(node, final=True, now=now)

    def _stream(self, node: StepState, final: bool, now: float) -> None:
        """Pass ``node``'s newest result on to the steps with a ``Latest`` edge on it."""
        runs = node.record.runs
        fresh = node.emitted != runs
        node.emitted = runs
        if not (fresh or final):
            return
        nodes = self.nodes
        for c, e, latest in node.async_children:
            if not latest:
                continue
            child = nodes[c]
            inputs = child.inputs
            if fresh:
                inputs.arrived[e][node.record.name] = node.result  # type: ignore[union-attr]
                inputs.arrivals += 1  # type: ignore[union-attr]
            if final:
                inputs.settled[e] += 1  # type: ignore[union-attr]
            self._check_async(c, child, now)

    def _check_async(self, c: int, child: StepState, now: float) -> None:
        """Re-decide an async-edge step after one of its sources delivered or settled."""
        state = child.state
        if self.stopping or (state is not PENDING and state is not PARTIAL):
            return  # a ready or running step re-checks when its run ends
        inputs: EdgeInputs = child.inputs  # type: ignore[assignment]
        arrived, settled = inputs.arrived, inputs.settled
        if state is PENDING:
            if any(len(arrived[e]) + len(edge.steps) - settled[e] < edge.k for e, edge in enumerate(inputs.edges)):
                self._skip(child, now)  # k arrivals are out of reach
            elif child.waiting == 0 and all(len(arrived[e]) >= edge.k for e, edge in enumerate(inputs.edges)):
                child.state = READY
                self.ready.append(c)
        elif inputs.arrivals > inputs.used:
            child.state = READY
            self.ready.append(c)
        elif inputs.all_settled():
            self._finalize(child, now)  # the last run already saw every source that succeeded

    def _skip(self, node: StepState, now: float) -> None:
        if node.state is not PENDING:
            return
        node.state = node.record.state = SKIPPED
        node.record.end = now
        self._propagate_skip(node, now)

    def _propagate_skip(self, node: StepState, now: float) -> None:
        nodes = self.nodes
        for c in node.children:
            self._skip(nodes[c], now)
        for c, e, _ in node.async_children:
            child = nodes[c]
            child.inputs.settled[e] += 1  # type: ignore[union-attr]
            self._check_async(c, child, now)


__all__ = ["READY", "EdgeInputs", "InvalidTransition", "StepMachine", "StepState"]
