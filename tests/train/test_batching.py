"""Batching, caching and sharding: every sample once, shards partition, the cache changes nothing."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from dmlsys.train.batching import BatchConfig, BatchLoader, flip_augment, flip_mask, prepare, shard_bounds


def ids_dataset(n: int):
    """Images whose pixels encode nothing; labels carry the sample id so we can track samples."""
    images = (np.arange(n * 4) % 256).astype(np.uint8).reshape(n, 2, 2)
    return images, np.arange(n)


def epoch_ids(loader: BatchLoader, epoch: int) -> list[list[int]]:
    return [b.y.tolist() for b in loader.epoch(epoch)]


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 90), batch=st.integers(1, 40), seed=st.integers(0, 3), epochs=st.integers(1, 3),
       shuffle=st.booleans(), cache=st.booleans(), drop_last=st.booleans())
def test_every_sample_exactly_once_per_epoch(n, batch, seed, epochs, shuffle, cache, drop_last):
    cfg = BatchConfig(batch, shuffle=shuffle, seed=seed, cache=cache, drop_last=drop_last)
    loader = BatchLoader(*ids_dataset(n), cfg)
    for e in range(epochs):
        seen = [i for b in epoch_ids(loader, e) for i in b]
        assert len(seen) == len(set(seen))
        expected = n - n % batch if drop_last else n
        assert len(seen) == expected and len(loader) * batch >= expected


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 1000), st.integers(1, 9))
def test_shard_bounds_partition_a_batch_in_rank_order(batch_len, size):
    bounds = [shard_bounds(batch_len, r, size) for r in range(size)]
    assert bounds[0][0] == 0 and bounds[-1][1] == batch_len
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    lengths = [hi - lo for lo, hi in bounds]
    assert max(lengths) - min(lengths) <= 1


@settings(max_examples=30, deadline=None)
@given(n=st.integers(8, 80), batch=st.integers(4, 20), size=st.integers(1, 4), epoch=st.integers(0, 2),
       cache=st.booleans())
def test_worker_shards_together_are_the_single_worker_batch(n, batch, size, epoch, cache):
    cfg = BatchConfig(batch, seed=7, cache=cache, augment=True)
    images = np.random.default_rng(n).integers(0, 256, (n, 28, 28), dtype=np.uint8)
    single = list(BatchLoader(images, np.arange(n), cfg).epoch(epoch))
    shards = [list(BatchLoader(images, np.arange(n), cfg, rank=r, size=size).epoch(epoch)) for r in range(size)]
    for step, whole in enumerate(single):
        union = sorted(i for r in range(size) for i in shards[r][step].y.tolist())
        assert union == sorted(whole.y.tolist())
        assert {shards[r][step].global_size for r in range(size)} == {len(whole.y)}
        # the same sample is prepared and augmented identically wherever it lands
        by_id = {int(i): x for i, x in zip(whole.ids, whole.x)}
        for r in range(size):
            for i, x in zip(shards[r][step].ids, shards[r][step].x):
                np.testing.assert_array_equal(x, by_id[int(i)])


def test_cached_epoch_serves_the_first_epochs_batches_without_preparing_again():
    loader = BatchLoader(*ids_dataset(100), BatchConfig(16, seed=3))
    first = {tuple(b) for b in epoch_ids(loader, 0)}
    assert loader.stats()["prepared"] == len(loader) and loader.stats()["cache_hits"] == 0
    second = epoch_ids(loader, 1)
    assert {tuple(b) for b in second} == first
    assert loader.stats()["prepared"] == len(loader) and loader.stats()["cache_hits"] == len(loader)
    assert [tuple(b) for b in second] != [tuple(b) for b in epoch_ids(loader, 0)]  # batch order reshuffled


@pytest.mark.parametrize("cache", [True, False])
def test_batches_do_not_depend_on_what_was_cached_before(cache):
    """What makes resuming from a checkpoint exact: a cold loader at epoch 2 == a warm one."""
    cfg = BatchConfig(10, seed=1, cache=cache, augment=True)
    images = np.random.default_rng(0).integers(0, 256, (64, 28, 28), dtype=np.uint8)
    labels = np.arange(64)
    warm = BatchLoader(images, labels, cfg)
    for e in range(2):
        list(warm.epoch(e))
    cold = BatchLoader(images, labels, cfg)
    for a, b in zip(warm.epoch(2), cold.epoch(2), strict=True):
        np.testing.assert_array_equal(a.x, b.x)
        np.testing.assert_array_equal(a.y, b.y)


def test_prepare_scales_to_unit_float32_and_flattens():
    imgs = np.array([[[0, 255], [51, 102]]], np.uint8)
    x, y = prepare(imgs, np.array([3], np.uint8), flatten=True)
    assert x.dtype == np.float32 and x.shape == (1, 4) and y.dtype == np.int32
    np.testing.assert_allclose(x, [[0.0, 1.0, 0.2, 0.4]], rtol=1e-6)


def test_flip_augment_mirrors_some_images_and_keeps_pixels():
    x = np.random.default_rng(0).random((64, 28, 28), dtype=np.float32)
    mask = flip_mask(64, seed=0, epoch=1)
    out = flip_augment(x, mask)
    mirrored = [np.array_equal(o, i[:, ::-1]) for o, i in zip(out, x)]
    unchanged = [np.array_equal(o, i) for o, i in zip(out, x)]
    assert mirrored == mask.tolist() and unchanged == (~mask).tolist() and 0 < mask.sum() < 64
    assert not np.array_equal(mask, flip_mask(64, seed=0, epoch=2))  # fresh coins every epoch
    flat = flip_augment(x.reshape(64, -1), mask)
    np.testing.assert_array_equal(flat.reshape(64, 28, 28), out)


def test_invalid_rank_is_refused():
    with pytest.raises(ValueError, match="rank 2 out of range for group size 2"):
        BatchLoader(*ids_dataset(4), BatchConfig(2), rank=2, size=2)
