"""dmlsys.arrays: the one array fingerprint, the one OPS table, the one pytree walker."""

from __future__ import annotations

import itertools
from typing import NamedTuple

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dmlsys import arrays

DTYPES = st.sampled_from([np.float32, np.float64, np.int32, np.uint8, np.bool_, np.complex64])
ARRAYS = hnp.arrays(DTYPES, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4))
NAMED = st.dictionaries(st.text("abcxyz_", min_size=1, max_size=4), ARRAYS, max_size=4)


def test_the_fingerprint_format_is_pinned():
    """Stored fingerprints (datasets' in model cards, params_sha) are compared with ones
    computed later: this exact value must never change without a migration."""
    named = {"x": np.arange(12, dtype=np.uint8).reshape(3, 4), "y": np.array([1.5, -2.0], np.float32),
             "e": np.zeros((0, 2), np.int64)}
    assert arrays.fingerprint(named) == "6d66f4cf231bc1b4f60cbf637e07c777"


@settings(max_examples=100, deadline=None)
@given(NAMED)
def test_equal_contents_give_equal_fingerprints_whatever_the_order_or_memory_layout(named):
    reordered = {k: v.T.copy().T for k, v in reversed(list(named.items()))}  # Fortran order, same shape
    assert arrays.fingerprint(reordered) == arrays.fingerprint(named)


@settings(max_examples=100, deadline=None)
@given(NAMED, st.data())
def test_any_change_of_name_dtype_shape_or_byte_changes_the_fingerprint(named, data):
    base = arrays.fingerprint(named)
    changed = dict(named)
    victims = [k for k, v in named.items() if v.size]
    what = data.draw(st.sampled_from(["rename", "reshape", "retype", "flip"] if victims else ["rename"])) \
        if named else "add"
    if what == "add":
        changed["new"] = np.zeros(1)
    elif what == "rename":
        k = data.draw(st.sampled_from(sorted(named)))
        changed[k + "_"] = changed.pop(k)
    else:
        k = data.draw(st.sampled_from(victims))
        a = named[k]
        if what == "reshape":
            changed[k] = a.reshape(-1, 1) if a.ndim != 2 or a.shape[1] != 1 else a.reshape(-1)
        elif what == "retype":  # the same values, another dtype
            changed[k] = a.astype(np.complex128)
        else:
            b = a.copy()
            b.reshape(-1).view(np.uint8)[data.draw(st.integers(0, a.nbytes - 1))] ^= 1
            changed[k] = b
    assert arrays.fingerprint(changed) != base


def test_object_arrays_have_no_fingerprint():
    with pytest.raises(TypeError, match="'bad'.*object"):
        arrays.fingerprint({"bad": np.array([{"x": 1}], dtype=object)})


def test_ops_name_the_folds_and_mean_folds_like_sum():
    assert arrays.OPS["mean"] is arrays.OPS["sum"] is np.add
    assert {"sum", "mean", "max", "min"} == set(arrays.OPS)


class State(NamedTuple):
    count: np.ndarray
    mu: dict


TREES = st.recursive(
    ARRAYS,
    lambda sub: st.dictionaries(st.text("ab", min_size=1, max_size=2), sub, max_size=3)
    | st.lists(sub, max_size=3) | st.tuples(sub, sub) | st.builds(State, sub, st.dictionaries(st.just("m"), sub)),
    max_leaves=10)


@settings(max_examples=100, deadline=None)
@given(TREES)
def test_flatten_then_rebuild_gives_the_same_structure_and_leaves(tree):
    leaves, rebuild = arrays.flatten(tree)
    back = rebuild(leaves)
    assert type(back) is type(tree) or isinstance(tree, np.ndarray)
    again, _ = arrays.flatten(back)
    assert len(again) == len(leaves) and all(a is b for a, b in zip(again, leaves))
    with_paths, _ = arrays.flatten_with_paths(tree)
    assert [leaf for _, leaf in with_paths] == leaves or all(a is b for (_, a), b in zip(with_paths, leaves))


def test_paths_name_each_leaf_by_keys_and_indices():
    tree = {"conv0": {"w": np.ones(2), "b": 0.5}, "layers": [np.zeros(1), (1, 2)]}
    pairs, _ = arrays.flatten_with_paths(tree)
    assert [p for p, _ in pairs] == [("conv0", "w"), ("conv0", "b"), ("layers", 0), ("layers", 1, 0), ("layers", 1, 1)]


@given(st.integers(0, 10_000), st.integers(1, 64))
def test_segments_cover_the_length_in_nearly_equal_contiguous_ranges(length, n):
    bounds = arrays.segments(length, n)
    assert len(bounds) == n
    assert bounds[0][0] == 0 and bounds[-1][1] == length
    assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
    sizes = [b - a for a, b in bounds]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_segments_refuse_a_bad_count_naming_it():
    with pytest.raises(ValueError, match="n=0"):
        arrays.segments(10, 0)
