"""The end-to-end pipeline on a small slice: cold run, memoized rerun, one model's hyperparameters
changed, and a rerun after the data files were touched and the model store was lost. The runs
are made once per module (training is the slow part) and each test checks one claim."""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dmlsys.workflow import WorkflowFailed
from dmlsys.pipeline import (ModelSpec, PipelineConfig, PipelineError, apply_overrides, run_pipeline,
                             select_top)
from dmlsys.pipeline.cli import add_pipeline_arguments, pipeline_config

pytestmark = pytest.mark.slow

MODELS = (
    ModelSpec("mlp_a", {"kind": "mlp", "hidden": [32]}, {"lr": 2e-3}),
    ModelSpec("mlp_b", {"kind": "mlp", "hidden": [64, 32]}, {"lr": 1e-3}),
    # Two epochs: the slowest training by a margin, so serving starts while it still runs.
    ModelSpec("cnn", {"kind": "cnn", "channels": [8, 16], "dense": 32}, {"lr": 1e-3, "epochs": 2}),
)
TRAINS = ["train_mlp_a", "train_mlp_b", "train_cnn"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from dmlsys.train.data import FILES, find_data_dir
    from dmlsys.train.errors import DataNotFound

    try:
        source = find_data_dir()
    except DataNotFound:
        pytest.skip("Fashion-MNIST is not installed (make data)")
    root = tmp_path_factory.mktemp("pipeline")
    data = root / "data"  # a copy whose files we may touch
    data.mkdir()
    for name in FILES.values():
        shutil.copy(source / name, data / name)
    config = PipelineConfig(models=MODELS, limit=2000, test_limit=500, epochs=1, data_dir=str(data),
                            store=str(root / "models"), cache_root=str(root / "cache"), progress=False)
    out = {"config": config, "cold": run_pipeline(config), "warm": run_pipeline(config)}
    changed = dataclasses.replace(config, models=apply_overrides(MODELS, ["mlp_a.lr=0.003"]))
    out["changed"] = run_pipeline(changed)
    try:  # a model that cannot train: 2,000 samples make no batch of 5,000
        run_pipeline(dataclasses.replace(config, models=apply_overrides(MODELS, ["cnn.batch_size=5000"])))
    except WorkflowFailed as e:
        out["failed"] = e
    # Same bytes, new mtime: ingest must look again; the trainings see identical data.
    st_ = os.stat(data / FILES["test_labels"])
    os.utime(data / FILES["test_labels"], ns=(st_.st_atime_ns, st_.st_mtime_ns + 1_000_000_000))
    shutil.rmtree(root / "models")
    out["touched"] = run_pipeline(dataclasses.replace(changed, serve="local"))
    return out


def test_cold_run_runs_every_step_and_trains_three_models(runs):
    r = runs["cold"]
    assert set(r.report.states().values()) == {"done"}
    assert r.ran() == ["ingest", *TRAINS, "select", "serve", "aggregate"] and r.hits() == []
    assert {m["version"] for m in r.models.values()} == {1}
    assert all(0.1 < m["test_accuracy"] <= 1 for m in r.models.values())


def test_first_model_is_served_while_the_slowest_training_still_runs(runs):
    r = runs["cold"]
    first = r.timeline[0]
    assert len(first["arrived"]) < 3 and sorted(first["serving"]) == sorted(first["arrived"])
    assert first["t"] < r.report["train_cnn"].end
    # Every serve run serves the best two of what had arrived, and the last one saw all three.
    accuracy = {n: {"test_accuracy": m["test_accuracy"]} for n, m in r.models.items()}
    for ev in r.timeline:
        assert ev["serving"] == select_top({n: accuracy[n] for n in ev["arrived"]}, 2)
    assert sorted(r.timeline[-1]["arrived"]) == sorted(accuracy)
    assert [s["name"] for s in r.serving] == select_top(accuracy, 2)


def test_ensemble_combines_predictions_of_both_served_models(runs):
    r = runs["cold"]
    e = r.ensemble
    served = [s["name"] for s in r.serving]
    assert e["n"] == 500 and sorted(e["predictions"]) == sorted(served)
    assert all(p.shape == (500,) and p.min() >= 0 and p.max() <= 9 for p in e["predictions"].values())
    assert 0 <= e["ensemble_accuracy"] <= 1 and 0 <= e["agreement"] <= 1
    a, b = (e["predictions"][n] for n in served)
    assert e["agreement"] == pytest.approx(np.mean(a == b))
    # The ensemble follows the two models wherever they agree.
    assert np.array_equal(e["ensemble_predictions"][a == b], a[a == b])
    for name in served:  # predictions through the replicas match what the trainer measured
        assert abs(e["accuracy"][name] - r.models[name]["test_accuracy"]) <= 0.01
    assert e["http"]["same_classes"] == e["http"]["instances"] == 8  # the HTTP front door agrees


def test_rerun_with_unchanged_data_hits_the_cache_for_ingest_and_training(runs):
    r = runs["warm"]
    assert r.hits() == ["ingest", *TRAINS]
    assert r.ran() == ["select", "serve", "aggregate"]
    assert r.serving == runs["cold"].serving
    np.testing.assert_array_equal(r.ensemble["ensemble_predictions"], runs["cold"].ensemble["ensemble_predictions"])


def test_changing_one_models_hyperparameters_retrains_only_that_model(runs):
    r = runs["changed"]
    assert r.ran() == ["train_mlp_a", "select", "serve", "aggregate"]
    assert r.hits() == ["ingest", "train_mlp_b", "train_cnn"]
    assert r.models["mlp_a"]["version"] == 2 and r.models["mlp_a"]["train"] == "trained"


def test_a_model_that_fails_to_train_does_not_stop_the_others_being_served(runs):
    e = runs.get("failed")
    assert e is not None and set(e.errors) == {"train_cnn"} and "no batch of 5000" in str(e)
    r = e.result
    assert r.report["train_cnn"].state == "failed" and r.report.hits() == ["ingest", "train_mlp_a", "train_mlp_b"]
    assert sorted(s["name"] for s in r["serve"]["serving"]) == ["mlp_a", "mlp_b"]
    assert 0 <= r["aggregate"]["ensemble_accuracy"] <= 1


def test_touched_data_reruns_ingest_and_a_lost_store_is_republished(runs):
    r = runs["touched"]
    assert r.report["ingest"].cache == "miss"
    assert r.hits() == TRAINS  # same content: same data fingerprint, so no retraining
    served = [s["name"] for s in r.serving]
    assert served == [s["name"] for s in runs["changed"].serving]
    assert all(s["version"] == 1 for s in r.serving)  # saved again into the empty store
    assert 0 <= r.ensemble["ensemble_accuracy"] <= 1 and r.ensemble["http"] is None  # in-process fallback
    for name in served:
        assert abs(r.ensemble["accuracy"][name] - runs["changed"].ensemble["accuracy"][name]) <= 0.01


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from([0.5, 0.7, 0.9, 0.91]), min_size=1, max_size=6), st.integers(1, 6))
def test_select_top_picks_the_best_k_and_breaks_ties_by_arrival(accs, k):
    trained = {f"m{i}": {"test_accuracy": a} for i, a in enumerate(accs)}
    chosen = select_top(trained, k)
    assert len(chosen) == min(k, len(accs)) and len(set(chosen)) == len(chosen)
    rest = [n for n in trained if n not in chosen]
    assert all(trained[c]["test_accuracy"] >= trained[o]["test_accuracy"] for c in chosen for o in rest)
    for a, b in zip(chosen, chosen[1:]):  # best first; among equals, the earlier arrival first
        ta, tb = trained[a]["test_accuracy"], trained[b]["test_accuracy"]
        assert ta > tb or (ta == tb and int(a[1:]) < int(b[1:]))
    for c in chosen:  # an equal model that arrived later never displaces an earlier one
        assert all(int(o[1:]) > int(c[1:]) for o in rest if trained[o]["test_accuracy"] == trained[c]["test_accuracy"])


def test_overrides_change_one_model_and_name_what_is_wrong():
    models = apply_overrides(MODELS, ["cnn.lr=0.002", "mlp_a.hidden=[16, 8]", "cnn.optimizer=sgd"])
    assert models[2].hyperparams == {"lr": 0.002, "epochs": 2, "optimizer": "sgd"}
    assert models[0].arch == {"kind": "mlp", "hidden": [16, 8]} and models[1] == MODELS[1]
    with pytest.raises(PipelineError, match="no model 'vit'"):
        apply_overrides(MODELS, ["vit.lr=1"])
    with pytest.raises(PipelineError, match="MODEL.KEY=VALUE"):
        apply_overrides(MODELS, ["cnn=3"])
    with pytest.raises(PipelineError, match="model 'cnn'"):
        PipelineConfig(models=apply_overrides(MODELS, ["cnn.optimizer=rmsprop"])).normalized_models()
    with pytest.raises(PipelineError, match="top=4"):
        PipelineConfig(models=MODELS, top=4).validate()
    with pytest.raises(PipelineError, match="unique"):
        PipelineConfig(models=MODELS + MODELS[:1]).validate()


def test_normalized_models_make_spelled_out_defaults_the_same_key():
    plain = PipelineConfig(models=(ModelSpec("m", {"kind": "mlp"}),), epochs=3).normalized_models()
    spelled = PipelineConfig(models=(ModelSpec("m", {"kind": "mlp", "hidden": [256, 128]},
                                               {"epochs": 3, "optimizer": "adam"}),)).normalized_models()
    assert plain == spelled


def test_cli_options_build_the_config():
    ap = argparse.ArgumentParser()
    add_pipeline_arguments(ap)
    c = pipeline_config(ap.parse_args(["--limit", "2000", "--epochs", "1", "--hp", "cnn.lr=0.01", "--serve", "local"]))
    assert (c.limit, c.test_limit, c.epochs, c.serve) == (2000, 500, 1, "local")
    assert dict(c.models[2].hyperparams)["lr"] == 0.01
    assert pipeline_config(ap.parse_args([])).limit is None


def test_the_collective_trainer_trains_each_model_data_parallel_on_its_worker_nodes(runs, tmp_path):
    """trainer="workers": each model on its own group of 2 worker nodes (ring allreduce over
    ZeroMQ); the store's cards say so, and the models are served and ensembled as usual."""
    from dmlsys.train.store import ModelStore

    cold = runs["config"]
    config = dataclasses.replace(cold, models=MODELS[:2], top=1, trainer="workers", workers=2, serve="local",
                                 store=str(tmp_path / "models"), cache_root=str(tmp_path / "cache"))
    r = run_pipeline(config)
    assert r.ran() == ["ingest", "train_mlp_a", "train_mlp_b", "select", "serve", "aggregate"]
    store = ModelStore(config.store)
    for name in ("mlp_a", "mlp_b"):
        card = store.card(f"pipeline-{name}", r.models[name]["version"])
        assert card["world_size"] == 2
        assert 0.1 < r.models[name]["test_accuracy"] <= 1
    assert [s["name"] for s in r.serving] == select_top({n: m for n, m in r.models.items()}, 1)
