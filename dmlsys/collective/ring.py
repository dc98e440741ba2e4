"""The ring over sockets: allreduce (reduce-scatter + all-gather), allgather and broadcast,
each pipelined in ``chunk_bytes`` pieces so that sending, receiving and folding overlap.

The path between hosts, and the one the simulated network tests. The schedule is
``dmlsys.collective.schedule``'s; the group's ``_send`` and ``_recv`` carry the chunks with their
signature and deadline checks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from dmlsys.collective import schedule

if TYPE_CHECKING:
    from dmlsys.collective.group import ProcessGroup


async def allreduce(group: "ProcessGroup", seq: int, sig: str, ufunc, flat: np.ndarray, gather: bool) -> np.ndarray:
    n, r = group.size, group.rank
    nxt = group.members[(r + 1) % n]
    segs = schedule.segments(flat.size, n)
    step = max(1, group.chunk_bytes // max(flat.itemsize, 1))
    acc = flat.copy()  # folded in place; never written after it is sent, never returned
    out = np.empty_like(flat)
    sent, _ = schedule.reduce_scatter_step(r, n, 0)
    for ci, (a, b) in enumerate(schedule.chunks(*segs[sent], step)):
        group._send(nxt, seq, 0, ci, sig, acc[a:b])
    for k in range(n - 1):
        _, got = schedule.reduce_scatter_step(r, n, k)
        for ci, (a, b) in enumerate(schedule.chunks(*segs[got], step)):
            data = await group._recv(seq, k, ci, sig, b - a, flat.dtype)
            ufunc(data, acc[a:b], out=acc[a:b])  # (earlier ranks' partial) op (ours): fixed order
            if k < n - 2:
                group._send(nxt, seq, k + 1, ci, sig, acc[a:b])
            elif gather:
                out[a:b] = acc[a:b]  # segment r is final: all-gather step 0 sends it
                group._send(nxt, seq, n - 1, ci, sig, acc[a:b])
    if not gather:
        a, b = segs[r]
        out[a:b] = acc[a:b]
        return out
    for j in range(n - 1):
        _, got = schedule.allgather_step(r, n, j)
        for ci, (a, b) in enumerate(schedule.chunks(*segs[got], step)):
            data = await group._recv(seq, n - 1 + j, ci, sig, b - a, flat.dtype)
            out[a:b] = data
            if j < n - 2:
                group._send(nxt, seq, n + j, ci, sig, data)  # forward the received frame as is
    return out


async def allgather(group: "ProcessGroup", seq: int, sig: str, flat: np.ndarray) -> np.ndarray:
    n, r = group.size, group.rank
    nxt = group.members[(r + 1) % n]
    m = flat.size
    step = max(1, group.chunk_bytes // max(flat.itemsize, 1))
    out = np.empty(n * m, flat.dtype)
    out[r * m:(r + 1) * m] = flat
    for ci, (a, b) in enumerate(schedule.chunks(0, m, step)):
        group._send(nxt, seq, 0, ci, sig, out[r * m + a:r * m + b].copy())
    for j in range(n - 1):
        _, got = schedule.allgather_step(r, n, j)
        for ci, (a, b) in enumerate(schedule.chunks(0, m, step)):
            data = await group._recv(seq, j, ci, sig, b - a, flat.dtype)
            out[got * m + a:got * m + b] = data
            if j < n - 2:
                group._send(nxt, seq, j + 1, ci, sig, data)
    return out


async def broadcast(group: "ProcessGroup", seq: int, sig: str, flat: np.ndarray, root: int) -> np.ndarray:
    n, r = group.size, group.rank
    nxt = (r + 1) % n
    step = max(1, group.chunk_bytes // max(flat.itemsize, 1))
    pieces = schedule.chunks(0, flat.size, step)
    if r == root:
        # Chunks leave zero-copy and may still be queued when we return, so they go from a
        # private copy: neither the caller's buffer nor the result we hand back.
        src = flat.copy()
        for ci, (a, b) in enumerate(pieces):
            group._send(group.members[nxt], seq, 0, ci, sig, src[a:b])
        return flat.copy()
    out = np.empty_like(flat)
    for ci, (a, b) in enumerate(pieces):
        data = await group._recv(seq, 0, ci, sig, b - a, flat.dtype)
        out[a:b] = data
        if nxt != root:
            group._send(group.members[nxt], seq, 0, ci, sig, data)
    return out
