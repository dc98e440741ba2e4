"""Collective communication: process groups and ring allreduce, allgather, reduce-scatter,
broadcast and barrier over dmlsys nodes. See ``dmlsys.collective.group``."""

from dmlsys.collective.errors import CollectiveError
from dmlsys.collective.group import OPS, CollectiveService, ProcessGroup

__all__ = ["CollectiveError", "CollectiveService", "ProcessGroup", "OPS"]
