"""Data ingest, JAX models, the model store and the data-parallel trainer.

Modules, one idea each:

* :mod:`~dmlsys.train.idx`        the IDX file format (read/write, gzip, partial reads)
* :mod:`~dmlsys.train.data`       Fashion-MNIST: locate, verify, download, ``Dataset`` + fingerprint
* :mod:`~dmlsys.train.batching`   batching + caching patterns, data-parallel shards
* :mod:`~dmlsys.train.models`     MLP and CNN in pure JAX from an architecture dict
* :mod:`~dmlsys.train.store`      ``ModelStore``: versioned params + JSON cards, atomic
* :mod:`~dmlsys.train.group`      the ``Group`` protocol, ``LocalGroup``, ``InProcessGroup``
* :mod:`~dmlsys.train.checkpoint` resumable training checkpoints
* :mod:`~dmlsys.train.trainer`    ``Trainer`` (async, data-parallel) and ``train_model`` (sync)

The names below are imported lazily, so ``import dmlsys.train.data`` does not pull in JAX.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

from .errors import (
    CheckpointError, ChecksumMismatch, DataError, DataNotFound, InvalidArgument, ModelNotFound, StoreError,
    TrainError, UnknownArchitecture,
)

_LAZY = {
    "Dataset": "data", "load": "data",
    "BatchConfig": "batching", "BatchLoader": "batching",
    "LABELS": "models", "build": "models", "Model": "models",
    "ModelStore": "store",
    "Group": "group", "LocalGroup": "group", "InProcessGroup": "group",
    "Hyperparams": "trainer", "Trainer": "trainer", "TrainResult": "trainer", "train_model": "trainer",
}

__all__ = sorted(_LAZY) + [
    "CheckpointError", "ChecksumMismatch", "DataError", "DataNotFound", "InvalidArgument", "ModelNotFound",
    "StoreError", "TrainError", "UnknownArchitecture", "one_core_xla",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def one_core_xla() -> None:
    """Keep XLA to one thread in this process, for roles of which a host runs several (workers,
    replicas, function instances): XLA's own thread pool in each would fight its siblings for
    the cores. Call it before JAX starts; an XLA_FLAGS the user set wins."""
    os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
