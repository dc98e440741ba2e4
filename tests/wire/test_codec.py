"""The codec: what goes in comes out (arrays as zero-copy read-only views), and whatever bytes
arrive, decode() either returns a Message or raises WireError, never anything else."""

from __future__ import annotations

import math
import struct
import tracemalloc

import msgpack
import numpy as np
import pytest
from hypothesis import example, given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from dmlsys.wire.codec import (
    ARRAY_EXT, MAX_DEADLINE, PREFIX_BYTES, PROTOCOL_VERSION, Kind, Limits, Message, WireError, decode, encode,
    request_prefix,
)

FAST = settings(max_examples=150, deadline=None)

# -- strategies -------------------------------------------------------------------------------

DTYPES = st.one_of(
    hnp.boolean_dtypes(),
    hnp.integer_dtypes(endianness="?"),
    hnp.unsigned_integer_dtypes(endianness="?"),
    hnp.floating_dtypes(endianness="?"),
    hnp.complex_number_dtypes(endianness="?"),
)


@st.composite
def any_array(draw) -> np.ndarray:
    """Arrays of every numeric dtype and bool, 0-d and empty included, and views of them that
    are not C-contiguous: strided, reversed, transposed (Fortran order)."""
    arr = draw(hnp.arrays(DTYPES, hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5)))
    view = draw(st.sampled_from(["as is", "strided", "reversed", "transposed", "fortran"]))
    if arr.ndim == 0 or view == "as is":
        return arr
    if view == "strided":
        return arr[::2]
    if view == "reversed":
        return arr[::-1]
    if view == "transposed":
        return arr.T
    return np.asfortranarray(arr)


SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(allow_nan=True),
    st.text(max_size=20), st.binary(max_size=40),
)
BODIES = st.recursive(
    st.one_of(SCALARS, any_array()),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.tuples(inner, inner),
        st.dictionaries(st.one_of(st.text(max_size=8), st.integers(-5, 5)), inner, max_size=4),
    ),
    max_leaves=12,
)


def same(got, want) -> bool:
    """Structural equality after a trip over the wire: tuples come back as lists, arrays are
    compared by dtype, shape and bytes (so NaN payloads and -0.0 count too)."""
    if isinstance(want, np.ndarray):
        return (isinstance(got, np.ndarray) and got.dtype == want.dtype and got.shape == want.shape
                and got.tobytes() == np.ascontiguousarray(want).tobytes())
    if isinstance(want, (list, tuple)):
        return isinstance(got, list) and len(got) == len(want) and all(same(g, w) for g, w in zip(got, want))
    if isinstance(want, dict):
        return isinstance(got, dict) and got.keys() == want.keys() and all(same(got[k], want[k]) for k in want)
    if isinstance(want, float) and math.isnan(want):
        return isinstance(got, float) and math.isnan(got)
    return type(got) is type(want) and got == want


def arrays_in(body) -> list[np.ndarray]:
    if isinstance(body, np.ndarray):
        return [body]
    if isinstance(body, dict):
        body = list(body.values())
    if isinstance(body, (list, tuple)):
        return [a for item in body for a in arrays_in(item)]
    return []


def wire(frames: list) -> list[bytes]:
    """What a socket would deliver: every frame as its own bytes."""
    return [bytes(f) for f in frames]


# -- round trip -------------------------------------------------------------------------------


@FAST
@given(body=BODIES, kind=st.sampled_from(Kind), msg_id=st.integers(0, 2**63),
       deadline=st.one_of(st.none(), st.floats(0, MAX_DEADLINE)))
def test_any_body_round_trips(body, kind, msg_id, deadline):
    msg = Message(kind, msg_id, "svc.method", "node-a", body, deadline)
    got = decode(wire(encode(msg)))
    assert (got.kind, got.id, got.method, got.sender, got.deadline) == (kind, msg_id, "svc.method", "node-a", deadline)
    assert same(got.body, body)
    for arr in arrays_in(got.body):
        if arr.size:
            assert not arr.flags.writeable, "received arrays are views of the message: read-only"


@FAST
@given(arr=any_array())
def test_each_array_travels_in_its_own_frame(arr):
    frames = encode(Message(Kind.REPLY, 1, "s.m", "a", {"x": arr, "y": [arr]}))
    assert len(frames) == 3
    assert all(len(f) == arr.nbytes for f in frames[1:])
    assert len(frames[0]) < 200, "array bytes never pass through the msgpack header"


def test_contiguous_arrays_are_sent_and_received_without_a_copy():
    arr = np.arange(1 << 16, dtype=np.float64)
    frames = encode(Message(Kind.REQUEST, 1, "s.m", "a", {"w": arr}))
    assert np.shares_memory(np.frombuffer(frames[1], np.uint8), arr), "encode must not copy a contiguous array"
    received = [bytes(frames[0]), bytearray(frames[1])]
    got = decode(received).body["w"]
    assert np.shares_memory(got, np.frombuffer(received[1], np.uint8)), "decode must view the frame, not copy it"
    assert np.array_equal(got, arr)


def test_received_arrays_are_read_only():
    got = decode(wire(encode(Message(Kind.REPLY, 1, "s.m", "a", np.ones(4, np.int32))))).body
    with pytest.raises(ValueError):
        got[0] = 5
    writable = got.copy()
    writable[0] = 5
    assert writable[0] == 5


def test_numpy_scalars_travel_as_0d_arrays():
    got = decode(wire(encode(Message(Kind.REPLY, 1, "s.m", "a", [np.int16(-3), np.bool_(True)])))).body
    assert got[0].shape == () and got[0].dtype == np.int16 and got[0] == -3
    assert got[1].dtype == np.bool_ and bool(got[1])


def test_jax_arrays_travel_as_their_host_bytes():
    jnp = pytest.importorskip("jax.numpy")
    x = jnp.arange(6, dtype=jnp.float32).reshape(2, 3)
    got = decode(wire(encode(Message(Kind.REQUEST, 1, "s.m", "a", {"params": [x]})))).body["params"][0]
    assert isinstance(got, np.ndarray) and got.dtype == np.float32
    assert np.array_equal(got, np.asarray(x))


@pytest.mark.parametrize("body", [{1, 2}, object(), np.array([1, "x"], dtype=object), {"f": len},
                                  np.zeros(2, dtype=[("a", "<i4"), ("b", "<f4")])])
def test_what_the_wire_cannot_carry_is_refused_with_wire_error(body):
    with pytest.raises(WireError, match="encode|object|pickle|structured"):
        encode(Message(Kind.REQUEST, 1, "s.m", "a", body))


# -- decoding untrusted bytes -------------------------------------------------------------


def decodes_or_wire_error(frames, limits: Limits = Limits()) -> Message | None:
    try:
        msg = decode(frames, limits)
    except WireError:
        return None
    assert isinstance(msg, Message)
    return msg


@FAST
@given(st.one_of(st.binary(max_size=64), st.lists(st.binary(max_size=64), max_size=6)))
def test_any_bytes_decode_or_raise_wire_error(frames):
    decodes_or_wire_error(frames)


@st.composite
def mutated(draw) -> list[bytes]:
    """A valid encoding, then damaged: truncated, bytes flipped, frames dropped, added or swapped."""
    body = draw(BODIES)
    frames = [bytearray(f) for f in wire(encode(Message(draw(st.sampled_from(Kind)), 7, "s.m", "a", body, 1.0)))]
    for _ in range(draw(st.integers(1, 3))):
        what = draw(st.sampled_from(["truncate", "flip", "drop", "add", "swap", "extend"]))
        i = draw(st.integers(0, len(frames) - 1)) if frames else 0
        if what == "truncate" and frames:
            frames[i] = frames[i][: draw(st.integers(0, max(0, len(frames[i]) - 1)))]
        elif what == "flip" and frames and frames[i]:
            j = draw(st.integers(0, len(frames[i]) - 1))
            frames[i][j] ^= draw(st.integers(1, 255))
        elif what == "drop" and frames:
            del frames[i]
        elif what == "add":
            frames.insert(i, bytearray(draw(st.binary(max_size=16))))
        elif what == "swap" and len(frames) > 1:
            frames[0], frames[-1] = frames[-1], frames[0]
        elif what == "extend" and frames:
            frames[i] += draw(st.binary(min_size=1, max_size=8))
    return [bytes(f) for f in frames]


@settings(max_examples=300, deadline=None)
@given(mutated())
def test_damaged_encodings_decode_or_raise_wire_error(frames):
    decodes_or_wire_error(frames)


def header(*fields, body=None) -> bytes:
    return msgpack.packb([PROTOCOL_VERSION, int(Kind.REQUEST), 1, "s.m", "a", body, *fields], use_bin_type=True)


def array_ref(dtype, shape, index) -> msgpack.ExtType:
    return msgpack.ExtType(ARRAY_EXT, msgpack.packb([dtype, shape, index]))


@pytest.mark.parametrize("frames, match", [
    ([], "empty"),
    (None, "frames"),
    (12, "frames"),
    ([b"\xc1"], "malformed header"),
    ([msgpack.packb({"v": 1})], "array"),
    ([msgpack.packb([2, 0, 1, "s.m", "a", None])], "version 2"),
    ([msgpack.packb([True, 0, 1, "s.m", "a", None])], "version"),
    ([msgpack.packb([1, 9, 1, "s.m", "a", None])], "kind"),
    ([msgpack.packb([1, 0, "1", "s.m", "a", None])], "id"),
    ([msgpack.packb([1, 0, 1, "s.m"])], "fields"),
    ([header(float("nan"))], "dl"),
    ([header(-1.0)], "dl"),
    ([header(1e300)], "dl"),
    ([header("soon")], "dl"),
    ([header(body=msgpack.ExtType(5, b"x"))], "ext type 5"),
    ([header(body=array_ref("<f4", [2], 1))], "no array frames"),
    ([header(body=array_ref("<f4", [2], 2)), b"\0" * 8], "points at frame 2"),
    ([header(body=[array_ref("<f4", [2], 1)] * 2), b"\0" * 8], "referenced twice"),
    ([header(body=None), b"\0" * 8], "not referenced"),
    ([header(body=array_ref("<f4", [3], 1)), b"\0" * 8], "needs 12"),
    ([header(body=array_ref("<f4", [-2], 1)), b"\0" * 8], "negative"),
    ([header(body=array_ref("|O", [1], 1)), b"\0" * 8], "object"),
    ([header(body=array_ref(None, [2], 1)), b"\0" * 16], "malformed array reference"),
    ([header(body=array_ref("<f4", "2", 1)), b"\0" * 8], "malformed array reference"),
    ([header(body=array_ref("<f4", [2.0], 1)), b"\0" * 8], "malformed array reference"),
    ([header(body=array_ref("not-a-dtype", [2], 1)), b"\0" * 8], "unknown dtype"),
    ([header(body=array_ref("<f4", [1] * 80, 1)), b"\0" * 4], "cannot be built"),
    # Zero bytes per item: count * 0 == 0 bytes "fits" any frame, and np.empty would allocate
    # one byte per item; this 44-byte message made a 4 MB array that the echo role sent back.
    ([header(body=array_ref("S0", [4_000_000], 1)), b""], "no bytes per item"),
    ([header(body=array_ref("<U0", [4_000_000], 1)), b""], "no bytes per item"),
    ([header(body=array_ref("V0", [4_000_000], 1)), b""], "no bytes per item"),
    # Structured and subarray dtypes: encode() refuses them, so decode() does too.
    ([header(body=array_ref("<i4,<f4", [1], 1)), b"\0" * 8], "structured"),
    ([header(body=array_ref("(2,)<f4", [1], 1)), b"\0" * 8], "subarray"),
    ([b"header", 5], "frame 1 is a int"),
])
def test_malformed_messages_raise_wire_error_naming_the_problem(frames, match):
    with pytest.raises(WireError, match=match):
        decode(frames)


@pytest.mark.parametrize("limits, frames, match", [
    (Limits(max_header_bytes=16), [header(body="x" * 32)], "Limits.max_header_bytes"),
    (Limits(max_frames=2), [header(body=[array_ref("|u1", [1], 1), array_ref("|u1", [1], 2)]), b"a", b"b"],
     "Limits.max_frames"),
    (Limits(max_frame_bytes=8), [header(body=array_ref("|u1", [9], 1)), b"x" * 9], "Limits.max_frame_bytes"),
])
def test_oversized_messages_are_refused_before_parsing(limits, frames, match):
    with pytest.raises(WireError, match=match):
        decode(frames, limits)
    decode(frames)  # the same message is fine under the default limits


def test_limits_must_be_positive_ints():
    with pytest.raises(ValueError, match="max_frames"):
        Limits(max_frames=0)


# -- what decode builds is bounded by what it was given ---------------------------------------

ODD_DTYPES = ["S0", "U0", "V0", "|S0", "<U0", ">U0", "S1", "U1", "V4", "<f4", "|u1", "?", "<i4,<f4", "(2,)<f4",
              "(0,)<f4", "(1000000,)u1", "M8[s]", "<m8[ns]", "O", "|O"]
DIMS = st.sampled_from([0, 1, 2, 3, 7, 1000, 10**6, 4_000_000, 2**31, 2**62])


@settings(max_examples=300, deadline=None)
@given(dtypes=st.lists(st.sampled_from(ODD_DTYPES), min_size=1, max_size=3),
       shapes=st.lists(st.lists(DIMS, max_size=4), min_size=3, max_size=3),
       frame_sizes=st.lists(st.integers(0, 64), min_size=3, max_size=3))
@example(dtypes=["S0"], shapes=[[4_000_000], [], []], frame_sizes=[0, 0, 0])
def test_decoding_never_allocates_more_than_a_small_multiple_of_the_bytes_received(dtypes, shapes, frame_sizes):
    refs = [array_ref(d, shape, i + 1) for i, (d, shape) in enumerate(zip(dtypes, shapes))]
    frames = [header(body=refs)] + [b"\0" * n for n in frame_sizes[: len(refs)]]
    received = sum(map(len, frames))
    tracemalloc.start()
    try:
        decodes_or_wire_error(frames)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # The constant covers the exception and traceback objects of a refusal.
    assert peak <= 64 * received + 65536, f"{received} bytes received, {peak} bytes allocated decoding them"


# -- the sender holds itself to the receiver's limits ------------------------------------------


@pytest.mark.parametrize("limits, body, match", [
    (Limits(max_header_bytes=64), "x" * 100, "Limits.max_header_bytes"),
    (Limits(max_header_bytes=64), {"a": np.ones(2), "b": "x" * 100}, "Limits.max_header_bytes"),
    (Limits(max_frames=2), [np.ones(2), np.ones(2)], "Limits.max_frames"),
    (Limits(max_frame_bytes=8), np.ones(2), "Limits.max_frame_bytes"),
])
def test_encode_refuses_what_a_receiver_with_the_same_limits_would_refuse(limits, body, match):
    msg = Message(Kind.REQUEST, 1, "s.m", "a", body, 1.0)
    with pytest.raises(WireError, match=match):
        encode(msg, limits)
    decode(wire(encode(msg)))  # within the default limits it is fine


def test_encode_refuses_dtypes_without_bytes_per_item():
    with pytest.raises(WireError, match="no bytes per item"):
        encode(Message(Kind.REPLY, 1, "s.m", "a", np.empty(3, np.dtype("V0"))))


SMALL_LIMITS = st.builds(Limits, max_header_bytes=st.integers(1, 400), max_frames=st.integers(1, 4),
                         max_frame_bytes=st.integers(1, 200))


@FAST
@given(body=BODIES, limits=SMALL_LIMITS)
def test_whatever_encode_accepts_under_some_limits_decode_accepts_under_the_same(body, limits):
    """No message is accepted at the sender and refused, silently, at the receiver."""
    try:
        frames = encode(Message(Kind.REQUEST, 3, "s.m", "a", body, 1.0), limits)
    except WireError:
        return
    assert same(decode(wire(frames), limits).body, body)


# -- a refused request can still be answered ---------------------------------------------------


@FAST
@given(body=BODIES, msg_id=st.integers(0, 2**63), method=st.text(max_size=40), sender=st.text(max_size=40),
       deadline=st.one_of(st.none(), st.floats(0, 100)))
def test_request_prefix_reads_id_method_and_sender_whatever_follows(body, msg_id, method, sender, deadline):
    frames = wire(encode(Message(Kind.REQUEST, msg_id, method, sender, body, deadline)))
    assert request_prefix(frames) == (msg_id, method, sender)
    frames[0] = frames[0][:-1]  # the last byte is the body's or the deadline's: they no longer parse
    assert request_prefix(frames) == (msg_id, method, sender)


def test_request_prefix_of_a_header_over_the_limit_reads_only_its_start():
    frames = wire(encode(Message(Kind.REQUEST, 99, "svc.m", "caller", "x" * (2 << 20), 5.0), Limits(max_header_bytes=4 << 20)))
    with pytest.raises(WireError, match="Limits.max_header_bytes"):
        decode(frames)
    assert len(frames[0]) > PREFIX_BYTES and request_prefix(frames) == (99, "svc.m", "caller")


@pytest.mark.parametrize("kind", [Kind.REPLY, Kind.ERROR, Kind.ONEWAY])
def test_request_prefix_answers_only_requests(kind):
    assert request_prefix(wire(encode(Message(kind, 1, "s.m", "a", None)))) is None


@FAST
@given(st.one_of(st.binary(max_size=64), st.lists(st.binary(max_size=64), max_size=4), st.none(), st.integers()))
def test_request_prefix_of_anything_is_a_prefix_or_none(frames):
    got = request_prefix(frames)
    assert got is None or (type(got[0]) is int and type(got[1]) is str and type(got[2]) is str)


CONTAINER_CLAIMS = {  # msgpack container headers and the largest count each can claim
    "array16": (b"\xdc", ">H"), "array32": (b"\xdd", ">I"), "map16": (b"\xde", ">H"), "map32": (b"\xdf", ">I"),
}


@settings(max_examples=100, deadline=None)
@given(kind=st.sampled_from(sorted(CONTAINER_CLAIMS)), depth=st.integers(1, 1100),
       claim=st.sampled_from([15, 255, 4096, 65535, 2**20, 2**32 - 1]), pad=st.integers(0, 20_000),
       inside=st.booleans(), arrays=st.booleans())
@example(kind="array32", depth=1000, claim=2**32 - 1, pad=20_000, inside=True, arrays=False)
@example(kind="array16", depth=42, claim=127, pad=0, inside=False, arrays=False)
def test_nested_containers_claiming_elements_never_sent_allocate_nothing_like_their_claims(
        kind, depth, claim, pad, inside, arrays):
    """msgpack allocates a container at its claimed size before reading its elements: the
    claims must be backed by bytes before anything is built (10 KB here allocated 80 MB)."""
    code, fmt = CONTAINER_CLAIMS[kind]
    claims = (code + struct.pack(fmt, min(claim, 2 ** (8 * struct.calcsize(fmt)) - 1))) * depth + b"\0" * pad
    head = msgpack.packb([PROTOCOL_VERSION, int(Kind.REQUEST), 1, "s.m", "a"])  # the body follows: 6 fields
    frames = [(b"\x96" + head[1:] + claims) if inside else claims]
    if arrays:
        frames.append(b"\0" * 8)
    received = sum(map(len, frames))
    tracemalloc.start()
    try:
        decodes_or_wire_error(frames)
        request_prefix(frames)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak <= 64 * received + 65536, f"{received} bytes received, {peak} bytes allocated decoding them"


def test_an_array_reference_holding_unbacked_claims_allocates_nothing_like_them():
    claims = msgpack.ExtType(ARRAY_EXT, (b"\xdd" + struct.pack(">I", 2**32 - 1)) * 1000 + b"\0" * 20_000)
    frames = [header(body=claims), b"\0" * 8]
    tracemalloc.start()
    try:
        with pytest.raises(WireError, match="malformed"):
            decode(frames)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak <= 64 * sum(map(len, frames)) + 65536
