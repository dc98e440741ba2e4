"""The ring over sockets: allreduce (reduce-scatter + all-gather), allgather and broadcast,
each pipelined in ``chunk_bytes`` pieces so that sending, receiving and folding overlap.

The path between hosts, and the one the simulated network tests. The schedule is
``dmlsys.collective.schedule``'s; the pass's :class:`~dmlsys.collective.link.PassLink` carries the
chunks (``send``, and ``recv`` with its signature and deadline checks) and lends the buffers.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import numpy as np

from dmlsys.collective import schedule

if TYPE_CHECKING:
    from dmlsys.collective.link import PassLink


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


async def allreduce(link: PassLink, ufunc, flat: np.ndarray, gather: bool) -> np.ndarray:
    n, r = link.size, link.rank
    nxt = (r + 1) % n
    segs = schedule.segments(flat.size, n)
    step = max(1, link.chunk_bytes // max(flat.itemsize, 1))
    out = link.pool.take(flat.size, flat.dtype)
    # Reduce-scatter touches each segment once per rank: a chunk arrives, our values are folded
    # into it and it moves on. So the fold goes into the received frame itself (a private
    # buffer that only this pass holds), which is then forwarded zero-copy: no private copy of
    # the whole input (the fresh pages of such a copy cost the kernel more to zero than the
    # copy itself, measured with perf). Our first segment leaves from the caller's buffer
    # itself when the all-gather follows (see below), else from a copy of it.
    sent, _ = schedule.reduce_scatter_step(r, n, 0)
    lo, hi = segs[sent]
    if gather:
        # With the all-gather, our first segment leaves straight from the caller's buffer: by
        # the time we return, every rank's final segments came back to us, and the final
        # value of the segment we sent first (``sent``, never ours) folds in our chunks, so
        # they were on the wire before we return; the caller may write its buffer then.
        # (After a failed pass some may still be queued, read later; the other ranks are
        # told to abort that pass, so what those chunks carry is never used.)
        src, base = flat, 0
    else:  # reduce-scatter returns before anything of ours need have left
        src, base = link.pool.take(hi - lo, flat.dtype), lo
        src[:] = flat[lo:hi]
    for ci, (a, b) in enumerate(schedule.chunks(lo, hi, step)):
        link.send(nxt, 0, ci, src[a - base:b - base])
    del src  # its in-flight chunks hold it; the pool sees when they are gone
    for k in range(n - 1):
        _, got = schedule.reduce_scatter_step(r, n, k)
        for ci, (a, b) in enumerate(schedule.chunks(*segs[got], step)):
            data = await link.recv(k, ci, b - a, flat.dtype)
            # (earlier ranks' partial) op (ours): the fixed order of additions
            if data.flags.writeable:
                ufunc(data, flat[a:b], out=data)
            else:  # a transport that hands out read-only bytes (the simulated network)
                data = ufunc(data, flat[a:b])
            # Forward before copying out: the copy only reads the frame, so the next rank's
            # work starts a copy's time sooner at every hop of the ring.
            if k < n - 2:
                link.send(nxt, k + 1, ci, data)
            else:
                if gather:  # segment r is final: all-gather step 0 sends it
                    link.send(nxt, n - 1, ci, data)
                out[a:b] = data
    if not gather:
        return out
    for j in range(n - 1):
        _, got = schedule.allgather_step(r, n, j)
        for ci, (a, b) in enumerate(schedule.chunks(*segs[got], step)):
            data = await link.recv(n - 1 + j, ci, b - a, flat.dtype)
            if j < n - 2:
                link.send(nxt, n + j, ci, data)  # forward the received frame as is
            out[a:b] = data
    return out


async def allgather(link: PassLink, flat: np.ndarray) -> np.ndarray:
    n, r = link.size, link.rank
    nxt = (r + 1) % n
    m = flat.size
    step = max(1, link.chunk_bytes // max(flat.itemsize, 1))
    out = link.pool.take(n * m, flat.dtype)
    out[r * m:(r + 1) * m] = flat
    src = link.pool.take(m, flat.dtype)  # our chunks leave zero-copy: not from the result
    src[:] = flat
    for ci, (a, b) in enumerate(schedule.chunks(0, m, step)):
        link.send(nxt, 0, ci, src[a:b])
    del src
    for j in range(n - 1):
        _, got = schedule.allgather_step(r, n, j)
        for ci, (a, b) in enumerate(schedule.chunks(0, m, step)):
            data = await link.recv(j, ci, b - a, flat.dtype)
            if j < n - 2:
                link.send(nxt, j + 1, ci, data)
            out[got * m + a:got * m + b] = data
    return out


async def broadcast(link: PassLink, flat: np.ndarray, root: int) -> np.ndarray:
    n, r = link.size, link.rank
    nxt = (r + 1) % n
    step = max(1, link.chunk_bytes // max(flat.itemsize, 1))
    pieces = schedule.chunks(0, flat.size, step)
    if r == root:
        # Chunks leave zero-copy and may still be queued when we return, so they go from a
        # private copy: neither the caller's buffer nor the result we hand back.
        src = link.pool.take(flat.size, flat.dtype)
        src[:] = flat
        for ci, (a, b) in enumerate(pieces):
            link.send(nxt, 0, ci, src[a:b])
        del src
        out = link.pool.take(flat.size, flat.dtype)
        out[:] = flat
        return out
    out = link.pool.take(flat.size, flat.dtype)
    for ci, (a, b) in enumerate(pieces):
        data = await link.recv(0, ci, b - a, flat.dtype)
        if nxt != root:
            link.send(nxt, 0, ci, data)
        out[a:b] = data
    return out
