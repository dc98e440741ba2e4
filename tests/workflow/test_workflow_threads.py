"""The pool threads' path: a thread that finishes a plain step reports it and runs the next ready
plain step itself. Random DAGs mixing thread, inline and coroutine steps (and memoized ones) must
behave exactly as when every step runs inline on the loop."""

from __future__ import annotations

import asyncio
import tempfile
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dmlsys.workflow import (CONTINUE, DEFAULT, NONE, MemoStore, RunConfig, Scheduler, Step, Workflow, run)
from wfhelpers import Recorder, build, dags

KINDS = st.sampled_from(["thread", "thread", "thread", "inline", "async"])  # mostly threads


@st.composite
def thread_dags(draw, max_steps: int = 16):
    n, deps, order, _ = draw(dags(max_steps))
    kinds = draw(st.lists(KINDS, min_size=n, max_size=n))
    return n, deps, order, kinds


def cfg(**kw) -> RunConfig:
    return RunConfig(progress=False, **kw)


def _boom(*args, salt=0):
    raise RuntimeError("planned")


async def _aboom(*args, salt=0):
    raise RuntimeError("planned")


def _with_failures(wf: Workflow, kinds: list[str], failing: set[int]) -> Workflow:
    for i in failing:
        wf = wf.replace(f"s{i}", fn=_aboom if kinds[i] == "async" else _boom)
    return wf


@given(thread_dags(), st.sampled_from([1, 2, 8]))
@settings(max_examples=40, deadline=None)
def test_results_equal_the_inline_runner_and_each_step_runs_once(dag, concurrency):
    n, deps, order, kinds = dag
    inline = run(build(n, deps, order, ["inline"] * n, Recorder()), cfg())
    rec = Recorder()
    got = run(build(n, deps, order, kinds, rec), cfg(concurrency=concurrency))
    assert got.results == inline.results
    assert sorted(rec.calls()) == sorted(f"s{i}" for i in range(n))
    assert all(r.attempts == 1 and r.runs == 1 for r in got.report.records.values())


@given(thread_dags(), st.data())
@settings(max_examples=40, deadline=None)
def test_a_failure_skips_exactly_its_dependents(dag, data):
    n, deps, order, kinds = dag
    failing = data.draw(st.sets(st.integers(0, n - 1), max_size=3), label="failing")
    concurrency = data.draw(st.sampled_from([1, 3, 8]), label="concurrency")
    rec = Recorder()
    wf = _with_failures(build(n, deps, order, kinds, rec), kinds, failing)
    r = run(wf, cfg(on_failure=CONTINUE, raise_on_failure=False, concurrency=concurrency))
    plan = wf.validate()
    below = set().union(*[plan.descendants(f"s{i}") for i in failing]) if failing else set()
    expected = {f"s{i}": "skipped" if f"s{i}" in below else "failed" if i in failing else "done" for i in range(n)}
    assert r.report.states() == expected
    assert sorted(rec.calls()) == sorted(name for name, state in expected.items() if state == "done")
    inline = run(build(n, deps, order, ["inline"] * n, Recorder()), cfg())
    assert r.results == {k: v for k, v in inline.results.items() if expected[k] == "done"}


@given(thread_dags(), st.data())
@settings(max_examples=30, deadline=None)
def test_fail_fast_starts_nothing_after_the_failure_and_runs_nothing_twice(dag, data):
    n, deps, order, kinds = dag
    bad = data.draw(st.integers(0, n - 1), label="failing")
    rec = Recorder()
    wf = _with_failures(build(n, deps, order, kinds, rec), kinds, {bad})
    r = run(wf, cfg(raise_on_failure=False, concurrency=data.draw(st.sampled_from([1, 4]), label="concurrency")))
    states = r.report.states()
    assert states[f"s{bad}"] == "failed"
    assert set(states.values()) <= {"done", "failed", "cancelled"}
    calls = rec.calls()
    assert len(calls) == len(set(calls))  # nothing ran twice
    done = {name for name, s in states.items() if s == "done"}
    # Every step that is done ran; one that ran may also have been cancelled (a thread step
    # still running at the failure: its result is dropped).
    assert done <= set(calls) <= done | {name for name, s in states.items() if s == "cancelled"}
    assert not wf.validate().descendants(f"s{bad}") & set(calls)
    failed_at = r.report[f"s{bad}"].end
    assert all(rec_.start <= failed_at for rec_ in r.report.records.values() if rec_.start is not None)


@given(thread_dags(max_steps=10), st.data())
@settings(max_examples=20, deadline=None)
def test_memoized_steps_are_not_rerun_while_threads_run_the_rest(dag, data):
    n, deps, order, kinds = dag
    cached = data.draw(st.sets(st.integers(0, n - 1)), label="cached")

    def workflow(rec: Recorder) -> Workflow:
        return Workflow("mixed", [
            Step(f"s{i}", rec.make(f"s{i}", kinds[i]), [f"s{d}" for d in deps[i]], params={"salt": 0},
                 inline=kinds[i] == "inline", cache=DEFAULT if i in cached else NONE, version="1")
            for i in order])

    with tempfile.TemporaryDirectory() as root, MemoStore(root) as store:
        first_rec, again_rec = Recorder(), Recorder()
        first = run(workflow(first_rec), cfg(), store=store)
        again = run(workflow(again_rec), cfg(), store=store)
    assert sorted(first_rec.calls()) == sorted(f"s{i}" for i in range(n))
    assert sorted(again_rec.calls()) == sorted(f"s{i}" for i in range(n) if i not in cached)
    assert again.results == first.results
    assert {r.name for r in again.report.records.values() if r.cache == "hit"} == {f"s{i}" for i in cached}


def test_a_chain_of_plain_steps_goes_on_in_its_thread_while_the_loop_is_blocked():
    """After the first step, no step of the chain waits for the loop: a coroutine that blocks the
    loop for 0.5 s does not hold the chain up (handing each step back to the loop would)."""
    ended: dict[str, float] = {}

    def link(*_):
        time.sleep(0.001)  # gives the loop the GIL: it is blocked by the hog, not starved
        ended[threading.current_thread().name] = time.monotonic()
        return threading.current_thread().name

    async def hog():
        time.sleep(0.5)  # noqa: ASYNC251 - blocks the loop thread on purpose
        return time.monotonic()

    chain = [Step("c0", link)] + [Step(f"c{i}", link, [f"c{i - 1}"]) for i in range(1, 20)]
    r = run(Workflow("w", chain + [Step("hog", hog)]), cfg())
    names = {r[f"c{i}"] for i in range(20)}
    assert len(names) == 1 and names != {threading.main_thread().name}  # one pool thread ran all 20
    assert max(ended.values()) < r["hog"]  # ... and finished before the loop was free again


def test_on_result_is_called_on_the_loop_once_per_step_in_the_order_reported():
    calls: list[tuple[str, bool, bool]] = []

    def on_result(step, value, final):
        calls.append((step, final, threading.current_thread() is threading.main_thread()))

    wf = Workflow("w", [Step("a", lambda: 1)] + [Step(f"b{i}", lambda x: x + 1, ["a"]) for i in range(50)]
                  + [Step("c", lambda *xs: sum(xs), [f"b{i}" for i in range(50)])])
    r = asyncio.run(Scheduler(cfg(concurrency=4), on_result=on_result).run(wf))
    assert r["c"] == 100
    assert all(on_loop for _, _, on_loop in calls)
    assert sorted(name for name, _, _ in calls) == sorted(["a", "c"] + [f"b{i}" for i in range(50)])
    names = [name for name, _, _ in calls]
    assert names[0] == "a" and names[-1] == "c"


def test_a_waiting_coroutine_is_not_starved_by_a_long_chain_of_thread_steps():
    """With one slot, a coroutine that became ready while the chain ran gets the slot at the
    chain's next step instead of after the whole chain."""
    order: list[str] = []

    def link(i):
        def fn(*_):
            order.append(f"c{i}")
            time.sleep(0.002)
        return fn

    async def coro(_):
        order.append("coro")

    chain = [Step("c0", link(0))] + [Step(f"c{i}", link(i), [f"c{i - 1}"]) for i in range(1, 30)]
    run(Workflow("w", chain + [Step("coro", coro, ["c0"])]), cfg(concurrency=1))
    assert order.index("coro") <= 2


def test_an_error_of_the_executor_in_a_pool_thread_fails_the_run_instead_of_hanging_it(monkeypatch):
    from dmlsys.workflow.machine import StepMachine

    real_start = StepMachine.start

    def start(self, i, now):
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("bug in the machine")
        return real_start(self, i, now)

    monkeypatch.setattr(StepMachine, "start", start)
    wf = Workflow("w", [Step("a", lambda: 1), Step("b", lambda a: a + 1, ["a"]), Step("c", lambda b: b, ["b"])])

    async def main():
        await asyncio.wait_for(Scheduler(cfg()).run(wf), 5)

    with pytest.raises(RuntimeError, match="bug in the machine"):
        asyncio.run(main())
