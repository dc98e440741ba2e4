"""Validation before anything runs: errors name the step; cycles are real cycles."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dmlsys.workflow import (AsCompleted, CycleError, DuplicateStep, InvalidStep, MissingDependency, Retry,
                             SignatureMismatch, Step, Workflow)
from wfhelpers import Recorder, build, dags


def f(*args):
    return None


def two(a, b):
    return a + b


def test_duplicate_name_is_named():
    with pytest.raises(DuplicateStep, match="'x'"):
        Workflow("w", [Step("x", f), Step("x", f)]).validate()


def test_missing_dependency_names_step_and_dependency():
    with pytest.raises(MissingDependency, match="'b' depends on 'nope'") as e:
        Workflow("w", [Step("a", f), Step("b", f, ["a", "nope"])]).validate()
    assert e.value.step == "b"


def test_signature_mismatch_names_step():
    wf = Workflow("w", [Step("a", f), Step("b", f), Step("add", two, {"a": "a"}, params={"c": 1})])
    with pytest.raises(SignatureMismatch, match="'add'"):
        wf.validate()
    ok = Workflow("w", [Step("a", f), Step("add", two, {"a": "a"}, params={"b": 1})])
    ok.validate()


def test_input_given_twice_is_a_mismatch():
    wf = Workflow("w", [Step("a", f), Step("add", two, {"a": "a", "b": "a"}, params={"b": 1})])
    with pytest.raises(SignatureMismatch, match="both as input and as param"):
        wf.validate()


def test_inline_options_are_checked():
    async def co():
        return 1

    with pytest.raises(InvalidStep, match="'c'"):
        Workflow("w", [Step("c", co, inline=True)]).validate()
    with pytest.raises(InvalidStep, match="timeout"):
        Workflow("w", [Step("t", f, inline=True, timeout=1.0)]).validate()


def test_as_completed_and_retry_reject_nonsense():
    with pytest.raises(ValueError):
        AsCompleted("a", "b", k=3)
    with pytest.raises(ValueError):
        AsCompleted("a", "a")
    with pytest.raises(ValueError):
        Retry(attempts=0)
    assert [Retry(attempts=5, backoff=0.1, factor=2, max_delay=0.3).delay(n) for n in (1, 2, 3)] == [0.1, 0.2, 0.3]


def test_decorator_keeps_function_callable():
    wf = Workflow("w")

    @wf.step(params={"n": 3})
    def load(n):
        return list(range(n))

    @wf.step(inputs={"xs": "load"})
    def total(xs):
        return sum(xs)

    assert load(2) == [0, 1]
    assert wf.validate().order == ["load", "total"]


def test_self_loop_is_a_cycle():
    with pytest.raises(CycleError) as e:
        Workflow("w", [Step("a", f, ["a"])]).validate()
    assert e.value.cycle == ("a", "a")


@given(dags(max_steps=15))
@settings(max_examples=60, deadline=None)
def test_plan_is_topological(dag):
    n, deps, order, kinds = dag
    plan = build(n, deps, order, kinds, Recorder()).validate()
    pos = {name: i for i, name in enumerate(plan.order)}
    assert sorted(pos) == sorted(f"s{i}" for i in range(n))
    for i in range(n):
        for d in deps[i]:
            assert pos[f"s{d}"] < pos[f"s{i}"]


def _acyclic(n: int, edges: dict[int, set[int]]) -> bool:
    remaining = {i: set(ds) for i, ds in edges.items()}
    while remaining:
        free = [i for i, ds in remaining.items() if not ds & remaining.keys()]
        if not free:
            return False
        for i in free:
            del remaining[i]
    return True


@given(st.integers(1, 8).flatmap(
    lambda n: st.tuples(st.just(n), st.lists(st.sets(st.integers(0, n - 1), max_size=3), min_size=n, max_size=n))))
@settings(max_examples=150, deadline=None)
def test_cycles_are_rejected_and_the_reported_cycle_is_real(graph):
    n, deps = graph
    wf = Workflow("g", [Step(f"s{i}", f, [f"s{d}" for d in sorted(deps[i])]) for i in range(n)])
    if _acyclic(n, dict(enumerate(deps))):
        wf.validate()
        return
    with pytest.raises(CycleError) as e:
        wf.validate()
    cycle = e.value.cycle
    assert cycle[0] == cycle[-1] and len(set(cycle[:-1])) == len(cycle) - 1
    for u, v in zip(cycle, cycle[1:]):  # each step feeds the next: v depends on u
        assert int(u[1:]) in deps[int(v[1:])]
    assert " -> ".join(cycle) in str(e.value)


@st.composite
def signatures(draw):
    """Source of a random plain function: positional-only, positional-or-keyword (some with
    defaults), *args, keyword-only (some with defaults), **kwargs."""
    names = iter(draw(st.permutations(["a", "b", "c", "d", "e", "f", "g"])))
    posonly = [next(names) for _ in range(draw(st.integers(0, 2)))]
    normal = [next(names) for _ in range(draw(st.integers(0, 2)))]
    kwonly = [next(names) for _ in range(draw(st.integers(0, 2)))]
    positional = posonly + normal
    n_defaults = draw(st.integers(0, len(positional)))
    params = [p if i < len(positional) - n_defaults else f"{p}=0" for i, p in enumerate(positional)]
    if posonly:
        params.insert(len(posonly), "/")
    star = draw(st.booleans())
    if star:
        params.append("*rest")
    elif kwonly:
        params.append("*")
    params += [k if draw(st.booleans()) else f"{k}=0" for k in kwonly]
    if draw(st.booleans()):
        params.append("**extra")
    return f"def fn({', '.join(params)}): pass"


@given(signatures(), st.integers(0, 5), st.lists(st.sampled_from("abcdefgz"), max_size=4))
@settings(max_examples=200, deadline=None)
def test_the_fast_signature_check_agrees_with_inspect(source, npos, kwnames):
    import inspect

    from dmlsys.workflow.dag import bind_problem

    namespace: dict = {}
    exec(source, namespace)  # noqa: S102 - the function under test is generated
    fn = namespace["fn"]
    try:
        inspect.signature(fn).bind(*range(npos), **dict.fromkeys(kwnames))
        expected = None
    except TypeError as e:
        expected = str(e)
    assert bind_problem(fn, npos, kwnames) == expected, source
