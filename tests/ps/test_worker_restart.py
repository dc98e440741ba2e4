"""A ps-worker whose process dies mid-job and is started again (as the supervisor restarts a
SIGKILLed one) rejoins the job: ``train_via_ps`` sends it the job again, it learns its clock
from the shards and trains on, and the job finishes. Under BSP the result is the one of a run
where nothing died (the same parameters, so the same test accuracy), and every shard holds
each worker's every step exactly once."""

from __future__ import annotations

import asyncio
import logging
import tempfile
from pathlib import Path

import pytest

from dmlsys.node import Node
from dmlsys.ps.server import PsConfig, PsService
from dmlsys.ps.worker import PsTrainingService, train_via_ps
from dmlsys.train import data
from dmlsys.train.errors import DataNotFound
from dmlsys.wire import sim
from dmlsys.wire.sim import SimNetwork

ARCH = {"kind": "mlp", "hidden": [16]}
HP = {"lr": 1e-3, "batch_size": 64, "epochs": 2}


@pytest.fixture(scope="module")
def small_ds() -> data.Dataset:
    try:
        return data.load(limit=512, test_limit=300)
    except DataNotFound as exc:
        pytest.skip(f"Fashion-MNIST not installed: {exc}")


def train(ds, consistency: str, kill_at: int | None, job: str):
    """Train on w0, w1 through ps0, ps1; with ``kill_at``, w1's process dies once it has pushed
    that many steps to ps0, and a new one starts on its name. Returns (result, shard infos, restarts)."""

    async def main():
        with tempfile.TemporaryDirectory(prefix="dmlsys-psr-") as tmp:
            net = SimNetwork(5)

            def worker(name):
                n = Node(name, net.transport(name), admin=None)
                n.add_service(PsTrainingService(str(Path(tmp) / "models"), offload=False,
                                                load_dataset=lambda limit, test_limit: ds))
                return n

            shards = []
            for i in range(2):
                n = Node(f"ps{i}", net.transport(f"ps{i}"), admin=None)
                n.add_service(PsService(PsConfig(str(Path(tmp) / f"ps{i}"), fsync=False, drop_timeout=30.0)))
                shards.append(n)
            workers = {w: worker(w) for w in ("w0", "w1")}
            driver = Node("driver", net.transport("driver"), admin=None)
            for n in [*shards, *workers.values(), driver]:
                await n.start()
            restarted = []

            async def killer():
                service = shards[0].service("ps")
                while job not in service.jobs or service.jobs[job].clock.clocks["w1"] < kill_at:
                    await asyncio.sleep(0.001)
                net.crash("w1")
                workers["w1"].kill()
                await workers["w1"].stop(drain_timeout=0.01)
                await asyncio.sleep(3.0)  # the supervisor notices and starts a new process
                workers["w1"] = worker("w1")
                await workers["w1"].start()
                restarted.append(workers["w1"].service("train").incarnation)

            kill = asyncio.ensure_future(killer()) if kill_at is not None else None
            try:
                result = await train_via_ps(driver, ["w0", "w1"], ["ps0", "ps1"], model="fm-ps", arch=ARCH,
                                            hyperparams=HP, consistency=consistency,
                                            staleness=2 if consistency == "ssp" else 0, job=job, probe=1.0)
                infos = [await driver.call(f"ps{i}", "ps", "info", {"job": job}, timeout=5) for i in range(2)]
                return result, infos, restarted
            finally:
                if kill is not None:
                    kill.cancel()
                for n in [*workers.values(), *shards, driver]:
                    await n.stop(drain_timeout=0.1)

    return sim.run(main())


@pytest.mark.parametrize("consistency", ["bsp", "ssp"])
def test_a_restarted_worker_rejoins_and_the_job_finishes(small_ds, consistency, caplog):
    caplog.set_level(logging.INFO, logger="dmlsys.ps.trainer")
    steps = 2 * (len(small_ds.train_labels) // HP["batch_size"])  # 16: the kill lands in epoch 1
    result, infos, restarted = train(small_ds, consistency, kill_at=steps // 2 + 3, job=f"restart-{consistency}")
    assert len(restarted) == 1
    rejoined = [r.getMessage() for r in caplog.records if "rejoins at step" in r.getMessage()]
    assert len(rejoined) == 1 and "worker w1" in rejoined[0]
    at = int(rejoined[0].split("rejoins at step ")[1].split()[0])
    assert steps // 2 + 2 <= at <= steps // 2 + 3  # from its clock on the shards, not from step 0
    assert len(result["history"]) == 2 and result["test_accuracy"] > 0.3
    for info in infos:
        assert info["clocks"] == {"w0": steps, "w1": steps} and not info["dropped"]
        assert info["applied_pushes"] == 2 * steps  # each push in once: none lost, none twice
    if consistency == "bsp":
        clean, _, _ = train(small_ds, "bsp", kill_at=None, job="clean")
        assert result["test_accuracy"] == clean["test_accuracy"]
