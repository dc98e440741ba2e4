"""The router node's HTTP door, and the one function behind it that the gateway can call too.

    POST /v1/models/{app}:{verb}     a request the app's ``HttpDoor`` parses (the canvas app:
                                     ``/v1/models/canvas:tag`` with a PNG or a JSON array)
         -> 200 {"model", "shards", "parts", ...the app's rendered answer}
    GET  /v1/models/{app}            -> {"name", "verb", "shards": [...], "max_body_bytes"}
    GET  /healthz                    -> {"state"}

Errors are ``{"error": "..."}``: 400 a body the app cannot read, 404 another model or path,
405 the wrong method, 413 a body over ``max_body_bytes`` (the message names the cap and the
config key), 415 a media type the app does not take, 503 when a part could not be served
(``PartFailed``: the message names the part and the shards tried; never a partial answer), 504
when the deadline passes first. ``X-Deadline-Ms`` sets the deadline (default: the router's).

``answer(router, model, verb, body, content_type, params, timeout)`` is the whole request
path without HTTP: the door calls it, and so does the RPC ``router.http``, which is how a gateway
hands the router a request too large for a replica (docs/sharding.md, "The gateway's hook").

The door is aiohttp's (it carries large bodies and few requests: the front door's lean server
is for the opposite), bound to ``RouterConfig.http``, loopback unless configured otherwise.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson

from dmlsys.node.admin import serve_http
from dmlsys.sharding.errors import BadRequest, InputTooLarge, PartFailed, ShardingError
from dmlsys.wire.sim import to_thread

if TYPE_CHECKING:
    from dmlsys.sharding.router import RouterService

log = logging.getLogger(__name__)

PREFIX = "/v1/models/"


def check_input(size: int, limit: int, *, where: str) -> None:
    """Refuse an input of ``size`` bytes over ``limit`` with ``InputTooLarge`` (HTTP 413) naming
    the cap and where it is set. What a capped replica calls before it parses a ``:tag`` body."""
    if size > limit:
        raise InputTooLarge(f"the request's input is {size} bytes, over {where} = {limit} bytes; a canvas this "
                            f"large is tagged by the sharding router (POST it to the router's door, or to a "
                            f"gateway that forwards :tag requests over the cap)", size=size, limit=limit)


def input_bytes(body: bytes, content_type: str) -> int:
    """How much memory the canvas in ``body`` takes once decoded, without decoding it: a PNG's
    width x height from its header (one byte a pixel), else the body's length (a JSON array
    spends at least two bytes of text a pixel, so this is an upper bound). What a gateway
    compares with a replica's cap to decide where a ``:tag`` request goes."""
    from dmlsys.sharding.png import SIGNATURE

    if content_type.split(";", 1)[0].strip().lower() == "image/png" and body[:8] == SIGNATURE and len(body) >= 24 \
            and body[12:16] == b"IHDR":
        return int.from_bytes(body[16:20], "big") * int.from_bytes(body[20:24], "big")
    return len(body)


def as_bytes(body: Any) -> bytes:
    """A body that came over RPC: bytes, or a uint8 array frame (how a large body travels)."""
    if isinstance(body, np.ndarray):
        return body.tobytes()
    if isinstance(body, (bytes, bytearray, memoryview)):
        return bytes(body)
    raise BadRequest(f"the body is bytes or a uint8 array, got {type(body).__name__}")


async def answer(router: RouterService, model: str, verb: str, body: bytes, content_type: str,
                 params: dict[str, str] | None = None, timeout: float | None = None) -> tuple[int, dict[str, Any]]:
    """(HTTP status, JSON document) for one HTTP request to ``router``'s app."""
    app = router.app
    if app.http is None or model != app.name:
        served = f"{app.name}:{app.http.verb}" if app.http else "nothing over HTTP"
        return 404, {"error": f"unknown model {model!r}; this router serves {served}"}
    if verb != app.http.verb:
        return 404, {"error": f"model {model!r} takes :{app.http.verb}, not :{verb}"}
    if len(body) > router.config.max_body_bytes:
        return 413, {"error": f"the body is {len(body)} bytes, over the router's max_body_bytes = "
                              f"{router.config.max_body_bytes}"}
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        request = await to_thread(app.http.parse, body, content_type, params or {})
        result = await asyncio.wait_for(router.run(request, timeout=timeout), None if timeout is None else timeout + 1)
        doc = app.http.render(result)
    except BadRequest as e:
        return e.status, {"error": str(e)}
    except InputTooLarge as e:
        return 413, {"error": str(e)}
    except PartFailed as e:
        return 503, {"error": str(e), "part": e.part, "shard": e.shard}
    except TimeoutError:
        return 504, {"error": f"the request took longer than its deadline ({timeout:g}s)"}
    except ShardingError as e:
        return 503, {"error": str(e)}
    if not isinstance(doc, dict):
        doc = {"answer": doc}
    return 200, {"model": model, "shards": len(router.ring), "parts": router.last_parts,
                 "seconds": round(loop.time() - started, 4), **doc}


class RouterDoor:
    """aiohttp on ``host:port`` in front of one ``RouterService``."""

    def __init__(self, router: RouterService, address: str) -> None:
        self.router = router
        host, _, port = address.rpartition(":")
        self.host, self.port = host, int(port)
        self.url: str | None = None
        self._runner = None
        self.requests = 0
        self.errors: dict[int, int] = {}

    async def start(self) -> None:
        from aiohttp import web

        # aiohttp's own cap answers 413 before the body is read; ours names the config key.
        app = web.Application(client_max_size=self.router.config.max_body_bytes + 1)
        app.add_routes([web.post(PREFIX + "{target}", self._post), web.get(PREFIX + "{target}", self._get),
                        web.get("/healthz", self._healthz)])
        self._runner, self.port = await serve_http(app, self.host, self.port, "the router's HTTP door",
                                                   " (set [nodes.config] http to another HOST:PORT)")
        self.url = f"http://{self.host}:{self.port}"
        log.info("router %s: HTTP door on %s", self.router.node.name, self.url)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def _reply(self, status: int, doc: dict):
        from aiohttp import web

        if status != 200:
            self.errors[status] = self.errors.get(status, 0) + 1
        return web.Response(status=status, body=orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY),
                            content_type="application/json")

    async def _post(self, request):
        from aiohttp import web

        self.requests += 1
        model, sep, verb = request.match_info["target"].rpartition(":")
        if not sep:
            return self._reply(404, {"error": f"POST {request.path}: the path is /v1/models/NAME:VERB"})
        if request.content_length is not None and request.content_length > self.router.config.max_body_bytes:
            return self._reply(413, {"error": f"the body is {request.content_length} bytes, over the router's "
                                              f"max_body_bytes = {self.router.config.max_body_bytes}"})
        try:
            timeout = _deadline(request.headers.get("X-Deadline-Ms"), self.router.config.deadline)
            body = await request.read()
        except BadRequest as e:
            return self._reply(e.status, {"error": str(e)})
        except web.HTTPRequestEntityTooLarge:
            return self._reply(413, {"error": f"the body is over the router's max_body_bytes = "
                                              f"{self.router.config.max_body_bytes}"})
        status, doc = await answer(self.router, model, verb, body, request.headers.get("Content-Type", ""),
                                   dict(request.query), timeout)
        return self._reply(status, doc)

    async def _get(self, request):
        app, target = self.router.app, request.match_info["target"]
        if app.http is None or target != app.name:
            return self._reply(404, {"error": f"unknown model {target!r}"})
        return self._reply(200, {"name": app.name, "verb": app.http.verb, "shards": list(self.router.ring.names),
                                 "max_body_bytes": self.router.config.max_body_bytes})

    async def _healthz(self, request):
        return self._reply(200, {"state": self.router.node.state.value})


def _deadline(raw: str | None, default: float) -> float:
    if raw is None:
        return default
    try:
        ms = float(raw)
    except ValueError:
        raise BadRequest(f"X-Deadline-Ms must be a number of milliseconds, got {raw!r}") from None
    if not 0 < ms <= 3_600_000:
        raise BadRequest(f"X-Deadline-Ms must be in (0, 3600000], got {raw!r}")
    return ms / 1000.0
