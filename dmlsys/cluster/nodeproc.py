"""One node process: ``python -m dmlsys.cluster node --state-dir DIR --name NAME``.

The supervisor writes the resolved cluster (every member's addresses fixed) to
``DIR/resolved.json`` and starts one of these per member. The process builds the member's
services from its role, serves until SIGTERM or SIGINT, then drains and stops. It also exits if
its supervisor dies, so that a SIGKILLed ``up`` leaves no orphans behind.

Exit codes: 0 clean stop, 2 bad configuration, 3 cannot bind (port in use), 1 anything else.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
from pathlib import Path

from dmlsys.assembly import ZmqTransports, build_node as assemble
from dmlsys.cluster.spec import ResolvedCluster
from dmlsys.node import ConfigError, Directory, Member, Node
from dmlsys.wire import TransportError

log = logging.getLogger("dmlsys.node")

EXIT_CONFIG = 2
EXIT_BIND = 3
DRAIN_GRACE = 1.0  # seconds to stay up, not ready, before draining: lets balancers' probes notice


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
        return assemble(member, ZmqTransports(), store=cluster.store, state_dir=state_dir, http=cluster.http,
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
    parent = os.getppid()
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
