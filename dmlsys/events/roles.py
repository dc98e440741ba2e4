"""Cluster roles ``events`` (the gate, the pool, its autoscaler, an HTTP door) and ``function``.

    [[nodes]]                                  [[nodes]]
    name = "events"                            name = "function"      # the pool's instances
    role = "events"                            role = "function"
    [nodes.config]                             replicas = 1           # spares at `up` (the pool
    http = "127.0.0.1:8100"   # "off": RPC only                       # starts/stops the rest)
    slots = 4                 # the shared pool                       [nodes.config]
    group = "function"        # the instances' group                  buckets = [1, 8, 32]  # optional
    spares = 1                # warmed, modelless processes           model = "fashion-mlp" # optional:
    deadline = 30.0           # seconds per event                     # a spare when absent
    tick = 1.0                # control loop period
    stable_window = 60.0      # Knative KPA's windows
    panic_window = 6.0
    keys = ".dmlsys/keys/api-keys.json"   # default: the state dir's (what `keys add` writes)
    [[nodes.config.functions]]            # deployed at start (`deploy` adds more)
    name = "fashion"
    model = "fashion-mlp"
    min = 0
    max = 4
    [nodes.config.tiers.anonymous]        # default: the course's (docs/events.md, Tiers)
    rates = ["1/hour"]
    concurrency = 2

Every bad value raises ``ConfigError(key, what was expected)``; the cluster CLI adds the file
and node name.
"""

from __future__ import annotations

import os
from typing import Any

from dmlsys.node import ConfigError, Service
from dmlsys.node.config import config_int, config_seconds
from dmlsys.node.config import unknown_keys as _unknown
from dmlsys.train import one_core_xla

EVENTS_KEYS = {"http", "slots", "group", "spares", "deadline", "tick", "try_timeout", "stable_window", "panic_window",
               "keys", "functions", "tiers", "max_body_bytes"}
FUNCTION_KEYS = {"model", "version", "buckets", "cache"}
DEPLOY_KEYS = {"name", "model", "version", "min", "max", "target", "priority"}


def _int(config: dict, key: str, default: int, low: int = 0) -> int:
    return config_int(config, key, default, low)


def _seconds(config: dict, key: str, default: float) -> float:
    return config_seconds(config, key, default, most=86400.0)


def deployment(raw: Any, where: str):
    from dmlsys.events.service import Deployment

    if not isinstance(raw, dict):
        raise ConfigError(where, f"a table with model, min, max, got {raw!r}")
    _unknown(raw, DEPLOY_KEYS, where + ".")
    model = raw.get("model")
    if not isinstance(model, str) or not model:
        raise ConfigError(f"{where}.model", f"the name of a model in the store, got {model!r}")
    lo, hi = _int(raw, "min", 0), _int(raw, "max", 4, low=1)
    if hi < lo:
        raise ConfigError(f"{where}.max", f"at least min ({lo}), got {hi}")
    target = raw.get("target", 1.0)
    if not isinstance(target, (int, float)) or isinstance(target, bool) or target <= 0:
        raise ConfigError(f"{where}.target", f"events in flight per instance, > 0, got {target!r}")
    version = raw.get("version")
    if version is not None and (not isinstance(version, int) or version < 1):
        raise ConfigError(f"{where}.version", f"a version number >= 1, got {version!r}")
    return Deployment(str(raw.get("name") or model), model, version, lo, hi, float(target), _int(raw, "priority", 0, low=-100))


def build_events(ctx) -> list[Service]:
    """The events node. See the module docstring for the config keys."""
    from dmlsys.events.autoscaler import ScalingConfig
    from dmlsys.events.service import EventsConfig, EventsService, keys_path
    from dmlsys.events.tiers import TierError, tiers_from_config

    config = dict(ctx.config)
    _unknown(config, EVENTS_KEYS)
    http = config.get("http", "127.0.0.1:0")
    host, _, port = str(http).rpartition(":")
    if http != "off" and (not host or not port.isdigit() or int(port) > 65535):
        raise ConfigError("http", f"HOST:PORT (port 0 picks one), or \"off\" for no HTTP door, got {http!r}")
    functions = config.get("functions", [])
    if not isinstance(functions, list):
        raise ConfigError("functions", f"a list of [[nodes.config.functions]] tables, got {functions!r}")
    tiers = None
    if "tiers" in config:
        try:
            tiers = tiers_from_config({"tiers": config["tiers"]})
        except TierError as e:
            raise ConfigError("tiers", str(e)) from None
    keys = config.get("keys")
    if keys is not None and not isinstance(keys, str):
        raise ConfigError("keys", f"a file path, got {keys!r}")
    stable = _seconds(config, "stable_window", 60.0)
    panic = _seconds(config, "panic_window", 6.0)
    if panic > stable:
        raise ConfigError("panic_window", f"at most stable_window ({stable:g}), got {panic:g}")
    return [EventsService(EventsConfig(
        http=None if http == "off" else f"{host}:{port}", slots=_int(config, "slots", 4),
        group=str(config.get("group", "function")), spares=_int(config, "spares", 1),
        functions=tuple(deployment(f, f"functions[{i}]") for i, f in enumerate(functions)),
        tiers=tiers, keys=keys or str(keys_path(ctx.state_dir)),
        deadline=_seconds(config, "deadline", 30.0), tick=_seconds(config, "tick", 1.0),
        try_timeout=_seconds(config, "try_timeout", 10.0),
        scaling=ScalingConfig(stable_window=stable, panic_window=panic),
        max_body_bytes=_int(config, "max_body_bytes", 4 << 20, low=1024),
    ))]


def build_function(ctx) -> list[Service]:
    """A function instance: a spare, or (``model`` given) one model's from the start."""
    from dmlsys.events.instance import BUCKETS, FunctionService

    config = dict(ctx.config)
    _unknown(config, FUNCTION_KEYS)
    model = config.get("model")
    if model is not None and (not isinstance(model, str) or not model):
        raise ConfigError("model", f"a model name, or no key for a spare, got {model!r}")
    buckets = config.get("buckets", list(BUCKETS))
    if not isinstance(buckets, list) or not buckets or not all(isinstance(b, int) and b >= 1 for b in buckets):
        raise ConfigError("buckets", f"a list of batch sizes, smallest first compiled, e.g. [1, 8, 32], got {buckets!r}")
    cache = config.get("cache", str(os.path.join(ctx.state_dir, "jax-cache")))
    one_core_xla()  # one instance is one core's worth of work
    return [FunctionService(store=str(ctx.store), cache_dir=cache, model=model, version=config.get("version"),
                            buckets=tuple(buckets))]
