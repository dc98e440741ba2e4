"""The socket ring over real TCP, shared memory off: the path between hosts.

Every other real-socket test runs on one host, where anything over 64 KiB takes shared memory;
here each rank is a process on tcp://127.0.0.1 with ``shm=False`` and ``direct_bytes=0``, so
every allreduce goes around the ring, cut into chunks that no size below divides. Both ways the
ring's data can travel: a plain TCP stream per neighbour (``stream``, the default without keys)
and ZeroMQ messages (``zmq``, ``--stream off``: the default with keys)."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

from tests.collective.rank_proc import ODD, odd_array_for
from tests.collective.test_processes import Ranks

TIMEOUT = 3.0
RING = ("--shm", "off", "--direct-bytes", "0")
DATA = {"stream": ("--stream", "auto"), "zmq": ("--stream", "off")}

pytestmark = pytest.mark.slow


@pytest.fixture
def ranks():
    made: list[Ranks] = []

    def make(n: int, *args: str) -> Ranks:
        made.append(Ranks(n, *args))
        return made[-1]

    yield make
    for r in made:
        r.close()


@pytest.mark.parametrize("data", list(DATA))
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_ring_over_tcp_sums_odd_sizes_and_dtypes_exactly_and_identically_on_every_rank(n, data, ranks, tmp_path):
    passes = len(ODD)
    # 40_003 bytes a chunk: a whole number of no itemsize, so every dtype's chunks end mid-way
    group = ranks(n, "--mode", "check", "--odd", "--passes", str(passes), "--out", str(tmp_path),
                  "--timeout", "30", "--chunk-bytes", "40003", *RING, *DATA[data])
    for r in range(n):
        for p in range(passes):
            assert group.line(r) == {"ok": p}
    for p in range(passes):
        xs = [odd_array_for(r, p) for r in range(n)]
        got = [np.load(tmp_path / f"rank{r}_pass{p}.npy", allow_pickle=False) for r in range(n)]
        assert all(g.dtype == xs[0].dtype and g.shape == xs[0].shape for g in got), p
        assert all(g.tobytes() == got[0].tobytes() for g in got), f"ranks differ in pass {p}"
        if xs[0].dtype.kind in "iu" or xs[0].dtype == np.float16:  # small integers: exact in any order
            np.testing.assert_array_equal(got[0], np.sum(np.stack(xs), axis=0, dtype=xs[0].dtype))
        else:
            want = np.sum(np.stack(xs).astype(np.float64), axis=0)
            np.testing.assert_allclose(got[0].astype(np.float64), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("data", list(DATA))
@pytest.mark.parametrize("n, victim", [(2, 1), (4, 2)])
def test_sigkill_mid_ring_pass_over_tcp_makes_the_others_name_the_dead_rank_within_the_timeout(n, victim, data, ranks):
    # 4 MiB of float32 in 64 KiB chunks: a pass is dozens of messages, so the kill lands mid-pass
    group = ranks(n, "--mode", "loop", "--length", str(1 << 20), "--timeout", str(TIMEOUT),
                  "--chunk-bytes", str(64 << 10), *RING, *DATA[data])
    for r in range(n):
        assert group.line(r) == {"ok": 0}
    killed_at = time.time()
    os.kill(group.procs[victim].pid, signal.SIGKILL)
    for r in range(n):
        if r == victim:
            continue
        while "ok" in (msg := group.line(r)):
            pass  # a pass that completed before the kill
        assert msg["error"] == "CollectiveError", msg
        assert msg["missing"] == [victim], msg
        assert f"r{victim}" in msg["message"]
        assert msg["at"] - killed_at <= TIMEOUT + 0.5, msg["at"] - killed_at
        assert group.procs[r].wait(timeout=10) == 0
