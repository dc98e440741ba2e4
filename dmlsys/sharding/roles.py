"""Cluster roles ``router`` and ``shard``: validate a node's ``[nodes.config]``, build its services.

    [[nodes]]                                   [[nodes]]
    name = "router"                             name = "shard"
    role = "router"                             role = "shard"
    [nodes.config]                              replicas = 3
    app = "dmlsys.sharding.app:identity"        [nodes.config]
    part_timeout = 2.0     # seconds per try    app = "dmlsys.sharding.app:identity"   # the same app
    deadline = 10.0        # seconds a request  snapshot_every = 1   # changes between snapshots
    cache_entries = 4096   # sub-results kept   call_timeout = 5.0   # seconds, shard to shard
    cache_ttl = 60.0       # seconds            fsync = true
    max_parts = 4096
    balance_eps = 0.1      # stateless apps: at most ceil((1+eps)·parts/shards) parts per shard; -1: off
    vnodes = 2000          # both roles: points per shard on the ring (must agree)
    http = "127.0.0.1:8100"  # router: its HTTP door (POST /v1/models/{app}:{verb}); port 0 picks one;
                           # a port alone (8100 or ":8100") binds loopback; left out: RPC only
    max_body_bytes = 268435456  # router: the door's cap on a body (413 over it)
    app_options = { model = ".dmlsys/canvas-tagger.npz" }   # both roles: keyword arguments of the app

A shard's snapshot lives in ``<state_dir>/sharding/<node name>/``, where its restart finds it.
Every bad value raises ``ConfigError(key, what was expected)``; the cluster CLI adds the file and
node name.
"""

from __future__ import annotations

from pathlib import Path

from dmlsys.node import ConfigError, Service
from dmlsys.node.config import config_bool, config_seconds
from dmlsys.node.config import config_int as _int
from dmlsys.node.config import unknown_keys as _unknown
from dmlsys.sharding.app import load_app
from dmlsys.sharding.errors import AppError
from dmlsys.sharding.ring import DEFAULT_VNODES

ROUTER_KEYS = {"app", "app_options", "part_timeout", "deadline", "cache_entries", "cache_ttl", "max_parts", "vnodes",
               "balance_eps", "http", "max_body_bytes"}
SHARD_KEYS = {"app", "app_options", "snapshot_every", "call_timeout", "fsync", "vnodes"}


def _seconds(config: dict, key: str, default: float) -> float:
    return config_seconds(config, key, default, most=86400.0)


def _app(config: dict):
    target = config.get("app", "dmlsys.sharding.app:identity")
    if not isinstance(target, str):
        raise ConfigError("app", f"\"module:function\" returning a ShardedApp, got {target!r}")
    options = config.get("app_options", {})
    if not isinstance(options, dict):
        raise ConfigError("app_options", f"a table of the app function's keyword arguments, got {options!r}")
    try:
        return target, options, load_app(target, options)
    except AppError as e:
        raise ConfigError("app_options" if options and "options" in str(e) else "app", str(e)) from None


def _address(config: dict, key: str) -> str | None:
    value = config.get(key)
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):  # a port alone: on loopback
        value = f"127.0.0.1:{value}"
    elif isinstance(value, str) and value.startswith(":"):
        value = f"127.0.0.1{value}"
    host, _, port = value.rpartition(":") if isinstance(value, str) else ("", "", "")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(key, f"HOST:PORT (port 0 picks a free one), got {value!r}")
    return value


def build_router(ctx) -> list[Service]:
    """Role factory (``ROLES["router"] = "dmlsys.sharding.roles:build_router"``)."""
    from dmlsys.sharding.router import RouterConfig, RouterService

    config = dict(ctx.config)
    _unknown(config, ROUTER_KEYS)
    target, options, app = _app(config)
    eps = config.get("balance_eps", 0.1)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not (eps == -1 or 0 <= eps <= 100):
        raise ConfigError("balance_eps", f"a number in [0, 100], or -1 for no balancing, got {eps!r}")
    return [RouterService(RouterConfig(
        app=target, vnodes=_int(config, "vnodes", DEFAULT_VNODES), part_timeout=_seconds(config, "part_timeout", 2.0),
        deadline=_seconds(config, "deadline", 10.0), max_parts=_int(config, "max_parts", 4096),
        cache_entries=_int(config, "cache_entries", 4096, low=0), cache_ttl=_seconds(config, "cache_ttl", 60.0),
        balance_eps=None if eps == -1 else float(eps), app_options=options, http=_address(config, "http"),
        max_body_bytes=_int(config, "max_body_bytes", 256 << 20),
    ), app=app)]


def build_shard(ctx) -> list[Service]:
    """Role factory (``ROLES["shard"] = "dmlsys.sharding.roles:build_shard"``)."""
    from dmlsys.sharding.shard import ShardConfig, ShardService

    config = dict(ctx.config)
    _unknown(config, SHARD_KEYS)
    target, options, app = _app(config)
    fsync = config_bool(config, "fsync", True)
    return [ShardService(ShardConfig(
        state_dir=str(Path(ctx.state_dir) / "sharding" / ctx.name), app=target,
        vnodes=_int(config, "vnodes", DEFAULT_VNODES), snapshot_every=_int(config, "snapshot_every", 1),
        call_timeout=_seconds(config, "call_timeout", 5.0), fsync=fsync, app_options=options,
    ), app=app)]
