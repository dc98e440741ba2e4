"""experiments/ps_vs_allreduce.py end to end on a tiny configuration (a small MLP, 256 images, a
10 MiB wide table under a 4 MiB cap): every row of its --json output has the issue's schema, the
collective's refusal of the large model has step_ms null and an "error" naming the cap, and the
parameter servers train the large model."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from dmlsys.train import data
from dmlsys.train.errors import DataNotFound

pytestmark = pytest.mark.slow  # ~20 s of CPU: the collective's trainer compiles its own functions

SCRIPT = Path(__file__).resolve().parents[2] / "experiments" / "ps_vs_allreduce.py"
KEYS = {"model", "via", "consistency", "workers", "shards", "step_ms", "bytes_per_step", "accuracy"}


@pytest.fixture(scope="module")
def experiment():
    try:
        data.load(limit=256, test_limit=100)
    except DataNotFound as exc:
        pytest.skip(f"Fashion-MNIST not installed: {exc}")
    spec = importlib.util.spec_from_file_location("ps_vs_allreduce", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_tiny_run_writes_the_issues_rows(experiment, tmp_path, monkeypatch):
    monkeypatch.setitem(experiment.ARCHS, "mlp", {"kind": "mlp", "hidden": [16]})  # compiles in a blink
    out = tmp_path / "rows.json"
    monkeypatch.setattr(sys, "argv", [
        str(SCRIPT), "--models", "mlp", "--slow-model", "mlp", "--epochs", "1", "--batch-size", "64",
        "--limit", "256", "--test-limit", "100", "--wide-rows", str(1 << 18), "--memory-cap", str(4 << 20),
        "--json", str(out), "--plot", str(tmp_path / "rows.png")])
    experiment.main()
    rows = json.loads(out.read_text())

    for r in rows:
        assert KEYS <= set(r), r
        assert r["via"] in ("allreduce", "ps") and r["workers"] == 2
        assert r["consistency"] in ({None} if r["via"] == "allreduce" else {"bsp", "ssp", "asp"}), r
        assert (r["shards"] is None) == (r["via"] == "allreduce"), r
        if "error" not in r:
            assert r["step_ms"] > 0 and r["bytes_per_step"] > 0 and 0 <= r["accuracy"] <= 1, r
    seen = {(r["model"], r["via"], r["consistency"], r["shards"]) for r in rows}
    assert {("mlp", "allreduce", None, None), ("mlp", "ps", "bsp", 1), ("mlp", "ps", "ssp", 1),
            ("mlp", "ps", "bsp", 2), ("mlp", "ps", "ssp", 2), ("mlp", "ps", "bsp", 4),
            ("mlp (w1 slowed 2x)", "ps", "bsp", 2), ("mlp (w1 slowed 2x)", "ps", "ssp", 2),
            ("mlp (a random worker slowed 2x each step)", "ps", "bsp", 2),
            ("mlp (a random worker slowed 2x each step)", "ps", "ssp", 2),
            ("wide", "ps", "bsp", 2)} <= seen

    refused = [r for r in rows if "error" in r]
    assert [(r["model"], r["via"]) for r in refused] == [("wide", "allreduce")]
    assert refused[0]["step_ms"] is None and refused[0]["accuracy"] is None
    assert "per-worker memory cap is 4.0 MiB" in refused[0]["error"]
    wide = next(r for r in rows if r["model"] == "wide" and r["via"] == "ps")
    assert wide["peak_worker_bytes"] <= 4 << 20 and wide["accuracy"] > 0.2
    # BSP through the shards computes what the collective does: same accuracy after the same steps
    acc = {(r["via"], r["consistency"], r["shards"]): r["accuracy"] for r in rows if r["model"] == "mlp"}
    assert acc[("ps", "bsp", 1)] == acc[("ps", "bsp", 2)] == acc[("allreduce", None, None)]
    if importlib.util.find_spec("matplotlib") is not None:  # a bench extra: without it the figure is skipped
        assert (tmp_path / "rows.png").stat().st_size > 0
