"""The scheduler: ordering, fan-out limits, async edges, failures, retries, timeouts, cancellation."""

from __future__ import annotations

import asyncio
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dmlsys.workflow import (CONTINUE, AsCompleted, Latest, Retry, RunConfig, Scheduler, Step, StepTimeout,
                             Workflow, WorkflowFailed, run)
from wfhelpers import Recorder, build, dags

QUIET = RunConfig(progress=False)


def cfg(**kw) -> RunConfig:
    return RunConfig(progress=False, **kw)


@given(dags(), st.sampled_from([1, 2, 8]))
@settings(max_examples=40, deadline=None)
def test_every_step_runs_once_after_all_its_dependencies(dag, concurrency):
    n, deps, order, kinds = dag
    rec = Recorder()
    result = run(build(n, deps, order, kinds, rec), cfg(concurrency=concurrency))
    assert sorted(rec.calls()) == sorted(f"s{i}" for i in range(n))  # exactly once each
    pos = {(e, name): k for k, (e, name) in enumerate(rec.events)}
    for i in range(n):
        for d in deps[i]:
            assert pos[("end", f"s{d}")] < pos[("start", f"s{i}")]
    assert set(result.report.states().values()) == {"done"}


@given(dags())
@settings(max_examples=25, deadline=None)
def test_results_do_not_depend_on_the_concurrency_limit(dag):
    n, deps, order, kinds = dag
    results = [run(build(n, deps, order, kinds, Recorder()), cfg(concurrency=c)).results for c in (1, 3, 16)]
    assert results[0] == results[1] == results[2]


def test_concurrency_limit_bounds_running_steps():
    active, peak = 0, 0

    async def work(i):
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        await asyncio.sleep(0.01)
        active -= 1
        return i

    wf = Workflow("fan", [Step(f"w{i}", work, params={"i": i}) for i in range(12)]
                  + [Step("sink", lambda *xs: sum(xs), [f"w{i}" for i in range(12)], inline=True)])
    assert run(wf, cfg(concurrency=3))["sink"] == sum(range(12))
    assert peak == 3


# ----------------------------------------------------------------------------- async edges
def _edge_workflow(seen: list, k: int, consumer_gate: asyncio.Event | None = None):
    gates = {n: asyncio.Event() for n in ("a", "b", "c")}

    async def train(name):
        await gates[name].wait()
        return name.upper()

    async def serve(models):
        seen.append(dict(models))
        if consumer_gate is not None:
            await consumer_gate.wait()
        return sorted(models.values())

    wf = Workflow("edges", [Step(n, train, params={"name": n}) for n in gates]
                  + [Step("serve", serve, [AsCompleted("a", "b", "c", k=k)]),
                     Step("report", lambda s: ",".join(s), ["serve"], inline=True)])
    return wf, gates


async def _until(predicate, timeout=2.0):
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.001)


def test_as_completed_runs_on_first_k_and_reruns_as_more_arrive():
    async def main():
        seen, finals = [], []
        wf, gates = _edge_workflow(seen, k=1)
        sched = Scheduler(QUIET, on_result=lambda s, v, final: finals.append((s, final)) if s == "serve" else None)
        task = asyncio.ensure_future(sched.run(wf))
        gates["b"].set()
        await _until(lambda: len(seen) == 1)
        assert seen == [{"b": "B"}]  # served the first model while the others still train
        gates["c"].set()
        await _until(lambda: len(seen) == 2)
        assert list(seen[1]) == ["b", "c"]  # completion order
        gates["a"].set()
        result = await task
        assert list(seen[2]) == ["b", "c", "a"] and len(seen) == 3
        assert finals == [("serve", False), ("serve", False), ("serve", True)]
        assert result["report"] == "A,B,C"  # regular dependents get the final result only
        assert result.report["serve"].runs == 3 and result.report["report"].runs == 1

    asyncio.run(main())


def test_latest_follows_every_partial_result_and_finishes_on_the_final_one():
    """select (async edge over a, b, c) -> serve (Latest) -> report: serve runs on each of
    select's results as it comes, partial ones included; report gets serve's final result."""

    async def main():
        seen, finals = [], []
        gates = {n: asyncio.Event() for n in ("a", "b", "c")}

        async def train(name):
            await gates[name].wait()
            return name.upper()

        async def serve(chosen):
            seen.append(chosen)
            return "+".join(chosen)

        wf = Workflow("stream", [Step(n, train, params={"name": n}) for n in gates] + [
            Step("select", lambda got: sorted(got.values())[:2], [AsCompleted("a", "b", "c", k=1)], inline=True),
            Step("serve", serve, [Latest("select")]),
            Step("report", lambda s: f"[{s}]", ["serve"], inline=True)])
        sched = Scheduler(QUIET, on_result=lambda s, v, final: finals.append(final) if s == "serve" else None)
        task = asyncio.ensure_future(sched.run(wf))
        gates["c"].set()
        await _until(lambda: len(seen) == 1)
        assert seen == [["C"]] and not task.done()  # served while a and b still train
        gates["b"].set()
        await _until(lambda: len(seen) == 2)
        gates["a"].set()
        result = await task
        assert seen == [["C"], ["B", "C"], ["A", "B"]]
        assert finals == [False, False, True]
        assert result["serve"] == "A+B" and result["report"] == "[A+B]"
        assert result.report["serve"].runs == 3 and result.report["report"].runs == 1

    asyncio.run(main())


def test_latest_on_a_plain_step_runs_once_on_its_result():
    r = run(Workflow("w", [Step("a", lambda: 41, inline=True),
                           Step("b", lambda x: x + 1, [Latest("a")], inline=True)]), QUIET)
    assert r["b"] == 42 and r.report["b"].runs == 1


def test_latest_on_a_failed_step_is_skipped_and_the_rest_finishes():
    def boom():
        raise ValueError("no")

    wf = Workflow("w", [Step("a", boom, inline=True), Step("b", lambda x: x, [Latest("a")], inline=True),
                        Step("c", lambda: 1, inline=True)])
    r = run(wf, cfg(on_failure=CONTINUE, raise_on_failure=False))
    assert r.report["b"].state == "skipped" and r["c"] == 1


def test_as_completed_coalesces_arrivals_during_a_run_and_waits_for_k():
    async def main():
        seen = []
        gate = asyncio.Event()
        wf, gates = _edge_workflow(seen, k=2, consumer_gate=gate)
        task = asyncio.ensure_future(Scheduler(QUIET).run(wf))
        gates["a"].set()
        await asyncio.sleep(0.02)
        assert seen == []  # k=2: one source is not enough
        gates["c"].set()
        await _until(lambda: len(seen) == 1)
        gates["b"].set()  # arrives while serve is running
        await asyncio.sleep(0.02)
        gate.set()
        result = await task
        assert [list(s) for s in seen] == [["a", "c"], ["a", "c", "b"]]  # one rerun, not one per arrival
        assert result["serve"] == ["A", "B", "C"]

    asyncio.run(main())


def test_as_completed_tolerates_failures_down_to_k():
    def boom():
        raise RuntimeError("no")

    def steps(k, failing):
        srcs = [Step(n, boom if n in failing else (lambda n=n: n), inline=True) for n in "abc"]
        return Workflow("w", srcs + [Step("best", lambda m: sorted(m), [AsCompleted("a", "b", "c", k=k)], inline=True),
                                     Step("after", lambda b: b, ["best"], inline=True)])

    r = run(steps(2, {"b"}), cfg(on_failure=CONTINUE, raise_on_failure=False))
    assert r["best"] == ["a", "c"] and r["after"] == ["a", "c"]
    r = run(steps(2, {"a", "b"}), cfg(on_failure=CONTINUE, raise_on_failure=False))
    assert r.report.states()["best"] == "skipped" and r.report.states()["after"] == "skipped"


# ----------------------------------------------------------------------------- failures
def test_fail_fast_cancels_running_steps_and_leaves_no_task():
    cleaned = []

    async def slow(name):
        try:
            await asyncio.sleep(30)
        finally:
            cleaned.append(name)

    async def bad():
        await asyncio.sleep(0.01)
        raise ValueError("bad input")

    wf = Workflow("ff", [Step("slow1", slow, params={"name": "slow1"}), Step("slow2", slow, params={"name": "slow2"}),
                         Step("bad", bad), Step("later", lambda x: x, ["slow1"], inline=True)])

    async def main():
        with pytest.raises(WorkflowFailed, match="'bad' failed: ValueError: bad input") as e:
            await Scheduler(QUIET).run(wf)
        assert asyncio.all_tasks() == {asyncio.current_task()}
        return e.value

    err = asyncio.run(main())
    assert sorted(cleaned) == ["slow1", "slow2"]
    assert err.result.report.states() == {"slow1": "cancelled", "slow2": "cancelled", "bad": "failed",
                                          "later": "cancelled"}
    assert isinstance(err.errors["bad"], ValueError)


def test_continue_finishes_what_does_not_depend_on_the_failure():
    def bad(x):
        raise KeyError("missing column")

    wf = Workflow("c", [Step("src", lambda: 1, inline=True), Step("bad", bad, ["src"]),
                        Step("child", lambda x: x, ["bad"], inline=True),
                        Step("grandchild", lambda x: x, ["child"], inline=True),
                        Step("ok", lambda x: x + 1, ["src"]), Step("ok2", lambda x: x * 10, ["ok"], inline=True)])
    with pytest.raises(WorkflowFailed) as e:
        run(wf, cfg(on_failure=CONTINUE))
    r = e.value.result
    assert r.results == {"src": 1, "ok": 2, "ok2": 20}
    assert r.report.states() == {"src": "done", "bad": "failed", "child": "skipped", "grandchild": "skipped",
                                 "ok": "done", "ok2": "done"}
    assert "missing column" in r.report["bad"].error


@given(dags(), st.data())
@settings(max_examples=30, deadline=None)
def test_continue_skips_exactly_the_descendants_of_failed_steps(dag, data):
    """Through the real executor (inline, thread and coroutine steps): the steps downstream of a
    failure skipped (planned to fail or not), the other planned failures failed, the rest done."""
    n, deps, order, kinds = dag
    failing = data.draw(st.sets(st.integers(0, n - 1), max_size=3), label="failing")
    rec = Recorder()

    def boom(*args, salt=0):
        raise RuntimeError("planned")

    async def aboom(*args, salt=0):
        raise RuntimeError("planned")

    wf = build(n, deps, order, kinds, rec)
    for i in failing:
        wf = wf.replace(f"s{i}", fn=aboom if kinds[i] == "async" else boom)
    r = run(wf, cfg(on_failure=CONTINUE, raise_on_failure=False))
    plan = wf.validate()
    below = set().union(*[plan.descendants(f"s{i}") for i in failing]) if failing else set()
    expected = {f"s{i}": "skipped" if f"s{i}" in below else "failed" if i in failing else "done" for i in range(n)}
    assert r.report.states() == expected
    assert sorted(rec.calls()) == sorted(name for name, state in expected.items() if state == "done")


def test_cancelling_the_run_cancels_every_step_it_started():
    cleaned = []

    async def slow(i):
        try:
            await asyncio.sleep(30)
        finally:
            cleaned.append(i)

    wf = Workflow("x", [Step(f"s{i}", slow, params={"i": i}) for i in range(5)])

    async def main():
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(Scheduler(QUIET).run(wf), 0.05)
        assert asyncio.all_tasks() == {asyncio.current_task()}

    asyncio.run(main())
    assert sorted(cleaned) == list(range(5))


# ----------------------------------------------------------------------------- retries, timeouts
@pytest.mark.parametrize("kind", ["inline", "thread", "async"])
def test_retries_with_backoff(kind):
    calls, sleeps = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("try again")
        return "ok"

    async def aflaky():
        return flaky()

    async def fake_sleep(s):
        sleeps.append(s)

    step = Step("f", aflaky if kind == "async" else flaky, retry=Retry(attempts=4, backoff=0.1, factor=3),
                inline=kind == "inline")
    r = asyncio.run(Scheduler(QUIET, sleep=fake_sleep).run(Workflow("r", [step])))
    assert r["f"] == "ok" and r.report["f"].attempts == 3
    assert sleeps == pytest.approx([0.1, 0.3])


def test_retries_give_up_and_only_retry_listed_errors():
    calls = []

    def always(exc):
        calls.append(exc)
        raise exc("nope")

    async def no_sleep(s):
        pass

    retry = Retry(attempts=3, on=(ConnectionError,))
    for exc, expected in ((ConnectionError, 3), (ValueError, 1)):
        calls.clear()
        wf = Workflow("r", [Step("f", always, params={"exc": exc}, retry=retry)])
        with pytest.raises(WorkflowFailed) as e:
            asyncio.run(Scheduler(QUIET, sleep=no_sleep).run(wf))
        assert len(calls) == expected and e.value.result.report["f"].attempts == expected


def test_timeouts_fail_coroutine_and_thread_steps():
    release = threading.Event()

    async def hang():
        await asyncio.sleep(30)

    def block():
        release.wait(5)

    for fn in (hang, block):
        wf = Workflow("t", [Step("slow", fn, timeout=0.05, retry=Retry(attempts=2))])
        with pytest.raises(WorkflowFailed) as e:
            run(wf, QUIET)
        assert isinstance(e.value.errors["slow"], StepTimeout)
        assert "'slow'" in str(e.value.errors["slow"]) and e.value.result.report["slow"].attempts == 2
    release.set()  # let the abandoned thread finish


def test_progress_view_renders_a_table(capsys):
    wf = Workflow("p", [Step("a", lambda: 1, inline=True), Step("b", lambda a: a, ["a"])])
    r = run(wf, RunConfig(progress=True))
    assert r["b"] == 1
    out = capsys.readouterr().out
    assert "step" in out and "cache" in out and "done" in out


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=1, max_size=5), st.integers(1, 5), st.booleans())
def test_a_chain_of_latest_edges_sees_growing_prefixes_and_ends_on_everything(delays, k, slow_consumer):
    """Sources finish in any order; gather (async edge) -> a (Latest) -> b (Latest). Every
    value a and b see is a prefix-closed growing set, and their final results cover every
    source, however runs and arrivals interleave."""
    k = min(k, len(delays))
    names = [f"s{i}" for i in range(len(delays))]
    seen_a: list[tuple] = []

    async def source(i):
        await asyncio.sleep(delays[i] / 1000)
        return i

    async def a(got):
        seen_a.append(got)
        if slow_consumer:
            await asyncio.sleep(0.002)
        return got

    wf = Workflow("chain", [Step(n, source, params={"i": i}) for i, n in enumerate(names)] + [
        Step("gather", lambda got: tuple(sorted(got.values())), [AsCompleted(*names, k=k)], inline=True),
        Step("a", a, [Latest("gather")]),
        Step("b", lambda got: len(got), [Latest("a")], inline=True)])
    r = asyncio.run(Scheduler(QUIET).run(wf))
    everything = tuple(range(len(delays)))
    assert r["gather"] == r["a"] == everything and r["b"] == len(delays)
    assert len(seen_a[0]) >= k and seen_a[-1] == everything
    assert all(set(x) < set(y) for x, y in zip(seen_a, seen_a[1:]))  # strictly growing, never repeated
