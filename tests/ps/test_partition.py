"""The partition map: balance bound for any list of shapes, slices that cover every leaf exactly
once, table rows by id, round trips through split/join and the wire form."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dmlsys.ps.errors import PartitionError
from dmlsys.ps.partition import LeafSpec, PartitionMap, leaves_by_path, partition, plan

DTYPES = ["<f4", "<f8", "<i8", "|u1", "<f2"]
SHAPES = st.one_of(
    st.just(()),
    st.tuples(st.integers(0, 3000)),
    st.tuples(st.integers(0, 400), st.integers(1, 40)),
    st.tuples(st.integers(1, 30), st.integers(1, 6), st.integers(1, 6)),
)
LEAVES = st.lists(st.tuples(SHAPES, st.sampled_from(DTYPES)), min_size=1, max_size=25)
TABLES = st.lists(st.tuples(st.integers(1, 500), st.integers(1, 16), st.sampled_from(["<f4", "<f8"])),
                  max_size=3)


def specs(leaves, tables):
    out = [LeafSpec(f"p{i}", shape, dt) for i, (shape, dt) in enumerate(leaves)]
    out += [LeafSpec(f"t{i}", (rows, dim), dt) for i, (rows, dim, dt) in enumerate(tables)]
    return out, [f"t{i}" for i in range(len(tables))]


@settings(max_examples=300, deadline=None)
@given(leaves=LEAVES, tables=TABLES, shards=st.integers(1, 9), k=st.integers(1, 8))
def test_no_shard_holds_more_than_the_mean_plus_one_piece(leaves, tables, shards, k):
    all_specs, names = specs(leaves, tables)
    pm = plan(all_specs, shards, tables=names, split_factor=k)
    loads = pm.loads()
    total = sum(s.nbytes for s in all_specs)
    assert sum(loads) == total
    dense = sum(s.nbytes for s in all_specs if s.path not in names)
    cap = max(1, -(-dense // (k * shards)))
    biggest_row = max([s.row_bytes for s in pm.leaves] + [0])
    p = max(cap, biggest_row)  # the largest a piece may be before adjacent ones are merged
    r = sum(t.row_bytes for t in pm.tables)
    assert max(loads) <= total / shards + max(p, r) + 1e-9


@settings(max_examples=200, deadline=None)
@given(leaves=LEAVES, shards=st.integers(1, 9), k=st.integers(1, 8))
def test_the_slices_of_a_leaf_cover_its_rows_exactly_once_in_order(leaves, shards, k):
    all_specs, _ = specs(leaves, [])
    pm = plan(all_specs, shards, split_factor=k)
    for spec in all_specs:
        mine = [s for s in pm.slices if s.path == spec.path]
        assert mine, spec
        rows = spec.shape[0] if spec.shape else 1
        if len(mine) == 1:
            assert mine[0].whole and (mine[0].start, mine[0].stop) == (0, rows)
        else:
            assert not any(s.whole for s in mine)
            assert mine[0].start == 0 and mine[-1].stop == rows
            assert all(a.stop == b.start for a, b in itertools.pairwise(mine))
            assert all(a.shard != b.shard for a, b in itertools.pairwise(mine))  # neighbours on one shard are merged
        assert all(0 <= s.shard < shards for s in mine)
    assert len({s.key for s in pm.slices}) == len(pm.slices)


@settings(max_examples=100, deadline=None)
@given(leaves=LEAVES, shards=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_split_then_join_gives_back_every_value(leaves, shards, seed):
    rng = np.random.default_rng(seed)
    tree = {"layers": [{f"x{i}": rng.integers(0, 200, shape).astype(dt) for i, (shape, dt) in enumerate(leaves)}],
            "scalar": np.float32(3.5)}
    pm = partition(tree, shards)
    flat, build = leaves_by_path(tree)
    parts = pm.split(flat)
    assert len(parts) == shards
    merged = {k: v for part in parts for k, v in part.items()}
    joined = build(pm.join(merged))
    for path, value in leaves_by_path(joined)[0].items():
        want = np.asarray(flat[path])
        assert value.dtype == want.dtype and value.shape == want.shape
        assert value.tobytes() == want.tobytes(), path


@settings(max_examples=100, deadline=None)
@given(leaves=LEAVES, tables=TABLES, shards=st.integers(1, 9))
def test_the_wire_form_gives_back_the_same_map_and_digest(leaves, tables, shards):
    all_specs, names = specs(leaves, tables)
    pm = plan(all_specs, shards, tables=names, version=3)
    again = PartitionMap.from_dict(pm.to_dict())
    assert again == pm and again.digest == pm.digest and again.version == 3


def test_the_same_inputs_give_the_same_map_and_other_shard_counts_another_digest():
    tree = {"a": np.zeros((100, 10), np.float32), "b": np.zeros(7, np.float32), "c": np.zeros((50, 3))}
    assert partition(tree, 3) == partition(tree, 3)
    assert partition(tree, 3).digest != partition(tree, 2).digest


@settings(max_examples=100, deadline=None)
@given(rows=st.integers(1, 1000), shards=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_table_rows_go_to_id_mod_shards_and_every_shard_gets_its_share(rows, shards, seed):
    pm = plan([LeafSpec("emb", (rows, 4), "<f4")], shards, tables=["emb"])
    counts = [pm.tables[0].local_rows(s, shards) for s in range(shards)]
    assert sum(counts) == rows and max(counts) - min(counts) <= 1
    ids = np.random.default_rng(seed).integers(0, rows, 50)
    groups = pm.rows_by_shard("emb", ids)
    assert sorted(np.concatenate(list(groups.values())).tolist()) == sorted(ids.tolist())
    for shard, got in groups.items():
        assert np.all(got % shards == shard)


def test_errors_name_the_table_the_key_and_the_range():
    pm = plan([LeafSpec("emb", (10, 4), "<f4")], 2, tables=["emb"])
    with pytest.raises(PartitionError, match=r"emb.*\[0, 10\)"):
        pm.rows_by_shard("emb", np.array([3, 10]))
    with pytest.raises(PartitionError, match="no sparse table 'nope'"):
        pm.table("nope")
    with pytest.raises(PartitionError, match="'bias' is not a parameter"):
        plan([LeafSpec("emb", (10, 4), "<f4")], 2, tables=["bias"])
    with pytest.raises(PartitionError, match="rows x features"):
        plan([LeafSpec("v", (10,), "<f4")], 2, tables=["v"])
    with pytest.raises(PartitionError, match="shards"):
        plan([], 0)
    with pytest.raises(PartitionError, match="'a/b'"):
        leaves_by_path({"a/b": np.zeros(1)})


def test_one_shard_holds_every_leaf_whole():
    pm = partition({"a": np.zeros((100, 10), np.float32), "b": np.zeros(7, np.float32)}, 1)
    assert [s.key for s in pm.slices] == ["a", "b"]


def test_a_big_leaf_is_split_over_every_shard():
    tree = {"big": np.zeros((1000, 100), np.float32), "small": np.zeros(10, np.float32)}
    pm = partition(tree, 4)
    assert {s.shard for s in pm.slices if s.path == "big"} == {0, 1, 2, 3}
    loads = pm.loads()
    assert max(loads) <= 1.3 * sum(loads) / 4


def test_split_hands_out_views_of_the_callers_arrays_not_copies():
    tree = {"big": np.arange(4000, dtype=np.float32).reshape(400, 10), "small": np.zeros(3, np.float32)}
    pm = partition(tree, 3)
    flat, _ = leaves_by_path(tree)
    for part in pm.split(flat):
        for key, array in part.items():
            assert np.shares_memory(array, flat[key.split("[")[0]]), key
