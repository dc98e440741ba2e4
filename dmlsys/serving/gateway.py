"""The HTTP front door and the gateway service that hosts it and the balancer.

KServe v1 / TensorFlow Serving style::

    POST /v1/models/{name}:predict   {"instances": [[784 numbers] | [[28 numbers] x 28], ...]}
         -> 200 {"predictions": [{"class": 3, "label": "Dress", "scores": [10 floats]}, ...],
                 "model": name, "model_version": 4}
    GET  /v1/models/{name}           -> {"name", "version", "versions", "ready_replicas", ...}
    GET  /v1/models                  -> {"models": [...]}

Errors are ``{"error": "..."}``: 400 malformed input (shape, non-numbers, too many instances,
body too large), 404 unknown model, 503 with ``Retry-After`` when no replica is ready or all
are full, 504 when the deadline passes. Optional headers: ``X-Deadline-Ms`` (default from the
config) and ``X-Request-Key`` (for the consistent-hash policy).

The door does not parse the body: it checks the size, and the replica parses it (see
:mod:`dmlsys.serving.replica`), so the one process every request crosses does the least work.

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

from dmlsys.node import Service, rpc
from dmlsys.serving.balancer import Balancer, BalancerConfig
from dmlsys.serving.errors import BadInput, ServingError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class GatewayConfig:
    http: str | None = "127.0.0.1:8000"  # HOST:PORT; port 0 picks a free one (GatewayService.url); None: no door
    deadline: float = 10.0  # seconds, when the request does not say
    max_body_bytes: int = 4 << 20
    max_instances: int = 64
    balancer: BalancerConfig = BalancerConfig()

    def __post_init__(self) -> None:
        host, _, port = (self.http or "x:0").rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"http must be HOST:PORT, got {self.http!r}")
        if self.deadline <= 0 or self.max_body_bytes < 1 or self.max_instances < 1:
            raise ValueError("deadline, max_body_bytes and max_instances must be positive")


def _error(status: int, message: str, retry_after: float | None = None) -> web.Response:
    headers = {"Retry-After": str(max(1, round(retry_after)))} if retry_after is not None else None
    return web.Response(status=status, body=json.dumps({"error": message}).encode(),
                        content_type="application/json", headers=headers)


class GatewayService(Service):
    """Hosts the balancer and the HTTP front door on a gateway node."""

    name = "serving"

    def __init__(self, config: GatewayConfig = GatewayConfig(), *, rng=None) -> None:
        self.config = config
        self._rng = rng
        self.balancer: Balancer | None = None
        self._runner: web.AppRunner | None = None
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
        # One byte over the limit is enough to know a body is too large; aiohttp's own check
        # answers 413, and the contract here is 400 with the reason, so we check ourselves.
        app = web.Application(client_max_size=self.config.max_body_bytes + 1)
        app.add_routes([
            web.post("/v1/models/{name}:predict", self._predict),
            web.get("/v1/models/{name}", self._model),
            web.get("/v1/models", self._models),
        ])
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        host, _, port = self.config.http.rpartition(":")
        site = web.TCPSite(self._runner, host, int(port), reuse_address=True, backlog=1024)
        try:
            await site.start()
        except OSError as e:
            await self._runner.cleanup()
            self._runner = None
            raise OSError(e.errno, f"gateway {self.node.name!r} cannot listen for HTTP on {self.config.http}: "
                                   f"{e.strerror}; pick another [cluster] http or stop what holds the port") from None
        self.url = f"http://{host}:{site._server.sockets[0].getsockname()[1]}"
        log.info("gateway %s: front door on %s", self.node.name, self.url)

    async def stop(self) -> None:
        # The door closes first (no new requests), then the balancer's probes stop.
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self.balancer is not None:
            await self.balancer.stop()

    # -- HTTP -----------------------------------------------------------------------------

    async def _predict(self, request: web.Request) -> web.Response:
        self.requests += 1
        name = request.match_info["name"]
        loop = asyncio.get_running_loop()
        try:
            deadline = loop.time() + self._deadline(request)
            try:
                body = await request.read()
            except web.HTTPRequestEntityTooLarge:
                raise BadInput(f"body larger than the limit of {self.config.max_body_bytes} bytes: "
                               "send fewer instances per request") from None
            if len(body) > self.config.max_body_bytes:
                raise BadInput(f"body of {len(body)} bytes is over the limit of {self.config.max_body_bytes}")
            reply = await self.balancer.predict(
                name, {"json": body, "max_instances": self.config.max_instances},
                deadline=deadline, key=request.headers.get("X-Request-Key"))
        except ServingError as e:
            self.errors[e.status] = self.errors.get(e.status, 0) + 1
            return _error(e.status, str(e), e.retry_after if e.status == 503 else None)
        return web.Response(body=reply["body"], content_type="application/json",
                            headers={"X-Model-Version": str(reply.get("version"))})

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

    @rpc
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
        return {"http": self.url, "requests": self.requests, "errors": {str(k): v for k, v in self.errors.items()},
                "retries": b.retries if b else 0, "models": b.models() if b else {}}
