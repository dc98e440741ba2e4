"""The supervisor restarts what dies, including while ``up`` is still going, says when a node
is crash-looping, and serializes ``scale``. Real node processes, an in-process supervisor."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

from dmlsys.cluster import supervisor as supervisor_module

from tests.cluster.supervised import node_processes, supervised, until


def test_a_node_ready_in_an_earlier_phase_is_restarted_when_it_dies_while_up_goes_on(tmp_path):
    """As a worker dying while up trains the replicas' models: phase "base" is ready, the hook
    before phase "serving" runs (the training), and the node must come back on its own."""
    seen = {}

    async def before_phase(sup, phase):
        if phase != "serving":
            return
        proc = sup.procs["solo"]
        seen["pid"] = proc.process.pid
        os.kill(proc.process.pid, signal.SIGKILL)
        await until(lambda: proc.process.pid != seen["pid"] and proc.process.returncode is None, 20,
                    "solo to be started again while up is in its serving phase")
        await until(lambda: sup._probe(proc), 20, "the restarted solo to be ready")

    async def main():
        async with supervised(tmp_path, before_phase=before_phase) as sup:
            solo = sup.procs["solo"]
            assert sup.state == "ready" and solo.restarts == 1 and solo.process.pid != seen["pid"]
            assert node_processes(sup.state_dir)["solo"] == [solo.process.pid]

    asyncio.run(main())


def test_a_crash_looping_node_is_marked_in_status_and_still_restarted(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(supervisor_module, "BACKOFF_START", 0.01)
    monkeypatch.setattr(supervisor_module, "BACKOFF_MAX", 0.2)
    monkeypatch.setattr(supervisor_module, "CRASHLOOP_RESTARTS", 3)
    real_command = supervisor_module.node_command

    def crashing(state_dir, name):
        argv, env = real_command(state_dir, name)
        return ([sys.executable, "-c", "raise SystemExit(7)"], env) if name == "solo" else (argv, env)

    async def main():
        async with supervised(tmp_path) as sup:
            solo = sup.procs["solo"]
            watcher = asyncio.ensure_future(sup.supervise())
            try:
                monkeypatch.setattr(supervisor_module, "node_command", crashing)
                os.kill(solo.process.pid, signal.SIGKILL)
                row = lambda: next(r for r in sup.status_document()["nodes"] if r["name"] == "solo")
                await until(lambda: row()["state"] == "crashloop", 20, "solo to be marked crashloop")
                assert row()["restarts"] >= 3
                assert any("solo is crash-looping" in r.getMessage() for r in caplog.records)
                assert '"crashloop"' in (sup.state_dir / "state.json").read_text(), "status from another shell sees it"
                monkeypatch.setattr(supervisor_module, "node_command", real_command)  # fixed: it comes back
                await until(lambda: row()["state"] == "ready", 30, "solo to be ready again")
                assert not solo.crashloop
            finally:
                sup.request_stop()
                await watcher

    with caplog.at_level(logging.INFO, logger="dmlsys.supervisor"):
        asyncio.run(main())


def test_concurrent_scale_calls_leave_one_process_per_member_and_no_orphans(tmp_path):
    async def main():
        async with supervised(tmp_path) as sup:
            await asyncio.gather(sup.scale("e", 3), sup.scale("e", 3))
            procs = node_processes(sup.state_dir)
            assert {n: len(p) for n, p in procs.items()} == {"solo": 1, "e-0": 1, "e-1": 1, "e-2": 1}
            assert sorted(p for n, p in procs.items() if n.startswith("e-")) == sorted(
                [sup.procs[n].process.pid] for n in ("e-0", "e-1", "e-2"))
            await asyncio.gather(sup.scale("e", 1), sup.scale("e", 0))  # was a KeyError
            assert sorted(sup.procs) == ["solo"] and sup._groups["e"] == 0
            await until(lambda: set(node_processes(sup.state_dir)) == {"solo"}, 15, "e-* to exit")

    asyncio.run(main())
