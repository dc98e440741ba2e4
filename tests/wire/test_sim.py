"""The simulated network: seeded faults, virtual time, replayable traces, crash and restart."""

from __future__ import annotations

import asyncio
import time

import pytest
from hypothesis import given, settings, strategies as st

from dmlsys.node import Node, RpcTimeout
from dmlsys.wire import TransportError, sim
from dmlsys.wire.sim import Link, SimNetwork

from tests.node.helpers import Echo


def collect(net: SimNetwork, name: str) -> list:
    """A started endpoint that records what it receives."""
    got: list = []
    endpoint = net.transport(name)
    endpoint.set_receiver(lambda frames, route: got.append((frames[0], route)))
    return got


def transmit(net: SimNetwork, count: int, settle: float = 1.0) -> list:
    """Send ``count`` numbered frames a -> b; return what b received, in arrival order."""
    got = collect(net, "b")
    a = net.transport("a")

    async def main():
        for i in range(count):
            a.send("b", [b"%d" % i])
        await asyncio.sleep(settle)

    sim.run(main())
    return [int(frames) for frames, _ in got]


@pytest.mark.parametrize("bad", [dict(delay=-1), dict(jitter=-0.1), dict(drop=1.5), dict(duplicate=-0.1)])
def test_links_refuse_impossible_settings(bad):
    with pytest.raises(ValueError):
        Link(**bad)


def test_jitter_reorders_but_loses_nothing():
    got = transmit(SimNetwork(3, link=Link(delay=0.001, jitter=0.01)), 100)
    assert sorted(got) == list(range(100))
    assert got != list(range(100)), "with 10x more jitter than delay some messages must overtake others"


def test_no_jitter_keeps_order():
    assert transmit(SimNetwork(3, link=Link(delay=0.001, jitter=0.0)), 50) == list(range(50))


def test_drop_and_duplicate_rates_are_applied_and_traced():
    net = SimNetwork(5, link=Link(drop=0.3, duplicate=0.2))
    got = transmit(net, 1000)
    events = [d.event for d in net.trace]
    assert 230 < events.count("drop") < 370
    assert len(got) == events.count("deliver") + events.count("duplicate")
    assert events.count("duplicate") > 80
    assert len(set(got)) == events.count("deliver") == 1000 - events.count("drop")


def test_partition_blocks_both_ways_until_healed():
    net = SimNetwork(1)
    got_a, got_b, got_c = collect(net, "a"), collect(net, "b"), collect(net, "c")
    a, b, c = (net._endpoints[n] for n in "abc")

    async def main():
        net.partition({"a", "c"}, {"b"})
        a.send("b", [b"1"]), b.send("a", [b"2"]), a.send("c", [b"3"])
        await asyncio.sleep(0.1)
        net.heal()
        a.send("b", [b"4"])
        await asyncio.sleep(0.1)

    sim.run(main())
    assert [f for f, _ in got_b] == [b"4"] and got_a == [] and [f for f, _ in got_c] == [b"3"]
    assert [d.event for d in net.trace].count("partitioned") == 2


def test_messages_in_flight_when_a_partition_starts_are_lost():
    net = SimNetwork(1, link=Link(delay=0.05, jitter=0))
    got = collect(net, "b")

    async def main():
        net.transport("a").send("b", [b"x"])
        await asyncio.sleep(0.01)
        net.partition({"a"}, {"b"})
        await asyncio.sleep(0.1)

    sim.run(main())
    assert got == [] and net.trace[-1].event == "partitioned"


def test_a_crashed_endpoint_neither_sends_nor_receives_until_restarted():
    net = SimNetwork(1)
    got = collect(net, "b")
    hooks: list[str] = []
    net.on_crash("b", lambda: hooks.append("b crashed"))

    async def main():
        a = net.transport("a")
        a.send("b", [b"before"])
        net.crash("b")
        a.send("b", [b"while down"])
        await asyncio.sleep(0.1)
        assert net.is_down("b")
        restarted = net.transport("b")  # same name, fresh endpoint
        restarted.set_receiver(lambda frames, route: got.append((frames[0], route)))
        a.send("b", [b"after"])
        await asyncio.sleep(0.1)

    sim.run(main())
    assert [f for f, _ in got] == [b"after"] and hooks == ["b crashed"]


def test_a_closed_endpoint_refuses_to_send():
    net = SimNetwork(1)
    a = net.transport("a")

    async def main():
        await a.close()
        with pytest.raises(TransportError, match="closed"):
            a.send("b", [b"x"])

    sim.run(main())


# -- nodes on a faulty network ------------------------------------------------------------


async def calls_under_faults(net: SimNetwork, n_calls: int, partition_at: float | None) -> list:
    b = Node("b", net.transport("b"))
    b.add_service(Echo())
    a = Node("a", net.transport("a"))
    await b.start()
    await a.start()

    async def one(i: int):
        await asyncio.sleep(i * 0.01)
        try:
            return await a.call("b", "echo", "echo", {"i": i}, timeout=0.5)
        except RpcTimeout as e:
            return e

    async def partition():
        if partition_at is not None:
            await asyncio.sleep(partition_at)
            net.partition({"a"}, {"b"})
            await asyncio.sleep(0.3)
            net.heal()

    results, _ = await asyncio.gather(asyncio.gather(*(one(i) for i in range(n_calls))), partition())
    await a.stop()
    await b.stop()
    return results


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32), drop=st.floats(0, 0.6), duplicate=st.floats(0, 0.5),
       jitter=st.floats(0, 0.05), partition_at=st.one_of(st.none(), st.floats(0, 0.3)))
def test_under_drops_duplicates_reordering_and_partitions_a_call_is_right_or_times_out(
        seed, drop, duplicate, jitter, partition_at):
    net = SimNetwork(seed, link=Link(delay=0.002, jitter=jitter, drop=drop, duplicate=duplicate))
    results = sim.run(calls_under_faults(net, 30, partition_at))
    for i, result in enumerate(results):
        assert result == {"i": i} or isinstance(result, RpcTimeout), f"call {i} got {result!r}"
    if drop == 0 and partition_at is None:
        assert all(r == {"i": i} for i, r in enumerate(results)), "nothing lost: every call must succeed"


def test_the_same_seed_replays_the_same_trace():
    def trace(seed: int):
        net = SimNetwork(seed, link=Link(jitter=0.01, drop=0.2, duplicate=0.2))
        results = sim.run(calls_under_faults(net, 40, 0.1))
        return net.trace, [isinstance(r, RpcTimeout) for r in results]

    first, again, other = trace(11), trace(11), trace(12)
    assert first == again
    assert len(first[0]) > 40 and any(first[1]) and not all(first[1])
    assert first[0] != other[0]


def test_virtual_time_a_30s_timeout_costs_no_wall_time():
    net = SimNetwork(1)

    async def main():
        a = Node("a", net.transport("a"))
        await a.start()
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(RpcTimeout, match="within 30s"):
            await a.call("nobody", "echo", "echo", 1, timeout=30)
        await a.stop()
        return loop.time() - started

    wall = time.perf_counter()
    virtual = sim.run(main())
    assert virtual >= 30
    assert time.perf_counter() - wall < 1.0


def test_a_crashed_node_restarted_under_the_same_name_answers_again():
    net = SimNetwork(2)

    async def main():
        a = Node("a", net.transport("a"))
        await a.start()

        async def start_b():
            b = Node("b", net.transport("b"))
            b.add_service(Echo())
            await b.start()
            return b

        b = await start_b()
        assert await a.call("b", "echo", "echo", 1, timeout=1) == 1
        net.crash("b")
        b.kill()
        with pytest.raises(RpcTimeout):
            await a.call("b", "echo", "echo", 2, timeout=1)
        await b.stop()
        b = await start_b()
        assert await a.call("b", "echo", "echo", 3, timeout=1) == 3
        await b.stop()
        await a.stop()

    sim.run(main())
