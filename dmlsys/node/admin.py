"""The node's admin HTTP server: liveness, readiness, Prometheus metrics and a status document.

It listens on loopback unless configured otherwise: these endpoints are for the operator and
the supervisor, not for the world. Bound anywhere else, ``/status`` answers only what a load
balancer's probe needs (``PUBLIC_STATUS``), not pids, addresses, metrics or service internals:
they tell whoever can reach the port where to aim (docs/security.md).
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

if TYPE_CHECKING:
    from dmlsys.node.node import Node


PUBLIC_STATUS = ("name", "role", "state", "uptime_s", "failing_gates")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def serve_http(app: web.Application, host: str, port: int, what: str, hint: str = "", *,
                     backlog: int = 128, shutdown_timeout: float = 60.0) -> tuple[web.AppRunner, int]:
    """Start ``app`` on ``host:port`` (0: any free port): its runner and the port it got. A port
    that cannot be bound raises OSError naming ``what``, the address and ``hint`` (where to
    change it), with nothing left running."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True, backlog=backlog)
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        raise OSError(e.errno, f"{what} cannot listen on {host}:{port}: {e.strerror}{hint}") from None
    return runner, site._server.sockets[0].getsockname()[1]


class AdminServer:
    __slots__ = ("node", "host", "port", "_runner")

    def __init__(self, node: "Node", host: str = "127.0.0.1", port: int = 0) -> None:
        self.node = node
        self.host = host
        self.port = port
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024)
        app.add_routes([
            web.get("/healthz", self._healthz),
            web.get("/readyz", self._readyz),
            web.get("/metrics", self._metrics),
            web.get("/status", self._status),
        ])
        self._runner, self.port = await serve_http(app, self.host, self.port,
                                                   f"the admin HTTP of node {self.node.name!r}")

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"name": self.node.name, "state": self.node.state.value})

    async def _readyz(self, request: web.Request) -> web.Response:
        from dmlsys.node.node import State

        node = self.node
        ready = node.state is State.READY
        body = {"name": node.name, "state": node.state.value, "failing_gates": node.failing_gates}
        return web.json_response(body, status=200 if ready else 503)

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.node.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _status(self, request: web.Request) -> web.Response:
        status = self.node.status()
        if not is_loopback(self.host):
            status = {k: status[k] for k in PUBLIC_STATUS if k in status}
        return web.json_response(status)
