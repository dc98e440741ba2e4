"""The ``worker`` role and training jobs: config validation, a job on two workers over real
ZeroMQ sockets (one process), and failures that name the worker to blame."""

from __future__ import annotations

import asyncio
import time
import types

import pytest

from dmlsys.collective import CollectiveService
from dmlsys.collective.job import JobError, train_on_workers
from dmlsys.collective.roles import TrainingService, build_worker, worker_config
from dmlsys.node import ConfigError
from dmlsys.train import data
from dmlsys.train.errors import DataNotFound
from dmlsys.train.store import ModelStore
from tests.node.helpers import Echo, Net

TINY = dict(model="tiny", arch={"kind": "mlp", "hidden": [16]}, hyperparams={"batch_size": 64, "lr": 3e-3},
            epochs=1, limit=640, test_limit=200)


@pytest.fixture(scope="module")
def data_dir():
    try:
        return str(data.find_data_dir())
    except DataNotFound as e:
        pytest.skip(f"Fashion-MNIST not installed: {e}")


def ctx(config: dict, store="store"):
    return types.SimpleNamespace(name="worker-0", role="worker", config=config, store=store, state_dir=".", spec=None)


@pytest.mark.parametrize("config, key", [
    ({"bogus": 1}, "bogus"),
    ({"limit": 0}, "limit"),
    ({"limit": True}, "limit"),
    ({"timeout": -1}, "timeout"),
    ({"timeout": "30"}, "timeout"),
    ({"chunk_bytes": 1.5}, "chunk_bytes"),
    ({"data_dir": 3}, "data_dir"),
    ({"single_thread": "yes"}, "single_thread"),
])
def test_bad_worker_config_raises_config_error_naming_the_key(config, key):
    with pytest.raises(ConfigError) as info:
        build_worker(ctx(config))
    assert info.value.key == key


def test_worker_config_defaults_and_services():
    services = build_worker(ctx({"limit": 100, "timeout": 5}))
    assert [s.name for s in services] == ["collective", "train"]
    config = worker_config({"limit": 100, "timeout": 5}, "store")
    assert (config.limit, config.timeout, config.chunk_bytes, config.test_limit) == (100, 5.0, 2 << 20, None)


async def _cluster(net: Net, store, data_dir: str, n: int, timeout: float = 30.0):
    caller = await net.node("supervisor", Echo())
    workers = []
    for i in range(n):
        config = worker_config({"data_dir": data_dir, "timeout": timeout}, store)
        await net.node(f"worker-{i}", CollectiveService(), TrainingService(config))
        workers.append(f"worker-{i}")
    return caller, workers


def test_a_job_on_two_workers_trains_and_rank_0_saves_to_the_store(tmp_path, data_dir):
    net = Net("zmq")

    async def main():
        caller, workers = await _cluster(net, tmp_path, data_dir, 2)
        return await train_on_workers(caller, workers, **TINY)

    result = net.run(main)
    assert result["version"] == 1 and result["workers"] == ["worker-0", "worker-1"]
    assert 0.2 < result["test_accuracy"] <= 1.0  # 10 steps of a tiny MLP: well above chance (0.1)
    assert len(result["history"]) == 1 and 0 <= result["comm_fraction"] < 1
    card = ModelStore(tmp_path).card("tiny", 1)
    assert card["world_size"] == 2 and card["test_accuracy"] == result["test_accuracy"]


def test_a_failing_worker_is_named_and_the_others_are_cancelled_at_once(tmp_path, data_dir):
    """worker-1 hosts no train service: its run fails at once; worker-0, already waiting in
    its first collective, is cancelled instead of waiting out the 30 s group timeout."""
    net = Net("zmq")

    async def main():
        caller, workers = await _cluster(net, tmp_path, data_dir, 1)
        await net.node("worker-1", CollectiveService())
        t0 = time.monotonic()
        with pytest.raises(JobError) as info:
            await train_on_workers(caller, workers + ["worker-1"], **TINY)
        return info.value, time.monotonic() - t0

    error, elapsed = net.run(main)
    assert error.worker == "worker-1" and "worker-1 (rank 1)" in str(error), str(error)
    assert "worker-0" in str(error)  # ...and it says who else failed after it
    assert elapsed < 15, elapsed


def test_a_busy_worker_rejects_a_second_job_naming_the_first(tmp_path, data_dir):
    net = Net("zmq")

    async def main():
        caller, workers = await _cluster(net, tmp_path, data_dir, 1)
        first = asyncio.ensure_future(train_on_workers(caller, workers, job="first", **TINY))
        await asyncio.sleep(0.05)
        with pytest.raises(JobError, match="busy with job 'first'"):
            await train_on_workers(caller, workers, job="second", **TINY)
        return await first

    assert net.run(main)["version"] == 1


def test_bad_hyperparams_are_rejected_naming_the_field(tmp_path, data_dir):
    net = Net("zmq")

    async def main():
        caller, workers = await _cluster(net, tmp_path, data_dir, 2)
        with pytest.raises(JobError, match="learning_rate"):
            await train_on_workers(caller, workers, **{**TINY, "hyperparams": {"learning_rate": 0.1}})

    net.run(main)


def test_on_epoch_reports_every_epoch_once_in_order_while_the_job_runs(tmp_path, data_dir):
    net = Net("zmq")
    seen: list[tuple[dict, float]] = []
    progress: list[dict] = []

    async def main():
        caller, workers = await _cluster(net, tmp_path, data_dir, 2)
        loop = asyncio.get_running_loop()
        args = dict(TINY, epochs=4)
        job = asyncio.ensure_future(train_on_workers(caller, workers, **args, poll_every=0.05,
                                                     on_epoch=lambda e: seen.append((e, loop.time()))))
        while not seen:
            progress.append(await caller.call(workers[0], "train", "progress", {"job": None}, timeout=5))
            await asyncio.sleep(0.05)
        return await job, loop.time()

    result, finished = net.run(main)
    assert [e["epoch"] for e, _ in seen] == [1, 2, 3, 4]
    running = [p for p in progress if p["job"]]  # "job": null asks for whichever job runs
    assert running and all(p["epochs_total"] == 4 and p["model"] == "tiny" for p in running)
    assert [e for e, _ in seen] == result["history"]  # the same stats the job returns
    assert seen[0][1] < finished - 0.01  # the first epoch was reported before the job ended


def test_progress_of_another_job_is_empty_and_a_bad_since_is_refused(tmp_path, data_dir):
    net = Net("zmq")

    async def main():
        caller, workers = await _cluster(net, tmp_path, data_dir, 1)
        other = await caller.call(workers[0], "train", "progress", {"job": "nope", "since": 0}, timeout=5)
        with pytest.raises(Exception, match="since"):
            await caller.call(workers[0], "train", "progress", {"job": "nope", "since": -1}, timeout=5)
        return other

    assert net.run(main) == {"job": None, "model": None, "epochs": [], "epochs_total": None}
