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
slow client holds a connection for a bounded time, and never a replica's in-flight slot.

The gateway node also answers ``serving.models`` and ``serving.rollout {model, version}`` over
RPC, for the cluster CLI.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from typing import Any

from aiohttp import web

from dmlsys.node import ADMIN, Service, rpc
from dmlsys.serving import messages
from dmlsys.serving.balancer import Balancer, BalancerConfig
from dmlsys.serving.errors import BadInput, BodyTooLarge, ServingError, SlowClient
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

    def __post_init__(self) -> None:
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


def _error(status: int, message: str, retry_after: float | None = None) -> web.Response:
    headers = {"Retry-After": str(max(1, round(retry_after)))} if retry_after is not None else None
    return web.Response(status=status, body=json.dumps({"error": message}).encode(),
                        content_type="application/json", headers=headers)


class _BodyDeadlines:
    """Bodies still arriving, each with the time by which it must be whole; a sweep every quarter
    of ``timeout`` fails the late ones with ``SlowClient`` (so a body gets between ``timeout`` and
    1.25 x ``timeout``). One timer for all rather than one per request: ``asyncio.timeout``
    costs 12-18 µs a request here, this a dict entry, and only for a body that did not come
    whole with its headers."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._arriving: dict[Any, float] = {}  # the request's payload stream -> loop time it must be done by
        self._sweeper: asyncio.Task | None = None

    def start(self) -> None:
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
            self._sweeper = None

    async def read(self, request: web.Request) -> bytes:
        content = request.content
        if content.is_eof():  # the whole body came with the headers: the usual case
            return await request.read()
        self._arriving[content] = asyncio.get_running_loop().time() + self.timeout
        try:
            return await request.read()
        finally:
            self._arriving.pop(content, None)

    async def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.timeout / 4)
            now = loop.time()
            for content, until in list(self._arriving.items()):
                if now >= until:
                    del self._arriving[content]
                    content.set_exception(SlowClient(f"body not received within {self.timeout:g}s (read_timeout)"))


class _CappedSite(web.TCPSite):
    """A TCP site that keeps at most ``limit`` connections open: one more is answered 503 naming
    the limit and closed, before aiohttp spends anything on it."""

    __slots__ = ("_limit", "refused")

    def __init__(self, runner: web.AppRunner, host: str, port: int, limit: int, **kw: Any) -> None:
        super().__init__(runner, host, port, **kw)
        self._limit = limit
        self.refused = 0  # connections answered 503 for the cap

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with its runner
        server = self._runner.server
        limit = self._limit

        def protocol() -> asyncio.Protocol:
            if len(server.connections) >= limit:
                self.refused += 1
                return _Refuse(limit)
            return server()

        self._server = await asyncio.get_running_loop().create_server(
            protocol, self._host, self._port, backlog=self._backlog, reuse_address=self._reuse_address)
        self._bound_port = self._server.sockets[0].getsockname()[1]


class _Refuse(asyncio.Protocol):
    """Answers one connection over the cap with 503 and closes it. It waits for the client's
    first bytes (or 1 s), so that the answer is read rather than lost to a reset."""

    def __init__(self, limit: int) -> None:
        body = json.dumps({"error": f"the front door is at its limit of open connections (max_connections={limit}); "
                                    "retry after 1s"}).encode()
        self._answer = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
                        b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self._timer = asyncio.get_running_loop().call_later(1.0, self._answer_and_close)

    def data_received(self, data: bytes) -> None:
        self._answer_and_close()

    def _answer_and_close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        t = self._transport
        if t is not None and not t.is_closing():
            t.write(self._answer)
            t.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._transport = None


class GatewayService(Service):
    """Hosts the balancer and the HTTP front door on a gateway node."""

    name = "serving"

    def __init__(self, config: GatewayConfig = GatewayConfig(), *, rng=None) -> None:
        self.config = config
        self._rng = rng
        self.balancer: Balancer | None = None
        self._runner: web.AppRunner | None = None
        self._site: _CappedSite | None = None
        self._bodies = _BodyDeadlines(config.read_timeout)
        self.url: str | None = None
        self.requests = 0
        self.errors: dict[int, int] = {}

    async def start(self, node) -> None:
        await super().start(node)
        self.balancer = Balancer(node, self.config.balancer, rng=self._rng)
        await self.balancer.start()
        node.metrics.gauge("serving_http_requests", "Predict requests received by the front door", lambda: self.requests)
        node.metrics.gauge("serving_retries", "Predict tries retried on another replica", lambda: self.balancer.retries)
        if self.config.http is not None:  # None: reached by RPC only (a pipeline on the simulated network)
            await self._start_http()

    async def _start_http(self) -> None:
        # aiohttp refuses a body over client_max_size while reading it (a chunked one has no
        # Content-Length to check first); we turn that into our own 413 naming the limit.
        app = web.Application(client_max_size=self.config.max_body_bytes + 1)  # it refuses at >=
        app.add_routes([
            web.post("/v1/models/{name}:predict", self._predict),
            web.get("/v1/models/{name}", self._model),
            web.get("/v1/models", self._models),
        ])
        # keepalive_timeout is aiohttp's timer for a connection waiting on a request head:
        # idle between requests, or headers that trickle in (slowloris).
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False,
                                     keepalive_timeout=self.config.idle_timeout)
        await self._runner.setup()
        host, _, port = self.config.http.rpartition(":")
        site = _CappedSite(self._runner, host, int(port), self.config.max_connections, reuse_address=True,
                           backlog=1024)
        try:
            await site.start()
        except OSError as e:
            await self._runner.cleanup()
            self._runner = None
            raise OSError(e.errno, f"gateway {self.node.name!r} cannot listen for HTTP on {self.config.http}: "
                                   f"{e.strerror}; pick another [cluster] http or stop what holds the port") from None
        self._bodies.start()
        self._site = site
        node = self.node
        node.metrics.gauge("serving_http_connections", "Connections open at the front door",
                           lambda: len(self._runner.server.connections) if self._runner else 0)
        node.metrics.gauge("serving_http_connections_refused", "Connections refused for max_connections",
                           lambda: site.refused)
        self.url = f"http://{host}:{site.port}"
        log.info("gateway %s: front door on %s", self.node.name, self.url)

    async def stop(self) -> None:
        # The door closes first (no new requests), then the balancer's probes stop.
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self._bodies.stop()
        if self.balancer is not None:
            await self.balancer.stop()

    # -- HTTP -----------------------------------------------------------------------------

    async def _predict(self, request: web.Request) -> web.Response:
        self.requests += 1
        name = request.match_info["name"]
        loop = asyncio.get_running_loop()
        try:
            deadline = loop.time() + self._deadline(request)
            body = await self._read(request)
            reply = await self.balancer.predict(
                name, {"json": messages.carry(body), "max_instances": self.config.max_instances},
                deadline=deadline, key=request.headers.get("X-Request-Key"))
        except ServingError as e:
            self.errors[e.status] = self.errors.get(e.status, 0) + 1
            return _error(e.status, str(e), e.retry_after if e.status == 503 else None)
        return web.Response(body=messages.received(reply["body"]), content_type="application/json",
                            headers={"X-Model-Version": str(reply.get("version"))})

    async def _read(self, request: web.Request) -> bytes:
        limit = self.config.max_body_bytes
        length = request.content_length
        if length is not None and length > limit:  # refused before a byte of it is read
            raise BodyTooLarge(f"body of {length} bytes is over the limit of {limit} bytes (max_body_bytes): "
                               "send fewer instances per request")
        try:
            return await self._bodies.read(request)
        except web.HTTPRequestEntityTooLarge:
            raise BodyTooLarge(f"body over the limit of {limit} bytes (max_body_bytes): "
                               "send fewer instances per request") from None

    def _deadline(self, request: web.Request) -> float:
        raw = request.headers.get("X-Deadline-Ms")
        if raw is None:
            return self.config.deadline
        try:
            ms = float(raw)
        except ValueError:
            raise BadInput(f"X-Deadline-Ms must be a number of milliseconds, got {raw!r}") from None
        if not 0 < ms <= 600_000:
            raise BadInput(f"X-Deadline-Ms must be in (0, 600000], got {raw!r}")
        return ms / 1000.0

    async def _model(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        models = self.balancer.models()
        if name not in models:
            return _error(404, f"unknown model {name!r}; served models: {', '.join(models) or '(none)'}")
        return web.json_response(models[name])

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"models": list(self.balancer.models().values())})

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

    def status(self) -> dict[str, Any]:
        b = self.balancer
        runner, site = self._runner, self._site
        return {"http": self.url, "requests": self.requests, "errors": {str(k): v for k, v in self.errors.items()},
                "connections": len(runner.server.connections) if runner and runner.server else 0,
                "connections_refused": site.refused if site else 0,
                "retries": b.retries if b else 0, "models": b.models() if b else {}}
