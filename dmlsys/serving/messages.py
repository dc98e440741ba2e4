"""What the gateway and a replica send each other, and how large bytes travel.

A predict message is ``{"json": <request body>, "max_instances": n}`` (from the HTTP door) or
``{"x": float array (n, 784)}`` (from other nodes); its reply is ``{"version", "body"}`` (the
ready-made JSON answer) or ``{"version", "scores"}``. Several predicts for one replica may travel
as one ``predict_many`` message, ``{"items": [...]}`` -> ``{"results": [reply or {"error",
"message"}]}``, at most ``MAX_ITEMS`` of them.

**Large bytes travel as frames.** A message header is msgpack and a receiver refuses headers
over ``Limits.max_header_bytes`` (1 MiB), while the door accepts bodies of 4 MiB. So a body (or
a reply body) over ``INLINE_MAX`` bytes is sent as a uint8 array, which the wire carries as its
own frame, not in the header; a small one stays inline, which is cheaper to encode. With at most
``MAX_ITEMS`` inline bodies of at most ``INLINE_MAX`` bytes, a ``predict_many`` header stays
well under the header limit, whatever the bodies hold: nothing the door accepts can make a
message the next node refuses.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dmlsys.wire.codec import DEFAULT_LIMITS

INLINE_MAX = 16 << 10  # bytes of one body carried in the header; larger ones travel as a frame
MAX_ITEMS = 32  # predicts in one predict_many message

# 256 bytes per item of headroom for msgpack's framing and the item's other fields; a quarter
# of the header limit left for the rest (the method, the sender, error messages in a reply).
assert MAX_ITEMS * (INLINE_MAX + 256) <= DEFAULT_LIMITS.max_header_bytes * 3 // 4


def carry(data: bytes) -> bytes | np.ndarray:
    """``data`` as it should travel: itself when small, else a uint8 view (a frame, no copy)."""
    if len(data) <= INLINE_MAX:
        return data
    return np.frombuffer(data, np.uint8)


def received(value: Any) -> bytes | None:
    """The bytes of a ``carry``-ed value as received (inline bytes or a uint8 frame), or None
    when it is neither. A frame is copied out: it is large, and parsing it costs far more."""
    if type(value) is bytes:
        return value
    if isinstance(value, np.ndarray) and value.dtype == np.uint8 and value.ndim == 1:
        return value.tobytes()
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    return None
