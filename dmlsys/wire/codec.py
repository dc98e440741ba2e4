"""The dmlsys wire format: one msgpack header frame, then raw array frames.

A message is a ZeroMQ multipart message ``[header, frame_0, frame_1, ...]``. The header is a
msgpack array, version first so that any future layout can still be told apart::

    [v, kind, id, "service.method", sender, body]            # replies, errors, one-way
    [v, kind, id, "service.method", sender, body, dl]        # requests: dl = seconds the caller waits

An array rather than a map with named keys: unpacking a map builds its key strings on every
message, which made the header cost four times as much to decode (measured: 1.4 µs vs 0.3 µs).

Arrays never pass through msgpack. Wherever a numpy (or JAX) array appears in the body, the
header holds an ext value ``ARRAY_EXT`` naming dtype, shape and frame index, and the array's
bytes travel as their own frame: handed to ZeroMQ without a copy on send, viewed with
``np.frombuffer`` on receive. Received arrays are therefore read-only views of the message
buffer; call ``.copy()`` before writing to one.

Untrusted bytes are data, never code: there is no pickle, object dtypes are refused, and every
size (header, frame count, frame bytes) is checked against ``Limits`` before it is trusted.
Whatever goes wrong while decoding raises ``WireError``, whose message names what was wrong.
(Nesting depth is bounded by msgpack's own unpacker stack, which raises on absurd depth.)
Nothing a decoder builds is larger than a small multiple of the bytes it was given: dtypes of
zero itemsize (``S0``, ``U0``, ``V0``), whose arrays would be allocated from a shape alone, are
refused, as are the structured and subarray dtypes that ``encode`` never produces. msgpack
allocates every array and map at the size its header claims, before reading the elements: a
few KiB of nested headers each claiming a million elements, never delivered, would allocate
GiBs. A claim backed by elements is bounded by the bytes that hold them, so a header longer
than ``CHECK_STRUCTURE_ABOVE`` is first walked without building anything (``Unpacker.skip``,
a quarter of the cost of unpacking it) and refused when it is not one complete object; a
shorter one cannot claim enough to matter (at most ~45 KB, transiently).

``encode`` holds itself to the same limits, so that what one node sends another accepts: a
header, frame count or frame over them raises ``WireError`` at the sender, at once, instead of
vanishing at the receiver. Because ``id``, ``method`` and ``sender`` come before the body in
the header, a receiver that refuses a request can still read them (``request_prefix``) and
answer the caller with the error rather than leave it waiting for its timeout.
"""

from __future__ import annotations

import dataclasses
import enum
import reprlib
import threading
from typing import Any, Sequence

import msgpack
import numpy as np

PROTOCOL_VERSION = 1
ARRAY_EXT = 1  # msgpack ext code for an array reference: packb([dtype.str, shape, frame index])

# A bounded repr for what a peer sent, for error messages: a header nested 1,000 deep is within
# msgpack's stack limit but past Python's recursion limit for repr (the fuzzer found it).
_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother = 3, 40, 40
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = 4


def _short(value: object) -> str:
    return _SHORT.repr(value)


class Kind(enum.IntEnum):
    REQUEST = 0
    REPLY = 1
    ERROR = 2
    ONEWAY = 3


class WireError(ValueError):
    """A message could not be encoded or decoded; the message says what and where."""


@dataclasses.dataclass(frozen=True, slots=True)
class Limits:
    """What a receiver accepts. Anything larger is refused before it is parsed."""

    max_header_bytes: int = 1 << 20  # 1 MiB of msgpack
    max_frames: int = 4096
    max_frame_bytes: int = 1 << 30  # 1 GiB per array frame

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"Limits.{field.name} must be a positive int, got {value!r}")


DEFAULT_LIMITS = Limits()


@dataclasses.dataclass(slots=True)
class Message:
    kind: Kind
    id: int
    method: str  # "service.method"
    sender: str
    body: Any = None
    deadline: float | None = None  # seconds the caller will still wait, from when it sent


def _to_host_array(obj: Any) -> np.ndarray | None:
    """numpy arrays as they are; JAX (and other __array__) arrays as their host bytes."""
    if isinstance(obj, np.ndarray):
        return obj
    if isinstance(obj, np.generic):
        return np.asarray(obj)
    if hasattr(obj, "__array__") and hasattr(obj, "dtype") and hasattr(obj, "shape"):
        return np.asarray(obj)
    return None


# Reused packers: msgpack.packb builds a Packer per call, which costs twice the packing of a
# small header. One per thread, because a Packer holds a buffer while it works.
_packers = threading.local()


def _packer() -> msgpack.Packer:
    try:
        return _packers.packer
    except AttributeError:
        _packers.packer = msgpack.Packer(use_bin_type=True, strict_types=False)
        return _packers.packer


def encode(msg: Message, limits: Limits = DEFAULT_LIMITS) -> list:
    """Message -> frames. Array frames are memoryviews over the caller's arrays (no copy).

    Raises WireError for anything msgpack cannot carry (sets, arbitrary objects, object arrays),
    and for a message a receiver with ``limits`` would refuse (header bytes, frames, frame bytes).
    """
    header = [PROTOCOL_VERSION, msg.kind, msg.id, msg.method, msg.sender, msg.body]  # Kind packs as int
    if msg.deadline is not None:
        header.append(msg.deadline)
    try:
        # Fast path: a body of plain msgpack types. A Packer resets itself when it raises.
        packed = _packer().pack(header)
    except (TypeError, ValueError, OverflowError):
        pass  # arrays (or something unsendable): take the path that knows about them
    else:
        if len(packed) > limits.max_header_bytes:
            raise _header_too_large(msg, len(packed), limits)
        return [packed]
    frames: list = [b""]

    def default(obj: Any) -> Any:
        arr = _to_host_array(obj)
        if arr is None:
            if isinstance(obj, tuple):
                return list(obj)
            raise WireError(f"cannot encode a {type(obj).__name__} on the wire (allowed: msgpack types and arrays)")
        if arr.dtype.hasobject:
            raise WireError("object arrays cannot be sent (they would need pickle)")
        if arr.dtype.fields is not None:  # dtype.str would say only "|V<n>": the fields would be lost
            raise WireError(f"structured dtype {arr.dtype} cannot be sent; send each field as its own array")
        if arr.dtype.itemsize == 0:  # the receiver refuses these (see _array_from_ref)
            raise WireError(f"dtype {arr.dtype.str} has no bytes per item and cannot be sent")
        if arr.nbytes > limits.max_frame_bytes:
            raise WireError(f"an array of {arr.nbytes} bytes in {msg.method!r} exceeds the limit of "
                            f"{limits.max_frame_bytes} per frame (Limits.max_frame_bytes); send it in parts")
        if len(frames) >= limits.max_frames:
            raise WireError(f"{msg.method!r} has more arrays than the limit of {limits.max_frames - 1} "
                            f"(Limits.max_frames counts the header too)")
        if not arr.flags.c_contiguous:
            arr = np.ascontiguousarray(arr)  # strided and Fortran-order views: one copy, in C order
        ref = msgpack.packb([arr.dtype.str, list(arr.shape), len(frames)])
        # A 0-d or empty array still gets a frame so that frame indices stay dense.
        frames.append(memoryview(arr.reshape(-1).view(np.uint8)) if arr.size else b"")
        return msgpack.ExtType(ARRAY_EXT, ref)

    try:
        frames[0] = msgpack.packb(header, default=default, use_bin_type=True, strict_types=False)
    except WireError:
        raise
    except (TypeError, ValueError, OverflowError) as e:
        raise WireError(f"cannot encode body of {msg.method!r}: {e}") from e
    if len(frames[0]) > limits.max_header_bytes:
        raise _header_too_large(msg, len(frames[0]), limits)
    return frames


def _header_too_large(msg: Message, size: int, limits: Limits) -> WireError:
    return WireError(f"header of {msg.method!r} is {size} bytes, over the limit of {limits.max_header_bytes} "
                     "(Limits.max_header_bytes): send large bytes or arrays as arrays, which travel as frames")


CHECK_STRUCTURE_ABOVE = 128  # header bytes; see the module docstring


def _check_structure(buf: Any) -> None:
    """Raise WireError unless ``buf`` is one complete msgpack object; builds nothing."""
    try:
        unpacker = msgpack.Unpacker(max_buffer_size=len(buf))
        unpacker.feed(buf)
        unpacker.skip()
    except Exception as e:  # OutOfData, FormatError, StackError, ValueError: all mean malformed
        raise WireError(f"malformed header: {type(e).__name__}: {e or 'incomplete'}") from None


_KINDS = tuple(Kind)  # indexed by the wire value: cheaper than Kind(k), which goes through EnumMeta
_NKINDS = len(_KINDS)
_unpackb = msgpack.unpackb
MAX_DEADLINE = 1e9  # seconds; a larger (or negative, or NaN) "dl" is malformed, not a long wait


def _no_array_frames(code: int, payload: bytes) -> Any:
    if code == ARRAY_EXT:
        raise WireError("array reference in a message that has no array frames")
    raise WireError(f"unknown ext type {code} in header")


def decode(frames: Sequence, limits: Limits = DEFAULT_LIMITS) -> Message:
    """Frames -> Message, or WireError naming what was wrong. Never anything else.

    The common case (one ``bytes`` frame: a small message without arrays) takes a short path:
    one size check, one ``unpackb``, and type checks on the header fields.
    """
    try:
        n = len(frames)
    except TypeError:
        raise WireError(f"a message is a list of frames, not a {type(frames).__name__}") from None
    if n == 1:
        header_buf = frames[0]
        if type(header_buf) is not bytes:
            header_buf = _as_buffer(header_buf, "header")  # a 1-d byte view, so len() is its size
        if len(header_buf) > limits.max_header_bytes:
            raise WireError(f"header of {len(header_buf)} bytes exceeds the limit of {limits.max_header_bytes} "
                            "(Limits.max_header_bytes)")
        if len(header_buf) > CHECK_STRUCTURE_ABOVE:
            _check_structure(header_buf)
        try:  # _unpack() inlined: this is the path every small message takes
            header = _unpackb(header_buf, ext_hook=_no_array_frames, raw=False, strict_map_key=False)
        except WireError:
            raise
        except Exception as e:
            raise WireError(f"malformed header: {type(e).__name__}: {e}") from None
    elif n == 0:
        raise WireError("empty message: expected a header frame")
    else:
        header = _unpack_with_arrays(frames, n, limits)
    if type(header) is not list:
        raise WireError(f"header must be an array, got {type(header).__name__}")
    fields = len(header)
    if fields == 6:
        version, kind, msg_id, method, sender, body = header
        deadline = None
    elif fields == 7:
        version, kind, msg_id, method, sender, body, deadline = header
        if (type(deadline) is not float and type(deadline) is not int) or not 0 <= deadline <= MAX_DEADLINE:
            raise WireError(f"header field dl must be a number of seconds in [0, {MAX_DEADLINE:g}], got {_short(deadline)}")
    else:
        version = header[0] if header else None
        if version == PROTOCOL_VERSION and type(version) is int:
            raise WireError(f"header has {fields} fields; v{PROTOCOL_VERSION} has 6, or 7 with a deadline")
    if version != PROTOCOL_VERSION or type(version) is not int:
        raise WireError(f"protocol version {_short(version)} is not supported (this node speaks v{PROTOCOL_VERSION})")
    # type(x) is int, not isinstance: True is an int to Python but not a kind or an id to us.
    if type(kind) is not int or not 0 <= kind < _NKINDS:
        raise WireError(f"header field kind must be an int in 0..{_NKINDS - 1}, got {_short(kind)}")
    if type(msg_id) is not int or type(method) is not str or type(sender) is not str:
        raise WireError(
            "header fields id (int), method (str) and sender (str) have the wrong types: got "
            f"{type(msg_id).__name__}, {type(method).__name__}, {type(sender).__name__}"
        )
    return Message(_KINDS[kind], msg_id, method, sender, body, deadline)


PREFIX_BYTES = 4096  # how much of a refused header request_prefix() reads
# msgpack type bytes that start an int (fixint, uint8-64, int8-64, negative fixint) or a str.
_INT_LEADING = frozenset([*range(0x00, 0x80), *range(0xCC, 0xD4), *range(0xE0, 0x100)])
_STR_LEADING = frozenset([*range(0xA0, 0xC0), 0xD9, 0xDA, 0xDB])


def request_prefix(frames: Sequence) -> tuple[int, str, str] | None:
    """``(id, method, sender)`` of a request that ``decode`` refused, where its header's first
    bytes still say so; None for anything else (replies, one-way messages, garbage).

    The header's fields come in a fixed order with the body second to last, so these three
    are readable whatever is wrong after them: a body over the size limit, a bad array frame.
    At most ``PREFIX_BYTES`` are read, so answering a refused message costs little whatever
    its size. The sender is the one the message claims: reply along the route it came by.
    """
    try:
        head = _as_buffer(frames[0], "header")[:PREFIX_BYTES]
        unpacker = msgpack.Unpacker(raw=False, max_buffer_size=PREFIX_BYTES, strict_map_key=False)
        unpacker.feed(head)
        if unpacker.read_array_header() not in (6, 7):
            return None
        fields = []
        for leading in (_INT_LEADING, _INT_LEADING, _INT_LEADING, _STR_LEADING, _STR_LEADING):
            # Scalars only: unpacking a container here could allocate what its header claims.
            if head[unpacker.tell()] not in leading:
                return None
            fields.append(unpacker.unpack())
        version, kind, msg_id, method, sender = fields
    except Exception:  # short, garbage, an ext in the wrong place: there is no one to answer
        return None
    if (type(version) is not int or version != PROTOCOL_VERSION or type(kind) is not int or kind != Kind.REQUEST
            or type(msg_id) is not int or type(method) is not str or type(sender) is not str):
        return None
    return msg_id, method, sender


def _unpack(buf: Any, ext_hook: Any) -> Any:
    try:
        # strict_map_key=False: bodies may key maps by int; lengths are bounded by the header size.
        return _unpackb(buf, ext_hook=ext_hook, raw=False, strict_map_key=False)
    except WireError:
        raise
    except Exception as e:  # msgpack raises a zoo of types on garbage; all mean "malformed header"
        raise WireError(f"malformed header: {type(e).__name__}: {e}") from None


def _unpack_with_arrays(frames: Sequence, n: int, limits: Limits) -> Any:
    """The header of a message with array frames: sizes checked first, every frame referenced once."""
    if n > limits.max_frames:
        raise WireError(f"{n} frames exceeds the limit of {limits.max_frames} (Limits.max_frames)")
    header_buf = _as_buffer(frames[0], "header")
    if header_buf.nbytes > limits.max_header_bytes:
        raise WireError(f"header of {header_buf.nbytes} bytes exceeds the limit of {limits.max_header_bytes} "
                        "(Limits.max_header_bytes)")
    data = [_as_buffer(frames[i], f"frame {i}") for i in range(1, n)]
    for i, buf in enumerate(data, start=1):
        if buf.nbytes > limits.max_frame_bytes:
            raise WireError(
                f"frame {i} of {buf.nbytes} bytes exceeds the limit of {limits.max_frame_bytes} (Limits.max_frame_bytes)"
            )
    if header_buf.nbytes > CHECK_STRUCTURE_ABOVE:
        _check_structure(header_buf)
    used: set[int] = set()

    def ext_hook(code: int, payload: bytes) -> Any:
        if code != ARRAY_EXT:
            raise WireError(f"unknown ext type {code} in header")
        return _array_from_ref(payload, data, used)

    header = _unpack(header_buf, ext_hook)
    if len(used) != len(data):
        raise WireError(f"{len(data) - len(used)} array frame(s) are not referenced by the header")
    return header


def _as_buffer(frame: Any, what: str) -> memoryview:
    buf = getattr(frame, "buffer", frame)  # zmq.Frame exposes .buffer
    try:
        view = memoryview(buf)
    except TypeError:
        raise WireError(f"{what} is a {type(frame).__name__}, not a bytes-like object") from None
    if view.format != "B" or view.ndim != 1:
        try:
            view = view.cast("B")
        except TypeError as e:  # e.g. a non-contiguous view: not something a socket hands us
            raise WireError(f"{what} is not a contiguous buffer: {e}") from None
    return view


def _array_from_ref(payload: bytes, data: list[memoryview], used: set[int]) -> np.ndarray:
    if len(payload) > CHECK_STRUCTURE_ABOVE:  # opaque to the header's walk: walk it too
        _check_structure(payload)
    try:
        dtype_str, shape, index = msgpack.unpackb(payload, raw=False)
    except Exception as e:
        raise WireError(f"malformed array reference: {type(e).__name__}: {e}") from None
    # Strict types: np.dtype(None) is float64 and int("3") is 3; neither belongs on our wire.
    if type(dtype_str) is not str or type(shape) is not list or any(type(d) is not int for d in shape):
        raise WireError(f"malformed array reference: expected [dtype str, [int, ...], frame], got "
                        f"[{_short(dtype_str)}, {_short(shape)}, {_short(index)}]")
    try:
        dtype = np.dtype(dtype_str)
    except Exception as e:
        raise WireError(f"array reference names an unknown dtype {_short(dtype_str)}: {e}") from None
    if dtype.hasobject:
        raise WireError(f"object dtype {dtype_str!r} is not allowed on the wire")
    if dtype.fields is not None or dtype.subdtype is not None:  # encode() never sends these
        raise WireError(f"structured or subarray dtype {_short(dtype_str)} is not allowed on the wire")
    if dtype.itemsize == 0:
        # np.empty(shape, "S0") allocates one byte per item: a few bytes of header naming a large
        # shape would make a large array out of nothing.
        raise WireError(f"dtype {dtype_str!r} has no bytes per item and is not allowed on the wire")
    if type(index) is not int or not 1 <= index <= len(data):
        raise WireError(f"array reference points at frame {index!r}, but the message has {len(data)} array frame(s)")
    if index in used:
        raise WireError(f"frame {index} is referenced twice")
    if any(d < 0 for d in shape):
        raise WireError(f"array shape {tuple(shape)} has a negative dimension")
    used.add(index)
    buf = data[index - 1]
    count = 1
    for d in shape:
        count *= d
    if count * dtype.itemsize != buf.nbytes:
        raise WireError(
            f"frame {index} holds {buf.nbytes} bytes but dtype {dtype.str} shape {tuple(shape)} needs {count * dtype.itemsize}"
        )
    try:
        if count == 0:
            return np.empty(shape, dtype)
        return np.frombuffer(buf, dtype=dtype).reshape(shape)
    except (ValueError, TypeError, OverflowError, MemoryError) as e:  # e.g. more dims than numpy allows
        raise WireError(f"array dtype {dtype.str} shape {tuple(shape)} cannot be built: {e}") from None
