"""The ``ps-worker`` role on the simulated network: ``train_via_ps`` trains a model on two
worker nodes through two shards, rank 0 saves it, and a bad request names its field."""

from __future__ import annotations

import tempfile
import types
from pathlib import Path

import pytest

from dmlsys.node import Node, RemoteError
from dmlsys.ps.roles import build_ps_worker
from dmlsys.ps.server import PsConfig, PsService
from dmlsys.ps.worker import PsTrainingService, train_via_ps
from dmlsys.train import data
from dmlsys.train.errors import DataNotFound
from dmlsys.train.store import ModelStore
from dmlsys.wire import sim
from dmlsys.wire.sim import SimNetwork


@pytest.fixture(scope="module")
def small_ds() -> data.Dataset:
    try:
        return data.load(limit=1024, test_limit=300)
    except DataNotFound as exc:
        pytest.skip(f"Fashion-MNIST not installed: {exc}")


def cluster(body, ds):
    async def main():
        with tempfile.TemporaryDirectory(prefix="dmlsys-psw-") as tmp:
            net = SimNetwork(3)
            nodes = []
            for i in range(2):
                n = Node(f"ps{i}", net.transport(f"ps{i}"), admin=None)
                n.add_service(PsService(PsConfig(str(Path(tmp) / f"ps{i}"), fsync=False)))
                nodes.append(n)
            for i in range(2):
                n = Node(f"w{i}", net.transport(f"w{i}"), admin=None)
                n.add_service(PsTrainingService(str(Path(tmp) / "models"), offload=False,
                                                load_dataset=lambda limit, test_limit: ds))
                nodes.append(n)
            driver = Node("driver", net.transport("driver"), admin=None)
            nodes.append(driver)
            for n in nodes:
                await n.start()
            try:
                return await body(driver, Path(tmp) / "models")
            finally:
                for n in nodes:
                    await n.stop(drain_timeout=0.1)

    return sim.run(main())


def test_train_via_ps_trains_on_two_workers_and_rank_0_saves_the_model(small_ds):
    async def body(driver, store):
        result = await train_via_ps(driver, ["w0", "w1"], ["ps0", "ps1"], model="fm-ps", arch={"kind": "mlp", "hidden": [16]},
                                    hyperparams={"lr": 1e-3, "batch_size": 64, "epochs": 1}, consistency="ssp",
                                    staleness=2)
        return result, ModelStore(store).card("fm-ps", result["version"])

    result, card = cluster(body, small_ds)
    assert result["via"] == "ps" and result["workers"] == ["w0", "w1"] and len(result["history"]) == 1
    assert card["via"] == "ps" and card["consistency"] == "ssp" and card["staleness"] == 2
    assert card["test_accuracy"] == result["test_accuracy"] > 0.3


def test_a_bad_request_names_the_field(small_ds):
    async def body(driver, store):
        with pytest.raises(RemoteError, match="shards: a list of node names"):
            await driver.call("w0", "train", "run", {"job": "j", "members": ["w0"], "model": "m", "arch": {},
                                                      "hyperparams": {}, "shards": "ps0"}, timeout=5)
        with pytest.raises(RemoteError, match="staleness: an integer >= 0"):
            await driver.call("w0", "train", "run", {"job": "j", "members": ["w0"], "model": "m", "arch": {},
                                                      "hyperparams": {}, "shards": ["ps0"], "consistency": "ssp",
                                                      "staleness": -1}, timeout=5)

    cluster(body, small_ds)


def test_the_ps_worker_role_refuses_an_unknown_key(tmp_path):
    from dmlsys.node import ConfigError

    with pytest.raises(ConfigError, match="unknown key"):
        build_ps_worker(types.SimpleNamespace(config={"limit": 3}, store=tmp_path))
    (service,) = build_ps_worker(types.SimpleNamespace(config={}, store=tmp_path))
    assert isinstance(service, PsTrainingService) and service.name == "train"
