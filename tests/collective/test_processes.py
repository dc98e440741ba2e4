"""Real processes over ZeroMQ: allreduce matches numpy; SIGKILL of one rank mid-allreduce makes
the others raise within the group's timeout."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.collective.rank_proc import array_for

SCRIPT = Path(__file__).with_name("rank_proc.py")
TIMEOUT = 3.0

pytestmark = pytest.mark.slow


class Ranks:
    """N rank processes, wired to each other; killed at teardown whatever happened."""

    def __init__(self, n: int, *args: str) -> None:
        self.procs = [subprocess.Popen([sys.executable, str(SCRIPT), "--rank", str(r), "--size", str(n), *args],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                      for r in range(n)]
        addresses = {f"r{r}": self.line(r)["zmq"] for r in range(n)}
        for p in self.procs:
            p.stdin.write(json.dumps({"peers": addresses}) + "\n")
            p.stdin.flush()

    def line(self, rank: int) -> dict:
        text = self.procs[rank].stdout.readline()
        if not text:
            raise AssertionError(f"rank {rank} exited ({self.procs[rank].wait()}) without a word")
        return json.loads(text)

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()
            for f in (p.stdin, p.stdout):
                f.close()


@pytest.fixture
def ranks():
    made: list[Ranks] = []

    def make(n: int, *args: str) -> Ranks:
        made.append(Ranks(n, *args))
        return made[-1]

    yield make
    for r in made:
        r.close()


@pytest.mark.parametrize("n", [2, 3, 4])
def test_allreduce_across_processes_matches_numpy_and_is_identical_on_every_rank(n, ranks, tmp_path):
    passes = 6
    group = ranks(n, "--mode", "check", "--passes", str(passes), "--out", str(tmp_path), "--timeout", "30")
    for r in range(n):
        for p in range(passes):
            assert group.line(r) == {"ok": p}
    for p in range(passes):
        xs = [array_for(r, p) for r in range(n)]
        got = [np.load(tmp_path / f"rank{r}_pass{p}.npy", allow_pickle=False) for r in range(n)]
        assert all(g.tobytes() == got[0].tobytes() and g.dtype == got[0].dtype for g in got)
        want = np.sum(np.stack(xs).astype(np.float64), axis=0)
        if xs[0].dtype.kind in "iu":
            np.testing.assert_array_equal(got[0], np.sum(np.stack(xs), axis=0, dtype=xs[0].dtype))
        else:
            np.testing.assert_allclose(got[0].astype(np.float64), want, rtol=1e-2 if got[0].itemsize == 2 else 1e-5,
                                       atol=0.5 if got[0].itemsize == 2 else 1e-4)


@pytest.mark.parametrize("n, victim", [(2, 1), (3, 0), (4, 2)])
def test_sigkill_of_one_rank_mid_allreduce_makes_the_others_raise_within_the_timeout(n, victim, ranks):
    group = ranks(n, "--mode", "loop", "--length", str(1 << 20), "--timeout", str(TIMEOUT))
    for r in range(n):
        assert group.line(r) == {"ok": 0}  # everyone is in the loop, mid-way through pass 1
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
