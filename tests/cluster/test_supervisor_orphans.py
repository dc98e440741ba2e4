"""No node outlives its supervisor, and `down` never kills a process that merely reuses a pid a
dead cluster left in its state file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from dmlsys.cluster.nodeproc import is_our_process, process_start_ticks
from dmlsys.cluster.spec import ResolvedCluster
from dmlsys.node import Member

from tests.cluster.helpers import ROOT, alive, wait_for

# Plays the supervisor: starts a node exactly as the supervisor does, prints its pid, and dies
# `delay` seconds later, while the node is still starting (importing, binding).
PARENT = """
import subprocess, sys, time
from pathlib import Path
from dmlsys.cluster.nodeproc import node_command
argv, env = node_command(Path(sys.argv[1]), "n")
child = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=open(Path(sys.argv[1]) / "n.log", "ab"), start_new_session=True)
print(child.pid, flush=True)
time.sleep(float(sys.argv[2]))
"""


def test_a_supervisor_dying_before_its_node_runs_leaves_no_node_running(tmp_path):
    """The supervisor starts a node and dies before the node's first line runs: the node was
    reparented before it could ask the kernel for anything, and must notice by itself."""
    state = tmp_path / ".dmlsys"
    state.mkdir()
    member = Member("n", "echo", f"ipc://{state}/n.sock")
    cluster = ResolvedCluster("t", (member,), str(tmp_path / "models"), str(state), None, f"ipc://{state}/sup.sock")
    (state / "resolved.json").write_text(json.dumps(cluster.to_dict()))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    parent = subprocess.run([sys.executable, "-c", PARENT, str(state), "0"], env=env,
                            capture_output=True, text=True, timeout=60)
    node = int(parent.stdout.split()[0])
    try:
        wait_for(lambda: not alive(node), 15, f"the orphaned node (pid {node}) to exit")
    finally:
        if alive(node):
            os.kill(node, signal.SIGKILL)
    assert "died before this node started" in (state / "n.log").read_text()


# Plays the supervisor again, this time dying once the node has armed PR_SET_PDEATHSIG (the first
# thing a node process does) and is still starting: nothing but the kernel tells it.
ARMED = """
import subprocess, sys
from dmlsys.cluster.nodeproc import PARENT_ENV
import os
code = ("from dmlsys.cluster.nodeproc import die_with_parent; die_with_parent(); "
        "print('armed', flush=True); import time; time.sleep(60)")
child = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, PARENT_ENV: str(os.getpid())},
                         stdout=subprocess.PIPE, text=True, start_new_session=True)
print(child.pid, flush=True)
assert child.stdout.readline().strip() == "armed"
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_node_is_signalled_by_the_kernel_when_its_supervisor_dies_during_its_start():
    parent = subprocess.run([sys.executable, "-c", ARMED], env={**os.environ, "PYTHONPATH": str(ROOT)},
                            capture_output=True, text=True, timeout=60)
    assert parent.returncode == 0, parent.stderr
    child = int(parent.stdout.split()[0])
    try:
        wait_for(lambda: not alive(child), 5, f"the armed child (pid {child}) to get SIGTERM")
    finally:
        if alive(child):
            os.kill(child, signal.SIGKILL)


def test_down_after_a_dead_supervisor_leaves_processes_that_reused_its_pids_alone(cli, tmp_path):
    state = tmp_path / ".dmlsys"
    state.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    # An unrelated process now holding a pid the state file names (its start time matches too).
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    # One that looks like our node by its command line, but started after the state was written.
    lookalike = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "dmlsys.cluster",
                                  "--name", "e-1"])
    # And one of ours, left running by the dead supervisor: this one down must stop.
    ours = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "dmlsys.cluster",
                             "--name", "e-2"])
    try:
        rows = [
            {"name": "e-0", "pid": stranger.pid, "started": process_start_ticks(stranger.pid), "state": "ready"},
            {"name": "e-1", "pid": lookalike.pid, "started": process_start_ticks(lookalike.pid) - 100, "state": "ready"},
            {"name": "e-2", "pid": ours.pid, "started": process_start_ticks(ours.pid), "state": "ready"},
        ]
        doc = {"cluster": "t", "state": "ready", "supervisor": {"pid": dead.pid, "started": 1, "zmq": None},
               "nodes": rows}
        (state / "state.json").write_text(json.dumps(doc))
        out = cli("down", timeout=60).stdout
        assert ours.wait(timeout=15) is not None, "down stops what is still ours"
        time.sleep(0.2)
        assert stranger.poll() is None and lookalike.poll() is None, out
        assert "e-0: pid" in out and "e-1: pid" in out and "left alone" in out
    finally:
        for p in (stranger, lookalike, ours):
            p.kill()
            p.wait()


def test_is_our_process_needs_the_command_line_and_the_start_time():
    me = os.getpid()
    assert not is_our_process(me), "pytest is not a cluster process"
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "dmlsys.cluster", "--name", "x"])
    try:
        wait_for(lambda: "dmlsys.cluster" in open(f"/proc/{proc.pid}/cmdline").read(), 5, "the child to exec")
        started = process_start_ticks(proc.pid)
        assert is_our_process(proc.pid, started=started, name="x")
        assert not is_our_process(proc.pid, started=started, name="y")
        assert not is_our_process(proc.pid, started=started + 1, name="x")
    finally:
        proc.kill()
        proc.wait()
    assert not is_our_process(proc.pid, name="x")
