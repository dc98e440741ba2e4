"""The large model: a hashed-feature table bigger than a worker's memory cap. A full replica is
refused naming the cap; through the parameter servers it trains, each worker holding only the
rows it pulled."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from dmlsys.ps.clock import BSP
from dmlsys.ps.wide import (
    MemoryCap,
    MemoryCapExceeded,
    WideConfig,
    WideWorker,
    check_fits,
    features,
    gradients,
    specs,
)
from dmlsys.train import data
from dmlsys.train.errors import DataNotFound
from tests.ps.helpers import each, run_ps

CONFIG = WideConfig(rows=1 << 18)  # a 10 MiB table
CAP = MemoryCap(4 << 20)


@pytest.fixture(scope="module")
def small_ds() -> data.Dataset:
    try:
        return data.load(limit=2048, test_limit=500)
    except DataNotFound as exc:
        pytest.skip(f"Fashion-MNIST not installed: {exc}")


def test_a_full_replica_is_refused_with_an_error_naming_the_cap():
    with pytest.raises(MemoryCapExceeded, match=r"needs 10\.0 MiB .* per-worker memory cap is 4\.0 MiB"):
        check_fits(specs(CONFIG), CAP)


def test_hashed_features_are_in_range_and_the_same_for_the_same_image():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    ids = features(images, CONFIG)
    assert ids.shape == (5, CONFIG.features) and ids.min() >= 0 and ids.max() < CONFIG.rows
    assert np.array_equal(ids, features(images, CONFIG))


def test_the_gradients_match_finite_differences():
    rng = np.random.default_rng(1)
    rows = rng.standard_normal((7, 10)) * 0.1
    inverse = rng.integers(0, 7, 3 * 4)
    bias = rng.standard_normal(10) * 0.1
    labels = np.array([1, 4, 9])
    loss, _, grow, gb = gradients(rows.copy(), inverse, bias.copy(), labels)
    eps = 1e-6
    for r, c in [(0, 0), (3, 4), (6, 9)]:
        bumped = rows.copy()
        bumped[r, c] += eps
        assert abs((gradients(bumped, inverse, bias.copy(), labels)[0] - loss) / eps - grow[r, c]) < 1e-4
    bumped = bias.copy()
    bumped[2] += eps
    assert abs((gradients(rows.copy(), inverse, bumped, labels)[0] - loss) / eps - gb[2]) < 1e-4


def test_the_wide_model_trains_through_the_shards_under_the_cap(small_ds):
    workers, batch, steps = 2, 64, 24
    hp = {"hyperparams": {"optimizer": "adam", "lr": 0.02}}

    async def body(c):
        clients = [c.client(r) for r in range(workers)]
        await asyncio.gather(*(cl.open({"emb": specs(CONFIG)[0], "b": np.zeros(10, np.float32)},
                                       workers=c.worker_names, tables=["emb"], consistency=BSP, optimizer=hp)
                               for cl in clients))
        wide = [WideWorker(cl, CONFIG, CAP) for cl in clients]

        async def work(r):
            for t in range(steps):
                lo = t * batch + r * batch // workers
                hi = t * batch + (r + 1) * batch // workers
                await wide[r].step(t, small_ds.train_images[lo:hi], small_ds.train_labels[lo:hi])

        done = await each([lambda r=r: work(r) for r in range(workers)])
        for d in done:
            assert d is None, d
        accuracy = await wide[0].evaluate(steps, small_ds.test_images, small_ds.test_labels.astype(np.int64))
        return accuracy, [w.peak_bytes for w in wide]

    accuracy, peaks = run_ps(2, workers, body)
    assert accuracy > 0.65, accuracy  # chance is 0.1
    table_bytes = specs(CONFIG)[0].nbytes
    assert all(0 < p <= CAP.bytes < table_bytes for p in peaks), peaks
