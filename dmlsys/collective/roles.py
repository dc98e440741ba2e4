"""Cluster role ``worker``: a node that trains its rank's shard in data-parallel training jobs.

    [[nodes]]
    name = "worker"
    role = "worker"
    replicas = 2
    [nodes.config]
    data_dir = "/usr/share/datasets/fashion-mnist"  # optional: else $DMLSYS_DATA, the default places
    limit = 10000                                   # optional: train on the first samples only
    test_limit = 2000                               # optional: test on the first samples only
    timeout = 30.0                                  # seconds a collective waits for the other ranks
    chunk_bytes = 2097152                           # ring pipelining unit
    single_thread = false                           # true: XLA on one core (several workers per host)
    memory_cap = 67108864                           # optional: bytes of parameters a worker may hold

A worker hosts the ``collective`` service (the receiving end of its process groups) and the
``train`` service. ``train.run`` runs one job (see :mod:`dmlsys.collective.job` for the
caller's side): it loads the data (cached between jobs), makes a process group over the job's
members named after the job, runs :class:`dmlsys.train.trainer.Trainer` on this rank's shard
of every global batch, and on rank 0 saves the model to the cluster's model store. One job at
a time per worker; ``train.cancel`` stops one; ``train.progress`` returns the epochs the running
job has finished so far (the caller polls it to report progress).

Every bad config value raises ``ConfigError(key, what was expected)``; the cluster CLI adds the
file and node name. Every bad run request raises :class:`~dmlsys.collective.errors.JobRejected`.

**Memory cap.** Every rank holds a full replica of the model, so a job whose model's parameters
exceed the worker's ``memory_cap`` (or the request's, whichever is tighter) is refused before
any data is loaded, with an error naming the cap (``dmlsys.train.memory.check_fits``); such a
model (the wide hashed-feature model, ``{"kind": "wide"}``) trains through parameter servers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

from dmlsys.collective.errors import JobCancelled, JobRejected
from dmlsys.collective.group import CollectiveService, ProcessGroup
from dmlsys.node import ADMIN, Service, oneway, rpc
from dmlsys.node.config import (
    DATA_DIR,
    config_bool,
    config_dir,
    config_seconds,
    unknown_keys,
)
from dmlsys.node.config import config_int as _int
from dmlsys.train import one_core_xla

log = logging.getLogger(__name__)

WORKER_KEYS = {"data_dir", "limit", "test_limit", "timeout", "chunk_bytes", "single_thread", "memory_cap"}


@dataclasses.dataclass(frozen=True)
class WorkerConfig:
    store: str  # the model store directory rank 0 saves to
    data_dir: str | None = None
    limit: int | None = None
    test_limit: int | None = None
    timeout: float = 30.0
    chunk_bytes: int = 2 << 20
    memory_cap: int | None = None  # bytes of parameters a worker may hold (a full replica must fit)


def worker_config(config: dict[str, Any], store: str | os.PathLike) -> WorkerConfig:
    """Validate a worker's ``[nodes.config]`` table."""
    unknown_keys(config, WORKER_KEYS)
    data_dir = config_dir(config, "data_dir", DATA_DIR)
    timeout = config_seconds(config, "timeout", 30.0)  # how long a collective waits for the other ranks
    config_bool(config, "single_thread")
    return WorkerConfig(store=str(store), data_dir=data_dir, limit=_int(config, "limit", None),
                        test_limit=_int(config, "test_limit", None), timeout=timeout,
                        chunk_bytes=_int(config, "chunk_bytes", 2 << 20),
                        memory_cap=_int(config, "memory_cap", None))


def build_worker(ctx) -> list[Service]:
    """Role factory (``dmlsys.assembly.roles``): the collective and train services."""
    config = worker_config(dict(ctx.config), ctx.store)
    if ctx.config.get("single_thread"):  # several workers on one host
        one_core_xla()
    return [CollectiveService(), TrainingService(config)]


def _run_request(body: Any, me: str) -> dict[str, Any]:
    """Check a ``train.run`` body; raise JobRejected naming the bad field."""
    if not isinstance(body, dict):
        raise JobRejected(f"train.run takes a dict, got {type(body).__name__}")
    job, members, model = body.get("job"), body.get("members"), body.get("model")
    if not isinstance(job, str) or not job:
        raise JobRejected(f"job: a non-empty name, got {job!r}")
    if not isinstance(members, list) or not members or not all(isinstance(m, str) for m in members):
        raise JobRejected(f"job {job!r}: members: a list of worker names, got {members!r}")
    if me not in members:
        raise JobRejected(f"job {job!r}: this worker ({me}) is not among the members {members}")
    if not isinstance(model, str) or not model:
        raise JobRejected(f"job {job!r}: model: a model name, got {model!r}")
    for key in ("arch", "hyperparams"):
        if not isinstance(body.get(key), dict):
            raise JobRejected(f"job {job!r}: {key}: a dict, got {body.get(key)!r}")
    for key in ("epochs", "limit", "test_limit", "memory_cap"):
        value = body.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise JobRejected(f"job {job!r}: {key}: an integer >= 1 or null, got {value!r}")
    return body


class TrainingService(Service):
    """Runs training jobs on this node, one at a time, as rank ``members.index(node.name)``."""

    name = "train"

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.job: str | None = None
        self.rank: int | None = None
        self.epochs_done = 0
        self.history: list[dict[str, Any]] = []  # the running job's finished epochs
        self.epochs_total: int | None = None  # of the running job
        self.model: str | None = None  # the running job's model
        self.jobs_done = 0
        self._task: asyncio.Task | None = None
        self._cancel_reason = ""
        self._data: tuple[tuple[int | None, int | None], Any] | None = None  # (limits, Dataset)

    @rpc(allow=ADMIN)
    async def run(self, body, ctx) -> dict[str, Any]:
        req = _run_request(body, self.node.name)
        if self._task is not None:
            raise JobRejected(f"worker {self.node.name} is busy with job {self.job!r}; "
                              f"wait for it or cancel it before running {req['job']!r}",
                              job=req["job"], worker=self.node.name)
        self.job, self.rank, self.epochs_done = req["job"], req["members"].index(self.node.name), 0
        self.history = []
        self.model = req["model"]
        self._cancel_reason = ""
        task = self._task = asyncio.ensure_future(self._run(req))
        task.add_done_callback(self._finished)
        try:
            # shield: a cancel must come through `cancel` (which records why), and the caller
            # giving up must still let the group's finally-blocks run before the next job
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.cancelled() and self._cancel_reason:
                raise JobCancelled(f"job {req['job']!r} cancelled on {self.node.name}: {self._cancel_reason}",
                                   job=req["job"], worker=self.node.name) from None
            task.cancel()
            raise

    def _finished(self, task: asyncio.Task) -> None:
        if task is self._task:
            self._task = None
            self.job = None

    @oneway
    def cancel(self, body, ctx) -> None:
        if not isinstance(body, dict) or body.get("job") != self.job or self._task is None:
            return  # a job that already ended, or never started here
        self._cancel_reason = str(body.get("reason") or f"cancelled by {ctx.sender}")
        log.info("job %s: cancelled by %s: %s", self.job, ctx.sender, self._cancel_reason)
        self._task.cancel()

    async def _run(self, req: dict[str, Any]) -> dict[str, Any]:
        from dmlsys.train.store import ModelStore
        from dmlsys.train.trainer import Hyperparams, Trainer

        try:
            hp = Hyperparams(**req["hyperparams"])  # TrainError names a bad value
        except TypeError as e:  # an unknown field
            known = ", ".join(f.name for f in dataclasses.fields(Hyperparams))
            raise JobRejected(f"job {req['job']!r}: hyperparams: {e} (known: {known})") from None
        self.epochs_total = req.get("epochs") or hp.epochs
        self._check_memory(req)
        dataset = await self._dataset(req.get("limit"), req.get("test_limit"))
        group = ProcessGroup(self.node, req["members"], name=f"job:{req['job']}", timeout=self.config.timeout,
                             chunk_bytes=self.config.chunk_bytes)
        try:
            trainer = Trainer(req["arch"], hp, group=group, progress=False,
                              store=ModelStore(Path(self.config.store)) if group.rank == 0 else None,
                              on_epoch=self._on_epoch)
            result = await trainer.fit(dataset, req.get("epochs"), model_name=req["model"], resume=False)
        finally:
            group.close()
        self.jobs_done += 1
        last = result.history[-1] if result.history else None
        return {
            "rank": group.rank, "size": group.size, "model": req["model"], "version": result.version,
            "test_accuracy": result.test_accuracy, "test_loss": result.card.get("test_loss"),
            "history": [dataclasses.asdict(h) for h in result.history],
            "seconds": sum(h.seconds for h in result.history),
            "samples_per_s": last.samples_per_s if last else None,
            "comm_fraction": last.comm_fraction if last else None,
            "data_fingerprint": dataset.fingerprint,
        }

    def _check_memory(self, req: dict[str, Any]) -> None:
        """Refuse a model whose full replica exceeds the memory cap, naming the cap."""
        from dmlsys.train.errors import TrainError
        from dmlsys.train.memory import MemoryCap, check_fits, param_bytes

        cap = _tighter(self.config.memory_cap, req.get("memory_cap"))
        if cap is None:
            return
        try:
            check_fits(param_bytes(req["arch"]), MemoryCap(cap),
                       f"model {req['model']!r} (a full replica on worker {self.node.name})")
        except TrainError as e:
            raise JobRejected(f"job {req['job']!r}: {e}", job=req["job"], worker=self.node.name) from None

    def _on_epoch(self, stats) -> None:
        self.epochs_done = stats.epoch
        self.history.append(dataclasses.asdict(stats))

    @rpc
    async def progress(self, body, ctx) -> dict[str, Any]:
        """``{"job", "since"}`` -> ``{"job", "model", "epochs", "epochs_total"}``: the job's
        finished epochs from index ``since`` on; none when that job is not the one running here.
        ``job`` null means whichever job is running."""
        job = body.get("job") if isinstance(body, dict) else None
        since = body.get("since", 0) if isinstance(body, dict) else 0
        if not isinstance(since, int) or isinstance(since, bool) or since < 0:
            raise JobRejected(f"train.progress: since: an integer >= 0, got {since!r}")
        mine = self.job is not None and job in (None, self.job)
        return {"job": self.job, "model": self.model, "epochs": self.history[since:] if mine else [],
                "epochs_total": self.epochs_total if mine else None}

    async def _dataset(self, limit: int | None, test_limit: int | None):
        """Fashion-MNIST, cut to the tighter of the config's and the job's limits; the last
        one loaded is kept, so the next job with the same limits starts at once."""
        from dmlsys.train import data

        limits = (_tighter(self.config.limit, limit), _tighter(self.config.test_limit, test_limit))
        if self._data is None or self._data[0] != limits:
            # Not on this host? The cluster's store has it (train/data.py locate), or the download.
            where = self.config.data_dir or await data.locate(self.node)
            dataset = await asyncio.to_thread(data.load, where, limit=limits[0], test_limit=limits[1])
            self._data = (limits, dataset)
        return self._data[1]

    def status(self) -> dict[str, Any]:
        return {"job": self.job, "rank": self.rank, "epochs_done": self.epochs_done, "jobs_done": self.jobs_done}


def _tighter(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else min(a, b)
