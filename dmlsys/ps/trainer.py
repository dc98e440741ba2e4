"""Training a Fashion-MNIST model through parameter servers, behind the collective trainer's
interface: the same ``Hyperparams``, progress bar, per-epoch ``EpochStats``, model store and
card (with ``"via": "ps"`` and the consistency model recorded).

Run one ``PsTrainer`` per worker node; the shards are ``ps`` nodes (``dmlsys.ps.roles``)::

    trainer = PsTrainer({"kind": "mlp"}, Hyperparams(epochs=3), node=node, shards=["ps0", "ps1"],
                        workers=["w0", "w1"], job="fmnist-mlp-1", consistency=ssp(2),
                        store=ModelStore() if node.name == "w0" else None)
    result = await trainer.fit(dataset)

Each worker takes its shard of every global batch (``dmlsys.train.batching``, as in the
collective trainer), and at global step ``t`` pulls the parameters at clock ``t``, computes the
gradient *sum* of its samples' losses under one ``jax.jit``, and pushes it with its sample
count (the push carries the pull of step ``t + 1``: one message each way per shard per step); the shards divide and apply the optimizer. Under BSP a step's pushes are summed and
divided by the global batch, so the run computes what the collective trainer computes (up to
float summation order); under SSP and ASP each push is one optimizer step on a worker's shard of
the batch. An optimizer schedule counts updates on the shards: the trainer tells the shards
``workers`` times more updates per epoch under SSP/ASP, so a cosine decay spans the run in
every mode.

Stats: each worker reports the loss and accuracy of its own shard of the batches; rank 0
evaluates the parameters it last pulled on the test set after each epoch, and after the last
step it pulls the final parameters (every live worker's every step in: ``pull(floor=steps)``),
evaluates and saves them. The shards' checkpoints and log are the run's durable state.

**A restarted worker resumes.** A worker process started again on the same job (same name, same
request) joins it on the shards (``open`` of an existing job) and learns its clock there
(``PsClient.resume_clock``: the least step some shard lacks); it skips the steps before it (the
batches are a pure function of seed, epoch and step, so the steps after are the ones it would
have computed) and trains on. Its per-epoch stats start again at the epoch it rejoined. It must
be back before the shards' ``drop_timeout`` if others wait on it (BSP, SSP at the bound), else
its pushes are refused (``WorkerDropped``) and its run fails.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)

from dmlsys.node import Node
from dmlsys.ps.client import PsClient
from dmlsys.ps.clock import BSP, Consistency
from dmlsys.ps.partition import leaves_by_path
from dmlsys.train import models
from dmlsys.train.batching import BatchConfig, BatchLoader
from dmlsys.train.data import Dataset
from dmlsys.train.errors import TrainError
from dmlsys.train.store import ModelStore
from dmlsys.train.trainer import EVAL_BATCH, EpochStats, Hyperparams, TrainResult

log = logging.getLogger("dmlsys.ps.trainer")


_COMPILED: dict[str, tuple[Callable, Callable]] = {}


def _compiled(model: models.Model) -> tuple[Callable, Callable]:
    """The jitted gradient and evaluation functions of an architecture, shared by every trainer
    in this process (workers simulated in one process would otherwise compile once each)."""
    import json

    key = json.dumps(model.arch, sort_keys=True)
    if key not in _COMPILED:
        apply = model.apply

        def loss_sum(params, x, y):
            logits = apply(params, x)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).sum()
            return loss, (jnp.argmax(logits, -1) == y).sum()

        def evaluate(params, x, y, mask):
            logits = apply(params, x)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y)
            return (loss * mask).sum(), ((jnp.argmax(logits, -1) == y) * mask).sum()

        _COMPILED[key] = (jax.jit(jax.value_and_grad(loss_sum, has_aux=True)), jax.jit(evaluate))
    return _COMPILED[key]


class PsTrainer:
    """Trains through parameter servers as worker ``workers.index(node.name)``."""

    def __init__(self, arch: dict[str, Any], hyperparams: Hyperparams | None = None, *, node: Node,
                 shards: list[str], workers: list[str], job: str, consistency: Consistency = BSP,
                 store: ModelStore | None = None, progress: bool | None = None, console: Console | None = None,
                 on_epoch: Callable[[EpochStats], None] | None = None, offload: bool = True,
                 client_options: dict[str, Any] | None = None) -> None:
        if node.name not in workers:
            raise TrainError(f"node {node.name!r} is not among the job's workers {workers}")
        self.model = models.build(arch)
        self.hp = hyperparams or Hyperparams()
        self.node = node
        self.workers = list(workers)
        self.rank = self.workers.index(node.name)
        self.consistency = consistency
        self.client = PsClient(node, shards, job=job, **(client_options or {}))
        self.store = store
        self.console = console or Console(stderr=True)
        show = self.console.is_terminal if progress is None else progress
        self.show_progress = bool(show) and self.rank == 0
        self.on_epoch = on_epoch
        # Compute in a thread (the node keeps answering while XLA works) except under the
        # simulation's virtual-time loop, which must not wait on threads.
        self.offload = offload
        self.comm_seconds = 0.0
        self._grads, self._eval = _compiled(self.model)

    def _host_grads(self, params, x, y) -> tuple[float, float, dict[str, np.ndarray]]:
        """The gradient sums as numpy arrays by path, with the loss sum and the correct count.
        All of it where ``_run`` runs it: JAX dispatches asynchronously, and reading a result
        waits for the computation, which must not happen on the event loop."""
        (lsum, ncorrect), grads = self._grads(params, x, y)
        flat, _ = leaves_by_path(jax.device_get(grads))
        return float(lsum), float(ncorrect), {p: np.asarray(g) for p, g in flat.items()}

    def _host_eval(self, params, x, y, mask) -> tuple[float, float]:
        loss, correct = self._eval(params, x, y, mask)
        return float(loss), float(correct)

    async def _run(self, fn, *args):
        return await asyncio.to_thread(fn, *args) if self.offload else fn(*args)

    async def fit(self, dataset: Dataset, epochs: int | None = None, *, model_name: str | None = None) -> TrainResult:
        """Train ``epochs`` epochs (default ``hyperparams.epochs``) through the shards."""
        hp = self.hp
        epochs = hp.epochs if epochs is None else epochs
        size = len(self.workers)
        if hp.batch_size < size:
            raise TrainError(f"global batch {hp.batch_size} is smaller than the job ({size} workers)")
        loader = BatchLoader(dataset.train_images, dataset.train_labels,
                             BatchConfig(hp.batch_size, seed=hp.seed, augment=hp.augment), rank=self.rank, size=size)
        if len(loader) == 0:
            raise TrainError(f"{dataset.num_train} training samples make no batch of {hp.batch_size}")
        init_key, _ = jax.random.split(jax.random.PRNGKey(hp.seed))
        params = jax.tree_util.tree_map(np.asarray, jax.device_get(self.model.init(init_key)))
        _, self._rebuild = leaves_by_path(params)
        # A schedule counts optimizer updates on the shards: one per step under BSP, one per push
        # (workers per step) under SSP and ASP, so that a cosine decay spans the run either way.
        updates_per_epoch = len(loader) * (1 if self.consistency.aggregates else size)
        await self.client.open(params, workers=self.workers, consistency=self.consistency,
                               optimizer={"hyperparams": dataclasses.asdict(hp), "steps_per_epoch": updates_per_epoch})
        start = self.client.resume_clock
        self._total, self._ahead = epochs * len(loader), None
        if start:
            log.info("job %s: worker %s rejoins at step %d of %d (its clock on the shards)", self.client.job,
                     self.node.name, start, epochs * len(loader))
        history: list[EpochStats] = []
        for epoch in range(epochs):
            if start >= (epoch + 1) * len(loader):
                continue  # done before a restart
            stats, params = await self._epoch(loader, epoch, epochs, dataset, start)
            history.append(stats)
            if self.rank == 0:
                log.info("epoch %d/%d loss %.4f test_acc %.4f (%.1fs)", stats.epoch, epochs, stats.loss,
                         stats.test_accuracy, stats.seconds)
                if self.on_epoch:
                    self.on_epoch(stats)
        total = epochs * len(loader)
        final = await self.client.pull(total, floor=total)
        params = self._rebuild(final.values)
        test_loss, test_acc = await self._evaluate(params, dataset) if self.rank == 0 else (float("nan"),) * 2
        card = {
            "arch": self.model.arch, "hyperparams": dataclasses.asdict(hp), "epochs": epochs,
            "test_accuracy": test_acc, "test_loss": test_loss, "data_fingerprint": dataset.fingerprint,
            "data_source": dataset.source, "world_size": size, "labels": models.LABELS, "input_shape": [28, 28],
            "history": [dataclasses.asdict(h) for h in history],
            "via": "ps", "consistency": self.consistency.model, "staleness": self.consistency.bound,
            "shards": len(self.client.shards), "job": self.client.job,
        }
        version = None
        if self.rank == 0 and self.store is not None:
            name = model_name or f"fmnist-{self.model.arch['kind']}"
            version = self.store.save(name, params, card)
            card = self.store.card(name, version)
        return TrainResult(params, history, card, version)

    async def _epoch(self, loader: BatchLoader, epoch: int, epochs: int, dataset: Dataset, start: int = 0):
        loss_sum = correct = seen = 0.0
        comm = 0.0
        t0 = time.perf_counter()
        params = None
        progress = Progress(TextColumn(f"epoch {epoch + 1}/{epochs} (ps)"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("loss {task.fields[loss]:.4f}"), TimeRemainingColumn(),
                            console=self.console, disable=not self.show_progress, transient=False)
        with progress:
            task = progress.add_task("train", total=len(loader), loss=float("nan"))
            for batch in loader.epoch(epoch):
                clock = epoch * len(loader) + batch.step
                if clock < start:
                    progress.update(task, advance=1)
                    continue  # pushed before a restart
                tc = time.perf_counter()
                ahead, self._ahead = self._ahead, None
                pulled = ahead[1] if ahead is not None and ahead[0] == clock else await self.client.pull(clock)
                comm += time.perf_counter() - tc
                params = self._rebuild(pulled.values)
                lsum, ncorrect, grads = await self._run(self._host_grads, params, batch.x, batch.y)
                tc = time.perf_counter()
                # The push carries the next step's pull (one round trip per shard per step), except
                # for the job's last step, whose final read waits for every worker (fit).
                fused = clock + 1 < self._total
                got = await self.client.push(clock, grads, n=len(batch.y), then_pull=fused)
                if fused:
                    self._ahead = (clock + 1, got)
                comm += time.perf_counter() - tc
                loss_sum += lsum
                correct += ncorrect
                seen += len(batch.y)
                progress.update(task, advance=1, loss=loss_sum / max(seen, 1))
        train_seconds = max(time.perf_counter() - t0, 1e-9)
        self.comm_seconds += comm
        if self.rank == 0:
            test_loss, test_acc = await self._evaluate(params, dataset)
        else:
            test_loss, test_acc = float("nan"), float("nan")
        seconds = time.perf_counter() - t0
        stats = EpochStats(epoch + 1, float(loss_sum / max(seen, 1)), float(correct / max(seen, 1)), test_loss,
                           test_acc, seconds, seen / train_seconds, comm / train_seconds)
        return stats, params

    async def _evaluate(self, params, dataset: Dataset) -> tuple[float, float]:
        """Test loss and accuracy over the whole test set (rank 0 only: no collective here)."""
        totals = np.zeros(3, np.float64)
        for start in range(0, dataset.num_test, EVAL_BATCH):
            stop = min(start + EVAL_BATCH, dataset.num_test)
            x = np.zeros((EVAL_BATCH, 28, 28), np.float32)
            y = np.zeros(EVAL_BATCH, np.int32)
            mask = np.zeros(EVAL_BATCH, np.float32)
            x[: stop - start] = dataset.test_images[start:stop] * np.float32(1 / 255)
            y[: stop - start] = dataset.test_labels[start:stop]
            mask[: stop - start] = 1
            loss, correct = await self._run(self._host_eval, params, x, y, mask)
            totals += [loss, correct, stop - start]
        if totals[2] == 0:
            return float("nan"), float("nan")
        return float(totals[0] / totals[2]), float(totals[1] / totals[2])
