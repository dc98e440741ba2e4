"""Training jobs through parameter servers, on worker nodes: the worker's service and the caller's side.

The worker hosts ``PsTrainingService`` (service name ``train``, the same ``run`` / ``progress`` /
``cancel`` protocol as the collective's training service, so a caller follows either the same
way). ``train.run`` takes the collective's fields plus the shards and the consistency model::

    {"job", "members", "model", "arch", "hyperparams", "epochs", "limit", "test_limit",
     "shards": ["ps-0", "ps-1"], "consistency": "ssp", "staleness": 2}

and runs :class:`dmlsys.ps.trainer.PsTrainer` as worker ``members.index(node.name)``; rank 0
saves the model to the cluster's model store. ``train_via_ps`` is the caller's side: the same
request to every worker, the first failure cancels the others, rank 0's result comes back.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dmlsys.node import (
    Node,
    NodeError,
    PeerUnreachable,
    RemoteError,
    RpcTimeout,
    Service,
    oneway,
    rpc,
)
from dmlsys.ps.clock import Consistency
from dmlsys.ps.errors import PsError

log = logging.getLogger(__name__)

SERVICE = "train"


class PsJobRejected(PsError):
    """A ``train.run`` request for a parameter-server job was malformed; names the field."""


def _request(body: Any, me: str) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise PsJobRejected(f"train.run takes a dict, got {type(body).__name__}")
    job, members, shards = body.get("job"), body.get("members"), body.get("shards")
    if not isinstance(job, str) or not job:
        raise PsJobRejected(f"job: a non-empty name, got {job!r}")
    for key, value in (("members", members), ("shards", shards)):
        if not isinstance(value, list) or not value or not all(isinstance(m, str) for m in value):
            raise PsJobRejected(f"job {job!r}: {key}: a list of node names, got {value!r}")
    if me not in members:
        raise PsJobRejected(f"job {job!r}: this worker ({me}) is not among the members {members}")
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise PsJobRejected(f"job {job!r}: model: a model name, got {body.get('model')!r}")
    for key in ("arch", "hyperparams"):
        if not isinstance(body.get(key), dict):
            raise PsJobRejected(f"job {job!r}: {key}: a dict, got {body.get(key)!r}")
    for key in ("epochs", "limit", "test_limit"):
        value = body.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise PsJobRejected(f"job {job!r}: {key}: an integer >= 1 or null, got {value!r}")
    try:
        Consistency(str(body.get("consistency", "bsp")), body.get("staleness", 0) or 0)
    except PsError as e:
        raise PsJobRejected(f"job {job!r}: {e}") from None
    return body


class PsTrainingService(Service):
    """Runs parameter-server training jobs on this node, one at a time."""

    name = SERVICE

    def __init__(self, store: str, *, data_dir: str | None = None, offload: bool = True,
                 load_dataset: Callable[[int | None, int | None], Any] | None = None) -> None:
        self.store = store
        self.data_dir = data_dir
        self.offload = offload  # False under the simulation's virtual-time loop (no threads there)
        self._load = load_dataset
        self.job: str | None = None
        self.model: str | None = None
        self.history: list[dict[str, Any]] = []
        self.epochs_total: int | None = None
        self.jobs_done = 0
        self._task: asyncio.Task | None = None
        self.incarnation = uuid.uuid4().hex[:12]  # this process's: a caller sees a restart by it

    @rpc
    async def run(self, body, ctx) -> dict[str, Any]:
        req = _request(body, self.node.name)
        if self._task is not None and req["job"] == self.job:
            return await asyncio.shield(self._task)  # the caller asks again (it lost its call): join it
        if self._task is not None:
            raise PsJobRejected(f"worker {self.node.name} is busy with job {self.job!r}")
        self.job, self.model, self.history = req["job"], req["model"], []
        task = self._task = asyncio.ensure_future(self._run(req))
        task.add_done_callback(self._finished)
        # shield: the caller giving up (its deadline) must not tear the job down half-way; a
        # cancel comes through `cancel`
        return await asyncio.shield(task)

    def _finished(self, task: asyncio.Task) -> None:
        if task is self._task:
            self._task, self.job = None, None

    async def _run(self, req: dict[str, Any]) -> dict[str, Any]:
        from dmlsys.ps.trainer import PsTrainer
        from dmlsys.train.store import ModelStore
        from dmlsys.train.trainer import Hyperparams

        try:
            hp = Hyperparams(**req["hyperparams"])
        except TypeError as e:
            raise PsJobRejected(f"job {req['job']!r}: hyperparams: {e}") from None
        self.epochs_total = req.get("epochs") or hp.epochs
        dataset = await self._dataset(req.get("limit"), req.get("test_limit"))
        rank = req["members"].index(self.node.name)
        trainer = PsTrainer(req["arch"], hp, node=self.node, shards=req["shards"], workers=req["members"],
                            job=req["job"], consistency=Consistency(str(req.get("consistency", "bsp")),
                                                                    req.get("staleness", 0) or 0),
                            store=ModelStore(Path(self.store)) if rank == 0 else None, progress=False,
                            on_epoch=lambda s: self.history.append(dataclasses.asdict(s)), offload=self.offload)
        result = await trainer.fit(dataset, req.get("epochs"), model_name=req["model"])
        self.jobs_done += 1
        last = result.history[-1] if result.history else None
        return {"rank": rank, "size": len(req["members"]), "model": req["model"], "version": result.version,
                "test_accuracy": result.test_accuracy, "test_loss": result.card.get("test_loss"),
                "history": [dataclasses.asdict(h) for h in result.history],
                "seconds": sum(h.seconds for h in result.history),
                "samples_per_s": last.samples_per_s if last else None,
                "comm_fraction": last.comm_fraction if last else None,
                "via": "ps", "shards": req["shards"], "consistency": req.get("consistency", "bsp"),
                "data_fingerprint": dataset.fingerprint}

    async def _dataset(self, limit: int | None, test_limit: int | None):
        if self._load is not None:
            return self._load(limit, test_limit)
        from dmlsys.train import data

        return await asyncio.to_thread(data.load, self.data_dir, limit=limit, test_limit=test_limit)

    @oneway
    def cancel(self, body, ctx) -> None:
        if isinstance(body, dict) and body.get("job") == self.job and self._task is not None:
            log.info("job %s: cancelled by %s: %s", self.job, ctx.sender, body.get("reason", ""))
            self._task.cancel()

    @rpc
    def progress(self, body) -> dict[str, Any]:
        job = body.get("job") if isinstance(body, dict) else None
        since = body.get("since", 0) if isinstance(body, dict) else 0
        if not isinstance(since, int) or isinstance(since, bool) or since < 0:
            raise PsJobRejected(f"train.progress: since: an integer >= 0, got {since!r}")
        mine = self.job is not None and job in (None, self.job)
        return {"job": self.job, "model": self.model, "epochs": self.history[since:] if mine else [],
                "epochs_total": self.epochs_total if mine else None, "incarnation": self.incarnation}

    def status(self) -> dict[str, Any]:
        return {"job": self.job, "epochs_done": len(self.history), "jobs_done": self.jobs_done, "via": "ps"}


async def train_via_ps(node: Node, workers: list[str], shards: list[str], *, model: str, arch: dict[str, Any],
                       hyperparams: dict[str, Any], consistency: str = "bsp", staleness: int = 0,
                       epochs: int | None = None, limit: int | None = None, test_limit: int | None = None,
                       timeout: float = 7200.0, job: str | None = None, restarts: int = 3, probe: float = 2.0,
                       rejoin_timeout: float = 60.0) -> dict[str, Any]:
    """Train ``model`` through the ``shards`` on ``workers`` (each hosting ``PsTrainingService``)
    and return rank 0's result, with ``job`` and ``workers`` added. The first worker to fail
    cancels the others; the error names it.

    A worker whose process is restarted mid-job (the supervisor restarts a SIGKILLed one) gets
    the same request again, up to ``restarts`` times per worker, and resumes from its clock on
    the shards (``PsTrainer``): every ``probe`` seconds each worker is asked for its
    ``incarnation``, and a new one (or the call failing in transport) means the job is sent again
    once the worker answers (within ``rejoin_timeout``). A worker still running the job joins its
    running task when asked again, so sending it again is harmless."""
    if not workers or not shards:
        raise PsJobRejected("train_via_ps needs at least one worker and one shard")
    job = job or f"{model}-ps-{uuid.uuid4().hex[:8]}"  # a new name per run: a shard resumes a job it knows
    body = {"job": job, "members": list(workers), "model": model, "arch": dict(arch),
            "hyperparams": dict(hyperparams), "epochs": epochs, "limit": limit, "test_limit": test_limit,
            "shards": list(shards), "consistency": consistency, "staleness": staleness}
    tasks = {w: asyncio.ensure_future(_follow(node, w, body, timeout=timeout, restarts=restarts, probe=probe,
                                              rejoin_timeout=rejoin_timeout)) for w in workers}
    try:
        pending = set(tasks.values())
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                if task.exception() is not None:
                    worker = next(w for w, t in tasks.items() if t is task)
                    for other in workers:
                        if other != worker:
                            try:
                                node.send(other, SERVICE, "cancel", {"job": job, "reason": f"{worker} failed"})
                            except NodeError:
                                pass
                    e = task.exception()
                    what = f"{e.type}: {e.message}" if isinstance(e, RemoteError) else f"{type(e).__name__}: {e}"
                    raise PsError(f"job {job!r}: worker {worker} failed: {what}") from None
    finally:
        for task in tasks.values():
            task.cancel()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
    return {**tasks[workers[0]].result(), "job": job, "workers": list(workers)}


class _Restarted(Exception):
    pass


async def _follow(node: Node, worker: str, body: dict[str, Any], *, timeout: float, restarts: int, probe: float,
                  rejoin_timeout: float) -> dict[str, Any]:
    """``worker``'s ``train.run`` of the job, sent again when its process was restarted."""
    left = restarts
    while True:
        incarnation = await _incarnation(node, worker, body["job"], rejoin_timeout)
        call = asyncio.ensure_future(node.call(worker, SERVICE, "run", body, timeout=timeout))
        try:
            while True:
                done, _ = await asyncio.wait({call}, timeout=probe)
                if done:
                    return call.result()  # a RemoteError is the job's own failure: raised
                try:
                    now = await node.call(worker, SERVICE, "progress", {"job": body["job"]}, timeout=probe)
                except (RpcTimeout, PeerUnreachable):
                    continue  # busy or gone: the call or the next probe will tell
                if now.get("incarnation") != incarnation:
                    raise _Restarted(f"restarted (process {incarnation} is gone)")
        except (_Restarted, RpcTimeout, PeerUnreachable) as e:
            if left <= 0:
                raise PsError(f"job {body['job']!r}: worker {worker} was lost more than {restarts} times "
                              f"(last: {e})") from None
            left -= 1
            log.warning("job %s: worker %s %s; sending it the job again (it resumes from its clock on the shards)",
                        body["job"], worker, e if isinstance(e, _Restarted) else f"did not answer ({e})")
        finally:
            call.cancel()


async def _incarnation(node: Node, worker: str, job: str, within: float) -> str | None:
    """The worker's process incarnation, asking until it answers (it may be starting again)."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + within
    while True:
        try:
            reply = await node.call(worker, SERVICE, "progress", {"job": job},
                                    timeout=max(0.01, min(5.0, give_up - loop.time())))
            return reply.get("incarnation")
        except (RpcTimeout, PeerUnreachable) as e:
            if loop.time() >= give_up:
                raise PsError(f"job {job!r}: worker {worker} did not answer within {within:g}s ({e})") from None
            await asyncio.sleep(min(0.5, max(0.0, give_up - loop.time())))
