"""The ordered mailbox (dmlsys.collective.mailbox) on its own: addresses, bounds, failure.

No network: messages are put and got by hand, on a plain event loop, in orders hypothesis
draws."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dmlsys.collective import CollectiveError, InvalidArgument, Mailbox

SOURCES = st.integers(0, 3)
TAGS = st.integers(0, 5)


def run(coro):
    return asyncio.run(coro)


async def settle() -> None:
    """Let every task that can run, run."""
    for _ in range(5):
        await asyncio.sleep(0)


@settings(max_examples=100, deadline=None)
@given(addresses=st.sets(st.tuples(st.integers(0, 2), TAGS, SOURCES), min_size=1, max_size=30),
       data=st.data())
def test_every_get_receives_the_message_put_at_its_address_whatever_the_order(addresses, data):
    """Some gets come before their message, some after; puts arrive in any order, sources
    interleaved. Each get still returns exactly its own address's message."""
    addresses = sorted(addresses)
    arrival = data.draw(st.permutations(addresses))
    early = data.draw(st.sets(st.sampled_from(addresses)))  # these getters wait before the put

    async def main():
        box = Mailbox()
        waiting = {a: asyncio.ensure_future(box.get(*a)) for a in addresses if a in early}
        await settle()
        assert all(not t.done() for t in waiting.values())
        for a in arrival:
            assert box.put(*a, f"message {a}")
        got = {a: await box.get(*a) for a in addresses if a not in early}
        got.update({a: await t for a, t in waiting.items()})
        return got, box.statistics()

    got, stats = run(main())
    assert got == {a: f"message {a}" for a in addresses}
    assert stats.messages == 0 and stats.nbytes == 0 and stats.waiting == 0


@settings(max_examples=50, deadline=None)
@given(tags=st.lists(TAGS, min_size=2, max_size=10, unique=True), source=SOURCES)
def test_one_sources_messages_are_got_in_the_order_asked_not_the_order_sent(tags, source):
    async def main():
        box = Mailbox()
        for t in reversed(tags):
            box.put(0, t, source, t)
        return [await box.get(0, t, source) for t in tags]

    assert run(main()) == tags


def test_the_same_tag_from_two_sources_is_two_messages():
    async def main():
        box = Mailbox()
        box.put(0, "notice", 1, "from 1")
        box.put(0, "notice", 2, "from 2")
        return await box.get(0, "notice", 2), await box.get(0, "notice", 1)

    assert run(main()) == ("from 2", "from 1")


def test_a_second_message_at_a_held_address_is_refused_and_the_first_kept():
    async def main():
        box = Mailbox()
        assert box.put(0, 1, 1, "first")
        assert not box.put(0, 1, 1, "second")
        return await box.get(0, 1, 1)

    assert run(main()) == "first"


@settings(max_examples=100, deadline=None)
@given(sizes=st.lists(st.integers(0, 100), min_size=1, max_size=40), max_messages=st.integers(0, 20),
       max_bytes=st.integers(0, 1000))
def test_what_waits_unclaimed_never_exceeds_the_bounds(sizes, max_messages, max_bytes):
    """Messages of the given sizes arrive with nobody waiting: the box keeps them while both
    bounds hold, refuses the rest, and counts exactly what it keeps."""
    box = Mailbox(max_messages=max_messages, max_bytes=max_bytes, size=len)
    kept = count = 0
    for i, size in enumerate(sizes):
        accepted = box.put(0, i, 0, b"x" * size)
        fits = count < max_messages and kept + size <= max_bytes
        assert accepted == fits, (i, size, count, kept)
        if accepted:
            kept, count = kept + size, count + 1
        stats = box.statistics()
        assert stats.messages == count <= max_messages and stats.nbytes == kept <= max_bytes


def test_a_message_handed_to_a_waiter_counts_against_no_bound():
    async def main():
        box = Mailbox(max_messages=0, max_bytes=0, size=len)
        getter = asyncio.ensure_future(box.get(0, 0, 0))
        await settle()
        assert box.put(0, 0, 0, b"big" * 1000)  # straight into the waiter's hand
        assert not box.put(0, 1, 0, b"")  # nobody waits: no room
        return await getter

    assert run(main()) == b"big" * 1000


@settings(max_examples=50, deadline=None)
@given(waiters=st.sets(st.tuples(TAGS, SOURCES), min_size=1, max_size=12),
       other=st.sets(st.tuples(TAGS, SOURCES), max_size=5))
def test_failing_a_pass_wakes_every_waiter_of_it_and_no_other(waiters, other):
    error = CollectiveError("rank 2 (w2) died", missing=[2])

    async def main():
        box = Mailbox()
        mine = [asyncio.ensure_future(box.get(7, t, s)) for t, s in waiters]
        theirs = [asyncio.ensure_future(box.get(8, t, s)) for t, s in other]
        await settle()
        box.fail(7, error)
        await settle()
        results = await asyncio.gather(*mine, return_exceptions=True)
        assert all(not t.done() for t in theirs)  # pass 8 was not failed
        with pytest.raises(CollectiveError) as later:
            await box.get(7, "anything", 0)  # a get that comes after the failure
        for t in theirs:
            t.cancel()
        await settle()
        return results, later.value, box.statistics()

    results, later, stats = run(main())
    assert all(r is error for r in results) and later is error
    assert stats.waiting == 0


def test_a_finished_pass_drops_its_leftovers_and_refuses_stragglers():
    box = Mailbox(size=len)
    box.put(3, 0, 1, b"abc")
    box.put(4, 0, 1, b"de")
    box.fail(3, CollectiveError("gave up"))
    box.finish(3)
    assert box.failure(3) is None and box.done_below == 4
    assert not box.put(3, 1, 1, b"late") and not box.put(2, 0, 1, b"later")
    assert box.held(3) == [] and box.held(4) == [(0, 1, b"de")]
    assert box.statistics().nbytes == 2


def test_closing_fails_every_waiter_of_every_pass_and_every_later_get():
    error = CollectiveError("the group was closed")

    async def main():
        box = Mailbox()
        box.put(9, 0, 0, "held")
        waiting = [asyncio.ensure_future(box.get(seq, 0, 1)) for seq in (1, 2, 3)]
        await settle()
        box.close(error)
        results = await asyncio.gather(*waiting, return_exceptions=True)
        with pytest.raises(CollectiveError):
            await box.get(9, 0, 0)  # what was held is dropped
        return results, box.put(1, 0, 1, "late"), box.statistics()

    results, accepted, stats = run(main())
    assert results == [error] * 3 and not accepted
    assert stats.messages == 0 and stats.waiting == 0


def test_a_cancelled_get_leaves_no_waiter_behind_and_its_message_is_kept():
    async def main():
        box = Mailbox()
        getter = asyncio.ensure_future(box.get(0, 0, 0))
        await settle()
        getter.cancel()
        await settle()
        assert box.statistics().waiting == 0
        assert box.put(0, 0, 0, "for the next asker")
        return await box.get(0, 0, 0)

    assert run(main()) == "for the next asker"


def test_negative_bounds_are_refused():
    with pytest.raises(InvalidArgument, match="max_bytes=-1"):
        Mailbox(max_bytes=-1)
