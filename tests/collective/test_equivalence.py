"""Data parallelism changes nothing but speed: N workers with the real ProcessGroup (over
ZeroMQ sockets) and global batch B end with the parameters one worker reaches with batch B."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from dmlsys.collective import CollectiveService, ProcessGroup
from dmlsys.train import data
from dmlsys.train.errors import DataNotFound
from dmlsys.train.store import flatten
from dmlsys.train.trainer import Hyperparams, Trainer
from tests.node.helpers import Net

ARCH = {"kind": "mlp", "hidden": [32]}
HP = Hyperparams(lr=3e-3, batch_size=60, epochs=2, seed=3)
STEPS_PER_EPOCH = 4

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dataset():
    try:
        return data.load(limit=HP.batch_size * STEPS_PER_EPOCH, test_limit=120)
    except DataNotFound as e:
        pytest.skip(f"Fashion-MNIST not installed: {e}")


def train_alone(dataset):
    return asyncio.run(Trainer(ARCH, HP, progress=False).fit(dataset))


def train_on(n: int, dataset):
    net = Net("zmq")

    async def main():
        names = [f"w{i}" for i in range(n)]
        nodes = [await net.node(name, CollectiveService()) for name in names]
        groups = [ProcessGroup(node, names, timeout=60) for node in nodes]
        return await asyncio.gather(*(Trainer(ARCH, HP, group=g, progress=False).fit(dataset) for g in groups))

    return net.run(main)


@pytest.mark.parametrize("n", [2, 3])
def test_n_workers_reach_the_parameters_of_one_worker_with_the_same_global_batch(n, dataset):
    one = train_alone(dataset)
    alone = flatten(one.params)
    results = train_on(n, dataset)
    ranks = [flatten(r.params) for r in results]
    for key, value in alone.items():
        for rank, params in enumerate(ranks):
            # replicas never drift: the ring hands every rank the same bits
            assert params[key].tobytes() == ranks[0][key].tobytes(), f"rank {rank} differs at {key}"
        # one worker sums its batch in another order than the ring: float rounding, no more
        np.testing.assert_allclose(ranks[0][key], value, rtol=1e-4, atol=1e-5, err_msg=key)
    for mine, theirs in zip(results[0].history, one.history):
        assert mine.loss == pytest.approx(theirs.loss, rel=1e-4)
        assert mine.test_accuracy == pytest.approx(theirs.test_accuracy, abs=1 / 120)
    # and training moved the parameters: the comparison above is not between two inits
    init = flatten(asyncio.run(Trainer(ARCH, HP, progress=False).fit(dataset, 0)).params)
    assert any(not np.allclose(alone[k], init[k], rtol=1e-3) for k in alone)
