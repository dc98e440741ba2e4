"""The shared-memory allreduce and the one-hop direct path, on real ZeroMQ nodes over ipc://.

All ranks live in one process (one event loop): shared memory works between them just as
between processes, and the suite stays fast. The simulated network never takes these paths
(it has no host), so these tests are where they are pinned down.
"""

from __future__ import annotations

import asyncio
import glob
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dmlsys.collective import CollectiveError, CollectiveService, ProcessGroup
from dmlsys.collective import shm
from dmlsys.node import Node
from dmlsys.wire.zmq_transport import ZmqTransport


def _leftovers() -> list[str]:
    return glob.glob(os.path.join(shm.SHM_DIR, f"dmlsys-*-{os.getpid()}-*"))


async def _nodes(tmp_path, n: int) -> list[Node]:
    names = [f"s{i}" for i in range(n)]
    nodes = [Node(name, ZmqTransport(name, f"ipc://{tmp_path}/{name}"), admin=None) for name in names]
    for node in nodes:
        node.add_service(CollectiveService())
        await node.start()
    for node in nodes:
        for other in nodes:
            if other is not node:
                node.transport.add_peer(other.name, other.transport.address)
    return nodes


def run_ranks(tmp_path, n: int, body, **group_kw):
    async def main():
        nodes = await _nodes(tmp_path, n)
        groups = [ProcessGroup(node, [x.name for x in nodes], **group_kw) for node in nodes]
        try:
            return await body(groups)
        finally:
            for g in groups:
                g.close()
            for node in nodes:
                await node.stop(drain_timeout=0.1)

    return asyncio.run(main())


@settings(max_examples=6, deadline=None)
@given(n=st.integers(2, 4), lengths=st.lists(st.integers(0, 3000), min_size=1, max_size=3),
       dtype=st.sampled_from(["float32", "float64", "int32", "uint8"]), op=st.sampled_from(["sum", "max", "min"]),
       seed=st.integers(0, 2**16))
def test_shm_allreduce_equals_numpy_is_identical_on_every_rank_and_leaves_no_file(tmp_path_factory, n, lengths,
                                                                                   dtype, op, seed):
    rng = np.random.default_rng(seed)
    # Several passes of different lengths: segments grow, parities alternate.
    data = [[rng.integers(0, 100, size=length).astype(dtype) for _ in range(n)] for length in lengths]

    async def body(groups):
        assert all(g.uses_shm for g in groups)
        results = []
        for xs in data:
            results.append(await asyncio.gather(*(g.allreduce(x, op) for g, x in zip(groups, xs))))
        return results

    results = run_ranks(tmp_path_factory.mktemp("shm"), n, body, direct_bytes=0)
    ufunc = {"sum": np.add, "max": np.maximum, "min": np.minimum}[op]
    for xs, got in zip(data, results):
        want = xs[0].copy()
        for x in xs[1:]:
            want = ufunc(want, x)
        for g in got:
            assert g.dtype == want.dtype and g.tobytes() == got[0].tobytes()
            np.testing.assert_array_equal(g, want)
    assert _leftovers() == []


def test_the_callers_buffer_is_unchanged_and_reusable_and_results_do_not_alias_it(tmp_path):
    async def body(groups):
        xs = [np.full(10_000, float(g.rank + 1), np.float32) for g in groups]
        first = await asyncio.gather(*(g.allreduce(x) for g, x in zip(groups, xs)))
        for x in xs:
            x[:] = 100.0  # reuse the buffers at once
        second = await asyncio.gather(*(g.allreduce(x) for g, x in zip(groups, xs)))
        return xs, first, second

    xs, first, second = run_ranks(tmp_path, 3, body, direct_bytes=0)
    assert all(np.all(f == 6.0) for f in first)  # untouched by the second pass over the same segments
    assert all(np.all(s == 300.0) for s in second)
    assert all(np.all(x == 100.0) for x in xs)


def test_the_broadcast_roots_result_and_buffer_can_be_overwritten_while_its_chunks_are_in_flight(tmp_path):
    """The root's chunks leave zero-copy: writing into its input or its result the moment the
    call returns must not change what the other ranks receive."""
    original = np.arange(1 << 20, dtype=np.float32)  # 4 MiB in 64 KiB chunks

    async def body(groups):
        async def one(g):
            x = original.copy() if g.rank == 0 else np.zeros_like(original)
            got = await g.broadcast(x, root=0)
            if g.rank == 0:
                x[:] = -1.0
                got[:] = -2.0
            return got

        return await asyncio.gather(*(one(g) for g in groups))

    results = run_ranks(tmp_path, 3, body, chunk_bytes=1 << 16)
    for got in results[1:]:
        np.testing.assert_array_equal(got, original)


def test_small_buffers_take_the_direct_path_and_pytrees_with_mean_still_agree(tmp_path):
    async def body(groups):
        trees = [{"w": np.arange(6.0).reshape(2, 3) * (g.rank + 1), "b": [np.int64(g.rank), 2.5]} for g in groups]
        return await asyncio.gather(*(g.allreduce(t, "mean") for g, t in zip(groups, trees)))

    out = run_ranks(tmp_path, 4, body)
    np.testing.assert_allclose(out[0]["w"], np.arange(6.0).reshape(2, 3) * 2.5)
    assert out[0]["b"][0] == 1.5 and out[0]["b"][1] == 2.5
    assert all(o["w"].tobytes() == out[0]["w"].tobytes() for o in out)


def test_a_rank_that_never_calls_makes_the_others_raise_naming_it_and_no_file_is_left(tmp_path):
    async def body(groups):
        xs = [np.ones(50_000, np.float32) for _ in groups]
        return await asyncio.gather(*(g.allreduce(x) for g, x in zip(groups[:2], xs)), return_exceptions=True)

    loop_start = asyncio.run(_now())
    errors = run_ranks(tmp_path, 3, body, direct_bytes=0, timeout=1.0)
    assert all(isinstance(e, CollectiveError) and e.missing == [2] for e in errors), errors
    assert asyncio.run(_now()) - loop_start < 5
    assert _leftovers() == []


def test_ranks_that_disagree_on_size_across_paths_fail_at_once_not_at_the_timeout(tmp_path):
    async def body(groups):
        sizes = [10, 100_000, 100_000]  # rank 0 takes the direct path, the others shared memory
        t0 = asyncio.get_running_loop().time()
        res = await asyncio.gather(*(g.allreduce(np.ones(s, np.float32)) for g, s in zip(groups, sizes)),
                                   return_exceptions=True)
        return res, asyncio.get_running_loop().time() - t0

    res, took = run_ranks(tmp_path, 3, body, timeout=20.0)
    assert all(isinstance(e, CollectiveError) and "disagree" in str(e) for e in res), res
    assert took < 5


def test_members_on_other_hosts_use_sockets(tmp_path):
    from dmlsys.wire.zmq_transport import ZmqTransport

    t = ZmqTransport("a", "ipc:///tmp/a", peers={"b": "tcp://127.0.0.1:5", "c": "tcp://10.0.0.2:5"})
    assert t.is_local("a") and t.is_local("b")
    assert not t.is_local("c")
    assert not t.is_local("d")  # unknown address: not provably here
    assert not ZmqTransport("a", "tcp://10.0.0.1:5", peers={"b": "ipc:///tmp/b"}).is_local("b")


async def _now() -> float:
    return asyncio.get_running_loop().time()


@pytest.fixture(autouse=True)
def _no_stray_segments():
    yield
    assert _leftovers() == []
