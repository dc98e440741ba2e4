"""The checks every role factory makes of its [nodes.config] table: each accepts exactly its
kind of value and names the key, and what was expected, otherwise."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dmlsys.node.config import (
    ConfigError,
    config_bool,
    config_dir,
    config_int,
    config_seconds,
    unknown_keys,
)

values = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(allow_nan=True), st.text(max_size=5),
                   st.lists(st.integers(), max_size=2))


@given(values)
def test_config_bool_takes_only_true_or_false(value):
    if isinstance(value, bool):
        assert config_bool({"k": value}, "k") is value
    else:
        with pytest.raises(ConfigError, match=r"^k: true or false, got"):
            config_bool({"k": value}, "k")


@given(values)
def test_config_int_takes_only_integers_at_least_low(value):
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        assert config_int({"k": value}, "k", None) == value
    elif value is None:
        assert config_int({"k": value}, "k", 3) is None
    else:
        with pytest.raises(ConfigError, match=r"^k: an integer >= 1"):
            config_int({"k": value}, "k", None)


@given(values)
def test_config_seconds_takes_numbers_in_range(value):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 3600
    if ok:
        assert config_seconds({"k": value}, "k", 1.0) == float(value)
    else:
        with pytest.raises(ConfigError, match=r"^k: a number of seconds in \(0, 3600\]"):
            config_seconds({"k": value}, "k", 1.0)


@given(values)
def test_config_dir_takes_a_non_empty_string_or_nothing(value):
    if value is None or (isinstance(value, str) and value):
        assert config_dir({"d": value}, "d", "a directory") == value
    else:
        with pytest.raises(ConfigError, match=r"^d: a directory, got"):
            config_dir({"d": value}, "d", "a directory")


def test_defaults_apply_when_the_key_is_absent():
    assert config_bool({}, "k", True) is True
    assert config_dir({}, "d", "x") is None
    assert config_seconds({}, "k", 2.5) == 2.5


def test_unknown_keys_names_the_first_stranger_and_the_known_ones():
    unknown_keys({"a": 1}, {"a", "b"})
    with pytest.raises(ConfigError, match=r"^tbl\.zz: unknown key \(known: a, b\)"):
        unknown_keys({"a": 1, "zz": 2, "zzz": 3}, {"a", "b"}, where="tbl.")
