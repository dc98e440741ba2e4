"""The supervisor: starts one process per node, waits for readiness, restarts what dies.

It is itself a node, named "supervisor", hosting the ``cluster`` service: nodes ask it for the
member list (``members``), the CLI asks it for ``status`` and to ``scale`` a group. Its state is
mirrored to ``.dmlsys/state.json`` so that ``status`` and ``down`` work from another shell even
when it is not answering.

Order of shutdown, the reverse of start-up's phases: first every node that is not a replica
(gateways, workers), so the door stops taking requests before the replicas behind it go; then
the replicas. Within a wave nodes stop in parallel, each drained by SIGTERM and killed only
after ``STOP_TIMEOUT``; the supervisor's own node last, so nodes can still reach it while they
drain.

Restarts. A node that exits is started again after a backoff that doubles from
``BACKOFF_START`` to ``BACKOFF_MAX`` (and starts over once a node ran ``BACKOFF_RESET``
seconds). That holds during ``up`` too, for a node that was ready in an earlier phase (a worker
dying while ``up`` trains the models the replicas need); one that dies before it was ever ready
fails ``up``, with its log. ``CRASHLOOP_RESTARTS`` restarts within ``CRASHLOOP_WINDOW``
seconds mark a node ``crashloop`` in ``status`` (logged once, "crash-looping"); it is still
restarted, every ``BACKOFF_MAX`` seconds, and loses the mark once it is ready again.

Node logs (``logs/NAME.log``, and ``supervisor.log``) are rotated past ``LOG_MAX_BYTES``, keeping
``LOG_KEEP`` older files, by copy and truncate: a node writes its log through a descriptor
opened for appending, which goes on writing at the start of the truncated file.

``scale`` calls run one at a time (``_scale_lock``): two at once would both start
``replica-N``, leaving one process untracked.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable

from dmlsys.assembly import ZmqTransports, build_node
from dmlsys.cluster import keys as cluster_keys
from dmlsys.cluster.errors import ClusterError
from dmlsys.cluster.nodeproc import EXIT_BIND, node_command, process_start_ticks
from dmlsys.cluster.spec import ClusterSpec, NodeSpec, ResolvedCluster, port_in_use, resolve_member
from dmlsys.node import ADMIN, Directory, Member, Node, NodeError, Service, rpc
from dmlsys.wire import TransportError

log = logging.getLogger("dmlsys.supervisor")

READY_TIMEOUT = 180.0  # a replica may compile its model; a worker may load data
PROBE_PERIOD = 0.5
BACKOFF_START, BACKOFF_MAX, BACKOFF_RESET = 0.5, 10.0, 30.0
CRASHLOOP_RESTARTS, CRASHLOOP_WINDOW = 5, 120.0  # this many restarts within this many seconds
STOP_TIMEOUT = 30.0
LOG_MAX_BYTES = int(os.environ.get("DMLSYS_LOG_MAX_BYTES", 16 << 20))  # per log file, before rotation
LOG_KEEP = 3  # rotated files kept: NAME.log.1 (newest) .. NAME.log.3


@dataclasses.dataclass
class Proc:
    """One supervised member: its process and what we know of its health."""

    member: Member
    group: str | None
    process: asyncio.subprocess.Process | None = None
    state: str = "pending"
    restarts: int = 0
    streak: int = 0  # restarts since it last ran for BACKOFF_RESET seconds
    started_at: float = 0.0
    stopping: bool = False
    waiter: asyncio.Task | None = None
    rebinds: int = 0  # starts retried on new ports after a picked one was taken first
    was_ready: bool = False  # ready once: from then on a death is restarted, even during up
    crashloop: bool = False
    restart_times: list[float] = dataclasses.field(default_factory=list)  # within CRASHLOOP_WINDOW
    start_ticks: int | None = None  # the process's start time: with the pid, its identity for `down`

    def row(self) -> dict[str, Any]:
        running = self.process is not None and self.process.returncode is None
        return {
            "name": self.member.name, "role": self.member.role,
            "pid": self.process.pid if running else None,
            "started": self.start_ticks if running else None,
            "zmq": self.member.address, "admin": f"http://{self.member.admin}" if self.member.admin else None,
            "state": "crashloop" if self.crashloop and self.state != "ready" else self.state,
            "restarts": self.restarts, "host": self.member.host,
            "model": self.member.config.get("model"),
        }


class ClusterService(Service):
    name = "cluster"

    def __init__(self, supervisor: "Supervisor") -> None:
        self.sup = supervisor

    @rpc
    def members(self, body):
        return [m.to_dict() for m in self.sup.members()]

    @rpc(allow=ADMIN)
    async def status(self, body=None):
        await self.sup.ask_shard_loads()  # keys and bytes per shard, asked now (a second at most)
        return self.sup.status_document()

    @rpc(allow=ADMIN)
    async def scale(self, body):
        return await self.sup.scale(str(body["group"]), int(body["replicas"]))

    @rpc(allow=ADMIN)
    async def train(self, body):
        from dmlsys.cluster.recipes import train

        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            raise ValueError('train takes {"model": name}')
        return await train(self.sup, body["model"])

    @rpc(allow=ADMIN)
    def shutdown(self, body):
        self.sup.request_stop()
        return "stopping"


class Supervisor:
    def __init__(self, spec: ClusterSpec, state_dir: Path, *, host: str | None = None,
                 before_phase: Callable[["Supervisor", str], Any] | None = None) -> None:
        self.spec = spec
        self.state_dir = state_dir
        self.log_dir = state_dir / "logs"
        self.keys = cluster_keys.load(state_dir)  # None: no key made (tests); else CURVE/PLAIN everywhere
        # Nodes of a single-host cluster talk over Unix sockets here (see spec.resolve_member).
        self.ipc_dir = None if spec.multi_host else state_dir / "sock"
        self.host = host
        self.procs: dict[str, Proc] = {}
        self.state = "starting"
        self.error: str | None = None
        self.node: Node | None = None
        self._stop = asyncio.Event()
        self._before_phase = before_phase
        self._groups: dict[str, int] = {n.name: n.replicas for n in spec.nodes if n.replicas is not None}
        self._scale_lock = asyncio.Lock()
        self.shard_loads: dict[str, dict[str, int]] = {}  # shard name -> {"keys", "bytes"}, as last asked

    # -- membership -------------------------------------------------------------------------

    def members(self) -> list[Member]:
        sup = Member("supervisor", "supervisor", self.node.transport.address if self.node else self.spec.supervisor)
        return [sup, *(p.member for p in self.procs.values())]

    def resolved(self) -> ResolvedCluster:
        return ResolvedCluster(
            self.spec.name, tuple(p.member for p in self.procs.values()),
            str(Path(self.spec.store).resolve()), str(self.state_dir.resolve()),
            self.spec.http, self.node.transport.address if self.node else self.spec.supervisor,
        )

    def _local(self, member: Member) -> bool:
        return self.host is None or member.host == self.host

    # -- state file -------------------------------------------------------------------------

    def status_document(self) -> dict[str, Any]:
        return {
            "cluster": self.spec.name, "spec": self.spec.path, "state": self.state, "error": self.error,
            "supervisor": {"pid": os.getpid(), "started": process_start_ticks(os.getpid()),
                           "zmq": self.node.transport.address if self.node else None},
            "http": f"http://{self.spec.http}" if self.spec.http else None,
            "nodes": [{**p.row(), **self.shard_loads.get(p.member.name, {})} for p in self.procs.values()],
            "updated": time.time(),
        }

    async def ask_shard_loads(self) -> None:
        """How many keys (and snapshot bytes) each running shard holds: ``status`` shows them."""
        from dmlsys.sharding.admin import loads

        names = [p.member.name for p in self.procs.values() if p.member.role == "shard" and p.state == "ready"]
        self.shard_loads = await loads(self.node, names) if names and self.node is not None else {}

    def write_state(self) -> None:
        _write_json(self.state_dir / "state.json", self.status_document())

    def _set(self, proc: Proc, state: str) -> None:
        if proc.state != state:
            proc.state = state
            self.write_state()

    # -- bring up ---------------------------------------------------------------------------

    async def up(self) -> None:
        """Start everything and wait until it is ready; on failure, leave nothing running."""
        for private in (self.state_dir, self.log_dir, self.ipc_dir):  # 0700: sockets, state, logs
            if private is not None:
                cluster_keys.private_dir(private)
        for node_spec in self.spec.nodes:
            for name in node_spec.member_names():
                self.procs[name] = Proc(resolve_member(node_spec, name, ipc_dir=self.ipc_dir),
                                        node_spec.name if node_spec.replicas is not None else None)
        try:
            self._check_ports()
            await self._start_supervisor_node()
            self.write_state()
            # Phase "serving" waits for phase "base" so that e.g. a model can be trained first.
            base = [p for p in self.procs.values() if p.member.role != "replica" and self._local(p.member)]
            serving = [p for p in self.procs.values() if p.member.role == "replica" and self._local(p.member)]
            # "ready" starts nothing: its hook checks that what runs is wired up.
            for phase, procs in (("base", base), ("serving", serving), ("ready", [])):
                if self._before_phase is not None:
                    result = self._before_phase(self, phase)
                    if asyncio.iscoroutine(result):
                        await result
                await asyncio.gather(*(self._spawn(p) for p in procs))
                await self._wait_ready(procs)
            self.state = "ready"
            self.write_state()
        except BaseException as e:
            self.state = "failed"
            self.error = str(e) if isinstance(e, ClusterError) else f"{type(e).__name__}: {e}"
            await self.down()
            self.write_state()
            if isinstance(e, Exception) and not isinstance(e, ClusterError):
                raise ClusterError(self.error) from e
            raise

    def _check_ports(self) -> None:
        for proc in self.procs.values():
            m = proc.member
            for kind, address in (("zmq", m.address), ("admin", m.admin)):
                if self._local(m) and address and port_in_use(address):
                    raise ClusterError(f"node {m.name!r}: {kind} port {address} is already in use "
                                       f"(change nodes.{proc.group or m.name}.{kind} in {self.spec.path})")

    async def _start_supervisor_node(self) -> None:
        address = self.spec.supervisor
        if self.host is not None and self.spec.hosts.get(self.host) and not address.startswith("ipc://"):
            primary = address.removeprefix("tcp://").rsplit(":", 1)[0]
            if primary != self.spec.hosts[self.host]:
                address = f"tcp://{self.spec.hosts[self.host]}:0"  # a secondary host's supervisor
        node = build_node(Member("supervisor", "supervisor", address), ZmqTransports(keys=self.keys),
                          store=self.spec.store, state_dir=self.state_dir, http=self.spec.http,
                          directory=Directory([p.member for p in self.procs.values()]),
                          services=[ClusterService(self)])
        try:
            await node.start()
        except TransportError as e:
            raise ClusterError(f"supervisor: {e} (set cluster.supervisor in {self.spec.path})") from None
        self.node = node

    def _repick_ports(self, proc: Proc) -> bool:
        """A port picked for ``proc`` was taken by someone else before the node could bind it
        (picking and binding are a moment apart): pick new ones, if the spec let us pick."""
        spec = self.spec.node_spec(proc.group or proc.member.name)
        if not (spec.zmq_auto or spec.zmq.endswith(":0") or (spec.admin or "").endswith(":0")):
            return False  # the spec named the ports: the error says which to change
        old = proc.member
        proc.member = resolve_member(spec, old.name, ipc_dir=self.ipc_dir)
        log.warning("node %s could not bind %s / %s (taken since they were picked); starting it on %s / %s",
                    old.name, old.address, old.admin, proc.member.address, proc.member.admin)
        if self.node is not None:
            self.node.directory.update(p.member for p in self.procs.values())
        return True

    async def _spawn(self, proc: Proc) -> None:
        _write_json(self.state_dir / "resolved.json", self.resolved().to_dict())
        log_path = self.log_dir / f"{proc.member.name}.log"
        rotate_log(log_path)
        logfile = open(log_path, "ab")
        argv, env = node_command(self.state_dir, proc.member.name)
        try:
            proc.process = await asyncio.create_subprocess_exec(
                *argv, env=env,
                stdin=asyncio.subprocess.DEVNULL, stdout=logfile, stderr=logfile,
                start_new_session=True,  # Ctrl-C reaches the supervisor only; it stops nodes in order
            )
        finally:
            logfile.close()
        proc.start_ticks = process_start_ticks(proc.process.pid)
        proc.started_at = time.monotonic()
        proc.stopping = False
        self._set(proc, "starting")
        proc.waiter = asyncio.get_running_loop().create_task(self._watch(proc, proc.process))
        log.info("started %s (%s) pid %d on %s", proc.member.name, proc.member.role, proc.process.pid, proc.member.address)

    async def _wait_ready(self, procs: list[Proc]) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        pending = list(procs)
        while pending:
            for proc in list(pending):
                if proc.process.returncode == EXIT_BIND and proc.rebinds < 3 and self._repick_ports(proc):
                    proc.rebinds += 1
                    await self._spawn(proc)
                    continue
                if proc.process.returncode is not None:
                    raise ClusterError(f"node {proc.member.name!r} exited with code {proc.process.returncode} while "
                                       f"starting:\n{self.log_tail(proc.member.name)}")
                if await self._probe(proc) == "ready":
                    pending.remove(proc)  # _probe marked it was_ready: from now on it is restarted
            if pending and time.monotonic() > deadline:
                names = ", ".join(p.member.name for p in pending)
                raise ClusterError(f"node(s) {names} not ready within {READY_TIMEOUT:g}s; see {self.log_dir}")
            if pending:
                await asyncio.sleep(0.1)

    async def _probe(self, proc: Proc) -> str:
        try:
            body = await self.node.call(proc.member.name, "node", "ping", None, timeout=2.0)
            state = body["state"]
        except NodeError:
            state = "unresponsive" if proc.state not in ("starting", "restarting") else proc.state
        if proc.process is None or proc.process.returncode is not None:
            return proc.state
        if state == "ready":
            proc.was_ready = True
            if proc.crashloop:
                proc.crashloop = False
                log.info("node %s is ready again after crash-looping", proc.member.name)
        self._set(proc, state)
        return state

    def log_tail(self, name: str, lines: int = 12) -> str:
        try:
            text = (self.log_dir / f"{name}.log").read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join("    " + line for line in text[-lines:])

    # -- supervise --------------------------------------------------------------------------

    async def _watch(self, proc: Proc, process: asyncio.subprocess.Process) -> None:
        code = await process.wait()
        if proc.stopping or self.state in ("stopping", "stopped", "failed") or process is not proc.process:
            return
        if self.state == "starting" and not proc.was_ready:
            return  # _wait_ready reports it: up fails with the node's log
        now = time.monotonic()
        ran = now - proc.started_at
        if ran > BACKOFF_RESET:
            proc.streak = 0
        delay = min(BACKOFF_START * 2 ** proc.streak, BACKOFF_MAX)
        proc.streak += 1
        proc.restarts += 1
        proc.restart_times = [t for t in proc.restart_times if now - t < CRASHLOOP_WINDOW] + [now]
        if len(proc.restart_times) >= CRASHLOOP_RESTARTS:
            delay = BACKOFF_MAX
            if not proc.crashloop:
                proc.crashloop = True
                log.error("node %s is crash-looping: %d restarts within %.0fs; still restarting it every %.0fs "
                          "(its log: %s)", proc.member.name, len(proc.restart_times), CRASHLOOP_WINDOW, delay,
                          self.log_dir / f"{proc.member.name}.log")
        self._set(proc, "restarting")
        log.warning("node %s (pid %d) exited with code %s after %.1fs; restarting in %.1fs (restart #%d)",
                    proc.member.name, process.pid, code, ran, delay, proc.restarts)
        self._tell_peer_lost(proc.member.name, f"exited with code {code}")
        await asyncio.sleep(delay)
        if self.state in ("starting", "ready") and not proc.stopping:
            if code == EXIT_BIND:  # its port was taken while it was down
                self._repick_ports(proc)
            await self._spawn(proc)

    def _tell_peer_lost(self, name: str, reason: str) -> None:
        """Tell every other running node at once, so calls waiting on ``name`` fail over now."""
        for other in self.procs.values():
            if other.member.name == name or other.process is None or other.process.returncode is not None:
                continue
            try:
                self.node.send(other.member.name, "node", "peer_lost", {"name": name, "reason": reason})
            except NodeError:
                pass  # it is going too, or not up yet: nothing of it waits on the dead node

    async def supervise(self) -> None:
        """Probe every node until asked to stop; restarts happen in each process's watcher."""
        while not self._stop.is_set():
            await asyncio.gather(*(self._probe(p) for p in self.procs.values()
                                   if p.process is not None and p.process.returncode is None and not p.stopping))
            self.rotate_logs()
            try:
                await asyncio.wait_for(self._stop.wait(), PROBE_PERIOD)
            except TimeoutError:
                pass

    def request_stop(self) -> None:
        self._stop.set()

    def rotate_logs(self) -> None:
        for path in [self.state_dir / "supervisor.log", *(self.log_dir / f"{n}.log" for n in self.procs)]:
            try:
                rotate_log(path)
            except OSError as e:  # a full disk, say: the nodes matter more than their logs
                log.warning("cannot rotate %s: %s", path, e)

    async def scale(self, group: str, replicas: int) -> list[dict]:
        """Start or stop members of ``group`` until it has ``replicas``. Calls run one at a time."""
        async with self._scale_lock:
            return await self._scale(group, replicas)

    async def _scale(self, group: str, replicas: int) -> list[dict]:
        try:
            template: NodeSpec = self.spec.node_spec(group)
        except KeyError:
            raise ValueError(f"no node group named {group!r} (groups: {', '.join(sorted(self._groups)) or 'none'})") from None
        if template.replicas is None:
            raise ValueError(f"{group!r} is a single node, not a group; give it `replicas = N` in {self.spec.path}")
        if not 0 <= replicas <= 64:
            raise ValueError(f"replicas must be from 0 to 64, got {replicas}")
        current = self._groups[group]
        if replicas > current:
            new = []
            for name in template.member_names(replicas)[current:]:
                proc = Proc(resolve_member(template, name, ipc_dir=self.ipc_dir), group)
                self.procs[name] = proc
                new.append(proc)
            self.node.directory.update(p.member for p in self.procs.values())
            await asyncio.gather(*(self._spawn(p) for p in new))
            self._groups[group] = replicas
            await self._wait_ready(new)
        elif replicas < current:
            gone = [self.procs[name] for name in template.member_names(current)[replicas:]]
            if template.role == "shard":  # their keys go to the shards that stay, with their state, first
                from dmlsys.sharding.admin import hand_over

                await hand_over(self.node, [p.member.name for p in gone if p.state == "ready"])
            self._groups[group] = replicas
            await asyncio.gather(*(self._stop_proc(p) for p in gone))
            for p in gone:
                del self.procs[p.member.name]
            self.node.directory.update(p.member for p in self.procs.values())
            _write_json(self.state_dir / "resolved.json", self.resolved().to_dict())
        self.write_state()
        log.info("scaled %s from %d to %d replicas", group, current, replicas)
        return [p.row() for p in self.procs.values() if p.group == group]

    # -- shut down --------------------------------------------------------------------------

    async def _stop_proc(self, proc: Proc) -> None:
        proc.stopping = True
        process = proc.process
        if process is None or process.returncode is not None:
            self._set(proc, "stopped")
            return
        self._set(proc, "draining")
        try:
            process.send_signal(signal.SIGTERM)
            await asyncio.wait_for(process.wait(), STOP_TIMEOUT)
        except ProcessLookupError:
            pass
        except TimeoutError:
            log.warning("node %s did not stop within %.0fs; killing it", proc.member.name, STOP_TIMEOUT)
            process.kill()
            await process.wait()
        self._set(proc, "stopped")

    async def down(self) -> None:
        if self.state not in ("failed",):
            self.state = "stopping"
        self.write_state()
        # Two waves (see the module docstring); within a wave, in parallel.
        procs = list(self.procs.values())
        front = [p for p in procs if p.member.role != "replica"]
        back = [p for p in procs if p.member.role == "replica"]
        for wave in (front, back):
            await asyncio.gather(*(self._stop_proc(p) for p in wave))
        for p in procs:
            if p.waiter is not None:
                p.waiter.cancel()
        if self.node is not None:
            await self.node.stop(drain_timeout=1.0)
        if self.ipc_dir is not None:  # sockets of nodes that could not close them (killed ones)
            shutil.rmtree(self.ipc_dir, ignore_errors=True)
        if self.state == "stopping":
            self.state = "stopped"
        self.write_state()


def _write_json(path: Path, doc: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # pids and addresses: the user's alone
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(doc, indent=2))
    os.replace(tmp, path)


def rotate_log(path: Path, max_bytes: int | None = None, keep: int = LOG_KEEP) -> bool:
    """Rotate ``path`` if it is over ``max_bytes``: NAME.1 becomes NAME.2 and so on (the oldest
    dropped), NAME is copied to NAME.1 and truncated. Copy and truncate, not rename: the process
    writing it holds it open for appending and goes on at the start of the emptied file, where a
    renamed file would go on growing under its new name. What it writes between the copy and
    the truncation is lost: a few lines, once per rotation."""
    max_bytes = LOG_MAX_BYTES if max_bytes is None else max_bytes
    try:
        if path.stat().st_size <= max_bytes:
            return False
    except FileNotFoundError:
        return False
    for i in range(keep - 1, 0, -1):
        older = path.with_name(f"{path.name}.{i}")
        if older.exists():
            os.replace(older, path.with_name(f"{path.name}.{i + 1}"))
    shutil.copyfile(path, path.with_name(f"{path.name}.1"))
    os.truncate(path, 0)
    return True
