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

Several hosts (``up SPEC --host NAME`` on each): one supervisor is the primary, the others
report to it and run what it assigns them; see :mod:`dmlsys.cluster.hosts`. Every supervisor
hosts the cluster's ``store`` service (:mod:`dmlsys.train.transfer`): the primary's serves its
model store and data, a secondary's relays to the primary's, so a replica on any host asks its
own supervisor for the version it lacks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any, Callable

from dmlsys.assembly import ZmqTransports, build_node
from dmlsys.cluster import keys as cluster_keys
from dmlsys.cluster.errors import ClusterError
from dmlsys.cluster.hosts import HOST_TIMEOUT, Hosts, Link, host_store_service
from dmlsys.cluster.placement import Group, place
from dmlsys.cluster.nodeproc import EXIT_BIND, node_command, process_start_ticks
from dmlsys.cluster.spec import ClusterSpec, NodeSpec, ResolvedCluster, port_in_use, resolve_member
from dmlsys.node import ADMIN, Directory, Member, Node, NodeError, Service, allow, rpc
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
    why: str | None = None  # its failing readiness gates, as its last probe said (why it is not ready)

    def row(self) -> dict[str, Any]:
        running = self.process is not None and self.process.returncode is None
        return {
            "name": self.member.name, "role": self.member.role,
            "pid": self.process.pid if running else None,
            "started": self.start_ticks if running else None,
            "zmq": self.member.address, "admin": f"http://{self.member.admin}" if self.member.admin else None,
            "state": "crashloop" if self.crashloop and self.state != "ready" else self.state,
            "restarts": self.restarts, "host": self.member.host,
            "model": self.member.config.get("model"), "why": self.why if self.state != "ready" else None,
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
        if self.sup.link is not None:  # a secondary: the primary places members
            return await self.sup.link.call("scale", body, timeout=300.0)
        return await self.sup.scale(str(body["group"]), int(body["replicas"]))

    @rpc(allow=ADMIN)
    async def rollout(self, body):
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            raise TypeError('rollout takes {"model": name, "version": int or null}')
        if self.sup.link is not None:  # a secondary: the primary holds the pins
            return await self.sup.link.call("rollout", body, timeout=900.0)
        return await self.sup.rollout(body["model"], body.get("version"))

    @rpc(allow=ADMIN | allow(roles=("gateway",)))  # every gateway, every SYNC_PERIOD (serving/versions.py)
    async def pins(self, body):
        if self.sup.link is not None:
            return await self.sup.link.call("pins", body, timeout=2.0)
        return self.sup.sync_pins(body if isinstance(body, dict) else {})

    @rpc(allow=ADMIN)  # a secondary host's supervisor, through its link (cluster/hosts.py)
    def report(self, body):
        return self.sup.take_report(body)

    @rpc(allow=ADMIN | allow(roles=("events",)))  # the events node's function pool (dmlsys.events.launcher)
    async def pool_start(self, body):
        return await self.sup.pool_start(str(body["group"]))

    @rpc(allow=ADMIN | allow(roles=("events",)))
    async def pool_stop(self, body):
        return await self.sup.pool_stop(str(body["name"]))

    @rpc(allow=ADMIN)
    async def train(self, body):
        from dmlsys.cluster.recipes import train

        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            raise ValueError('train takes {"model": name}')
        if self.sup.link is not None:  # a secondary: the primary picks the workers of every host
            return await self.sup.link.call("train", body, timeout=7200.0)
        return await train(self.sup, body["model"])

    @rpc(allow=ADMIN)  # the primary, before rank 0 on this host trains (cluster/hosts.py)
    async def sync_model(self, body):
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            raise TypeError('sync_model takes {"model": name}')
        return await self.sup.sync_model(body["model"])

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
        # Several hosts (cluster/hosts.py): the primary places every member and hears from the other
        # hosts; a secondary runs what the primary assigns it and knows the rest from its replies.
        self.spread = host is not None and spec.multi_host
        self.primary = not self.spread or spec.primary == host
        self.assignment: dict[str, str] = {}  # member -> host, every host's (the primary's decision)
        others = sorted(h for h in spec.hosts if h not in (host, "local"))
        self.hosts: Hosts | None = Hosts(others) if self.spread and self.primary else None
        self.link: Link | None = None
        self.remote: list[Member] = []  # a secondary's view of the other hosts' members
        self.remote_rows: list[dict] = []
        self.remote_hosts: dict[str, Any] = {}
        self.join_timeout = READY_TIMEOUT
        self.shard_loads: dict[str, dict[str, int]] = {}  # shard name -> {"keys", "bytes"}, as last asked
        self.dashboard = None  # the web dashboard (cluster.dashboard), on the primary only
        # The version each model is served at, which every gateway follows (serving/versions.py);
        # held by the primary, in memory: a cluster brought up again pins what its replicas load.
        self.pinned: dict[str, int] = {}
        self.rolling: set[str] = set()
        self.pins_seq = 0
        self._rollout_lock = asyncio.Lock()

    # -- membership -------------------------------------------------------------------------

    def members(self) -> list[Member]:
        sup = Member("supervisor", "supervisor", self.node.transport.address if self.node else self.spec.supervisor,
                     host=self.host or "local")
        local = [sup, *(p.member for p in self.procs.values())]
        if self.hosts is not None:
            return local + self.hosts.members()
        return local + [m for m in self.remote if m.name not in self.procs]

    def served_models(self) -> set[str]:
        """Models served by the replicas of every host (what ``up`` trains first when missing)."""
        names = self.assignment or {name: None for n in self.spec.nodes for name in n.member_names()}
        models = set()
        for name in set(names) | set(self.procs):
            template = self.spec.group_of(name) or next((n for n in self.spec.nodes if n.name == name), None)
            if template is not None and template.role == "replica" and template.config.get("model"):
                models.add(template.config["model"])
        return models

    def ready_workers(self) -> list[str]:
        """Ready worker nodes of every host, this host's first (rank 0 saves into its own store)."""
        here = [p.member.name for p in self.procs.values()
                if p.member.role == "worker" and self._local(p.member) and p.state == "ready"]
        if self.hosts is None:
            return here
        return here + [r["name"] for r in self.hosts.rows(self.assignment)
                       if r.get("role") == "worker" and r.get("state") == "ready"]

    def _new_proc(self, node_spec: NodeSpec, name: str) -> Proc:
        """A member to run here, its ports picked on this host's address."""
        address = self.spec.hosts.get(self.host) if self.spread else None
        member = resolve_member(node_spec, name, ipc_dir=self.ipc_dir, host=self.host if address else None,
                                host_address=address)
        return Proc(member, node_spec.name if node_spec.replicas is not None else None)

    def resolved(self) -> ResolvedCluster:
        return ResolvedCluster(
            self.spec.name, tuple(m for m in self.members() if m.name != "supervisor"),
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
            "dashboard": self.dashboard.url if self.dashboard is not None else None,
            "nodes": [{**p.row(), **self.shard_loads.get(p.member.name, {})} for p in self.procs.values()] + self._remote_rows(),
            "host": self.host, "primary": self.primary if self.spread else None,
            "hosts": ({h: v.summary(time.monotonic()) for h, v in self.hosts.views.items()} if self.hosts is not None
                      else self.remote_hosts or None),
            "updated": time.time(),
        }

    def _remote_rows(self) -> list[dict]:
        if self.hosts is not None:
            return self.hosts.rows(self.assignment)
        return [r for r in self.remote_rows if r["name"] not in self.procs]

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
        if self.spread:
            self.assignment = self.spec.placement()
        if self.primary:
            for node_spec in self.spec.nodes:
                for name in node_spec.member_names():
                    if not self.spread or self.assignment.get(name) == self.host:
                        self.procs[name] = self._new_proc(node_spec, name)
        try:
            self._check_ports()
            await self._start_supervisor_node()
            if self.spec.dashboard and self.primary:
                await self._start_dashboard()
            self.write_state()
            if not self.primary:
                await self._join()
            # Phase "serving" waits for phase "base" so that e.g. a model can be trained first.
            base = [p for p in self.procs.values() if p.member.role != "replica" and self._local(p.member)]
            serving = [p for p in self.procs.values() if p.member.role == "replica" and self._local(p.member)]
            # "ready" starts nothing: its hook checks that what runs is wired up.
            for phase, procs in (("base", base), ("serving", serving), ("ready", [])):
                if phase == "ready":
                    await self._wait_hosts()  # `up` is ready when every host's nodes are
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
        from dmlsys.train.transfer import TransferService

        relay = None if self.primary else (lambda method, body: self.link.store(method, body))
        services = [ClusterService(self), TransferService(self.spec.store, upstream=relay)]
        if not self.primary:  # what rank 0 saves here, for the primary to pull (cluster/hosts.py)
            services.append(host_store_service(self.spec.store))
        node = build_node(Member("supervisor", "supervisor", address), ZmqTransports(keys=self.keys),
                          store=self.spec.store, state_dir=self.state_dir, http=self.spec.http,
                          directory=Directory([p.member for p in self.procs.values()]), services=services)
        try:
            await node.start()
        except TransportError as e:
            raise ClusterError(f"supervisor: {e} (set cluster.supervisor in {self.spec.path})") from None
        self.node = node

    async def _start_dashboard(self) -> None:
        from dmlsys.cluster.dashboard import Dashboard

        dashboard = Dashboard(self, self.spec.dashboard)
        try:
            await dashboard.start()
        except OSError as e:
            raise ClusterError(str(e)) from None
        self.dashboard = dashboard

    def _repick_ports(self, proc: Proc) -> bool:
        """A port picked for ``proc`` was taken by someone else before the node could bind it
        (picking and binding are a moment apart): pick new ones, if the spec let us pick."""
        spec = self.spec.node_spec(proc.group or proc.member.name)
        if not (spec.zmq_auto or spec.zmq.endswith(":0") or (spec.admin or "").endswith(":0")):
            return False  # the spec named the ports: the error says which to change
        old = proc.member
        proc.member = self._new_proc(spec, old.name).member
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
            if any("from the cluster's store" in (p.why or "") for p in pending):
                # waiting for a model the primary is still training: the replica's own wait bounds it
                deadline = max(deadline, time.monotonic() + PROBE_PERIOD)
            if pending and time.monotonic() > deadline:
                names = ", ".join(p.member.name for p in pending)
                why = "; ".join(f"{p.member.name}: {p.why}" for p in pending if p.why)
                raise ClusterError(f"node(s) {names} not ready within {READY_TIMEOUT:g}s{f' ({why})' if why else ''}; "
                                   f"see {self.log_dir}")
            if pending:
                await asyncio.sleep(0.1)

    async def _probe(self, proc: Proc) -> str:
        body = None
        try:
            body = await self.node.call(proc.member.name, "node", "ping", None, timeout=2.0)
            state = body["state"]
        except NodeError:
            state = "unresponsive" if proc.state not in ("starting", "restarting") else proc.state
        if proc.process is None or proc.process.returncode is not None:
            return proc.state
        if isinstance(body, dict) and state != "unresponsive":
            gates = body.get("failing_gates") or {}
            proc.why = "; ".join(f"{k}: {v}" for k, v in gates.items()) if isinstance(gates, dict) and gates else None
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
        self._tell_peer_lost(proc.member.name, _exit_reason(code))
        await asyncio.sleep(delay)
        if self.state in ("starting", "waiting", "ready") and not proc.stopping:
            if code == EXIT_BIND:  # its port was taken while it was down
                self._repick_ports(proc)
            await self._spawn(proc)

    def _tell_peer_lost(self, name: str, reason: str) -> None:
        """Tell every other running node at once, so calls waiting on ``name`` fail over now; and
        the other hosts (through the primary), whose nodes may be waiting on it too."""
        if self.hosts is not None:
            self.hosts.event(name, reason)
        if self.link is not None:
            self.link.node_lost(name, reason)
        self._tell_local(name, reason)

    def _tell_local(self, name: str, reason: str) -> None:
        if self.node is not None:  # this node too: a training job it coordinates waits on its workers
            self.node.peer_lost(name, reason)
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
            self._expire_hosts()
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

    def _scalable(self, group: str, replicas: int) -> NodeSpec:
        """The spec of node group ``group``, if it may have ``replicas`` members; else ValueError
        naming what is wrong (the caller's answer)."""
        try:
            template: NodeSpec = self.spec.node_spec(group)
        except KeyError:
            raise ValueError(f"no node group named {group!r} (groups: {', '.join(sorted(self._groups)) or 'none'})") from None
        if template.replicas is None:
            raise ValueError(f"{group!r} is a single node, not a group; give it `replicas = N` in {self.spec.path}")
        if not 0 <= replicas <= 64:
            raise ValueError(f"replicas must be from 0 to 64, got {replicas}")
        return template

    async def _scale(self, group: str, replicas: int) -> list[dict]:
        if self.hosts is not None:
            return await self._scale_across(group, replicas)
        template = self._scalable(group, replicas)
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

    async def pool_start(self, group: str) -> dict:
        """Start one more member of ``group`` (the lowest free index) and answer its row once it
        is ready: the function pool grows one instance at a time and stops a chosen one with
        ``pool_stop`` (``scale`` only adds or removes the highest-numbered; don't mix the two)."""
        if self.hosts is not None:
            raise ValueError("the function pool runs on a single-host cluster only (for now)")
        async with self._scale_lock:
            template = self._group_template(group)
            free = [n for n in template.member_names(64) if n not in self.procs]
            if not free:
                raise ValueError(f"group {group!r} has 64 members: no more")
            name = free[0]
            proc = self._new_proc(template, name)
            self.procs[name] = proc
            self._groups[group] = sum(1 for p in self.procs.values() if p.group == group)
            self.node.directory.update(self.members())
            await self._spawn(proc)
        await self._wait_ready([proc])
        log.info("pool: started %s in group %s", name, group)
        return proc.row()

    async def pool_stop(self, name: str) -> dict:
        """Stop the member ``name`` of a group and forget it (not restarted)."""
        proc = self.procs.get(name)
        if proc is None or proc.group is None:
            raise ValueError(f"no group member named {name!r}")
        await self._stop_proc(proc)
        async with self._scale_lock:
            self.procs.pop(name, None)
            self._groups[proc.group] = sum(1 for p in self.procs.values() if p.group == proc.group)
            self.node.directory.update(self.members())
            _write_json(self.state_dir / "resolved.json", self.resolved().to_dict())
            self.write_state()
        log.info("pool: stopped %s of group %s", name, proc.group)
        return proc.row()

    def _group_template(self, group: str) -> NodeSpec:
        try:
            template = self.spec.node_spec(group)
        except KeyError:
            raise ValueError(f"no node group named {group!r} (groups: {', '.join(sorted(self._groups)) or 'none'})") from None
        if template.replicas is None:
            raise ValueError(f"{group!r} is a single node, not a group; give it `replicas = N` in {self.spec.path}")
        return template

    async def sync_model(self, model: str) -> int | None:
        """A secondary: fetch the cluster's latest version of ``model`` into this host's store
        (None: the cluster has none yet)."""
        from dmlsys.train.errors import ModelNotFound
        from dmlsys.train.transfer import fetch_model

        if self.link is None:
            raise ValueError(f"sync_model is for a secondary host's supervisor; this one is "
                             f"{'the primary' if self.spread else 'single-host'}")
        try:
            return await fetch_model(self.link.node, "supervisor", self.spec.store, model, None)
        except ModelNotFound:
            return None

    # -- the version pins every gateway follows ---------------------------------------------

    def pins_document(self) -> dict[str, Any]:
        return {"pinned": dict(self.pinned), "rolling": sorted(self.rolling), "seq": self.pins_seq}

    def sync_pins(self, body: dict) -> dict[str, Any]:
        """A gateway's ask: it sends what it pinned; a model nobody pinned yet takes its version
        (the first report wins), and what a rollout run on that gateway moved (``changed``, when
        it was asked directly) replaces the pin; it gets the cluster's pins back."""
        for model, version in (body.get("changed") or {}).items():
            if isinstance(model, str) and isinstance(version, int) and model not in self.rolling \
                    and self.pinned.get(model) != version:
                self.pinned[model] = version
                self.pins_seq += 1
        for model, version in (body.get("pinned") or {}).items():
            if isinstance(model, str) and isinstance(version, int) and model not in self.pinned \
                    and model not in self.rolling:
                self.pinned[model] = version
                self.pins_seq += 1
        return self.pins_document()

    def _gateways(self) -> tuple[list[str], list[str]]:
        """(every gateway of every host, the ready ones)."""
        rows = {r["name"]: r for r in self.status_document()["nodes"]}
        names = sorted(m.name for m in self.members() if m.role == "gateway")
        return names, [n for n in names if rows.get(n, {}).get("state") == "ready"]

    async def _push_pins(self, gateways: list[str]) -> dict[str, str]:
        """Tell every gateway the pins now (one that misses it catches up at its next ask)."""
        doc = self.pins_document()

        async def one(name: str) -> str:
            try:
                await self.node.call(name, "serving", "pins", doc, timeout=2.0)
                return "ok"
            except NodeError as e:
                log.warning("gateway %s did not take the version pins (%s); it catches up within %.0fs",
                            name, e, 1.0)
                return f"not told now ({type(e).__name__}); it asks again within a second"

        return dict(zip(gateways, await asyncio.gather(*(one(n) for n in gateways))))

    async def rollout(self, model: str, version: int | None) -> dict[str, Any]:
        """Move every replica of ``model`` to ``version`` (None: latest) through one gateway, the
        others told first that the model is rolling (so that none reloads a moved replica back),
        then every gateway told the new pin. One rollout at a time."""
        from dmlsys.node import RemoteError

        if version is not None and (not isinstance(version, int) or version < 1):
            raise ValueError(f"version must be a positive integer or null (latest), got {version!r}")
        async with self._rollout_lock:
            gateways, ready = self._gateways()
            if not ready:
                raise ClusterError(f"no ready gateway in the cluster {self.spec.name!r} to run the rollout of "
                                   f"{model!r} (gateways: {', '.join(gateways) or 'none'})")
            self.rolling.add(model)
            self.pins_seq += 1
            try:
                await self._push_pins(gateways)
                result, tried = None, []
                for name in ready:  # the first that answers runs it; one that is gone is skipped
                    try:
                        result = await self.node.call(name, "serving", "rollout", {"model": model, "version": version},
                                                      timeout=600.0)
                        break
                    except RemoteError as e:
                        raise ClusterError(f"rollout of {model!r} through gateway {name}: {e.message}") from None
                    except NodeError as e:
                        tried.append(f"{name}: {e}")
                if result is None:
                    raise ClusterError(f"rollout of {model!r}: no gateway answered ({'; '.join(tried)})")
                moved = [r["version"] for r in result.get("replicas", [])]
                if moved:
                    self.pinned[model] = moved[-1]
                result["gateway"] = name
            finally:
                self.rolling.discard(model)
                self.pins_seq += 1
                told = await self._push_pins(gateways)
            log.info("rollout of %s: v%s pinned on %s", model, self.pinned.get(model), ", ".join(gateways))
            return {**result, "pinned": self.pinned.get(model), "gateways": told}

    # -- several hosts (cluster/hosts.py) ----------------------------------------------------

    async def _join(self) -> None:
        """A secondary: report to the primary until it answers (it may not be up yet), and take
        the members it assigns this host."""
        self.link = Link(self, self.spec.supervisor)
        await self.link.start()
        try:  # a primary that is up answers within a report or two: say "waiting" only if it does not
            await asyncio.wait_for(self.link.joined.wait(), 3.0)
        except TimeoutError:
            pass
        if not self.link.joined.is_set():
            self.state = "waiting"
            self.error = f"waiting for the primary supervisor at {self.spec.supervisor} to answer"
            self.write_state()
            log.info("host %s waits for the primary supervisor at %s", self.host, self.spec.supervisor)
        await self.link.joined.wait()
        self.state, self.error = "starting", None
        self.write_state()

    async def apply_reply(self, reply: dict) -> None:
        """A secondary: what the primary answered to a report (see cluster/hosts.py)."""
        self.remote = [Member.from_dict(m) for m in reply.get("members", [])
                       if m.get("host") != self.host and m["name"] != "supervisor"]
        rows = [r for r in reply.get("rows", []) if r.get("host") != self.host]
        changed = _states(rows) != _states(self.remote_rows)
        self.remote_rows = rows
        self.remote_hosts = reply.get("hosts") or {}
        if changed:  # the state file shows every host's nodes as they are
            self.write_state()
        for event in reply.get("events", []):
            if event["name"] not in self.procs:
                self._tell_local(event["name"], event["reason"])
        if self.node is not None:
            self.node.directory.update(self.members())
        if reply.get("stop"):
            log.info("host %s: the primary is stopping the cluster", self.host)
            self.request_stop()
            return
        wanted = {a["name"]: a for a in reply.get("assignment", [])}
        async with self._scale_lock:
            new = []
            for name, a in wanted.items():
                if name not in self.procs:
                    self.procs[name] = self._new_proc(self.spec.node_spec(a.get("group") or name), name)
                    new.append(self.procs[name])
            gone = [p for n, p in self.procs.items() if n not in wanted] if self.state == "ready" else []
            if self.state == "ready" and (new or gone):  # during up, the phases start what was assigned
                if self.node is not None:
                    self.node.directory.update(self.members())
                await asyncio.gather(*(self._spawn(p) for p in new))
                await asyncio.gather(*(self._stop_proc(p) for p in gone))
                for p in gone:
                    self.procs.pop(p.member.name, None)
                if gone:
                    _write_json(self.state_dir / "resolved.json", self.resolved().to_dict())
                self.write_state()
                log.info("host %s now runs %s", self.host, ", ".join(sorted(self.procs)) or "nothing")

    def remote_lost(self, reason: str) -> None:
        """A secondary that lost the primary: every other host's member is gone as far as its
        nodes can tell."""
        for member in self.remote:
            self._tell_local(member.name, reason)
        self.remote = []
        self.remote_rows = [dict(r, state="lost", pid=None) for r in self.remote_rows]
        self.error = f"lost the primary: {reason}"  # status on this host says so until it answers again
        if self.node is not None:
            self.node.directory.update(self.members())
        self.write_state()

    def take_report(self, body: Any) -> dict:
        """The primary: one report from a secondary; the reply tells it what to run."""
        host = body.get("host") if isinstance(body, dict) else None
        if self.hosts is None:
            raise ValueError(f"this supervisor ({self.host or 'single host'}) is not a multi-host primary; "
                             f"check cluster.supervisor in {self.spec.path}")
        if host not in self.hosts.views:
            raise ValueError(f"unknown host {host!r} (hosts: {', '.join(self.hosts.views)})")
        before = [m.address for m in self.hosts.members()]
        rows_before = _states(self.hosts.views[host].rows)
        view, joined = self.hosts.report(body, time.monotonic())
        for lost in body.get("lost", []):
            self._tell_local(str(lost["name"]), str(lost["reason"]))
        if joined:
            log.info("host %s joined: %d node(s), supervisor %s", host, len(view.members), view.supervisor)
        if joined or before != [m.address for m in self.hosts.members()]:
            self.node.directory.update(self.members())
            self.write_state()
        elif _states(view.rows) != rows_before:
            self.write_state()
        seq = int(body.get("seq") or 0)
        return {
            "assignment": [{"name": n, "group": g.name if (g := self.spec.group_of(n)) else None}
                           for n, h in self.assignment.items() if h == host],
            "members": [m.to_dict() for m in self.members() if m.host != host],
            "rows": [r for r in self.status_document()["nodes"] if r.get("host") != host],
            "hosts": {h: v.summary(time.monotonic()) for h, v in self.hosts.views.items()},
            "events": [] if joined else self.hosts.events_since(seq), "seq": self.hosts.seq,
            "stop": self.state in ("stopping", "stopped", "failed"),
        }

    def _expire_hosts(self) -> None:
        if self.hosts is None:
            return
        for view in self.hosts.expire(time.monotonic(), HOST_TIMEOUT):
            log.error("host %s lost: %s; its %d node(s) are counted lost (%s)", view.name, view.error,
                      len(view.members), ", ".join(sorted(view.members)) or "none")
            for name in view.members:
                self._tell_local(name, f"host {view.name} lost")
            self.node.directory.update(self.members())
            self.write_state()

    def _hosts_not_ready(self) -> list[str]:
        """Why the other hosts' assigned members are not all ready (empty: they are)."""
        if self.hosts is None:
            return []
        rows = {r["name"]: r for r in self.hosts.rows(self.assignment)}
        problems = []
        for host in sorted({h for h in self.assignment.values() if h != self.host}):
            view = self.hosts.views.get(host)
            if view is None or view.state != "up":
                problems.append(f"host {host} has not joined (run `python -m dmlsys.cluster up {self.spec.path} "
                                f"--host {host}` there)" if view is None or view.state == "waiting"
                                else f"host {host} is {view.state}: {view.error}")
                continue
            for name in sorted(n for n, h in self.assignment.items() if h == host):
                row = rows.get(name, {})
                if row.get("state") != "ready":
                    problems.append(f"{name} on {host} is {row.get('state', 'not started')}"
                                    + (f" ({row['why']})" if row.get("why") else ""))
        return problems

    async def _wait_hosts(self) -> None:
        """Until every other host has joined (state ``waiting`` meanwhile, for as long as it takes:
        `up --detach` returns then, saying so) and its nodes are ready (``join_timeout``)."""
        deadline = time.monotonic() + self.join_timeout
        said = time.monotonic()
        while problems := self._hosts_not_ready():
            self._expire_hosts()
            unjoined = sorted({h for h in self.assignment.values() if h != self.host
                               and self.hosts.views[h].state == "waiting"})
            state = "waiting" if unjoined else "starting"
            if state != self.state:
                self.state = state
                self.error = f"waiting for host(s) {', '.join(unjoined)} to join" if unjoined else None
                self.write_state()
            if unjoined:
                deadline = time.monotonic() + self.join_timeout
            if time.monotonic() > deadline:
                raise ClusterError(f"not ready within {self.join_timeout:g}s: {'; '.join(problems)}")
            if time.monotonic() - said > 10:
                said = time.monotonic()
                log.info("waiting for the other hosts: %s", "; ".join(problems))
            await asyncio.sleep(0.2)

    async def _wait_hosts_down(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while any(v.state == "up" for v in self.hosts.views.values()) and time.monotonic() < deadline:
            self._expire_hosts()
            await asyncio.sleep(0.1)

    async def _scale_across(self, group: str, replicas: int) -> list[dict]:
        """The primary: place ``group``'s members on the hosts that are up, start and stop the
        ones here, and wait until the other hosts report theirs ready or gone."""
        template = self._scalable(group, replicas)
        live = {self.host} | {h for h, v in self.hosts.views.items() if v.state == "up"}
        allowed = tuple(h for h in template.allowed_hosts if h in live)
        if not allowed:
            raise ValueError(f"no host of group {group!r} is up ({', '.join(template.allowed_hosts)})")
        current = {n: h for n, h in self.assignment.items() if self.spec.group_of(n) is template}
        used: dict[str, int] = {}
        for n, h in self.assignment.items():
            if n not in current:
                used[h] = used.get(h, 0) + 1
        plan = place(Group(group, allowed, template.placement), current, replicas, capacity=self.spec.capacity,
                     used=used)
        self.assignment = plan.apply(self.assignment)
        self._groups[group] = replicas
        new = [self._new_proc(template, n) for n, h in plan.add if h == self.host]
        gone = [self.procs[n] for n in plan.remove if n in self.procs]
        for proc in new:
            self.procs[proc.member.name] = proc
        self.node.directory.update(self.members())
        await asyncio.gather(*(self._spawn(p) for p in new))
        await asyncio.gather(*(self._stop_proc(p) for p in gone))
        for p in gone:
            del self.procs[p.member.name]
        await self._wait_ready(new)
        deadline = time.monotonic() + READY_TIMEOUT
        while True:  # the other hosts pick the change up from their next report's reply
            problems = self._hosts_not_ready()
            extra = [r["name"] for r in self.hosts.rows(self.assignment)
                     if r["name"] not in self.assignment and r.get("pid")]
            if not problems and not extra:
                break
            if time.monotonic() > deadline:
                raise ClusterError(f"scale {group} {replicas}: not done within {READY_TIMEOUT:g}s: "
                                   f"{'; '.join(problems + [f'{n} still running' for n in extra])}")
            await asyncio.sleep(0.1)
        self.node.directory.update(self.members())
        _write_json(self.state_dir / "resolved.json", self.resolved().to_dict())
        self.write_state()
        log.info("scaled %s to %d replicas: %s", group, replicas,
                 ", ".join(f"{n}@{h}" for n, h in sorted(self.assignment.items()) if n in set(current) | set(dict(plan.add))))
        return [r for r in self.status_document()["nodes"] if self.spec.group_of(r["name"]) is template]

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
        if self.hosts is not None:  # every report is answered "stop" now: wait for each host's bye
            await self._wait_hosts_down(STOP_TIMEOUT + 5.0)
        # Two waves (see the module docstring); within a wave, in parallel.
        procs = list(self.procs.values())
        front = [p for p in procs if p.member.role not in ("replica", "function")]  # function: the pool's instances
        back = [p for p in procs if p.member.role in ("replica", "function")]
        for wave in (front, back):
            await asyncio.gather(*(self._stop_proc(p) for p in wave))
        for p in procs:
            if p.waiter is not None:
                p.waiter.cancel()
        if self.dashboard is not None:  # before the node: its actions call through it
            await self.dashboard.stop()
            self.dashboard = None
        if self.link is not None:
            await self.link.stop()  # its last report says bye
        if self.node is not None:
            await self.node.stop(drain_timeout=1.0)
        if self.ipc_dir is not None:  # sockets of nodes that could not close them (killed ones)
            shutil.rmtree(self.ipc_dir, ignore_errors=True)
        if self.state == "stopping":
            self.state = "stopped"
        self.write_state()


def _states(rows: list[dict]) -> list[tuple]:
    """What of a host's rows the state file must follow: each node's state and pid."""
    return [(r.get("name"), r.get("state"), r.get("pid")) for r in rows]


def _exit_reason(code: int | None) -> str:
    """How a node's process ended, for the nodes told it is gone (and the errors they raise)."""
    if code is not None and code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            pass
    return f"exited with code {code}"


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
