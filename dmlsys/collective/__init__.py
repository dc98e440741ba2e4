"""Collective communication: process groups and ring allreduce, allgather, reduce-scatter,
broadcast and barrier over dmlsys nodes. See ``dmlsys.collective.group``.

Modules, one idea each:

* :mod:`~dmlsys.collective.group`     ``ProcessGroup`` (the collectives) and ``CollectiveService``
* :mod:`~dmlsys.collective.mailbox`   the ordered mailbox messages wait in until their step asks
* :mod:`~dmlsys.collective.link`      what an allreduce path sees of its group during one pass
* :mod:`~dmlsys.collective.direct`    small buffers: all-to-all in one hop
* :mod:`~dmlsys.collective.ring`      the pipelined ring (allreduce, allgather, broadcast)
* :mod:`~dmlsys.collective.stream`    the ring allreduce's data over a plain TCP connection per neighbour
* :mod:`~dmlsys.collective.shm`       ranks on one host: through /dev/shm
* :mod:`~dmlsys.collective.schedule`  the ring schedule, a pure core
* :mod:`~dmlsys.collective.tree`      pytrees to fused buckets and back
* :mod:`~dmlsys.collective.job`       training jobs on worker nodes: the caller's side
* :mod:`~dmlsys.collective.errors`    the error hierarchy, rooted at ``CollectiveError``
"""

from dmlsys.arrays import OPS
from dmlsys.collective.errors import (
    CollectiveError,
    InvalidArgument,
    JobCancelled,
    JobError,
    JobRejected,
    NotNumeric,
)
from dmlsys.collective.group import CollectiveService, ProcessGroup
from dmlsys.collective.mailbox import Mailbox

__all__ = [
    "OPS",
    "CollectiveError",
    "CollectiveService",
    "InvalidArgument",
    "JobCancelled",
    "JobError",
    "JobRejected",
    "Mailbox",
    "NotNumeric",
    "ProcessGroup",
]
