"""The ring schedule, as plain functions: which segment a rank sends and receives at each step.

A buffer of L elements is cut into N contiguous segments (``segments``; some are empty when
L < N). Ring allreduce runs 2(N-1) steps on a ring where rank r sends to r+1 and receives
from r-1:

* reduce-scatter, steps k = 0 .. N-2: send segment (r-k-1) mod N, receive segment (r-k-2)
  mod N and fold it into the local copy. After the last step rank r holds segment r fully
  reduced. A segment is never written after it was sent, so sends can be zero-copy.
* all-gather, steps k = 0 .. N-2: send segment (r-k) mod N, receive segment (r-k-1) mod N.

Each rank sends 2(N-1) segments of L/N elements: 2(N-1)/N of the data, the bandwidth lower
bound for allreduce (Patarasuk & Yuan, 2009). Segment j is reduced in ring order starting at
rank j+1, so the order of additions is fixed by N alone, and the all-gather copies one rank's
bytes to all: every rank ends with bitwise-identical results, floats included.
"""

from __future__ import annotations

from dmlsys import arrays
from dmlsys.collective.errors import InvalidArgument


def segments(length: int, n: int) -> list[tuple[int, int]]:
    """[start, stop) of N contiguous segments covering ``length``; sizes differ by at most one
    (``dmlsys.arrays.segments``, with the collective's error)."""
    if n < 1 or length < 0:
        raise InvalidArgument(f"need n >= 1 and length >= 0, got n={n}, length={length}")
    return arrays.segments(length, n)


def chunks(start: int, stop: int, chunk: int) -> list[tuple[int, int]]:
    """Pipelining unit: [start, stop) cut into pieces of at most ``chunk`` elements; an empty
    range still yields one (empty) piece, so every step sends a message that carries the
    signature check."""
    if chunk < 1:
        raise InvalidArgument(f"chunk must be >= 1 element, got {chunk}")
    if stop <= start:
        return [(start, start)]
    return [(s, min(s + chunk, stop)) for s in range(start, stop, chunk)]


def reduce_scatter_step(rank: int, n: int, k: int) -> tuple[int, int]:
    """(segment sent, segment received) by ``rank`` at reduce-scatter step k."""
    return (rank - k - 1) % n, (rank - k - 2) % n


def allgather_step(rank: int, n: int, k: int) -> tuple[int, int]:
    """(segment sent, segment received) by ``rank`` at all-gather step k."""
    return (rank - k) % n, (rank - k - 1) % n


def neighbours(rank: int, n: int) -> tuple[int, int]:
    """(previous, next) rank on the ring."""
    return (rank - 1) % n, (rank + 1) % n


def fold_in_rank_order(ufunc, parts: list, out) -> None:
    """``out = ((parts[0] op parts[1]) op parts[2]) ...``: the one order of operations every
    rank uses when it folds N ranks' values itself (the direct and shared-memory paths), so the
    same inputs give the same bits on every rank. Needs two parts or more."""
    ufunc(parts[0], parts[1], out=out)
    for part in parts[2:]:
        ufunc(out, part, out=out)
