"""The dmlsys wire format: one msgpack header frame, then raw array frames.

A message is a ZeroMQ multipart message ``[header, frame_0, frame_1, ...]``. The header is a
msgpack map::

    {"v": 1, "k": kind, "id": correlation id, "m": "service.method", "s": sender,
     "b": body, "dl": seconds left until the caller gives up (requests only)}

Arrays never pass through msgpack. Wherever a numpy (or JAX) array appears in the body, the
header holds an ext value ``ARRAY_EXT`` naming dtype, shape and frame index, and the array's
bytes travel as their own frame: handed to ZeroMQ without a copy on send, viewed with
``np.frombuffer`` on receive. Received arrays are therefore read-only views of the message
buffer; call ``.copy()`` before writing to one.

Untrusted bytes are data, never code: there is no pickle, object dtypes are refused, and every
size (header, frame count, frame bytes) is checked against ``Limits`` before it is trusted.
Whatever goes wrong while decoding raises ``WireError``, whose message names what was wrong.
(Nesting depth is bounded by msgpack's own unpacker stack, which raises on absurd depth.)
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, Sequence

import msgpack
import numpy as np

PROTOCOL_VERSION = 1
ARRAY_EXT = 1  # msgpack ext code for an array reference: packb([dtype.str, shape, frame index])


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


def encode(msg: Message) -> list:
    """Message -> frames. Array frames are memoryviews over the caller's arrays (no copy)."""
    frames: list = [b""]

    def default(obj: Any) -> Any:
        arr = _to_host_array(obj)
        if arr is None:
            if isinstance(obj, tuple):
                return list(obj)
            raise WireError(f"cannot encode a {type(obj).__name__} on the wire (allowed: msgpack types and arrays)")
        if arr.dtype.hasobject:
            raise WireError("object arrays cannot be sent (they would need pickle)")
        if not arr.flags.c_contiguous:
            arr = np.ascontiguousarray(arr)
        ref = msgpack.packb([arr.dtype.str, list(arr.shape), len(frames)])
        # A 0-d or empty array still gets a frame so that frame indices stay dense.
        frames.append(memoryview(arr.reshape(-1).view(np.uint8)) if arr.size else b"")
        return msgpack.ExtType(ARRAY_EXT, ref)

    header = {"v": PROTOCOL_VERSION, "k": int(msg.kind), "id": msg.id, "m": msg.method, "s": msg.sender, "b": msg.body}
    if msg.deadline is not None:
        header["dl"] = msg.deadline
    try:
        frames[0] = msgpack.packb(header, default=default, use_bin_type=True, strict_types=False)
    except WireError:
        raise
    except (TypeError, ValueError, OverflowError) as e:
        raise WireError(f"cannot encode body of {msg.method!r}: {e}") from e
    return frames


def decode(frames: Sequence, limits: Limits = DEFAULT_LIMITS) -> Message:
    """Frames -> Message, or WireError naming what was wrong. Never anything else."""
    if not frames:
        raise WireError("empty message: expected a header frame")
    if len(frames) > limits.max_frames:
        raise WireError(f"{len(frames)} frames exceeds the limit of {limits.max_frames} (Limits.max_frames)")
    header_buf = _as_buffer(frames[0], "header")
    if header_buf.nbytes > limits.max_header_bytes:
        raise WireError(
            f"header of {header_buf.nbytes} bytes exceeds the limit of {limits.max_header_bytes} (Limits.max_header_bytes)"
        )
    data = [_as_buffer(f, f"frame {i}") for i, f in enumerate(frames[1:], start=1)]
    for i, buf in enumerate(data, start=1):
        if buf.nbytes > limits.max_frame_bytes:
            raise WireError(f"frame {i} of {buf.nbytes} bytes exceeds the limit of {limits.max_frame_bytes} (Limits.max_frame_bytes)")
    used: set[int] = set()

    def ext_hook(code: int, payload: bytes) -> Any:
        if code != ARRAY_EXT:
            raise WireError(f"unknown ext type {code} in header")
        return _array_from_ref(payload, data, used)

    try:
        header = msgpack.unpackb(
            header_buf,
            ext_hook=ext_hook,
            raw=False,
            strict_map_key=False,  # bodies may key maps by int; lengths are bounded by the header size
        )
    except WireError:
        raise
    except Exception as e:  # msgpack raises a zoo of types on garbage; all mean "malformed header"
        raise WireError(f"malformed header: {type(e).__name__}: {e}") from None
    if not isinstance(header, dict):
        raise WireError(f"header must be a map, got {type(header).__name__}")
    version = header.get("v")
    if version != PROTOCOL_VERSION:
        raise WireError(f"protocol version {version!r} is not supported (this node speaks v{PROTOCOL_VERSION})")
    try:
        kind = Kind(header["k"])
        msg_id, method, sender = header["id"], header["m"], header["s"]
    except (KeyError, ValueError, TypeError) as e:
        raise WireError(f"header field missing or invalid: {e}") from None
    if not isinstance(msg_id, int) or not isinstance(method, str) or not isinstance(sender, str):
        raise WireError("header fields id (int), m (str) and s (str) have the wrong types")
    deadline = header.get("dl")
    if deadline is not None and not isinstance(deadline, (int, float)):
        raise WireError(f"header field dl must be a number, got {type(deadline).__name__}")
    if len(used) != len(data):
        raise WireError(f"{len(data) - len(used)} array frame(s) are not referenced by the header")
    return Message(kind, msg_id, method, sender, header.get("b"), deadline)


def _as_buffer(frame: Any, what: str) -> memoryview:
    buf = getattr(frame, "buffer", frame)  # zmq.Frame exposes .buffer
    try:
        view = memoryview(buf)
    except TypeError:
        raise WireError(f"{what} is a {type(frame).__name__}, not a bytes-like object") from None
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def _array_from_ref(payload: bytes, data: list[memoryview], used: set[int]) -> np.ndarray:
    try:
        dtype_str, shape, index = msgpack.unpackb(payload, raw=False)
        dtype = np.dtype(dtype_str)
        shape = tuple(int(d) for d in shape)
    except Exception as e:
        raise WireError(f"malformed array reference: {type(e).__name__}: {e}") from None
    if dtype.hasobject:
        raise WireError(f"object dtype {dtype_str!r} is not allowed on the wire")
    if not isinstance(index, int) or not 1 <= index <= len(data):
        raise WireError(f"array reference points at frame {index!r}, but the message has {len(data)} array frame(s)")
    if index in used:
        raise WireError(f"frame {index} is referenced twice")
    if any(d < 0 for d in shape):
        raise WireError(f"array shape {shape} has a negative dimension")
    used.add(index)
    buf = data[index - 1]
    count = 1
    for d in shape:
        count *= d
    if count * dtype.itemsize != buf.nbytes:
        raise WireError(
            f"frame {index} holds {buf.nbytes} bytes but dtype {dtype.str} shape {shape} needs {count * dtype.itemsize}"
        )
    if count == 0:
        return np.empty(shape, dtype)
    return np.frombuffer(buf, dtype=dtype).reshape(shape)
