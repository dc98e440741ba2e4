"""A Node hosts services, answers and makes RPCs over one Transport, and has a lifecycle.

    node = Node("w0", ZmqTransport("w0", "tcp://127.0.0.1:0"), admin=("127.0.0.1", 0))
    node.add_service(Echo())
    await node.start()                       # starting -> alive -> ready (when every gate opens)
    reply = await node.call("w1", "echo", "echo", {"x": np.arange(3)}, timeout=5)
    await node.stop()                        # draining -> stopped

Lifecycle: ``starting`` (transport and admin server coming up) -> ``alive`` (answers, but some
readiness gate is closed) -> ``ready`` (every gate open) -> ``draining`` (finishing what it has;
``/readyz`` says 503 so balancers send nothing new) -> ``stopped``.

A node never dies from what a peer sends it: a message that fails to decode is counted in the
``dmlsys_errors`` metric, logged at most once per peer per minute, and dropped; when it was a
request whose header still names its id, the caller gets the ``WireError`` as its reply at once.
Nor does it take on more than ``NodeLimits`` allow: at most ``max_in_flight`` handler tasks
(past that a request is answered ``NodeBusy``), each running no longer than its caller waits,
or ``default_deadline_s`` when the caller did not say.

Who sent a message is who its connection proved to be, when the transport authenticates
(CURVE, docs/security.md): a message whose header names someone else is dropped and counted
(``forged_sender``); a reply counts only from the peer its call went to (``forged_reply``);
a handler declared ``allow=...`` runs only for the callers it names (``not_allowed``). Over a
transport that does not authenticate, the header's sender is taken at its word, and the same
checks apply to it.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import os
import time
from typing import Any, Callable

from dmlsys.node.directory import Directory
from dmlsys.node.errors import NodeStopped, PeerUnreachable, RemoteError
from dmlsys.node.limits import BUSY, DEFAULT_NODE_LIMITS, NodeLimits
from dmlsys.node.metrics import NodeMetrics
from dmlsys.node.pending import PendingCalls
from dmlsys.node.service import Allow, CallContext, Gate, Handler, NodeService, Service
from dmlsys.wire.codec import (
    DEFAULT_LIMITS, MAX_DEADLINE, Kind, Limits, Message, WireError, decode, encode, request_prefix,
)
from dmlsys.wire.curve import principal_of
from dmlsys.wire.transport import Route, Transport, TransportError

log = logging.getLogger(__name__)

BAD_MESSAGE_LOG_PERIOD = 60.0  # seconds between log lines about one peer's bad messages
MAX_ERROR_MESSAGE = 4096  # characters of an error's text sent back: an error reply must itself fit the wire


class State(enum.Enum):
    STARTING = "starting"
    ALIVE = "alive"
    READY = "ready"
    DRAINING = "draining"
    STOPPED = "stopped"


class Node:
    def __init__(
        self,
        name: str,
        transport: Transport,
        *,
        role: str = "",
        admin: tuple[str, int] | None = None,
        limits: Limits = DEFAULT_LIMITS,
        node_limits: NodeLimits = DEFAULT_NODE_LIMITS,
        directory: Directory | None = None,
    ) -> None:
        if transport.name != name:
            raise ValueError(f"transport is named {transport.name!r} but the node {name!r}")
        self.name = name
        self.role = role
        self.transport = transport
        self.limits = limits
        self.node_limits = node_limits
        self.metrics = NodeMetrics(name)
        self.metrics.transport_counters = transport.counters
        self.state = State.STARTING
        self.started_at = time.time()
        self._admin_bind = admin
        self._admin = None  # AdminServer, once started
        self._services: dict[str, Service] = {}
        self._handlers: dict[str, Handler] = {}
        self._gates: dict[str, Gate] = {}
        self._ids = itertools.count(1)
        self._pending = PendingCalls()
        self._tasks: set[asyncio.Task] = set()
        self._bad_logged: dict[str, float] = {}
        self._stopped = asyncio.Event()
        self._killed: asyncio.Task | None = None  # the teardown kill() started
        self._loop: asyncio.AbstractEventLoop | None = None
        self._clock = time.perf_counter
        self.directory = directory or Directory()
        self._peer_lost_watchers: list[Callable[[str, str], None]] = []
        transport.set_receiver(self._on_frames)
        transport.set_refusal_observer(self._connection_refused)
        self.add_service(NodeService())

    # -- composition ----------------------------------------------------------------------

    def add_service(self, service: Service) -> Service:
        if not service.name:
            raise ValueError(f"{type(service).__name__} has no name")
        if service.name in self._services:
            raise ValueError(f"node {self.name!r} already hosts a service named {service.name!r}")
        if self.state is not State.STARTING:
            raise RuntimeError(f"add services to node {self.name!r} before start()")
        self._services[service.name] = service
        self._handlers.update(service.handlers())
        return service

    def service(self, name: str) -> Service:
        return self._services[name]

    def gate(self, name: str, reason: str = "starting") -> Gate:
        """A readiness gate, closed with ``reason`` until its owner opens it."""
        if name in self._gates:
            raise ValueError(f"node {self.name!r} already has a gate named {name!r}")
        gate = Gate(name, reason, self._update_readiness)
        self._gates[name] = gate
        self._update_readiness()
        return gate

    @property
    def failing_gates(self) -> dict[str, str]:
        return {g.name: g.reason for g in self._gates.values() if g.reason is not None}

    @property
    def admin_url(self) -> str | None:
        return self._admin.url if self._admin else None

    def _update_readiness(self) -> None:
        if self.state in (State.ALIVE, State.READY):
            self.state = State.READY if not self.failing_gates else State.ALIVE

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Bring up transport, admin server and services. Nothing stays running on failure."""
        self._loop = asyncio.get_running_loop()
        # RPC latencies: uvloop's time() ticks in whole milliseconds, too coarse for sub-ms calls;
        # under the simulation, virtual time is the one that means something.
        self._clock = self._loop.time if getattr(self._loop, "virtual_time", False) else time.perf_counter
        try:
            await self.transport.start()
            if self._admin_bind is not None:
                from dmlsys.node.admin import AdminServer  # aiohttp only where an admin port is wanted

                self._admin = AdminServer(self, *self._admin_bind)
                await self._admin.start()
            self.state = State.ALIVE
            await self.directory.start(self)
            for service in self._services.values():
                await service.start(self)
        except BaseException:
            await self._teardown()
            raise
        self._update_readiness()
        log.info("node %s (%s) is %s on %s, admin %s", self.name, self.role or "-", self.state.value,
                 self.transport.address, self.admin_url or "off")

    async def drain(self, timeout: float = 30.0) -> None:
        """Stop being ready and let in-flight handlers finish (up to ``timeout``)."""
        if self.state is State.STOPPED:
            return
        if self.state is not State.DRAINING:
            self.state = State.DRAINING
            log.info("node %s draining %d in-flight handler(s)", self.name, len(self._tasks))
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)

    async def stop(self, drain_timeout: float = 30.0) -> None:
        """Drain, stop services in reverse order, then close the transport and admin server.

        Services stop before the transport closes so that their goodbyes can still be sent;
        the admin server goes last so that probes see ``draining`` rather than a refused port.
        """
        if self.state is State.STOPPED:
            if self._killed is not None:
                await self._killed
            return
        await self.drain(drain_timeout)
        for service in reversed(list(self._services.values())):
            try:
                await service.stop()
            except Exception:
                log.exception("service %s on node %s failed to stop cleanly", service.name, self.name)
        await self._teardown()
        log.info("node %s stopped", self.name)

    def kill(self) -> None:
        """Die abruptly, as in a crash: cancel everything, answer nothing. For fault tests.

        Services are not stopped (a crash gives them no chance), but the transport and admin
        server are closed in the background, as the OS closes a dead process's sockets; a later
        ``await stop()`` waits for that, so a test that kills a node leaves no port behind.
        """
        if self.state is State.STOPPED:
            return
        self.state = State.STOPPED
        if self.directory._task is not None:
            self.directory._task.cancel()
        for task in list(self._tasks):
            task.cancel()
        self._fail_pending()
        self._stopped.set()
        if self._loop is not None and not self._loop.is_closed():
            self._killed = self._loop.create_task(self._teardown())

    async def _teardown(self) -> None:
        await self.directory.stop()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks))
        self._fail_pending()
        await self.transport.close()
        if self._admin is not None:
            await self._admin.stop()
        self.state = State.STOPPED
        self._stopped.set()

    def _fail_pending(self) -> None:
        self._pending.fail_all(lambda: NodeStopped(f"node {self.name!r} stopped while waiting for a reply"))

    def peer_lost(self, peer: str, reason: str) -> None:
        """``peer``'s process is gone (the supervisor saw it exit): fail the calls waiting on it
        with ``PeerUnreachable`` now, so callers retry elsewhere instead of waiting out their
        timeouts, and tell the watchers (``on_peer_lost``). A message already queued for it may
        still reach its next incarnation; like a timeout, the failure says nothing of whether
        the call ran."""
        failed = self._pending.fail_peer(peer, lambda: PeerUnreachable(f"{peer} {reason}"))
        log.info("node %s: peer %s %s; %d waiting call(s) failed over", self.name, peer, reason, failed)
        for callback in list(self._peer_lost_watchers):
            try:
                callback(peer, reason)
            except Exception:
                log.exception("peer-lost watcher %r failed", callback)

    def on_peer_lost(self, callback: Callable[[str, str], None]) -> None:
        """``callback(peer, reason)`` whenever a peer is reported gone (see ``peer_lost``)."""
        self._peer_lost_watchers.append(callback)

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    # -- outbound -------------------------------------------------------------------------

    async def call(self, peer: str, service: str, method: str, body: Any = None, *, timeout: float = 30.0) -> Any:
        """Request/reply. Raises RemoteError, RpcTimeout, PeerUnreachable or NodeStopped."""
        if self.state is State.STOPPED:
            raise NodeStopped(f"node {self.name!r} is stopped")
        loop = self._loop or asyncio.get_running_loop()
        msg_id = next(self._ids)
        full = f"{service}.{method}"
        # The callee learns how long we wait (clamped to what decode() accepts) to stop work nobody awaits.
        dl = timeout if 0 <= timeout <= MAX_DEADLINE else min(max(timeout, 0.0), MAX_DEADLINE)
        frames = encode(Message(Kind.REQUEST, msg_id, full, self.name, body, dl), self.limits)
        fut = loop.create_future()
        # No asyncio.wait_for (~100 µs a round trip) and no timer per call: see PendingCalls.
        self._pending.add(loop, msg_id, fut, peer, full, timeout)
        started = self._clock()
        try:
            self.transport.send(peer, frames)  # _send() inlined: the hot path
        except TransportError as e:
            self._pending.pop(msg_id)
            self.metrics.error("unreachable")
            raise PeerUnreachable(str(e)) from None
        metrics = self.metrics
        metrics.messages_out += 1
        metrics.bytes_out += sum(map(len, frames))
        try:
            return await fut
        finally:
            self._pending.pop(msg_id)
            self.metrics.rpc_seconds.observe(full, self._clock() - started)

    def send(self, peer: str, service: str, method: str, body: Any = None) -> None:
        """One-way message: no reply, no delivery guarantee. Raises PeerUnreachable."""
        frames = encode(Message(Kind.ONEWAY, 0, f"{service}.{method}", self.name, body), self.limits)
        self._send(peer, frames)

    def _send(self, peer: str, frames: list) -> None:
        try:
            self.transport.send(peer, frames)
        except TransportError as e:
            self.metrics.error("unreachable")
            raise PeerUnreachable(str(e)) from None
        self._count_out(frames)

    def _count_out(self, frames: list) -> None:
        metrics = self.metrics
        metrics.messages_out += 1
        # len() is the byte count of every frame we handle: bytes, zmq.Frame, and the 1-d uint8
        # memoryviews that encode() makes of arrays.
        metrics.bytes_out += sum(map(len, frames))

    # -- inbound --------------------------------------------------------------------------

    def _on_frames(self, frames, route: Route, principal: str | None = None) -> None:
        """One inbound message. ``principal``: who the transport proved sent it (None: a
        transport that does not authenticate; the header's sender stands)."""
        metrics = self.metrics
        metrics.messages_in += 1
        metrics.bytes_in += sum(map(len, frames))
        try:
            msg = decode(frames, self.limits)
        except WireError as e:
            self._bad_message(route, e, frames, principal)
            return
        if principal is not None and principal_of(msg.sender) != principal:
            metrics.error("forged_sender")
            self._log_rate_limited(principal, "node %s dropped a %s from %s whose header says it is from %r",
                                   msg.method, principal, msg.sender[:100])
            return
        kind = msg.kind
        if kind is Kind.REPLY or kind is Kind.ERROR:
            entry = self._pending.get(msg.id)
            if entry is None:
                metrics.error("late_reply")  # timed out already, or a duplicate
                return
            fut, peer, method, _ = entry
            if (msg.sender if principal is None else principal) != (peer if principal is None else principal_of(peer)):
                # Only the peer the call went to answers it: ids are sequential, easy to guess.
                metrics.error("forged_reply")
                self._log_rate_limited(principal or msg.sender, "node %s dropped a reply to its %s call to %s "
                                       "that came from %s", method, peer, principal or msg.sender[:100])
                return
            if fut.done():
                return
            if kind is Kind.REPLY:
                fut.set_result(msg.body)
            else:
                body = msg.body if isinstance(msg.body, dict) else {}
                fut.set_exception(RemoteError(peer, method, str(body.get("type", "Error")), str(body.get("message", ""))))
            return
        if self.state is State.STOPPED:
            return
        handler = self._handlers.get(msg.method)
        if handler is None:
            metrics.error("unknown_method")
            if kind is Kind.REQUEST:
                known = ", ".join(sorted(self._handlers)) or "none"
                self._reply_error(route, msg, "UnknownMethod", f"node {self.name!r} has no handler {msg.method!r} (it has: {known})")
            return
        if handler.oneway != (kind is Kind.ONEWAY):
            metrics.error("wrong_kind")
            if kind is Kind.REQUEST:
                self._reply_error(route, msg, "WrongKind", f"{msg.method} is one-way; use send(), not call()")
            return
        if handler.allow is not None and not self._allowed(handler.allow, principal or principal_of(msg.sender)):
            self._not_allowed(route, msg, handler.allow, principal or principal_of(msg.sender))
            return
        if msg.deadline is None and kind is Kind.REQUEST:
            msg.deadline = self.node_limits.default_deadline_s  # nobody's work runs forever
        if handler.wants_context:
            deadline = None if msg.deadline is None else self._loop.time() + msg.deadline
            args = (msg.body, CallContext(msg.sender, msg.method, deadline, self))
        else:
            args = (msg.body,)
        if handler.is_async:
            if len(self._tasks) >= self.node_limits.max_in_flight:
                self._busy(route, msg)
                return
            task = self._loop.create_task(self._run_async(handler, args, route, msg))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        try:
            result = handler.fn(*args)
        except Exception as e:
            self._handler_failed(route, msg, e)
            return
        if kind is Kind.REQUEST:
            self._reply(route, msg, result)

    async def _run_async(self, handler: Handler, args: tuple, route: Route, msg: Message) -> None:
        try:
            if msg.deadline is not None:
                # Work nobody waits for any more is wasted: stop it when the caller gives up.
                async with asyncio.timeout(msg.deadline):
                    result = await handler.fn(*args)
            else:
                result = await handler.fn(*args)
        except asyncio.CancelledError:
            raise
        except TimeoutError as e:
            self._handler_failed(route, msg, e if str(e) else TimeoutError(f"deadline of {msg.deadline:g}s passed"))
            return
        except Exception as e:
            self._handler_failed(route, msg, e)
            return
        if msg.kind is Kind.REQUEST:
            self._reply(route, msg, result)

    def _handler_failed(self, route: Route, msg: Message, e: Exception) -> None:
        self.metrics.error("handler")
        if msg.kind is Kind.REQUEST:
            self._reply_error(route, msg, type(e).__name__, str(e))
        else:
            log.warning("one-way handler %s on %s failed: %s: %s", msg.method, self.name, type(e).__name__, e)

    def _reply(self, route: Route, msg: Message, result: Any) -> None:
        try:
            frames = encode(Message(Kind.REPLY, msg.id, msg.method, self.name, result), self.limits)
        except WireError as e:
            self._reply_error(route, msg, "WireError", f"handler returned what the wire cannot carry: {e}")
            return
        self._send_reply(route, msg, frames)

    def _reply_error(self, route: Route, msg: Message, type_name: str, message: str) -> None:
        if len(message) > MAX_ERROR_MESSAGE:
            message = message[:MAX_ERROR_MESSAGE] + f"... ({len(message)} characters in all)"
        body = {"type": type_name[:200], "message": message}
        try:
            frames = encode(Message(Kind.ERROR, msg.id, msg.method, self.name, body), self.limits)
        except WireError as e:  # only under limits too small for an error message to fit
            self.metrics.error("reply_failed")
            log.warning("node %s cannot answer %s from %s with %s: %s", self.name, msg.method, msg.sender, type_name, e)
            return
        self._send_reply(route, msg, frames)

    def _busy(self, route: Route, msg: Message) -> None:
        self.metrics.error("busy")
        limit = self.node_limits.max_in_flight
        text = f"node {self.name} busy: {len(self._tasks)} in flight (limit {limit}, NodeLimits.max_in_flight)"
        if msg.kind is Kind.REQUEST:
            self._reply_error(route, msg, BUSY, text)
        else:
            self._log_rate_limited(msg.sender, "node %s dropped a one-way %s from %s: %s",
                                   msg.method, msg.sender, text)

    def _send_reply(self, route: Route, msg: Message, frames: list) -> None:
        try:
            if route is None:
                self.transport.send(msg.sender, frames)
            else:
                self.transport.reply(route, frames)
        except TransportError as e:
            self.metrics.error("reply_failed")
            log.debug("reply to %s for %s dropped: %s", msg.sender, msg.method, e)
            return
        self._count_out(frames)

    def _allowed(self, allow: Allow, principal: str) -> bool:
        member = self.directory.get(principal)
        return allow.admits(principal, member.role if member is not None else None)

    def _not_allowed(self, route: Route, msg: Message, allow: Allow, principal: str) -> None:
        self.metrics.error("not_allowed")
        text = f"node {self.name!r}: {principal!r} may not call {msg.method} (allowed: {allow})"
        if msg.kind is Kind.REQUEST:
            self._reply_error(route, msg, "NotAllowed", text)
        self._log_rate_limited(principal, "node %s refused %s from %s (allowed: %s)", msg.method, principal, allow)

    def _connection_refused(self, address: str, reason: str) -> None:
        # The transport logs these itself (rate-limited); here they are counted with the node's errors.
        self.metrics.error("connection_refused")

    def _bad_message(self, route: Route, error: WireError, frames: Any, principal: str | None = None) -> None:
        self.metrics.error("bad_message")
        peer = principal or (route.decode(errors="replace") if isinstance(route, bytes) else str(route))
        prefix = request_prefix(frames)
        if prefix is not None:
            # A request we cannot take (over a limit, a bad array frame) is still answered, at
            # once: otherwise its caller learns nothing until its timeout, and counts us as dead.
            msg_id, method, sender = prefix
            self._reply_error(route, Message(Kind.REQUEST, msg_id, method, sender), "WireError", str(error))
        self._log_rate_limited(peer, "node %s dropped a bad message from %s: %s", peer, error)

    def _log_rate_limited(self, peer: str, fmt: str, *args: Any) -> None:
        now = time.monotonic()
        if len(self._bad_logged) > 10_000:  # peer names come from the network: keep the table bounded
            self._bad_logged.clear()
        if now - self._bad_logged.get(peer, -BAD_MESSAGE_LOG_PERIOD) >= BAD_MESSAGE_LOG_PERIOD:
            self._bad_logged[peer] = now
            log.warning(fmt + " (further ones logged at most once a minute)", self.name, *args)

    # -- introspection --------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "role": self.role,
            "state": self.state.value,
            "pid": os.getpid(),
            "zmq": self.transport.address,
            "admin": self.admin_url,
            "uptime_s": round(time.time() - self.started_at, 3),
            "failing_gates": self.failing_gates,
            "services": {name: svc.status() for name, svc in self._services.items() if name != NodeService.name},
            "in_flight": len(self._tasks),
            "metrics": self.metrics.summary(),
        }
