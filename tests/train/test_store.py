"""The model store: bitwise round trips, versions, atomic saves, integrity, ModelNotFound."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import threading
import time

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from dmlsys.train.errors import ModelNotFound, StoreError
from dmlsys.train.store import ModelStore, flatten, unflatten

KEYS = st.text("abcdefgh_0123", min_size=1, max_size=6)
LEAVES = hnp.arrays(st.sampled_from([np.float32, np.float64, np.int32, np.uint8, np.bool_]),
                    hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4))
TREES = st.recursive(st.dictionaries(KEYS, LEAVES, min_size=1, max_size=3),
                     lambda sub: st.dictionaries(KEYS, sub | LEAVES, min_size=1, max_size=3), max_leaves=8)


def assert_same_tree(a, b):
    assert flatten(a).keys() == flatten(b).keys()
    for k, v in flatten(a).items():
        w = flatten(b)[k]
        assert v.dtype == w.dtype and v.shape == w.shape and v.tobytes() == w.tobytes(), k


@settings(max_examples=25, deadline=None)
@given(TREES)
def test_save_then_load_is_bitwise_identical(tree):
    with tempfile.TemporaryDirectory() as d:
        store = ModelStore(d)
        version = store.save("m", tree, {"arch": {"kind": "mlp"}})
        params, card = store.load("m")
        assert_same_tree(tree, params)
        assert card["version"] == version == 1 and card["name"] == "m" and card["arch"] == {"kind": "mlp"}


@settings(max_examples=50, deadline=None)
@given(TREES)
def test_flatten_unflatten_round_trip(tree):
    assert_same_tree(unflatten(flatten(tree)), tree)


def params(v: float):
    return {"dense0": {"w": np.full((3, 2), v, np.float32), "b": np.zeros(2, np.float32)}}


def test_versions_count_up_and_latest_is_the_default(tmp_path):
    store = ModelStore(tmp_path)
    assert [store.save("fmnist-mlp", params(v), {"test_accuracy": v}) for v in (0.5, 0.7, 0.9)] == [1, 2, 3]
    assert store.versions("fmnist-mlp") == [1, 2, 3] and store.models() == ["fmnist-mlp"]
    assert store.card("fmnist-mlp")["test_accuracy"] == 0.9
    p, card = store.load("fmnist-mlp", 1)
    assert card["version"] == 1 and p["dense0"]["w"][0, 0] == np.float32(0.5)


def test_unknown_model_and_version_name_what_exists(tmp_path):
    store = ModelStore(tmp_path)
    store.save("a", params(1))
    store.save("b", params(1))
    with pytest.raises(ModelNotFound, match=r"model 'c' not in the store; available models: a, b") as info:
        store.load("c")
    assert isinstance(info.value, KeyError)
    with pytest.raises(ModelNotFound, match=r"model 'a' version 7 not in the store; available versions: 1"):
        store.card("a", 7)
    with pytest.raises(ModelNotFound, match="available models: none"):
        ModelStore(tmp_path / "empty").versions("a")


def test_concurrent_saves_get_distinct_versions(tmp_path):
    store = ModelStore(tmp_path)
    got: list[int] = []
    threads = [threading.Thread(target=lambda i=i: got.append(store.save("m", params(i)))) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == list(range(1, 9)) == store.versions("m")
    for v in got:  # every version holds the params its card describes
        p, card = store.load("m", v)
        assert card["version"] == v


def test_failed_save_leaves_no_version_and_no_temporary_files(tmp_path):
    store = ModelStore(tmp_path)
    with pytest.raises(StoreError, match="not JSON-serialisable"):
        store.save("m", params(1), {"when": object()})
    assert list((tmp_path / "m").iterdir()) == []
    with pytest.raises(ModelNotFound):
        store.versions("m")


def test_half_written_versions_are_invisible(tmp_path):
    store = ModelStore(tmp_path)
    store.save("m", params(1))
    (tmp_path / "m" / ".tmp-crashed").mkdir()  # a writer died before its rename
    (tmp_path / "m" / "2").mkdir()  # no card: not a version
    assert store.versions("m") == [1]


def test_damaged_params_fail_their_checksum(tmp_path):
    store = ModelStore(tmp_path)
    store.save("m", params(1))
    other = tmp_path / "other"
    ModelStore(other).save("m", params(2))
    (tmp_path / "m" / "1" / "params.npz").write_bytes((other / "m" / "1" / "params.npz").read_bytes())
    with pytest.raises(StoreError, match="params_sha .* differs"):
        store.load("m")


def test_pickled_object_arrays_are_refused(tmp_path):
    store = ModelStore(tmp_path)
    store.save("m", params(1))
    with open(tmp_path / "m" / "1" / "params.npz", "wb") as f:
        np.savez(f, **{"dense0/w": np.array([{"x": 1}], dtype=object)})
    with pytest.raises(StoreError, match="unreadable parameters"):
        store.load("m")


@pytest.mark.parametrize("name", ["", ".hidden", "a/b", "../x", "x" * 200])
def test_bad_names_are_refused(tmp_path, name):
    with pytest.raises(StoreError, match="model name"):
        ModelStore(tmp_path).save(name, params(1))


def test_card_is_plain_json_with_the_filled_fields(tmp_path):
    ModelStore(tmp_path).save("m", params(1), {"arch": {"kind": "mlp"}, "test_accuracy": 0.9})
    card = json.loads((tmp_path / "m" / "1" / "card.json").read_text())
    assert {"name", "version", "created", "params_sha", "param_count", "arch", "test_accuracy"} <= set(card)
    assert card["param_count"] == 8


def test_default_root_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("DMLSYS_STORE", str(tmp_path / "s"))
    assert ModelStore().root == tmp_path / "s"
    monkeypatch.delenv("DMLSYS_STORE")
    monkeypatch.chdir(tmp_path)
    assert ModelStore().root == tmp_path / ".dmlsys" / "models"


# -- durability: what a power loss or a crash leaves behind ------------------------------------

DAMAGE = {
    "empty card": lambda v: (v / "card.json").write_bytes(b""),
    "truncated card": lambda v: (v / "card.json").write_bytes((v / "card.json").read_bytes()[:20]),
    "card not an object": lambda v: (v / "card.json").write_text("null"),
    "empty params": lambda v: (v / "params.npz").write_bytes(b""),
    "truncated params": lambda v: (v / "params.npz").write_bytes((v / "params.npz").read_bytes()[:100]),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_the_latest_version_damaged_falls_back_to_the_newest_intact_one(tmp_path, caplog, damage):
    store = ModelStore(tmp_path)
    for v in (1.0, 2.0, 3.0):
        store.save("m", params(v), {"test_accuracy": v})
    DAMAGE[damage](tmp_path / "m" / "3")
    with caplog.at_level("WARNING", logger="dmlsys.train"):
        p, card = store.load("m")
    assert card["version"] == 2 and p["dense0"]["w"][0, 0] == np.float32(2.0)
    assert any("'m' version 3 is damaged" in r.getMessage() for r in caplog.records), caplog.text
    assert store.intact_version("m") == 2 and store.models() == ["m"]
    if "card" in damage:
        assert store.card("m")["version"] == 2
    with pytest.raises(StoreError, match="/m/3/"):  # asked for by number, the damage is the answer
        store.load("m", 3)
    assert store.save("m", params(4.0)) == 4, "a damaged version still holds its number"


def test_a_model_with_no_intact_version_is_not_present(tmp_path):
    store = ModelStore(tmp_path)
    store.save("m", params(1.0))
    store.save("ok", params(1.0))
    (tmp_path / "m" / "1" / "card.json").write_bytes(b"")
    assert store.models() == ["ok"], "up trains a model that models() does not list"
    assert store.intact_version("m") is None and store.intact_version("nosuch") is None
    with pytest.raises(StoreError, match="no intact version.*version 1: .*unreadable card"):
        store.load("m")


def test_params_failing_their_checksum_make_a_version_not_intact(tmp_path):
    store = ModelStore(tmp_path)
    store.save("m", params(1.0))
    store.save("m", params(2.0))
    other = ModelStore(tmp_path / "other")
    other.save("m", params(9.0))
    (tmp_path / "m" / "2" / "params.npz").write_bytes((tmp_path / "other" / "m" / "1" / "params.npz").read_bytes())
    assert store.intact_version("m") == 1 and store.load("m")[1]["version"] == 1


def test_save_fsyncs_both_files_the_temporary_directory_and_the_rename(tmp_path, monkeypatch):
    synced: list[str] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    ModelStore(tmp_path / "store").save("m", params(1.0))
    names = [s.replace(str(tmp_path / "store"), "") for s in synced]
    tmp = [n for n in names if n.startswith("/m/.tmp-") and n.count("/") == 2]
    assert any(n.endswith("/params.npz") for n in names) and any(n.endswith("/card.json") for n in names)
    assert tmp, f"the temporary directory is fsynced before its rename: {names}"
    assert names.index(tmp[0]) < names.index("/m"), "the model directory is fsynced after the rename"
    assert str(tmp_path) in synced, "a new store's root entry is made durable in its parent"


def test_temporary_directories_of_crashed_saves_are_removed_by_the_next_save(tmp_path):
    store = ModelStore(tmp_path)
    store.save("m", params(1.0))
    dead = subprocess.Popen(["true"])
    dead.wait()
    mdir = tmp_path / "m"
    crashed = mdir / f".tmp-{dead.pid}-abc"  # its writer is gone
    running = mdir / f".tmp-{os.getppid()}-def"  # its writer is alive: a save in progress
    old_unnamed = mdir / ".tmp-0123abcd"  # from before the pid was in the name, two minutes old
    new_unnamed = mdir / ".tmp-4567cdef"
    for d in (crashed, running, old_unnamed, new_unnamed):
        d.mkdir()
        (d / "params.npz").write_bytes(b"x")
    os.utime(old_unnamed, (time.time() - 120, time.time() - 120))
    store.save("m", params(2.0))
    left = sorted(p.name for p in mdir.iterdir())
    assert left == sorted(["1", "2", running.name, new_unnamed.name])


def test_a_card_saved_with_the_old_sha256_still_verifies_and_still_catches_damage(tmp_path):
    """Cards written before params_sha became dmlsys.arrays.fingerprint carry SHA-256 (64 hex
    digits): they load, and a damaged file under such a card still fails."""
    from dmlsys.train.store import _sha256_v0, flatten as flat_of

    store = ModelStore(tmp_path)
    store.save("m", params(1))
    card_path = tmp_path / "m" / "1" / "card.json"
    card = json.loads(card_path.read_text())
    assert len(card["params_sha"]) == 32  # new cards: the shared fingerprint
    card["params_sha"] = _sha256_v0(flat_of(params(1)))
    card_path.write_text(json.dumps(card))
    loaded, _ = store.load("m")
    assert_same_tree(loaded, params(1))
    card["params_sha"] = _sha256_v0(flat_of(params(2)))
    card_path.write_text(json.dumps(card))
    with pytest.raises(StoreError, match="params_sha .* differs"):
        store.load("m")


def test_a_list_in_a_parameter_tree_is_refused_naming_where(tmp_path):
    with pytest.raises(StoreError, match="'dense0/w' are a list"):
        ModelStore(tmp_path).save("m", {"dense0": {"w": [np.ones(2), np.ones(2)]}})
