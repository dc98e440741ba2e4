"""What the parameter servers and their clients raise."""

from __future__ import annotations


class PsError(RuntimeError):
    """Base of every parameter-server error."""


class PartitionError(PsError, ValueError):
    """A partition map cannot be made or does not fit the values given to it."""


class WorkerDropped(PsError):
    """This worker was dropped from the job's barrier (it was silent past the drop timeout)."""


class JobUnknown(PsError):
    """A shard holds no job of that name (never opened, or opened with another map)."""


class ShardUnavailable(PsError):
    """A shard did not answer within the client's retry deadline; names the shard."""
