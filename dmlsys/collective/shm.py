"""Shared-memory allreduce for ranks on one host: ZeroMQ carries only two small messages a rank.

Over sockets every byte is copied into the kernel and out again, and on a small machine the
ranks' wake-ups take turns on the same cores. When every member is on this host, each rank
instead owns a file in ``/dev/shm`` that every other rank maps read-only, and an allreduce of
L elements costs each rank about three passes over memory and no system call on the data
(MPI's shared-memory transports work the same way). Rank r, with segments as in the ring:

1. copies its input into its file, all but segment r (which only it reads), then sends
   ``ready`` (naming the file) to every rank;
2. when every ``ready`` is in: folds segment r over all N inputs in rank order 0, 1, .., N-1
   into its output, publishes it in its file's segment r, and sends ``reduced`` to all;
3. when every ``reduced`` is in: copies segment j of the result from rank j's file, for all j.

Each segment is computed by exactly one rank, in a fixed order, and copied bit for bit by the
others: every rank ends with identical bits, as in the ring.

Reuse without a third message: a segment file holds two regions and pass ``seq`` writes region
``seq % 2``. A rank starts pass seq+2 only after every peer said ``reduced`` in pass seq+1,
which each peer says after it finished pass seq, the last to read region ``seq % 2``.

Nothing left behind: a segment's name is unlinked as soon as one pass that used it completed
(every peer has mapped it by then; mappings outlive names), when a pass fails, and on close.
Only a rank killed during the first pass over a new segment leaves a ``/dev/shm/dmlsys-*`` file.
"""

from __future__ import annotations

import mmap
import os
import re
import secrets
from typing import TYPE_CHECKING

import numpy as np

from dmlsys.collective import schedule
from dmlsys.collective.errors import CollectiveError

if TYPE_CHECKING:
    from dmlsys.collective.link import PassLink

SHM_DIR = "/dev/shm"
_NAME = re.compile(r"^dmlsys-[A-Za-z0-9_.-]{1,200}$")
_ALIGN = 64  # region offsets on cache lines


def available() -> bool:
    return os.path.isdir(SHM_DIR) and os.access(SHM_DIR, os.W_OK)


class _Regions:
    """A mapped segment: two regions of ``capacity`` bytes, used by alternate passes."""

    capacity: int
    bytes: np.ndarray

    def region(self, parity: int, dtype: np.dtype, count: int) -> np.ndarray:
        start = parity * self.capacity
        return self.bytes[start:start + count * dtype.itemsize].view(dtype)


class Segment(_Regions):
    """This rank's file in /dev/shm, mapped read-write."""

    def __init__(self, tag: str, capacity: int) -> None:
        self.capacity = -(-capacity // _ALIGN) * _ALIGN
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", tag)[:120]
        self.name = f"dmlsys-{safe}-{os.getpid()}-{secrets.token_hex(4)}"
        self.path = os.path.join(SHM_DIR, self.name)
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, 2 * self.capacity)
            self._map = mmap.mmap(fd, 2 * self.capacity)
        except BaseException:
            os.unlink(self.path)
            raise
        finally:
            os.close(fd)
        self.bytes = np.frombuffer(self._map, np.uint8)
        self.linked = True

    def unlink(self) -> None:
        """Drop the name; the memory lives on while anyone maps it."""
        if self.linked:
            self.linked = False
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


class PeerSegment(_Regions):
    """A peer's segment, mapped read-only from its name."""

    def __init__(self, name: str, capacity: int) -> None:
        if not _NAME.match(name):
            raise CollectiveError(f"not a dmlsys segment name: {name!r:.80}")
        fd = os.open(os.path.join(SHM_DIR, name), os.O_RDONLY)
        try:
            if os.fstat(fd).st_size < 2 * capacity:
                raise CollectiveError(f"segment {name} is smaller than the {2 * capacity} bytes announced")
            self._map = mmap.mmap(fd, 2 * capacity, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        self.name = name
        self.capacity = capacity
        self.bytes = np.frombuffer(self._map, np.uint8)


class ShmState:
    """A group's shared-memory side: its own segment and its peers' mappings."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.own: Segment | None = None
        self.peers: dict[int, PeerSegment] = {}

    def segment_for(self, nbytes: int) -> Segment:
        if self.own is None or self.own.capacity < nbytes:
            self.drop()
            # Room to grow: a model's buckets differ in size, and each new segment costs peers a map.
            self.own = Segment(self.tag, max(nbytes + nbytes // 4, 1 << 20))
        return self.own

    def peer(self, rank: int, name: str, capacity: int) -> PeerSegment:
        seg = self.peers.get(rank)
        if seg is None or seg.name != name:
            seg = self.peers[rank] = PeerSegment(name, capacity)  # the old mapping goes with its last view
        return seg

    def drop(self) -> None:
        if self.own is not None:
            self.own.unlink()
            self.own = None

    def close(self) -> None:
        self.drop()
        self.peers.clear()


async def allreduce(link: PassLink, ufunc, flat: np.ndarray) -> np.ndarray:
    """One allreduce pass over shared memory (see the module docstring); the link's ``send``
    and ``recv_message`` carry the two notices, with their signature and deadline checks.

    ``flat`` is only read, and never after we return: the caller may reuse it at once."""
    state: ShmState = link.shm
    n, r, dtype = link.size, link.rank, flat.dtype
    parity = link.seq % 2
    segs = schedule.segments(flat.size, n)
    a, b = segs[r]
    try:
        own = state.segment_for(flat.nbytes)
    except OSError as e:
        raise CollectiveError(f"{link.who}: cannot create a shared-memory segment in {SHM_DIR}: {e}; "
                              "create the group with shm=False to use sockets only") from None
    mine = own.region(parity, dtype, flat.size)
    # Peers read every segment of our input but ours (r): that one we fold from flat itself.
    mine[:a] = flat[:a]
    mine[b:] = flat[b:]
    out = link.pool.take(flat.size, dtype)  # no fresh pages to fault in for every pass
    for j in range(n):
        if j != r:
            link.send(j, 0, r, None, shm=own.name, cap=own.capacity)
    inputs: list[np.ndarray] = [mine] * n
    for j in range(n):
        if j == r:
            continue
        body = await link.recv_message(0, j, src=j)
        name, cap = body.get("shm"), body.get("cap")
        if not isinstance(name, str) or type(cap) is not int or cap < flat.nbytes:
            raise CollectiveError(f"{link.who}: malformed shared-memory notice from rank {j}")
        try:
            inputs[j] = state.peer(j, name, cap).region(parity, dtype, flat.size)
        except (OSError, ValueError, CollectiveError) as e:  # mmap raises ValueError too
            raise CollectiveError(f"{link.who}: cannot map rank {j}'s shared-memory segment {name!r}: {e}; "
                                  "are all members on one host? If not, create the group with shm=False") from None
    if b > a:
        # Segment r, folded in rank order ((x0 op x1) op x2) ..., into the output; x_r is read
        # from the caller's buffer, so it never needed copying into our segment.
        acc = out[a:b]
        schedule.fold_in_rank_order(ufunc, [flat[a:b] if j == r else inputs[j][a:b] for j in range(n)], acc)
        mine[a:b] = acc  # published for the peers' copy-out
    for j in range(n):
        if j != r:
            link.send(j, 1, r, None)
    for j in range(n):
        if j != r:
            await link.recv_message(1, j, src=j)
    for j, (lo, hi) in enumerate(segs):
        if j != r:
            out[lo:hi] = inputs[j][lo:hi]
    own.unlink()  # every peer has mapped it by now
    return out
