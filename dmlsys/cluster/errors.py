"""The cluster package's errors: one root, so a caller can catch everything ``up``, ``scale``,
``train`` and the CLI refuse with ``except ClusterError``. Every message names the spec file,
key or node involved and what to change."""

from __future__ import annotations

from pathlib import Path


class ClusterError(RuntimeError):
    """The cluster could not do what was asked (``up`` could not bring it up, a node would not
    start or get ready); the message names the node and the reason."""


class SpecError(ClusterError, ValueError):
    """A cluster spec is wrong. The message names the file, the key and what was expected."""

    def __init__(self, path: str | Path, key: str, expected: str) -> None:
        super().__init__(f"{path}: {key}: {expected}")
        self.path = str(path)
        self.key = key
        self.expected = expected


class RecipeError(ClusterError):
    """A model the replicas need could not be trained from its ``[cluster.train.MODEL]`` recipe;
    the message says what to fix."""


class CliError(ClusterError):
    """What a command could not do; ``main`` prints it as ``error: ...`` and exits 1."""
