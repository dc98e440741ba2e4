"""The IDX codec: round trips, partial reads, and typed errors that name the file."""

from __future__ import annotations

import gzip
import tempfile
from pathlib import Path

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from dmlsys.train.errors import DataError
from dmlsys.train.idx import decode_idx, encode_idx, read_idx, write_idx

DTYPES = st.sampled_from([np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
ARRAYS = DTYPES.flatmap(
    lambda dt: hnp.arrays(dt, hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=6),
                          elements={"allow_nan": False} if np.dtype(dt).kind == "f" else None)
)


@settings(max_examples=60, deadline=None)
@given(ARRAYS)
def test_bytes_round_trip_preserves_dtype_shape_and_values(a):
    b = decode_idx(encode_idx(a))
    assert b.dtype == a.dtype and b.shape == a.shape
    np.testing.assert_array_equal(a, b)


@settings(max_examples=15, deadline=None)
@given(ARRAYS, st.booleans())
def test_file_round_trip_plain_and_gzip(a, compress):
    with tempfile.TemporaryDirectory() as d:
        path = write_idx(Path(d) / ("a.gz" if compress else "a"), a)
        assert (path.read_bytes()[:2] == b"\x1f\x8b") == compress
        np.testing.assert_array_equal(read_idx(path), a)


@settings(max_examples=30, deadline=None)
@given(hnp.arrays(np.uint8, st.tuples(st.integers(0, 20), st.just(3))), st.integers(0, 30))
def test_limit_reads_only_the_first_records(a, limit):
    np.testing.assert_array_equal(decode_idx(encode_idx(a), limit=limit), a[:limit])


@settings(max_examples=40, deadline=None)
@given(hnp.arrays(np.int16, hnp.array_shapes(min_dims=1, max_dims=2, min_side=1, max_side=5)), st.data())
def test_truncated_bytes_raise_data_error_naming_the_source(a, data):
    raw = encode_idx(a)
    cut = data.draw(st.integers(0, len(raw) - 1))
    with pytest.raises(DataError, match="images.idx.*truncated"):
        decode_idx(raw[:cut], name="images.idx")


def test_truncated_gzip_file_raises_data_error_naming_the_file(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(encode_idx(np.zeros((50, 28, 28), np.uint8)))[:-40])
    with pytest.raises(DataError) as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_bad_magic_is_not_an_idx_file(tmp_path):
    path = tmp_path / "labels.idx"
    path.write_bytes(b"\x12\x34\x08\x01" + b"\x00" * 8)
    with pytest.raises(DataError, match=r"labels\.idx: not an IDX file"):
        read_idx(path)


def test_trailing_bytes_are_rejected(tmp_path):
    path = tmp_path / "x.idx"
    path.write_bytes(encode_idx(np.arange(4, dtype=np.uint8)) + b"junk")
    with pytest.raises(DataError, match="trailing bytes"):
        read_idx(path)


def test_missing_file_is_a_data_error_naming_it(tmp_path):
    with pytest.raises(DataError, match="nope.gz: no such file"):
        read_idx(tmp_path / "nope.gz")


def test_unsupported_dtype_is_refused():
    with pytest.raises(ValueError, match="IDX cannot store"):
        encode_idx(np.zeros(3, np.uint16))
