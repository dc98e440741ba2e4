"""Memoization: canonical keys, pickle-free blobs, policies, freshness, GC, crash safety."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from dmlsys.workflow import (CODE, DEFAULT, INPUTS, NONE, PARAMS, CacheKeyError, CacheValueError, MaxAge, MemoStore,
                             Probe, RunConfig, Step, Workflow, WorkflowFailed, code_version, file_stamp, fingerprint,
                             run)
from dmlsys.workflow import serial
from dmlsys.workflow.store import Entry, select_for_gc
from wfhelpers import Recorder, build, dags

QUIET = RunConfig(progress=False)


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


# ----------------------------------------------------------------------------- values
arrays = hnp.arrays(st.sampled_from([np.float32, np.float64, np.int8, np.int64, np.uint16, np.bool_]),
                    hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4))
leaves = (st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats(allow_nan=False)
          | st.text(max_size=8) | st.binary(max_size=8) | arrays)
trees = st.recursive(leaves, lambda c: st.lists(c, max_size=3) | st.lists(c, max_size=3).map(tuple)
                     | st.dictionaries(st.text(max_size=4) | st.integers(0, 9), c, max_size=3), max_leaves=10)


def same(a, b) -> bool:
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    if type(a) is not type(b):
        return False
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


@given(trees)
@settings(max_examples=150, deadline=None)
def test_blobs_round_trip_pytrees_without_pickle(value):
    blob = serial.dumps(value)
    back = serial.loads(blob)
    assert same(value, back)
    assert fingerprint(back) == fingerprint(value)


def test_blobs_refuse_objects_and_garbage():
    with pytest.raises(serial.SerialError, match="object"):
        serial.dumps(np.array([object()]))
    with pytest.raises(serial.SerialError, match="without pickle"):
        serial.dumps({"model": object()})
    with pytest.raises(serial.SerialError):
        serial.loads(b"\x80\x04pickle")
    with pytest.raises(serial.SerialError):
        serial.loads(serial.MAGIC + b"\xc1\xff")


def test_jax_arrays_are_stored_as_numpy():
    jnp = pytest.importorskip("jax.numpy")
    tree = {"w": jnp.arange(6.0).reshape(2, 3), "b": (jnp.zeros(2),)}
    back = serial.loads(serial.dumps(tree))
    assert isinstance(back["w"], np.ndarray) and np.array_equal(back["w"], np.arange(6.0).reshape(2, 3))
    assert fingerprint(tree) == fingerprint(back)


@given(st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=5), max_size=6), st.randoms())
@settings(max_examples=100, deadline=None)
def test_fingerprint_ignores_dict_order(d, rnd):
    items = list(d.items())
    rnd.shuffle(items)
    assert fingerprint(dict(items)) == fingerprint(d)


def test_fingerprint_distinguishes_types_dtypes_and_shapes():
    values = [1, 1.0, True, "1", b"1", [1], (1,), {1: 1}, {1}, np.int64(1), np.int32(1), np.array(1),
              np.array([1]), np.array([1], dtype=np.int32), np.zeros((2, 3)), np.zeros((3, 2)), None, 0.0, -0.0]
    assert len({fingerprint(v) for v in values}) == len(values)

    @dataclasses.dataclass(frozen=True)
    class Cfg:
        lr: float

    assert fingerprint(Cfg(0.1)) == fingerprint(Cfg(0.1)) != fingerprint(Cfg(0.2))


def test_code_version_follows_source_or_explicit_version():
    def a(x):
        return x

    def b(x):
        return x + 1

    assert code_version(a) != code_version(b)
    assert code_version(a, "2") == code_version(b, "2") == "v:2"


def test_policies_compose_like_values():
    assert DEFAULT == CODE + PARAMS + INPUTS
    assert (DEFAULT - CODE) + CODE == PARAMS + INPUTS + CODE
    assert NONE + CODE == CODE and not NONE.enabled and (CODE - CODE) == NONE
    assert (DEFAULT + MaxAge(60) + MaxAge(10)).max_age == 10 and DEFAULT.max_age is None
    assert DEFAULT + CODE == DEFAULT


# ----------------------------------------------------------------------------- memoized runs
@given(dags(max_steps=10), st.data())
@settings(max_examples=20, deadline=None)
def test_memoized_rerun_equals_fresh_run_and_params_invalidate_exactly_the_descendants(tmp_path_factory, dag, data):
    n, deps, order, kinds = dag
    root = tmp_path_factory.mktemp("memo")
    with MemoStore(root) as store:
        fresh = run(build(n, deps, order, kinds, Recorder()), QUIET)
        rec = Recorder()
        first = run(build(n, deps, order, kinds, rec, cached=True), QUIET, store=store)
        assert first.results == fresh.results and sorted(rec.calls()) == sorted(fresh.results)
        rec = Recorder()
        again = run(build(n, deps, order, kinds, rec, cached=True), QUIET, store=store)
        assert again.results == fresh.results and rec.calls() == []
        assert set(again.report.hits()) == set(fresh.results)

        changed = f"s{data.draw(st.integers(0, n - 1))}"
        rec = Recorder()
        wf = build(n, deps, order, kinds, rec, cached=True, salts={changed: 1})
        third = run(wf, QUIET, store=store)
        assert set(rec.calls()) == {changed} | wf.validate().descendants(changed)
        assert third.results == run(build(n, deps, order, kinds, Recorder(), salts={changed: 1}), QUIET).results


def _counting_workflow(calls: list, cache) -> Workflow:
    def load(path):
        calls.append("load")
        return np.frombuffer(open(path, "rb").read(), dtype=np.uint8)

    def count(data):
        calls.append("count")
        return int(data.sum())

    return Workflow("w", [Step("load", load, params={"path": None}, cache=cache, version="1"),
                          Step("count", count, ["load"], cache=DEFAULT, version="1")])


def test_time_based_freshness_with_injected_clock(tmp_path):
    f = tmp_path / "data.bin"
    f.write_bytes(b"\x01\x02")
    clock, calls = Clock(), []
    wf = _counting_workflow(calls, DEFAULT + MaxAge(60)).replace("load", params={"path": str(f)})
    with MemoStore(tmp_path / "cache", clock=clock) as store:
        assert run(wf, QUIET, store=store)["count"] == 3 and calls == ["load", "count"]
        clock.t += 59
        r = run(wf, QUIET, store=store)
        assert calls == ["load", "count"] and r.report.hits() == ["load", "count"]
        clock.t += 2  # 61 s after the entry was written: stale
        r = run(wf, QUIET, store=store)
        assert calls == ["load", "count", "load"]  # same value, so count still hits (early cut-off)
        assert r.report["load"].cache == "miss" and r.report["count"].cache == "hit"
        clock.t += 30  # the refreshed entry is 30 s old: fresh again
        run(wf, QUIET, store=store)
        assert calls == ["load", "count", "load"]


def test_content_probe_invalidates_when_the_source_changes(tmp_path):
    f = tmp_path / "data.bin"
    f.write_bytes(b"\x01\x02")
    calls = []
    probe = Probe(lambda p: file_stamp(p["path"]), "stamp")
    wf = _counting_workflow(calls, DEFAULT + probe).replace("load", params={"path": str(f)})
    with MemoStore(tmp_path / "cache") as store:
        run(wf, QUIET, store=store)
        run(wf, QUIET, store=store)
        assert calls == ["load", "count"]
        f.write_bytes(b"\x01\x02\x03")
        assert run(wf, QUIET, store=store)["count"] == 6
        assert calls == ["load", "count", "load", "count"]


def test_unstorable_results_and_unfingerprintable_inputs_name_the_step(tmp_path):
    with MemoStore(tmp_path) as store:
        wf = Workflow("w", [Step("model", lambda: object(), cache=DEFAULT, version="1")])
        with pytest.raises(WorkflowFailed) as e:
            run(wf, QUIET, store=store)
        assert isinstance(e.value.errors["model"], CacheValueError) and "'model'" in str(e.value.errors["model"])
        wf = Workflow("w", [Step("model", lambda: object(), inline=True),
                            Step("eval", lambda m: 1, ["model"], cache=DEFAULT, version="1")])
        with pytest.raises(WorkflowFailed) as e:
            run(wf, QUIET, store=store)
        assert isinstance(e.value.errors["eval"], CacheKeyError) and "positional input 0" in str(e.value.errors["eval"])


# ----------------------------------------------------------------------------- store, crash, GC
def test_crash_between_blob_and_index_never_hits(tmp_path, monkeypatch):
    with MemoStore(tmp_path) as store:
        store.put("k1", "step", {"v": 1})

        def crash(entry):
            raise SystemExit("power cut")

        monkeypatch.setattr(store, "_insert_row", crash)
        with pytest.raises(SystemExit):
            store.put("k2", "step", {"v": 2})  # new key: blob written, no row
        with pytest.raises(SystemExit):
            store.put("k1", "step", {"v": 3})  # refresh: new blob under an old row
    assert (tmp_path / "blobs" / "k2"[:2] / "k2").exists()
    with MemoStore(tmp_path) as store:
        assert store.get("k2") is None
        assert store.get("k1") is None  # neither the old value nor the half-written new one
        assert store.entries() == []  # the mismatched row was dropped
        store.gc(max_age=1e9)
        assert list((tmp_path / "blobs").glob("*/*")) == []  # the orphan blob was swept


def test_corrupt_or_missing_blob_is_a_miss(tmp_path):
    with MemoStore(tmp_path) as store:
        store.put("aa1", "s", np.arange(100))
        store.put("aa2", "s", [1, 2])
        path = store.blob_path("aa1")
        path.write_bytes(path.read_bytes()[:-10])
        os.remove(store.blob_path("aa2"))
        assert store.get("aa1") is None and store.get("aa2") is None


def test_gc_removes_exactly_the_stale_then_the_least_recently_used(tmp_path):
    clock = Clock(0.0)
    with MemoStore(tmp_path, clock=clock) as store:
        for key, t in (("a", 0), ("b", 10), ("c", 30), ("d", 40)):
            clock.t = t
            store.put(key, "s", b"x" * 100)
        clock.t = 50
        assert store.get("b") is not None  # b was used at 50
        clock.t = 100
        removed = store.gc(max_age=65)  # a (100 s) and c (70 s) are stale; b (50 s) and d (60 s) are not
        assert sorted(e.key for e in removed) == ["a", "c"]
        size = store.entries()[0].size
        removed = store.gc(max_bytes=size)  # one entry fits: d (used at 40) goes; b's hit at 50 saves it
        assert [e.key for e in removed] == ["d"] and [e.key for e in store.entries()] == ["b"]
        assert store.clear() == 1 and store.entries() == []


entries_st = st.lists(st.tuples(st.integers(0, 100), st.one_of(st.none(), st.integers(0, 100)), st.integers(0, 50)),
                      max_size=12)


@given(entries_st, st.one_of(st.none(), st.integers(0, 100)), st.one_of(st.none(), st.integers(0, 300)))
@settings(max_examples=200, deadline=None)
def test_gc_selection_rule(raw, max_age, max_bytes):
    now = 120
    entries = [Entry(f"k{i:02d}", "s", c, h, 0, size, "fp", "ck") for i, (c, h, size) in enumerate(raw)]
    removed = select_for_gc(entries, now, max_age, max_bytes)
    gone = {e.key for e in removed}
    kept = [e for e in entries if e.key not in gone]
    if max_age is not None:
        assert all(now - e.last_used <= max_age for e in kept)  # nothing stale survives
    if max_bytes is not None:
        assert sum(e.size for e in kept) <= max_bytes
    by_size = [e for e in removed if max_age is None or now - e.last_used <= max_age]
    for e in by_size:  # a fresh entry goes only if it is older than every survivor, and only if needed
        assert all((e.last_used, e.key) < (k.last_used, k.key) for k in kept)
    if by_size:
        assert sum(e.size for e in kept) + by_size[-1].size > max_bytes
    if max_age is None and max_bytes is None:
        assert removed == []
