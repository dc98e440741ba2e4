"""The batching and caching patterns, and data-parallel sharding of each global batch.

**Batching.** Raw samples stay as compact uint8 (47 MB for Fashion-MNIST's training set);
transformations (scale to float32 in [0, 1], optional flatten, optional augmentation) run on
one mini-batch at a time, so the transformed dataset (4x larger as float32) is never held in
memory all at once.

**Caching.** Preparing a batch costs a gather and a conversion; the model sees the same
prepared batches every epoch, so the first epoch keeps them and later epochs are served from
an in-memory cache. The price: with the cache on, the *composition* of the batches is fixed
(that of epoch 0's shuffle) and each epoch shuffles the *order of batches* instead of the
samples. Augmentation is applied after the cache, so it stays fresh every epoch.

**Sharding.** In data-parallel training each global batch of B samples is split among
``size`` workers; worker ``rank`` gets the contiguous slice ``shard_bounds(B, rank, size)``
(sizes differ by at most one). Each worker prepares and caches only its own shard. The
gradient of a global batch is the sum of the shards' gradient sums divided by B, so N
workers compute exactly what one worker with batch B would.

Every batch is a pure function of ``(config, epoch, step, rank, size)``, never of what was
cached before; so a run resumed from a checkpoint at epoch k sees exactly the batches an
uninterrupted run sees (the cache is an optimisation, not state).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np

from .errors import InvalidArgument


@dataclasses.dataclass(frozen=True)
class BatchConfig:
    """How a :class:`BatchLoader` cuts and prepares batches. ``batch_size`` is the *global* batch."""

    batch_size: int = 128
    shuffle: bool = True
    seed: int = 0
    flatten: bool = False
    augment: bool = False  # random horizontal flip, per sample
    drop_last: bool = True  # a ragged last batch would cost one more jit compilation
    cache: bool = True

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise InvalidArgument(f"batch_size must be >= 1, got {self.batch_size}")


class Batch(NamedTuple):
    """One worker's shard of one global batch."""

    x: np.ndarray  # float32, (b, 28, 28) or (b, 784)
    y: np.ndarray  # int32, (b,)
    ids: np.ndarray  # the samples' indices in the dataset
    global_size: int  # samples in the whole global batch: the gradient's divisor
    step: int  # position of this batch within the epoch


# -- pure core: orders, batches, shards, transforms ------------------------------------------


def epoch_order(n: int, *, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """A permutation of ``range(n)``, a pure function of ``(seed, epoch)``."""
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([seed, epoch]).permutation(n)


def global_batches(order: np.ndarray, batch_size: int, *, drop_last: bool) -> list[np.ndarray]:
    """Cut ``order`` into consecutive index arrays of ``batch_size`` (the last may be short)."""
    stop = len(order) - len(order) % batch_size if drop_last else len(order)
    return [order[i : min(i + batch_size, stop)] for i in range(0, stop, batch_size)]


def shard_bounds(batch_len: int, rank: int, size: int) -> tuple[int, int]:
    """``[start, stop)`` of worker ``rank``'s slice of a batch of ``batch_len`` among ``size``.

    The slices partition the batch in rank order and their lengths differ by at most one
    (the first ``batch_len % size`` ranks get one extra sample), as ``np.array_split``.
    """
    if not 0 <= rank < size:
        raise InvalidArgument(f"rank {rank} out of range for group size {size}")
    base, extra = divmod(batch_len, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def prepare(images: np.ndarray, labels: np.ndarray, *, flatten: bool) -> tuple[np.ndarray, np.ndarray]:
    """uint8 pixels -> float32 in [0, 1] (flattened to (b, H*W) if asked); labels -> int32."""
    x = images.astype(np.float32) * np.float32(1.0 / 255.0)
    if flatten:
        x = x.reshape(len(x), -1)
    return x, labels.astype(np.int32)


def flip_mask(n: int, *, seed: int, epoch: int) -> np.ndarray:
    """Which of the ``n`` samples are mirrored in ``epoch``: a coin per *sample id*.

    Keyed by sample, not by position in a batch, so a sample is flipped the same way
    whichever worker's shard it lands in: N workers augment exactly as one worker does.
    """
    return np.random.default_rng([seed, epoch, 2]).random(n) < 0.5


def flip_augment(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mirror left-right the images where ``mask`` is true (clothes are roughly symmetric)."""
    imgs = x.reshape(len(x), 28, -1) if x.ndim == 2 else x
    out = imgs.copy()  # never write into a cached batch
    out[mask] = imgs[mask][:, :, ::-1]
    return out.reshape(x.shape)


def batch_permutation(num_batches: int, *, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """Order in which cached batches are served in ``epoch`` (identity for epoch 0)."""
    if not shuffle or epoch == 0:
        return np.arange(num_batches)
    # Offset the stream so it is independent of the sample shuffle epoch_order(seed, epoch).
    return np.random.default_rng([seed, epoch, 1]).permutation(num_batches)


# -- the loader ----------------------------------------------------------------------------------


class BatchLoader:
    """Serves one worker's shard of every global batch, epoch after epoch.

    Example::

        loader = BatchLoader(ds.train_images, ds.train_labels, BatchConfig(batch_size=256))
        for epoch in range(3):
            for batch in loader.epoch(epoch):     # epoch 0 prepares, 1 and 2 hit the cache
                ...
        loader.stats()   # {'prepared': 234, 'cache_hits': 468, 'cached_bytes': ...}
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, config: BatchConfig = BatchConfig(),
                 *, rank: int = 0, size: int = 1) -> None:
        if len(images) != len(labels):
            raise InvalidArgument(f"{len(images)} images but {len(labels)} labels")
        shard_bounds(0, rank, size)  # validates rank/size
        self.images, self.labels = images, labels
        self.config, self.rank, self.size = config, rank, size
        self._cache: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray, int]] = {}
        self._prepared = 0
        self._hits = 0

    def __len__(self) -> int:
        """Steps per epoch."""
        n, b = len(self.labels), self.config.batch_size
        return n // b if self.config.drop_last else -(-n // b)

    def _batch_indices(self, epoch: int) -> list[np.ndarray]:
        c = self.config
        # With the cache the composition is always epoch 0's; without it every epoch reshuffles.
        order_epoch = 0 if c.cache else epoch
        order = epoch_order(len(self.labels), seed=c.seed, epoch=order_epoch, shuffle=c.shuffle)
        return global_batches(order, c.batch_size, drop_last=c.drop_last)

    def _prepare(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        lo, hi = shard_bounds(len(idx), self.rank, self.size)
        mine = np.sort(idx[lo:hi])  # sorted gather is kinder to the cache; order within a batch is irrelevant
        x, y = prepare(self.images[mine], self.labels[mine], flatten=self.config.flatten)
        self._prepared += 1
        return x, y, mine, len(idx)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        """Yield this worker's :class:`Batch` for every step of ``epoch``."""
        c = self.config
        batches = self._batch_indices(epoch) if not (c.cache and self._cache_complete()) else None
        num = len(self) if batches is None else len(batches)
        perm = batch_permutation(num, seed=c.seed, epoch=epoch, shuffle=c.shuffle and c.cache)
        flips = flip_mask(len(self.labels), seed=c.seed, epoch=epoch) if c.augment else None
        for step, b in enumerate(perm):
            b = int(b)
            if c.cache and b in self._cache:
                x, y, ids, gsize = self._cache[b]
                self._hits += 1
            else:
                if batches is None:
                    batches = self._batch_indices(epoch)
                x, y, ids, gsize = self._prepare(batches[b])
                if c.cache:
                    self._cache[b] = (x, y, ids, gsize)
            if flips is not None:
                x = flip_augment(x, flips[ids])
            yield Batch(x, y, ids, gsize, step)

    def _cache_complete(self) -> bool:
        return len(self._cache) == len(self)

    def clear_cache(self) -> None:
        self._cache.clear()

    def stats(self) -> dict[str, int]:
        """Counters: batches prepared, batches served from the cache, bytes the cache holds."""
        nbytes = sum(x.nbytes + y.nbytes + i.nbytes for x, y, i, _ in self._cache.values())
        return {"prepared": self._prepared, "cache_hits": self._hits, "cached_batches": len(self._cache),
                "cached_bytes": nbytes}
