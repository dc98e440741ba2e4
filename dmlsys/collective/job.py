"""Training jobs on worker nodes: the caller's side.

A job is one data-parallel training run over a list of worker nodes (role ``worker``, see
:mod:`dmlsys.collective.roles`). The caller (the cluster supervisor, a script, a test) sends
the same ``train.run`` request to every worker; worker i becomes rank i of a process group
named after the job, trains its shard of every global batch, and rank 0 saves the model::

    result = await train_on_workers(node, ["worker-0", "worker-1"], model="fashion-mlp",
                                    arch={"kind": "mlp"}, hyperparams={"epochs": 3, "lr": 1e-3})
    result["version"], result["test_accuracy"]

Failure: when one worker fails, the others would only notice at their next collective, up
to the group's timeout later. So the first failure cancels the job on every other worker at
once, and :class:`JobError` names the worker whose failure came first (a worker that was only
cancelled, or whose collective broke because a peer died, is never blamed when a better
culprit is known).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from dmlsys.collective.errors import (  # noqa: F401 (re-exported)
    InvalidArgument,
    JobCancelled,
    JobError,
    JobRejected,
)
from dmlsys.node import Node, NodeError, PeerUnreachable, RemoteError

log = logging.getLogger(__name__)

SERVICE = "train"
CANCEL_GRACE = 10.0  # seconds the other workers get to report after a failure
# ... after a worker's process is gone (the supervisor said so: PeerUnreachable): the job cannot
# go on and the dead one never replies; the others were told to stop, and a busy event loop
# (a first compile, a data load) may take seconds to hear it: not worth holding the error for.
LOST_GRACE = 1.0
DEFAULT_TIMEOUT = 7200.0  # a whole training run; the collectives inside have their own, shorter timeout


# What a failure says about its worker, best culprit first: its own error, a broken collective
# (often a consequence of another worker's death), a cancellation (always a consequence).
_SECONDARY = ("CollectiveError", "JobCancelled")


async def train_on_workers(node: Node, workers: list[str], *, model: str, arch: dict[str, Any],
                           hyperparams: dict[str, Any], epochs: int | None = None, limit: int | None = None,
                           test_limit: int | None = None, timeout: float = DEFAULT_TIMEOUT,
                           job: str | None = None, on_epoch: Callable[[dict[str, Any]], None] | None = None,
                           poll_every: float = 2.0) -> dict[str, Any]:
    """Train ``model`` data-parallel on ``workers`` (rank = position in the list) and return
    rank 0's result: ``version`` (in the workers' model store), ``test_accuracy``,
    ``test_loss``, ``history`` (one dict per epoch: loss, accuracy, samples_per_s,
    comm_fraction, ...), ``seconds``, plus ``job`` and ``workers``.

    ``hyperparams`` are :class:`dmlsys.train.trainer.Hyperparams` fields (``batch_size`` is the
    global batch, split among the workers); ``epochs`` overrides theirs; ``limit`` and
    ``test_limit`` train and test on the first samples only (quick runs). ``on_epoch`` is called
    with each finished epoch's stats (a ``history`` entry), in order, each exactly once: while
    the job runs from rank 0's ``train.progress`` every ``poll_every`` seconds, and the rest from
    the result when it ends.

    Raises:
        InvalidArgument: no workers, or the same worker twice (a ValueError).
        JobError: a worker failed or could not be reached; names it and says why.
    """
    if not workers:
        raise InvalidArgument("train_on_workers needs at least one worker node")
    if len(set(workers)) != len(workers):
        raise InvalidArgument(f"workers must be distinct, got {workers}")
    job = job or f"{model}-{uuid.uuid4().hex[:8]}"
    body = {"job": job, "members": list(workers), "model": model, "arch": dict(arch),
            "hyperparams": dict(hyperparams), "epochs": epochs, "limit": limit, "test_limit": test_limit}
    log.info("job %s: training %r on %s", job, model, ", ".join(workers))

    async def start(worker: str) -> dict[str, Any]:
        return await node.call(worker, SERVICE, "run", body, timeout=timeout)

    reported = 0  # epochs passed to on_epoch

    async def watch(on_epoch: Callable[[dict[str, Any]], None]) -> None:
        nonlocal reported
        async for _, epoch in follow_progress(node, workers[0], job, every=poll_every):
            reported += 1
            on_epoch(epoch)

    tasks = {asyncio.ensure_future(start(w)): w for w in workers}
    failures: list[tuple[str, BaseException]] = []
    watcher = asyncio.ensure_future(watch(on_epoch)) if on_epoch else None
    try:
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        failures = [(tasks[t], t.exception()) for t in done if t.exception() is not None]
        if failures:
            # Tell the others now rather than letting them find out at their next collective;
            # a dead worker never replies, so wait for the rest a bounded while only.
            _cancel_everywhere(node, job, [tasks[t] for t in pending], f"{failures[0][0]} failed")
            grace = LOST_GRACE if any(isinstance(e, PeerUnreachable) for _, e in failures) else CANCEL_GRACE
            if pending:
                done, pending = await asyncio.wait(pending, timeout=grace)
                failures += [(tasks[t], t.exception()) for t in done if t.exception() is not None]
                failures += [(tasks[t], TimeoutError(f"no reply {grace:g}s after the job was cancelled "
                                                     "(told to stop; or it died too)")) for t in pending]
    finally:
        for t in tasks:
            t.cancel()
        if watcher is not None:
            watcher.cancel()
    if failures:
        raise _blame(job, workers, failures)
    results = {tasks[t]: t.result() for t in tasks}
    result = dict(results[workers[0]])
    if on_epoch is not None:
        for epoch in result.get("history", [])[reported:]:
            on_epoch(epoch)
    result.update(job=job, workers=list(workers))
    return result


async def follow_progress(node: Node, worker: str, job: str | None, *,
                          every: float = 2.0) -> AsyncIterator[tuple[dict[str, Any], dict[str, Any]]]:
    """``(reply, epoch)`` for each epoch of ``job`` (None: whichever job runs) that ``worker``
    (rank 0) finishes, in order, asking its ``train.progress`` every ``every`` seconds; the reply
    also names the job's ``model`` and ``epochs_total``. Endless: cancel it when the job ends."""
    since = 0
    while True:
        try:
            reply = await node.call(worker, SERVICE, "progress", {"job": job, "since": since}, timeout=every)
        except NodeError:
            reply = None  # a failing worker is the run's business, not the follower's
        for epoch in reply.get("epochs", []) if isinstance(reply, dict) else []:
            since += 1
            yield reply, epoch
        await asyncio.sleep(every)


def _cancel_everywhere(node: Node, job: str, workers: list[str], reason: str) -> None:
    for worker in workers:
        try:
            node.send(worker, SERVICE, "cancel", {"job": job, "reason": reason})
        except NodeError:
            pass  # unreachable: it has nothing to cancel that we could reach


def _blame(job: str, workers: list[str], failures: list[tuple[str, BaseException]]) -> JobError:
    def rank(item: tuple[str, BaseException]) -> int:
        _, e = item
        if isinstance(e, RemoteError):
            return 1 + _SECONDARY.index(e.type) if e.type in _SECONDARY else 0
        return 0  # unreachable or timed out: the worker itself is the likely culprit

    worker, error = min(failures, key=rank)
    if isinstance(error, RemoteError):
        why = f"{error.type}: {error.message}"
    else:
        why = f"{type(error).__name__}: {error}"
    others = [f"{w} ({e.type if isinstance(e, RemoteError) else type(e).__name__})"
              for w, e in failures if w != worker]
    tail = f"; then {len(others)} other worker(s) failed: {', '.join(others)}" if others else ""
    return JobError(f"training job {job!r}: worker {worker} (rank {workers.index(worker)}) failed: {why}{tail}",
                    job=job, worker=worker)
