"""The ``events`` node: the gate, the function pool and its autoscaler, behind an HTTP door.

One node hosts the whole event path of issue 11::

    POST /v1/functions/{name}:invoke   {"instances": [...]}    (Authorization: Bearer KEY, optional)
      -> EventGate: identify (401), admit now / wait in the tier's queue / refuse (429 + Retry-After)
      -> FunctionPool.invoke: on a ready instance of the function, or wait for its cold start
      -> {"function", "model", "version", "predictions", ...}

    GET  /v1/functions                 the pool: instances per function and state, slots, cold starts
    GET  /healthz                      200 once the node is up

RPCs (service ``events``): ``deploy {"model", "name"?, "min", "max", "target", "priority"}`` and
``status`` (the CLI's, ADMIN only), ``invoke {"function", "body"}`` (any member: the serving
gateway's hook, see docs/events.md). The gateway of ``dmlsys.serving`` does not call the gate
yet; the hook it needs is written out in docs/events.md.

``/metrics`` (the node's admin port) gains per function ``dmlsys_events_instances{state}``,
``dmlsys_events_in_flight``, ``dmlsys_events_waiting``, ``dmlsys_events_cold_start_seconds``
(median), the pool's ``dmlsys_events_slots_used``/``dmlsys_events_slots``, and per tier the gate's
``dmlsys_events_tier_running``/``_waiting`` and ``dmlsys_events_refused_total{reason}``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dmlsys.events.autoscaler import (
    Autoscaler,
    FunctionSpec,
    ScalingConfig,
    ScalingError,
)
from dmlsys.events.errors import EventsError
from dmlsys.events.functions import FunctionPool, FunctionUnavailable
from dmlsys.events.gate import EventGate
from dmlsys.events.keys import KeyFile
from dmlsys.events.launcher import SupervisorLauncher
from dmlsys.events.pool import Pool
from dmlsys.events.tiers import Tier
from dmlsys.node import ADMIN, RemoteError, Service, rpc
from dmlsys.node.admin import serve_http

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Deployment:
    """A function: a model of the store served by autoscaled instances."""

    name: str
    model: str
    version: int | None = None
    min: int = 0
    max: int = 4
    target: float = 1.0  # events in flight per instance the autoscaler aims at
    priority: int = 0

    def spec(self) -> FunctionSpec:
        return FunctionSpec(self.name, target=self.target, min=self.min, max=self.max, priority=self.priority)


@dataclasses.dataclass(frozen=True)
class EventsConfig:
    http: str | None = "127.0.0.1:0"
    slots: int = 4
    group: str = "function"
    spares: int = 1
    functions: tuple[Deployment, ...] = ()
    tiers: Mapping[str, Tier] | None = None  # None: the course's (tiers.DEFAULT_TIERS)
    keys: str | None = None
    deadline: float = 30.0
    tick: float = 1.0
    try_timeout: float = 10.0
    scaling: ScalingConfig = dataclasses.field(default_factory=ScalingConfig)
    max_body_bytes: int = 4 << 20


class EventsService(Service):
    """See the module docstring."""

    name = "events"

    def __init__(self, config: EventsConfig, *, launcher=None) -> None:
        from dmlsys.events.tiers import DEFAULT_TIERS

        self.config = config
        self.deployments: dict[str, Deployment] = {}
        self.models: dict[str, tuple[str, int | None]] = {}
        # Retry-After for a full queue measures its drain over the autoscaler's panic window: the
        # time scale on which the pool behind it changes capacity
        self.gate = EventGate(config.tiers or DEFAULT_TIERS, KeyFile(config.keys) if config.keys else None,
                              drain_window=config.scaling.panic_window)
        self._launcher = launcher
        self.url: str | None = None
        self._runner = None
        self.answered = 0
        self.failed = 0

    async def start(self, node) -> None:
        await super().start(node)
        cfg = self.config
        self.pool = Pool(cfg.slots, [])
        self.scaler = Autoscaler(cfg.slots, [], cfg.scaling)
        if self._launcher is None:
            self._launcher = SupervisorLauncher(node, cfg.group, self.models, spares=cfg.spares)
        self.functions = FunctionPool(node, self.pool, self.scaler, self._launcher, tick=cfg.tick,
                                      try_timeout=cfg.try_timeout, service="function", method="invoke")
        if hasattr(self._launcher, "on_died"):
            self._launcher.on_died = self.functions.instance_died
        for d in cfg.functions:
            self.deploy_function(d)
        await self.functions.start()
        if hasattr(self._launcher, "start_spares"):
            await self._launcher.start_spares()
        node.metrics.registry.register(_Collector(self))
        if cfg.http is not None:
            await self._start_http()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self.functions.stop()
        if hasattr(self._launcher, "close"):
            await self._launcher.close()

    # -- deploy -----------------------------------------------------------------------------

    def deploy_function(self, d: Deployment) -> dict[str, Any]:
        """Add (or re-scale) a function. Raises ScalingError when its min does not fit the pool."""
        spec = d.spec()
        if d.name in self.deployments:
            old = self.deployments[d.name]
            if (old.model, old.version) != (d.model, d.version):
                raise ScalingError(f"function {d.name!r} already serves {old.model!r}; deploy under another name")
        self.scaler.add(spec)
        self.pool.add(spec)
        self.deployments[d.name] = d
        self.models[d.name] = (d.model, d.version)
        log.info("deployed function %s: model %s, %d..%d instances", d.name, d.model, d.min, d.max)
        return dataclasses.asdict(d)

    @rpc(allow=ADMIN)
    def deploy(self, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            raise TypeError('deploy takes {"model": name, "name"?, "min"?, "max"?, "target"?, "priority"?}')
        fields = {k: body[k] for k in ("min", "max", "target", "priority", "version") if body.get(k) is not None}
        out = self.deploy_function(Deployment(str(body.get("name") or body["model"]), body["model"], **fields))
        self.functions.kick()  # reach its min now
        return out

    @rpc(allow=ADMIN)
    def status(self, body=None) -> dict[str, Any]:  # doubles as Service.status: the node's /status
        return self.statistics()

    @rpc
    async def invoke(self, body: Any) -> Any:
        """``{"function", "body", "timeout"?}``: one event that passed another door's gate."""
        loop = asyncio.get_running_loop()
        timeout = min(float(body.get("timeout") or self.config.deadline), self.config.deadline)
        return await self.functions.invoke(str(body["function"]), body["body"], deadline=loop.time() + timeout)

    def statistics(self) -> dict[str, Any]:
        fp = self.functions.statistics()
        return {"url": self.url, "functions": {n: dataclasses.asdict(d) for n, d in self.deployments.items()},
                "pool": fp, "autoscaler": self.scaler.statistics(), "gate": self.gate.statistics(),
                "spares": len(getattr(self._launcher, "idle", ())), "answered": self.answered, "failed": self.failed,
                "load_seconds": list(getattr(self._launcher, "load_seconds", ()))[-20:],
                "timeline": [{"t": round(t, 3), "instances": v} for t, v in list(self.functions.timeline)[-60:]]}

    # -- HTTP -------------------------------------------------------------------------------

    async def _start_http(self) -> None:
        from aiohttp import web

        app = web.Application(client_max_size=self.config.max_body_bytes)
        app.router.add_post("/v1/functions/{name}:invoke", self._http_invoke)
        app.router.add_post("/v1/models/{name}:predict", self._http_invoke)  # the KServe v1 spelling
        app.router.add_get("/v1/functions", self._http_functions)
        app.router.add_get("/healthz", lambda r: web.json_response({"ok": True}))
        host, _, port = self.config.http.rpartition(":")
        self._runner, bound = await serve_http(app, host, int(port), f"the HTTP door of events node {self.node.name!r}",
                                               backlog=1024)
        self.url = f"http://{host}:{bound}"
        log.info("events %s: HTTP door on %s", self.node.name, self.url)

    async def _http_functions(self, request):
        from aiohttp import web

        return web.json_response(self.statistics())

    async def _http_invoke(self, request):
        from aiohttp import web

        name = request.match_info["name"]
        try:
            principal = self.gate.identify(request.headers.get("Authorization"), request.remote)
            async with self.gate.admission(principal):  # before the body: a refusal costs no parsing
                try:
                    body = await request.json()
                except ValueError:  # aiohttp's JSONDecodeError and a bad encoding alike
                    return web.json_response({"error": "the body must be JSON: {\"instances\": [...]}"}, status=400)
                if not isinstance(body, dict) or "instances" not in body:
                    return web.json_response({"error": 'the body must be {"instances": [...]}'}, status=400)
                loop = asyncio.get_running_loop()
                result = await self.functions.invoke(name, body, deadline=loop.time() + self.config.deadline)
            self.answered += 1
            return web.json_response({"function": name, **result})
        except EventsError as e:
            if isinstance(e, FunctionUnavailable):
                self.failed += 1
            headers = {"Retry-After": str(e.retry_after)} if e.retry_after else {}
            return web.json_response({"error": str(e)}, status=e.status, headers=headers)
        except RemoteError as e:  # the function refused the input
            self.failed += 1
            return web.json_response({"error": e.message}, status=400)


class _Collector:
    """Prometheus families for the node's /metrics, read from the service at scrape time."""

    def __init__(self, svc: EventsService) -> None:
        self.svc = svc

    def describe(self):
        return []

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        svc, node = self.svc, self.svc.node.name
        fp = svc.functions.statistics()
        inst = GaugeMetricFamily("dmlsys_events_instances", "Function instances by state", labels=["node", "function", "state"])
        for f, states in fp["instances"].items():
            for state, n in states.items():
                inst.add_metric([node, f, state], n)
        yield inst
        for key, help in (("in_flight", "Events running on instances"), ("waiting", "Events waiting for an instance")):
            fam = GaugeMetricFamily(f"dmlsys_events_{key}", help, labels=["node", "function"])
            for f in svc.deployments:
                fam.add_metric([node, f], fp[key].get(f, 0))
            yield fam
        cold = GaugeMetricFamily("dmlsys_events_cold_start_seconds", "Median cold start (scaling decision to ready)",
                                 labels=["node", "function"])
        for f, v in fp["cold_start_median_s"].items():
            if v is not None:
                cold.add_metric([node, f], v)
        yield cold
        for key, value in (("slots_used", fp["slots_used"]), ("slots", fp["slots"])):
            fam = GaugeMetricFamily(f"dmlsys_events_{key}", f"Pool {key.replace('_', ' ')}", labels=["node"])
            fam.add_metric([node], value)
            yield fam
        g = svc.gate.statistics()
        for key in ("running", "waiting"):
            fam = GaugeMetricFamily(f"dmlsys_events_tier_{key}", f"Events {key} per tier", labels=["node", "tier"])
            for tier, n in g[key].items():
                fam.add_metric([node, tier], n)
            yield fam
        refused = CounterMetricFamily("dmlsys_events_refused", "Events refused by the gate", labels=["node", "reason"])
        for reason, n in g["refused"].items():
            refused.add_metric([node, str(reason)], n)
        yield refused


def keys_path(state_dir: Path) -> Path:
    """Where a cluster's API keys live: ``keys add`` writes there, the events node reads there."""
    return Path(state_dir) / "keys" / "api-keys.json"
