"""What can go wrong while serving a prediction, one class per answer the client gets.

Each error carries the HTTP status the front door answers with, so that the mapping from
failure to status lives in one place. Errors raised inside a replica reach the gateway as
``RemoteError`` with the class name as ``type``; :func:`from_remote` turns them back into the
typed error, so a replica's ``BadInput`` becomes the client's 400 and nothing is retried that
would fail again. What is wrong with the HTTP request itself (413 over ``max_body_bytes``, 408
past ``read_timeout``, a malformed head) is answered by :mod:`dmlsys.serving.http` before any
of this code sees the request.
"""

from __future__ import annotations


class ServingError(Exception):
    """Base of every error :mod:`dmlsys.serving` raises. ``status`` is the HTTP status."""

    status = 500
    retry_after: float | None = None


class BadInput(ServingError):
    """The request is malformed: wrong shape, non-numeric values, too many instances, too large."""

    status = 400


class UnknownModel(ServingError):
    """No replica serves a model of this name; the message lists the models that are served."""

    status = 404

    def __init__(self, model: str, known: list[str]) -> None:
        super().__init__(f"unknown model {model!r}; served models: {', '.join(sorted(known)) or '(none)'}")
        self.model = model


class NoReplicaReady(ServingError):
    """Every replica of the model is loading, ejected, draining or gone. Try again shortly."""

    status = 503

    def __init__(self, model: str, why: str, retry_after: float = 1.0) -> None:
        super().__init__(f"no ready replica for model {model!r}: {why}; retry after {retry_after:g}s")
        self.model = model
        self.retry_after = retry_after


class Overloaded(ServingError):
    """Every replica is at its in-flight limit and the queue in front of them is full."""

    status = 503

    def __init__(self, model: str, queue_limit: int, retry_after: float = 1.0) -> None:
        super().__init__(f"model {model!r} is overloaded: all replicas are at their in-flight limit and "
                         f"{queue_limit} requests already wait; retry after {retry_after:g}s or add replicas")
        self.model = model
        self.retry_after = retry_after


class QueueFull(ServingError):
    """Raised by a replica whose batch queue holds ``max_queue`` requests: nothing ran, so the
    balancer tries another replica (the full one is healthy, only busy) before answering 503."""

    status = 503
    retry_after = 1.0


class DeadlineExceeded(ServingError):
    """No replica answered within the request's deadline (retries included)."""

    status = 504


class NotReady(ServingError):
    """Raised by a replica that is loading or draining: the balancer retries elsewhere."""

    status = 503
    retry_after = 1.0


class ModelLoadError(ServingError):
    """A replica could not load or warm up a model version from the store."""

    status = 500


class RolloutError(ServingError):
    """A rolling update stopped part-way; the message names the replica and what failed."""

    status = 500


# Errors a replica raises that mean "this request was not processed": safe to retry elsewhere.
# NotReady and NodeStopped also take the replica out of rotation until its next probe; QueueFull
# and NodeBusy (the node's own task bound, dmlsys.node.limits) say only "not now, try another".
RETRIABLE_REMOTE = {"NotReady", "NodeStopped"}
BUSY_REMOTE = {"QueueFull", "NodeBusy"}
_BY_NAME = {cls.__name__: cls for cls in (BadInput, NotReady, ModelLoadError, QueueFull)}


def from_remote(type_name: str, message: str) -> ServingError | None:
    """The typed error a replica raised, rebuilt from a ``RemoteError``'s type and message."""
    cls = _BY_NAME.get(type_name)
    return cls(message) if cls is not None else None
