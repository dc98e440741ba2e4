"""The sharding router and stateful shards on the simulated network (virtual time: milliseconds)."""

import asyncio

import pytest
from hypothesis import given, settings, strategies as st

from dmlsys.node import Directory, Member, Node, RemoteError
from dmlsys.sharding.app import counter, identity
from dmlsys.sharding.errors import PartFailed
from dmlsys.wire import sim

from tests.sharding.helpers import Cluster

# -- the identity app: split -> merge is the identity ------------------------------------------

items_st = st.lists(st.one_of(st.integers(-5, 5), st.text(max_size=3)), max_size=40)


@settings(max_examples=80, deadline=None)
@given(items_st, st.integers(1, 7))
def test_identity_split_then_merge_returns_the_request(items, chunk):
    app = identity()
    parts = app.split({"items": items, "chunk": chunk})
    assert len({k for k, _ in parts}) == len(parts)  # distinct keys: parts spread over the ring
    results = [app.handle(k, p, None)[0] for k, p in parts]
    assert app.cleanup(app.merge(results)) == items


@pytest.mark.parametrize("seed", [1, 2])
def test_a_request_through_router_and_shards_comes_back_whole(tmp_path, seed):
    async def scenario():
        c = Cluster(seed, ["s0", "s1", "s2"], identity, tmp_path)
        await c.start()
        items = list(range(100))
        assert await c.router.run({"items": items, "chunk": 3}) == items
        handled = [c.shard(s).counters["handled"] for s in ("s0", "s1", "s2")]
        assert sum(handled) == 34 and min(handled) > 0  # every part served once, spread over the shards
        await c.stop()

    sim.run(scenario())


# -- a shard crashing mid-request --------------------------------------------------------------


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_shard_crashing_mid_request_is_retried_on_the_next_owner(tmp_path, seed):
    async def scenario():
        c = Cluster(seed, ["s0", "s1", "s2"], identity, tmp_path, part_timeout=0.5)
        await c.start()
        items = list(range(60))
        run = asyncio.get_running_loop().create_task(c.router.run({"items": items, "chunk": 1}))
        await asyncio.sleep(0.0005)  # parts are on the wire (links take 1-2 ms)
        c.net.crash("s1")
        c.shards["s1"].kill()
        assert await run == items
        assert c.router.counters["retries"] >= 1  # some part really was on s1
        await c.stop()

    sim.run(scenario())


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_stateful_request_losing_its_shard_fails_naming_part_and_shard_never_partially(tmp_path, seed):
    async def scenario():
        c = Cluster(seed, ["s0", "s1", "s2"], counter, tmp_path, part_timeout=0.5)
        await c.start()
        adds = {f"user-{i}": 1.0 for i in range(30)}
        run = asyncio.get_running_loop().create_task(c.router.run({"add": adds}))
        await asyncio.sleep(0.0005)
        c.net.crash("s1")
        c.shards["s1"].kill()
        with pytest.raises(PartFailed) as err:
            await run  # s1's keys belong to s1 alone: the next shard refuses them rather than fork their state
        assert "s1" in str(err.value) and f"part {err.value.part} " in str(err.value)
        assert err.value.shard in ("s0", "s2") and "NotOwner" in str(err.value)
        # Through the RPC door the caller sees the same named error, never a partial dict.
        caller = Node("client", c.net.transport("client"), directory=Directory(c.members))
        await caller.start()
        with pytest.raises(RemoteError, match=r"PartFailed: part \d+ \(key 'user-\d+'\)"):
            await caller.call("router", "router", "request", {"request": {"add": adds}}, timeout=5.0)
        await caller.stop(0)
        await c.stop()

    sim.run(scenario())


def test_a_retried_request_resumes_from_the_parts_already_served(tmp_path):
    async def scenario():
        c = Cluster(4, ["s0", "s1", "s2"], identity, tmp_path, part_timeout=0.3)
        await c.start()
        items = list(range(40))
        shards = ("s0", "s1", "s2")
        c.net.partition({"router", "s0"}, {"s1", "s2"})  # parts whose owner and next are s1, s2 fail
        with pytest.raises(PartFailed):
            await c.router.run({"items": items, "chunk": 1}, request_id="req-1")
        c.net.heal()
        before = sum(c.shard(s).counters["handled"] for s in shards)
        assert await c.router.run({"items": items, "chunk": 1}, request_id="req-1") == items
        sent = sum(c.shard(s).counters["handled"] for s in shards) - before
        resumed = c.router.counters["resumed_parts"]
        assert resumed > 0 and sent > 0 and resumed + sent == len(items)  # nothing served twice
        await c.stop()

    sim.run(scenario())


def test_resume_with_cache_hits_sends_nothing_again(tmp_path):
    async def scenario():
        c = Cluster(5, ["s0", "s1"], identity, tmp_path)
        await c.start()
        items = list(range(20))
        assert await c.router.run({"items": items}, request_id="same") == items
        handled = c.shard("s0").counters["handled"] + c.shard("s1").counters["handled"]
        assert await c.router.run({"items": items}, request_id="same") == items
        assert c.shard("s0").counters["handled"] + c.shard("s1").counters["handled"] == handled
        assert c.router.counters["resumed_parts"] == 20
        await c.stop()

    sim.run(scenario())


# -- stateful shards: keys move on membership change, with their state -------------------------


def holders(c: Cluster) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name in c.shards:
        for key in c.shard(name).state:
            out.setdefault(key, []).append(name)
    return out


@pytest.mark.parametrize("seed", [1, 2])
def test_adding_a_shard_moves_only_the_keys_it_now_owns_with_their_state(tmp_path, seed):
    async def scenario():
        c = Cluster(seed, ["s0", "s1"], counter, tmp_path)
        await c.start()
        keys = [f"user-{i}" for i in range(60)]
        await c.router.run({"add": {k: 1.0 for k in keys}})
        await c.router.run({"add": {k: 2.0 for k in keys}})
        before = {k: h[0] for k, h in holders(c).items()}
        await c.add_shard("s2")
        await c.settle()
        after = holders(c)
        assert all(len(h) == 1 for h in after.values())  # each key on exactly one shard
        moved = [k for k in keys if after[k][0] != before[k]]
        assert moved and all(after[k][0] == "s2" for k in moved)  # moved only to the new shard
        assert all(c.shard("s2").ring.lookup(k) == after[k][0] for k in keys)  # each on its owner
        total = await c.router.run({"add": {k: 4.0 for k in keys}})
        assert total == {k: 7.0 for k in keys}  # the state moved with the keys
        assert all(not c.shard(s)._locks for s in c.shards)  # per-key locks live only while used
        await c.stop()

    sim.run(scenario())


def test_a_request_overtaking_the_push_pulls_the_state_from_the_old_owner(tmp_path):
    async def scenario():
        c = Cluster(3, ["s0", "s1"], counter, tmp_path)
        await c.start()
        keys = [f"user-{i}" for i in range(40)]
        await c.router.run({"add": {k: 1.0 for k in keys}})
        # s2 joins and the router hears of it before the old owners do (directories refresh
        # independently): requests for s2's keys reach it before any push could.
        c.members.append(Member("s2", "shard", "sim://s2"))
        await c.start_shard("s2")
        c.router_node.directory.update(c.members)
        total = await c.router.run({"add": {k: 1.0 for k in keys}})
        assert total == {k: 2.0 for k in keys}
        assert c.shard("s2").counters["pulled"] > 0  # handed over on demand by the old owners
        c.publish()
        await c.settle()
        assert await c.router.run({"add": {k: 1.0 for k in keys}}) == {k: 3.0 for k in keys}
        assert all(len(h) == 1 for h in holders(c).values())
        await c.stop()

    sim.run(scenario())


def test_a_shards_state_survives_its_restart(tmp_path):
    async def scenario():
        c = Cluster(6, ["s0", "s1"], counter, tmp_path)
        await c.start()
        keys = [f"user-{i}" for i in range(30)]
        await c.router.run({"add": {k: 5.0 for k in keys}})
        held = sorted(c.shard("s1").state)
        c.net.crash("s1")
        c.shards["s1"].kill()  # a crash: no stop(), only what snapshot_every=1 wrote before each reply
        await c.shards["s1"].stop(0)
        await c.start_shard("s1")
        assert sorted(c.shard("s1").state) == held
        assert await c.router.run({"add": {k: 1.0 for k in keys}}) == {k: 6.0 for k in keys}
        await c.stop()

    sim.run(scenario())


def test_a_leaving_shard_hands_every_key_over_first(tmp_path):
    async def scenario():
        c = Cluster(7, ["s0", "s1", "s2"], counter, tmp_path)
        await c.start()
        keys = [f"user-{i}" for i in range(40)]
        await c.router.run({"add": {k: 1.0 for k in keys}})
        assert await c.shard("s2").leave() == 0
        c.members = [m for m in c.members if m.name != "s2"]
        c.publish()
        await c.shards.pop("s2").stop(0)
        assert await c.router.run({"add": {k: 1.0 for k in keys}}) == {k: 2.0 for k in keys}
        await c.stop()

    sim.run(scenario())


def test_a_part_delivered_twice_is_applied_once(tmp_path):
    from dmlsys.wire.sim import Link

    async def scenario():
        c = Cluster(9, ["s0", "s1"], counter, tmp_path)
        for s in ("s0", "s1"):
            c.net.set_link("router", s, Link(duplicate=1.0))  # every part arrives twice
        await c.start()
        keys = [f"user-{i}" for i in range(20)]
        assert await c.router.run({"add": {k: 1.0 for k in keys}}) == {k: 1.0 for k in keys}
        assert await c.router.run({"add": {k: 1.0 for k in keys}}) == {k: 2.0 for k in keys}
        assert sum(c.shard(s).counters["deduplicated"] for s in ("s0", "s1")) == 40
        await c.stop()

    sim.run(scenario())


def test_a_stateless_requests_parts_spread_evenly_over_the_shards(tmp_path):
    async def scenario():
        c = Cluster(10, ["s0", "s1", "s2", "s3"], identity, tmp_path)
        await c.start()
        items = list(range(64))
        assert await c.router.run({"items": items, "chunk": 1}) == items
        handled = [c.shard(s).counters["handled"] for s in ("s0", "s1", "s2", "s3")]
        assert sum(handled) == 64 and max(handled) <= 18  # ceil(1.1 * 64 / 4)
        await c.stop()

    sim.run(scenario())


@pytest.mark.parametrize("seed", [11, 12])
def test_two_shards_leaving_at_once_hand_over_to_those_that_stay_and_are_served_before_the_directory_knows(
        tmp_path, seed):
    async def scenario():
        c = Cluster(seed, ["s0", "s1", "s2", "s3"], counter, tmp_path)
        await c.start()
        keys = [f"user-{i}" for i in range(60)]
        await c.router.run({"add": {k: 1.0 for k in keys}})
        gone = {"gone": ["s2", "s3"]}
        assert await asyncio.gather(c.shard("s2").leave(gone), c.shard("s3").leave(gone)) == [0, 0]
        # Nobody's directory has changed yet: the router still routes to s2 and s3, which answer
        # ShardLeft; the router drops them, and s0 and s1 (told by the pushes) serve the keys now.
        assert {k for s in ("s0", "s1") for k in c.shard(s).state} == set(keys)
        assert await c.router.run({"add": {k: 1.0 for k in keys}}) == {k: 2.0 for k in keys}
        assert c.router.counters["left"] == 2 and set(c.router.ring.names) == {"s0", "s1"}
        c.members = [m for m in c.members if m.name not in ("s2", "s3")]
        c.publish()
        for name in ("s2", "s3"):
            await c.shards.pop(name).stop(0)
        assert await c.router.run({"add": {k: 1.0 for k in keys}}) == {k: 3.0 for k in keys}
        # The names may join again later: nobody keeps them excluded once the directory dropped them.
        assert not c.router._left and not c.shard("s0")._excluded
        await c.stop()

    sim.run(scenario())


def test_a_request_overtaking_a_leavers_push_waits_for_it_instead_of_starting_the_key_afresh(tmp_path):
    from dmlsys.wire.sim import Link

    async def scenario():
        c = Cluster(13, ["s0", "s1", "s2", "s3"], counter, tmp_path, part_timeout=2.0)
        for s in ("s0", "s1"):  # s3's pushes (and handoff replies) are slow; s2's are not
            c.net.set_link("s3", s, Link(delay=0.2, jitter=0.0))
        await c.start()
        keys = [f"user-{i}" for i in range(60)]
        await c.router.run({"add": {k: 1.0 for k in keys}})
        held_by_s3 = set(c.shard("s3").state)
        assert held_by_s3
        gone = {"gone": ["s2", "s3"]}
        loop = asyncio.get_running_loop()
        leaving = [loop.create_task(c.shard(s).leave(gone)) for s in ("s2", "s3")]
        await asyncio.sleep(0.05)  # s2's keys have arrived (and with them word that s2 and s3 leave); s3's have not
        assert not held_by_s3 & {k for s in ("s0", "s1") for k in c.shard(s).state}
        # The new owners pull s3's keys from s3 (still moving: they wait for the push), never afresh.
        assert await c.router.run({"add": {k: 1.0 for k in keys}}) == {k: 2.0 for k in keys}
        assert await asyncio.gather(*leaving) == [0, 0]
        assert await c.router.run({"add": {k: 1.0 for k in keys}}) == {k: 3.0 for k in keys}
        await c.stop()

    sim.run(scenario())


def test_hand_over_names_the_shards_that_could_not_hand_their_keys_over(tmp_path):
    from dmlsys.sharding.admin import hand_over, loads
    from dmlsys.sharding.errors import ShardingError

    async def scenario():
        c = Cluster(14, ["s0", "s1"], counter, tmp_path)
        await c.start()
        keys = [f"user-{i}" for i in range(20)]
        await c.router.run({"add": {k: 1.0 for k in keys}})
        supervisor = Node("supervisor", c.net.transport("supervisor"), role="supervisor",
                          directory=Directory(c.members))
        await supervisor.start()
        held = await loads(supervisor, ["s0", "s1", "nobody"])
        assert set(held) == {"s0", "s1"} and sum(h["keys"] for h in held.values()) == 20
        c.net.crash("s0")  # s1 can push its keys nowhere
        c.shards["s0"].kill()
        with pytest.raises(ShardingError, match=rf"s1 still holds {held['s1']['keys']} key\(s\)"):
            await hand_over(supervisor, ["s1"], timeout=10.0)
        await supervisor.stop(0)
        await c.stop()

    sim.run(scenario())
