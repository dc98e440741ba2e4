"""Process groups: ring collectives between the nodes of a cluster.

Every member node hosts a ``CollectiveService``; a ``ProcessGroup`` on each names the members
in rank order. Collectives must be called in the same order on every rank, as in MPI:

    group = ProcessGroup(node, ["w0", "w1", "w2"], timeout=30)
    grads = await group.allreduce(grads, "mean")      # numpy arrays or pytrees of them
    params = await group.broadcast(params, root=0)
    await group.barrier()

Pytrees are fused: leaves of one dtype are concatenated into buckets of at most
``bucket_bytes`` (PyTorch DDP's 25 MiB), so a model with many small leaves costs a few
passes, not one per leaf. An allreduce pass takes one of three paths, the same on every rank:

* up to ``direct_bytes`` (64 KiB): every rank sends its buffer to every other and all fold the
  N buffers in rank order (``dmlsys.collective.direct``): one network hop, where the ring needs 2(N-1);
* larger, with every member on this host: shared memory (``dmlsys.collective.shm``), ZeroMQ
  carrying two small notices per rank;
* otherwise the ring (``dmlsys.collective.ring``), pipelined in ``chunk_bytes`` pieces so that
  sending, receiving and adding overlap. Allgather, broadcast and reduce-scatter always ring.

Failure is loud and bounded. A rank that waits past the group's timeout probes every member,
raises ``CollectiveError`` naming the ranks that do not answer, and tells the others to give up
too; ranks that disagree on op, dtype or size find out from the first chunk they receive, and
every rank raises. A half-reduced buffer is never returned.

Leaving is safe. A pass returns once this rank holds its result, while its own last chunks may
still wait in ZeroMQ's send queue; a transport that closes drops them (``linger=0``), and a
peer still waiting for them would time out naming a rank that exited cleanly. So when the
node stops, ``CollectiveService.stop`` has every group it hosted ``leave``: it asks every
other member ``collective.leave`` and waits (``LEAVE_TIMEOUT``, 5 s, at most) until each
has answered or said it leaves too. ZeroMQ delivers one connection's messages in order,
and the request travels on the connection our chunks took, so an answer proves the peer has
taken every chunk we sent it; a peer's own leave notice says it finished every pass it will
run, so it needs nothing more from us. A pass that starts after a member left, or that a
member left without finishing, fails at once naming it.

Inside, a pass is: ``ProcessGroup._pass`` numbers it and makes its ``PassLink``; the path sends with
``PassLink.send``; on the receiving node ``CollectiveService.chunk`` hands the message to
``ProcessGroup.deliver_chunk``, which files it in the group's ``Mailbox`` under (pass,
(step, chunk), sender); the path's ``PassLink.recv`` takes it from there. Failures (the deadline,
a peer's abort, a lost peer, ``close``) reach every waiting step through ``Mailbox.fail``.
"""

from __future__ import annotations

import asyncio
import logging
import zlib
from typing import Any

import numpy as np

from dmlsys.arrays import OPS
from dmlsys.collective import direct, ring, schedule, stream
from dmlsys.collective import shm as shm_mod
from dmlsys.collective.errors import CollectiveError, InvalidArgument
from dmlsys.collective.link import SERVICE, PassLink
from dmlsys.collective.mailbox import Mailbox
from dmlsys.collective.tree import Bucket, fuse, numeric_leaves, unfuse
from dmlsys.node import Node, NodeError, PeerUnreachable, Service, oneway, rpc

log = logging.getLogger(__name__)

# Bounds on what peers can make us hold: messages for a group this node has not created yet,
# and messages of a group that arrived before the pass that waits for them.
MAX_EARLY_BYTES = 256 << 20
MAX_EARLY_GROUPS = 64
MAX_MAIL = 1 << 16
MAX_MAIL_BYTES = 1 << 30
LEAVE_TIMEOUT = 5.0  # seconds ``leave`` waits for members at most (and never past the group's timeout)
MAX_CLOSED_GROUPS = 16  # closed groups whose leave a node stop still owes (the worker role closes one per job)


def _nbytes(body: Any) -> int:
    data = body.get("d") if isinstance(body, dict) else None
    return data.nbytes if isinstance(data, np.ndarray) else len(data) if isinstance(data, bytes) else 0


class _Expired(CollectiveError):
    """Internal: the op's deadline passed while waiting for a chunk (the group turns it into
    the CollectiveError that names who is missing)."""


class CollectiveService(Service):
    """The receiving end of every process group on this node: it hands each message to its
    group (``deliver_chunk``, ``deliver_abort``) and tells every group of a lost peer."""

    name = SERVICE

    def __init__(self) -> None:
        self.groups: dict[str, ProcessGroup] = {}
        # Groups closed with passes behind them: the node's stop still makes them leave (their
        # last chunks may still be queued), and a member's leave notice still reaches them.
        self._closed: dict[str, ProcessGroup] = {}
        self._early: dict[str, list[tuple[dict, str]]] = {}
        self._early_bytes = 0

    async def start(self, node) -> None:
        await super().start(node)
        node.on_peer_lost(self._peer_lost)

    async def stop(self) -> None:
        """Every group this node took part in leaves before the transport closes: see ``leave``."""
        groups = [*self.groups.values(), *self._closed.values()]
        if groups:
            await asyncio.gather(*(g.leave() for g in groups), return_exceptions=True)
        self._closed.clear()

    def _peer_lost(self, peer: str, reason: str) -> None:
        for group in [*self.groups.values(), *self._closed.values()]:
            group.peer_lost(peer, reason)

    def register(self, group: ProcessGroup) -> None:
        if group.name in self.groups:
            raise InvalidArgument(f"node {self.node.name!r} already has a process group named {group.name!r}")
        self.groups[group.name] = group
        for body, sender in self._early.pop(group.name, []):
            self._early_bytes -= _nbytes(body)
            group.deliver_chunk(body, sender)

    def unregister(self, group: ProcessGroup) -> None:
        if self.groups.get(group.name) is group:
            del self.groups[group.name]
        if group.ops_started and group.size > 1 and not group.left:
            self._closed.pop(group.name, None)
            self._closed[group.name] = group
            if len(self._closed) > MAX_CLOSED_GROUPS:  # the oldest has long had its chunks sent
                del self._closed[next(iter(self._closed))]

    @oneway
    def chunk(self, body, ctx) -> None:
        name = body.get("g") if isinstance(body, dict) else None
        group = self.groups.get(name) if isinstance(name, str) else None
        if group is not None:
            group.deliver_chunk(body, ctx.sender)
            return
        size = _nbytes(body)
        if self._early_bytes + size <= MAX_EARLY_BYTES and (
                str(name) in self._early or len(self._early) < MAX_EARLY_GROUPS):
            self._early.setdefault(str(name), []).append((body, ctx.sender))  # its group comes later
            self._early_bytes += size
        else:
            self.node.metrics.error("collective_dropped")

    @rpc
    def leave(self, body, ctx) -> None:
        """``{"g", "q"}``: the sender leaves group ``g`` after ``q`` passes. The answer itself is
        the point: it travels back only after every message the sender sent before it was
        handed to its group here (one connection delivers in order)."""
        name = body.get("g") if isinstance(body, dict) else None
        group = (self.groups.get(name) or self._closed.get(name)) if isinstance(name, str) else None
        q = body.get("q") if isinstance(body, dict) else None
        if group is not None and type(q) is int:
            group.peer_left(ctx.sender, q)

    @oneway
    def abort(self, body, ctx) -> None:
        if isinstance(body, dict) and (group := self.groups.get(body.get("g"))) is not None:
            group.deliver_abort(body, ctx.sender)

    def status(self) -> dict[str, Any]:
        return {name: {"rank": g.rank, "size": g.size, "ops": g.ops} for name, g in self.groups.items()}


class ProcessGroup:
    """Rank ``members.index(node.name)`` of a group of ``len(members)`` nodes.

    Besides the collectives, three methods form the receiving side, called by this node's
    ``CollectiveService``: ``deliver_chunk`` and ``deliver_abort`` (a peer's message) and
    ``peer_lost`` (the supervisor saw a member's process exit)."""

    def __init__(self, node: Node, members: list[str], *, name: str = "default", timeout: float = 30.0,
                 chunk_bytes: int = 2 << 20, bucket_bytes: int = 25 << 20, direct_bytes: int = 64 << 10,
                 shm: bool | None = None, stream: bool | None = None) -> None:
        if node.name not in members:
            raise InvalidArgument(f"node {node.name!r} is not among the group's members {members}")
        if len(set(members)) != len(members):
            raise InvalidArgument(f"group members must be distinct, got {members}")
        if timeout <= 0 or chunk_bytes < 1 or bucket_bytes < 1:
            raise InvalidArgument("timeout, chunk_bytes and bucket_bytes must be positive")
        try:
            service = node.service(CollectiveService.name)
        except KeyError:
            raise InvalidArgument(f"node {node.name!r} hosts no CollectiveService; add one before start()") from None
        self.node = node
        self.members = list(members)
        self.name = name
        self.rank = members.index(node.name)
        self.size = len(members)
        self.timeout = timeout
        self.chunk_bytes = chunk_bytes
        self.bucket_bytes = bucket_bytes
        # Allreduce paths: up to direct_bytes every rank sends its whole buffer to every other
        # and all fold the N buffers in rank order (one network hop instead of the ring's
        # 2(N-1)); above it, shared memory when every member is on this host (shm=None decides
        # from the members' addresses), else the ring.
        self.direct_bytes = direct_bytes
        self.ops = 0  # completed collective passes, for status
        self._use_shm = shm
        # The ring allreduce's data over a plain TCP connection per neighbour (collective.stream):
        # None decides from the members' addresses (all tcp://) and keys (none: the data would
        # go unencrypted where the rest of the cluster is encrypted; True says that is wanted).
        self._use_stream = stream
        self._streams: stream.StreamState | None = None
        self._stream_hosts: list[str] = []  # each member's host, as its ZeroMQ address names it
        self._shm = shm_mod.ShmState(f"{node.name}-{name}")
        self._pool = ring.BufferPool()  # results and private send copies of large passes, reused
        self._ranks = {m: i for i, m in enumerate(self.members)}
        self._who = f"group {name!r} rank {self.rank} ({node.name})"
        self._service: CollectiveService = service  # type: ignore[assignment]
        self._seq = 0  # the next pass's sequence number; every rank counts the same
        self._mailbox = Mailbox(max_messages=MAX_MAIL, max_bytes=MAX_MAIL_BYTES, size=_nbytes)
        self._closed = False
        self._lock = asyncio.Lock()
        self._link: PassLink | None = None  # the pass in progress
        self._left: dict[int, int] = {}  # rank -> passes it ran before it left the group
        self._lost: set[int] = set()  # ranks whose process exited (peer_lost)
        self._said: dict[int, asyncio.Future] = {}  # rank -> resolved when it leaves or is lost, for leave()
        self.left = False  # leave() has run
        service.register(self)

    @property
    def _probe_budget(self) -> float:
        return min(2.0, self.timeout / 4)

    @property
    def ops_started(self) -> int:
        """Passes this rank has started (every rank numbers them alike)."""
        return self._seq

    def close(self) -> None:
        """Leave the group: a pass in progress raises ``CollectiveError``, later calls too.

        Our last chunks may still be in the transport's send queue: they go as long as the
        node runs, and its stop makes the group ``leave`` first, so they are not lost."""
        if self._closed:
            return
        self._closed = True
        if self._link is not None:
            self._mailbox.fail(self._link.seq, CollectiveError(f"{self._who}: the group was closed"))
        self._service.unregister(self)
        self._shm.close()
        if self._streams is not None:
            self._streams.close()
        self._pool.clear()

    async def leave(self, timeout: float | None = None) -> None:
        """Close the group, then wait until no member can still need a message from us: each
        has answered our ``collective.leave`` request, or has said it leaves too, or was lost
        (``peer_lost``), or ``timeout`` passed (default ``min(LEAVE_TIMEOUT, timeout of the
        group)``: a member that crashed answers nothing). The node's stop calls this before
        its transport closes, since closing drops what is still queued.

        The request leaves on the connection our chunks took, after them, and a connection
        delivers in order: an answer proves the member has taken every chunk we sent it. A
        member's own request says it ran every pass it will run: it needs nothing more from
        us, and our answer to it (on the reply connection, which carries no bulk data) or our
        own request tells it that we leave."""
        self.close()
        if self.left:
            return
        self.left = True
        async with self._lock:  # a pass failed by close() unwinds first
            passes = self._seq
        if passes == 0 or self.size == 1:
            return
        bound = min(LEAVE_TIMEOUT, self.timeout) if timeout is None else timeout
        loop = asyncio.get_running_loop()
        body = {"g": self.name, "q": passes}

        async def ask(peer: str) -> None:
            try:
                await self.node.call(peer, SERVICE, "leave", body, timeout=bound)
            except NodeError:  # gone, or too old to know leave: either way nothing to wait for
                pass

        waits = []
        for rank, peer in enumerate(self.members):
            if rank == self.rank or rank in self._left or rank in self._lost:
                continue  # it said it leaves, or died: it needs nothing of ours
            said = self._said.setdefault(rank, loop.create_future())  # peer_left or peer_lost
            waits.append((loop.create_task(ask(peer)), said))
        try:
            async with asyncio.timeout(bound):
                await asyncio.gather(*(asyncio.wait(w, return_when=asyncio.FIRST_COMPLETED) for w in waits))
        except TimeoutError:
            log.info("%s: left without every member's answer after %gs", self._who, bound)
        finally:
            for asked, _ in waits:
                asked.cancel()

    @property
    def uses_shm(self) -> bool:
        """Whether large allreduces go through shared memory (decided on first use)."""
        if self._use_shm is None:
            # Every rank asks the same question of the same address table: all decide alike.
            self._use_shm = shm_mod.available() and all(self.node.transport.is_local(m) for m in self.members)
        return self._use_shm

    @property
    def uses_stream(self) -> bool:
        """Whether ring allreduces carry their data over plain TCP (decided on first use)."""
        if self._use_stream is None or (self._use_stream and self._streams is None):
            transport = self.node.transport
            addresses = {**transport.peers(), self.node.name: transport.address}
            missing = [m for m in self.members if not str(addresses.get(m, "")).startswith("tcp://")]
            if missing:
                if self._use_stream:
                    raise InvalidArgument(f"{self._who}: stream=True needs every member on tcp://, but "
                                          f"{', '.join(missing)} is not")
                self._use_stream = False
            elif self._use_stream is None:
                self._use_stream = not transport.authenticated
            if self._use_stream:
                self._streams = stream.StreamState(stream.host_of(transport.address))
                self._stream_hosts = [stream.host_of(addresses[m]) for m in self.members]
        return bool(self._use_stream)

    # -- public collectives -----------------------------------------------------------------

    async def allreduce(self, tree: Any, op: str = "sum") -> Any:
        """Reduce every leaf elementwise across ranks; every rank gets the same bits."""
        if op not in OPS:
            raise InvalidArgument(f"unknown op {op!r}; known: {', '.join(OPS)}")
        leaves, rebuild = numeric_leaves(tree)
        out = list(leaves)
        for bucket in _buckets(leaves, self.bucket_bytes):
            reduced = await self._pass("allreduce", op, bucket.flat, layout=_layout(bucket.shapes))
            if op == "mean":
                reduced = reduced / self.size if reduced.dtype.kind in "biu" else np.divide(reduced, self.size, out=reduced)
            if len(bucket.indices) == 1:  # np.prod in unfuse costs more than a small pass's reduction
                out[bucket.indices[0]] = reduced.reshape(bucket.shapes[0])
            else:
                unfuse(bucket, reduced, out)
        return rebuild(out)

    async def reduce_scatter(self, array: Any, op: str = "sum") -> np.ndarray:
        """This rank's segment ``schedule.segments(array.size, size)[rank]`` of the reduced,
        flattened array."""
        if op not in OPS:
            raise InvalidArgument(f"unknown op {op!r}; known: {', '.join(OPS)}")
        flat = np.ascontiguousarray(np.asarray(array)).reshape(-1)
        reduced = await self._pass("reduce_scatter", op, flat, layout=_layout([np.shape(array)]))
        a, b = schedule.segments(flat.size, self.size)[self.rank]
        seg = reduced[a:b].copy()
        if op == "mean":
            seg = seg / self.size
        return seg

    async def allgather(self, tree: Any) -> Any:
        """Every rank's leaves stacked along a new first axis of length ``size``."""
        leaves, rebuild = numeric_leaves(tree)
        out = list(leaves)
        for bucket in fuse(leaves, self.bucket_bytes):
            gathered = await self._pass("allgather", "gather", bucket.flat, layout=_layout(bucket.shapes))
            unfuse(bucket, gathered.reshape(self.size, -1), out, stacked=self.size)
        return rebuild(out)

    async def broadcast(self, tree: Any, root: int = 0) -> Any:
        """Rank ``root``'s values, in the structure every rank passes in."""
        if not 0 <= root < self.size:
            raise InvalidArgument(f"broadcast root {root} out of range for group size {self.size}")
        leaves, rebuild = numeric_leaves(tree)
        out = list(leaves)
        for bucket in fuse(leaves, self.bucket_bytes):
            got = await self._pass("broadcast", f"root{root}", bucket.flat, root=root, layout=_layout(bucket.shapes))
            unfuse(bucket, got, out)
        return rebuild(out)

    async def barrier(self) -> None:
        """Return only when every rank has called barrier."""
        await self._pass("barrier", "sum", np.zeros(1, np.uint8))

    # -- one pass ---------------------------------------------------------------------------

    async def _pass(self, kind: str, op: str, flat: np.ndarray, root: int = 0, layout: str = "") -> np.ndarray:
        async with self._lock:
            if self._closed:
                raise CollectiveError(f"{self._who}: the group is closed")
            seq = self._seq
            self._seq += 1
            # The leaves' shapes are in the signature too: same-size buffers of different shapes
            # would otherwise be reduced elementwise into garbage without a word.
            sig = f"{kind}:{op}:{flat.dtype.str}:{flat.size}:{layout}"
            link = self._link = PassLink(node=self.node, group=self.name, members=self.members, rank=self.rank,
                                     seq=seq, sig=sig, mailbox=self._mailbox, chunk_bytes=self.chunk_bytes,
                                     pool=self._pool, shm=self._shm, who=self._who)
            ok = False
            loop = asyncio.get_running_loop()
            # Keep a quarter of the timeout (at most 2 s) for finding out who is missing, so
            # that the error is raised within the timeout, not after it.
            timer = loop.call_at(loop.time() + self.timeout - self._probe_budget, self._expire, seq)
            try:
                if self._left:
                    gone = sorted(r for r, q in self._left.items() if q <= seq)
                    if gone:
                        raise self._left_error(*gone)
                self._check_early(link)
                if self.size == 1:
                    result = flat.copy()
                elif kind == "broadcast":
                    result = await ring.broadcast(link, flat, root)
                elif kind == "allgather":
                    result = await ring.allgather(link, flat)
                elif kind != "reduce_scatter" and flat.nbytes <= self.direct_bytes:
                    result = await direct.allreduce(link, OPS[op], flat)
                elif kind != "reduce_scatter" and self.uses_shm:
                    result = await shm_mod.allreduce(link, OPS[op], flat)
                elif kind == "allreduce" and self.uses_stream:
                    succ = (self.rank + 1) % self.size
                    result = await stream.allreduce(link, self._streams, self._stream_hosts[succ], OPS[op], flat,
                                                    self.members[(self.rank - 1) % self.size], self.members[succ],
                                                    self._probe_budget)
                else:
                    result = await ring.allreduce(link, OPS[op], flat, gather=kind != "reduce_scatter")
                ok = True
            except _Expired:
                raise await self._diagnose(kind, link) from None
            except CollectiveError as e:
                self._tell_others(seq, str(e), e.missing)
                raise
            finally:
                if not ok:
                    self._shm.drop()  # peers of a failed pass may never have mapped our segment
                timer.cancel()
                self._link = None
                self._mailbox.finish(seq)
            self.ops += 1
            return result

    def _check_early(self, link: PassLink) -> None:
        """A message of this pass that came before we started it may already disagree."""
        for _tag, src, body in self._mailbox.held(link.seq):
            if body["sig"] != link.sig:
                raise link.disagreement(body["sig"], src)

    # -- the receiving side (called by CollectiveService) -------------------------------------

    def deliver_chunk(self, body: dict, sender: str) -> None:
        """File a peer's message in the mailbox under ``(pass, (step, chunk), sender's rank)``."""
        src = self._ranks.get(sender)
        try:
            seq, step, ci = int(body["q"]), int(body["t"]), int(body["c"])
            sig = body["sig"]
        except (KeyError, TypeError, ValueError):
            sig = None
        if type(sig) is not str or src is None:
            self.node.metrics.error("collective_malformed")
            return
        box = self._mailbox
        if seq < box.done_below:
            return  # a duplicate or a straggler from a finished pass
        link = self._link
        if link is not None and seq == link.seq and sig != link.sig:
            # Disagreeing ranks may run different algorithms whose messages we would never
            # wait for: fail the pass now rather than at the timeout.
            box.fail(seq, link.disagreement(sig, src))
            return
        if not box.put(seq, (step, ci), src, body):
            self.node.metrics.error("collective_dropped")

    def deliver_abort(self, body: dict, sender: str) -> None:
        """A peer gave up on a pass (it timed out, or saw a disagreement): so do we."""
        try:
            seq = int(body["q"])
            missing = [int(m) for m in body.get("missing", [])]
            reason = str(body.get("reason", ""))
        except (KeyError, TypeError, ValueError):
            self.node.metrics.error("collective_malformed")
            return
        if seq < self._mailbox.done_below or self._mailbox.failure(seq) is not None:
            return
        self._mailbox.fail(seq, CollectiveError(f"{self._who}: aborted by {sender}: {reason}", missing=missing))

    def peer_left(self, peer: str, passes: int) -> None:
        """``peer`` left the group after running ``passes`` passes: a pass it will not run
        (the one in progress, if it never finished it, and every later one) fails naming it,
        now rather than at the timeout; and our own ``leave`` stops waiting for it."""
        rank = self._ranks.get(peer)
        if rank is None or rank == self.rank:
            return
        self._left[rank] = passes
        said = self._said.get(rank)
        if said is not None and not said.done():
            said.set_result(None)
        link = self._link
        if link is not None and link.seq >= passes:
            self._mailbox.fail(link.seq, self._left_error(rank))

    def _left_error(self, *ranks: int) -> CollectiveError:
        names = ", ".join(f"rank {r} ({self.members[r]}) after {self._left[r]} passes" for r in ranks)
        return CollectiveError(f"{self._who}: left the group: {names}", missing=list(ranks))

    def peer_lost(self, peer: str, reason: str) -> None:
        """``peer``'s process exited (the supervisor saw it): a pass it takes part in cannot
        finish, so it fails now, naming that rank, rather than at the group's timeout."""
        link = self._link
        rank = self._ranks.get(peer)
        if rank is None or rank == self.rank:
            return
        self._lost.add(rank)  # a dead peer needs nothing more from us: leave() stops waiting for it
        said = self._said.get(rank)
        if said is not None and not said.done():
            said.set_result(None)
        if link is not None:
            self._mailbox.fail(link.seq, CollectiveError(f"{self._who}: rank {rank} ({peer}) {reason}", missing=[rank]))

    # -- failure ----------------------------------------------------------------------------

    def _expire(self, seq: int) -> None:
        if self._mailbox.failure(seq) is None:
            self._mailbox.fail(seq, _Expired(f"{self._who}: pass {seq} timed out"))

    async def _diagnose(self, kind: str, link: PassLink) -> CollectiveError:
        """Who is missing? Ask everyone; name those that do not answer (else the rank we wait for)."""
        others = [m for m in self.members if m != self.node.name]
        probe_timeout = self._probe_budget

        async def alive(peer: str) -> bool:
            try:
                await self.node.call(peer, "node", "ping", None, timeout=probe_timeout)
                return True
            except NodeError:
                return False

        answers = await asyncio.gather(*(alive(p) for p in others))
        dead = [self.members.index(p) for p, ok in zip(others, answers) if not ok]
        missing = dead or [link.waiting_on]
        names = ", ".join(f"rank {i} ({self.members[i]})" for i in missing)
        verdict = "not answering" if dead else "alive but never sent its part"
        error = CollectiveError(f"{kind} #{link.seq} on group {self.name!r}: rank {self.rank} timed out after "
                                f"{self.timeout:g}s; missing: {names} ({verdict})", missing=missing)
        self._tell_others(link.seq, str(error), missing)
        return error

    def _tell_others(self, seq: int, reason: str, missing: list[int]) -> None:
        for i, peer in enumerate(self.members):
            if i == self.rank or i in missing:
                continue
            try:
                self.node.send(peer, CollectiveService.name, "abort",
                               {"g": self.name, "q": seq, "missing": missing, "reason": reason})
            except PeerUnreachable:
                pass


def _buckets(leaves: list[np.ndarray], bucket_bytes: int) -> list[Bucket]:
    """``fuse``, but a lone leaf (one gradient buffer, the benchmark's array) goes as a view,
    not a copy: every pass reads its input without writing it or keeping it past return."""
    if len(leaves) == 1 and leaves[0].flags.c_contiguous:
        return [Bucket(leaves[0].reshape(-1), [0], [leaves[0].shape])]
    return fuse(leaves, bucket_bytes)


def _layout(shapes: list[tuple[int, ...]]) -> str:
    """The shapes of a bucket's leaves, spelled out when short, else counted and hashed."""
    text = ",".join("x".join(map(str, s)) or "()" for s in shapes)
    return text if len(text) <= 40 else f"{len(shapes)} leaves #{zlib.crc32(text.encode()):08x}"
