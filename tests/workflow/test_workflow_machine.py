"""The run's state machine (dmlsys.workflow.machine), driven without an event loop: random DAGs
with regular, AsCompleted and Latest edges, random orders of starts and completions, random
successes, retryable and fatal failures, under both failure policies. Each test pins down one
invariant of the module docstring."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dmlsys.workflow import AsCompleted, Latest, Retry, Step, Workflow
from dmlsys.workflow.machine import READY, InvalidTransition, StepMachine
from dmlsys.workflow.report import CANCELLED, DONE, FAILED, FINAL_STATES, PARTIAL, PENDING, RUNNING, SKIPPED

LEGAL = {(PENDING, READY), (READY, RUNNING), (READY, CANCELLED),  # fail-fast drops the ready queue
         (RUNNING, DONE), (RUNNING, PARTIAL), (RUNNING, FAILED),
         (RUNNING, READY),  # a run ended partial and something new had already arrived: straight back
         (PARTIAL, READY), (PARTIAL, DONE), (PENDING, SKIPPED)}


def anything(*args, **kwargs):
    return None


@st.composite
def plans(draw, max_steps: int = 9):
    """A validated plan over steps s0..s(n-1); each step's inputs are edges to earlier steps:
    regular, AsCompleted(sources, k) or Latest(source), passed positionally or by keyword."""
    n = draw(st.integers(1, max_steps))
    steps = []
    for i in range(n):
        edges = []
        for _ in range(draw(st.integers(0, min(3, i)))):
            kind = draw(st.sampled_from(["regular", "regular", "as_completed", "latest"]))
            if kind == "regular":
                edges.append(f"s{draw(st.integers(0, i - 1))}")
            elif kind == "latest":
                edges.append(Latest(f"s{draw(st.integers(0, i - 1))}"))
            else:
                srcs = draw(st.lists(st.integers(0, i - 1), min_size=1, max_size=min(4, i), unique=True))
                edges.append(AsCompleted(*[f"s{j}" for j in srcs], k=draw(st.integers(1, len(srcs)))))
        inputs = {f"in{j}": e for j, e in enumerate(edges)} if draw(st.booleans()) else edges
        params = {"p": i} if draw(st.booleans()) else {}
        retry = Retry(attempts=draw(st.integers(1, 3)), backoff=0.5, on=(ConnectionError,))
        steps.append(Step(f"s{i}", anything, inputs, params, retry=retry))
    order = draw(st.permutations(steps))
    return Workflow("random", order).validate()


@dataclasses.dataclass
class Trace:
    """What a random driver did to a machine, for the properties to check."""

    machine: StepMachine
    fail_fast: bool
    runs: dict[str, list[tuple[list, dict]]]  # step -> the arguments of each of its runs
    fatal: set[str]  # steps whose run the driver failed for good
    closed_early: bool  # the run was cancelled from outside before it quiesced
    stopped_at: int | None  # event number of the first failure under fail-fast
    starts_after_stop: int
    finals: dict[str, list]  # on_result(final=True) values per step
    done_order: list[str]  # steps in the order they became done


def drive(plan, data, fail_fast: bool, *, allow_close: bool = True) -> Trace:
    """Run ``plan`` through a machine with every choice drawn from ``data``: which ready step
    starts, which running step finishes and how. Checks the per-event invariants as it goes."""
    finals: dict[str, list] = {}
    done_order: list[str] = []

    def on_result(name, value, final):
        if final:
            finals.setdefault(name, []).append(value)
            done_order.append(name)

    m = StepMachine(plan, fail_fast=fail_fast, on_result=on_result)
    nodes = m.nodes
    trace = Trace(m, fail_fast, {}, set(), False, None, 0, finals, done_order)
    running: dict[int, tuple[list, dict]] = {}
    tries: dict[int, int] = {}
    before = m.states()
    now = 0.0
    event = 0
    while m.ready or running:
        event += 1
        now += 1.0
        if allow_close and data.draw(st.integers(0, 40), label="close?") == 0:
            trace.closed_early = True
            break
        actions = (["start"] if m.ready else []) + (["finish"] if running else [])
        if data.draw(st.sampled_from(actions), label="action") == "start":
            k = data.draw(st.integers(0, len(m.ready) - 1), label="which ready")
            i = m.ready[k]
            del m.ready[k]  # an executor may take ready steps in any order
            if m.stopping:
                trace.starts_after_stop += 1
            check_inputs_available(m, i, done_order)
            args, kwargs = m.start(i, now)
            check_arguments(m, i, args, kwargs, done_order)
            m.attempt(i)
            tries[i] = 1
            running[i] = (args, kwargs)
            trace.runs.setdefault(nodes[i].step.name, []).append((args, kwargs))
        else:
            i = sorted(running)[data.draw(st.integers(0, len(running) - 1), label="which running")]
            node = nodes[i]
            outcome = data.draw(st.sampled_from(["ok", "ok", "retryable", "fatal"]), label="outcome")
            if outcome == "ok":
                del running[i]
                m.succeeded(i, (node.step.name, node.record.runs + 1), now)
            else:
                exc = ConnectionError("flaky") if outcome == "retryable" else ValueError("bad")
                retry = node.step.retry
                expect_retry = outcome == "retryable" and tries[i] < retry.attempts
                assert m.retryable(i, exc) == expect_retry
                if expect_retry:
                    assert m.backoff(i) == retry.delay(tries[i])
                    m.attempt(i)
                    tries[i] += 1
                    assert node.record.state == RUNNING
                else:
                    del running[i]
                    m.failed(i, exc, now)
                    trace.fatal.add(node.step.name)
                    if fail_fast and trace.stopped_at is None:
                        trace.stopped_at = event
        after = m.states()
        for (name, old, new) in zip(plan.order, before, after):
            assert old == new or (old, new) in LEGAL, f"{name}: {old} -> {new}"
        for node in nodes:
            rec = node.record
            if node.state == READY:
                assert rec.state == (PARTIAL if rec.runs else PENDING)
            else:
                assert rec.state == node.state
        assert [i for i, s in enumerate(after) if s == READY] == sorted(m.ready)  # ready == queued
        if m.stopping:
            assert not m.ready
        before = after
    if not trace.closed_early and not m.stopping:
        # Quiescent: nothing ready, nothing running. No step may be left waiting for ever.
        assert all(s in FINAL_STATES for s in m.states()), dict(zip(plan.order, m.states()))
    m.close(now + 1)
    for (name, old, new) in zip(plan.order, before, m.states()):
        assert old == new or (old not in FINAL_STATES and new == CANCELLED), f"{name}: {old} -> {new} at close"
    return trace


def check_inputs_available(m: StepMachine, i: int, done_order: list[str]) -> None:
    """Invariant 1: every regular input done, every async edge has its k arrivals."""
    node, index = m.nodes[i], m.plan.index
    for edge in list(node.step.args) + [e for _, e in node.step.kwargs]:
        if isinstance(edge, Latest):
            assert m.nodes[index[edge.step]].record.runs > 0, f"{node.step.name} started before {edge.step} had a result"
        elif isinstance(edge, AsCompleted):
            done = [s for s in edge.steps if m.nodes[index[s]].state == DONE]
            assert len(done) >= edge.k, f"{node.step.name} started with {done} of {edge.steps} done, k={edge.k}"
        else:
            assert m.nodes[index[edge]].state == DONE, f"{node.step.name} started before {edge} was done"


def check_arguments(m: StepMachine, i: int, args: list, kwargs: dict, done_order: list[str]) -> None:
    """A run gets the final results of its regular inputs, every source done so far (in the
    order they finished) for an AsCompleted edge, the newest result for a Latest edge."""
    node, index = m.nodes[i], m.plan.index

    def expected(edge):
        if isinstance(edge, Latest):
            return m.nodes[index[edge.step]].result
        if isinstance(edge, AsCompleted):
            return {s: m.nodes[index[s]].result for s in done_order if s in edge.steps}
        return m.nodes[index[edge]].result

    assert args == [expected(e) for e in node.step.args]
    assert kwargs == {**{k: expected(e) for k, e in node.step.kwargs}, **node.step.params}
    assert isinstance(args, list) and len(args) == len(node.step.args)


def can_get_inputs(m: StepMachine, step: Step) -> bool:
    index = m.plan.index
    for edge in list(step.args) + [e for _, e in step.kwargs]:
        if isinstance(edge, Latest):
            if m.nodes[index[edge.step]].record.runs == 0:
                return False
        elif isinstance(edge, AsCompleted):
            if sum(m.nodes[index[s]].state == DONE for s in edge.steps) < edge.k:
                return False
        elif m.nodes[index[edge]].state != DONE:
            return False
    return True


# ----------------------------------------------------------------------------- properties
@given(plans(), st.data(), st.booleans())
@settings(max_examples=80, deadline=None)
def test_every_step_ends_in_exactly_one_final_state(plan, data, fail_fast):
    t = drive(plan, data, fail_fast)
    for node in t.machine.nodes:
        assert node.state in FINAL_STATES and node.record.state == node.state
        if node.record.start is not None:
            assert node.record.start <= node.record.end
    assert set(t.machine.errors) == t.fatal == {n.step.name for n in t.machine.nodes if n.state == FAILED}


@given(plans(), st.data(), st.booleans())
@settings(max_examples=80, deadline=None)
def test_nothing_runs_twice_unless_retried_or_an_async_edge_brought_more(plan, data, fail_fast):
    t = drive(plan, data, fail_fast)
    for node in t.machine.nodes:
        name, step = node.step.name, node.step
        runs = t.runs.get(name, [])
        assert node.record.attempts <= len(runs) * step.retry.attempts
        if not step.has_async_edges:
            assert len(runs) <= 1, f"{name} ran {len(runs)} times"
            continue
        seen = [seen_by(step, args, kwargs) for args, kwargs in runs]
        for earlier, later in zip(seen, seen[1:]):
            assert earlier < later, f"{name} reran on {later}, having seen {earlier}"


def seen_by(step: Step, args: list, kwargs: dict) -> frozenset:
    """What one run's async edges delivered: (edge, source, result) for each arrival."""
    got = set()
    for where, edge in [(n, e) for n, e in enumerate(step.args)] + [(k, e) for k, e in step.kwargs]:
        value = args[where] if isinstance(where, int) else kwargs[where]
        if isinstance(edge, Latest):
            # Latest passes the newest result only; the ones before it count as seen.
            got.update((where, edge.step, r) for r in range(1, value[1] + 1))
        elif isinstance(edge, AsCompleted):
            got.update((where, s, v) for s, v in value.items())
    return frozenset(got)


@given(plans(), st.data())
@settings(max_examples=80, deadline=None)
def test_continue_skips_exactly_what_can_no_longer_get_its_inputs(plan, data):
    t = drive(plan, data, fail_fast=False, allow_close=False)
    m = t.machine
    for node in m.nodes:
        name = node.step.name
        if can_get_inputs(m, node.step):
            assert node.state == (FAILED if name in t.fatal else DONE), f"{name} is {node.state}"
        else:
            assert node.state == SKIPPED and name not in t.runs, f"{name} is {node.state}"


@given(plans(), st.data())
@settings(max_examples=80, deadline=None)
def test_a_done_step_has_one_final_result_from_a_run_that_saw_everything(plan, data):
    t = drive(plan, data, fail_fast=False, allow_close=False)
    m, index = t.machine, plan.index
    for node in m.nodes:
        name = node.step.name
        if node.state != DONE:
            assert name not in t.finals
            continue
        assert t.finals[name] == [node.result]  # reported final exactly once, with the result
        args, kwargs = t.runs[name][-1]
        assert node.result == (name, len(t.runs[name]))  # the last run's result
        for where, edge in [(n, e) for n, e in enumerate(node.step.args)] + [(k, e) for k, e in node.step.kwargs]:
            value = args[where] if isinstance(where, int) else kwargs[where]
            if isinstance(edge, Latest):
                assert value == m.nodes[index[edge.step]].result  # the source's last result
            elif isinstance(edge, AsCompleted):
                assert set(value) == {s for s in edge.steps if m.nodes[index[s]].state == DONE}


@given(plans(), st.data())
@settings(max_examples=80, deadline=None)
def test_fail_fast_starts_nothing_after_the_first_failure_and_cancels_the_rest(plan, data):
    t = drive(plan, data, fail_fast=True)
    states = t.machine.states()
    assert SKIPPED not in states
    assert t.starts_after_stop == 0
    if t.stopped_at is not None or t.closed_early:
        assert all(s in (DONE, FAILED, CANCELLED) for s in states)
    else:
        assert all(s == DONE for s in states)  # no failure: everything ran


# ----------------------------------------------------------------------------- scenarios
def plan_of(*steps: Step):
    return Workflow("w", list(steps)).validate()


def test_an_executor_bug_is_refused_with_the_step_named():
    m = StepMachine(plan_of(Step("a", anything), Step("b", anything, ["a"])))
    with pytest.raises(InvalidTransition, match="'b' is pending: it cannot be started"):
        m.start(1, 0.0)
    with pytest.raises(InvalidTransition, match="'a' is ready: it cannot be succeeded"):
        m.succeeded(0, 1, 0.0)
    m.ready.popleft()
    m.start(0, 0.0)
    m.attempt(0)
    m.succeeded(0, 1, 1.0)
    with pytest.raises(InvalidTransition, match="'a' is done"):
        m.failed(0, ValueError(), 2.0)


def test_retries_count_per_run_and_only_listed_errors():
    m = StepMachine(plan_of(Step("a", anything, retry=Retry(attempts=3, backoff=1, factor=2, on=(OSError,)))))
    m.start(m.ready.popleft(), 0.0)
    assert m.backoff(0) is None
    m.attempt(0)
    assert m.retryable(0, ConnectionError()) and not m.retryable(0, ValueError())
    assert m.backoff(0) == 1
    m.attempt(0)
    assert m.backoff(0) == 2
    m.attempt(0)
    assert not m.retryable(0, ConnectionError())  # three tries made
    m.failed(0, ConnectionError("down"), 3.0)
    assert m.records[0].attempts == 3 and m.records[0].error == "ConnectionError: down"


def test_fail_fast_cancels_unrelated_pending_steps_and_lets_running_ones_finish():
    plan = plan_of(Step("a", anything), Step("b", anything), Step("c", anything, ["a"]), Step("d", anything, ["b"]))
    m = StepMachine(plan, fail_fast=True)
    a, b = m.ready.popleft(), m.ready.popleft()
    for i in (a, b):
        m.start(i, 0.0)
        m.attempt(i)
    m.failed(a, ValueError("no"), 1.0)
    assert m.stopping and not m.ready
    m.succeeded(b, "B", 2.0)  # a step already running still finishes ...
    assert not m.ready  # ... but its children do not start
    m.close(3.0)
    assert dict(zip(plan.order, m.states())) == {"a": FAILED, "b": DONE, "c": CANCELLED, "d": CANCELLED}
    assert m.results() == {"b": "B"}


def test_continue_skips_the_downstream_of_a_failure_only():
    plan = plan_of(Step("a", anything), Step("b", anything, ["a"]), Step("c", anything, ["b"]),
                   Step("x", anything), Step("y", anything, ["x"]))
    m = StepMachine(plan, fail_fast=False)
    order = plan.index
    for name in ("a", "x"):
        i = order[name]
        m.ready.remove(i)
        m.start(i, 0.0)
        m.attempt(i)
    m.failed(order["a"], KeyError("col"), 1.0)
    m.succeeded(order["x"], 1, 1.0)
    assert [plan.order[i] for i in m.ready] == ["y"]
    assert m.nodes[order["b"]].state == SKIPPED and m.nodes[order["c"]].state == SKIPPED


def test_as_completed_coalesces_arrivals_during_a_run_into_one_rerun():
    plan = plan_of(*[Step(n, anything) for n in "abc"], Step("s", anything, [AsCompleted("a", "b", "c", k=1)]))
    m = StepMachine(plan, fail_fast=False)
    ix = plan.index
    for n in "abc":
        m.ready.remove(ix[n])
        m.start(ix[n], 0.0)
    m.succeeded(ix["a"], "A", 1.0)
    assert list(m.ready) == [ix["s"]]
    m.ready.popleft()
    assert m.start(ix["s"], 1.0)[0] == [{"a": "A"}]
    m.succeeded(ix["b"], "B", 2.0)  # both arrive while s runs
    m.succeeded(ix["c"], "C", 2.0)
    assert not m.ready
    m.succeeded(ix["s"], "S1", 3.0)
    assert m.nodes[ix["s"]].record.state == PARTIAL and list(m.ready) == [ix["s"]]
    m.ready.popleft()
    assert m.start(ix["s"], 3.0)[0] == [{"a": "A", "b": "B", "c": "C"}]
    m.succeeded(ix["s"], "S2", 4.0)
    assert m.nodes[ix["s"]].state == DONE and m.results()["s"] == "S2"


def test_a_partial_step_finished_by_a_failed_source_does_not_rerun_its_latest_consumers():
    """s (AsCompleted a, b) ran on a's result; b fails, so s is final without another run, and
    c (Latest s), which already ran on that result, finishes without running again."""
    plan = plan_of(Step("a", anything), Step("b", anything), Step("s", anything, [AsCompleted("a", "b", k=1)]),
                   Step("c", anything, [Latest("s")]))
    m = StepMachine(plan, fail_fast=False)
    ix = plan.index

    def run(name, value=None, fail=False):
        m.ready.remove(ix[name])
        args = m.start(ix[name], 0.0)[0]
        if fail:
            m.failed(ix[name], ValueError("no"), 1.0)
        elif value is not None:
            m.succeeded(ix[name], value, 1.0)
        return args

    m.ready.remove(ix["b"])
    m.start(ix["b"], 0.0)
    run("a", "A")
    run("s", "S")
    assert m.nodes[ix["s"]].state == PARTIAL
    assert run("c", "C") == ["S"]
    assert m.nodes[ix["c"]].state == PARTIAL  # s may still produce more
    m.failed(ix["b"], ValueError("no"), 2.0)
    assert m.states() == [DONE, FAILED, DONE, DONE] and not m.ready
    assert m.records[ix["c"]].runs == 1
