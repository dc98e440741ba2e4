"""Errors for configuration that services receive from a cluster spec."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is missing or wrong. ``key`` is its dotted path within the node's
    config table; the cluster CLI adds the spec file and node name when it reports it."""

    def __init__(self, key: str, expected: str) -> None:
        super().__init__(f"{key}: {expected}")
        self.key = key
        self.expected = expected
