"""Transport over ZeroMQ: one bound ROUTER per node for inbound, one DEALER per peer for outbound.

A request from A to B leaves on A's DEALER (identity "A") and arrives on B's ROUTER, which
hands us the routing identity: that identity is the reply route, so B's reply travels back over
the same connection to A's DEALER. Nobody needs to know a client's address to answer it.

We drive raw sockets from the event loop with ``add_reader`` rather than ``zmq.asyncio``: one
readable callback drains every queued message, which halves the per-message cost measured
here. ZeroMQ's FD is edge-triggered and a send can consume the edge, so after every send we
check ``EVENTS`` and schedule a drain ourselves if input is waiting.

With a ``ClusterKey`` (``keys=``) every TCP socket speaks CURVE (see ``dmlsys.wire.curve``): the
ROUTER admits only keys of names this endpoint knows, through a ZAP handler on a context of
this transport's own, and each DEALER checks that its peer holds that peer's key (on ipc://,
PLAIN with a per-name token, unencrypted, as ``dmlsys.wire.curve`` explains). Every
message then arrives with the name of the principal that sent it, which the receiver gets as a
third argument. Dealers set no identity then: the ROUTER numbers connections itself, so no
newcomer can take over another's reply route by claiming its name.

Large messages over keyed TCP take the bulk path (``dmlsys.wire.bulk``): sealed with AES-GCM by
us under a session key that travelled inside the CURVE connection, and sent on a second socket
pair without CURVE, which carries nothing but that ciphertext. See "The bulk path" below.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import ctypes.util
import logging
import os
import sys
import time
from typing import Any, Callable, Sequence

import zmq

from dmlsys.wire import bulk
from dmlsys.wire.bulk import BULK_MIN_BYTES, BulkError, BulkSession
from dmlsys.wire.codec import DEFAULT_LIMITS, Limits
from dmlsys.wire.curve import CLI, ZAP_DOMAIN, ClusterKey, RefusalLog, ZapHandler, principal_of, secure_mechanism
from dmlsys.wire.transport import Receiver, Route, Transport, TransportError

log = logging.getLogger(__name__)

# Below this size a frame is copied into ZeroMQ: wrapping a buffer for zero-copy costs more than
# copying a few KiB (pyzmq's own threshold is the same 64 KiB).
ZERO_COPY_MIN = 65536

# The hot path calls pyzmq's compiled socket methods directly, with plain int flags: the Python
# wrappers in zmq.sugar and the IntFlag arithmetic cost more than the libzmq calls themselves
# for small messages (about a third of a small RPC's CPU time, measured with bench_rpc.py).
_zsend = zmq.backend.Socket.send
_zrecv = zmq.backend.Socket.recv
_zget = zmq.backend.Socket.get
_NOBLOCK = int(zmq.NOBLOCK)
_NOBLOCK_MORE = int(zmq.NOBLOCK | zmq.SNDMORE)
_RCVMORE = int(zmq.RCVMORE)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)


_malloc_tuned = False


def tune_malloc() -> None:
    """Keep glibc from handing every multi-MiB message buffer back to the kernel.

    libzmq mallocs each received message in its I/O thread, and large numpy arrays come from
    malloc too. glibc's defaults serve these from fresh mmaps or trim them off the heap on free,
    so every large message costs page faults and zeroed pages again: measured with perf on the
    64 MiB ring allreduce, faulting in libzmq's receive buffers and zeroing fresh pages took
    more CPU than copying the data. These are the values glibc's own adaptive thresholds move to
    once a process has freed one 32 MiB block (mmap above 32 MiB, trim above twice that); we
    set them from the start. Elsewhere than glibc this does nothing; ``DMLSYS_MALLOC_TUNE=0``
    leaves malloc alone (for a host process that tunes it itself).
    """
    global _malloc_tuned
    if _malloc_tuned or not sys.platform.startswith("linux") or os.environ.get("DMLSYS_MALLOC_TUNE") == "0":
        return
    _malloc_tuned = True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    mallopt(m_mmap_threshold, 32 << 20)
    mallopt(m_trim_threshold, 64 << 20)


class ZmqTransport(Transport):
    """``ZmqTransport("w0", "tcp://127.0.0.1:0")`` binds a free port; ``address`` then says which.

    ``ipc://`` addresses work too and are faster between processes on one host.
    ``keys=ClusterKey(...)``: CURVE on every connection, to and from members of that cluster only.
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
        keys: ClusterKey | None = None,
    ) -> None:
        self.name = name
        self.address = bind
        self._bind = bind
        self._peers: dict[str, str] = dict(peers or {})
        self._limits = limits
        self._hwm = hwm
        if keys is not None and context is not None:
            raise ValueError(f"transport {name!r}: with keys= it makes its own ZeroMQ context (a ZAP handler "
                             f"answers for a whole context); leave context= out")
        self._keys = keys
        # A ZAP handler serves a whole context: an authenticating endpoint gets a context of its own.
        self._own_ctx = keys is not None
        self._ctx = zmq.Context(io_threads=1) if self._own_ctx else (context or zmq.Context.instance())
        self._zap: ZapHandler | None = None
        self._dealer_peer: dict[zmq.Socket, str] = {}  # with keys: the principal each dealer's server proved to be
        self._principals: dict[bytes, str] = {}  # with keys: ROUTER route -> its connection's principal
        self.refusals = RefusalLog(f"node {name!r}")
        self._refusal_observer = None
        self._router: zmq.Socket | None = None
        self._dealers: dict[str, zmq.Socket] = {}
        self._receiver: Receiver | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_scheduled: set[zmq.Socket] = set()
        self._draining: zmq.Socket | None = None  # the socket _drain is reading right now
        self._recheck_soon: set[zmq.Socket] = set()  # sockets sent on since the loop last polled
        self._closed = False
        # The bulk path (keys on, TCP only): see "The bulk path" below.
        self._bulk_router: zmq.Socket | None = None
        self._bulk_port = 0
        self._aux: dict[zmq.Socket, Callable[[], None]] = {}  # bulk sockets and monitors: their own drain
        self._bulk_in: dict[bytes, _Inbound] = {}  # session id -> a session a peer offered us
        self._bulk_by_route: dict[bytes, list[_Inbound]] = {}  # CURVE route -> its sessions, newest last
        self._bulk_out: dict[str, _Outbound] = {}  # peer name -> the sessions we offered it
        self._bulk_pending: dict[bytes, str] = {}  # session id of an offer not yet accepted -> peer name
        self.bulk_stats: collections.Counter[str] = collections.Counter()  # sealed, opened, rejected_<reason>
        self._bulk_logged: dict[str, float] = {}
        self._monitors: dict[zmq.Socket, zmq.Socket] = {}  # CURVE dealer -> the monitor of its connection
        self._dealer_names: dict[zmq.Socket, str] = {}  # CURVE dealer -> the peer it reaches
        # A connection (ROUTER route, or CURVE dealer) whose order waits on a sealed message.
        self._sequencers: dict[Any, bulk.Sequencer] = {}
        self._order_timers: dict[Any, asyncio.TimerHandle] = {}
        # DMLSYS_BULK=0: no bulk path, every byte by CURVE (to compare, or to rule the bulk path out).
        self._bulk_enabled = keys is not None and os.environ.get("DMLSYS_BULK", "1") != "0"

    # -- lifecycle -------------------------------------------------------------------------

    def set_receiver(self, receiver: Receiver) -> None:
        self._receiver = receiver

    def set_refusal_observer(self, observer) -> None:
        self._refusal_observer = observer

    @property
    def authenticated(self) -> bool:
        return self._keys is not None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        tune_malloc()
        router = self._socket(zmq.ROUTER)
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a reply to a vanished peer raises, not vanishes
        if self._keys is None:
            router.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted peer with the same name takes over
        else:
            try:
                self._start_zap(router)
            except zmq.ZMQError as e:
                router.close(linger=0)
                raise TransportError(f"node {self.name!r} cannot start its ZAP handler: {e.strerror}") from None
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
        if self._bulk_enabled and secure_mechanism(self._bind) == "CURVE":
            self._start_bulk()

    def _start_zap(self, router: zmq.Socket) -> None:
        keys = self._keys
        zap = ZapHandler(self._ctx, keys, self._refused_elsewhere)
        for name in {self.name, CLI, "supervisor", *self._peers}:
            zap.admit(name)
        if secure_mechanism(self._bind) == "CURVE":
            public, secret = keys.keypair(self.name)
            router.setsockopt(zmq.CURVE_SERVER, 1)
            router.setsockopt(zmq.CURVE_PUBLICKEY, public)
            router.setsockopt(zmq.CURVE_SECRETKEY, secret)
        else:
            router.setsockopt(zmq.PLAIN_SERVER, 1)
        router.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN)
        zap.watch(router)
        zap.start()
        self._zap = zap

    def _refused_elsewhere(self, address: str, reason: str) -> None:
        # On the ZAP thread: count and log on the loop, where the node's metrics live.
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self._refused, address, reason)
            except RuntimeError:  # the loop closed between the check and the call
                pass

    def _refused(self, address: str, reason: str) -> None:
        self.refusals(address, reason)
        if self._refusal_observer is not None:
            self._refusal_observer(address, reason)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._zap is not None:
            self._zap.close()  # joins its thread first: it reads the router's monitor
            self._zap = None
        for peer in list(self._bulk_out):
            self._drop_bulk_out(peer)
        for sock in list(self._monitors.values()):
            self._close_aux(sock)
        self._monitors.clear()
        for timer in self._order_timers.values():
            timer.cancel()
        self._order_timers.clear()
        self._sequencers.clear()
        for sock in [self._router, self._bulk_router, *self._dealers.values()]:
            if sock is not None:
                self._unwatch(sock)
                sock.close(linger=0)
        self._bulk_router = None
        self._bulk_in.clear()
        self._bulk_by_route.clear()
        self._aux.clear()
        self._dealers.clear()
        self._dealer_peer.clear()
        self._recheck_soon.clear()
        self._router = None
        if self._own_ctx:
            self._ctx.destroy(linger=0)

    # -- peers ----------------------------------------------------------------------------

    def add_peer(self, name: str, address: str) -> None:
        old = self._peers.get(name)
        self._peers[name] = address
        if self._zap is not None and old is None:
            self._zap.admit(name)
        if old is not None and old != address:
            self._drop_bulk_out(name)
        if old is not None and old != address and name in self._dealers:
            sock = self._dealers.pop(name)
            self._dealer_peer.pop(sock, None)
            if sock in self._monitors:
                self._close_aux(self._monitors.pop(sock))
            self._dealer_names.pop(sock, None)
            self._unwatch(sock)
            sock.close(linger=0)

    def peers(self) -> dict[str, str]:
        return dict(self._peers)

    def is_local(self, peer: str) -> bool:
        """Both ends host-local: ipc:// paths or loopback TCP. An unknown peer is not provably here."""
        address = self.address if peer == self.name else self._peers.get(peer)
        return address is not None and _host_local(self.address) and _host_local(address)

    # -- sending --------------------------------------------------------------------------

    def send(self, peer: str, frames: Sequence[Any]) -> None:
        if len(frames) > 1 and self._bulk_enabled and _payload(frames) >= BULK_MIN_BYTES \
                and self._send_bulk(peer, frames):
            return
        sock = self._dealers.get(peer) or self._connect(peer)
        try:
            _send_frames(sock, frames)
        except zmq.Again:
            raise TransportError(f"send queue to {peer!r} is full ({self._hwm} messages); is it alive?") from None
        except zmq.ZMQError as e:
            raise TransportError(f"send to {peer!r} failed: {e.strerror}") from None
        if sock is not self._draining:  # a drain in progress rechecks its socket when it ends
            self._recheck_later(sock)

    def reply(self, route: Route, frames: Sequence[Any]) -> None:
        if self._router is None:
            raise TransportError(f"transport of {self.name!r} is closed")
        router = self._router
        if len(frames) > 1 and self._bulk_by_route and _payload(frames) >= BULK_MIN_BYTES \
                and self._reply_bulk(route, frames):
            return
        try:
            _zsend(router, route, _NOBLOCK_MORE)
            _send_frames(router, frames)
        except zmq.ZMQError as e:
            who = route.decode(errors="replace") if isinstance(route, bytes) else route
            raise TransportError(f"reply to {who!r} failed: {e.strerror}") from None
        if router is not self._draining:  # replies from inline handlers: the drain rechecks once
            self._recheck_later(router)

    def _connect(self, peer: str) -> zmq.Socket:
        if self._closed:
            raise TransportError(f"transport of {self.name!r} is closed")
        address = self._peers.get(peer)
        if address is None:
            known = ", ".join(sorted(self._peers)) or "none"
            raise TransportError(f"no address known for peer {peer!r} (known peers: {known})")
        sock = self._socket(zmq.DEALER)
        if self._keys is None:
            sock.setsockopt(zmq.IDENTITY, self.name.encode())
        elif secure_mechanism(address) == "CURVE":
            public, secret = self._keys.keypair(self.name)
            sock.setsockopt(zmq.CURVE_SERVERKEY, self._keys.public_key(peer))
            sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
            sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
            self._dealer_peer[sock] = principal_of(peer)
            self._monitor_dealer(peer, sock)
        else:  # ipc: the socket file sits in a directory only the cluster's user can enter
            sock.setsockopt(zmq.PLAIN_USERNAME, principal_of(self.name).encode())
            sock.setsockopt(zmq.PLAIN_PASSWORD, self._keys.token(self.name))
            self._dealer_peer[sock] = principal_of(peer)
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

    def _recheck_later(self, sock: zmq.Socket) -> None:
        # One EVENTS check per socket per loop iteration, however many sends it had: with 64
        # calls in flight a burst of sends shares one check. call_soon runs before the loop
        # next blocks, so an edge consumed by a send is never waited on.
        if sock not in self._recheck_soon:
            self._recheck_soon.add(sock)
            self._loop.call_soon(self._recheck_now, sock)

    def _recheck_now(self, sock: zmq.Socket) -> None:
        self._recheck_soon.discard(sock)
        if not sock.closed:
            self._recheck(sock)

    def _recheck(self, sock: zmq.Socket) -> None:
        if sock not in self._drain_scheduled and _zget(sock, _EVENTS) & _POLLIN:
            self._drain_scheduled.add(sock)
            self._loop.call_soon(self._drain, sock)

    def _drain(self, sock: zmq.Socket) -> None:
        self._drain_scheduled.discard(sock)
        if sock.closed:
            return
        if self._aux and sock in self._aux:
            self._aux[sock]()
            return
        receiver = self._receiver
        is_router = sock is self._router
        leading = 2 if is_router else 1
        # With keys, who sent each message: the dealer's server (it proved its key), or the
        # principal ZAP named for the ROUTER connection a message came in on.
        authenticated = self._keys is not None
        dealer_peer = self._dealer_peer.get(sock, "") if authenticated and not is_router else None  # "": nobody
        # One part past the frame limit is kept, so that decode() refuses the message by its
        # frame count; the parts after it are read and dropped, never gathered in a list.
        max_parts = leading + self._limits.max_frames
        self._draining = sock
        try:
            # Bounded batch so one busy socket cannot starve the loop.
            for i in range(256):
                try:
                    if authenticated and is_router:
                        frames = _recv_frames_authenticated(sock, max_parts, self._principals)
                    else:
                        frames = _recv_frames(sock, leading, max_parts)
                except zmq.Again:
                    # A failed non-blocking recv makes libzmq process every pending command, so
                    # the FD's state is exact again: it will signal the next arrival. No recheck
                    # (which would cost a poll() syscall inside libzmq) is needed.
                    return
                except zmq.ZMQError as e:
                    if not sock.closed:  # closed under us by a handler (add_peer, close): not news
                        log.warning("receive on %s failed: %s", self.name, e.strerror)
                    return
                if receiver is None:
                    continue
                try:
                    if authenticated:
                        if is_router:
                            route, principal = frames[0]
                            if frames[1][:1] == bulk.CONTROL_LEAD:  # inside CURVE: bulk session control
                                self._on_router_control(route, principal, frames[1:])
                            elif self._sequencers and route in self._sequencers:  # behind a sealed message
                                self._deliver(route, self._sequencers[route].message((frames[1:], route, principal)))
                            else:
                                receiver(frames[1:], route, principal)
                        elif frames[0][:1] == bulk.CONTROL_LEAD:
                            self._on_dealer_control(sock, frames)
                        elif self._sequencers and sock in self._sequencers:
                            self._deliver(sock, self._sequencers[sock].message((frames, None, dealer_peer)))
                        else:
                            receiver(frames, None, dealer_peer)
                    elif is_router:
                        receiver(frames[1:], frames[0])
                    else:
                        receiver(frames, None)
                except Exception:  # a bug upstream must not stall the socket (we own its FD edge)
                    log.exception("receiver on %s failed; message dropped", self.name)
                if i == 0 and not _zget(sock, _EVENTS) & _POLLIN:
                    # Most wake-ups bring one message (always, for sequential calls). EVENTS
                    # answers "more?" for half the price of the EAGAIN exception, and leaves the
                    # FD just as exact. Later in a batch EAGAIN is cheaper: it is paid only once.
                    return
        finally:
            self._draining = None
        if not sock.closed:  # a full batch: more may be waiting, and the edge may be spent
            self._drain_scheduled.add(sock)
            self._loop.call_soon(self._drain, sock)

    # -- the bulk path ---------------------------------------------------------------------
    #
    # Keys on and a TCP bind: besides the CURVE ROUTER, a bulk ROUTER without any mechanism
    # (NULL, no ZAP domain: libzmq asks ZAP nothing for it) on a port of its own. It accepts a
    # connection from anyone and delivers nothing but messages that open under a session some
    # member offered us inside its CURVE connection: see dmlsys.wire.bulk for why that binds
    # every delivered bulk message to the principal ZAP named for that connection.
    #
    # A sender offers a session on its first large message to a peer (which goes by CURVE
    # meanwhile), and connects a bulk DEALER to the port the peer's ACCEPT names. A session lives
    # as long as the CURVE connection it was offered on: a monitor on that DEALER drops it when
    # the connection drops (the peer may come back as a new process that knows no session), and
    # the next large message offers a new one. Large replies go back on the bulk connection the
    # request's session last arrived on. Every sealed message also leaves a MARK in the CURVE
    # connection, and the receiver delivers in the CURVE connection's order (bulk.Sequencer):
    # one peer's messages arrive in the order they were sent, whichever connection they took.

    OFFER_RETRY_SECONDS = 5.0  # an offer unanswered this long (the peer gone, or old) is made again
    MAX_INBOUND_SESSIONS = 4096  # bounded: offers come only from members, two kept per connection

    def _start_bulk(self) -> None:
        host = self._bind[len("tcp://"):].rsplit(":", 1)[0]
        sock = self._bulk_socket(zmq.ROUTER)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        try:
            sock.bind(f"tcp://{host}:*")
        except zmq.ZMQError as e:  # no bulk path: large messages keep going by CURVE
            sock.close(linger=0)
            log.warning("node %r cannot bind a bulk socket on %s (%s); large messages will go by CURVE",
                        self.name, host, e.strerror)
            return
        self._bulk_port = int(sock.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1])
        self._bulk_router = sock
        self._aux[sock] = lambda: self._drain_bulk(sock, None, None)
        self._watch(sock)

    def _bulk_socket(self, kind: int) -> zmq.Socket:
        sock = self._socket(kind)
        # A sealed frame is its plaintext plus a 16-byte tag per chunk (chunks of at least 4 KiB).
        most = max(self._limits.max_frame_bytes, self._limits.max_header_bytes)
        sock.setsockopt(zmq.MAXMSGSIZE, most + most // 256 + 4096)
        return sock

    def _send_bulk(self, peer: str, frames: Sequence[Any]) -> bool:
        """Seal and send on ``peer``'s bulk connection; False: not (yet) possible, send by CURVE."""
        out = self._bulk_out.get(peer)
        if out is None:
            address = self._peers.get(peer)
            if address is None or not address.startswith("tcp://") or self._closed:
                return False
            out = self._bulk_out[peer] = _Outbound()
        now = time.monotonic()
        current = out.current
        if current is None or current.session.due_for_rotation(now):
            if out.pending is None or now - out.pending.created >= self.OFFER_RETRY_SECONDS:
                self._offer(peer, out, now)
            if current is None:
                return False
        first = current.session.next_counter
        try:
            for piece in current.session.seal(frames):  # each piece on its way while the next is sealed
                _send_frames(current.sock, piece)
            # Where the message stands among those on the CURVE connection: see bulk.Sequencer.
            curve_sock = self._dealers.get(peer) or self._connect(peer)
            _send_frames(curve_sock, bulk.mark_frames(current.session.sid, first))
        except zmq.Again:
            raise TransportError(f"bulk send queue to {peer!r} is full ({self._hwm} messages); is it alive?") from None
        except zmq.ZMQError as e:
            raise TransportError(f"bulk send to {peer!r} failed: {e.strerror}") from None
        self.bulk_stats["sealed"] += 1
        self._recheck_later(current.sock)
        self._recheck_later(curve_sock)
        return True

    def _offer(self, peer: str, out: _Outbound, now: float) -> None:
        sock = self._dealers.get(peer) or self._connect(peer)
        if sock not in self._dealer_peer or out.disabled:
            return  # not a CURVE connection, or the peer has no bulk socket
        session = BulkSession.make(principal_of(peer), now)
        try:
            _send_frames(sock, bulk.offer_frames(session))
        except zmq.ZMQError:
            return  # the large message itself will say what is wrong
        if out.pending is not None:
            self._bulk_pending.pop(out.pending.sid, None)
        out.pending = session
        self._bulk_pending[session.sid] = peer
        self._recheck_later(sock)

    def _on_router_control(self, route: bytes, principal: str, frames: list) -> None:
        """OFFER or MARK, from inside the CURVE connection ``route`` whose key ZAP named ``principal``."""
        if frames[0] == bulk.MARK:
            mark = bulk.parse_mark(frames)
            inbound = self._bulk_in.get(mark[0]) if mark is not None else None
            if inbound is None or inbound.route != route:
                self._bulk_rejected("malformed_control", "a bulk mark for no session of that connection", principal)
                return
            self._mark(route, mark)
            return
        offer = bulk.parse_offer(frames)
        if offer is None or not principal:
            self._bulk_rejected("malformed_control", "a malformed bulk control message", principal)
            return
        sid, key = offer
        if self._bulk_router is None:
            self.reply(route, bulk.accept_frames(sid, 0))  # "no bulk path here": the peer stops asking
            return
        if sid in self._bulk_in:
            return  # a repeated offer: the first one stands
        inbound = _Inbound(BulkSession(sid, key, principal, offerer=False, now=time.monotonic()), route)
        sessions = self._bulk_by_route.setdefault(route, [])
        sessions.append(inbound)
        if len(sessions) > 2:  # the sender rotated twice: its oldest session is done
            self._bulk_in.pop(sessions.pop(0).session.sid, None)
        self._bulk_in[sid] = inbound
        if len(self._bulk_in) > self.MAX_INBOUND_SESSIONS:  # oldest first (dicts keep insertion order)
            old = self._bulk_in.pop(next(iter(self._bulk_in)))
            kept = [s for s in self._bulk_by_route.get(old.route, []) if s is not old]
            if kept:
                self._bulk_by_route[old.route] = kept
            else:
                self._bulk_by_route.pop(old.route, None)
        self.reply(route, bulk.accept_frames(sid, self._bulk_port))

    def _on_dealer_control(self, dealer: zmq.Socket, frames: list) -> None:
        """ACCEPT or MARK, from inside the CURVE connection of ``dealer`` (its server proved its key)."""
        if frames[0] == bulk.MARK:
            mark = bulk.parse_mark(frames)
            out = self._bulk_out.get(self._dealer_names.get(dealer, ""))
            sids = {link.session.sid for link in (out.current, out.previous) if link is not None} if out else set()
            if mark is None or mark[0] not in sids:
                self._bulk_rejected("malformed_control", "a bulk mark for no session of that connection",
                                    self._dealer_peer.get(dealer, "?"))
                return
            self._mark(dealer, mark)
            return
        accept = bulk.parse_accept(frames)
        peer = self._bulk_pending.get(accept[0]) if accept is not None else None
        out = self._bulk_out.get(peer) if peer is not None else None
        if out is None or out.pending is None or out.pending.sid != accept[0] or self._dealers.get(peer) is not dealer:
            self._bulk_rejected("malformed_control", "a bulk accept for no offer of ours on that connection",
                                self._dealer_peer.get(dealer, "?"))
            return
        sid, port = accept
        del self._bulk_pending[sid]
        session, out.pending = out.pending, None
        if port == 0:
            out.disabled = True
            return
        host = self._peers[peer][len("tcp://"):].rsplit(":", 1)[0]
        sock = self._bulk_socket(zmq.DEALER)
        if host.startswith("["):
            sock.setsockopt(zmq.IPV6, 1)
        sock.connect(f"tcp://{host}:{port}")
        if out.previous is not None:  # two rotations ago: its replies have long arrived
            self._close_aux(out.previous.sock)
        out.previous, out.current = out.current, _Link(session, sock)
        self._aux[sock] = lambda: self._drain_bulk(sock, session, peer)
        self._watch(sock)

    def _reply_bulk(self, route: Any, frames: Sequence[Any]) -> bool:
        sessions = self._bulk_by_route.get(route)
        inbound = sessions[-1] if sessions else None
        if inbound is None or inbound.bulk_route is None or self._bulk_router is None:
            return False
        first = inbound.session.next_counter
        try:
            for piece in inbound.session.seal(frames):
                _zsend(self._bulk_router, inbound.bulk_route, _NOBLOCK_MORE)
                _send_frames(self._bulk_router, piece)
        except zmq.ZMQError:  # that bulk connection is gone (ROUTER_MANDATORY): CURVE still reaches the caller
            inbound.bulk_route = None
            return False
        try:
            _zsend(self._router, route, _NOBLOCK_MORE)
            _send_frames(self._router, bulk.mark_frames(inbound.session.sid, first))
        except zmq.ZMQError as e:
            who = route.decode(errors="replace") if isinstance(route, bytes) else route
            raise TransportError(f"reply to {who!r} failed: {e.strerror}") from None
        self._recheck_later(self._router)
        self.bulk_stats["sealed"] += 1
        self._recheck_later(self._bulk_router)
        return True

    def _drain_bulk(self, sock: zmq.Socket, session: BulkSession | None, peer: str | None) -> None:
        """Sealed messages on the bulk ROUTER (``session`` None: look it up by id) or on a bulk
        DEALER (``session``: the one it was opened for). Whatever fails to open is dropped and counted."""
        is_router = session is None
        leading = 2 if is_router else 1
        for _ in range(64):
            try:
                parts = _recv_frames(sock, leading, leading + 4)  # a piece is 3 frames; a 4th is refused
            except zmq.Again:
                return
            except zmq.ZMQError as e:
                if not sock.closed:
                    log.warning("bulk receive on %s failed: %s", self.name, e.strerror)
                return
            sealed = parts[1:] if is_router else parts
            inbound = None
            opener = session
            try:
                if is_router:
                    sid = bulk.parse_preamble(sealed[0])[1]
                    inbound = self._bulk_in.get(sid)
                    if inbound is None:
                        raise BulkError("unknown_session", f"bulk message for unknown session {sid.hex()[:8]}")
                    opener = inbound.session
                frames = opener.open(sealed, self._limits)
            except BulkError as e:
                self._bulk_rejected(e.reason, str(e), opener.principal if opener is not None else "?")
                continue
            finally:
                if opener is not None and opener.abandoned:
                    opener.abandoned = 0
                    self._bulk_rejected("truncated", "a bulk message ended before its last piece", opener.principal)
            # The connection this message belongs to in order: its session's CURVE connection.
            conn = inbound.route if is_router else self._dealers.get(peer)
            sequencer = self._sequencers.get(conn)
            if sequencer is not None:
                sequencer.last_progress = time.monotonic()
            if frames is None:
                continue  # more pieces to come
            self.bulk_stats["opened"] += 1
            if is_router:
                inbound.bulk_route = parts[0]  # where large replies to this session go
                payload = (frames, inbound.route, opener.principal)
            else:
                payload = (frames, None, opener.principal)
            if conn is None:  # its CURVE connection is gone: no order left to keep
                self._deliver(None, [payload])
                continue
            if sequencer is None:
                sequencer = self._sequencers[conn] = bulk.Sequencer(time.monotonic())
            key = (opener.sid, bulk.first_counter(sealed[0]))
            self._deliver(conn, sequencer.opened(key, payload))
        if not sock.closed:
            self._drain_scheduled.add(sock)
            self._loop.call_soon(self._drain, sock)

    def counters(self) -> dict[str, int]:
        return {f"bulk_{kind}": n for kind, n in self.bulk_stats.items()}

    def _bulk_rejected(self, reason: str, text: str, who: str) -> None:
        self.bulk_stats[f"rejected_{reason}"] += 1
        self.bulk_stats["rejected"] += 1
        now = time.monotonic()
        if now - self._bulk_logged.get(reason, -60.0) >= 60.0:
            self._bulk_logged[reason] = now
            log.warning("node %r dropped a bulk message (%s, session of %s): %s (further ones logged at most once a "
                        "minute; %d dropped in all)", self.name, reason, who, text, self.bulk_stats["rejected"])

    # Order across the two connections: see bulk.Sequencer.

    ORDER_WAIT_SECONDS = 10.0  # a connection waits this long for a sealed message making no progress

    def _mark(self, conn: Any, mark: tuple[bytes, int]) -> None:
        sequencer = self._sequencers.get(conn)
        if sequencer is None:
            sequencer = self._sequencers[conn] = bulk.Sequencer(time.monotonic())
        self._deliver(conn, sequencer.mark(mark))

    def _deliver(self, conn: Any, items: list) -> None:
        """Hand ``items`` (receiver arguments) to the node in order, then look after ``conn``'s
        sequencer: a timer while it waits, gone when it holds nothing."""
        receiver = self._receiver
        for item in items:
            if receiver is None:
                break
            try:
                receiver(*item)
            except Exception:  # a bug upstream must not stall the connection
                log.exception("receiver on %s failed; message dropped", self.name)
        sequencer = self._sequencers.get(conn)
        if sequencer is None:
            return
        if sequencer.dropped:
            self._bulk_rejected("unmarked", f"{sequencer.dropped} sealed message(s) whose mark never came",
                                "?")
            sequencer.dropped = 0
        if sequencer.idle():
            del self._sequencers[conn]
        elif sequencer.waiting_for() is not None and conn not in self._order_timers and self._loop is not None:
            self._order_timers[conn] = self._loop.call_later(self.ORDER_WAIT_SECONDS, self._order_check, conn)

    def _order_check(self, conn: Any) -> None:
        self._order_timers.pop(conn, None)
        sequencer = self._sequencers.get(conn)
        if sequencer is None or self._closed:
            return
        key = sequencer.waiting_for()
        if key is not None and time.monotonic() - sequencer.last_progress >= self.ORDER_WAIT_SECONDS:
            # Refused, or lost with its bulk connection: what came after it goes on without it.
            self._bulk_rejected("lost", "a sealed message named by a mark never opened", "?")
            self._deliver(conn, sequencer.give_up(key))
        else:
            self._deliver(conn, [])  # sets the next timer

    def _monitor_dealer(self, peer: str, dealer: zmq.Socket) -> None:
        """Watch a CURVE DEALER's connection: a bulk session dies with it."""
        if self._keys is None or self._loop is None:
            return
        monitor = dealer.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._monitors[dealer] = monitor
        self._dealer_names[dealer] = peer
        self._aux[monitor] = lambda: self._drain_monitor(peer, dealer, monitor)
        self._watch(monitor)

    def _drain_monitor(self, peer: str, dealer: zmq.Socket, monitor: zmq.Socket) -> None:
        while True:
            try:
                monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.ZMQError:
                return
            if self._dealers.get(peer) is dealer:
                self._drop_bulk_out(peer)

    def _drop_bulk_out(self, peer: str) -> None:
        out = self._bulk_out.pop(peer, None)
        if out is not None:
            for link in (out.current, out.previous):
                if link is not None:
                    self._close_aux(link.sock)
            if out.pending is not None:
                self._bulk_pending.pop(out.pending.sid, None)

    def _close_aux(self, sock: zmq.Socket) -> None:
        self._aux.pop(sock, None)
        self._unwatch(sock)
        self._recheck_soon.discard(sock)
        sock.close(linger=0)


def _send_frames(sock: zmq.Socket, frames: Sequence[Any]) -> None:
    # ZeroMQ queues a multipart message atomically: once the first part is accepted, the rest
    # are too, so only the first send can raise Again.
    if len(frames) == 1:  # the common small message: a header and no arrays
        _zsend(sock, frames[0], _NOBLOCK)
        return
    last = len(frames) - 1
    for i, frame in enumerate(frames):
        size = frame.nbytes if isinstance(frame, memoryview) else len(frame)
        _zsend(sock, frame, _NOBLOCK if i == last else _NOBLOCK_MORE, copy=size < ZERO_COPY_MIN)


def _recv_frames(sock: zmq.Socket, leading: int, max_parts: int) -> list:
    """The first ``leading`` parts (identity and header on a ROUTER, the header on a DEALER) as
    bytes; array parts after them as zero-copy zmq.Frames. At most ``max_parts`` are kept: a
    message of a million empty frames costs a million Python objects otherwise."""
    parts: list = [_zrecv(sock, _NOBLOCK)]
    if leading == 2:  # a ROUTER prepends the identity to a message of at least one part
        parts.append(_zrecv(sock, 0))
    while _zget(sock, _RCVMORE):
        if len(parts) >= max_parts:
            _zrecv(sock, 0, copy=False)  # the rest of a message already refused: read, dropped
            continue
        parts.append(_zrecv(sock, 0, copy=len(parts) < leading))
    return parts


def _recv_frames_authenticated(sock: zmq.Socket, max_parts: int, principals: dict[bytes, str]) -> list:
    """As ``_recv_frames`` on a ROUTER, with ``(route, principal)`` as the first part: the
    principal is the User-Id the ZAP handler gave the connection, which libzmq carries on
    every message part of it.

    Reading that property costs a zmq.Frame and a zmq_msg_gets, about as much again as the
    rest of a small message's receive (measured), so it is read once per connection and kept
    in ``principals`` by route. Only routes libzmq made are kept: they start with a zero byte,
    which no peer may choose, and a socket never hands one out twice (a 32-bit counter), so a
    route names one connection for good. A route a peer chose could be claimed again by
    another principal after the first disconnects: its property is read every time. (A peer
    that forges a zero-led identity in its handshake could aim at a departed connection's
    route, guessing among 2^32; only a holder of the cluster key gets that far, and such a
    holder can derive any name's key anyway: docs/security.md. With per-member keys, read
    the property every time or drop entries on disconnect.)"""
    route = _zrecv(sock, _NOBLOCK)
    principal = principals.get(route)
    if principal is None:
        header = _zrecv(sock, 0, copy=False)
        try:
            principal = header.get("User-Id")
        except zmq.ZMQError:  # no ZAP verdict on this connection: nobody's name
            principal = ""
        if route[:1] == b"\x00" and principal:
            if len(principals) > 100_000:  # one entry per connection ever made: keep it bounded
                principals.clear()
            principals[route] = principal
        parts: list = [(route, principal), header.bytes]
    else:
        parts = [(route, principal), _zrecv(sock, 0)]
    while _zget(sock, _RCVMORE):
        if len(parts) >= max_parts:
            _zrecv(sock, 0, copy=False)
            continue
        parts.append(_zrecv(sock, 0, copy=False))
    return parts


def _host_local(address: str) -> bool:
    return address.startswith(("ipc://", "tcp://127.", "tcp://localhost:", "tcp://[::1]:"))


def _payload(frames: Sequence[Any]) -> int:
    """Bytes in the array frames (every frame after the header)."""
    return sum(f.nbytes if isinstance(f, memoryview) else len(f) for f in frames[1:])


class _Link:
    """An outbound bulk session and the DEALER it sends on."""

    __slots__ = ("session", "sock")

    def __init__(self, session: BulkSession, sock: zmq.Socket) -> None:
        self.session, self.sock = session, sock


class _Outbound:
    """What a sender has for one peer: the session in use, the one before it (its replies may
    still come), an offer awaiting its ACCEPT, and whether the peer said it has no bulk path."""

    __slots__ = ("current", "disabled", "pending", "previous")

    def __init__(self) -> None:
        self.current: _Link | None = None
        self.previous: _Link | None = None
        self.pending: BulkSession | None = None
        self.disabled = False


class _Inbound:
    """A session a peer offered us: bound to the CURVE route it was offered on (replies go
    there, and its messages are delivered as from that route) and, once a message has opened,
    to the bulk connection it came on (where large replies go)."""

    __slots__ = ("bulk_route", "route", "session")

    def __init__(self, session: BulkSession, route: bytes) -> None:
        self.session, self.route = session, route
        self.bulk_route: bytes | None = None
