"""The bulk path's sealing (dmlsys.wire.bulk), without sockets: what opens is exactly what was
sealed, once, in order; whatever is tampered with, reordered, replayed, truncated or sealed
without the session's key is refused and counted, never delivered."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dmlsys.wire import bulk
from dmlsys.wire.bulk import MIN_CHUNK, BulkError, BulkSession
from dmlsys.wire.codec import Kind, Message, decode, encode

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

DTYPES = ["u1", "i2", "<i4", ">i4", "f2", "f4", ">f8", "c8", "?", "u8"]


def pair() -> tuple[BulkSession, BulkSession]:
    """(the offerer's side, the acceptor's side) of one session."""
    sender = BulkSession.make("a")
    return sender, BulkSession(sender.sid, sender.key, "a", offerer=False)


def message(seed: int, sizes: list[int]) -> list:
    rng = np.random.default_rng(seed)
    arrays = [rng.integers(0, 256, n, dtype=np.uint8) for n in sizes]
    return encode(Message(Kind.REQUEST, seed, "s.m", "a", {"arrays": arrays}, 5.0))


class Receiver:
    """Feeds pieces to a session and keeps what a transport would deliver and count."""

    def __init__(self, session: BulkSession) -> None:
        self.session, self.delivered, self.rejected = session, [], 0

    def feed(self, piece: list) -> None:
        try:
            frames = self.session.open(piece)
        except BulkError:
            self.rejected += 1
            return
        finally:
            self.rejected += self.session.abandoned
            self.session.abandoned = 0
        if frames is not None:
            self.delivered.append([bytes(f) for f in frames])


def plain(frames: list) -> list[bytes]:
    return [bytes(memoryview(f).cast("B")) if not isinstance(f, bytes) else f for f in frames]


@given(
    shapes=st.lists(st.lists(st.integers(0, 37), min_size=0, max_size=3), min_size=1, max_size=4),
    dtypes=st.lists(st.sampled_from(DTYPES), min_size=4, max_size=4),
    chunk=st.integers(MIN_CHUNK, 3 * MIN_CHUNK + 7),
    piece=st.integers(1, 3),
    seed=st.integers(0, 2**32 - 1),
)
@FAST
def test_arrays_of_odd_sizes_and_dtypes_round_trip_exactly(shapes, dtypes, chunk, piece, seed):
    rng = np.random.default_rng(seed)
    arrays = []
    for shape, dtype in zip(shapes, dtypes):
        raw = rng.integers(0, 256, int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize, dtype=np.uint8)
        arrays.append(raw.view(dtype).reshape(shape))
    arrays.append(rng.integers(0, 256, 3 * chunk + 5, dtype=np.uint8).view("u1"))  # across chunk edges
    frames = encode(Message(Kind.REPLY, 7, "s.m", "a", arrays))
    sender, receiver = pair()
    out = None
    pieces = list(sender.seal(frames, chunk=chunk, piece=piece))
    for i, p in enumerate(pieces):
        out = receiver.open(p)
        assert (out is None) == (i < len(pieces) - 1)
    got = decode(out).body
    for a, b in zip(arrays, got):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert a.tobytes() == b.tobytes()  # bitwise: NaN payloads, -0.0 and all


def test_a_16_mib_array_round_trips_and_the_receiver_may_write_to_it():
    array = np.random.default_rng(0).random(4 << 20, dtype=np.float32)
    sender, receiver = pair()
    for p in sender.seal(encode(Message(Kind.REQUEST, 1, "s.m", "a", array, 5.0))):
        out = receiver.open(p)
    got = decode(out).body
    assert np.array_equal(got, array)
    got[0] = 1.0  # a fresh buffer, not a view of the ciphertext


MUTATIONS = ["flip", "drop", "swap", "duplicate", "truncate", "replay", "wrong_key", "reflect", "unsealed"]


@given(
    mutation=st.sampled_from(MUTATIONS),
    target=st.integers(0, 2**16),
    byte=st.integers(0, 2**31),
    sizes=st.lists(st.integers(0, 3 * MIN_CHUNK), min_size=1, max_size=3),
    piece=st.integers(1, 2),
)
@FAST
def test_tampered_reordered_replayed_or_truncated_pieces_are_never_delivered_and_are_counted(
        mutation, target, byte, sizes, piece):
    """Three messages go by; the middle one is attacked. The first and the last are delivered
    exactly (the session recovers), the middle one never, and the attack is counted."""
    sender, acceptor = pair()
    originals = [message(i, sizes) for i in range(3)]
    sealed = [list(sender.seal(m, chunk=MIN_CHUNK, piece=piece)) for m in originals]
    middle = sealed[1]
    k = target % len(middle)
    if mutation == "flip":  # one bit of one frame of one piece: preamble, index or ciphertext
        victim = [bytearray(bytes(memoryview(f).cast("B"))) for f in middle[k]]
        frame = victim[byte % 3]
        frame[(byte // 3) % len(frame)] ^= 1 << (byte % 8)
        middle = middle[:k] + [[bytes(f) for f in victim]] + middle[k + 1:]
    elif mutation == "drop":
        middle = middle[:k] + middle[k + 1:]
    elif mutation == "swap":
        if len(middle) < 2:
            middle = [middle[0], middle[0]]
        else:
            j = (k + 1) % len(middle)
            middle = list(middle)
            middle[k], middle[j] = middle[j], middle[k]
    elif mutation == "duplicate":  # a piece twice in a row
        middle = middle[:k + 1] + [middle[k]] + middle[k + 1:]
    elif mutation == "truncate":  # a piece's ciphertext cut short
        p = list(middle[k])
        ct = bytes(memoryview(p[2]).cast("B"))
        p[2] = ct[:byte % len(ct)]
        middle = middle[:k] + [p] + middle[k + 1:]
    elif mutation == "replay":  # the first message again, in the middle's place
        middle = sealed[0]
    elif mutation == "wrong_key":  # the session id seen on the wire, any other key
        forger = BulkSession(sender.sid, bytes(32), "a", offerer=True)
        forger._send_next = sender._send_next
        middle = list(forger.seal(message(99, sizes), chunk=MIN_CHUNK, piece=piece))
    elif mutation == "reflect":  # the acceptor's own direction, sealed with the real key
        middle = list(acceptor.seal(message(98, sizes), chunk=MIN_CHUNK, piece=piece))
    elif mutation == "unsealed":  # a node message as it would travel without encryption
        middle = [[f if isinstance(f, bytes) else bytes(f) for f in message(97, sizes)][:3]]
    receiver = Receiver(acceptor)
    for p in sealed[0] + middle + sealed[2]:
        receiver.feed(p)
    first, middle_one, last = (plain(m) for m in originals)
    # Never a forged, altered or repeated message; the session recovers for the next one.
    assert receiver.delivered in ([first, last], [first, middle_one, last])
    if receiver.delivered == [first, middle_one, last]:
        # Only when every genuine piece of it still came, in order, and the attack merely added
        # a copy of one (refused as a replay or out of turn, and counted).
        assert mutation in ("duplicate", "swap") and len(sealed[1]) == 1 or mutation == "duplicate"
        assert receiver.rejected >= 1
    elif not (mutation == "drop" and len(sealed[1]) == 1):
        assert receiver.rejected >= 1  # (a message dropped whole never arrived: loss, not an attack to count)


def test_a_message_is_refused_before_anything_is_allocated_for_it_unless_its_first_chunk_opens():
    sender, acceptor = pair()
    forger = BulkSession(sender.sid, bytes(32), "a", offerer=True)
    # A preamble claiming 1 GiB frames: the receiver checks the first chunk before allocating.
    forged = next(forger.seal([b"header"] + [b"x"] * 3))
    preamble = bytearray(forged[0])
    preamble[-8:] = (1 << 30).to_bytes(8, "big")
    with pytest.raises(BulkError) as e:
        acceptor.open([bytes(preamble), forged[1], forged[2]])
    assert e.value.reason == "tampered"


def test_counters_only_grow_and_a_session_asks_to_be_rotated():
    sender, _ = pair()
    list(sender.seal([b"h", b"x" * 10]))
    assert sender._send_next == 2
    assert not sender.due_for_rotation(now=10.0)
    assert sender.due_for_rotation(now=bulk.ROTATE_SECONDS + 1)
    sender.sealed_bytes = bulk.ROTATE_BYTES
    assert sender.due_for_rotation(now=0.0)


def test_control_messages_parse_only_when_well_formed():
    s = BulkSession.make("b")
    assert bulk.parse_offer(bulk.offer_frames(s)) == (s.sid, s.key)
    assert bulk.parse_offer([bulk.OFFER, s.sid, s.key[:5]]) is None
    assert bulk.parse_accept(bulk.accept_frames(s.sid, 5555)) == (s.sid, 5555)
    assert bulk.parse_accept([bulk.ACCEPT, s.sid, b"99999"]) is None
    assert bulk.OFFER[:1] == bulk.ACCEPT[:1] == bulk.CONTROL_LEAD == b"\xc1"  # msgpack's unused byte


# -- order across the two connections -------------------------------------------------------------


@given(
    large=st.lists(st.booleans(), min_size=1, max_size=12),
    schedule=st.lists(st.booleans(), max_size=40),
    lost=st.sets(st.integers(0, 11), max_size=3),
)
@FAST
def test_the_sequencer_delivers_in_the_order_sent_however_the_two_connections_interleave(large, schedule, lost):
    """Message i is small (it comes on the CURVE connection) or large (a MARK comes on the CURVE
    connection, the sealed message on the bulk one). The two streams arrive interleaved as
    ``schedule`` says; a few sealed messages are lost (the receiver gives up on them)."""
    curve_stream = [("mark", i) if big else ("small", i) for i, big in enumerate(large)]
    bulk_stream = [i for i, big in enumerate(large) if big and i not in lost]
    seq = bulk.Sequencer()
    delivered: list[int] = []
    turns = iter(schedule)
    while curve_stream or bulk_stream:
        take_bulk = bulk_stream and (not curve_stream or next(turns, False))
        if take_bulk:
            i = bulk_stream.pop(0)
            delivered += seq.opened(("s", i), i)
        else:
            kind, i = curve_stream.pop(0)
            delivered += seq.mark(("s", i)) if kind == "mark" else seq.message(i)
        while seq.waiting_for() is not None and seq.waiting_for()[1] in lost and not bulk_stream:
            delivered += seq.give_up(seq.waiting_for())  # the timer: nothing more will come
    assert delivered == [i for i in range(len(large)) if not (large[i] and i in lost)]
    assert seq.idle()


def test_the_sequencer_holds_only_so_many_messages_whose_mark_has_not_come():
    seq = bulk.Sequencer()
    for i in range(bulk.Sequencer.MAX_HELD + 3):  # (opened with no MARK: a payload of one int each)
        assert seq.opened(("s", i), i) == []
    assert seq.dropped == 3
    assert seq.mark(("s", 0)) == []  # among the dropped: waits, until given up
    assert seq.give_up(("s", 0)) == []
    assert seq.mark(("s", 3)) == [3]


@FAST
@given(size=st.sampled_from([16, 32]), seed=st.integers(0, 2**16), n=st.integers(1, 3 * MIN_CHUNK))
def test_sessions_are_aes128_and_a_peers_aes256_key_still_opens(size, seed, n):
    """New sessions carry a 16-byte key (the module says why); an offer with a 32-byte key, from
    a node that still makes them, works the same; any other length is not an offer."""
    assert len(BulkSession.make("a").key) == bulk.KEY_BYTES == 16
    key = bytes(np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8))
    sid = bytes(16)
    offer = bulk.parse_offer([bulk.OFFER, sid, key])
    assert offer == (sid, key)
    sender = BulkSession(sid, key, "a", offerer=True)
    receiver = Receiver(BulkSession(sid, key, "a", offerer=False))
    frames = message(seed, [n])
    for piece in sender.seal(frames, chunk=MIN_CHUNK):
        receiver.feed(piece)
    assert receiver.delivered == [plain(frames)] and receiver.rejected == 0
    assert bulk.parse_offer([bulk.OFFER, sid, key[:size - 8]]) is None


def test_helper_thread_only_with_cores_to_spare(monkeypatch):
    monkeypatch.setattr(bulk.os, "sched_getaffinity", lambda pid: set(range(2)))
    monkeypatch.delenv("DMLSYS_BULK_THREADS", raising=False)
    assert bulk._threads() == 1
    monkeypatch.setattr(bulk.os, "sched_getaffinity", lambda pid: set(range(4)))
    assert bulk._threads() == 2
    monkeypatch.setenv("DMLSYS_BULK_THREADS", "1")
    assert bulk._threads() == 1


@pytest.mark.parametrize("threads", [1, 2])
def test_split_between_two_threads_opens_the_same(monkeypatch, threads):
    """The helper thread's half of a piece (cores to spare) seals and opens exactly as one thread."""
    monkeypatch.setattr(bulk, "THREADS", threads)
    sender, acceptor = pair()
    receiver = Receiver(acceptor)
    frames = message(7, [5 * MIN_CHUNK + 3, 2 * MIN_CHUNK])
    for piece in sender.seal(frames, chunk=MIN_CHUNK, piece=4):
        receiver.feed(piece)
    assert receiver.delivered == [plain(frames)] and receiver.rejected == 0
