"""What can go wrong when one node talks to another."""

from __future__ import annotations


class NodeError(Exception):
    """Base of every error a node raises to its caller."""


class RemoteError(NodeError):
    """The remote handler raised. ``type`` and ``message`` are the remote exception's."""

    def __init__(self, peer: str, method: str, type: str, message: str) -> None:
        super().__init__(f"{peer} {method}: {type}: {message}")
        self.peer = peer
        self.method = method
        self.type = type
        self.message = message


class RpcTimeout(NodeError, TimeoutError):
    """No reply within the deadline: the peer may be slow, partitioned or dead."""

    def __init__(self, peer: str, method: str, timeout: float) -> None:
        super().__init__(f"no reply from {peer!r} to {method} within {timeout:g}s")
        self.peer = peer
        self.method = method
        self.timeout = timeout


class PeerUnreachable(NodeError):
    """The request could not even be queued (unknown peer, full queue, closed transport)."""


class NodeStopped(NodeError):
    """The local node stopped while the call was waiting."""
