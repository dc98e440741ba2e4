"""CurveZMQ for a cluster: one cluster key, a keypair per name derived from it, and the ZAP handler.

Who may connect is decided once per connection, in the CURVE handshake (RFC 26, CurveZMQ):
the client proves it holds the secret key of the public key it presents, and the server proves
it holds the secret key the client expected. libzmq then asks a ZAP handler (RFC 27) of the
server's context whether that public key may connect; ours answers yes only for a key that
belongs to a name it knows, and says which name: libzmq stamps that name ("User-Id") on every
message of the connection, so the transport can tell the node who really sent each message.

Keys are derived, not listed: a member's secret key is HKDF-SHA256(cluster key, its name)
(RFC 5869), its public key the Curve25519 point of that secret. Any holder of the cluster key
can compute any name's keypair, so scaling up (new names), restarting on a new port and moving
to a second host need no key distribution beyond the one 32-byte cluster key. What the
derivation does not give is isolation between holders of the cluster key: see docs/security.md.

Over ``ipc://`` (one host, sockets in a directory only the cluster's user can enter) the same
names are authenticated with ZeroMQ's PLAIN mechanism instead: the client names its principal
and shows that principal's token, HMAC-SHA256(cluster key, name), which the ZAP handler checks;
nothing is encrypted. Measured with experiments/bench_rpc.py --curve: CURVE on ipc cost 16 MiB
arrays five sixths of their speed, and the file permissions already keep other users out.

Short-lived CLI clients (``cli-1234``) act under one principal, ``cli``: see ``principal_of``.

Large messages between keyed TCP nodes do not go through CURVE's per-byte pass: they are sealed
with AES-128-GCM under a session key sent inside the CURVE connection, on a socket pair of
their own (``dmlsys.wire.bulk``); what authenticates them is still the CURVE connection.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import hashlib
import hmac
import logging
import os
import threading
import time
from typing import Callable

import zmq
import zmq.utils.monitor
from zmq.utils import z85

log = logging.getLogger(__name__)

KEY_BYTES = 32
CLI = "cli"  # the principal of every command-line client
ZAP_ENDPOINT = "inproc://zeromq.zap.01"  # fixed by RFC 27: libzmq asks here
ZAP_DOMAIN = b"dmlsys"
# A key or name not known yet is held this long before it is refused: a node learns its peers
# from the supervisor's member list a moment after it binds (and a new member's name up to a
# directory refresh later), and libzmq never retries a connection that ZAP refused.
ZAP_PARK_SECONDS = 5.0
ZAP_MAX_PARKED = 256
_HKDF_SALT = b"dmlsys cluster key v1"


def principal_of(name: str) -> str:
    """The name whose key ``name`` acts under: ``cli`` for ``cli`` and every ``cli-*`` client
    (one per CLI process, all holding the CLI's key); every other name is its own principal."""
    return CLI if name == CLI or name.startswith("cli-") else name


def _hkdf_sha256(key: bytes, info: bytes, length: int = KEY_BYTES) -> bytes:
    """RFC 5869 extract-and-expand; ``length`` <= 32 needs one block."""
    prk = hmac.new(_HKDF_SALT, key, hashlib.sha256).digest()
    return hmac.new(prk, info + b"\x01", hashlib.sha256).digest()[:length]


@functools.lru_cache(maxsize=4096)
def _derive(cluster_key: bytes, principal: str) -> tuple[bytes, bytes]:
    # Any 32 bytes are a Curve25519 secret key (the scalar is clamped where it is used).
    secret = z85.encode(_hkdf_sha256(cluster_key, b"dmlsys curve member\x00" + principal.encode()))
    return zmq.curve_public(secret), secret


@functools.lru_cache(maxsize=4096)
def _token(cluster_key: bytes, principal: str) -> bytes:
    raw = _hkdf_sha256(cluster_key, b"dmlsys plain token\x00" + principal.encode())
    return base64.urlsafe_b64encode(raw).rstrip(b"=")


def secure_mechanism(address: str) -> str:
    """How a keyed endpoint at ``address`` authenticates: "CURVE" on TCP (and anything that
    may cross hosts), "PLAIN" on ipc:// (one host, file permissions keep others out)."""
    return "PLAIN" if address.startswith("ipc://") else "CURVE"


@dataclasses.dataclass(frozen=True)
class ClusterKey:
    """The cluster's one secret. ``keypair(name)`` is that name's CURVE keypair (Z85 bytes)."""

    secret: bytes = dataclasses.field(repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.secret, bytes) or len(self.secret) != KEY_BYTES:
            raise ValueError(f"a cluster key is {KEY_BYTES} bytes, got {len(self.secret)}")

    @classmethod
    def generate(cls) -> "ClusterKey":
        return cls(os.urandom(KEY_BYTES))

    @classmethod
    def from_text(cls, text: str) -> "ClusterKey":
        """From the Z85 text ``to_text`` writes (40 characters)."""
        text = text.strip()
        try:
            raw = z85.decode(text.encode("ascii"))
        except (ValueError, UnicodeEncodeError, KeyError, IndexError):
            raise ValueError("a cluster key is 40 characters of Z85 text") from None
        return cls(raw)

    def to_text(self) -> str:
        return z85.encode(self.secret).decode("ascii")

    def keypair(self, name: str) -> tuple[bytes, bytes]:
        """(public, secret) of ``name``'s principal, Z85-encoded as libzmq's options take them."""
        return _derive(self.secret, principal_of(name))

    def public_key(self, name: str) -> bytes:
        return self.keypair(name)[0]

    def token(self, name: str) -> bytes:
        """``name``'s principal's PLAIN password (used over ipc only), 43 ASCII characters."""
        return _token(self.secret, principal_of(name))

    @property
    def fingerprint(self) -> str:
        """A short public digest that tells two cluster keys apart (safe to print)."""
        return hashlib.sha256(b"dmlsys fingerprint\x00" + self.secret).hexdigest()[:16]


class ZapHandler:
    """Answers one context's ZAP requests on a thread of its own, and watches a server socket's
    failed handshakes: every refused attempt is reported to ``on_refused(address, reason)``
    (from this thread; the caller hands it to its loop).

    A thread, not the event loop: libzmq's I/O thread waits for the answer before the
    connection goes on, and an event loop busy compiling a model must not hold every peer's
    handshake up. Admission reads ``admitted`` (public key -> principal), which the loop's
    side only ever adds to; a dict read and a dict store are atomic under the GIL.

    A well-formed request for a key or name not (yet) known is parked, not refused: it is
    answered as soon as ``admit`` learns the name, or refused after ``ZAP_PARK_SECONDS``.
    """

    def __init__(self, ctx: zmq.Context, keys: ClusterKey, on_refused: Callable[[str, str], None]) -> None:
        self.ctx = ctx
        self.keys = keys
        self.on_refused = on_refused
        self.admitted: dict[bytes, str] = {}  # binary public key (32 bytes) -> principal
        self.names: set[str] = set()  # the principals admitted (PLAIN names one; CURVE shows a key)
        self._zap = ctx.socket(zmq.ROUTER)
        self._zap.setsockopt(zmq.LINGER, 0)
        self._zap.bind(ZAP_ENDPOINT)  # before any server socket binds: without a handler, CURVE admits anyone
        self._wake_addr = f"inproc://dmlsys-zap-wake-{id(self):x}"
        self._wake = ctx.socket(zmq.PAIR)
        self._wake.setsockopt(zmq.LINGER, 0)
        self._wake.bind(self._wake_addr)
        self._monitor_addr: str | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._parked: list[tuple[float, list[bytes]]] = []  # (refuse at, request): the thread's alone

    def admit(self, name: str) -> None:
        principal = principal_of(name)
        self.admitted[z85.decode(self.keys.public_key(principal))] = principal
        self.names.add(principal)

    def watch(self, server: zmq.Socket) -> None:
        """Report ``server``'s failed handshakes (call before ``start``)."""
        self._monitor_addr = f"inproc://dmlsys-zap-monitor-{id(self):x}"
        server.monitor(self._monitor_addr, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                       | zmq.EVENT_HANDSHAKE_FAILED_AUTH)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="dmlsys-zap", daemon=True)
        self._thread.start()
        self._ready.wait(5.0)

    def close(self) -> None:
        """Stop the thread and close its sockets (the context's owner terminates the context)."""
        if self._thread is not None:
            waker = self.ctx.socket(zmq.PAIR)
            waker.setsockopt(zmq.LINGER, 0)
            waker.connect(self._wake_addr)
            waker.send(b"stop")
            self._thread.join(5.0)
            waker.close(linger=0)
            self._thread = None
        self._wake.close(linger=0)
        self._zap.close(linger=0)

    # -- the thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._zap, zmq.POLLIN)
        poller.register(self._wake, zmq.POLLIN)
        monitor = None
        if self._monitor_addr is not None:
            monitor = self.ctx.socket(zmq.PAIR)
            monitor.setsockopt(zmq.LINGER, 0)
            monitor.connect(self._monitor_addr)
            poller.register(monitor, zmq.POLLIN)
        self._ready.set()
        try:
            while True:
                # With requests parked, look again every 50 ms: admit() may have learnt their names.
                events = dict(poller.poll(50 if self._parked else None))
                if self._wake in events:
                    return
                if self._parked:
                    self._retry_parked()
                if self._zap in events:
                    self._answer(self._zap.recv_multipart())
                if monitor is not None and monitor in events:
                    self._handshake_event(monitor.recv_multipart())
        except zmq.ZMQError as e:
            if e.errno != zmq.ETERM:
                log.exception("ZAP handler stopped")
        finally:
            if monitor is not None:
                monitor.close(linger=0)

    def _retry_parked(self) -> None:
        now = time.monotonic()
        parked, self._parked = self._parked, []
        for refuse_at, frames in parked:
            self._answer(frames, final=now >= refuse_at, refuse_at=refuse_at)

    def _answer(self, frames: list[bytes], *, final: bool = False, refuse_at: float | None = None) -> None:
        # [route, b"", version, request_id, domain, address, identity, mechanism, *credentials]
        if len(frames) < 8:
            return  # not a ZAP request; nobody else talks to this socket
        route, _, version, request_id, _domain, address, _identity, mechanism, *creds = frames
        principal = None
        unknown = False  # a name or key we may yet learn, as opposed to a wrong one
        what = f"mechanism {mechanism.decode(errors='replace')[:20]}"
        if mechanism == b"CURVE" and len(creds) == 1 and len(creds[0]) == KEY_BYTES:
            principal = self.admitted.get(creds[0])
            what, unknown = "an unknown CURVE key", True
        elif mechanism == b"PLAIN" and len(creds) == 2:
            name = creds[0].decode(errors="replace")
            if name in self.names and hmac.compare_digest(creds[1], self.keys.token(name)):
                principal = name
            unknown = name not in self.names
            what = f"unknown name {name[:100]!r}" if unknown else f"a wrong token for {name[:100]!r}"
        if principal is None and unknown and not final and len(self._parked) < ZAP_MAX_PARKED:
            self._parked.append((refuse_at or time.monotonic() + ZAP_PARK_SECONDS, frames))
            return
        if principal is None:
            status, text, user = b"400", b"not a member of this cluster", b""
            self.on_refused(address.decode(errors="replace"), what)
        else:
            status, text, user = b"200", b"OK", principal.encode()
        self._zap.send_multipart([route, b"", version, request_id, status, text, user, b""])

    def _handshake_event(self, frames: list[bytes]) -> None:
        event = zmq.utils.monitor.parse_monitor_message(frames)
        if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            return  # a ZAP refusal: _answer has reported it, with the reason
        endpoint = event["endpoint"].decode(errors="replace") if isinstance(event["endpoint"], bytes) else event["endpoint"]
        self.on_refused(endpoint, "a failed handshake (not the cluster's mechanism, or not this server's key)")


class RefusalLog:
    """Counts refusals and logs at most one line per ``period`` seconds per address."""

    def __init__(self, owner: str, period: float = 60.0) -> None:
        self.owner = owner
        self.period = period
        self.count = 0
        self._last: dict[str, float] = {}

    def __call__(self, address: str, reason: str) -> None:
        self.count += 1
        now = time.monotonic()
        if len(self._last) > 10_000:
            self._last.clear()
        if now - self._last.get(address, -self.period) >= self.period:
            self._last[address] = now
            log.warning("%s refused a connection from %s: %s (further ones from there logged at most once a "
                        "minute; %d refused in all)", self.owner, address or "?", reason, self.count)
