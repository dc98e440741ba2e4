"""The ring over sockets: allreduce (reduce-scatter + all-gather), allgather and broadcast,
each pipelined in ``chunk_bytes`` pieces so that sending, receiving and folding overlap.

The path between hosts, and the one the simulated network tests. The schedule is
``dmlsys.collective.schedule``'s; the group's ``_send`` and ``_recv`` carry the chunks with their
signature and deadline checks.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import numpy as np

from dmlsys.collective import schedule

if TYPE_CHECKING:
    from dmlsys.collective.group import ProcessGroup


class BufferPool:
    """Large buffers kept between passes, handed out again only when nothing else holds them.

    A fresh multi-MiB array costs the kernel a page fault and a zeroed page for every page it
    touches: measured with perf on the 64 MiB ring allreduce, zeroing fresh pages took more CPU
    than copying the data (glibc hands allocations this large straight back to the kernel).
    So results and private send copies come from here. A buffer is free when its only
    references are the pool's: every view of it (a result the caller kept, a slice of it,
    a frame ZeroMQ still sends) holds a reference to it, so a result is never handed out while
    the caller or the socket can still see it.
    """

    __slots__ = ("_free_refs", "buffers", "max_buffers", "max_bytes")

    def __init__(self, *, max_buffers: int = 4, max_bytes: int = 512 << 20) -> None:
        self.buffers: list[np.ndarray] = []
        self.max_buffers = max_buffers
        self.max_bytes = max_bytes
        probe = [np.empty(0, np.uint8)]
        self._free_refs = self._refs(probe, 0)  # what "only the pool holds it" reads as here

    @staticmethod
    def _refs(buffers: list, i: int) -> int:
        return sys.getrefcount(buffers[i])

    def take(self, count: int, dtype: np.dtype) -> np.ndarray:
        """An uninitialised array of ``count`` x ``dtype`` that nobody else references."""
        dtype = np.dtype(dtype)
        nbytes = count * dtype.itemsize
        if nbytes < (1 << 20):  # small: malloc reuses its memory anyway
            return np.empty(count, dtype)
        buffers = self.buffers
        spare = -1
        for i in range(len(buffers)):
            if self._refs(buffers, i) <= self._free_refs:
                if buffers[i].nbytes == nbytes:
                    return buffers[i].view(dtype)
                spare = i
        buf = np.empty(nbytes, np.uint8)
        if nbytes <= self.max_bytes:
            if spare >= 0:  # evict a free buffer of another size
                buffers[spare] = buf
            elif len(buffers) < self.max_buffers and sum(b.nbytes for b in buffers) + nbytes <= self.max_bytes:
                buffers.append(buf)
        return buf.view(dtype)

    def clear(self) -> None:
        self.buffers.clear()


async def allreduce(group: "ProcessGroup", seq: int, sig: str, ufunc, flat: np.ndarray, gather: bool) -> np.ndarray:
    n, r = group.size, group.rank
    nxt = (r + 1) % n
    segs = schedule.segments(flat.size, n)
    step = max(1, group.chunk_bytes // max(flat.itemsize, 1))
    out = group._pool.take(flat.size, flat.dtype)
    # Reduce-scatter touches each segment once per rank: a chunk arrives, our values are folded
    # into it and it moves on. So the fold goes into the received frame itself (a private
    # buffer that only this pass holds), which is then forwarded zero-copy: no private copy of
    # the whole input (the fresh pages of such a copy cost the kernel more to zero than the
    # copy itself, measured with perf). Only our first segment leaves from copies of the
    # caller's buffer, which must be reusable when we return.
    sent, _ = schedule.reduce_scatter_step(r, n, 0)
    lo, hi = segs[sent]
    src = group._pool.take(hi - lo, flat.dtype)
    src[:] = flat[lo:hi]
    for ci, (a, b) in enumerate(schedule.chunks(lo, hi, step)):
        group._send(nxt, seq, 0, ci, sig, src[a - lo:b - lo])
    del src  # its in-flight chunks hold it; the pool sees when they are gone
    for k in range(n - 1):
        _, got = schedule.reduce_scatter_step(r, n, k)
        for ci, (a, b) in enumerate(schedule.chunks(*segs[got], step)):
            data = await group._recv(seq, k, ci, sig, b - a, flat.dtype)
            # (earlier ranks' partial) op (ours): the fixed order of additions
            if data.flags.writeable:
                ufunc(data, flat[a:b], out=data)
            else:  # a transport that hands out read-only bytes (the simulated network)
                data = ufunc(data, flat[a:b])
            # Forward before copying out: the copy only reads the frame, so the next rank's
            # work starts a copy's time sooner at every hop of the ring.
            if k < n - 2:
                group._send(nxt, seq, k + 1, ci, sig, data)
            else:
                if gather:  # segment r is final: all-gather step 0 sends it
                    group._send(nxt, seq, n - 1, ci, sig, data)
                out[a:b] = data
    if not gather:
        return out
    for j in range(n - 1):
        _, got = schedule.allgather_step(r, n, j)
        for ci, (a, b) in enumerate(schedule.chunks(*segs[got], step)):
            data = await group._recv(seq, n - 1 + j, ci, sig, b - a, flat.dtype)
            if j < n - 2:
                group._send(nxt, seq, n + j, ci, sig, data)  # forward the received frame as is
            out[a:b] = data
    return out


async def allgather(group: "ProcessGroup", seq: int, sig: str, flat: np.ndarray) -> np.ndarray:
    n, r = group.size, group.rank
    nxt = (r + 1) % n
    m = flat.size
    step = max(1, group.chunk_bytes // max(flat.itemsize, 1))
    out = group._pool.take(n * m, flat.dtype)
    out[r * m:(r + 1) * m] = flat
    src = group._pool.take(m, flat.dtype)  # our chunks leave zero-copy: not from the result
    src[:] = flat
    for ci, (a, b) in enumerate(schedule.chunks(0, m, step)):
        group._send(nxt, seq, 0, ci, sig, src[a:b])
    del src
    for j in range(n - 1):
        _, got = schedule.allgather_step(r, n, j)
        for ci, (a, b) in enumerate(schedule.chunks(0, m, step)):
            data = await group._recv(seq, j, ci, sig, b - a, flat.dtype)
            if j < n - 2:
                group._send(nxt, seq, j + 1, ci, sig, data)
            out[got * m + a:got * m + b] = data
    return out


async def broadcast(group: "ProcessGroup", seq: int, sig: str, flat: np.ndarray, root: int) -> np.ndarray:
    n, r = group.size, group.rank
    nxt = (r + 1) % n
    step = max(1, group.chunk_bytes // max(flat.itemsize, 1))
    pieces = schedule.chunks(0, flat.size, step)
    if r == root:
        # Chunks leave zero-copy and may still be queued when we return, so they go from a
        # private copy: neither the caller's buffer nor the result we hand back.
        src = group._pool.take(flat.size, flat.dtype)
        src[:] = flat
        for ci, (a, b) in enumerate(pieces):
            group._send(nxt, seq, 0, ci, sig, src[a:b])
        del src
        out = group._pool.take(flat.size, flat.dtype)
        out[:] = flat
        return out
    out = group._pool.take(flat.size, flat.dtype)
    for ci, (a, b) in enumerate(pieces):
        data = await group._recv(seq, 0, ci, sig, b - a, flat.dtype)
        if nxt != root:
            group._send(nxt, seq, 0, ci, sig, data)
        out[a:b] = data
    return out
