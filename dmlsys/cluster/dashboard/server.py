"""The dashboard: a web page served by the supervisor, fed live over server-sent events.

Nothing here keeps its own truth. Once a ``PERIOD`` the dashboard asks what the cluster already
exposes: the supervisor's status document (nodes, states, pids, restarts), each local node's
admin ``/status`` (uptime, in-flight, its services' status: models, shards, tiers, the pool)
and ``/metrics`` (the RPC latency histogram), and a training worker's ``train.progress``. It
turns running totals into rates and quantiles over the last minutes (:mod:`.series`) and sends
the whole picture to every open page as one SSE event.

It is an admin surface, like the nodes' admin ports: it listens where ``cluster.dashboard``
says (loopback unless the spec means otherwise), and its actions are the supervisor's own
admin RPC handlers, run as the supervisor (the process it lives in): ``cluster.scale``,
``cluster.pool_stop`` (drain a group member), the supervisor's rollout (through a gateway, pinned on every one). A browser
page from any other site must not drive them: an action needs a JSON body (a cross-site form
cannot send one without the browser asking first), a ``Host`` that is the dashboard's own
address (DNS rebinding) and, when the browser sends an ``Origin``, that same address.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import ClientError, ClientSession, ClientTimeout, web

from dmlsys.cluster.dashboard.series import Series, histogram_from_text
from dmlsys.cluster.errors import ClusterError
from dmlsys.node import NodeError
from dmlsys.node.admin import is_loopback, serve_http

if TYPE_CHECKING:
    from dmlsys.cluster.supervisor import Supervisor

log = logging.getLogger("dmlsys.dashboard")

STATIC = Path(__file__).with_name("static")
PERIOD = 1.0  # seconds between looks at the nodes
ASK_TIMEOUT = 1.5  # a node that does not answer its admin port within this is shown as it was
MAX_ACTION_BYTES = 4096
SECTIONS = ("shard", "router", "events", "ps", "function")  # roles whose service status has a section
RUNS_DIR = "runs"  # under the state directory: pipeline reports (`pipeline --json .dmlsys/runs/NAME.json`)
MAX_RUN_BYTES = 4 << 20
# Roles whose members hold no state another member needs: drained, they are simply gone. A shard's
# keys and a parameter server's slice must move first, which `scale` does (its group shrinks).
DRAINABLE = ("replica", "function", "worker", "echo")


class Dashboard:
    """``await Dashboard(sup, "127.0.0.1:8080").start()``; ``url``; ``await stop()``."""

    def __init__(self, sup: Supervisor, address: str, *, period: float = PERIOD) -> None:
        host, _, port = address.rpartition(":")
        self.sup = sup
        self.host, self.port = host, int(port)
        self.period = period
        self.series: dict[str, Series] = {}
        self.statuses: dict[str, dict] = {}  # node -> its last /status
        self.training: dict[str, dict] = {}  # worker -> its last train.progress with epochs
        self.runs: dict[str, tuple[float, dict]] = {}  # report file -> (its mtime, the run's timeline)
        self.snapshot: dict[str, Any] = {}
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self._task: asyncio.Task | None = None
        self._http: ClientSession | None = None
        self._closing = False

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        app = web.Application(client_max_size=MAX_ACTION_BYTES)
        app.add_routes([
            web.get("/", self._index),
            web.static("/static", STATIC),
            web.get("/api/state", self._state),
            web.get("/events", self._events),
            web.post("/api/scale", self._scale),
            web.post("/api/rollout", self._rollout),
            web.post("/api/drain", self._drain),
        ])
        self._runner, self.port = await serve_http(app, self.host, self.port, "the dashboard",
                                                   f" (change cluster.dashboard in {self.sup.spec.path})",
                                                   shutdown_timeout=2.0)
        if not is_loopback(self.host):
            log.warning("the dashboard listens on %s, not loopback: whoever reaches it can scale, roll out and "
                        "drain (docs/security.md)", self.url)
        self._http = ClientSession(timeout=ClientTimeout(total=ASK_TIMEOUT))
        self._task = asyncio.get_running_loop().create_task(self._poll())
        log.info("dashboard on %s", self.url)

    async def stop(self) -> None:
        # The event streams first (each wakes and ends: the server's cleanup would otherwise wait
        # for them), the poller (it uses the client session), the session, then the server.
        self._closing = True
        async with self._changed:
            self._changed.notify_all()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._http is not None:
            await self._http.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- gathering ---------------------------------------------------------------------------

    async def _poll(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception:  # the page shows the last good picture; the log says why
                log.exception("dashboard: gathering the cluster's state failed")
            await asyncio.sleep(self.period)

    async def refresh(self) -> None:
        doc = self.sup.status_document()
        # This host's nodes: another host's admin port listens on that host's loopback.
        rows = [r for r in doc["nodes"] if r.get("pid") and r.get("admin") and r["name"] in self.sup.procs]
        await asyncio.gather(*(self._look(r) for r in rows))
        await self._ask_training([r["name"] for r in rows if r["role"] == "worker"])
        self._read_runs()
        live = {r["name"] for r in doc["nodes"]}
        for gone in set(self.series) - live:
            self.series.pop(gone, None)
            self.statuses.pop(gone, None)
        self.snapshot = self.build(doc)
        async with self._changed:
            self._changed.notify_all()

    async def _look(self, row: dict) -> None:
        name, admin = row["name"], row["admin"]
        try:
            async with self._http.get(f"{admin}/status") as r:
                status = await r.json()
            async with self._http.get(f"{admin}/metrics") as r:
                metrics = await r.text()
        except (ClientError, OSError, TimeoutError, ValueError):  # starting, restarting or stuck: its row says so
            return
        self.statuses[name] = status
        bounds, cumulative = histogram_from_text(metrics)
        series = self.series.get(name)
        if series is None or series.bounds != bounds:
            series = self.series[name] = Series(bounds)
        series.add(time.time(), requests=_requests(status), cumulative=cumulative,
                   in_flight=int(status.get("in_flight") or 0))

    async def _ask_training(self, workers: list[str]) -> None:
        for name in workers:
            train = (self.statuses.get(name, {}).get("services") or {}).get("train") or {}
            if train.get("job") is None:
                continue
            try:
                reply = await self.sup.node.call(name, "train", "progress", {"job": None, "since": 0},
                                                 timeout=ASK_TIMEOUT)
            except NodeError:
                continue
            if isinstance(reply, dict) and reply.get("epochs"):
                self.training[name] = reply

    def _read_runs(self, keep: int = 3) -> None:
        """The newest pipeline reports in the state directory's ``runs/`` (what the pipeline's
        ``--json`` writes): each step's start, end, state and cache hit or miss."""
        try:
            files = sorted((self.sup.state_dir / RUNS_DIR).glob("*.json"), key=lambda p: p.stat().st_mtime)[-keep:]
        except OSError:
            files = []
        runs = {}
        for path in files:
            try:
                mtime, size = path.stat().st_mtime, path.stat().st_size
                if path.name in self.runs and self.runs[path.name][0] == mtime:
                    runs[path.name] = self.runs[path.name]
                    continue
                if size > MAX_RUN_BYTES:
                    continue
                doc = json.loads(path.read_text())
            except (OSError, ValueError):
                continue  # being written, or not a report: the next look may read it
            steps = [{k: st.get(k) for k in ("name", "state", "start", "end", "cache", "attempts")}
                     for st in doc.get("steps", []) if isinstance(st, dict)]
            runs[path.name] = (mtime, {"name": path.stem, "finished": mtime, "wall_s": doc.get("wall_s"),
                                       "steps": steps, "hits": doc.get("hits", [])})
        self.runs = runs

    # -- the picture -------------------------------------------------------------------------

    def build(self, doc: dict) -> dict[str, Any]:
        nodes = []
        for row in doc["nodes"]:
            status = self.statuses.get(row["name"], {}) if row.get("pid") else {}
            series = self.series.get(row["name"])
            nodes.append({**{k: row.get(k) for k in ("name", "role", "state", "pid", "restarts", "host", "why", "model")},
                          "group": (g.name if (g := self.sup.spec.group_of(row["name"])) else None),
                          "drainable": bool(g) and row["role"] in DRAINABLE,
                          "uptime_s": status.get("uptime_s"), "in_flight": status.get("in_flight"),
                          "points": series.points() if series is not None and row.get("pid") else []})
        groups = {n.name: {"role": n.role, "replicas": sum(1 for r in doc["nodes"] if self.sup.spec.group_of(r["name"]) is n)}
                  for n in self.sup.spec.nodes if n.replicas is not None}
        models: dict[str, Any] = {}
        for name, status in self.statuses.items():
            serving = (status.get("services") or {}).get("serving") or {}
            for model, m in (serving.get("models") or {}).items():
                models[model] = {**m, "gateway": name}
        sections: dict[str, dict[str, Any]] = {}
        for row in doc["nodes"]:
            if row["role"] in SECTIONS and row["name"] in self.statuses:
                sections.setdefault(row["role"], {})[row["name"]] = self.statuses[row["name"]].get("services") or {}
        training = [{"worker": w, "job": p.get("job"), "model": p.get("model"), "epochs_total": p.get("epochs_total"),
                     "epochs": p.get("epochs", [])} for w, p in sorted(self.training.items())]
        runs = [run for _, run in sorted(self.runs.values(), key=lambda r: r[0], reverse=True)]
        return {"cluster": doc["cluster"], "state": doc["state"], "error": doc.get("error"), "runs": runs,
                "supervisor": doc["supervisor"].get("pid"), "http": doc.get("http"), "updated": time.time(),
                "nodes": nodes, "groups": groups, "models": models, "training": training, "sections": sections}

    # -- HTTP --------------------------------------------------------------------------------

    async def _index(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    async def _state(self, request: web.Request) -> web.Response:
        self._check_host(request)
        return web.json_response(self.snapshot)

    async def _events(self, request: web.Request) -> web.StreamResponse:
        self._check_host(request)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store"})
        await response.prepare(request)
        try:
            while not self._closing:
                if self.snapshot:
                    await response.write(b"data: " + json.dumps(self.snapshot).encode() + b"\n\n")
                async with self._changed:
                    await self._changed.wait()
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        return response

    def _check_host(self, request: web.Request) -> None:
        ours = {f"{self.host}:{self.port}", f"localhost:{self.port}", f"127.0.0.1:{self.port}", f"[::1]:{self.port}"}
        if request.host not in ours:
            raise web.HTTPMisdirectedRequest(text=f"this dashboard answers to {self.url}, not {request.host!r}")

    async def _action(self, request: web.Request, fields: dict[str, type]) -> dict:
        self._check_host(request)
        origin = request.headers.get("Origin")
        if origin is not None and origin not in (f"http://{request.host}",):
            raise web.HTTPForbidden(text=f"an action from another origin ({origin}) is refused")
        if request.content_type != "application/json":
            raise web.HTTPUnsupportedMediaType(text="an action takes a JSON body (Content-Type: application/json)")
        try:
            body = await request.json()
        except ValueError:
            raise web.HTTPBadRequest(text="the body is not JSON") from None
        if not isinstance(body, dict):
            raise web.HTTPBadRequest(text="the body must be a JSON object")
        for key, kind in fields.items():
            if key in body and body[key] is not None and not isinstance(body[key], kind):
                raise web.HTTPBadRequest(text=f"{key}: expected {kind.__name__}, got {body[key]!r}")
        return body

    async def _run(self, what: str, coro) -> web.Response:
        try:
            result = await coro
        except (ValueError, KeyError, NodeError, ClusterError) as e:
            log.warning("dashboard: %s failed: %s", what, e)
            return web.json_response({"ok": False, "error": str(e)}, status=409)
        log.info("dashboard: %s", what)
        return web.json_response({"ok": True, "result": result})

    async def _scale(self, request: web.Request) -> web.Response:
        from dmlsys.cluster.supervisor import ClusterService

        body = await self._action(request, {"group": str, "replicas": int})
        if not isinstance(body.get("group"), str) or not isinstance(body.get("replicas"), int):
            raise web.HTTPBadRequest(text='scale takes {"group": name, "replicas": n}')
        return await self._run(f"scale {body['group']} to {body['replicas']}",
                               ClusterService(self.sup).scale({"group": body["group"], "replicas": body["replicas"]}))

    async def _drain(self, request: web.Request) -> web.Response:
        from dmlsys.cluster.supervisor import ClusterService

        body = await self._action(request, {"name": str})
        if not isinstance(body.get("name"), str):
            raise web.HTTPBadRequest(text='drain takes {"name": node}')
        role = next((n["role"] for n in self.snapshot.get("nodes", []) if n["name"] == body["name"]), None)
        if role is not None and role not in DRAINABLE:
            return web.json_response({"ok": False, "error": f"{body['name']} is a {role}: its state must move first; "
                                      f"scale its group down instead"}, status=409)
        return await self._run(f"drain {body['name']}", ClusterService(self.sup).pool_stop({"name": body["name"]}))

    async def _rollout(self, request: web.Request) -> web.Response:
        body = await self._action(request, {"model": str, "version": int})
        if not isinstance(body.get("model"), str):
            raise web.HTTPBadRequest(text='rollout takes {"model": name, "version": n or null}')
        gateway = next((n["name"] for n in self.snapshot.get("nodes", []) if n["role"] == "gateway" and n.get("pid")), None)
        if gateway is None:
            return web.json_response({"ok": False, "error": "no running gateway to roll out through"}, status=409)
        call = self.sup.rollout(body["model"], body.get("version"))  # every gateway follows its pin
        return await self._run(f"roll out {body['model']} v{body.get('version') or 'latest'}", call)


def _requests(status: dict) -> float:
    """The node's running total of requests: what its service counts (a gateway's and a
    replica's ``requests``), else the messages it received."""
    for service in (status.get("services") or {}).values():
        if isinstance(service, dict) and isinstance(service.get("requests"), int):
            return float(service["requests"])
    return float((status.get("metrics") or {}).get("messages_in") or 0)
