"""The whole section-10 pipeline on the simulated network: the serving fleet's gateway and
replicas (and, with the workers trainer, the worker groups) are built by the assembly point on
``SimTransports`` and run in this process on virtual time. Tiny data, seeded, replayable."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from dmlsys.assembly import SimTransports
from dmlsys.pipeline import ModelSpec, PipelineConfig, run_pipeline, run_pipeline_async
from dmlsys.wire import sim
from dmlsys.wire.sim import SimNetwork

pytestmark = pytest.mark.slow

MODELS = (
    ModelSpec("a", {"kind": "mlp", "hidden": [16]}, {"lr": 3e-3, "batch_size": 50}),
    ModelSpec("b", {"kind": "mlp", "hidden": [8]}, {"lr": 3e-3, "batch_size": 50}),
)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from dmlsys.train.data import FILES, find_data_dir
    from dmlsys.train.errors import DataNotFound

    try:
        source = find_data_dir()
    except DataNotFound:
        pytest.skip("Fashion-MNIST is not installed (make data)")
    data = tmp_path_factory.mktemp("fmnist")
    for name in FILES.values():
        shutil.copy(source / name, data / name)
    return str(data)


def config(root, data_dir, **kw) -> PipelineConfig:
    return PipelineConfig(models=MODELS, limit=300, test_limit=100, epochs=1, top=2, data_dir=data_dir,
                          store=str(root / "models"), cache_root=str(root / "cache"), progress=False, **kw)


def run_on_sim(seed: int, cfg: PipelineConfig):
    net = SimNetwork(seed)
    return sim.run(run_pipeline_async(cfg, transports=SimTransports(net))), net


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir):
    first, second = tmp_path_factory.mktemp("sim1"), tmp_path_factory.mktemp("sim2")
    out = {}
    out["sim"], out["net"] = run_on_sim(7, config(first, data_dir))
    out["replay"], out["replay_net"] = run_on_sim(7, config(second, data_dir))
    # The same trained models, served in-process without any network: the reference answers.
    out["local"] = run_pipeline(config(first, data_dir, serve="local"))
    return out


def test_every_step_runs_and_both_models_are_served_on_the_simulated_network(runs):
    r = runs["sim"]
    assert set(r.report.states().values()) == {"done"}
    assert sorted(s["name"] for s in r.serving) == ["a", "b"]
    assert r.ensemble["n"] == 100 and r.ensemble["http"] is None  # no HTTP door on the simulation


def test_predictions_travel_gateway_to_replica_over_the_simulated_network(runs):
    delivered = {(d.src, d.dst) for d in runs["net"].trace if d.event == "deliver"}
    replicas = {dst for src, dst in delivered if src == "gateway" and dst.startswith("replica-")}
    assert {name.rsplit("-v", 1)[0] for name in replicas} == {"replica-pipeline-a", "replica-pipeline-b"}
    assert {(r, "gateway") for r in replicas} <= delivered  # and the answers came back


def test_answers_through_the_simulated_fleet_equal_the_in_process_models(runs):
    sim_run, local = runs["sim"], runs["local"]
    assert local.hits() and "train_a" in local.hits()  # the same trained models, from the cache
    for name in ("a", "b"):
        np.testing.assert_array_equal(sim_run.ensemble["predictions"][name], local.ensemble["predictions"][name])
    assert sim_run.ensemble["ensemble_accuracy"] == local.ensemble["ensemble_accuracy"]


def test_the_same_seed_replays_the_same_run(runs):
    a, b = runs["sim"], runs["replay"]
    assert a.ensemble["accuracy"] == b.ensemble["accuracy"]
    assert [(d.src, d.dst, d.event) for d in runs["net"].trace] == \
        [(d.src, d.dst, d.event) for d in runs["replay_net"].trace]
