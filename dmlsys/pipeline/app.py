"""The end-to-end pipeline as a shipped workflow: ingest -> train x3 -> select -> serve -> aggregate.

::

    ingest ──┬── train_mlp_small ──┐
             ├── train_mlp_wide  ──┼─(AsCompleted, k=1)── select ─(Latest)── serve ── aggregate
             ├── train_cnn ────────┘                                                   │
             └─────────────────────────────────────────────────────────────────────────┘

* **ingest** loads Fashion-MNIST (``dmlsys.train.data``), sliced by ``limit``/``test_limit``.
  Memoized with ``DEFAULT + Probe(file_stamp(data files))``: a rerun with unchanged files is a
  cache hit; touching a file (new size or mtime) makes it a miss.
* **train_<name>**, one per ``ModelSpec``, run at once in the scheduler's threads (JAX releases
  the GIL while it computes, so they overlap). Memoized by ``DEFAULT``: code version, params
  (normalised arch + every hyperparameter) and the fingerprint of the ingested data. So changing
  one model's hyperparameters retrains that model only. Each saves a version to the
  ``ModelStore`` and returns its card fields *and* its parameters, so a cached result can
  republish the model if the store no longer holds it (a cache outliving a store).
* **select** has an asynchronous edge over the train steps: it runs as soon as the first model
  is trained, then reruns on each arrival, and picks the best ``top`` (two) by test accuracy
  (``select_top``, pure) among those trained so far.
* **serve** follows select's results as they come (a ``Latest`` edge): it serves the first model
  at once, then the best two when the second arrives, while the slowest training keeps running.
  Not memoized: putting models up is its whole point.
* **aggregate** sends the test set through the served models (balancer -> replica over ZeroMQ)
  and averages their scores: each model's accuracy, the ensemble's, and how often they agree.

``run_pipeline(PipelineConfig(...)) -> PipelineResult`` runs it (``run_pipeline_async`` inside a
running loop). CLI: ``python -m dmlsys.cluster pipeline --help`` (or ``python -m dmlsys.pipeline``);
see docs/workflow.md.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from dmlsys.assembly import Transports
from dmlsys.wire.sim import to_thread
from dmlsys.workflow import (CONTINUE, DEFAULT, AsCompleted, Latest, MemoStore, Probe, RunConfig, RunReport, Scheduler,
                             Step, Workflow, WorkflowError, file_stamp)

from .fleet import FLEETS, ServeError
from .workers import WorkerGroups

__all__ = ["ModelSpec", "PipelineConfig", "PipelineError", "PipelineResult", "DEFAULT_MODELS", "ServeError",
           "apply_overrides", "build_workflow", "run_pipeline", "run_pipeline_async", "select_top"]

# Bump a step's version when what it computes changes in a way its params do not show.
INGEST_VERSION, TRAIN_VERSION = "1", "1"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class PipelineError(WorkflowError):
    """A pipeline configuration is invalid; the message names the model and field."""


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One model to train: ``name`` (step ``train_<name>``), an arch dict for
    ``dmlsys.train.models.build``, and ``Hyperparams`` fields (the rest take their defaults)."""

    name: str
    arch: Mapping[str, Any]
    hyperparams: Mapping[str, Any] = dataclasses.field(default_factory=dict)


DEFAULT_MODELS: tuple[ModelSpec, ...] = (
    ModelSpec("mlp_small", {"kind": "mlp", "hidden": [128]}, {"lr": 2e-3, "batch_size": 128}),
    ModelSpec("mlp_wide", {"kind": "mlp", "hidden": [512, 256]}, {"lr": 1e-3, "batch_size": 64}),
    ModelSpec("cnn", {"kind": "cnn", "channels": [16, 32], "dense": 64}, {"lr": 1e-3, "batch_size": 64}),
)


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    models: tuple[ModelSpec, ...] = DEFAULT_MODELS
    limit: int | None = None  # first N training samples (None: all 60,000)
    test_limit: int | None = None  # first M test samples (None: all 10,000)
    epochs: int = 2  # for every model whose hyperparams do not set epochs
    top: int = 2  # models served at the end (the best by test accuracy)
    data_dir: str | None = None  # None: $DMLSYS_DATA, the Debian package, ~/.cache/dmlsys
    store: str = ".dmlsys/models"
    cache_root: str = ".dmlsys/cache"
    concurrency: int = 4  # steps at once: 3 trainings + serve
    serve: str = "nodes"  # "nodes": replica + gateway nodes on ZeroMQ; "local": in-process fallback
    replicas: int = 1  # replica nodes per served model
    trainer: str = "threads"  # "threads": in this process; "workers": the collective trainer on worker nodes
    workers: int = 2  # with trainer="workers": data-parallel ranks per model
    model_prefix: str = "pipeline-"  # store name of a model: prefix + spec name
    progress: bool | None = None  # live table; None: when stdout is a terminal

    def validate(self) -> None:
        """Raises PipelineError naming the field; arch and hyperparams are checked by
        ``dmlsys.train`` itself (``normalized_models``)."""
        names = [m.name for m in self.models]
        if not names:
            raise PipelineError("the pipeline needs at least one model")
        for n in names:
            if not _NAME.match(n):
                raise PipelineError(f"model name {n!r}: use letters, digits, '_', '.', '-' (at most 64)")
        if len(set(names)) != len(names):
            raise PipelineError(f"model names must be unique, got {names}")
        for field, low in (("limit", 1), ("test_limit", 1)):
            v = getattr(self, field)
            if v is not None and v < low:
                raise PipelineError(f"{field} must be >= {low} or None, got {v}")
        if not 1 <= self.top <= len(names):
            raise PipelineError(f"top={self.top} must be between 1 and the number of models ({len(names)})")
        if self.epochs < 1 or self.concurrency < 1 or self.replicas < 1:
            raise PipelineError("epochs, concurrency and replicas must be >= 1")
        if self.serve not in FLEETS:
            raise PipelineError(f"serve={self.serve!r}; use one of {sorted(FLEETS)}")
        if self.trainer not in ("threads", "workers") or self.workers < 1:
            raise PipelineError(f"trainer={self.trainer!r} (use 'threads' or 'workers') with workers >= 1, "
                                f"got workers={self.workers}")

    def normalized_models(self) -> list[dict[str, Any]]:
        """Each model as ``{"name", "arch", "hyperparams"}`` with every field filled in, so that
        spelling out a default does not change a cache key. Raises PipelineError."""
        from dmlsys.train.errors import TrainError
        from dmlsys.train.models import normalize
        from dmlsys.train.trainer import Hyperparams

        out = []
        for m in self.models:
            try:
                arch = normalize(dict(m.arch))
                hp = dataclasses.asdict(Hyperparams(**{"epochs": self.epochs, **dict(m.hyperparams)}))
            except (TrainError, TypeError) as e:
                raise PipelineError(f"model {m.name!r}: {e}") from None
            out.append({"name": m.name, "arch": arch, "hyperparams": hp})
        return out


def apply_overrides(models: Sequence[ModelSpec], overrides: Sequence[str]) -> tuple[ModelSpec, ...]:
    """``["cnn.lr=0.002", "mlp_small.hidden=[64]"]`` -> models with those fields changed (pure).

    A key that is an architecture field of the model's kind (``hidden``, ``channels``,
    ``dense``) changes the arch; anything else is a hyperparameter (checked when the pipeline
    builds). Values are JSON (``0.002``, ``[64, 32]``, ``true``) or else a bare string."""
    by_name = {m.name: m for m in models}
    for text in overrides:
        target, eq, raw = text.partition("=")
        name, dot, key = target.strip().partition(".")
        if not (eq and dot and key):
            raise PipelineError(f"override {text!r}: write MODEL.KEY=VALUE, e.g. cnn.lr=0.002")
        if name not in by_name:
            raise PipelineError(f"override {text!r}: no model {name!r}; models: {', '.join(by_name)}")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw.strip()
        m = by_name[name]
        if key in ("hidden", "channels", "dense"):
            m = dataclasses.replace(m, arch={**m.arch, key: value})
        else:
            m = dataclasses.replace(m, hyperparams={**m.hyperparams, key: value})
        by_name[name] = m
    return tuple(by_name[m.name] for m in models)


def select_top(trained: Mapping[str, Mapping[str, Any]], k: int) -> list[str]:
    """The names of the ``k`` best results by ``test_accuracy``, best first (pure).

    ``trained`` is in arrival order (as an ``AsCompleted`` edge delivers it); ties go to the
    model that finished first, so a later equal model does not displace one already served."""
    order = {name: i for i, name in enumerate(trained)}
    ranked = sorted(trained, key=lambda n: (-float(trained[n]["test_accuracy"]), order[n]))
    return ranked[:k]


def _probe_data(params: Mapping[str, Any]) -> Any:
    """Content probe of ingest: size and mtime of every file in the data directory."""
    return file_stamp(params["data_dir"])


class _Steps:
    """The step functions, bound to one run's store path and serving fleet."""

    def __init__(self, config: PipelineConfig, fleet: Any, workers: "WorkerGroups | None" = None) -> None:
        self.config = config
        self.fleet = fleet
        self.workers = workers
        self.t0 = time.perf_counter()
        self.timeline: list[dict[str, Any]] = []
        self._published: dict[tuple[str, str], int] = {}  # (model, params_sha) -> version republished

    def ingest(self, data_dir: str, limit: int | None, test_limit: int | None) -> dict[str, Any]:
        from dmlsys.train.data import load

        ds = load(data_dir, limit=limit, test_limit=test_limit)
        return {**ds.arrays(), "source": ds.source, "fingerprint": ds.fingerprint}

    async def train(self, data: Mapping[str, Any], name: str, arch: dict, hyperparams: dict) -> dict[str, Any]:
        """One model, in this process; the trainer computes its steps in threads (on the loop
        itself when the pipeline runs on the simulated network's clock)."""
        from dmlsys.train.data import Dataset
        from dmlsys.train.store import ModelStore
        from dmlsys.train.trainer import Hyperparams, Trainer

        ds = Dataset(data["train_images"], data["train_labels"], data["test_images"], data["test_labels"],
                     source=data["source"], fingerprint=data["fingerprint"])
        t = time.perf_counter()
        trainer = Trainer(arch, Hyperparams(**hyperparams), store=ModelStore(self.config.store), progress=False)
        res = await trainer.fit(ds, None, model_name=self.config.model_prefix + name)
        return {"name": name, "model": res.card["name"], "version": res.version,
                "test_accuracy": float(res.test_accuracy), "test_loss": float(res.card["test_loss"]),
                "train_seconds": time.perf_counter() - t, "params_sha": res.card["params_sha"],
                "arch": arch, "hyperparams": hyperparams, "data_fingerprint": ds.fingerprint, "params": res.params}

    async def train_on_workers(self, data: Mapping[str, Any], name: str, arch: dict,
                               hyperparams: dict) -> dict[str, Any]:
        """``train``, data-parallel on this model's worker nodes (ring allreduce between them).
        The workers read the same files with the same limits; the fingerprint proves it."""
        from dmlsys.train.store import ModelStore

        assert self.workers is not None
        t = time.perf_counter()
        model = self.config.model_prefix + name
        r = await self.workers.train(name, model=model, arch=arch, hyperparams=hyperparams,
                                     limit=self.config.limit, test_limit=self.config.test_limit)
        if r["data_fingerprint"] != data["fingerprint"]:
            raise PipelineError(f"train_{name}: the workers read other data ({r['data_fingerprint']}) than ingest "
                                f"({data['fingerprint']}): is {data['source']} the same on every worker?")
        params, card = await to_thread(ModelStore(self.config.store).load, model, r["version"])
        return {"name": name, "model": model, "version": r["version"], "test_accuracy": float(r["test_accuracy"]),
                "test_loss": float(r["test_loss"]), "train_seconds": time.perf_counter() - t,
                "params_sha": card["params_sha"], "arch": arch, "hyperparams": hyperparams,
                "data_fingerprint": r["data_fingerprint"], "params": params, "workers": r["workers"]}

    def _publish(self, r: Mapping[str, Any]) -> int:
        """The store version holding ``r``'s params: its own, or a new one if the store lost it."""
        from dmlsys.train.errors import ModelNotFound
        from dmlsys.train.store import ModelStore

        store = ModelStore(self.config.store)
        try:
            if store.card(r["model"], r["version"]).get("params_sha") == r["params_sha"]:
                return int(r["version"])
        except ModelNotFound:
            pass
        key = (r["model"], r["params_sha"])
        if key not in self._published:
            card = {k: r[k] for k in ("arch", "hyperparams", "test_accuracy", "test_loss", "data_fingerprint")}
            self._published[key] = store.save(r["model"], r["params"], {**card, "republished_from": r["version"]})
        return self._published[key]

    @staticmethod
    def select(trained: dict[str, dict[str, Any]], top: int) -> dict[str, Any]:
        # ``trained`` is keyed by step (train_<name>), in the order the trainings finished.
        return {"chosen": [trained[step] for step in select_top(trained, top)],
                "arrived": [r["name"] for r in trained.values()]}

    async def serve(self, selected: Mapping[str, Any]) -> dict[str, Any]:
        chosen = selected["chosen"]
        versions = [await to_thread(self._publish, r) for r in chosen]
        await self.fleet.ensure({r["model"]: v for r, v in zip(chosen, versions)})
        serving = [{"name": r["name"], "model": r["model"], "version": v, "test_accuracy": r["test_accuracy"]}
                   for r, v in zip(chosen, versions)]
        arrived = list(selected["arrived"])
        self.timeline.append({"t": time.perf_counter() - self.t0, "arrived": arrived,
                              "serving": [s["name"] for s in serving]})
        return {"serving": serving, "arrived": arrived, "url": self.fleet.url}

    async def aggregate(self, served: Mapping[str, Any], data: Mapping[str, Any]) -> dict[str, Any]:
        x = np.asarray(data["test_images"], np.float32) * np.float32(1 / 255)  # as the trainer scales
        y = np.asarray(data["test_labels"], np.int64)
        members = served["serving"]
        answers = await asyncio.gather(*(self.fleet.predict(m["model"], x) for m in members))
        scores: dict[str, np.ndarray] = {}
        for m, (s, versions) in zip(members, answers):
            if versions != {m["version"]}:
                raise ServeError(f"{m['model']}: answered by versions {sorted(versions)}, expected v{m['version']}")
            scores[m["name"]] = s
        mean = np.mean(list(scores.values()), axis=0)
        preds = {n: s.argmax(-1) for n, s in scores.items()}
        ensemble = mean.argmax(-1)
        first = preds[members[0]["name"]]
        out = {"n": int(len(y)), "ensemble_accuracy": float((ensemble == y).mean()),
               "accuracy": {n: float((p == y).mean()) for n, p in preds.items()},
               # share of test images on which every served model predicts the same class
               "agreement": float(np.mean(np.all([p == first for p in preds.values()], axis=0))),
               "predictions": preds, "ensemble_predictions": ensemble, "http": None}
        if self.fleet.url is not None:
            out["http"] = await _http_check(self.fleet.url, members[0]["model"], x[:8], first[:8])
        return out


async def _http_check(url: str, model: str, x: np.ndarray, expected: np.ndarray) -> dict[str, Any]:
    """A few instances through the gateway's HTTP front door (KServe v1 JSON): same classes?"""
    import aiohttp

    body = json.dumps({"instances": x.reshape(len(x), -1).tolist()})
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{url}/v1/models/{model}:predict", data=body) as r:
            doc = await r.json()
            if r.status != 200:
                raise ServeError(f"HTTP front door {url} answered {r.status} for {model}: {doc.get('error')}")
    got = [p["class"] for p in doc["predictions"]]
    return {"url": url, "instances": len(got), "same_classes": int(np.sum(np.asarray(got) == expected))}


def build_workflow(config: PipelineConfig, steps: _Steps, data_dir: str) -> Workflow:
    """The pipeline's DAG (see the module docstring)."""
    wf = Workflow("pipeline")
    wf.add(Step("ingest", steps.ingest,
                params={"data_dir": data_dir, "limit": config.limit, "test_limit": config.test_limit},
                version=INGEST_VERSION, cache=DEFAULT + Probe(_probe_data, "data files")))
    trains = []
    train = steps.train if config.trainer == "threads" else steps.train_on_workers
    for m in config.normalized_models():
        trains.append(f"train_{m['name']}")
        version = TRAIN_VERSION if config.trainer == "threads" else f"{TRAIN_VERSION}-workers"
        wf.add(Step(trains[-1], train, {"data": "ingest"}, params=m, version=version, cache=DEFAULT))
    wf.add(Step("select", steps.select, {"trained": AsCompleted(*trains, k=1)}, params={"top": config.top},
                inline=True))
    wf.add(Step("serve", steps.serve, {"selected": Latest("select")}))
    wf.add(Step("aggregate", steps.aggregate, {"served": "serve", "data": "ingest"}))
    return wf


@dataclasses.dataclass
class PipelineResult:
    """What a run did (``report``: every step's state, time, cache hit or miss) and found."""

    config: PipelineConfig
    report: RunReport
    wall: float  # seconds, including starting and stopping the serving fleet
    models: dict[str, dict[str, Any]]  # spec name -> version, test accuracy, train seconds
    serving: list[dict[str, Any]]  # the final top models
    timeline: list[dict[str, Any]]  # each serve run: when, what had arrived, what it served
    ensemble: dict[str, Any]  # aggregate's result (arrays included)

    def ran(self) -> list[str]:
        return self.report.ran()

    def hits(self) -> list[str]:
        return self.report.hits()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: arrays and parameters left out."""
        ens = {k: v for k, v in self.ensemble.items() if k not in ("predictions", "ensemble_predictions")}
        return {"wall_s": self.wall, "ran": self.ran(), "hits": self.hits(), "models": self.models,
                "serving": self.serving, "timeline": self.timeline, "ensemble": ens,
                "steps": self.report.to_dict()["steps"]}

    def table(self) -> Any:
        from rich.table import Table

        served = {s["name"] for s in self.serving}
        t = Table(title=f"pipeline: {self.wall:.1f}s, ensemble of {len(served)} on {self.ensemble['n']} test "
                        f"images: accuracy {self.ensemble['ensemble_accuracy']:.4f}")
        for col in ("model", "arch", "version", "train", "test acc", "served acc"):
            t.add_column(col, justify="right" if col in ("version", "test acc", "served acc") else "left")
        for name, m in self.models.items():
            t.add_row(name, _arch_text(m["arch"]), str(m["version"]), m["train"], f"{m['test_accuracy']:.4f}",
                      f"{self.ensemble['accuracy'][name]:.4f}" if name in served else "")
        return t


def _arch_text(arch: Mapping[str, Any]) -> str:
    """``mlp(512,256)``, ``cnn(16,32;dense=64)``: one short cell."""
    if arch["kind"] == "mlp":
        return f"mlp({','.join(map(str, arch['hidden']))})"
    return f"cnn({','.join(map(str, arch['channels']))};dense={arch['dense']})"


async def run_pipeline_async(config: PipelineConfig = PipelineConfig(), *,
                             transports: Transports | None = None) -> PipelineResult:
    """Run the pipeline on the running loop. Raises PipelineError for a bad config, and
    ``WorkflowFailed`` (``.errors`` per step, ``.result`` partial) at the end when a step failed:
    the other models still train, are cached and served. Nothing is left serving either way.

    ``transports``: where the serving fleet's and worker groups' nodes talk (default ZeroMQ on
    loopback); ``SimTransports(net)`` under ``dmlsys.wire.sim.run`` runs them on virtual time."""
    from dmlsys.train.data import find_data_dir

    config.validate()
    data_dir = str(Path(config.data_dir).expanduser() if config.data_dir else find_data_dir())
    fleet = FLEETS[config.serve](config.store, replicas=config.replicas, transports=transports)
    workers = (WorkerGroups(config.store, data_dir, config.workers, transports=transports)
               if config.trainer == "workers" else None)
    steps = _Steps(config, fleet, workers)
    wf = build_workflow(config, steps, data_dir)
    t = time.perf_counter()
    with MemoStore(config.cache_root) as memo:
        await fleet.start()
        try:
            if workers is not None:
                await workers.start([m.name for m in config.models])
            steps.t0 = time.perf_counter()
            # "continue": a model that fails to train does not cancel the others; they are served
            # (the async edge needs one success) and cached, and WorkflowFailed comes at the end.
            result = await Scheduler(RunConfig(concurrency=config.concurrency, on_failure=CONTINUE,
                                               progress=config.progress), store=memo).run(wf)
        finally:
            if workers is not None:
                await workers.stop()
            await fleet.stop()
    wall = time.perf_counter() - t
    served_versions = {s["name"]: s["version"] for s in result["serve"]["serving"]}  # republished ones differ
    models = {}
    for m in config.models:
        r, rec = result[f"train_{m.name}"], result.report[f"train_{m.name}"]
        models[m.name] = {"model": r["model"], "version": served_versions.get(m.name, r["version"]),
                          "test_accuracy": r["test_accuracy"],
                          "arch": r["arch"], "train": "cache hit" if rec.cache == "hit" else "trained",
                          "train_seconds": r["train_seconds"], "step_end_s": rec.end}
    return PipelineResult(config, result.report, wall, models, result["serve"]["serving"], steps.timeline,
                          result["aggregate"])


def run_pipeline(config: PipelineConfig = PipelineConfig()) -> PipelineResult:
    """Synchronous entry point: ``asyncio.run(run_pipeline_async(config))``."""
    return asyncio.run(run_pipeline_async(config))

