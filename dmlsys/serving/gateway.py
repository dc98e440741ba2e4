"""The HTTP front door and the gateway service that hosts it and the balancer.

KServe v1 / TensorFlow Serving style::

    POST /v1/models/{name}:predict   {"instances": [[784 numbers] | [[28 numbers] x 28], ...]}
         -> 200 {"predictions": [{"class": 3, "label": "Dress", "scores": [10 floats]}, ...],
                 "model": name, "model_version": 4}
    GET  /v1/models/{name}           -> {"name", "version", "versions", "ready_replicas", ...}
    GET  /v1/models                  -> {"models": [...]}

Errors are ``{"error": "..."}``: 400 malformed input (shape, non-numbers, too many instances),
404 unknown model, 408 a body not received within ``read_timeout``, 413 a body over
``max_body_bytes``, 503 with ``Retry-After`` when no replica is ready or all are full (or the
door is at ``max_connections``), 504 when the deadline passes. Optional headers:
``X-Deadline-Ms`` (default from the config) and ``X-Request-Key`` (for the consistent-hash
policy).

The door does not parse the body: it checks the size, and the replica parses it (see
:mod:`dmlsys.serving.replica`), so the one process every request crosses does the least work.
A body travels to the replica as it came (see :mod:`dmlsys.serving.messages` for why a large
one travels as an array frame).

**Bounds on clients.** At most ``max_connections`` connections are open at once; one more is
answered 503 naming the limit and closed. A connection that has not sent a whole request line
and headers within ``idle_timeout`` seconds (idle keep-alive, or headers that trickle in) is
closed, and a body must arrive within ``read_timeout`` seconds of its headers (else 408): a
slow client holds a connection for a bounded time, and never a replica's in-flight slot. The
door is :class:`dmlsys.serving.http.HttpServer`, which enforces these and answers 408/413 itself.

The gateway node also answers ``serving.models`` and ``serving.rollout {model, version}`` over
RPC, for the cluster CLI, and ``serving.pins`` (the supervisor pushing the version pins every
gateway follows). In a cluster it asks its supervisor for those pins before it probes a replica
and every ``versions.SYNC_PERIOD`` seconds after (see :mod:`dmlsys.serving.versions`), so the
gateways of a group (``reuse_port``: they share the door's port with SO_REUSEPORT) serve one
version per model.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any

import numpy as np

from dmlsys.node import ADMIN, NodeError, Service, rpc
from dmlsys.serving import messages, versions
from dmlsys.serving.balancer import Balancer, BalancerConfig
from dmlsys.serving.errors import BadInput, ServingError
from dmlsys.serving.http import LATER, HttpLimits, HttpServer, Reply, Request, error_reply, json_reply
from dmlsys.wire.codec import DEFAULT_LIMITS

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class GatewayConfig:
    http: str | None = "127.0.0.1:8000"  # HOST:PORT; port 0 picks a free one (GatewayService.url); None: no door
    deadline: float = 10.0  # seconds, when the request does not say
    max_body_bytes: int = 4 << 20  # over it: 413
    max_instances: int = 64  # per request; the replica refuses more with 400
    max_connections: int = 1024  # open at once; one more is answered 503 and closed
    read_timeout: float = 10.0  # seconds for a body to arrive once its headers have; else 408
    idle_timeout: float = 15.0  # seconds a connection may go without a whole request head; then closed
    balancer: BalancerConfig = BalancerConfig()
    tls_cert: str | None = None  # PEM certificate chain and key: the door speaks HTTPS (docs/security.md)
    tls_key: str | None = None
    # POST /v1/models/NAME:tag goes to this sharding router node (None: answered 413 over the cap,
    # which is what a replica would answer: no replica holds a canvas over it in memory).
    router: str | None = None
    replica_max_input_bytes: int = 16 << 20
    # Predicts pass the event gate first (dmlsys.events: tiers by API key, 401/429 with
    # Retry-After) when ``tiers`` is set; ``api_keys`` is the key file `keys add` writes.
    tiers: Any = None  # a dict of dmlsys.events.tiers.Tier by name, or None: no gate
    api_keys: str | None = None
    reuse_port: bool = False  # SO_REUSEPORT: the members of a gateway group share the http address

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("GatewayConfig.tls_cert and tls_key go together: give both, or neither for plain HTTP")
        host, _, port = (self.http or "x:0").rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"http must be HOST:PORT, got {self.http!r}")
        for name in ("deadline", "max_body_bytes", "max_instances", "max_connections", "read_timeout",
                     "idle_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"GatewayConfig.{name} must be positive, got {getattr(self, name)!r}")
        # What the door accepts, a replica must receive: a body travels as one array frame.
        if self.max_body_bytes > DEFAULT_LIMITS.max_frame_bytes:
            raise ValueError(f"GatewayConfig.max_body_bytes ({self.max_body_bytes}) is over the wire's frame limit "
                             f"({DEFAULT_LIMITS.max_frame_bytes}, Limits.max_frame_bytes)")


def _error(status: int, message: str, retry_after: float | None = None) -> Reply:
    return error_reply(status, message, {"Retry-After": str(max(1, round(retry_after)))}
                       if retry_after is not None else None)


_VERSION_LINES: dict[Any, bytes] = {}  # version -> its header line, encoded once


def _ok(reply: Any) -> Reply:
    """A replica's ``{"version", "body"}`` as the client's answer; 502 when it is not that (a
    replica is a peer: what it sends is checked, not trusted)."""
    version = reply.get("version")
    if type(version) is not int and version is not None:
        return error_reply(502, f"a replica answered with a malformed version {str(version)[:40]!r}")
    line = _VERSION_LINES.get(version)
    if line is None:
        if len(_VERSION_LINES) >= 1024:  # versions only grow; an old one is cheap to encode again
            _VERSION_LINES.clear()
        line = _VERSION_LINES[version] = f"X-Model-Version: {version}\r\n".encode("latin-1")
    body = reply.get("body")
    if type(body) is not bytes:  # inline bytes are the common case; a large body is a uint8 frame
        body = messages.received(body)
        if body is None:
            return error_reply(502, "a replica answered without a JSON body")
    return Reply(200, body, headers=line)


def _resolve(fut: asyncio.Future, reply: Reply) -> None:
    if not fut.done():  # else its waiter is gone (the gate's admission was cancelled)
        fut.set_result(reply)


_PREFIX = "/v1/models/"
_PREDICT = ":predict"
_TAG = ":tag"
TAG_DEADLINE = 120.0  # seconds for a :tag request that names none: a canvas is many parts


class GatewayService(Service):
    """Hosts the balancer and the HTTP front door on a gateway node."""

    name = "serving"

    def __init__(self, config: GatewayConfig = GatewayConfig(), *, rng=None) -> None:
        self.config = config
        self._rng = rng
        self.balancer: Balancer | None = None
        self._http: HttpServer | None = None
        self.url: str | None = None
        self.requests = 0
        self.errors: dict[int, int] = {}
        self.gate = None  # dmlsys.events' EventGate, when config.tiers is set
        self.gate_refused = 0
        self._pin_sync: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self, node) -> None:
        await super().start(node)
        self._loop = asyncio.get_running_loop()
        self.balancer = Balancer(node, self.config.balancer, rng=self._rng)
        supervisor = node.directory.supervisor
        if supervisor and supervisor != node.name:  # in a cluster: the version pins are the cluster's
            await self._sync_pins(supervisor)  # before the first probe: a restarted gateway pins what is served
            self._pin_sync = asyncio.get_running_loop().create_task(self._pin_sync_loop(supervisor))
        await self.balancer.start()
        node.metrics.gauge("serving_http_requests", "Predict requests received by the front door", lambda: self.requests)
        node.metrics.gauge("serving_retries", "Predict tries retried on another replica", lambda: self.balancer.retries)
        node.metrics.gauge("serving_coalesced_messages", "Predict messages sent to replicas (each of one or more predicts)",
                           lambda: self.balancer.coalescer.messages)
        node.metrics.gauge("serving_coalesced_items", "Predicts those messages carried",
                           lambda: self.balancer.coalescer.items)
        self.gate = None
        if self.config.tiers is not None:
            from dmlsys.events.gate import EventGate
            from dmlsys.events.keys import KeyFile

            self.gate = EventGate(self.config.tiers, KeyFile(self.config.api_keys) if self.config.api_keys else None)
            node.metrics.gauge("serving_gate_refused", "Predicts the event gate refused (401/429/503)",
                               lambda: self.gate_refused)
        if self.config.http is not None:  # None: reached by RPC only (a pipeline on the simulated network)
            await self._start_http()

    async def _start_http(self) -> None:
        c = self.config
        door = HttpServer(self._route, HttpLimits(max_body_bytes=c.max_body_bytes, read_timeout=c.read_timeout,
                                                  idle_timeout=c.idle_timeout, max_connections=c.max_connections),
                          name="the front door")
        host, _, port = self.config.http.rpartition(":")
        tls = self._tls_context()
        try:
            await door.start(host, int(port), ssl=tls, reuse_port=c.reuse_port)
        except OSError as e:
            raise OSError(e.errno, f"gateway {self.node.name!r} cannot listen for HTTP on {self.config.http}: "
                                   f"{e.strerror}; pick another [cluster] http or stop what holds the port") from None
        self._http = door
        node = self.node
        node.metrics.gauge("serving_http_connections", "Connections open at the front door",
                           lambda: len(door.connections))
        node.metrics.gauge("serving_http_connections_refused", "Connections refused for max_connections",
                           lambda: door.refused)
        self.url = f"{'https' if tls else 'http'}://{host}:{door.port}"
        log.info("gateway %s: front door on %s", self.node.name, self.url)

    def _tls_context(self):
        if self.config.tls_cert is None:
            return None
        import ssl

        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)  # TLS 1.2 and up, the stdlib's ciphers
        try:
            context.load_cert_chain(self.config.tls_cert, self.config.tls_key)
        except (OSError, ssl.SSLError) as e:
            raise OSError(getattr(e, "errno", None), f"gateway {self.node.name!r} cannot load its TLS certificate "
                          f"{self.config.tls_cert} / key {self.config.tls_key}: {e}") from None
        return context

    async def _sync_pins(self, supervisor: str) -> None:
        pins = self.balancer.pins
        changed = dict(pins.changed)
        try:
            shared = await self.node.call(supervisor, "cluster", "pins", {"pinned": dict(pins.pinned),
                                                                          "changed": changed},
                                          timeout=versions.SYNC_PERIOD)
        except NodeError as e:  # a supervisor restarting, or one without pins: keep ours until it answers
            log.debug("gateway %s: no version pins from %s: %s", self.node.name, supervisor, e)
            return
        pins.reported(changed)
        if isinstance(shared, dict):
            pins.apply(shared)

    async def _pin_sync_loop(self, supervisor: str) -> None:
        while True:
            await asyncio.sleep(versions.SYNC_PERIOD)
            await self._sync_pins(supervisor)

    async def stop(self) -> None:
        if self._pin_sync is not None:
            self._pin_sync.cancel()
            await asyncio.gather(self._pin_sync, return_exceptions=True)
            self._pin_sync = None
        # The door closes first (no new requests), then the balancer's probes stop.
        if self._http is not None:
            await self._http.stop()
            self._http = None
        if self.balancer is not None:
            await self.balancer.stop()

    # -- HTTP -----------------------------------------------------------------------------

    def _route(self, request: Request) -> Reply | Any:
        path, method = request.path, request.method
        if path.endswith(_PREDICT) and method == "POST" and self.gate is None and path.startswith(_PREFIX):
            return self._predict(path[len(_PREFIX):-len(_PREDICT)], request)  # the hot path, first
        if path.startswith(_PREFIX):
            name = path[len(_PREFIX):]
            if name.endswith(_PREDICT):
                if method != "POST":
                    return error_reply(405, f"{path} takes POST, not {method}", {"Allow": "POST"})
                if self.gate is not None:
                    return self._admitted(name[:-len(_PREDICT)], request)
                return self._predict(name[:-len(_PREDICT)], request)
            if name.endswith(_TAG):
                if method != "POST":
                    return error_reply(405, f"{path} takes POST, not {method}", {"Allow": "POST"})
                return self._tag(name[:-len(_TAG)], request)
            if name and "/" not in name:
                return self._model(name) if method == "GET" else error_reply(405, f"{path} takes GET", {"Allow": "GET"})
        elif path == "/v1/models":
            return self._models() if method == "GET" else error_reply(405, f"{path} takes GET", {"Allow": "GET"})
        return error_reply(404, f"no such resource: {method} {path} (POST /v1/models/NAME:predict, "
                                "GET /v1/models/NAME, GET /v1/models)")

    def _predict(self, name: str, request: Request, done=None, arg: Any = None) -> Reply | Any:
        """A Reply now (bad input), ``LATER`` (a replica was free: ``request.respond`` answers
        from a callback, no future or task: see ``Balancer.predict_then``), or a coroutine that
        waits for a replica. ``done(arg, reply, error)`` hears the outcome instead of
        ``request.respond`` when given (the event gate's path)."""
        self.requests += 1
        headers = request.headers
        raw = headers.get("x-deadline-ms")
        try:
            timeout = self.config.deadline if raw is None else self._deadline(raw)
        except ServingError as e:
            return self._failed(e)
        now = (self._loop or asyncio.get_running_loop()).time()
        data = request.body
        body = {"json": data if len(data) <= messages.INLINE_MAX else messages.carry(data),
                "max_instances": self.config.max_instances}
        key = headers.get("x-request-key")
        if done is None:
            done, arg = self._answer, request
        if self.balancer.predict_then(name, body, now + timeout, key, done, arg, now):
            return LATER
        return self._predict_waiting(name, body, now + timeout, key)

    def _answer(self, request: Request, reply: Any, error: Exception | None) -> None:
        """A predict's outcome, answered on its connection."""
        request.respond(_ok(reply) if error is None else self._outcome(error))

    async def _admitted(self, name: str, request: Request) -> Reply:
        """A predict through the event gate: who is asking (Bearer key, else the client's
        address), then a slot of their tier for as long as the predict runs."""
        from dmlsys.events.errors import EventsError

        try:
            principal = self.gate.identify(request.headers.get("authorization"), request.remote)
            async with self.gate.admission(principal):
                answered = asyncio.get_running_loop().create_future()
                answer = self._predict(name, request, self._resolved, answered)
                if answer is LATER:
                    return await answered
                return answer if isinstance(answer, Reply) else await answer
        except EventsError as e:
            self.gate_refused += 1
            return error_reply(e.status, str(e), {"Retry-After": str(e.retry_after)} if e.retry_after else None)

    async def _tag(self, name: str, request: Request) -> Reply:
        """A canvas to tag: to the sharding router when there is one (it splits what no replica
        could hold), else 413 over the replicas' input cap, naming it (docs/sharding.md)."""
        from dmlsys.sharding import door
        from dmlsys.sharding.errors import InputTooLarge

        self.requests += 1
        content_type = request.headers.get("content-type", "")
        if self.config.router is None:
            try:
                door.check_input(door.input_bytes(request.body, content_type), self.config.replica_max_input_bytes,
                                 where="the gateway's replica_max_input_bytes")
            except InputTooLarge as e:
                return error_reply(413, str(e))
            return error_reply(404, f"{name}:tag needs a sharding router: set router = NODE in the gateway's config")
        try:
            raw = request.headers.get("x-deadline-ms")
            timeout = self._deadline(raw) if raw is not None else TAG_DEADLINE
            reply = await self.node.call(self.config.router, "router", "http", {
                "model": name, "verb": "tag", "content_type": content_type, "params": {},
                "body": np.frombuffer(request.body, np.uint8)},  # an array frame: no header limit on the canvas
                timeout=timeout)
        except ServingError as e:
            return self._failed(e)
        except NodeError as e:
            return error_reply(503, f"the sharding router {self.config.router!r} did not answer: {e}")
        return json_reply(int(reply["status"]), reply["json"])

    def _resolved(self, answered: asyncio.Future, reply: Any, error: Exception | None) -> None:
        """A predict's outcome, as the result of ``answered`` (the event gate's path)."""
        _resolve(answered, _ok(reply) if error is None else self._outcome(error))

    def _outcome(self, error: Exception) -> Reply:
        """The answer to a predict that failed with ``error``."""
        if isinstance(error, ServingError):
            return self._failed(error)
        if isinstance(error, asyncio.CancelledError):
            return _error(503, "the gateway is stopping; retry", 1.0)
        log.error("gateway %s: a predict failed: %s: %s", self.node.name, type(error).__name__, error)
        return error_reply(500, f"{type(error).__name__}: {error}")

    async def _predict_waiting(self, name: str, body: dict, deadline: float, key: str | None) -> Reply:
        try:
            reply = await self.balancer.predict(name, body, deadline=deadline, key=key)
        except ServingError as e:
            return self._failed(e)
        return _ok(reply)

    def _failed(self, e: ServingError) -> Reply:
        self.errors[e.status] = self.errors.get(e.status, 0) + 1
        return _error(e.status, str(e), e.retry_after if e.status == 503 else None)

    def _deadline(self, raw: str | None) -> float:
        if raw is None:
            return self.config.deadline
        try:
            ms = float(raw)
        except ValueError:
            raise BadInput(f"X-Deadline-Ms must be a number of milliseconds, got {raw!r}") from None
        if not 0 < ms <= 600_000:
            raise BadInput(f"X-Deadline-Ms must be in (0, 600000], got {raw!r}")
        return ms / 1000.0

    def _model(self, name: str) -> Reply:
        models = self.balancer.models()
        if name not in models:
            return _error(404, f"unknown model {name!r}; served models: {', '.join(models) or '(none)'}")
        return json_reply(200, models[name])

    def _models(self) -> Reply:
        return json_reply(200, {"models": list(self.balancer.models().values())})

    # -- RPC ------------------------------------------------------------------------------

    @rpc
    def models(self, body=None) -> dict[str, Any]:
        return self.balancer.models()

    @rpc(allow=ADMIN)
    async def rollout(self, body: Any) -> dict[str, Any]:
        """``{"model": name, "version": v | None}``: reload every replica, one at a time."""
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            raise BadInput('rollout takes {"model": name, "version": int or null}')
        version = body.get("version")
        if version is not None and (not isinstance(version, int) or version < 1):
            raise BadInput(f"version must be a positive integer or null (latest), got {version!r}")
        return await self.balancer.rollout(body["model"], version)

    @rpc(allow=ADMIN)  # the supervisor pushing them
    def pins(self, body: Any) -> dict[str, Any]:
        """The cluster's version pins ``{"pinned", "rolling", "seq"}`` (see ``VersionPins.apply``);
        answers this gateway's pins after."""
        if not isinstance(body, dict):
            raise BadInput('pins takes {"pinned": {model: version}, "rolling": [model], "seq": n}')
        self.balancer.pins.apply(body)
        return {"pinned": dict(self.balancer.pins.pinned), "seq": self.balancer.pins.seq}

    def status(self) -> dict[str, Any]:
        b = self.balancer
        door = self._http
        errors = dict(self.errors)
        for status, n in (door.refusals.items() if door else ()):  # answered by the door itself: 408, 413, ...
            errors[status] = errors.get(status, 0) + n
        return {"http": self.url, "requests": self.requests, "errors": {str(k): v for k, v in sorted(errors.items())},
                "connections": len(door.connections) if door else 0,
                "connections_refused": door.refused if door else 0,
                "retries": b.retries if b else 0, "models": b.models() if b else {}}
