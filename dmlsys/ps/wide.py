"""The large model: a wide linear classifier over hashed features, too large for any one worker.

The course's sparse-vocabulary case on Fashion-MNIST. Each image becomes ``F`` active features:
for every pixel, the pair (position, intensity bucket), plus pairs of neighbouring pixels'
buckets, hashed into ``rows`` buckets (the hashing trick: no vocabulary is built or stored). The
model is a table ``emb`` of ``rows x 10`` weights and a bias ``b``; an image's logits are the sum
of its features' rows plus ``b``. With ``rows = 2**22`` the table is 160 MiB of float32 while a
batch of 64 images touches at most 64·F rows (a few MiB): the parameter servers hold the table,
a worker pulls only the rows of its batch.

**The memory cap.** ``MemoryCap(bytes)`` (from :mod:`dmlsys.train.memory`, shared with the
collective's workers) is what a worker may hold of the parameters.
``check_fits(specs, cap)`` is the test the collective passes (a full replica on every worker)
and refuses with an error naming the cap; a ``WideWorker`` checks every pull against the cap
before it is made, so it never holds more than the rows it pulled plus the dense leaves.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from dmlsys.ps.errors import PsError
from dmlsys.ps.partition import LeafSpec
from dmlsys.train.memory import MemoryCap, MemoryCapExceeded
from dmlsys.train.memory import check_fits as _check_fits

__all__ = ["MemoryCap", "MemoryCapExceeded", "WideConfig", "WideWorker", "check_fits", "features", "specs"]

NUM_CLASSES = 10
_P1, _P2, _P3 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xC2B2AE3D27D4EB4F), np.uint64(0x165667B19E3779F9)


def check_fits(specs: list[LeafSpec], cap: MemoryCap, what: str = "a full replica of the model") -> None:
    """Raise MemoryCapExceeded when the whole model (every leaf) would not fit ``cap``
    (``dmlsys.train.memory.check_fits``, the one the collective's workers apply)."""
    _check_fits(specs, cap, what)


@dataclasses.dataclass(frozen=True)
class WideConfig:
    rows: int = 1 << 22  # hash buckets in the table
    buckets: int = 4  # intensity levels per pixel
    pairs: bool = True  # also hash horizontally neighbouring pixels' (bucket, bucket)

    def __post_init__(self) -> None:
        if self.rows < 1 or not 2 <= self.buckets <= 256:
            raise PsError(f"wide model: rows >= 1 and buckets in [2, 256], got {self.rows}, {self.buckets}")

    @property
    def features(self) -> int:
        """Active features per image."""
        return 784 + (28 * 27 if self.pairs else 0)


def specs(config: WideConfig) -> list[LeafSpec]:
    """The model's parameters: ``emb`` (the table) and ``b``."""
    return [LeafSpec("emb", (config.rows, NUM_CLASSES), "<f4"), LeafSpec("b", (NUM_CLASSES,), "<f4")]


def features(images: np.ndarray, config: WideConfig) -> np.ndarray:
    """uint8 images (B, 28, 28) -> hashed feature ids (B, F) in [0, rows). Pure numpy."""
    images = np.asarray(images).reshape(len(images), 28, 28)
    level = (images.astype(np.uint64) * np.uint64(config.buckets)) >> np.uint64(8)  # 0 .. buckets-1
    pos = np.arange(784, dtype=np.uint64).reshape(1, 28, 28)
    keys = [(pos * np.uint64(config.buckets) + level).reshape(len(images), -1)]
    if config.pairs:
        pair = level[:, :, :-1] * np.uint64(config.buckets) + level[:, :, 1:]
        ppos = np.arange(28 * 27, dtype=np.uint64).reshape(1, 28, 27) + np.uint64(1 << 20)
        keys.append((ppos * np.uint64(config.buckets * config.buckets) + pair).reshape(len(images), -1))
    k = np.concatenate(keys, axis=1)
    with np.errstate(over="ignore"):  # the multiplications are meant to wrap: that is the hash
        h = (k * _P1) ^ ((k >> np.uint64(29)) * _P2)
        h = (h ^ (h >> np.uint64(32))) * _P3
    return (h % np.uint64(config.rows)).astype(np.int64)


def forward(rows: np.ndarray, inverse: np.ndarray, bias: np.ndarray, batch: int) -> np.ndarray:
    """Logits (B, 10): the sum of each image's feature rows plus the bias. ``rows`` are the
    pulled unique rows, ``inverse`` (B*F,) where each image's features are among them."""
    return rows[inverse].reshape(batch, -1, NUM_CLASSES).sum(axis=1) + bias


def gradients(rows: np.ndarray, inverse: np.ndarray, bias: np.ndarray, labels: np.ndarray):
    """Softmax cross-entropy summed over the batch: (loss sum, correct, row grads (U, 10), bias grad)."""
    batch = len(labels)
    logits = forward(rows, inverse, bias, batch)
    logits = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    loss = float(-np.log(np.maximum(p[np.arange(batch), labels], 1e-30)).sum())
    correct = int((logits.argmax(1) == labels).sum())
    d = p
    d[np.arange(batch), labels] -= 1.0  # dloss/dlogits per image
    per_feature = np.repeat(d, inverse.size // batch, axis=0)  # every feature of an image gets its d
    grow = np.zeros_like(rows)
    np.add.at(grow, inverse, per_feature.astype(rows.dtype))
    return loss, correct, grow, d.sum(axis=0).astype(bias.dtype)


class WideWorker:
    """One worker's step on the wide model through a ``PsClient``, under a memory cap."""

    def __init__(self, client: Any, config: WideConfig, cap: MemoryCap) -> None:
        self.client = client
        self.config = config
        self.cap = cap
        self.peak_bytes = 0  # the most parameter bytes this worker held at once

    async def step(self, clock: int, images: np.ndarray, labels: np.ndarray) -> tuple[float, int]:
        ids = features(images, self.config)
        unique, inverse = np.unique(ids.reshape(-1), return_inverse=True)
        need = unique.size * NUM_CLASSES * 4 + NUM_CLASSES * 4
        self.cap.check(need, f"the rows of one batch ({unique.size} of {self.config.rows})")
        pulled = await self.client.pull(clock, rows={"emb": unique})
        rows, bias = pulled.rows["emb"], pulled.values["b"]
        self.peak_bytes = max(self.peak_bytes, rows.nbytes + bias.nbytes)
        loss, correct, grow, gb = gradients(rows, inverse.reshape(-1), bias, np.asarray(labels, np.int64))
        await self.client.push(clock, {"b": gb}, rows={"emb": (unique, grow)}, n=len(labels))
        return loss, correct

    async def evaluate(self, clock: int, images: np.ndarray, labels: np.ndarray, batch: int = 500) -> float:
        correct = 0
        for start in range(0, len(labels), batch):
            x, y = images[start:start + batch], labels[start:start + batch]
            ids = features(x, self.config)
            unique, inverse = np.unique(ids.reshape(-1), return_inverse=True)
            self.cap.check(unique.size * NUM_CLASSES * 4, "the rows of one evaluation batch")
            pulled = await self.client.pull(clock, rows={"emb": unique})
            logits = forward(pulled.rows["emb"], inverse.reshape(-1), pulled.values["b"], len(y))
            correct += int((logits.argmax(1) == y).sum())
        return correct / max(1, len(labels))
