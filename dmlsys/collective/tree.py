"""Pytrees to fused flat buffers and back.

A pytree here is nested dicts, lists and tuples (named tuples included, so optax states work)
whose leaves are numpy arrays, JAX arrays or Python numbers. Leaves of one dtype are
concatenated into buckets of at most ``bucket_bytes``: one ring pass per bucket instead of one
per leaf (PyTorch DDP's gradient buckets, Horovod's tensor fusion).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np


def flatten(tree: Any) -> tuple[list[np.ndarray], Callable[[list[np.ndarray]], Any]]:
    """Leaves as numpy arrays (in a fixed order), and a function that rebuilds the structure."""
    leaves: list[np.ndarray] = []

    def walk(node: Any) -> Callable[[list], Any]:
        if isinstance(node, dict):
            keys = list(node)
            parts = [walk(node[k]) for k in keys]
            return lambda it: {k: p(it) for k, p in zip(keys, parts)}
        if isinstance(node, (list, tuple)):
            parts = [walk(v) for v in node]
            if isinstance(node, list):
                return lambda it: [p(it) for p in parts]
            if hasattr(node, "_fields"):  # a named tuple
                cls = type(node)
                return lambda it: cls(*(p(it) for p in parts))
            return lambda it: tuple(p(it) for p in parts)
        array = np.asarray(node)
        if array.dtype.kind not in "biufc":
            raise TypeError(f"collectives take numeric arrays; got a leaf of dtype {array.dtype} ({type(node).__name__})")
        leaves.append(array)
        return lambda it: next(it)

    build = walk(tree)
    return leaves, lambda new: build(iter(new))


@dataclasses.dataclass
class Bucket:
    flat: np.ndarray  # contiguous, one dtype
    indices: list[int]  # which leaves, in order
    shapes: list[tuple[int, ...]]


def fuse(leaves: list[np.ndarray], bucket_bytes: int) -> list[Bucket]:
    """Group leaves by dtype (first-seen order) and pack each group into capped buckets.

    A leaf larger than the cap gets a bucket of its own; it is never split, since the ring
    already pipelines within a bucket."""
    by_dtype: dict[np.dtype, list[int]] = {}
    for i, leaf in enumerate(leaves):
        by_dtype.setdefault(leaf.dtype, []).append(i)
    buckets: list[Bucket] = []
    for indices in by_dtype.values():
        group: list[int] = []
        size = 0
        for i in indices:
            nbytes = leaves[i].nbytes
            if group and size + nbytes > bucket_bytes:
                buckets.append(_pack(leaves, group))
                group, size = [], 0
            group.append(i)
            size += nbytes
        if group:
            buckets.append(_pack(leaves, group))
    return buckets


def _pack(leaves: list[np.ndarray], indices: list[int]) -> Bucket:
    parts = [leaves[i].reshape(-1) for i in indices]
    flat = parts[0].copy() if len(parts) == 1 else np.concatenate(parts)
    return Bucket(np.ascontiguousarray(flat), indices, [leaves[i].shape for i in indices])


def unfuse(bucket: Bucket, flat: np.ndarray, out: list, stacked: int | None = None) -> None:
    """Cut ``flat`` back into the bucket's leaves (with a leading axis of ``stacked`` if given)."""
    offset = 0
    for i, shape in zip(bucket.indices, bucket.shapes):
        size = int(np.prod(shape, dtype=np.int64))
        if stacked is None:
            out[i] = flat[offset:offset + size].reshape(shape)
        else:
            out[i] = flat[:, offset:offset + size].reshape((stacked, *shape))
        offset += size
