"""What can go wrong while ingesting data, building models, storing them and training.

Every error names the thing involved (file, model, version, key, step) and, where there
is one, the fix. Catch :class:`TrainError` to handle them all::

    TrainError                  the root
    ├── InvalidArgument         a bad argument (group size, op, root): a bug in the caller
    ├── DataError               a data file is missing, malformed, truncated or corrupt
    │   ├── DataNotFound        no place we look holds Fashion-MNIST
    │   └── ChecksumMismatch    a file's digest differs from the published one
    ├── UnknownArchitecture     an architecture dict we cannot build
    ├── ModelNotFound           no such model or version in the store (also a KeyError)
    ├── StoreError              the store's files are invalid
    └── CheckpointError         a checkpoint cannot be read or does not fit the model
"""

from __future__ import annotations


class TrainError(Exception):
    """Base of every error raised by :mod:`dmlsys.train`."""


class InvalidArgument(TrainError, ValueError):
    """A function was called with a bad argument (a group size, an op, a root rank)."""


class DataError(TrainError):
    """A data file is missing, malformed, truncated or fails its checksum."""

    def __init__(self, path: object, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


class DataNotFound(DataError):
    """None of the places we look for Fashion-MNIST holds all four files."""

    def __init__(self, searched: list[str], missing: str) -> None:
        places = ", ".join(searched) or "(nowhere)"
        super().__init__(
            missing,
            f"Fashion-MNIST not found; searched {places}. Install the Debian package "
            "dataset-fashion-mnist, set $DMLSYS_DATA to a directory holding the four "
            "*.gz IDX files, or run `python -m dmlsys.train.data ensure --download`.",
        )
        self.searched = searched


class ChecksumMismatch(DataError):
    """A file's digest differs from the published one: corrupt or tampered download."""

    def __init__(self, path: object, algorithm: str, expected: str, actual: str) -> None:
        super().__init__(
            path,
            f"{algorithm} is {actual}, expected {expected}; delete the file and download again",
        )
        self.algorithm = algorithm
        self.expected = expected
        self.actual = actual


class UnknownArchitecture(TrainError):
    """An architecture dict names an unknown kind or carries invalid fields."""


class ModelNotFound(TrainError, KeyError):
    """The model store has no such model or version."""

    def __init__(self, name: str, version: int | None, available: list) -> None:
        what = f"model {name!r}" if version is None else f"model {name!r} version {version}"
        listing = ", ".join(map(str, available)) or "none"
        kind = "models" if version is None else "versions"
        msg = f"{what} not in the store; available {kind}: {listing}"
        super().__init__(msg)
        self.name = name
        self.version = version
        self.available = available

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return str(self.args[0])


class StoreError(TrainError):
    """The model store's files are invalid (bad name, corrupt parameters, bad card)."""


class CheckpointError(TrainError):
    """A checkpoint cannot be read or does not match the model being trained."""
