"""Training Fashion-MNIST through parameter servers on the simulated network: the model learns,
the card records the mode, and BSP through the shards gives the collective trainer's parameters."""

from __future__ import annotations

import asyncio
import dataclasses

import numpy as np
import pytest

from dmlsys.ps.clock import BSP, ssp
from dmlsys.ps.trainer import PsTrainer
from dmlsys.train import data
from dmlsys.train.errors import DataNotFound
from dmlsys.train.store import ModelStore
from dmlsys.train.trainer import Hyperparams, Trainer
from tests.ps.helpers import each, run_ps

ARCH = {"kind": "mlp", "hidden": [32]}


@pytest.fixture(scope="module")
def small_ds() -> data.Dataset:
    try:
        return data.load(limit=1536, test_limit=500)
    except DataNotFound as exc:
        pytest.skip(f"Fashion-MNIST not installed: {exc}")


def train(ds, consistency, hp, store=None, workers=2, shards=2):
    async def body(c):
        trainers = [PsTrainer(ARCH, hp, node=c.worker_nodes[r], shards=c.shard_names, workers=c.worker_names,
                              job="fmnist", consistency=consistency, progress=False, offload=False,
                              store=store if r == 0 else None) for r in range(workers)]
        return await each([lambda t=t: t.fit(ds) for t in trainers])

    return run_ps(shards, workers, body)


@pytest.mark.parametrize("consistency", [BSP, ssp(2)], ids=["bsp", "ssp2"])
def test_an_mlp_learns_through_two_shards_and_its_card_says_how(small_ds, tmp_path, consistency):
    hp = Hyperparams(lr=1e-3, batch_size=64, epochs=2)
    results = train(small_ds, consistency, hp, store=ModelStore(tmp_path))
    for r in results:
        assert not isinstance(r, BaseException), r
    card = results[0].card
    assert card["test_accuracy"] > 0.65, card["test_accuracy"]  # chance is 0.1; 48 small steps
    assert card["via"] == "ps" and card["consistency"] == consistency.model and card["shards"] == 2
    assert card["world_size"] == 2 and card["version"] == results[0].version
    _, saved = ModelStore(tmp_path).load("fmnist-mlp")
    assert saved["test_accuracy"] == card["test_accuracy"]


def test_bsp_through_the_shards_computes_what_the_collective_trainer_computes(small_ds):
    ds = dataclasses.replace(small_ds, train_images=small_ds.train_images[:768], train_labels=small_ds.train_labels[:768],
                             test_images=small_ds.test_images[:100], test_labels=small_ds.test_labels[:100])
    hp = Hyperparams(lr=1e-3, batch_size=128, epochs=1)
    ps = train(ds, BSP, hp, workers=3)
    assert not isinstance(ps[0], BaseException), ps[0]
    local = asyncio.run(Trainer(ARCH, hp, progress=False).fit(ds, resume=False))
    for path in ("dense0", "out"):
        for leaf in ("w", "b"):
            np.testing.assert_allclose(ps[0].params[path][leaf], local.params[path][leaf], rtol=1e-3, atol=2e-5)
