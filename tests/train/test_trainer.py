"""The trainer: it learns, N workers equal one, resume equals uninterrupted, the store gets a card."""

from __future__ import annotations

import asyncio
import dataclasses

import jax
import numpy as np
import pytest

from dmlsys.train import models
from dmlsys.train.errors import CheckpointError, TrainError
from dmlsys.train.group import InProcessGroup, LocalGroup
from dmlsys.train.store import ModelStore, flatten
from dmlsys.train.trainer import Hyperparams, Trainer, train_model

MLP = {"kind": "mlp", "hidden": [64]}


def leaves(params) -> dict[str, np.ndarray]:
    return flatten(jax.device_get(params))


def test_a_short_run_learns_far_above_chance(small_ds, tmp_path):
    store = ModelStore(tmp_path)
    result = train_model(MLP, Hyperparams(lr=2e-3, batch_size=64, epochs=3), dataset=small_ds,
                         store=store, model_name="tiny", progress=False)
    losses = [h.loss for h in result.history]
    assert losses[-1] < losses[0] * 0.8
    assert result.history[-1].test_accuracy > 0.7  # chance is 0.1
    assert result.version == 1
    card = store.card("tiny")
    assert card["test_accuracy"] == result.history[-1].test_accuracy
    assert card["data_fingerprint"] == small_ds.fingerprint
    assert card["arch"] == models.build(MLP).arch and card["hyperparams"]["batch_size"] == 64
    # what serving does: rebuild from the card, apply the stored params
    params, card = store.load("tiny")
    logits = jax.jit(models.build(card["arch"]).apply)(params, small_ds.test_images[:500] / np.float32(255))
    acc = float((np.argmax(logits, -1) == small_ds.test_labels[:500]).mean())
    assert abs(acc - card["test_accuracy"]) < 0.05


async def run_group(size: int, ds, hp: Hyperparams, epochs: int):
    groups = InProcessGroup.create(size)
    return await asyncio.gather(*(Trainer(MLP, hp, group=g, progress=False).fit(ds, epochs) for g in groups))


@pytest.mark.parametrize("size", [2, 3])
def test_n_workers_reach_the_parameters_of_one_worker_with_the_same_global_batch(small_ds, size):
    ds = small_ds.subset(640, 300)
    hp = Hyperparams(lr=1e-3, batch_size=64, epochs=1, augment=True)  # 10 steps; 64/3 makes uneven shards
    (single,) = asyncio.run(run_group(1, ds, hp, 1))
    workers = asyncio.run(run_group(size, ds, hp, 1))
    ref = leaves(single.params)
    for w in workers:
        for key, value in leaves(w.params).items():
            np.testing.assert_allclose(value, ref[key], rtol=1e-4, atol=1e-5, err_msg=key)
    # replicas are bitwise identical, not merely close
    for w in workers[1:]:
        for key, value in leaves(w.params).items():
            assert value.tobytes() == leaves(workers[0].params)[key].tobytes(), key
    assert workers[0].history[0].test_accuracy == pytest.approx(single.history[0].test_accuracy, abs=0.01)


def test_resumed_run_equals_the_uninterrupted_run(small_ds, tmp_path):
    ds = small_ds.subset(1000, 200)
    hp = Hyperparams(batch_size=100, epochs=3, schedule="cosine", augment=True)
    full = train_model(MLP, hp, dataset=ds, progress=False)
    ckpt = tmp_path / "ckpt"
    first = train_model(MLP, hp, dataset=ds, epochs=1, checkpoint_dir=ckpt, progress=False)
    assert [h.epoch for h in first.history] == [1]
    rest = train_model(MLP, hp, dataset=ds, checkpoint_dir=ckpt, progress=False)
    assert [h.epoch for h in rest.history] == [2, 3]
    for key, value in leaves(rest.params).items():
        np.testing.assert_array_equal(value, leaves(full.params)[key], err_msg=key)
    assert rest.history[-1].loss == pytest.approx(full.history[-1].loss, rel=1e-6)


def test_checkpoint_of_other_hyperparameters_is_refused(small_ds, tmp_path):
    ds = small_ds.subset(200, 100)
    train_model(MLP, Hyperparams(batch_size=100, epochs=1), dataset=ds, checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(CheckpointError, match="checkpoint.npz: written for"):
        train_model(MLP, Hyperparams(batch_size=50, epochs=2), dataset=ds, checkpoint_dir=tmp_path, progress=False)


def test_resumed_replicas_start_from_rank_zeros_checkpoint(small_ds, tmp_path):
    ds = small_ds.subset(400, 100)
    hp = Hyperparams(batch_size=100, epochs=2)
    train_model(MLP, hp, dataset=ds, epochs=1, checkpoint_dir=tmp_path, progress=False)
    groups = InProcessGroup.create(2)

    async def both():
        # only rank 0 is given the checkpoint directory; rank 1 learns the state by broadcast
        return await asyncio.gather(
            Trainer(MLP, hp, group=groups[0], checkpoint_dir=tmp_path, progress=False).fit(ds),
            Trainer(MLP, hp, group=groups[1], progress=False).fit(ds))

    r0, r1 = asyncio.run(both())
    assert [h.epoch for h in r0.history] == [h.epoch for h in r1.history] == [2]
    for key, value in leaves(r0.params).items():
        assert value.tobytes() == leaves(r1.params)[key].tobytes(), key


def test_global_batch_smaller_than_the_group_is_refused(small_ds):
    groups = InProcessGroup.create(4)
    with pytest.raises(TrainError, match="global batch 2 is smaller than the group \\(4 workers\\)"):
        asyncio.run(Trainer(MLP, Hyperparams(batch_size=2), group=groups[0], progress=False).fit(small_ds))


def test_invalid_hyperparameters_name_the_choices():
    with pytest.raises(TrainError, match="unknown optimizer 'adagrad'; known: adam, sgd, momentum"):
        Hyperparams(optimizer="adagrad")
    with pytest.raises(TrainError, match="epochs >= 1"):
        dataclasses.replace(Hyperparams(), epochs=0)


def test_local_group_is_the_identity():
    g = LocalGroup()
    tree = [np.arange(3)]
    assert asyncio.run(g.allreduce(tree)) is tree and asyncio.run(g.broadcast(tree)) is tree
    assert (g.rank, g.size) == (0, 1)


def test_in_process_group_sums_and_broadcasts_identically_on_every_rank():
    groups = InProcessGroup.create(3)

    async def go():
        sums = await asyncio.gather(*(g.allreduce({"a": np.full(2, g.rank + 1.0)}) for g in groups))
        maxes = await asyncio.gather(*(g.allreduce([np.array(g.rank)], "max") for g in groups))
        got = await asyncio.gather(*(g.broadcast([np.array(g.rank)], root=2) for g in groups))
        return sums, maxes, got

    sums, maxes, got = asyncio.run(go())
    assert all(np.array_equal(s["a"], [6.0, 6.0]) for s in sums)
    assert all(m[0] == 2 for m in maxes) and all(b[0] == 2 for b in got)


def test_in_process_group_names_the_rank_that_never_arrives():
    groups = InProcessGroup.create(3, timeout=0.05)

    async def go():
        return await asyncio.gather(*(g.allreduce([np.ones(1)]) for g in groups[:2]), return_exceptions=True)

    errors = asyncio.run(go())
    assert all(isinstance(e, TrainError) and "rank(s) [2]" in str(e) for e in errors)


def test_unreadable_checkpoint_says_how_to_start_afresh(small_ds, tmp_path):
    (tmp_path / "checkpoint.npz").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="checkpoint.npz: unreadable checkpoint .* delete it"):
        train_model(MLP, Hyperparams(batch_size=100, epochs=1), dataset=small_ds.subset(200, 100),
                    checkpoint_dir=tmp_path, progress=False)


def test_cli_trains_and_writes_the_epoch_rows(small_ds, tmp_path, capsys):
    import json

    from dmlsys.train.__main__ import main

    out = tmp_path / "run.json"
    rc = main(["--hidden", "32", "--limit", "300", "--test-limit", "100", "--epochs", "2", "--batch", "50",
               "--store", str(tmp_path / "store"), "--name", "cli", "--no-progress", "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert [h["epoch"] for h in report["history"]] == [1, 2] and report["card"]["version"] == 1
    assert "saved cli version 1" in capsys.readouterr().out
    assert main(["--arch-json", '{"kind": "rnn"}']) == 1
