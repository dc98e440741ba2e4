"""experiments/simulate.py in CI: a few seeds of every protocol on the simulated network, each
with its invariants checked (the script runs 1,000 per protocol; see docs/reliability.md)."""

import asyncio
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))

import simulate

SEEDS = range(5)
KNOWN = {("functions", 3)}  # found by this suite; see test_known_function_pool_livelock


@pytest.mark.parametrize("protocol", sorted(simulate.PROTOCOLS))
def test_every_protocol_keeps_its_invariants_on_a_few_seeds(protocol):
    broken = [(seed, bad) for seed in SEEDS if (protocol, seed) not in KNOWN
              for _, _, bad in [simulate.one(protocol, seed)] if bad]
    assert broken == []


@pytest.mark.xfail(strict=True, reason="FunctionPool.invoke waits on the pool's condition for `deadline - now`; "
                   "under virtual time that wait can be shorter than the loop's clock resolution, expire "
                   "without the clock moving, and repeat forever (dmlsys/events/functions.py)")
def test_known_function_pool_livelock(monkeypatch):
    monkeypatch.setattr(simulate, "SPIN_LIMIT", 5_000)
    _, _, bad = simulate.one("functions", 3)
    assert bad == []


def test_a_clock_that_stops_is_reported_as_a_livelock_not_a_hang(monkeypatch):
    monkeypatch.setattr(simulate, "SPIN_LIMIT", 1_000)

    async def spin():
        while True:
            await asyncio.sleep(0)

    with pytest.raises(simulate.Livelock, match="virtual time stuck"):
        simulate._run(spin())


def test_a_broken_invariant_fails_the_seed(monkeypatch):
    """The checks can fail: an echo that answers with another call's tag is caught."""

    async def wrong(self, body):
        return "someone else's"

    monkeypatch.setattr(simulate._Echo, "echo", simulate.rpc(wrong))
    _, _, bad = simulate.one("rpc", 0)
    assert any("WRONG ANSWER" in b for b in bad)
