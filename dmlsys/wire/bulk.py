"""The bulk path: large messages sealed with AES-128-GCM by us, on a socket without CURVE.

Why: CurveZMQ encrypts every byte with XSalsa20-Poly1305 in libzmq's one I/O thread and copies
each message in and out of scratch buffers. Measured on the 2-core dev machine (docs/security.md,
"Where the time goes"): 16 MiB over loopback TCP took 97 ms with CURVE and 4.6 ms without;
AES-GCM (OpenSSL with AES-NI, through the ``cryptography`` package, which releases the GIL)
seals the same 16 MiB in about 4.5 ms with a 128-bit key (5 ms with a 256-bit one) and opens it
in as long.

Why a 128-bit key: the session key travels inside CurveZMQ, whose X25519 exchange is a 128-bit
security level; a longer AES key would not make the channel stronger than what carries it, and
AES-128 does 10 rounds where AES-256 does 14 (about 8% less CPU per byte here, measured). It is
TLS 1.3's mandatory cipher. A 256-bit key from a peer is still accepted.

What a session is. A sender that has a large message for a peer makes a session: 16 random
bytes of id and a 16-byte random key, sent to the peer *inside the CURVE connection*
(``OFFER``). The receiver binds the session to the principal ZAP named for that connection and
to the connection's route, and answers on it with the port of its bulk socket (``ACCEPT``).
From then on messages to that peer above ``BULK_MIN_BYTES`` travel on the bulk socket as
``seal`` makes them; the receiver delivers what ``open`` accepts as coming from the session's
principal, over the session's CURVE route, in the place its ``MARK`` (sent after it inside the
CURVE connection) holds there: see ``Sequencer``. Only the two ends ever hold the key, and it only
ever travelled encrypted and authenticated, so a valid bulk message comes from the principal
that made the session (or from the receiver itself).

A sealed message, for original frames ``f_0`` (the header) .. ``f_n-1``, cut into chunks of
``chunk`` bytes (each frame's last one shorter; an empty frame has none), numbered ``g`` =
0, 1, ... across the whole message, and sent as pieces of ``piece`` chunks, each piece its own
ZeroMQ message so that the receiver opens piece k while the sender seals piece k+1::

    piece    = [preamble, index u32, ct of chunks index*piece .. (index+1)*piece - 1]
    preamble = "DMB2" | direction u8 | session id (16) | first counter u64 | chunk u32
               | piece u32 | n u32 | len(f_0) u64 .. len(f_n-1) u64
    chunk g  = AES-GCM(key, nonce = direction u8 | 0 0 0 | (first counter + g) u64,
                           aad = preamble) -> its bytes and a 16-byte tag

Why each property holds:

- *tampered*: every chunk carries a tag over its bytes and the whole preamble;
- *reordered or spliced*: a chunk's nonce is its position in the message and in the session,
  and its tag covers the preamble (which names the session, the first counter and every frame's
  length), so a chunk or piece moved within a message, or into another message, fails its tag;
- *replayed*: each side keeps the next counter it accepts per direction and refuses a message
  that starts below it (gaps are allowed: a send the socket refused spent its counters);
- *truncated*: the preamble fixes the frames, their lengths, hence the chunks and the pieces;
  pieces come in order on one connection, and a message is delivered only when its last piece
  has opened: a message whose pieces stop (or are overtaken by another message) is dropped;
- *reflected*: the direction byte (0 from the session's maker, 1 back) is in every nonce and in
  the preamble, and each side opens only the other's direction;
- *allocation*: nothing is allocated for a message before its first chunk (the header's, never
  empty) has opened, which proves the preamble's lengths come from the key's holder.

Nonces never repeat under a key: counters only grow, per direction, and a session is rotated
long before 2^64 chunks (``ROTATE_BYTES``, ``ROTATE_SECONDS``). This module is the pure core:
no sockets, the clock passed in; ``dmlsys.wire.zmq_transport`` does the I/O.
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
import struct
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from dmlsys.wire.codec import DEFAULT_LIMITS, Limits

# A message goes by the bulk path when its array frames hold at least this many bytes. CURVE
# costs ~6 ns a byte here, AES-GCM ~0.3 ns, and a sealed message ~20-40 µs of fixed Python
# work: from 64 KiB on, the bulk path is the faster one by a wide margin.
BULK_MIN_BYTES = 64 << 10
CHUNK_BYTES = 1 << 20  # 1 MiB: small enough to split between two threads, large enough to amortise a call
PIECE_CHUNKS = 2  # 2 MiB pieces: the receiver opens one while the sender seals the next
MIN_CHUNK, MAX_CHUNK = 4 << 10, 16 << 20  # what a receiver accepts in a preamble
TAG = 16
SESSION_ID_BYTES = 16
KEY_BYTES = 16  # what this side makes: AES-128 (see the module docstring for why)
KEY_SIZES = (16, 32)  # what an offer may carry: AES-128 or AES-256
# Rotation: a sender makes a new session after this many bytes or seconds (AES-GCM with counter
# nonces is safe far beyond both; rotation bounds what one leaked key exposes).
ROTATE_BYTES = 1 << 36  # 64 GiB
ROTATE_SECONDS = 3600.0
# A piece of at least this many chunks is split between the calling thread and a helper thread,
# on machines with 4 cores or more. With 2 the other core is busy already (libzmq's I/O thread,
# the peer when it is on this host, the rest of the node), so a second AES thread only adds its
# hand-offs: measured on the 2-core dev machine, 16 MiB loopback with keys, 6-7% more CPU for
# both processes together and no gain in time. DMLSYS_BULK_THREADS=1 or 2 overrides.
PARALLEL_MIN_CHUNKS = 2


def _threads() -> int:
    chosen = os.environ.get("DMLSYS_BULK_THREADS")
    if chosen in ("1", "2"):
        return int(chosen)
    return 2 if len(os.sched_getaffinity(0)) >= 4 else 1


THREADS = _threads()

# Control messages travel inside the CURVE connection. 0xc1 is the one byte msgpack never
# uses, so no node header starts with it: the transport can take these out of the stream
# without hiding anything a node could have decoded.
OFFER = b"\xc1dmlsys bulk offer"
ACCEPT = b"\xc1dmlsys bulk accept"
MARK = b"\xc1dmlsys bulk mark"  # where a sealed message stands in its CURVE connection's order
CONTROL_LEAD = b"\xc1"

TO_ACCEPTOR, TO_OFFERER = 0, 1  # the direction byte: from the session's maker, and back
_MAGIC = b"DMB2"
_FIXED = struct.Struct(">4sB16sQIII")  # magic, direction, session id, first counter, chunk, piece, frames
_LEN = struct.Struct(">Q")
_INDEX = struct.Struct(">I")


class BulkError(ValueError):
    """A sealed message was refused. ``reason`` is a short word for counting (``tampered``,
    ``replayed``, ``malformed``, ``truncated``, ``unknown_session``, ``too_large``, ``direction``)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _nchunks(size: int, chunk: int) -> int:
    return -(-size // chunk)


def _nonce(direction: int, counter: int) -> bytes:
    return bytes((direction, 0, 0, 0)) + counter.to_bytes(8, "big")


def _buffer(frame: Any) -> memoryview:
    view = memoryview(getattr(frame, "buffer", frame))
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


_pool: concurrent.futures.ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _helper() -> concurrent.futures.ThreadPoolExecutor:
    """One helper thread per process: a large piece is split between it and the caller."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="dmlsys-bulk")
        return _pool


def _run_jobs(jobs: list, fn) -> None:
    """``fn(*job)`` for every job, the first half on the helper thread when there are enough.
    Every job has finished (or failed) before this returns or raises."""
    if THREADS == 1 or len(jobs) < PARALLEL_MIN_CHUNKS:
        for job in jobs:
            fn(*job)
        return
    half = len(jobs) // 2
    future = _helper().submit(lambda: [fn(*job) for job in jobs[:half]])
    try:
        for job in jobs[half:]:
            fn(*job)
    finally:
        future.result()  # raises the helper's error; nothing of the buffers is in use after this


class _Layout:
    """Where chunk g of a message lives: frame, and offsets in plaintext and in a piece."""

    __slots__ = ("chunk", "npieces", "piece", "sizes", "spans", "total")

    def __init__(self, sizes: list[int], chunk: int, piece: int) -> None:
        self.sizes, self.chunk, self.piece = sizes, chunk, piece
        self.spans: list[tuple[int, int, int]] = []  # chunk g -> (frame, lo, hi) in that frame's plaintext
        for i, size in enumerate(sizes):
            for j in range(_nchunks(size, chunk)):
                self.spans.append((i, j * chunk, min(size, (j + 1) * chunk)))
        self.total = len(self.spans)
        self.npieces = _nchunks(self.total, piece)

    def piece_chunks(self, index: int) -> range:
        return range(index * self.piece, min(self.total, (index + 1) * self.piece))

    def piece_bytes(self, index: int) -> int:
        return sum(self.spans[g][2] - self.spans[g][1] + TAG for g in self.piece_chunks(index))


def parse_preamble(buf: Any) -> tuple[int, bytes, int, int, int, list[int]]:
    """(direction, session id, first counter, chunk, piece, frame lengths), or BulkError."""
    view = _buffer(buf)
    if view.nbytes < _FIXED.size:
        raise BulkError("malformed", f"bulk preamble of {view.nbytes} bytes is shorter than {_FIXED.size}")
    magic, direction, sid, first, chunk, piece, n = _FIXED.unpack_from(view)
    if magic != _MAGIC:
        raise BulkError("malformed", "not a sealed bulk message (bad magic)")
    if view.nbytes != _FIXED.size + n * _LEN.size:
        raise BulkError("malformed", f"bulk preamble names {n} frames but is {view.nbytes} bytes")
    sizes = [_LEN.unpack_from(view, _FIXED.size + i * _LEN.size)[0] for i in range(n)]
    return direction, sid, first, chunk, piece, sizes


class _Assembly:
    """A message being opened: its preamble, the next piece expected, its frames so far."""

    __slots__ = ("first", "layout", "next", "out", "preamble")

    def __init__(self, preamble: bytes, first: int, layout: _Layout, out: list) -> None:
        self.preamble, self.first, self.layout, self.out = preamble, first, layout, out
        self.next = 0


class BulkSession:
    """One side of a session: its key, and a counter per direction.

    ``BulkSession.make(principal)`` on the side that offers; ``BulkSession(sid, key, principal,
    offerer=False)`` on the side that accepts. ``principal``: who the other end is (the name
    its CURVE connection proved). ``seal`` and ``open`` are not thread-safe: one event loop
    owns a session.
    """

    __slots__ = ("_aead", "_assembly", "_recv_next", "_send_dir", "_send_next", "abandoned", "created", "key",
                 "offerer", "opened", "principal", "sealed_bytes", "sid")

    def __init__(self, sid: bytes, key: bytes, principal: str, *, offerer: bool, now: float = 0.0) -> None:
        if len(sid) != SESSION_ID_BYTES or len(key) not in KEY_SIZES:
            raise ValueError(f"a bulk session needs a {SESSION_ID_BYTES}-byte id and a 16- or 32-byte key")
        self.sid, self.key, self.principal, self.offerer = sid, key, principal, offerer
        self.created = now
        self.sealed_bytes = 0
        self.opened = 0
        self.abandoned = 0  # messages dropped because the next began before their last piece came
        self._aead = AESGCM(key)
        self._send_dir = TO_ACCEPTOR if offerer else TO_OFFERER
        self._send_next = 0
        self._recv_next = 0
        self._assembly: _Assembly | None = None

    def __repr__(self) -> str:
        return f"BulkSession({self.sid.hex()[:8]}, peer={self.principal!r}, offerer={self.offerer})"

    @classmethod
    def make(cls, principal: str, now: float = 0.0) -> BulkSession:
        return cls(os.urandom(SESSION_ID_BYTES), AESGCM.generate_key(KEY_BYTES * 8), principal, offerer=True, now=now)

    @property
    def next_counter(self) -> int:
        """The first counter of the next message ``seal`` makes (what its MARK names)."""
        return self._send_next

    def due_for_rotation(self, now: float) -> bool:
        return self.sealed_bytes >= ROTATE_BYTES or now - self.created >= ROTATE_SECONDS

    # -- sealing ------------------------------------------------------------------------------

    def seal(self, frames: Sequence[Any], *, chunk: int = CHUNK_BYTES, piece: int = PIECE_CHUNKS) -> Iterator[list]:
        """Original frames -> the pieces to send, each ``[preamble, index, ct]``, sealed one at
        a time as the caller asks for them (send each before asking for the next). The counters
        are spent at once: a message abandoned half-way never lets a nonce be used twice."""
        views = [_buffer(f) for f in frames]
        sizes = [v.nbytes for v in views]
        if not sizes or sizes[0] == 0:
            raise ValueError("a bulk message needs a non-empty first frame (its header)")
        if not MIN_CHUNK <= chunk <= MAX_CHUNK or piece < 1:
            raise ValueError(f"bulk chunk {chunk} must be in [{MIN_CHUNK}, {MAX_CHUNK}], piece >= 1")
        layout = _Layout(sizes, chunk, piece)
        first = self._send_next
        self._send_next = first + layout.total
        self.sealed_bytes += sum(sizes)
        preamble = _FIXED.pack(_MAGIC, self._send_dir, self.sid, first, chunk, piece, len(sizes)) \
            + b"".join(_LEN.pack(s) for s in sizes)
        return self._pieces(views, layout, preamble, first)

    def _pieces(self, views: list[memoryview], layout: _Layout, preamble: bytes, first: int) -> Iterator[list]:
        aead, direction = self._aead, self._send_dir
        for index in range(layout.npieces):
            ct = np.empty(layout.piece_bytes(index), np.uint8)  # not bytearray: zero-filling costs as much as sealing
            target = memoryview(ct)
            jobs, at = [], 0
            for g in layout.piece_chunks(index):
                frame, lo, hi = layout.spans[g]
                jobs.append((_nonce(direction, first + g), views[frame][lo:hi], target[at:at + hi - lo + TAG]))
                at += hi - lo + TAG
            _run_jobs(jobs, lambda nonce, data, buf: aead.encrypt_into(nonce, data, preamble, buf))
            yield [preamble, _INDEX.pack(index), ct]

    # -- opening ------------------------------------------------------------------------------

    def open(self, parts: Sequence[Any], limits: Limits = DEFAULT_LIMITS) -> list | None:
        """One piece ``[preamble, index, ct]``: the original frames once the message's last
        piece has opened (header as bytes, the rest as writable memoryviews), None while more
        pieces are due, or BulkError. Nothing is returned unless every chunk is authentic."""
        if len(parts) != 3:
            raise BulkError("malformed", f"a bulk piece has 3 frames, not {len(parts)}")
        preamble = bytes(_buffer(parts[0]))
        index_buf = _buffer(parts[1])
        if index_buf.nbytes != _INDEX.size:
            raise BulkError("malformed", "bulk piece index is not 4 bytes")
        index = _INDEX.unpack(index_buf)[0]
        ct = _buffer(parts[2])
        assembly = self._assembly
        if assembly is not None and (index == 0 or preamble != assembly.preamble):
            self._assembly = None  # overtaken: the rest of that message never came
            if index != 0:
                raise BulkError("truncated", "a bulk piece of another message arrived before the last one ended")
            self.abandoned += 1  # the caller counts it; the new message goes on
            assembly = None
        if assembly is None:
            if index != 0:
                raise BulkError("truncated", f"bulk piece {index} of a message whose first piece never opened")
            assembly = self._start(preamble, ct, limits)
            return self._finish_piece(assembly, 0, ct)
        if index != assembly.next:
            self._assembly = None
            raise BulkError("truncated", f"bulk piece {index} where piece {assembly.next} was due")
        return self._finish_piece(assembly, index, ct)

    def _start(self, preamble: bytes, ct: memoryview, limits: Limits) -> _Assembly:
        """A message's first piece: check the preamble, open the first chunk (the header's,
        which authenticates the preamble); only then lay out and allocate the message."""
        direction, sid, first, chunk, piece, sizes = parse_preamble(preamble)
        if sid != self.sid:
            raise BulkError("unknown_session", f"bulk message for session {sid.hex()[:8]}, not {self.sid.hex()[:8]}")
        if direction != 1 - self._send_dir:
            raise BulkError("direction", f"bulk message in direction {direction}: this side only sends that way")
        if not MIN_CHUNK <= chunk <= MAX_CHUNK or not 1 <= piece <= 1 << 16:
            raise BulkError("malformed", f"bulk chunk {chunk} or piece {piece} out of range")
        if len(sizes) > limits.max_frames:
            raise BulkError("too_large", f"{len(sizes)} frames exceeds the limit of {limits.max_frames}")
        if not sizes or sizes[0] == 0:
            raise BulkError("malformed", "bulk message without a header frame")
        if sizes[0] > limits.max_header_bytes or any(s > limits.max_frame_bytes for s in sizes[1:]):
            raise BulkError("too_large", "a bulk frame exceeds Limits.max_header_bytes or max_frame_bytes")
        if first < self._recv_next:
            raise BulkError("replayed", f"bulk message starts at counter {first}, below {self._recv_next}")
        head = min(sizes[0], chunk)
        if ct.nbytes < head + TAG:
            raise BulkError("malformed", "bulk piece 0 is shorter than its first chunk")
        header = np.empty(sizes[0], np.uint8)  # bounded by Limits.max_header_bytes
        try:
            self._aead.decrypt_into(_nonce(direction, first), ct[:head + TAG], preamble, memoryview(header)[:head])
        except InvalidTag:
            raise BulkError("tampered", "a bulk message's first chunk failed authentication (altered, or not sealed "
                            "with this session's key)") from None
        layout = _Layout(sizes, chunk, piece)
        self._recv_next = first + layout.total  # from now on, no replay of this message starts again
        out = [memoryview(header)] + [memoryview(np.empty(size, np.uint8)) for size in sizes[1:]]
        return _Assembly(preamble, first, layout, out)

    def _finish_piece(self, assembly: _Assembly, index: int, ct: memoryview) -> list | None:
        layout = assembly.layout
        if ct.nbytes != layout.piece_bytes(index):
            self._assembly = None
            raise BulkError("malformed", f"bulk piece {index} holds {ct.nbytes} bytes, not {layout.piece_bytes(index)}")
        direction = 1 - self._send_dir
        chunks = layout.piece_chunks(index)
        at = 0
        if index == 0:  # its first chunk opened in _start
            at = layout.spans[0][2] + TAG
            chunks = chunks[1:]
        jobs = []
        for g in chunks:
            frame, lo, hi = layout.spans[g]
            jobs.append((_nonce(direction, assembly.first + g), ct[at:at + hi - lo + TAG], assembly.out[frame][lo:hi]))
            at += hi - lo + TAG
        aead, preamble = self._aead, assembly.preamble
        try:
            _run_jobs(jobs, lambda nonce, data, buf: aead.decrypt_into(nonce, data, preamble, buf))
        except InvalidTag:
            self._assembly = None
            raise BulkError("tampered", "a bulk chunk failed authentication (altered, moved, or not sealed with "
                            "this session's key)") from None
        assembly.next = index + 1
        if assembly.next < layout.npieces:
            self._assembly = assembly
            return None
        self._assembly = None
        self.opened += 1
        out = assembly.out
        out[0] = bytes(out[0])  # the header: the node's fast decode path wants bytes
        return out


def offer_frames(session: BulkSession) -> list[bytes]:
    return [OFFER, session.sid, session.key]


def parse_offer(frames: Sequence[bytes]) -> tuple[bytes, bytes] | None:
    """(session id, key) of a well-formed OFFER, else None."""
    if len(frames) != 3 or frames[0] != OFFER:
        return None
    sid, key = bytes(frames[1]), bytes(frames[2])
    if len(sid) != SESSION_ID_BYTES or len(key) not in KEY_SIZES:
        return None
    return sid, key


def accept_frames(sid: bytes, port: int) -> list[bytes]:
    return [ACCEPT, sid, b"%d" % port]


def parse_accept(frames: Sequence[bytes]) -> tuple[bytes, int] | None:
    """(session id, port; 0: no bulk socket there) of a well-formed ACCEPT, else None."""
    if len(frames) != 3 or frames[0] != ACCEPT or len(frames[1]) != SESSION_ID_BYTES:
        return None
    try:
        port = int(bytes(frames[2]))
    except ValueError:
        return None
    return (bytes(frames[1]), port) if 0 <= port < 65536 else None


def mark_frames(sid: bytes, first: int) -> list[bytes]:
    return [MARK, sid, first.to_bytes(8, "big")]


def parse_mark(frames: Sequence[bytes]) -> tuple[bytes, int] | None:
    """(session id, first counter) of a well-formed MARK, else None."""
    if len(frames) != 3 or frames[0] != MARK or len(frames[1]) != SESSION_ID_BYTES or len(frames[2]) != 8:
        return None
    return bytes(frames[1]), int.from_bytes(bytes(frames[2]), "big")


def first_counter(preamble: Any) -> int:
    """The first counter a (well-formed) preamble names: with the session id, a message's key."""
    return parse_preamble(preamble)[2]


_WAITING = object()


class Sequencer:
    """One connection's messages, back in the order they were sent.

    A ZeroMQ connection delivers in order, and protocols here lean on it (the collective's
    ``leave`` proves its chunks arrived by an answer on the same connection). A sealed message
    travels on the bulk connection instead, so its sender also puts a MARK into the CURVE
    connection where the message stands. The receiver holds everything that comes on the CURVE
    connection after a MARK until the sealed message it names has opened, and a sealed message
    that opens before its MARK until the MARK comes: delivery follows the CURVE connection's
    order exactly. Pure: the caller delivers what each method returns, in that order, and asks
    ``waiting_for`` after each call to know whether to set a timer (``give_up``: a sealed
    message refused, or lost with its connection, must not hold the connection forever).
    """

    # Sealed messages opened before their MARK. A burst of large messages outruns the MARKs (the
    # bulk connection has no per-byte CURVE pass), so this is generous; only a session holder
    # can fill it, and a member can flood a node with ordinary requests just as well.
    MAX_HELD = 1024

    __slots__ = ("_held", "_queue", "dropped", "last_progress")

    def __init__(self, now: float = 0.0) -> None:
        self._queue: collections.deque[list] = collections.deque()  # [key or None, payload or _WAITING]
        self._held: dict[Any, Any] = {}  # key -> payload of a sealed message opened before its MARK
        self.last_progress = now  # when a piece last opened on this connection (the caller says)
        self.dropped = 0  # held messages let go because too many were waiting for their MARK

    def idle(self) -> bool:
        return not self._queue and not self._held

    def message(self, payload: Any) -> list:
        """A message from the CURVE connection itself."""
        if not self._queue:
            return [payload]
        self._queue.append([None, payload])
        return []

    def mark(self, key: Any) -> list:
        """A MARK for the sealed message ``key``."""
        payload = self._held.pop(key, _WAITING)
        if not self._queue and payload is not _WAITING:
            return [payload]
        self._queue.append([key, payload])
        return self._flush()

    def opened(self, key: Any, payload: Any) -> list:
        """The sealed message ``key`` has opened."""
        for entry in self._queue:
            if entry[0] == key and entry[1] is _WAITING:
                entry[1] = payload
                return self._flush()
        self._held[key] = payload
        while len(self._held) > self.MAX_HELD:
            del self._held[next(iter(self._held))]
            self.dropped += 1
        return []

    def waiting_for(self) -> Any:
        """The key of the sealed message that holds the connection up, or None."""
        return self._queue[0][0] if self._queue and self._queue[0][1] is _WAITING else None

    def give_up(self, key: Any) -> list:
        """Stop waiting for ``key`` (if it still holds the connection up): deliver what follows."""
        if self.waiting_for() != key or key is None:
            return []
        self._queue.popleft()
        return self._flush()

    def _flush(self) -> list:
        out = []
        queue = self._queue
        while queue and queue[0][1] is not _WAITING:
            out.append(queue.popleft()[1])
        return out
