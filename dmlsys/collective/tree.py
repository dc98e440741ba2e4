"""Pytrees to fused flat buffers and back.

A pytree here is nested dicts, lists and tuples (named tuples included, so optax states work)
whose leaves are numpy arrays, JAX arrays or Python numbers. Leaves of one dtype are
concatenated into buckets of at most ``bucket_bytes``: one ring pass per bucket instead of one
per leaf (PyTorch DDP's gradient buckets, Horovod's tensor fusion).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from dmlsys.arrays import flatten
from dmlsys.collective.errors import NotNumeric


def numeric_leaves(tree: Any) -> tuple[list[np.ndarray], Callable[[list[np.ndarray]], Any]]:
    """:func:`dmlsys.arrays.flatten` (leaves in a fixed order, and a function that rebuilds the
    structure), refusing leaves that are not numbers.

    Raises:
        NotNumeric: a leaf of another dtype (strings, objects), named with its type.
    """
    leaves, rebuild = flatten(tree)
    for leaf in leaves:
        if leaf.dtype.kind not in "biufc":
            raise NotNumeric(f"collectives take numeric arrays; got a leaf of dtype {leaf.dtype} "
                             f"({type(leaf.item() if leaf.ndim == 0 else leaf).__name__})")
    return leaves, rebuild


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
