"""Parameter servers: a model's parameters partitioned over shard nodes, workers that pull and
push, and the consistency models BSP / SSP / ASP. See ``docs/ps.md``.

Modules, one idea each:

* :mod:`~dmlsys.ps.partition`  the versioned partition map (pure)
* :mod:`~dmlsys.ps.clock`      per-worker clocks and the BSP / SSP / ASP read rule (pure)
* :mod:`~dmlsys.ps.log`        the shard's write-ahead log and atomic checkpoints
* :mod:`~dmlsys.ps.server`     ``PsService``: holds slices and rows, runs optax
* :mod:`~dmlsys.ps.client`     ``PsClient``: scatter pulls and pushes, gather replies
* :mod:`~dmlsys.ps.roles`      the ``ps`` role factory
"""

from dmlsys.ps.errors import (
    JobUnknown,
    PartitionError,
    PsError,
    ShardUnavailable,
    WorkerDropped,
)

__all__ = ["JobUnknown", "PartitionError", "PsError", "ShardUnavailable", "WorkerDropped"]
