"""One node process: ``python -m dmlsys.cluster node --state-dir DIR --name NAME``.

The supervisor writes the resolved cluster (every member's addresses fixed) to
``DIR/resolved.json`` and starts one of these per member. The process builds the member's
services from its role, serves until SIGTERM or SIGINT, then drains and stops. It also exits if
its supervisor dies, so that a SIGKILLed ``up`` leaves no orphans behind: on Linux the kernel
sends it SIGTERM when its parent dies (``PR_SET_PDEATHSIG``, set first thing in ``main``), and
on any system it compares its parent with the supervisor that started it (``PARENT_ENV``) at
start and every second after, which also covers a supervisor that died before the kernel was
asked. ``node_command`` is how a supervisor starts one; ``is_our_process`` is how ``down``
tells one of ours from an unrelated process that reused its pid.

Exit codes: 0 clean stop, 2 bad configuration, 3 cannot bind (port in use), 1 anything else.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import logging
import os
import signal
import sys
from pathlib import Path

from dmlsys.assembly import ZmqTransports, build_node as assemble
from dmlsys.cluster import keys
from dmlsys.cluster.spec import ResolvedCluster
from dmlsys.node import ConfigError, Directory, Member, Node
from dmlsys.wire import TransportError

log = logging.getLogger("dmlsys.node")

EXIT_CONFIG = 2
EXIT_BIND = 3
DRAIN_GRACE = 1.0  # seconds to stay up, not ready, before draining: lets balancers' probes notice
PARENT_ENV = "DMLSYS_PARENT_PID"  # the supervisor's pid, set by node_command
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def node_command(state_dir: Path, name: str) -> tuple[list[str], dict[str, str]]:
    """The argv and environment a supervisor starts node ``name`` with."""
    argv = [sys.executable, "-m", "dmlsys.cluster", "--state-dir", str(state_dir), "node", "--name", name]
    return argv, {**os.environ, PARENT_ENV: str(os.getpid())}


def process_start_ticks(pid: int | None) -> int | None:
    """When ``pid`` started, in clock ticks since boot (``/proc/PID/stat`` field 22): with the
    pid, an identity no later process shares. None where there is no such process or no /proc."""
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def is_our_process(pid: int | None, *, started: int | None = None, name: str | None = None) -> bool:
    """Whether ``pid`` is still the cluster process a state file recorded, not one that reused
    its pid: its start time matches ``started`` when that was recorded, and its command line is
    ``python -m dmlsys.cluster ...`` (with ``--name NAME`` when ``name`` is given). Where there is
    no /proc to ask, only whether the pid is alive."""
    if not pid:
        return False
    if not os.path.isdir("/proc/self"):  # no /proc (not Linux): alive is all we can know
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return True
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().decode(errors="replace").split("\0")
    except OSError:
        return False
    if started is not None and process_start_ticks(pid) != started:
        return False
    if "dmlsys.cluster" not in argv:
        return False
    if name is not None:
        return any(a == "--name" and b == name for a, b in zip(argv, argv[1:]))
    return True


def die_with_parent() -> None:
    """Ask the kernel for SIGTERM when our parent dies (Linux), then check that it has not already:
    a supervisor that died between starting us and this call would not be noticed otherwise."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    expected = os.environ.get(PARENT_ENV)
    if expected and expected.isdigit() and os.getppid() != int(expected):
        sys.stderr.write(f"supervisor (pid {expected}) died before this node started; exiting\n")
        sys.exit(1)


def expected_parent() -> int:
    expected = os.environ.get(PARENT_ENV, "")
    return int(expected) if expected.isdigit() else os.getppid()


def load_resolved(state_dir: Path) -> ResolvedCluster:
    return ResolvedCluster.from_dict(json.loads((state_dir / "resolved.json").read_text()))


def build_node(cluster: ResolvedCluster, name: str, state_dir: Path) -> Node:
    """This process's node: ``name``'s member of the resolved cluster, built by the assembly point."""
    member = next((m for m in cluster.members if m.name == name), None)
    if member is None:
        raise ConfigError("name", f"no member named {name!r} in {state_dir / 'resolved.json'}")
    supervisor = Member("supervisor", "supervisor", cluster.supervisor)
    directory = Directory([supervisor, *cluster.members], supervisor="supervisor")
    try:
        key = keys.load(state_dir)  # the cluster's: this node authenticates with it, and admits only its holders
    except keys.KeyFileError as e:
        raise ConfigError("keys", str(e)) from None
    try:
        return assemble(member, ZmqTransports(keys=key), store=cluster.store, state_dir=state_dir, http=cluster.http,
                        directory=directory)
    except ConfigError as e:
        raise ConfigError(f"nodes.{name}.{e.key}", e.expected) from None


async def serve(state_dir: Path, name: str) -> int:
    cluster = load_resolved(state_dir)
    try:
        node = build_node(cluster, name, state_dir)
    except ConfigError as e:
        log.error("node %s: bad configuration: %s", name, e)
        return EXIT_CONFIG
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await node.start()
    except (TransportError, OSError) as e:
        log.error("%s", e)
        return EXIT_BIND
    except ConfigError as e:
        log.error("node %s: bad configuration: %s", name, e)
        return EXIT_CONFIG
    parent = expected_parent()  # not getppid() now: the parent may have died while we started
    if os.getppid() != parent:
        log.warning("node %s: supervisor (pid %d) died while it started; stopping", name, parent)
        stop.set()
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), timeout=1.0)
        except TimeoutError:
            if os.getppid() != parent:
                log.warning("node %s: supervisor (pid %d) is gone; stopping", name, parent)
                break
    await node.drain(0)  # not ready any more: probes and balancers stop sending new work
    await asyncio.sleep(DRAIN_GRACE)
    await node.stop()
    return 0


def main(state_dir: str, name: str) -> None:
    die_with_parent()  # first: a supervisor dying during our start must not leave us running
    os.umask(keys.PRIVATE_UMASK)  # its ipc socket, logs and model files: this user's alone
    logging.basicConfig(
        level=os.environ.get("DMLSYS_LOG", "INFO"),
        format=f"%(asctime)s {name} %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        import uvloop

        code = uvloop.run(serve(Path(state_dir), name))
    except Exception:
        log.exception("node %s crashed", name)
        code = 1
    sys.exit(code)
