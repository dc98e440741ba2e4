"""Configuration that services receive from a cluster spec: the error, and the checks every
role factory makes of its ``[nodes.config]`` table (each raises ConfigError naming the key)."""

from __future__ import annotations

from typing import Any, Mapping

DATA_DIR = "a directory holding the Fashion-MNIST IDX files"  # what a role's data_dir names


class ConfigError(ValueError):
    """A configuration value is missing or wrong. ``key`` is its dotted path within the node's
    config table; the cluster CLI adds the spec file and node name when it reports it."""

    def __init__(self, key: str, expected: str) -> None:
        super().__init__(f"{key}: {expected}")
        self.key = key
        self.expected = expected


def unknown_keys(config: Mapping[str, Any], known: set[str], where: str = "") -> None:
    """Refuse the first key of ``config`` that is not in ``known`` (a typo must not pass silently)."""
    extra = sorted(set(config) - known)
    if extra:
        raise ConfigError(where + extra[0], f"unknown key (known: {', '.join(sorted(known))})")


def config_int(config: Mapping[str, Any], key: str, default: int | None, low: int = 1) -> int | None:
    """``config[key]`` (else ``default``; None stays None) as an integer >= ``low``."""
    value = config.get(key, default)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ConfigError(key, f"an integer >= {low}, got {value!r}")
    return value


def config_seconds(config: Mapping[str, Any], key: str, default: float, most: float = 3600.0) -> float:
    """``config[key]`` (else ``default``) as a number of seconds in (0, ``most``]."""
    value = config.get(key, default)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value <= most:
        raise ConfigError(key, f"a number of seconds in (0, {most:g}], got {value!r}")
    return float(value)


def config_bool(config: Mapping[str, Any], key: str, default: bool = False) -> bool:
    """``config[key]`` (else ``default``) as true or false: no 0/1 or "yes" standing in."""
    value = config.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(key, f"true or false, got {value!r}")
    return value


def config_dir(config: Mapping[str, Any], key: str, what: str) -> str | None:
    """``config[key]`` as a non-empty path (None when absent); ``what`` says what it must hold."""
    value = config.get(key)
    if value is not None and (not isinstance(value, str) or not value):
        raise ConfigError(key, f"{what}, got {value!r}")
    return value
