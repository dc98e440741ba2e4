"""A pass's link to the other ranks: all that an allreduce path sees of its process group.

The paths (``direct``, ``ring``, ``shm``) are algorithms; the :class:`~dmlsys.collective.group.ProcessGroup`
owns the node, the mailbox, the deadline and the failure handling. Between them stands a
:class:`PassLink`, made for one pass: it knows the pass's number and signature, so a path only says
*where* a message goes (rank, step, chunk) and *what* it carries::

    link.send(nxt, step, ci, data)                    # zero-copy: data must not change after
    data = await link.recv(step, ci, length, dtype)   # from the ring predecessor, checked
    body = await link.recv_message(step, ci, src=j)   # a notice from rank j, signature checked

A chunk on the wire is a dict: ``g`` group name, ``q`` pass number, ``t`` step, ``c`` chunk index
(on the direct and shared-memory paths: the sender's rank), ``sig`` the pass's signature,
``d`` the data (a numpy array, sent as a zero-copy frame), plus any path-specific fields.
Every received message's signature is compared with ours: ranks that call different
collectives (op, dtype, size, shapes) find out from the first message, and name each other.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from dmlsys.collective.errors import CollectiveError
from dmlsys.collective.mailbox import Mailbox
from dmlsys.node import Node, NodeError, PeerUnreachable

if TYPE_CHECKING:
    from dmlsys.collective.ring import BufferPool
    from dmlsys.collective.shm import ShmState

SERVICE = "collective"  # the receiving end's service name on every member node


class PassLink:
    """Rank ``rank`` of ``size``, during pass ``seq`` whose signature is ``sig``. (Not to be
    confused with ``dmlsys.wire.sim.Link``, the simulated network's model of a wire.)

    ``pool`` hands out large result and send buffers (``ring.BufferPool``); ``shm`` is the
    group's shared-memory state; ``who`` names this rank in error messages; ``waiting_on`` is
    the rank whose message the pass last asked for (the one a timeout blames)."""

    __slots__ = (
        "_box",
        "_group",
        "_node",
        "chunk_bytes",
        "members",
        "pool",
        "rank",
        "seq",
        "shm",
        "sig",
        "size",
        "waiting_on",
        "who",
    )

    def __init__(self, *, node: Node, group: str, members: list[str], rank: int, seq: int, sig: str,
                 mailbox: Mailbox, chunk_bytes: int, pool: BufferPool, shm: ShmState, who: str) -> None:
        self._node = node
        self._group = group
        self.members = members
        self._box = mailbox
        self.rank = rank
        self.size = len(members)
        self.seq = seq
        self.sig = sig
        self.chunk_bytes = chunk_bytes
        self.pool = pool
        self.shm = shm
        self.who = who
        self.waiting_on = (rank - 1) % self.size

    def send(self, rank: int, step: int, ci: int, data: np.ndarray | None, **extra: Any) -> None:
        """Send one message of this pass to ``rank``; ``data`` leaves zero-copy, so it must not
        be written until the transport is done with it (the buffer pool knows when).

        Raises:
            CollectiveError: ``rank`` is unreachable; it is named as missing.
        """
        peer = self.members[rank]
        body = {"g": self._group, "q": self.seq, "t": step, "c": ci, "sig": self.sig, "d": data}
        if extra:
            body.update(extra)
        try:
            self._node.send(peer, SERVICE, "chunk", body)
        except PeerUnreachable as e:
            raise CollectiveError(f"{self.who}: cannot send to rank {rank} ({peer}): {e}", missing=[rank]) from None

    async def recv_message(self, step: int, ci: int, src: int) -> dict:
        """Rank ``src``'s message ``(step, ci)`` of this pass, once its signature matched ours.

        Raises:
            CollectiveError: the ranks disagree, or the pass failed while we waited.
        """
        self.waiting_on = src
        body = await self._box.get(self.seq, (step, ci), src)
        if body["sig"] != self.sig:
            raise self.disagreement(body["sig"], src)
        return body

    async def recv(self, step: int, ci: int, length: int, dtype: np.dtype, src: int | None = None) -> np.ndarray:
        """The array of ``length`` x ``dtype`` in message ``(step, ci)`` from ``src`` (default:
        the ring predecessor). Received frames are private to us: a path may fold into them
        and forward them as they are.

        Raises:
            CollectiveError: a malformed chunk (naming its sender), a disagreement, a failed pass.
        """
        if src is None:
            src = (self.rank - 1) % self.size
        # recv_message's lines, inlined: one coroutine less per chunk on the ring's hot path.
        self.waiting_on = src
        body = await self._box.get(self.seq, (step, ci), src)
        if body["sig"] != self.sig:
            raise self.disagreement(body["sig"], src)
        data = body["d"]
        if not isinstance(data, np.ndarray) or data.dtype != dtype or data.size != length:
            raise CollectiveError(f"{self.who}: malformed chunk from {self.members[src]}: expected {length} x {dtype}")
        return data

    async def alive(self, rank: int, timeout: float) -> bool:
        """Whether rank ``rank`` answers a ping within ``timeout`` seconds."""
        try:
            await self._node.call(self.members[rank], "node", "ping", None, timeout=timeout)
            return True
        except NodeError:
            return False

    async def failure(self) -> None:
        """Returns never; raises the pass's failure when it fails (the deadline, an abort, a
        lost peer, close): for a path that waits on something other than the mailbox."""
        await self._box.get(self.seq, ("failure",), -1)  # an address no message is ever sent to

    def disagreement(self, theirs: str, src: int) -> CollectiveError:
        """The error for rank ``src`` having called ``theirs`` while we called this pass."""
        return disagreement(self.who, theirs, self.sig, src, self.members[src], self.rank)


def disagreement(who: str, theirs: str, ours: str, src: int, src_name: str, rank: int) -> CollectiveError:
    return CollectiveError(
        f"{who}: ranks disagree: rank {src} ({src_name}) called {describe(theirs)} but rank {rank} called "
        f"{describe(ours)}; every rank must make the same collective calls with the same op, dtype and shapes")


def describe(sig: str) -> str:
    """A pass's signature ``kind:op:dtype:size:layout`` as a reader would write the call."""
    try:
        kind, op, dtype, size, layout = sig.split(":")
        return f"{kind}({op}, {np.dtype(dtype).name}[{size}]{' as ' + layout if layout else ''})"
    except (ValueError, TypeError):
        return repr(sig)[:80]
