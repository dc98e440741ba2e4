"""Every collective against numpy, on the simulated network, for any group size 1..8, any
shape (0-d, empty, fewer elements than ranks, many chunks) and any numeric dtype."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from dmlsys.collective import schedule
from tests.collective.helpers import assert_bitwise_identical, assert_matches, random_array, run_groups

DTYPES = [np.bool_, np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.uint64,
          np.float16, np.float32, np.float64, np.complex64, np.complex128]
SHAPES = st.one_of(
    st.just(()),                                              # 0-d
    st.sampled_from([(0,), (3, 0), (0, 5)]),                  # empty
    st.lists(st.integers(1, 3), min_size=1, max_size=2).map(tuple),  # usually fewer elements than ranks
    st.tuples(st.integers(100, 1500)),                        # large-ish: several chunks per segment
    st.tuples(st.integers(2, 20), st.integers(2, 30)),
)
# 64-byte chunks cut even small arrays into many pipelined pieces; 1 MiB sends each segment whole.
CHUNKS = st.sampled_from([64, 1000, 1 << 20])

common = settings(max_examples=40, deadline=None)


@common
@given(n=st.integers(1, 8), shape=SHAPES, dtype=st.sampled_from(DTYPES),
       op=st.sampled_from(["sum", "mean", "max", "min"]), chunk=CHUNKS, seed=st.integers(0, 2**16))
def test_allreduce_equals_the_numpy_reduction_and_is_bitwise_identical_on_every_rank(n, shape, dtype, op, chunk, seed):
    rng = np.random.default_rng(seed)
    xs = [random_array(rng, shape, dtype) for _ in range(n)]
    copies = [x.copy() for x in xs]

    async def body(sg):
        return await sg.each(lambda g: g.allreduce(xs[g.rank], op))

    results = run_groups(n, body, seed=seed, chunk_bytes=chunk)
    for r in results:
        assert not isinstance(r, BaseException), r
    assert_bitwise_identical(results)
    assert_matches(results[0], xs, op)
    for x, c in zip(xs, copies):  # the inputs are left alone
        assert x.tobytes() == c.tobytes()


@common
@given(n=st.integers(1, 8), shape=SHAPES, dtype=st.sampled_from(DTYPES), chunk=CHUNKS, seed=st.integers(0, 2**16))
def test_allgather_stacks_every_ranks_array_in_rank_order(n, shape, dtype, chunk, seed):
    rng = np.random.default_rng(seed)
    xs = [random_array(rng, shape, dtype) for _ in range(n)]

    async def body(sg):
        return await sg.each(lambda g: g.allgather(xs[g.rank]))

    results = run_groups(n, body, seed=seed, chunk_bytes=chunk)
    want = np.stack(xs)
    for r in results:
        assert not isinstance(r, BaseException), r
        assert r.dtype == want.dtype and r.shape == want.shape
        assert r.tobytes() == want.tobytes()


@common
@given(n=st.integers(1, 8), length=st.integers(0, 300), dtype=st.sampled_from(DTYPES),
       op=st.sampled_from(["sum", "mean", "max", "min"]), chunk=CHUNKS, seed=st.integers(0, 2**16))
def test_reduce_scatter_gives_rank_r_segment_r_of_the_reduction(n, length, dtype, op, chunk, seed):
    rng = np.random.default_rng(seed)
    xs = [random_array(rng, (length,), dtype) for _ in range(n)]

    async def body(sg):
        return await sg.each(lambda g: g.reduce_scatter(xs[g.rank], op))

    results = run_groups(n, body, seed=seed, chunk_bytes=chunk)
    segs = schedule.segments(length, n)
    for rank, r in enumerate(results):
        assert not isinstance(r, BaseException), r
        a, b = segs[rank]
        assert_matches(r, [x[a:b] for x in xs], op)
    assert sum(r.size for r in results) == length


@common
@given(n=st.integers(1, 8), shape=SHAPES, dtype=st.sampled_from(DTYPES), root=st.integers(0, 7), chunk=CHUNKS,
       seed=st.integers(0, 2**16))
def test_broadcast_gives_every_rank_the_roots_bits(n, shape, dtype, root, chunk, seed):
    root %= n
    rng = np.random.default_rng(seed)
    xs = [random_array(rng, shape, dtype) for _ in range(n)]

    async def body(sg):
        return await sg.each(lambda g: g.broadcast(xs[g.rank], root=root))

    results = run_groups(n, body, seed=seed, chunk_bytes=chunk)
    for r in results:
        assert not isinstance(r, BaseException), r
        assert r.dtype == xs[root].dtype and r.shape == xs[root].shape
        assert r.tobytes() == xs[root].tobytes()


@settings(max_examples=10, deadline=None)
@given(n=st.integers(1, 8), late=st.integers(0, 7), delay=st.floats(0.0, 20.0), seed=st.integers(0, 2**16))
def test_barrier_returns_on_no_rank_before_the_last_rank_arrives(n, late, delay, seed):
    late %= n

    async def body(sg):
        import asyncio

        loop = asyncio.get_running_loop()
        t0 = loop.time()

        async def one(g):
            if g.rank == late:
                await asyncio.sleep(delay)
            await g.barrier()
            return loop.time() - t0

        return await sg.each(one)

    done = run_groups(n, body, seed=seed, timeout=30.0)
    assert all(not isinstance(t, BaseException) for t in done), done
    assert min(done) >= delay


def test_many_collectives_in_a_row_keep_their_order_under_reordering_links():
    """Sequence numbers keep chunks of consecutive passes apart, even when a fast rank starts
    the next pass while a slow one is still finishing this one."""
    rng = np.random.default_rng(1)
    n, rounds = 5, 12
    xs = [[rng.integers(-1000, 1000, 37) for _ in range(n)] for _ in range(rounds)]

    async def body(sg):
        async def one(g):
            return [await g.allreduce(xs[i][g.rank], "sum") for i in range(rounds)]

        return await sg.each(one)

    results = run_groups(n, body, chunk_bytes=16)
    for i in range(rounds):
        want = np.sum(xs[i], axis=0)
        for rank in range(n):
            np.testing.assert_array_equal(results[rank][i], want)
