"""The per-worker memory cap (``dmlsys.train.memory``): the collective's workers refuse a model
whose full replica exceeds it, naming the cap, before loading any data; models under it pass
the check; the wide model's size from its arch equals the parameter servers' specs."""

from __future__ import annotations

import tempfile

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dmlsys.collective.roles import TrainingService, WorkerConfig, worker_config
from dmlsys.node import ConfigError, Node, RemoteError
from dmlsys.ps import wide
from dmlsys.train.memory import MemoryCap, MemoryCapExceeded, check_fits, param_bytes
from dmlsys.wire import sim
from dmlsys.wire.sim import SimNetwork


@given(st.integers(1, 1 << 24))
def test_wide_param_bytes_equal_the_parameter_servers_specs(rows):
    config = wide.WideConfig(rows=rows)
    assert param_bytes({"kind": "wide", "rows": rows}) == sum(s.nbytes for s in wide.specs(config))


@given(st.integers(1, 1 << 30), st.integers(1, 1 << 30))
def test_check_fits_refuses_exactly_above_the_cap(need, cap):
    if need > cap:
        with pytest.raises(MemoryCapExceeded, match="per-worker memory cap is"):
            check_fits(need, MemoryCap(cap))
    else:
        check_fits(need, MemoryCap(cap))


def test_mlp_param_bytes_match_its_built_parameters():
    import jax

    from dmlsys.train.models import build

    arch = {"kind": "mlp", "hidden": [32, 16]}
    params = build(arch).init(jax.random.PRNGKey(0))
    assert param_bytes(arch) == sum(x.nbytes for x in jax.tree_util.tree_leaves(params))


def test_worker_config_memory_cap_is_validated():
    assert worker_config({"memory_cap": 1 << 20}, "/tmp/x").memory_cap == 1 << 20
    with pytest.raises(ConfigError, match="memory_cap"):
        worker_config({"memory_cap": 0}, "/tmp/x")


def _run_on_collective_worker(config_cap, body_extra):
    """train.run on one collective worker node (simulated network); the data loader fails the
    test if it is reached, so a refusal must come before any data is loaded."""

    async def main():
        with tempfile.TemporaryDirectory(prefix="dmlsys-cap-") as tmp:
            net = SimNetwork(1)
            worker = Node("w0", net.transport("w0"), admin=None)
            service = TrainingService(WorkerConfig(store=tmp, memory_cap=config_cap))

            async def no_data(limit, test_limit):
                raise AssertionError("data loaded for a job that should have been refused")

            service._dataset = no_data
            worker.add_service(service)
            driver = Node("cli", net.transport("cli"), admin=None)  # train.run is ADMIN-only
            for n in (worker, driver):
                await n.start()
            try:
                body = {"job": "big", "members": ["w0"], "model": "wide", "arch": {"kind": "wide", "rows": 1 << 20},
                        "hyperparams": {}, **body_extra}
                return await driver.call("w0", "train", "run", body, timeout=10)
            finally:
                for n in (worker, driver):
                    await n.stop(drain_timeout=0.1)

    return sim.run(main())


def test_collective_worker_refuses_a_model_over_its_cap_naming_the_cap():
    # the wide model with 2**20 rows: 40.0 MiB of float32; the cap is 4 MiB
    with pytest.raises(RemoteError, match=r"needs 40\.0 MiB .*per-worker memory cap is 4\.0 MiB"):
        _run_on_collective_worker(4 << 20, {})


def test_the_request_cap_applies_when_tighter_than_the_config():
    with pytest.raises(RemoteError, match=r"per-worker memory cap is 1\.0 MiB"):
        _run_on_collective_worker(None, {"memory_cap": 1 << 20})


def test_a_model_under_the_cap_passes_the_check():
    # 64 MiB > 40 MiB: the cap passes, and the job goes on to load data (the stub fails it there)
    with pytest.raises(RemoteError, match="data loaded"):
        _run_on_collective_worker(64 << 20, {})
