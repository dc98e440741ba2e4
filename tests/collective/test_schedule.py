"""The ring schedule (dmlsys.collective.schedule) as a pure specification: no network."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dmlsys.collective import schedule

sizes = st.integers(1, 16)
lengths = st.integers(0, 10_000)


@settings(max_examples=200, deadline=None)
@given(length=lengths, n=sizes)
def test_segments_partition_the_buffer_in_order_with_sizes_within_one(length, n):
    segs = schedule.segments(length, n)
    assert len(segs) == n
    assert segs[0][0] == 0 and segs[-1][1] == length
    for (a, b), (c, _) in zip(segs, segs[1:]):
        assert b == c  # contiguous: no gap, no overlap
    sizes_ = [b - a for a, b in segs]
    assert min(sizes_) >= 0 and max(sizes_) - min(sizes_) <= 1


@settings(max_examples=200, deadline=None)
@given(start=st.integers(0, 1000), length=st.integers(0, 5000), chunk=st.integers(1, 700))
def test_chunks_cover_a_range_exactly_and_an_empty_range_still_sends_one_piece(start, length, chunk):
    pieces = schedule.chunks(start, start + length, chunk)
    if length == 0:
        assert pieces == [(start, start)]
        return
    assert pieces[0][0] == start and pieces[-1][1] == start + length
    assert all(b - a <= chunk and b > a for a, b in pieces)
    assert all(b == c for (_, b), (c, _) in zip(pieces, pieces[1:]))


@settings(max_examples=100, deadline=None)
@given(n=sizes)
def test_each_segment_is_sent_exactly_once_per_phase_per_rank(n):
    for rank in range(n):
        rs = Counter(schedule.reduce_scatter_step(rank, n, k)[0] for k in range(n - 1))
        ag = Counter(schedule.allgather_step(rank, n, k)[0] for k in range(n - 1))
        assert all(c == 1 for c in rs.values()) and len(rs) == n - 1
        assert all(c == 1 for c in ag.values()) and len(ag) == n - 1
        # reduce-scatter never sends the segment the rank ends up owning; all-gather never
        # sends the segment it last receives (it arrived complete, nobody downstream lacks it)
        assert rank not in rs
        assert (rank + 1) % n not in ag


@settings(max_examples=100, deadline=None)
@given(n=sizes)
def test_what_a_rank_sends_at_step_k_is_what_its_successor_receives(n):
    for rank in range(n):
        nxt = schedule.neighbours(rank, n)[1]
        for k in range(n - 1):
            assert schedule.reduce_scatter_step(rank, n, k)[0] == schedule.reduce_scatter_step(nxt, n, k)[1]
            assert schedule.allgather_step(rank, n, k)[0] == schedule.allgather_step(nxt, n, k)[1]
            if k + 1 < n - 1:  # the segment just folded in is the one forwarded next
                assert schedule.reduce_scatter_step(rank, n, k)[1] == schedule.reduce_scatter_step(rank, n, k + 1)[0]


@settings(max_examples=100, deadline=None)
@given(n=sizes)
def test_after_reduce_scatter_rank_r_owns_segment_r_reduced_over_every_rank(n):
    """Simulate the schedule symbolically: each rank's copy of a segment is the set of ranks
    whose contribution it holds. After N-1 steps rank r's segment r holds all N; after the
    all-gather every rank holds every segment complete."""
    held = [[{r} for _ in range(n)] for r in range(n)]  # held[rank][segment]
    for k in range(n - 1):
        sent = {r: set(held[r][schedule.reduce_scatter_step(r, n, k)[0]]) for r in range(n)}
        for r in range(n):
            prev = schedule.neighbours(r, n)[0]
            got = schedule.reduce_scatter_step(r, n, k)[1]
            held[r][got] |= sent[prev]
    full = set(range(n))
    for r in range(n):
        assert held[r][r] == full
    for k in range(n - 1):
        sent = {r: set(held[r][schedule.allgather_step(r, n, k)[0]]) for r in range(n)}
        for r in range(n):
            assert sent[r] == full  # all-gather only ever forwards finished segments
            prev = schedule.neighbours(r, n)[0]
            held[r][schedule.allgather_step(r, n, k)[1]] = sent[prev]
    assert all(seg == full for rank in held for seg in rank)


def test_bad_arguments_are_refused_with_the_value_named():
    with pytest.raises(ValueError, match="n=0"):
        schedule.segments(10, 0)
    with pytest.raises(ValueError, match="length=-1"):
        schedule.segments(-1, 2)
    with pytest.raises(ValueError, match="0"):
        schedule.chunks(0, 10, 0)
