"""An in-process Supervisor over real node processes, for tests that need to reach inside it
(its hooks, its constants, two calls at once) rather than drive the CLI."""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

from dmlsys.cluster.spec import load
from dmlsys.cluster.supervisor import Supervisor

ECHO_SPEC = """
[cluster]
name = "t"
[[nodes]]
name = "solo"
role = "echo"
[[nodes]]
name = "e"
role = "echo"
replicas = 1
"""


@contextlib.asynccontextmanager
async def supervised(tmp_path: Path, spec: str = ECHO_SPEC, before_phase=None):
    """A started supervisor (``up`` done) whose nodes are all stopped on the way out."""
    (tmp_path / "spec.toml").write_text(spec)
    old = os.getcwd()
    os.chdir(tmp_path)  # the spec's store and state paths are relative to where up runs
    try:
        sup = Supervisor(load(tmp_path / "spec.toml"), tmp_path / ".dmlsys", before_phase=before_phase)
        try:
            await sup.up()
            yield sup
        finally:
            if sup.state not in ("stopped", "failed"):
                await sup.down()
    finally:
        os.chdir(old)


def node_processes(state_dir: Path) -> dict[str, list[int]]:
    """Every live node process started for ``state_dir``, by node name, found in /proc: the
    supervisor's own bookkeeping is what these tests check, so they do not ask it."""
    found: dict[str, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
            with open(f"/proc/{entry}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    continue
        except OSError:
            continue
        if "dmlsys.cluster" in argv and "node" in argv and str(state_dir) in argv and "--name" in argv:
            found.setdefault(argv[argv.index("--name") + 1], []).append(int(entry))
    return found


async def until(predicate, timeout: float, what: str, step: float = 0.05):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(step)
