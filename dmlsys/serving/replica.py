"""The model-server replica: one service, ``model``, that loads a version and predicts in batches.

Lifecycle, as ``/readyz`` shows it (the readiness gate is named ``model``)::

    loading fashion-mlp (latest)            not ready: nothing to answer with yet
    ready                                   answers with v3
    reloading fashion-mlp to v4 (serving v3)  not ready, but still answers, with v3
    ready                                   answers with v4: the swap happened between batches

A reload builds and warms the new ``Runtime`` beside the old one and swaps a single reference,
so a batch runs wholly on one version and no answer ever comes from a half-loaded model.
Every reply names the version that computed it.

**Adaptive batching.** Requests that arrive while the model is busy queue up; when it is free
it takes everything queued (up to ``max_batch``) as one batch. Under light load a batch is one
request and adds no delay; under heavy load batches grow on their own and the per-request
cost (parsing, dispatch, one matrix product instead of many) falls, which is how TensorFlow
Serving and Triton trade nothing at low load for throughput at high load. We never wait on a
timer to fill a batch: the only wait is the one the busy model imposes anyway.

Predict bodies (see :mod:`dmlsys.serving.messages`): ``{"json": <request body>, "max_instances":
n}`` from the HTTP front door (parsed here, in the replica, so parsing scales out with replicas;
the reply carries the ready-made JSON response as ``body``), or ``{"x": float32 array (n, 784)}``
from other nodes (the reply carries ``scores``).

**Bounds.** Every field of a body is checked as it arrives (``_admit``), so a bad one fails only
its own request, never the batch it would have joined; at most ``max_queue`` requests wait for
the batcher, and past that a request is refused at once with ``QueueFull``, which the balancer
answers by trying another replica.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
from typing import Any, Callable

import numpy as np

from dmlsys.node import ADMIN, Service, State, allow, rpc
from dmlsys.serving import instances, messages
from dmlsys.serving.errors import BadInput, ModelLoadError, NotReady, QueueFull, ServingError
from dmlsys.serving.http import HttpLimits, HttpServer, Reply, Request, error_reply, json_reply
from dmlsys.serving.runtime import BUCKETS, Runtime
from dmlsys.wire.sim import to_thread

log = logging.getLogger(__name__)

Loader = Callable[[str, str, "int | None"], Runtime]  # (store, model, version) -> Runtime


@dataclasses.dataclass(frozen=True)
class ReplicaConfig:
    model: str
    store: str
    version: int | None = None  # None: the latest in the store
    max_batch: int = 64
    max_instances: int = 64  # per request; a caller (the door) may ask for a lower limit
    max_queue: int = 1024  # requests waiting for the batcher; past it a request is refused QueueFull
    buckets: tuple[int, ...] = BUCKETS
    http: str | None = None  # HOST:PORT (port 0 picks one) for its own KServe v1 endpoint, once loaded; None: RPC only
    http_limits: HttpLimits = HttpLimits()

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_instances", "max_queue"):
            if type(getattr(self, name)) is not int or getattr(self, name) < 1:
                raise ValueError(f"ReplicaConfig.{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if self.http is not None:
            host, _, port = self.http.rpartition(":")
            if not host or not port.isdigit() or int(port) > 65535:
                raise ValueError(f"ReplicaConfig.http must be HOST:PORT, got {self.http!r}")


def default_loader(buckets=BUCKETS) -> Loader:
    from dmlsys.serving import runtime

    return lambda store, model, version: runtime.load(store, model, version, buckets)


class ModelService(Service):
    """Serves one model. ``offload=True`` runs loading in a thread (real processes); simulated
    tests pass ``offload=False`` and a fast loader, since threads do not mix with virtual time."""

    name = "model"

    def __init__(self, config: ReplicaConfig, *, loader: Loader | None = None, offload: bool = True,
                 fetch: bool = True) -> None:
        self.config = config
        self.loader = loader or default_loader(config.buckets)
        self.offload = offload
        self.fetch = fetch
        self.runtime: Runtime | None = None
        self.phase = "loading"
        self.last_error: str | None = None
        self._queue: collections.deque = collections.deque()
        self._wake: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._loader_task: asyncio.Task | None = None
        self._reload_lock: asyncio.Lock | None = None
        self.batches = 0
        self.requests = 0
        self.instances = 0
        self.max_seen_batch = 0
        self.refused = 0  # requests refused QueueFull
        self._http: HttpServer | None = None
        self.url: str | None = None  # of its own HTTP endpoint, once listening

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self, node) -> None:
        await super().start(node)
        self._wake = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        want = "latest" if self.config.version is None else f"v{self.config.version}"
        self.gate = node.gate("model", f"loading {self.config.model} ({want})")
        node.metrics.gauge("serving_batch_queue", "Predict requests waiting for the model", lambda: len(self._queue))
        node.metrics.gauge("serving_model_version", "Model version this replica answers with",
                           lambda: (self.runtime.version or 0) if self.runtime else 0)
        loop = asyncio.get_running_loop()
        self._worker = loop.create_task(self._batch_loop())
        self._loader_task = loop.create_task(self._initial_load())

    async def _start_http(self, address: str) -> bool:
        """Listen on ``address`` once the model is loaded: a balancer without probes of its own
        (nginx) then meets a refused connection, which it retries elsewhere, rather than a 503
        while the replica loads. A port it cannot take closes the readiness gate, naming it."""
        host, _, port = address.rpartition(":")
        server = HttpServer(self._route, self.config.http_limits, name=f"replica {self.node.name}")
        try:
            await server.start(host, int(port))
        except OSError as e:
            self.last_error = (f"replica {self.node.name!r} cannot listen for HTTP on {address}: {e.strerror}; "
                               "pick another http or stop what holds the port")
            self.gate.close(self.last_error)
            log.error("%s", self.last_error)
            return False
        self._http = server
        self.url = f"http://{host}:{server.port}"
        log.info("replica %s: HTTP on %s", self.node.name, self.url)
        return True

    async def stop(self) -> None:
        if self._http is not None:  # no new requests first; those queued are answered below
            await self._http.stop()
            self._http = None
        for task in (self._loader_task, self._worker):
            if task is not None:
                task.cancel()
        await asyncio.gather(*(t for t in (self._loader_task, self._worker) if t), return_exceptions=True)
        while self._queue:
            _, fut = self._queue.popleft()
            if not fut.done():
                fut.set_exception(NotReady(f"replica {self.node.name} stopped"))

    async def _load(self, version: int | None) -> Runtime:
        if self.fetch:  # on another host than the cluster's store: fetch the version first (serving/fetch.py)
            from dmlsys.serving.fetch import ensure_model

            version = await ensure_model(self.node, self.config.store, self.config.model, version,
                                         on_wait=lambda why: self.gate.close(why))
        args = (self.config.store, self.config.model, version)
        if self.offload:
            return await to_thread(self.loader, *args)  # on the loop under the simulation's clock
        return self.loader(*args)

    async def _initial_load(self) -> None:
        try:
            self.runtime = await self._load(self.config.version)
        except ModelLoadError as e:
            self.phase = "failed"
            self.last_error = str(e)
            self.gate.close(f"load failed: {e}")
            log.error("replica %s: %s", self.node.name, e)
            return
        if self.config.http is not None and not await self._start_http(self.config.http):
            self.phase = "failed"
            return
        self.phase = "ready"
        self.gate.open()
        log.info("replica %s serves %s v%s (loaded and warmed in %.2fs)", self.node.name, self.config.model,
                 self.runtime.version, self.runtime.load_seconds)

    # -- rpcs -----------------------------------------------------------------------------

    @rpc
    async def predict(self, body: Any) -> dict[str, Any]:
        self._check_serving()
        entry = self._admit(body)
        if isinstance(entry, Exception):
            raise entry
        self._wake.set()
        return await entry

    @rpc
    async def predict_many(self, body: Any) -> dict[str, Any]:
        """``{"items": [predict body, ...]}`` -> ``{"results": [reply or {"error", "message"}]}``.

        What the gateway sends when several requests for this replica arrive together: one
        message instead of many (each message costs the gateway, the wire and us as much as a
        small prediction does). Every item succeeds or fails on its own.
        """
        items = body.get("items") if isinstance(body, dict) else None
        if not isinstance(items, list):
            raise BadInput('predict_many takes {"items": [predict bodies]}')
        if len(items) > messages.MAX_ITEMS:
            raise BadInput(f"predict_many takes at most {messages.MAX_ITEMS} items (messages.MAX_ITEMS), "
                           f"got {len(items)}: split them")
        self._check_serving()
        entries = [self._admit(item) for item in items]
        self._wake.set()
        results = []
        try:
            for entry in entries:
                try:
                    if isinstance(entry, Exception):
                        raise entry
                    results.append(await entry)
                except Exception as e:
                    results.append({"error": type(e).__name__, "message": str(e)})
        except asyncio.CancelledError:  # the caller gave up (its deadline): the batcher skips the rest
            for entry in entries:
                if isinstance(entry, asyncio.Future):
                    entry.cancel()
            raise
        return {"results": results}

    def _check_serving(self) -> None:
        if self.runtime is None or self.node.state in (State.DRAINING, State.STOPPED):
            raise NotReady(f"replica {self.node.name} is {self.phase if self.runtime is None else 'draining'}; "
                           "send it elsewhere")

    def _admit(self, body: Any) -> asyncio.Future | ServingError:
        """Check one predict body and queue it for the batcher: its future, or the error that is
        its answer. Every field is checked here, where the request enters, so the batcher meets
        only well-formed requests and one bad field fails only its own request."""
        if len(self._queue) >= self.config.max_queue:
            self.refused += 1
            return QueueFull(f"replica {self.node.name}'s batch queue is full (max_queue={self.config.max_queue} "
                             "requests wait); try another replica or later")
        request = _request(body, self.config.max_instances)
        if isinstance(request, ServingError):
            return request
        fut = asyncio.get_running_loop().create_future()
        self._queue.append((request, fut))
        return fut

    @rpc(allow=ADMIN | allow(roles=("gateway",)))  # rollouts come from the gateway
    async def reload(self, body: Any) -> dict[str, Any]:
        """Load ``{"version": v}`` (None: latest) beside the current one, then swap. Answers
        keep coming from the old version until the swap."""
        version = body.get("version") if isinstance(body, dict) else None
        async with self._reload_lock:
            old = self.runtime
            serving = f"serving v{old.version}" if old else "nothing served yet"
            self.phase = "reloading"
            self.gate.close(f"reloading {self.config.model} to {'latest' if version is None else f'v{version}'} ({serving})")
            try:
                new = await self._load(version)
            except ModelLoadError as e:
                self.last_error = str(e)
                self.phase = "ready" if old else "failed"
                if old:
                    self.gate.open()  # still whole: keep serving the old version
                raise
            self.runtime = new  # the swap: one reference, between batches
            self.phase = "ready"
            self.gate.open()
        log.info("replica %s now serves %s v%s", self.node.name, self.config.model, new.version)
        return {"model": self.config.model, "version": new.version, "previous": old.version if old else None}

    @rpc
    def info(self, body=None) -> dict[str, Any]:
        return self.status()

    def status(self) -> dict[str, Any]:
        rt = self.runtime
        return {
            "model": self.config.model, "version": rt.version if rt else None, "phase": self.phase,
            "serving": rt is not None, "error": self.last_error, "queue": len(self._queue),
            "max_queue": self.config.max_queue, "refused": self.refused,
            "batches": self.batches, "requests": self.requests, "max_batch_seen": self.max_seen_batch,
            "mean_batch": round(self.requests / self.batches, 2) if self.batches else 0.0, "http": self.url,
        }

    # -- its own HTTP endpoint ------------------------------------------------------------
    #
    # The same request path as ``predict`` from the gateway (``_admit``, the batcher, the same
    # reply body), reached without the gateway: what lets another balancer (nginx, say) front
    # the very replicas the gateway does.

    def _route(self, request: Request) -> Reply | Any:
        path = request.path
        if path.startswith("/v1/models/"):
            name = path[len("/v1/models/"):]
            predict = name.endswith(":predict")
            if predict:
                name = name[:-len(":predict")]
            if name != self.config.model:
                return error_reply(404, f"replica {self.node.name} serves {self.config.model!r}, not {name!r}")
            if predict:
                if request.method != "POST":
                    return error_reply(405, f"{path} takes POST", {"Allow": "POST"})
                return self._http_predict(request.body)
            if request.method == "GET":  # ready: 200; loading, reloading or draining: 503
                return json_reply(200 if self.phase == "ready" and self.node.state is State.READY else 503,
                                  self.status())
        return error_reply(404, f"no such resource: {request.method} {path} (POST /v1/models/"
                                f"{self.config.model}:predict, GET /v1/models/{self.config.model})")

    async def _http_predict(self, body: bytes) -> Reply:
        try:
            self._check_serving()
            entry = self._admit({"json": body})
            if isinstance(entry, Exception):
                raise entry
            self._wake.set()
            result = await entry
        except ServingError as e:
            return error_reply(e.status, str(e), {"Retry-After": "1"} if e.status == 503 else None)
        return Reply(200, messages.received(result["body"]), headers={"X-Model-Version": str(result["version"])})

    # -- the batcher ----------------------------------------------------------------------

    async def _batch_loop(self) -> None:
        queue, wake = self._queue, self._wake
        while True:
            if not queue:
                wake.clear()
                await wake.wait()
                # One more turn of the loop: replies to other requests already read from the socket
                # join this batch instead of the next one.
                await asyncio.sleep(0)
            batch = []
            while queue and len(batch) < self.config.max_batch:
                batch.append(queue.popleft())
            try:
                self._run(batch)
            except Exception as e:  # a bug in one batch must not stop the replica
                log.exception("replica %s: batch of %d failed", self.node.name, len(batch))
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)
            await asyncio.sleep(0)  # let the transport read what arrived while we computed

    def _run(self, batch: list) -> None:
        rt = self.runtime  # one version for the whole batch
        good: list[tuple[np.ndarray, bool, asyncio.Future]] = []
        for (data, limit), fut in batch:
            if fut.done():  # the caller gave up
                continue
            if isinstance(data, np.ndarray):
                good.append((data, False, fut))
                continue
            x = instances.parse_one(data, limit)
            if isinstance(x, BadInput):
                fut.set_exception(x)
            else:
                good.append((x, True, fut))
        if not good:
            return
        xs = np.concatenate([x for x, _, _ in good]) if len(good) > 1 else good[0][0]
        scores = rt.predict(xs)
        self.batches += 1
        self.requests += len(good)
        self.max_seen_batch = max(self.max_seen_batch, len(good))
        at = 0
        for x, is_json, fut in good:
            s = scores[at:at + len(x)]
            at += len(x)
            if fut.done():
                continue
            if is_json:
                body = instances.response_body(rt.model, rt.version, s, rt.labels)
                fut.set_result({"version": rt.version, "body": messages.carry(body)})
            else:
                fut.set_result({"version": rt.version, "scores": s})


def _request(body: Any, own_limit: int) -> tuple[bytes | np.ndarray, int] | BadInput:
    """A predict body -> ``(JSON bytes or float32 (n, 784) array, instance limit)``, or BadInput.

    The instance limit is the caller's ``max_instances`` (the door's) or ours, whichever is
    lower, decided once here; the parser checks a JSON body against it, and an array is
    checked now."""
    if not isinstance(body, dict):
        return BadInput(f'a predict body is {{"json": request body bytes, "max_instances": n}} or '
                        f'{{"x": float32 array (n, 784)}}, got {type(body).__name__}')
    limit = body.get("max_instances", own_limit)
    if type(limit) is not int or limit < 1:
        return BadInput(f"max_instances must be an integer >= 1, got {limit!r:.40}")
    limit = min(limit, own_limit)
    if "json" in body:
        data = messages.received(body["json"])
        if data is None:
            return BadInput(f'"json" must be the request body as bytes, got {type(body["json"]).__name__}')
        return data, limit
    if "x" not in body:
        return BadInput('a predict body holds "json" (request body bytes) or "x" (float32 array (n, 784))')
    x = body["x"]
    if not isinstance(x, np.ndarray) or x.dtype.kind != "f" or x.ndim not in (2, 3):
        return BadInput('"x" must be a float array of shape (n, 784) or (n, 28, 28)')
    x = x.reshape(x.shape[0], -1) if x.ndim == 3 else x
    if x.shape[1] != instances.PIXELS or not 1 <= x.shape[0] <= limit:
        return BadInput(f'"x" has shape {x.shape}; expected (n, 784) with 1 <= n <= {limit} (max_instances)')
    return np.asarray(x, np.float32), limit
