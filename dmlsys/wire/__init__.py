"""Bytes on the wire: the codec, and the Transport seam with its ZeroMQ and simulated sides."""

from dmlsys.wire.codec import (
    DEFAULT_LIMITS, PROTOCOL_VERSION, Kind, Limits, Message, WireError, decode, encode, request_prefix,
)
from dmlsys.wire.transport import Route, Transport, TransportError

__all__ = [
    "DEFAULT_LIMITS", "PROTOCOL_VERSION", "Kind", "Limits", "Message", "WireError", "decode", "encode", "request_prefix",
    "Route", "Transport", "TransportError",
]
