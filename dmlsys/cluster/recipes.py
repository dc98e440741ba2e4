"""Work the supervisor does between phases of ``up``: train what the replicas will serve.

``up`` starts nodes in two phases: everything but replicas ("base"), then replicas ("serving").
Before the serving phase, every model a replica is configured to serve must be in the model
store. A missing one is trained from its recipe in the spec::

    [cluster.train.fashion-mlp]
    arch = { kind = "mlp", hidden = [256, 128] }
    epochs = 5
    batch_size = 128
    lr = 0.001

on the cluster's worker nodes when it has any (ring allreduce, data parallel), else in-process.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dmlsys.cluster.errors import RecipeError

if TYPE_CHECKING:
    from dmlsys.cluster.supervisor import Supervisor

log = logging.getLogger("dmlsys.supervisor")


def recipe(sup: "Supervisor", model: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(arch, hyperparams) for ``model`` from ``[cluster.train.MODEL]``, validated."""
    return recipe_of(sup.spec, model)


def recipe_of(spec: Any, model: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(arch, hyperparams) for ``model`` from the ``[cluster.train.MODEL]`` of a ``ClusterSpec``."""
    from dmlsys.train.trainer import Hyperparams

    where = f"{spec.path}: cluster.train.{model}"
    table = spec.train.get(model)
    if not isinstance(table, dict):
        known = ", ".join(sorted(spec.train)) or "none"
        raise RecipeError(f"model {model!r} is not in the store at {spec.store} and {spec.path} has no "
                       f"[cluster.train.{model}] recipe to train it (recipes: {known})")
    table = dict(table)
    arch = table.pop("arch", None)
    if not isinstance(arch, dict):
        raise RecipeError(f"{where}.arch: a table such as {{ kind = \"mlp\" }}")
    fields = {f.name for f in dataclasses.fields(Hyperparams)}
    unknown = set(table) - fields
    if unknown:
        raise RecipeError(f"{where}.{sorted(unknown)[0]}: unknown key (known: arch, {', '.join(sorted(fields))})")
    try:
        Hyperparams(**table)
    except Exception as e:
        raise RecipeError(f"{where}: {e}") from None
    return arch, table


def missing_models(sup: "Supervisor") -> list[str]:
    """Models a replica will serve that have no intact version in the store: none at all, or only
    versions a power loss or a bad disk damaged (a replica could load none of them). Reads and
    checks each model's parameters: call it in a thread."""
    from dmlsys.train.store import ModelStore

    store = ModelStore(Path(sup.spec.store))
    wanted = sorted(sup.served_models())  # by the replicas of every host
    return [m for m in wanted if store.intact_version(m) is None]


async def before_phase(sup: "Supervisor", phase: str) -> None:
    """Called before each phase of ``up``: "base", "serving", then "ready" (every node is)."""
    if phase == "serving" and sup.primary:  # a secondary's replicas fetch from the primary's store
        missing = await asyncio.to_thread(missing_models, sup)
        if missing:
            await workers_of_joined_hosts(sup)
        for model in missing:
            log.info("model %r is not in the store yet", model)
            await train(sup, model)
    elif phase == "ready":
        await gateways_see_replicas(sup)


async def workers_of_joined_hosts(sup: Supervisor, timeout: float = 180.0) -> None:
    """Until the workers placed on the other hosts that have joined are ready (at most
    ``timeout``): `up` trains on the cluster's workers, not on this host's alone."""
    if sup.hosts is None:
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        joined = {h for h, v in sup.hosts.views.items() if v.state == "up"}
        wanted = {n for n, h in sup.assignment.items() if h in joined and _role(sup, n) == "worker"}
        missing = wanted - set(sup.ready_workers())
        if not missing:
            return
        if loop.time() > deadline:
            log.warning("training without worker(s) %s: not ready within %.0fs", ", ".join(sorted(missing)), timeout)
            return
        await asyncio.sleep(0.2)


def _role(sup: Supervisor, name: str) -> str | None:
    template = sup.spec.group_of(name) or next((n for n in sup.spec.nodes if n.name == name), None)
    return template.role if template is not None else None


async def gateways_see_replicas(sup: "Supervisor", timeout: float = 30.0) -> None:
    """Wait until every local gateway has a ready replica of every model served, so that the
    first request after ``up`` returns is answered, not refused while a probe catches up."""
    from dmlsys.node import NodeError

    models = sup.served_models()
    gateways = [p.member for p in sup.procs.values() if p.member.role == "gateway" and sup._local(p.member)]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    for member in gateways:
        gateway, only = member.name, member.config.get("models")
        wanted = models & set(only) if only else models  # a gateway may serve a subset
        missing = set(wanted)
        while missing and loop.time() < deadline:
            try:
                seen = await sup.node.call(gateway, "serving", "models", None, timeout=2.0)
                missing = {m for m in wanted if not (seen.get(m) or {}).get("ready_replicas")}
            except NodeError:
                pass
            if missing:
                await asyncio.sleep(0.1)
        if missing:
            log.warning("gateway %s sees no ready replica of %s after %.0fs; requests may get 503 until it does",
                        gateway, ", ".join(sorted(missing)), timeout)


async def train(sup: "Supervisor", model: str) -> dict[str, Any]:
    """Train ``model`` from its recipe and save a new version to the store.

    On the cluster's worker nodes when it has any (data parallel, ring allreduce), else in a
    thread of this process, so the supervisor keeps answering while it trains."""
    arch, hyperparams = recipe(sup, model)
    workers = sup.ready_workers()  # every host's; this host's first, so rank 0 saves into this store
    log.info("training %r (%s) on %s", model, arch, f"workers {', '.join(workers)}" if workers else "this process")
    if workers:
        from dmlsys.collective.job import train_on_workers

        host = sup.assignment.get(workers[0])
        elsewhere = sup.hosts is not None and host is not None and host != sup.host
        if elsewhere:  # rank 0 saves into its own host's store: numbered as the cluster's would be
            from dmlsys.cluster.hosts import pull_model, sync_model_to

            await sync_model_to(sup, host, model)
        result = await train_on_workers(sup.node, workers, model=model, arch=arch, hyperparams=hyperparams,
                                        on_epoch=lambda e: _log_epoch(model, e, hyperparams))
        if elsewhere:  # and into the cluster's store before anyone looks for it there
            await pull_model(sup, host, model, int(result["version"]))
    else:
        loop = asyncio.get_running_loop()

        def on_epoch(stats) -> None:  # in the training thread
            loop.call_soon_threadsafe(_log_epoch, model, dataclasses.asdict(stats), hyperparams)

        result = await asyncio.to_thread(train_in_process, Path(sup.spec.store), model, arch, hyperparams, on_epoch)
    log.info("trained %r: version %s, test accuracy %.4f", model, result["version"], result["test_accuracy"])
    last = result["history"][-1] if result["history"] else {}
    last = last if isinstance(last, dict) else dataclasses.asdict(last)
    return {"model": model, "version": result["version"], "test_accuracy": result["test_accuracy"],
            "epochs": len(result["history"]), "workers": workers,
            "samples_per_s": last.get("samples_per_s"), "comm_fraction": last.get("comm_fraction")}


async def train_ps(node: Any, spec: Any, model: str, workers: list[str], shards: list[str], *,
                   consistency: str = "bsp", staleness: int = 0, epochs: int | None = None,
                   limit: int | None = None, test_limit: int | None = None) -> dict[str, Any]:
    """Train ``model`` from its recipe through parameter servers: the ``ps-worker`` nodes
    ``workers`` pull from and push to the ``ps`` nodes ``shards`` (``--via ps``); rank 0 (the
    first worker) saves it to the cluster's store, its card saying ``"via": "ps"``. Returns what
    :func:`train` returns, plus ``via``, ``consistency``, ``staleness`` and ``shards``."""
    from dmlsys.ps.worker import train_via_ps

    arch, hyperparams = recipe_of(spec, model)
    if not workers or not shards:
        raise RecipeError(f"{spec.path}: training {model!r} through parameter servers needs running nodes of "
                          f"role \"ps-worker\" and \"ps\" (found {len(workers)} and {len(shards)}); "
                          f"see cluster/ps.toml")
    log.info("training %r (%s) through shards %s on ps-workers %s (%s%s)", model, arch, ", ".join(shards),
             ", ".join(workers), consistency, f" s={staleness}" if consistency == "ssp" else "")
    result = await train_via_ps(node, workers, shards, model=model, arch=arch, hyperparams=hyperparams,
                                consistency=consistency, staleness=staleness, epochs=epochs, limit=limit,
                                test_limit=test_limit)
    last = result["history"][-1] if result.get("history") else {}
    return {"model": model, "version": result["version"], "test_accuracy": result["test_accuracy"],
            "epochs": len(result.get("history") or []), "workers": workers, "via": "ps",
            "consistency": consistency, "staleness": staleness, "shards": shards,
            "samples_per_s": last.get("samples_per_s"), "comm_fraction": last.get("comm_fraction")}


def _log_epoch(model: str, epoch: dict[str, Any], hyperparams: dict[str, Any]) -> None:
    total = hyperparams.get("epochs")
    log.info("training %r: epoch %s%s loss %.4f test accuracy %.4f (%.1fs, %.0f samples/s)", model,
             epoch.get("epoch"), f"/{total}" if total else "", epoch.get("loss", float("nan")),
             epoch.get("test_accuracy", float("nan")), epoch.get("seconds", 0.0), epoch.get("samples_per_s", 0.0))


def train_in_process(store: Path, model: str, arch: dict[str, Any], hyperparams: dict[str, Any],
                     on_epoch=None) -> dict[str, Any]:
    from dmlsys.train.store import ModelStore
    from dmlsys.train.trainer import Hyperparams, train_model

    result = train_model(arch, Hyperparams(**hyperparams), store=ModelStore(store), model_name=model,
                         progress=False, on_epoch=on_epoch)
    return {"version": result.version, "test_accuracy": result.test_accuracy, "history": result.history}
