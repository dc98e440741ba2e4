"""Request parsing: the one-conversion fast path agrees with value-by-value validation, and bad
bodies say why."""

import json

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from dmlsys.serving.errors import BadInput
from dmlsys.serving.instances import instances_array, parse, parse_many


def _image(seed: int, nested: bool, kind: str) -> list:
    """784 pixel values drawn with numpy from a seed (a whole image per example is more entropy
    than hypothesis likes to draw value by value): ints, wide floats, 4-decimal pixels or a mix."""
    rng = np.random.default_rng(seed)
    ints = rng.integers(-1000, 1000, 784).tolist()
    wide = (rng.standard_normal(784) * 10.0 ** rng.integers(-6, 7, 784)).tolist()
    pixels = np.round(rng.random(784), 4).tolist()
    values = {"int": ints, "float": wide, "pixel": pixels,
              "mixed": [(ints, wide, pixels)[k][i] for i, k in enumerate(rng.integers(0, 3, 784))]}[kind]
    return [values[r * 28:(r + 1) * 28] for r in range(28)] if nested else values


image = st.builds(_image, st.integers(0, 2**32 - 1), st.booleans(),
                  st.sampled_from(["int", "float", "pixel", "mixed"]))


@settings(max_examples=40, deadline=None)
@given(st.lists(image, min_size=1, max_size=3), st.booleans())
def test_fast_path_gives_the_same_arrays_as_full_validation(rows, spaced):
    body = json.dumps({"instances": rows}, separators=(", ", ": ") if spaced else (",", ":")).encode()
    fast = parse(body, 8)
    checked = instances_array(json.loads(body), 8)
    assert isinstance(checked, np.ndarray)
    np.testing.assert_array_equal(fast, checked)
    flat = np.asarray([np.ravel(np.asarray(r, np.float64)) for r in rows]).astype(np.float32)
    np.testing.assert_allclose(fast, flat, rtol=1e-6, atol=0)


@settings(max_examples=40, deadline=None)
@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_any_bytes_parse_or_raise_bad_input(body):
    try:
        out = parse(body, 4)
    except BadInput:
        return
    assert out.dtype == np.float32 and out.shape[1] == 784 and np.isfinite(out).all()


def test_nested_28x28_instances_are_accepted():
    img = [[0.5] * 28 for _ in range(28)]
    out = parse(json.dumps({"instances": [img, img]}).encode(), 4)
    assert out.shape == (2, 784) and np.all(out == 0.5)


def _with(value: str) -> bytes:
    """A flat instance of 783 zeros and one odd value in the middle."""
    return ('{"instances": [[' + "0," * 400 + value + ",0" * 383 + "]]}").encode()


@pytest.mark.parametrize("body, reason", [
    (b"not json", "not valid JSON"),
    (b'{"inputs": [[1]]}', "missing"),
    (b'{"instances": []}', "non-empty"),
    (b'{"instances": [[1, 2, 3]]}', "length 3"),
    (b'{"instances": [[1, 2], [3]]}', "length 2"),
    (json.dumps({"instances": [["a"] * 784]}).encode(), "not a number"),
    (json.dumps({"instances": [[True] * 784]}).encode(), "not a number"),
    (_with("true"), "value True is not a number"),
    (_with('"0.5"'), "value '0.5' is not a number"),
    (_with("null"), "value None is not a number"),
    (_with("false"), "value False is not a number"),
    (_with("01"), "not valid JSON"),
    (_with("1."), "not valid JSON"),
    (_with("-"), "not valid JSON"),
    (_with("NaN"), "not valid JSON"),
    (_with("1e39"), "finite"),
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
    out = parse_many([good, _with("1e5"), b"{", good], 4)
    assert isinstance(out[0], np.ndarray) and isinstance(out[3], np.ndarray)
    assert isinstance(out[1], np.ndarray) and out[1][0, 400] == 1e5
    assert isinstance(out[2], BadInput)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(["true", "false", "null"]), st.integers(0, 783), st.booleans())
def test_a_literal_anywhere_among_the_pixels_is_refused_not_read_as_a_number(literal, at, spaced):
    """The fast path takes a body for numbers only when its bytes hold no literal: true and
    false must never become 1.0 and 0.0, nor null a NaN, wherever they stand."""
    values = ["0.5"] * 784
    values[at] = literal
    sep = ", " if spaced else ","
    body = ('{"instances": [[' + sep.join(values) + "]]}").encode()
    with pytest.raises(BadInput, match="is not a number"):
        parse(body, 4)
