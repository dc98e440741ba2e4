"""``python -m dmlsys.cluster train MODEL --via ps`` in real processes: ``up`` a spec with two
``ps`` shards and two ``ps-worker`` nodes, train a tiny MLP on a few hundred samples under SSP(2)
through the CLI, and find the version in the store with a card that says how it was trained;
the flags' errors name the flag; the shipped ``cluster/ps.toml`` parses."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dmlsys.cluster.__main__ import cmd_train, ps_options, train_ps_with_progress
from dmlsys.cluster.errors import CliError
from dmlsys.cluster.spec import load
from dmlsys.train import data
from dmlsys.train.errors import DataNotFound

ROOT = Path(__file__).resolve().parents[2]

SPEC = """
[cluster]
name = "pstest"
store = "{store}"

[cluster.train.tiny]
arch = {{ kind = "mlp", hidden = [16] }}
epochs = 1
batch_size = 64

[hosts.local]
address = "127.0.0.1"

[[nodes]]
name = "ps"
role = "ps"
replicas = 2
[nodes.config]
fsync = false

[[nodes]]
name = "psworker"
role = "ps-worker"
replicas = 2
[nodes.config]
single_thread = true
"""


def _args(**kw) -> argparse.Namespace:
    base = {"consistency": "bsp", "staleness": None, "epochs": None, "limit": None, "test_limit": None}
    return argparse.Namespace(**{**base, **kw})


def test_ps_options_defaults_and_errors_name_the_flag():
    assert ps_options(_args(consistency="ssp"))["staleness"] == 2
    assert ps_options(_args(consistency="ssp", staleness=0))["staleness"] == 0
    assert ps_options(_args())["staleness"] == 0
    with pytest.raises(CliError, match="--staleness 3: only with --consistency ssp"):
        ps_options(_args(consistency="bsp", staleness=3))
    with pytest.raises(CliError, match="--staleness"):
        ps_options(_args(consistency="ssp", staleness=-1))
    with pytest.raises(CliError, match="--test-limit"):
        ps_options(_args(test_limit=0))


def test_ps_flags_without_via_ps_are_refused_naming_them(tmp_path):
    args = _args(model="m", via="allreduce", epochs=1, consistency="ssp")
    with pytest.raises(CliError, match="--epochs, --consistency: only with --via ps"):
        cmd_train(args, tmp_path)
    with pytest.raises(CliError, match="no cluster is running"):  # the flags are fine: on to the cluster
        cmd_train(_args(model="m", via="allreduce"), tmp_path)


def test_shipped_spec_has_shards_workers_and_recipes():
    spec = load(ROOT / "cluster" / "ps.toml")
    roles = {n.role: n.replicas for n in spec.nodes}
    assert roles == {"ps": 2, "ps-worker": 2}
    assert {"fashion-mlp", "fashion-cnn"} <= set(spec.train)


@pytest.mark.slow
def test_train_via_ps_through_the_cli_in_real_processes(tmp_path):
    try:
        data.load(limit=10, test_limit=10)
    except DataNotFound as exc:
        pytest.skip(f"Fashion-MNIST not installed: {exc}")
    (tmp_path / "spec.toml").write_text(SPEC.format(store=tmp_path / "models"))
    env = {**os.environ, "DMLSYS_STATE_DIR": str(tmp_path / "state")}

    def cli(*args: str, timeout: float) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "dmlsys.cluster", *args], cwd=ROOT, env=env, timeout=timeout,
                              capture_output=True, text=True, check=False)

    up = cli("up", str(tmp_path / "spec.toml"), "--detach", timeout=120)
    assert up.returncode == 0, up.stdout + up.stderr
    try:
        out = cli("train", "tiny", "--via", "ps", "--consistency", "ssp", "--limit", "300", "--test-limit", "200",
                  timeout=180)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "trained tiny version 1" in out.stdout and "ssp s=2" in out.stdout, out.stdout
        bad = cli("train", "nope", "--via", "ps", timeout=60)
        assert bad.returncode != 0 and "cluster.train.nope" in bad.stdout + bad.stderr
    finally:
        down = cli("down", timeout=60)
    assert down.returncode == 0, down.stdout + down.stderr
    card = json.loads((tmp_path / "models" / "tiny" / "1" / "card.json").read_text())
    assert card["via"] == "ps" and card["consistency"] == "ssp" and card["staleness"] == 2
    assert card["shards"] == 2


def test_train_via_ps_refuses_a_multi_host_spec_naming_it(tmp_path):
    spec = tmp_path / "two.toml"
    spec.write_text('[cluster]\nname = "t"\nsupervisor = "tcp://10.0.0.1:7000"\n'
                    '[hosts.alpha]\naddress = "10.0.0.1"\n[hosts.beta]\naddress = "10.0.0.2"\n'
                    '[[nodes]]\nname = "shard"\nrole = "ps"\nhost = "alpha"\n'
                    '[[nodes]]\nname = "w"\nrole = "ps-worker"\nreplicas = 2\nhosts = ["alpha", "beta"]\n')
    doc = {"spec": str(spec), "nodes": []}
    with pytest.raises(CliError, match=r"two\.toml: train --via ps runs on a single-host spec only.*alpha, beta"):
        asyncio.run(train_ps_with_progress(doc, "tiny"))
