"""Transport over ZeroMQ: one bound ROUTER per node for inbound, one DEALER per peer for outbound.

A request from A to B leaves on A's DEALER (identity "A") and arrives on B's ROUTER, which
hands us the routing identity: that identity is the reply route, so B's reply travels back over
the same connection to A's DEALER. Nobody needs to know a client's address to answer it.

We drive raw sockets from the event loop with ``add_reader`` rather than ``zmq.asyncio``: one
readable callback drains every queued message, which halves the per-message cost measured
here. ZeroMQ's FD is edge-triggered and a send can consume the edge, so after every send we
check ``EVENTS`` and schedule a drain ourselves if input is waiting.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Sequence

import zmq

from dmlsys.wire.codec import DEFAULT_LIMITS, Limits
from dmlsys.wire.transport import Receiver, Route, Transport, TransportError

log = logging.getLogger(__name__)

# Below this size a frame is copied into ZeroMQ: wrapping a buffer for zero-copy costs more than
# copying a few KiB (pyzmq's own threshold is the same 64 KiB).
ZERO_COPY_MIN = 65536


class ZmqTransport(Transport):
    """``ZmqTransport("w0", "tcp://127.0.0.1:0")`` binds a free port; ``address`` then says which.

    ``ipc://`` addresses work too and are faster between processes on one host.
    """

    def __init__(
        self,
        name: str,
        bind: str,
        *,
        peers: dict[str, str] | None = None,
        limits: Limits = DEFAULT_LIMITS,
        hwm: int = 100_000,
        context: zmq.Context | None = None,
    ) -> None:
        self.name = name
        self.address = bind
        self._bind = bind
        self._peers: dict[str, str] = dict(peers or {})
        self._limits = limits
        self._hwm = hwm
        self._ctx = context or zmq.Context.instance()
        self._router: zmq.Socket | None = None
        self._dealers: dict[str, zmq.Socket] = {}
        self._receiver: Receiver | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_scheduled: set[zmq.Socket] = set()
        self._closed = False

    # -- lifecycle -------------------------------------------------------------------------

    def set_receiver(self, receiver: Receiver) -> None:
        self._receiver = receiver

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        router = self._socket(zmq.ROUTER)
        router.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted peer with the same name takes over
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a reply to a vanished peer raises, not vanishes
        bind = self._bind
        if bind.startswith("tcp://") and bind.endswith(":0"):
            bind = bind[:-2] + ":*"
        try:
            router.bind(bind)
        except zmq.ZMQError as e:
            router.close(linger=0)
            raise TransportError(f"node {self.name!r} cannot bind {self._bind}: {e.strerror}") from None
        self.address = router.getsockopt_string(zmq.LAST_ENDPOINT)
        self._router = router
        self._watch(router)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for sock in [self._router, *self._dealers.values()]:
            if sock is not None:
                self._unwatch(sock)
                sock.close(linger=0)
        self._dealers.clear()
        self._router = None

    # -- peers ----------------------------------------------------------------------------

    def add_peer(self, name: str, address: str) -> None:
        old = self._peers.get(name)
        self._peers[name] = address
        if old is not None and old != address and name in self._dealers:
            sock = self._dealers.pop(name)
            self._unwatch(sock)
            sock.close(linger=0)

    def peers(self) -> dict[str, str]:
        return dict(self._peers)

    # -- sending --------------------------------------------------------------------------

    def send(self, peer: str, frames: Sequence[Any]) -> None:
        sock = self._dealers.get(peer) or self._connect(peer)
        try:
            _send_frames(sock, frames)
        except zmq.Again:
            raise TransportError(f"send queue to {peer!r} is full ({self._hwm} messages); is it alive?") from None
        except zmq.ZMQError as e:
            raise TransportError(f"send to {peer!r} failed: {e.strerror}") from None
        self._recheck(sock)

    def reply(self, route: Route, frames: Sequence[Any]) -> None:
        if self._router is None:
            raise TransportError(f"transport of {self.name!r} is closed")
        try:
            self._router.send(route, zmq.NOBLOCK | zmq.SNDMORE)
            _send_frames(self._router, frames)
        except zmq.ZMQError as e:
            who = route.decode(errors="replace") if isinstance(route, bytes) else route
            raise TransportError(f"reply to {who!r} failed: {e.strerror}") from None
        self._recheck(self._router)

    def _connect(self, peer: str) -> zmq.Socket:
        if self._closed:
            raise TransportError(f"transport of {self.name!r} is closed")
        address = self._peers.get(peer)
        if address is None:
            known = ", ".join(sorted(self._peers)) or "none"
            raise TransportError(f"no address known for peer {peer!r} (known peers: {known})")
        sock = self._socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, self.name.encode())
        sock.connect(address)
        self._dealers[peer] = sock
        self._watch(sock)
        return sock

    def _socket(self, kind: int) -> zmq.Socket:
        sock = self._ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, self._hwm)
        sock.setsockopt(zmq.RCVHWM, self._hwm)
        # libzmq disconnects a peer that sends a frame over this size: the limit holds before
        # a single byte of it reaches Python.
        sock.setsockopt(zmq.MAXMSGSIZE, max(self._limits.max_frame_bytes, self._limits.max_header_bytes))
        return sock

    # -- receiving ------------------------------------------------------------------------

    def _watch(self, sock: zmq.Socket) -> None:
        assert self._loop is not None
        self._loop.add_reader(sock.getsockopt(zmq.FD), self._drain, sock)
        self._recheck(sock)

    def _unwatch(self, sock: zmq.Socket) -> None:
        if self._loop is not None and not sock.closed:
            self._loop.remove_reader(sock.getsockopt(zmq.FD))
        self._drain_scheduled.discard(sock)

    def _recheck(self, sock: zmq.Socket) -> None:
        if sock not in self._drain_scheduled and sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            self._drain_scheduled.add(sock)
            self._loop.call_soon(self._drain, sock)

    def _drain(self, sock: zmq.Socket) -> None:
        self._drain_scheduled.discard(sock)
        receiver = self._receiver
        is_router = sock is self._router
        # Bounded batch so one busy socket cannot starve the loop; the recheck reschedules.
        for _ in range(256):
            if sock.closed:
                return
            try:
                frames = _recv_frames(sock)
            except zmq.Again:
                return
            except zmq.ZMQError as e:
                log.warning("receive on %s failed: %s", self.name, e.strerror)
                return
            if receiver is None:
                continue
            if is_router:
                receiver(frames[1:], frames[0])
            else:
                receiver(frames, None)
        if not sock.closed:
            self._recheck(sock)


def _send_frames(sock: zmq.Socket, frames: Sequence[Any]) -> None:
    # ZeroMQ queues a multipart message atomically: once the first part is accepted, the rest
    # are too, so only the first send can raise Again.
    last = len(frames) - 1
    for i, frame in enumerate(frames):
        flags = zmq.NOBLOCK if i == last else zmq.NOBLOCK | zmq.SNDMORE
        size = frame.nbytes if isinstance(frame, memoryview) else len(frame)
        sock.send(frame, flags, copy=size < ZERO_COPY_MIN)


def _recv_frames(sock: zmq.Socket) -> list:
    """Small leading parts (identity, header) as bytes; array parts as zero-copy zmq.Frames."""
    parts: list = [sock.recv(zmq.NOBLOCK)]
    while sock.getsockopt(zmq.RCVMORE):
        parts.append(sock.recv(copy=len(parts) < 2))
    return parts
