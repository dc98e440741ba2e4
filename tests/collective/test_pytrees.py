"""Pytrees through the collectives: structure kept, leaves fused into few ring passes."""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dmlsys.arrays import flatten
from dmlsys.collective.tree import fuse, numeric_leaves, unfuse
from tests.collective.helpers import run_groups


class State(NamedTuple):  # optax states are named tuples like this one
    count: np.ndarray
    mu: dict


def tree_for(rank: int) -> dict:
    return {
        "dense": {"w": np.full((3, 4), rank, np.float32), "b": jnp.arange(4, dtype=jnp.float32) + rank},
        "layers": [np.int64(rank), np.arange(5, dtype=np.int32) * rank],
        "pair": (np.float64(rank), np.zeros((0, 2), np.float32)),
        "state": State(np.array(rank, np.int32), {"m": np.ones(2, np.float16) * rank}),
    }


def same_structure(a, b) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(same_structure(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same_structure(x, y) for x, y in zip(a, b))
    return isinstance(b, np.ndarray) and b.shape == np.shape(a)


def test_allreduce_of_a_pytree_keeps_dicts_lists_tuples_named_tuples_and_jax_leaves():
    n = 3

    async def body(sg):
        return await sg.each(lambda g: g.allreduce(tree_for(g.rank), "sum"))

    results = run_groups(n, body)
    for out in results:
        assert not isinstance(out, BaseException), out
        assert same_structure(tree_for(0), out)
        assert isinstance(out["state"], State)
        np.testing.assert_array_equal(out["dense"]["w"], np.full((3, 4), 3, np.float32))  # 0+1+2
        np.testing.assert_array_equal(out["dense"]["b"], np.arange(4) * 3 + 3)
        assert out["layers"][0] == 3 and out["layers"][0].dtype == np.int64
        np.testing.assert_array_equal(out["layers"][1], np.arange(5) * 3)
        assert out["pair"][1].shape == (0, 2)
        assert out["state"].mu["m"].dtype == np.float16


def test_allgather_and_broadcast_of_a_pytree():
    n = 4

    async def body(sg):
        gathered = await sg.each(lambda g: g.allgather(tree_for(g.rank)))
        sent = await sg.each(lambda g: g.broadcast(tree_for(g.rank), root=2))
        return gathered, sent

    gathered, sent = run_groups(n, body)
    for out in gathered:
        assert out["dense"]["w"].shape == (n, 3, 4)
        np.testing.assert_array_equal(out["layers"][0], np.arange(n))
        assert out["pair"][1].shape == (n, 0, 2)
    for out in sent:
        assert isinstance(out["state"], State)
        np.testing.assert_array_equal(out["dense"]["w"], np.full((3, 4), 2, np.float32))


def test_a_model_with_many_small_leaves_costs_one_pass_per_dtype_bucket_not_one_per_leaf():
    tree = {f"layer{i}": {"w": np.ones((8, 8), np.float32), "b": np.ones(8, np.float32)} for i in range(50)}
    tree["step"] = np.int64(7)

    async def body(sg):
        await sg.each(lambda g: g.allreduce(tree, "mean"))
        return [g.ops for g in sg.groups]

    assert run_groups(2, body) == [2, 2]  # one float32 bucket + one int64 bucket
    assert len(fuse(flatten(tree)[0], bucket_bytes=4096)) > 2  # a smaller cap makes more buckets


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(0, 300), min_size=1, max_size=12),
       kinds=st.lists(st.sampled_from(["f4", "f8", "i4", "u1"]), min_size=12, max_size=12),
       cap=st.integers(1, 2000))
def test_fuse_then_unfuse_gives_back_every_leaf(sizes, kinds, cap):
    leaves = [np.arange(s).astype(np.dtype(k)) for s, k in zip(sizes, kinds)]
    buckets = fuse(leaves, cap)
    assert sorted(i for b in buckets for i in b.indices) == list(range(len(leaves)))
    for b in buckets:
        assert len({leaves[i].dtype for i in b.indices}) == 1  # one dtype per bucket
        assert b.flat.nbytes <= cap or len(b.indices) == 1  # over the cap only as a single leaf
    out: list = [None] * len(leaves)
    for b in buckets:
        unfuse(b, b.flat, out)
    for a, b in zip(leaves, out):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)


def test_a_non_numeric_leaf_is_refused_naming_its_type():
    with pytest.raises(TypeError, match="str"):
        numeric_leaves({"a": np.ones(2), "b": "text"})
