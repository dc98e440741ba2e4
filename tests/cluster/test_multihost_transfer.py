"""Models reach every host: the store service streams a version in chunks to another host's replica,
which checks every file, refuses a corrupted one and fetches it again, and loads only what checks
out. On the simulated network (virtual time), with real files in two directories as two hosts'."""

from __future__ import annotations

import numpy as np
import pytest

from dmlsys.node import Directory, Member, Node
from dmlsys.serving.replica import ModelService, ReplicaConfig
from dmlsys.train.store import ModelStore
from dmlsys.train.transfer import TransferError, TransferService, fetch_model
from dmlsys.wire import sim
from dmlsys.wire.sim import SimNetwork
from tests.serving.helpers import fake_runtime, make_store


def _pair(net, alpha_root, **service):
    """Node "supervisor" serving alpha's store; node "replica-0" knowing it as its supervisor."""
    members = [Member("supervisor", "supervisor", "sim://supervisor"), Member("replica-0", "replica", "sim://replica-0")]
    sup = Node("supervisor", net.transport("supervisor"), role="supervisor", directory=Directory(members))
    store = TransferService(alpha_root, chunk_bytes=4096, **service)
    sup.add_service(store)
    replica = Node("replica-0", net.transport("replica-0"), role="replica",
                   directory=Directory(members, supervisor="supervisor", refresh=3600))
    return sup, store, replica


def test_a_corrupted_chunk_is_refused_by_its_checksum_and_the_file_fetched_again(tmp_path):
    alpha = make_store(tmp_path / "alpha", "tiny", versions=2)

    async def main():
        sup, _, replica = _pair(SimNetwork(1), alpha, corrupt_chunks=1)
        await sup.start()
        await replica.start()
        try:
            from dmlsys.train.transfer import Fetcher

            fetcher = Fetcher(replica, "supervisor")
            version = await fetch_model(replica, "supervisor", tmp_path / "beta", "tiny", fetcher=fetcher)
            return version, fetcher.refused
        finally:
            await replica.stop(0)
            await sup.stop(0)

    version, refused = sim.run(main())
    assert (version, refused) == (2, 1)
    params, _ = ModelStore(tmp_path / "beta").load("tiny", 2)  # checks params_sha again
    want, _ = ModelStore(alpha).load("tiny", 2)
    assert np.array_equal(params["dense0"]["w"], want["dense0"]["w"])
    assert not [p for p in (tmp_path / "beta" / "tiny").iterdir() if p.name.startswith(".")]  # no temporary left


def test_a_transfer_corrupted_on_every_try_fails_naming_the_file_and_leaves_nothing(tmp_path):
    alpha = make_store(tmp_path / "alpha", "tiny")

    async def main():
        sup, _, replica = _pair(SimNetwork(2), alpha, corrupt_chunks=1000)
        await sup.start()
        await replica.start()
        try:
            with pytest.raises(TransferError, match=r"params.npz.*sha256.*giving up"):
                await fetch_model(replica, "supervisor", tmp_path / "beta", "tiny")
        finally:
            await replica.stop(0)
            await sup.stop(0)

    sim.run(main())
    assert not (tmp_path / "beta" / "tiny" / "1").exists()
    assert not list((tmp_path / "beta" / "tiny").iterdir())


def test_a_replica_on_another_host_waits_for_the_model_then_fetches_it_before_it_is_ready(tmp_path):
    alpha = tmp_path / "alpha"
    loaded = []

    def loader(store, model, version):
        _, card = ModelStore(store).load(model, version)  # only what is on beta's disk
        loaded.append((store, card["version"]))
        return fake_runtime(model, card["version"])

    async def main():
        import asyncio

        sup, store, replica = _pair(SimNetwork(3), alpha)
        replica.add_service(ModelService(ReplicaConfig("tiny", str(tmp_path / "beta")), loader=loader))
        await sup.start()
        await replica.start()
        try:
            await asyncio.sleep(3.0)  # the model is still "training" on alpha
            waiting = replica.failing_gates.get("model", "")
            make_store(alpha, "tiny")
            for _ in range(50):
                if replica.state.value == "ready":
                    break
                await asyncio.sleep(0.2)
            return waiting, replica.state.value, store.served_bytes
        finally:
            await replica.stop(0)
            await sup.stop(0)

    waiting, state, served = sim.run(main())
    assert "waiting for tiny (latest) from the cluster's store at supervisor" in waiting
    assert state == "ready" and served > 0
    assert loaded == [(str(tmp_path / "beta"), 1)]


def test_a_relay_passes_the_primary_store_on(tmp_path):
    """A secondary host's supervisor relays its replicas' requests to the primary's store."""
    alpha = make_store(tmp_path / "alpha", "tiny")

    async def main():
        net = SimNetwork(4)
        members = [Member("primary", "supervisor", "sim://primary"), Member("supervisor", "supervisor", "sim://supervisor"),
                   Member("replica-0", "replica", "sim://replica-0")]
        primary = Node("primary", net.transport("primary"), directory=Directory(members))
        primary.add_service(TransferService(alpha, chunk_bytes=4096))
        relay_node = Node("supervisor", net.transport("supervisor"), directory=Directory(members))
        relay_node.add_service(TransferService(tmp_path / "unused", upstream=lambda method, body: relay_node.call(
            "primary", "store", method, body)))
        replica = Node("replica-0", net.transport("replica-0"), directory=Directory(members, supervisor="supervisor"))
        for n in (primary, relay_node, replica):
            await n.start()
        try:
            return await fetch_model(replica, "supervisor", tmp_path / "beta", "tiny")
        finally:
            for n in (replica, relay_node, primary):
                await n.stop(0)

    assert sim.run(main()) == 1
    ModelStore(tmp_path / "beta").load("tiny", 1)
    assert not (tmp_path / "unused").exists()


def _tiny_fashion(d):
    """Four IDX files shaped like Fashion-MNIST's, 64 and 16 samples (the real ones take seconds to load)."""
    from dmlsys.train.data import FILES
    from dmlsys.train.idx import write_idx

    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for part, name in FILES.items():
        n = 64 if part.startswith("train") else 16
        shape = (n, 28, 28) if part.endswith("images") else (n,)
        write_idx(d / name, rng.integers(0, 10 if part.endswith("labels") else 256, shape, dtype=np.uint8))
    return d


def _data_nodes(net, data_dir):
    members = [Member("supervisor", "supervisor", "sim://supervisor"), Member("worker-0", "worker", "sim://worker-0")]
    sup = Node("supervisor", net.transport("supervisor"), directory=Directory(members))
    sup.add_service(TransferService("unused", data_dir=data_dir))
    worker = Node("worker-0", net.transport("worker-0"), directory=Directory(members, supervisor="supervisor", refresh=3600))
    return sup, worker


def test_a_worker_without_the_data_fetches_it_from_the_cluster_checked_by_its_fingerprint(tmp_path, monkeypatch):
    from dmlsys.train import data

    source = _tiny_fashion(tmp_path / "alpha-data")
    monkeypatch.setattr(data, "SYSTEM_DIR", tmp_path / "no-package")
    monkeypatch.setattr(data, "CACHE_DIR", tmp_path / "cache")

    async def main():
        sup, worker = _data_nodes(SimNetwork(5), source)
        await sup.start()
        await worker.start()
        try:
            return await data.locate(worker, env={}, allow_download=False)
        finally:
            await worker.stop(0)
            await sup.stop(0)

    where = sim.run(main())
    assert where == tmp_path / "cache"
    assert data.load(where).fingerprint == data.load(source).fingerprint


def test_a_worker_that_cannot_find_the_data_says_what_each_place_answered(tmp_path, monkeypatch):
    from dmlsys.train import data

    monkeypatch.setattr(data, "SYSTEM_DIR", tmp_path / "no-package")
    monkeypatch.setattr(data, "CACHE_DIR", tmp_path / "cache")
    (tmp_path / "empty").mkdir()

    async def main():
        sup, worker = _data_nodes(SimNetwork(6), tmp_path / "empty")
        await sup.start()
        await worker.start()
        try:
            with pytest.raises(data.DataNotFound) as info:
                await data.locate(worker, env={}, allow_download=False)
            return str(info.value)
        finally:
            await worker.stop(0)
            await sup.stop(0)

    message = sim.run(main())
    assert "no-package" in message and "not there" in message
    assert "the cluster's store at supervisor" in message and "Fashion-MNIST" in message
    assert "the download: off" in message
    assert not list((tmp_path).glob(".cache.tmp-*"))  # nothing half-fetched left behind
