"""Request parsing: the vectorised fast path agrees with json.loads, and bad bodies say why."""

import json

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from dmlsys.serving.errors import BadInput
from dmlsys.serving.instances import _parse_slow, parse, parse_many

pixel = st.one_of(st.integers(-1000, 1000), st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False),
                  st.floats(0, 1).map(lambda v: round(v, 4)))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(pixel, min_size=784, max_size=784), min_size=1, max_size=3), st.booleans())
def test_fast_path_gives_the_same_arrays_as_json(rows, spaced):
    body = json.dumps({"instances": rows}, separators=(", ", ": ") if spaced else (",", ":")).encode()
    fast = parse(body, 8)
    expected = np.asarray(rows, np.float64).astype(np.float32)
    np.testing.assert_allclose(fast, expected, rtol=1e-6, atol=0)


def test_nested_28x28_instances_are_accepted():
    img = [[0.5] * 28 for _ in range(28)]
    out = parse(json.dumps({"instances": [img, img]}).encode(), 4)
    assert out.shape == (2, 784) and np.all(out == 0.5)


@pytest.mark.parametrize("body, reason", [
    (b"not json", "not valid JSON"),
    (b'{"inputs": [[1]]}', "missing"),
    (b'{"instances": []}', "non-empty"),
    (b'{"instances": [[1, 2, 3]]}', "length 3"),
    (json.dumps({"instances": [["a"] * 784]}).encode(), "not a number"),
    (json.dumps({"instances": [[True] * 784]}).encode(), "not a number"),
    (b'{"instances": [[' + b"01," * 783 + b"1]]}", "not valid JSON"),
    (b'{"instances": [[' + b"1.," * 783 + b"1]]}", "not valid JSON"),
    (b'{"instances": [[' + b"-," * 783 + b"1]]}", "not valid JSON"),
    (b'{"instances": [[' + b"NaN," * 783 + b"1]]}", "finite"),
])
def test_malformed_bodies_are_refused_with_the_reason(body, reason):
    with pytest.raises(BadInput, match=reason):
        parse(body, 4)


def test_too_many_instances_names_the_limit():
    body = json.dumps({"instances": [[0] * 784] * 5}).encode()
    with pytest.raises(BadInput, match="limit is 4"):
        parse(body, 4)


def test_one_bad_body_in_a_batch_does_not_fail_the_others():
    good = json.dumps({"instances": [[0.25] * 784]}).encode()
    out = parse_many([good, b'{"instances": [[' + b"1e5," * 783 + b"1]]}", b"{", good], 4)
    assert isinstance(out[0], np.ndarray) and isinstance(out[3], np.ndarray)
    assert isinstance(out[1], np.ndarray) and out[1][0, 0] == 1e5  # exponents take the json path
    assert isinstance(out[2], BadInput)
    assert isinstance(_parse_slow(b"{", 4), BadInput)
