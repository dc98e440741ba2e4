"""One cluster on several hosts: the primary's view of the other hosts, and a secondary's link to it.

One supervisor is the **primary**: the one at ``cluster.supervisor``, on the host with that
address. It decides where every member runs (:meth:`ClusterSpec.placement` at ``up``,
:func:`dmlsys.cluster.placement.place` at ``scale``) and keeps the cluster's member list. The
supervisor of every other host (``up SPEC --host NAME`` there) is a **secondary**: it reports
to the primary every ``REPORT_PERIOD`` seconds, and each reply tells it what to run::

    secondary -> primary   cluster.report {host, supervisor, members (with the ports picked
                                           there), rows (their states), lost (its nodes that
                                           died since), seq (the last event it has seen)}
    primary -> secondary   {assignment (the members this host must run), members (every other
                            host's), rows, events (nodes lost elsewhere since seq), seq, stop}

A secondary reconciles: it starts assigned members it does not run (picking their ports on its
own address) and stops the ones no longer assigned. Nothing flows from the primary unasked, so
the order hosts start in does not matter: a secondary up before the primary keeps trying, in
state ``waiting``, and joins when the primary answers; a primary waits (``join_timeout``) for
hosts that have members assigned. ``down`` on the primary answers ``stop`` to every report and
waits for each host's last report (``bye``) before it stops its own nodes.

**A host that dies.** When a host's reports stop for ``HOST_TIMEOUT`` seconds the primary marks
it ``lost``: its members leave the member list (so balancers and directories drop them), every
node is told ``node.peer_lost`` for each (calls waiting on them fail over at once, a collective
pass fails naming the rank, as for a dead process), and ``status`` shows them ``lost`` with the
host's reason. When the host's supervisor comes back (``up --host NAME`` again) its next report
is a join like the first. A secondary that loses the primary tells its own nodes the same about
every other host's members and goes on trying to report.

**A model saved on another host.** Rank 0 of a training job saves into its own host's store;
when that is not the primary's, the primary pulls the version into the cluster's store at once
(:func:`pull_model`: a secondary's supervisor serves its own store as service ``hoststore``, and
the primary reads it with the fetcher replicas use, so streamed, checked by SHA-256 per file
and by the card's ``params_sha``, written atomically). ``train`` returns only once it is there,
so replicas of every host find it where they look. ``train`` asked of a secondary goes to the
primary, which chooses the workers.

The link from a secondary is a client node named ``cli-host-NAME``: every holder of the cluster
key can act as the command line (docs/security.md), and the primary admits it as it admits
``status`` and ``scale`` from a shell.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dmlsys.node import Member

if TYPE_CHECKING:
    from dmlsys.cluster.supervisor import Supervisor

log = logging.getLogger("dmlsys.supervisor")

REPORT_PERIOD = 0.5
HOST_TIMEOUT = 3.0  # seconds without a report before a host is lost
MAX_EVENTS = 1024


@dataclasses.dataclass
class HostView:
    """What the primary knows of one other host."""

    name: str
    state: str = "waiting"  # waiting (never joined), up, lost, stopped (said bye)
    supervisor: str | None = None
    members: dict[str, Member] = dataclasses.field(default_factory=dict)
    rows: list[dict] = dataclasses.field(default_factory=list)
    last_seen: float = 0.0
    error: str | None = None
    joins: int = 0

    def summary(self, now: float) -> dict[str, Any]:
        return {"state": self.state, "supervisor": self.supervisor, "error": self.error, "joins": self.joins,
                "last_report": round(now - self.last_seen, 1) if self.last_seen else None}


class Hosts:
    """The primary's registry of the other hosts: reports in, replies out, silent hosts lost.
    Clock passed in (``now``), so the bookkeeping is testable without waiting."""

    def __init__(self, names: list[str]) -> None:
        self.views = {n: HostView(n) for n in names}
        self.events: list[tuple[int, str, str]] = []  # (seq, member, reason): nodes lost anywhere
        self.seq = 0

    def event(self, name: str, reason: str) -> None:
        self.seq += 1
        self.events.append((self.seq, name, reason))
        del self.events[:-MAX_EVENTS]

    def events_since(self, seq: int) -> list[dict]:
        return [{"name": n, "reason": r} for s, n, r in self.events if s > seq]

    def report(self, body: dict, now: float) -> tuple[HostView, bool]:
        """Take one report; (the host's view, whether it (re)joined with it)."""
        view = self.views[body["host"]]
        joined = view.state in ("waiting", "lost", "stopped")
        view.state = "stopped" if body.get("bye") else "up"
        view.supervisor = body.get("supervisor")
        view.members = {m["name"]: Member.from_dict(m) for m in body.get("members", [])}
        view.rows = [dict(r, host=view.name) for r in body.get("rows", [])]
        view.last_seen = now
        view.error = body.get("error")
        if joined and not body.get("bye"):
            view.joins += 1
        for lost in body.get("lost", []):
            self.event(str(lost["name"]), str(lost["reason"]))
        return view, joined and not body.get("bye")

    def expire(self, now: float, timeout: float = HOST_TIMEOUT) -> list[HostView]:
        """Hosts silent for ``timeout`` seconds, now marked lost (each once)."""
        lost = []
        for view in self.views.values():
            if view.state == "up" and now - view.last_seen > timeout:
                view.state = "lost"
                view.error = f"no report from its supervisor for {now - view.last_seen:.1f}s (host down or cut off)"
                for name in view.members:
                    self.event(name, f"host {view.name} lost: {view.error}")
                lost.append(view)
        return lost

    def members(self) -> list[Member]:
        return [m for v in self.views.values() if v.state == "up" for m in v.members.values()]

    def rows(self, assigned: dict[str, str]) -> list[dict]:
        """Every other host's rows; members assigned to a host that is not up show why."""
        out = []
        for view in self.views.values():
            seen = set()
            for row in view.rows:
                seen.add(row["name"])
                out.append(row if view.state == "up" else dict(row, state="lost" if view.state == "lost" else "stopped",
                                                               pid=None))
            for name, host in assigned.items():
                if host == view.name and name not in seen:
                    out.append({"name": name, "role": "?", "pid": None, "zmq": "-", "admin": None, "host": host,
                                "state": f"waiting for host {host}" if view.state == "waiting" else view.state,
                                "restarts": 0, "model": None})
        return out


class Link:
    """A secondary's reports to the primary, from a client node of its own (``cli-host-NAME``)."""

    def __init__(self, sup: Supervisor, primary_address: str) -> None:
        self.sup = sup
        self.primary_address = primary_address
        self.node = None
        self.seq = 0
        self.joined = asyncio.Event()
        self.last_ok = 0.0
        self.primary_lost = False
        self.task: asyncio.Task | None = None
        self._lost_pending: list[dict] = []

    async def start(self) -> None:
        from dmlsys.assembly import ZmqTransports, build_node

        name = f"cli-host-{self.sup.host}"
        address = f"tcp://{self.sup.spec.hosts[self.sup.host]}:0"
        self.node = build_node(Member(name, "client", address), ZmqTransports(keys=self.sup.keys))
        await self.node.start()
        self.node.transport.add_peer("supervisor", self.primary_address)
        self.task = asyncio.get_running_loop().create_task(self._run())

    def node_lost(self, name: str, reason: str) -> None:
        self._lost_pending.append({"name": name, "reason": reason})

    async def call(self, method: str, body: Any, timeout: float = 30.0) -> Any:
        return await self.node.call("supervisor", "cluster", method, body, timeout=timeout)

    async def store(self, method: str, body: Any) -> Any:
        """The relay of this host's ``store`` service: the primary's answers it."""
        return await self.node.call("supervisor", "store", method, body, timeout=30.0)

    async def report(self, *, bye: bool = False, timeout: float = 2.0) -> dict:
        sup = self.sup
        lost, self._lost_pending = self._lost_pending, []
        body = {"host": sup.host, "supervisor": sup.node.transport.address if sup.node else None,
                "members": [p.member.to_dict() for p in sup.procs.values()],
                "rows": [p.row() for p in sup.procs.values()], "lost": lost, "seq": self.seq, "bye": bye,
                "error": sup.error}
        try:
            return await self.node.call("supervisor", "cluster", "report", body, timeout=timeout)
        except BaseException:
            self._lost_pending[:0] = lost  # told next time
            raise

    async def _run(self) -> None:
        from dmlsys.node import NodeError

        waited_since = time.monotonic()
        said = 0.0
        while True:
            try:
                reply = await self.report()
            except NodeError as e:
                now = time.monotonic()
                if not self.joined.is_set() and now - said > 10:
                    said = now
                    log.info("host %s: waiting for the primary supervisor at %s (%s; %.0fs so far)",
                             self.sup.host, self.primary_address, e, now - waited_since)
                if self.joined.is_set() and not self.primary_lost and now - self.last_ok > HOST_TIMEOUT:
                    self.primary_lost = True
                    log.error("host %s: lost the primary supervisor at %s (%s); its nodes and other hosts' are "
                              "reported lost here; still trying", self.sup.host, self.primary_address, e)
                    self.sup.remote_lost(f"primary supervisor unreachable: {e}")
                await asyncio.sleep(REPORT_PERIOD)
                continue
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("host %s: report to the primary failed", self.sup.host)
                await asyncio.sleep(REPORT_PERIOD)
                continue
            self.last_ok = time.monotonic()
            if self.primary_lost:
                log.info("host %s: the primary supervisor answers again", self.sup.host)
                self.primary_lost = False
                if (self.sup.error or "").startswith("lost the primary"):
                    self.sup.error = None
                    self.sup.write_state()
            if not self.joined.is_set():
                log.info("host %s joined the cluster at %s", self.sup.host, self.primary_address)
            self.seq = int(reply.get("seq", self.seq))
            await self.sup.apply_reply(reply)
            self.joined.set()
            await asyncio.sleep(REPORT_PERIOD)

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        if self.node is not None:
            from dmlsys.node import NodeError

            try:
                await self.report(bye=True, timeout=2.0)
            except NodeError as e:  # the primary is gone already: it will count us lost instead
                log.info("host %s: no bye to the primary (%s)", self.sup.host, e)
            await self.node.stop(drain_timeout=0)


# -- models saved on another host ---------------------------------------------------------------

HOST_STORE = "hoststore"  # a secondary's own model store, served to the primary (read only)


def host_store_service(root: str):
    """The service a secondary's supervisor serves its own model store under: ``store`` there is
    a relay to the primary's, so a model that rank 0 saved on this host is reachable only here."""
    from dmlsys.train.transfer import TransferService

    class HostStore(TransferService):
        name = HOST_STORE

    return HostStore(root)


class _AsHostStore:
    """A node whose calls to service ``store`` go to ``hoststore``: the fetcher of
    :mod:`dmlsys.train.transfer` (streamed, per-file SHA-256, retried, atomic rename, the card's
    params_sha) reads the other host's own store through it."""

    def __init__(self, node) -> None:
        self._node = node

    async def call(self, peer: str, service: str, method: str, body: Any, *, timeout: float) -> Any:
        return await self._node.call(peer, HOST_STORE if service == "store" else service, method, body, timeout=timeout)


@contextlib.asynccontextmanager
async def _to_host(sup: Supervisor, host: str):
    """A short-lived client node of the primary that reaches ``host``'s supervisor as "supervisor"."""
    from dmlsys.assembly import ZmqTransports, build_node
    from dmlsys.node import Member
    from dmlsys.train.transfer import TransferError

    view = sup.hosts.views.get(host) if sup.hosts is not None else None
    if view is None or view.state != "up" or not view.supervisor:
        raise TransferError(f"host {host} is not up (its supervisor is not known here)")
    address = sup.spec.hosts.get(sup.host) or "127.0.0.1"
    client = build_node(Member(f"cli-store-{host}", "client", f"tcp://{address}:0"), ZmqTransports(keys=sup.keys))
    await client.start()
    try:
        client.transport.add_peer("supervisor", view.supervisor)
        yield client
    finally:
        await client.stop(drain_timeout=0)


async def sync_model_to(sup: Supervisor, host: str, model: str) -> int | None:
    """The primary, before rank 0 on ``host`` trains ``model``: that host's store gets the
    cluster's latest version first (``cluster.sync_model`` there), so rank 0 numbers the new one
    as the cluster's store would (the store takes the highest version + 1)."""
    async with _to_host(sup, host) as client:
        return await client.call("supervisor", "cluster", "sync_model", {"model": model}, timeout=600.0)


async def pull_model(sup: Supervisor, host: str, model: str, version: int) -> bool:
    """The primary: make ``model`` v``version``, saved by a node of ``host`` into that host's own
    store, present in the cluster's store (this supervisor's). Returns whether it was fetched
    (False: it is here already, a shared directory say).

    Raises TransferError (names the host and the file) when it cannot be fetched, or when the
    cluster's store holds another model under that version (its params_sha differs)."""
    from dmlsys.train.store import ModelStore
    from dmlsys.train.transfer import Fetcher, TransferError, fetch_model

    target = Path(sup.resolved().store)
    async with _to_host(sup, host) as client:
        fetcher = Fetcher(_AsHostStore(client), "supervisor")
        manifest = await fetcher.manifest({"kind": "model", "model": model, "version": version})
        if (target / model / str(version) / "card.json").is_file():
            here = ModelStore(target).card(model, version).get("params_sha")
            if here != manifest["card"].get("params_sha"):
                raise TransferError(f"model {model!r} v{version} saved on host {host} differs from the cluster "
                                    f"store's v{version} (params_sha {str(manifest['card'].get('params_sha'))[:12]} "
                                    f"vs {str(here)[:12]}): it stays in {host}'s store only")
            return False
        await fetch_model(fetcher.node, "supervisor", target, model, version, manifest=manifest, fetcher=fetcher)
    log.info("pulled model %r v%d from host %s's store into the cluster's (%s)", model, version, host, target)
    return True
