"""Real processes via the cluster CLI: a gateway and 3 replicas, a SIGKILL and a rolling update
under steady bounded load. One cluster serves both scenarios (start-up is the slow part)."""

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import aiohttp
import pytest

from dmlsys.cluster.spec import free_port
from tests.cluster.helpers import Cli
from tests.serving.helpers import body, make_store

pytestmark = pytest.mark.slow


class Cluster(Cli):
    """The cluster CLI in ``cwd``, with a free port for the front door."""

    def __init__(self, cwd: Path) -> None:
        super().__init__(cwd)
        self.env["DMLSYS_LOG"] = "WARNING"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def state(self) -> dict:
        return json.loads((self.cwd / ".dmlsys" / "state.json").read_text())


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("serving-cluster")
    make_store(cwd / "models", "tiny", versions=2)
    c = Cluster(cwd)
    (cwd / "spec.toml").write_text(f"""
[cluster]
name = "serving-test"
store = "models"
http = "127.0.0.1:{c.port}"

[[nodes]]
name = "gateway"
role = "gateway"
[nodes.config]
probe_period = 0.2
try_timeout = 1.0

[[nodes]]
name = "replica"
role = "replica"
replicas = 3
[nodes.config]
model = "tiny"
version = 1
""")
    seen: set[int] = set()
    try:
        c("up", "--detach", "spec.toml", timeout=180)
        seen.update(c.pids())
        yield c
    finally:
        seen.update(c.pids())
        c("down", check=False, timeout=90)
        for pid in seen:  # whatever down missed is still ours to stop
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


async def steady_load(url: str, seconds: float, clients: int = 6, during=None) -> list[tuple[int, int | None]]:
    """``clients`` concurrent loops of POSTs for ``seconds``; (status, model_version) per response.
    ``during`` is a coroutine run alongside (the fault)."""
    results: list[tuple[int, int | None]] = []
    payload = body(1)
    t_end = time.monotonic() + seconds

    async def client(session):
        while time.monotonic() < t_end:
            async with session.post(f"{url}/v1/models/tiny:predict", data=payload) as r:
                doc = await r.json()
                results.append((r.status, doc.get("model_version")))

    async with aiohttp.ClientSession() as session:
        tasks = [client(session) for _ in range(clients)]
        if during is not None:
            tasks.append(during)
        await asyncio.gather(*tasks)
    return results


async def models(url: str) -> dict:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{url}/v1/models/tiny") as r:
            return await r.json()


def test_sigkill_of_one_of_three_replicas_under_load_fails_no_request(cluster):
    victim = next(n for n in cluster.state()["nodes"] if n["name"] == "replica-1")

    async def kill_then_watch():
        await asyncio.sleep(1.5)
        os.kill(victim["pid"], signal.SIGKILL)

    results = asyncio.run(steady_load(cluster.url, 5.0, during=kill_then_watch()))
    statuses = [s for s, _ in results]
    assert len(statuses) > 100
    assert statuses.count(200) == len(statuses), {s: statuses.count(s) for s in set(statuses)}

    # The supervisor restarts it; the balancer sends it traffic only once a probe sees it ready.
    deadline = time.monotonic() + 60
    while "replica-1" not in asyncio.run(models(cluster.url))["ready_replicas"]:
        assert time.monotonic() < deadline, "replica-1 never came back ready"
        time.sleep(0.3)
    row = next(n for n in cluster.state()["nodes"] if n["name"] == "replica-1")
    assert row["pid"] != victim["pid"]
    admin = row["admin"]
    asyncio.run(steady_load(cluster.url, 1.0))

    async def served():
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{admin}/status") as r:
                return (await r.json())["services"]["model"]["requests"]

    assert asyncio.run(served()) > 0


def test_rolling_update_under_load_fails_nothing_and_answers_from_old_or_new(cluster):
    async def rollout():
        from dmlsys.cluster.__main__ import ask, cluster_key

        await asyncio.sleep(0.5)
        # As the CLI's `rollout` asks: a client node with the cluster's key (rollout is administrative).
        gw = next(n for n in cluster.state()["nodes"] if n["role"] == "gateway")
        return await ask("gateway", gw["zmq"], "serving", "rollout", {"model": "tiny", "version": 2}, timeout=120,
                         keys=cluster_key(cluster.cwd / ".dmlsys"))

    async def scenario():
        # The load runs exactly as long as the rollout, plus a short tail on the new version.
        report: dict = {}
        results: list = []
        payload = body(1)
        done = asyncio.Event()

        async def client(session):
            while not done.is_set():
                async with session.post(f"{cluster.url}/v1/models/tiny:predict", data=payload) as r:
                    results.append((r.status, (await r.json()).get("model_version")))

        async def roll():
            report.update(await rollout())
            await asyncio.sleep(0.5)
            done.set()

        async with aiohttp.ClientSession() as session:
            await asyncio.gather(roll(), *(client(session) for _ in range(6)))
        return results, report

    results, report = asyncio.run(scenario())
    statuses = [s for s, _ in results]
    assert statuses.count(200) == len(statuses), {s: statuses.count(s) for s in set(statuses)}
    versions = [v for _, v in results]
    assert set(versions) == {1, 2}, set(versions)
    assert versions[-10:] == [2] * 10
    assert [r["version"] for r in report["replicas"]] == [2, 2, 2]
