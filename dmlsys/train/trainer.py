"""Data-parallel training of a Fashion-MNIST model over a :class:`~dmlsys.train.group.Group`.

Every worker holds a full replica of the model. For each global batch of B samples:

1. each worker takes its shard (``batching.shard_bounds``) and computes, under one
   ``jax.jit``, the gradient of the *sum* of its samples' losses;
2. the workers ``allreduce(..., "sum")`` one flat list of arrays: the gradient leaves plus
   a small stats vector (loss sum, correct count), so a step costs one collective;
3. each worker divides by B and applies the same optax update.

Since the group returns bitwise-identical sums to every rank and the update is a
deterministic function of (params, state, gradient), the replicas stay identical, step after
step. And since sum-then-divide is the mean over the global batch, N workers compute what one
worker with batch B computes (up to float summation order).

Rank 0 draws a progress bar per epoch, logs per-epoch loss and test accuracy (the test set is
sharded across ranks too), writes a checkpoint after every epoch, and saves the final model to
the :class:`~dmlsys.train.store.ModelStore`. Resuming reads the checkpoint on rank 0 and
broadcasts it, so only rank 0 needs the file.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from dmlsys.wire.sim import to_thread

from . import models
from .batching import BatchConfig, BatchLoader, shard_bounds
from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .data import Dataset
from .errors import TrainError
from .group import Group, LocalGroup
from .store import ModelStore

log = logging.getLogger("dmlsys.train")

OPTIMIZERS = ("adam", "sgd", "momentum")
SCHEDULES = ("constant", "cosine")
EVAL_BATCH = 1000


@dataclasses.dataclass(frozen=True)
class Hyperparams:
    """Everything besides the architecture that decides the trained parameters."""

    lr: float = 1e-3
    batch_size: int = 128  # the global batch, split among the workers
    epochs: int = 5
    optimizer: str = "adam"
    momentum: float = 0.9  # for "momentum"
    weight_decay: float = 0.0  # decoupled (AdamW-style) for "adam"
    schedule: str = "constant"  # "cosine": decays lr to 0 over `epochs`
    augment: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise TrainError(f"unknown optimizer {self.optimizer!r}; known: {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise TrainError(f"unknown schedule {self.schedule!r}; known: {', '.join(SCHEDULES)}")
        if self.lr <= 0 or self.batch_size < 1 or self.epochs < 1:
            raise TrainError(f"need lr > 0, batch_size >= 1, epochs >= 1; got {self}")

    def optimizer_for(self, steps_per_epoch: int) -> optax.GradientTransformation:
        lr: Any = self.lr
        if self.schedule == "cosine":
            lr = optax.cosine_decay_schedule(self.lr, max(1, self.epochs * steps_per_epoch))
        if self.optimizer == "adam":
            return optax.adamw(lr, weight_decay=self.weight_decay) if self.weight_decay else optax.adam(lr)
        if self.optimizer == "momentum":
            return optax.sgd(lr, momentum=self.momentum)
        return optax.sgd(lr)


@dataclasses.dataclass(frozen=True)
class EpochStats:
    epoch: int  # 1-based: epochs completed
    loss: float  # mean training loss over the epoch
    train_accuracy: float
    test_loss: float
    test_accuracy: float
    seconds: float
    samples_per_s: float
    comm_fraction: float  # share of step time spent awaiting the allreduce


@dataclasses.dataclass
class TrainResult:
    params: dict[str, Any]  # numpy arrays
    history: list[EpochStats]
    card: dict[str, Any]
    version: int | None  # model store version (rank 0, when saved)

    @property
    def test_accuracy(self) -> float:
        return self.card["test_accuracy"]


def _to_numpy(tree: Any) -> Any:
    return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))


class Trainer:
    """Trains one replica; run one per rank of ``group``.

    Example (single process)::

        result = await Trainer({"kind": "mlp"}, Hyperparams(epochs=3), store=ModelStore()).fit(data.load())
    """

    def __init__(self, arch: dict[str, Any], hyperparams: Hyperparams = Hyperparams(), *,
                 group: Group | None = None, store: ModelStore | None = None,
                 checkpoint_dir: str | Path | None = None, progress: bool | None = None,
                 console: Console | None = None, on_epoch: Callable[[EpochStats], None] | None = None) -> None:
        self.model = models.build(arch)
        self.hp = hyperparams
        self.group = group or LocalGroup()
        self.store = store
        self.checkpoint_path = Path(checkpoint_dir) / "checkpoint.npz" if checkpoint_dir else None
        self.console = console or Console(stderr=True)
        # A bar in a log file is noise: default on only for a terminal, and only on rank 0.
        show = self.console.is_terminal if progress is None else progress
        self.show_progress = bool(show) and self.group.rank == 0
        self.on_epoch = on_epoch
        self._jit()

    # -- compiled pieces: one gradient fn, one update fn, one eval fn -----------------------

    def _jit(self) -> None:
        apply = self.model.apply

        def loss_sum(params, x, y):
            logits = apply(params, x)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).sum()
            return loss, (jnp.argmax(logits, -1) == y).sum()

        self._grads = jax.jit(jax.value_and_grad(loss_sum, has_aux=True))

        def evaluate(params, x, y, mask):
            logits = apply(params, x)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y)
            return (loss * mask).sum(), ((jnp.argmax(logits, -1) == y) * mask).sum()

        self._eval = jax.jit(evaluate)

    def _make_update(self, opt: optax.GradientTransformation) -> Callable:
        def update(params, opt_state, grad_sum, inv_batch):
            grads = jax.tree_util.tree_map(lambda g: g * inv_batch, grad_sum)
            updates, opt_state = opt.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        return jax.jit(update)

    # -- the loop ----------------------------------------------------------------------------

    async def fit(self, dataset: Dataset, epochs: int | None = None, *, model_name: str | None = None,
                  resume: bool = True) -> TrainResult:
        """Train until ``epochs`` epochs are complete (default ``hyperparams.epochs``).

        With a checkpoint present (and ``resume``), training continues after its epoch; a
        run stopped early by passing a smaller ``epochs`` resumes exactly.

        Raises:
            TrainError: the global batch is smaller than the group, or the dataset is too small.
            CheckpointError: the checkpoint belongs to another model or hyperparameters.
        """
        hp, g = self.hp, self.group
        epochs = hp.epochs if epochs is None else epochs
        if hp.batch_size < g.size:
            raise TrainError(f"global batch {hp.batch_size} is smaller than the group ({g.size} workers)")
        loader = BatchLoader(dataset.train_images, dataset.train_labels,
                             BatchConfig(hp.batch_size, seed=hp.seed, augment=hp.augment),
                             rank=g.rank, size=g.size)
        if len(loader) == 0:
            raise TrainError(f"{dataset.num_train} training samples make no batch of {hp.batch_size}")
        opt = self.hp.optimizer_for(len(loader))
        update = self._make_update(opt)
        # world size is not in meta: N workers compute what one does, so a run may resume on another N
        meta = {"arch": self.model.arch, "hyperparams": dataclasses.asdict(hp)}

        init_key, rng = jax.random.split(jax.random.PRNGKey(hp.seed))
        params = self.model.init(init_key)
        opt_state = opt.init(params)
        start = 0
        if resume and g.rank == 0 and self.checkpoint_path and self.checkpoint_path.exists():
            ck = load_checkpoint(self.checkpoint_path, opt_template=opt_state, meta=meta)
            params, opt_state, start, rng = ck.params, ck.opt_state, ck.epoch, ck.rng
            log.info("resuming from %s after epoch %d", self.checkpoint_path, start)
        # Rank 0's state is the truth (fresh or resumed): one broadcast makes every replica equal.
        params, opt_state, start, rng = await self._broadcast_state(params, opt_state, start, rng)

        history: list[EpochStats] = []
        for epoch in range(start, epochs):
            params, opt_state, stats = await self._epoch(loader, epoch, epochs, params, opt_state, update, dataset)
            history.append(stats)
            if g.rank == 0:
                log.info("epoch %d/%d loss %.4f test_acc %.4f (%.1fs)", stats.epoch, epochs, stats.loss,
                         stats.test_accuracy, stats.seconds)
                if self.on_epoch:
                    self.on_epoch(stats)
            if g.rank == 0 and self.checkpoint_path:
                save_checkpoint(self.checkpoint_path, Checkpoint(params, opt_state, epoch + 1, rng, meta))

        if history:
            test_loss, test_acc = history[-1].test_loss, history[-1].test_accuracy
        else:  # resumed a finished run: evaluate what we have
            test_loss, test_acc = await self._evaluate(params, dataset)
        card = {
            "arch": self.model.arch, "hyperparams": dataclasses.asdict(hp), "epochs": max(start, epochs),
            "test_accuracy": test_acc, "test_loss": test_loss, "data_fingerprint": dataset.fingerprint,
            "data_source": dataset.source, "world_size": g.size, "labels": models.LABELS,
            "input_shape": [28, 28], "history": [dataclasses.asdict(h) for h in history],
        }
        version = None
        params = _to_numpy(params)
        if g.rank == 0 and self.store is not None:
            name = model_name or f"fmnist-{self.model.arch['kind']}"
            version = self.store.save(name, params, card)
            card = self.store.card(name, version)
        return TrainResult(params, history, card, version)

    async def _broadcast_state(self, params, opt_state, epoch, rng):
        if self.group.size == 1:
            return params, opt_state, epoch, rng
        leaves, treedef = jax.tree_util.tree_flatten((params, opt_state))
        payload = [np.asarray(x) for x in jax.device_get(leaves)]
        payload += [np.asarray([epoch], np.int64), np.asarray(jax.device_get(rng))]
        got = await self.group.broadcast(payload, 0)
        params, opt_state = jax.tree_util.tree_unflatten(treedef, list(got[:-2]))
        return params, opt_state, int(got[-2][0]), got[-1]

    async def _epoch(self, loader, epoch, epochs, params, opt_state, update, dataset):
        g = self.group
        treedef = jax.tree_util.tree_structure(params)
        loss_sum = correct = seen = 0.0
        comm = 0.0
        t0 = time.perf_counter()
        progress = Progress(TextColumn(f"epoch {epoch + 1}/{epochs}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("loss {task.fields[loss]:.4f}"), TimeRemainingColumn(),
                            console=self.console, disable=not self.show_progress, transient=False)
        with progress:
            task = progress.add_task("train", total=len(loader), loss=float("nan"))
            for batch in loader.epoch(epoch):
                # Compute off the event loop: it keeps the node responsive (liveness, RPCs)
                # and lets in-process ranks compute in parallel.
                (lsum, ncorrect), grads = await to_thread(self._grads, params, batch.x, batch.y)
                leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(jax.device_get(grads))]
                stats = np.array([float(lsum), float(ncorrect)], np.float64)
                tc = time.perf_counter()
                reduced = await g.allreduce(leaves + [stats], "sum")
                comm += time.perf_counter() - tc
                grad_sum = jax.tree_util.tree_unflatten(treedef, list(reduced[:-1]))
                params, opt_state = await to_thread(
                    update, params, opt_state, grad_sum, np.float32(1.0 / batch.global_size))
                loss_sum += reduced[-1][0]
                correct += reduced[-1][1]
                seen += batch.global_size
                progress.update(task, advance=1, loss=loss_sum / seen)
        train_seconds = time.perf_counter() - t0
        test_loss, test_acc = await self._evaluate(params, dataset)
        seconds = time.perf_counter() - t0
        stats = EpochStats(epoch + 1, float(loss_sum / seen), float(correct / seen), test_loss, test_acc,
                           seconds, seen / train_seconds, comm / train_seconds)
        return params, opt_state, stats

    async def _evaluate(self, params, dataset: Dataset) -> tuple[float, float]:
        """Test loss and accuracy; each rank evaluates its slice, one allreduce adds them up."""
        g = self.group
        lo, hi = shard_bounds(dataset.num_test, g.rank, g.size)
        totals = np.zeros(3, np.float64)  # loss sum, correct, count
        for start in range(lo, hi, EVAL_BATCH):
            stop = min(start + EVAL_BATCH, hi)
            x = np.zeros((EVAL_BATCH, 28, 28), np.float32)  # padded: one shape, one compilation
            y = np.zeros(EVAL_BATCH, np.int32)
            mask = np.zeros(EVAL_BATCH, np.float32)
            x[: stop - start] = dataset.test_images[start:stop] * np.float32(1 / 255)
            y[: stop - start] = dataset.test_labels[start:stop]
            mask[: stop - start] = 1
            loss, correct = await to_thread(self._eval, params, x, y, mask)
            totals += [float(loss), float(correct), stop - start]
        totals = (await g.allreduce([totals], "sum"))[0]
        if totals[2] == 0:
            return float("nan"), float("nan")
        return float(totals[0] / totals[2]), float(totals[1] / totals[2])


def train_model(arch: dict[str, Any], hyperparams: Hyperparams = Hyperparams(), *,
                dataset: Dataset | None = None, epochs: int | None = None,
                store: ModelStore | None = None, model_name: str | None = None,
                checkpoint_dir: str | Path | None = None, progress: bool | None = None,
                on_epoch: Callable[[EpochStats], None] | None = None) -> TrainResult:
    """Synchronous single-process training (``LocalGroup``); loads Fashion-MNIST if no dataset."""
    if dataset is None:
        from .data import load

        dataset = load()
    trainer = Trainer(arch, hyperparams, store=store, checkpoint_dir=checkpoint_dir,
                      progress=progress, on_epoch=on_epoch)
    return asyncio.run(trainer.fit(dataset, epochs, model_name=model_name))
