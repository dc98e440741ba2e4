"""Cluster roles ``replica`` and ``gateway``: validate a node's ``[nodes.config]``, build its services.

    [[nodes]]                              [[nodes]]
    name = "replica"                       name = "gateway"
    role = "replica"                       role = "gateway"
    replicas = 2                           [nodes.config]
    [nodes.config]                         policy = "power-of-two"   # round-robin, least-connections,
    model = "fashion-mlp"                                            # consistent-hash
    version = 3        # optional:         probe_period = 0.5        # seconds
                       # latest if absent  max_in_flight = 64        # per replica
    buckets = [1, 64]  # optional: batch
                       # sizes to compile
    max_batch = 64     # requests per batch
    max_instances = 64 # per request
    max_queue = 1024   # requests waiting
                       # for the batcher
    http = "127.0.0.1:0"  # optional: its own
                       # KServe v1 endpoint
                       # (default "off")
                                           max_queue = 1024          # per model, for a free replica
                                           deadline = 10.0           # seconds, per request
                                           try_timeout = 2.0         # seconds, per try
                                           turn_affinity = 16        # predicts of a loop turn
                                                                     # riding one message (1: off)
                                           max_instances = 64
                                           max_body_bytes = 4194304  # over it: 413
                                           max_connections = 1024    # open at once; over it: 503
                                           read_timeout = 10.0       # seconds for a body; else 408
                                           idle_timeout = 15.0       # seconds without a request head
                                           models = ["fashion-mlp"]  # optional: serve only these
                                           http = "127.0.0.1:8000"   # optional: else [cluster] http;
                                                                     # "off": reached by RPC only
                                           tls_cert = "door.pem"     # optional, with tls_key: HTTPS
                                           tls_key = "door.key"      # (else [cluster] tls_cert/tls_key)

Every bad value raises ``ConfigError(key, what was expected)``; the cluster CLI adds the file
and node name.
"""

from __future__ import annotations

from typing import Any

from dmlsys.node import ConfigError, Service
from dmlsys.node.config import config_bool
from dmlsys.node.config import config_int as _int
from dmlsys.node.config import config_seconds as _seconds
from dmlsys.node.config import unknown_keys as _unknown
from dmlsys.serving.policies import POLICIES, EjectionConfig
from dmlsys.train import one_core_xla
from dmlsys.wire.codec import DEFAULT_LIMITS

REPLICA_KEYS = {"model", "version", "max_batch", "max_instances", "max_queue", "buckets", "http"}
GATEWAY_KEYS = {"http", "policy", "probe_period", "probe_timeout", "try_timeout", "max_in_flight", "max_queue",
                "deadline", "max_instances", "max_body_bytes", "max_connections", "read_timeout", "idle_timeout",
                "models", "consecutive_failures", "base_ejection", "max_ejection", "tls_cert", "tls_key", "router",
                "replica_max_input_bytes", "tiers", "api_keys", "reuse_port", "turn_affinity"}


def build_replica(ctx) -> list[Service]:
    """A model-server replica. Config: ``model`` (required), ``version`` (default: latest)."""
    from dmlsys.serving.replica import ModelService, ReplicaConfig

    config = dict(ctx.config)
    _unknown(config, REPLICA_KEYS)
    model = config.get("model")
    if not isinstance(model, str) or not model:
        raise ConfigError("model", f"the name of a model in the store {ctx.store} (e.g. \"fashion-mlp\"), got {model!r}")
    one_core_xla()  # one replica is one core's worth of work
    return [ModelService(ReplicaConfig(
        model=model, store=str(ctx.store), version=_int(config, "version", None),
        max_batch=_int(config, "max_batch", 64), max_instances=_int(config, "max_instances", 64),
        max_queue=_int(config, "max_queue", 1024), http=_replica_http(config),
        **({"buckets": _buckets(config)} if "buckets" in config else {}),
    ))]


def _replica_http(config: dict) -> str | None:
    """``http``: HOST:PORT for the replica's own KServe v1 endpoint (port 0: picked), or absent/"off"."""
    http = config.get("http", "off")
    if http == "off":
        return None
    host, _, port = str(http).rpartition(":") if isinstance(http, str) else ("", "", "")
    if not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError("http", f"HOST:PORT (port 0 picks one), or \"off\", got {http!r}")
    return f"{host}:{port}"


def _buckets(config: dict) -> tuple[int, ...]:
    value = config["buckets"]
    if not isinstance(value, list) or not value or not all(isinstance(b, int) and b >= 1 for b in value):
        raise ConfigError("buckets", f"a list of batch sizes to compile, e.g. [1, 8, 64], got {value!r}")
    return tuple(sorted(set(value)))


def build_gateway(ctx) -> list[Service]:
    """The HTTP front door and balancer. See the module docstring for the config keys."""
    from dmlsys.serving.balancer import BalancerConfig
    from dmlsys.serving.gateway import GatewayConfig, GatewayService

    config = dict(ctx.config)
    _unknown(config, GATEWAY_KEYS)
    http = config.get("http", ctx.http) or "127.0.0.1:8000"
    host, _, port = str(http).rpartition(":")
    if http != "off" and (not host or not port.isdigit() or int(port) > 65535):
        raise ConfigError("http", f"HOST:PORT, or \"off\" for no HTTP door, got {http!r}")
    policy = config.get("policy", "power-of-two")
    if policy not in POLICIES:
        raise ConfigError("policy", f"one of {', '.join(POLICIES)}, got {policy!r}")
    models = config.get("models", [])
    if not isinstance(models, list) or not all(isinstance(m, str) and m for m in models):
        raise ConfigError("models", f"a list of model names, got {models!r}")
    base = _seconds(config, "base_ejection", 1.0)
    longest = _seconds(config, "max_ejection", 30.0)
    if longest < base:
        raise ConfigError("max_ejection", f"at least base_ejection ({base:g}), got {longest:g}")
    balancer = BalancerConfig(
        policy=policy, probe_period=_seconds(config, "probe_period", 0.5),
        probe_timeout=_seconds(config, "probe_timeout", 1.0), try_timeout=_seconds(config, "try_timeout", 2.0),
        max_in_flight=_int(config, "max_in_flight", 64), max_queue=_int(config, "max_queue", 1024, low=0),
        models=tuple(models), turn_affinity=_int(config, "turn_affinity", 16),
        ejection=EjectionConfig(consecutive_failures=_int(config, "consecutive_failures", 3),
                                base_ejection=base, max_ejection=longest),
    )
    max_body = _int(config, "max_body_bytes", 4 << 20)
    if max_body > DEFAULT_LIMITS.max_frame_bytes:  # a body travels to a replica as one frame
        raise ConfigError("max_body_bytes", f"at most the wire's frame limit ({DEFAULT_LIMITS.max_frame_bytes}), "
                                            f"got {max_body}")
    return [GatewayService(GatewayConfig(
        http=None if http == "off" else f"{host}:{port}", deadline=_seconds(config, "deadline", 10.0),
        max_body_bytes=max_body, max_instances=_int(config, "max_instances", 64),
        max_connections=_int(config, "max_connections", 1024), read_timeout=_seconds(config, "read_timeout", 10.0),
        idle_timeout=_seconds(config, "idle_timeout", 15.0), balancer=balancer, **_tls(config),
        router=_router(config), replica_max_input_bytes=_int(config, "replica_max_input_bytes", 16 << 20),
        reuse_port=config_bool(config, "reuse_port"), **_gate(config, ctx),
    ))]


def _gate(config: dict[str, Any], ctx) -> dict[str, Any]:
    """``tiers``: the event gate in front of predicts (dmlsys.events): ``"default"`` for the
    course's anonymous/authenticated tiers, or a table of tiers as the events role takes;
    ``api_keys``: the key file (default: the cluster's, which `keys add` writes)."""
    if "tiers" not in config:
        return {}
    from dmlsys.events.service import keys_path
    from dmlsys.events.tiers import DEFAULT_TIERS, TierError, tiers_from_config

    raw = config["tiers"]
    try:
        tiers = dict(DEFAULT_TIERS) if raw == "default" else tiers_from_config({"tiers": raw})
    except TierError as e:
        raise ConfigError("tiers", str(e)) from None
    keys = config.get("api_keys") or str(keys_path(ctx.state_dir))
    if not isinstance(keys, str):
        raise ConfigError("api_keys", f"a file path, got {keys!r}")
    return {"tiers": tiers, "api_keys": keys}


def _router(config: dict[str, Any]) -> str | None:
    """``router``: the name of the sharding router node that ``:tag`` requests go to."""
    router = config.get("router")
    if router is not None and (not isinstance(router, str) or not router):
        raise ConfigError("router", f"the name of a node of role router (e.g. \"router\"), got {router!r}")
    return router


def _tls(config: dict[str, Any]) -> dict[str, str]:
    """``tls_cert`` and ``tls_key``: both (PEM file paths; the door serves HTTPS), or neither."""
    given = {k: config[k] for k in ("tls_cert", "tls_key") if config.get(k) is not None}
    for k, v in given.items():
        if not isinstance(v, str) or not v:
            raise ConfigError(k, f"a PEM file path, got {v!r}")
    if len(given) == 1:
        missing = ({"tls_cert", "tls_key"} - set(given)).pop()
        raise ConfigError(missing, "a PEM file path too: tls_cert and tls_key go together")
    return given
