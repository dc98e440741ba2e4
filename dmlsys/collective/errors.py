"""What :mod:`dmlsys.collective` raises: one hierarchy, rooted at :class:`CollectiveError`.

    CollectiveError            a collective pass could not complete on every rank (the root)
    ├── InvalidArgument        a bad argument (members, op, root, sizes): a bug in the caller
    │   └── NotNumeric         a pytree leaf that is not numbers (also a TypeError)
    └── JobError               a training job failed; names the worker to blame
        ├── JobRejected        a worker refused the run request; nothing was trained
        └── JobCancelled       the job was cancelled on a worker

Catch ``CollectiveError`` for everything. A failed pass raises ``CollectiveError`` itself (its
class name travels in remote errors, so it stays the root's). Role configuration errors are
the node layer's ``ConfigError``, which the cluster reports with the spec file and node.
"""

from __future__ import annotations


class CollectiveError(RuntimeError):
    """A collective could not complete on every rank. ``missing`` lists the ranks to blame
    (dead, partitioned, or never arrived); empty when the ranks disagreed instead.

    Base of every error :mod:`dmlsys.collective` raises."""

    def __init__(self, message: str, *, missing: list[int] | None = None) -> None:
        super().__init__(message)
        self.missing = list(missing or [])


class InvalidArgument(CollectiveError, ValueError):
    """A group or collective was called with a bad argument; raised before any message is sent."""


class NotNumeric(InvalidArgument, TypeError):
    """A pytree leaf handed to a collective is not numeric (strings, objects)."""


class JobError(CollectiveError):
    """A training job failed. ``worker`` is the node blamed, ``job`` the job's name."""

    def __init__(self, message: str, *, job: str = "", worker: str | None = None) -> None:
        super().__init__(message)
        self.job = job
        self.worker = worker


class JobRejected(JobError):
    """A worker refused a run request: busy with another job, not among the members, or bad
    arguments. Nothing was trained."""


class JobCancelled(JobError):
    """The job was cancelled on this worker (another worker failed, or the caller gave up)."""
