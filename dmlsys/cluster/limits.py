"""Every limit of a running cluster in one table, and the agreements between them.

Each layer keeps its own limits where they are enforced (the wire's ``Limits``, the node's
``NodeLimits``, the door's ``HttpLimits``/``GatewayConfig``, the balancer's ``BalancerConfig``,
the replica's ``ReplicaConfig``, the supervisor's constants): a limit lives beside the check
that refuses what exceeds it. This module, at the top layer because it reads all of them,
gathers them so that a reader finds them in one place, and states what must hold *between*
them: nothing accepted at one layer may be refused silently at the next.

``TABLE`` is the list of ``Limit`` rows (name, default, where it is set, the spec key that
changes it, and what a client sees when it is exceeded); ``docs/reliability.md`` prints it.
``check(...)`` evaluates the agreements for a set of configs (the defaults when called with
none) and returns the ones that fail, each naming both sides; ``check_spec(spec)`` does the
same for a cluster spec's gateway and replica configs, counting its gateways.

    >>> [a.name for a in check() if not a.holds]
    []
"""

from __future__ import annotations

import dataclasses
from typing import Any

from dmlsys.cluster import supervisor
from dmlsys.node.limits import DEFAULT_NODE_LIMITS, NodeLimits
from dmlsys.serving import messages
from dmlsys.serving.balancer import BalancerConfig
from dmlsys.serving.gateway import GatewayConfig
from dmlsys.serving.http import HttpLimits
from dmlsys.serving.replica import ReplicaConfig
from dmlsys.train import store
from dmlsys.wire import codec


@dataclasses.dataclass(frozen=True)
class Limit:
    """One limit: ``where`` is ``file: Class.field`` (or a module constant), ``key`` the spec key
    that sets it (``None``: a constant), ``error`` what a client sees when it is exceeded."""

    name: str
    value: Any
    unit: str
    where: str
    key: str | None
    error: str


_W, _N, _H, _G = "dmlsys/wire/codec.py", "dmlsys/node/limits.py", "dmlsys/serving/http.py", "dmlsys/serving/gateway.py"
_B, _R, _M = "dmlsys/serving/balancer.py", "dmlsys/serving/replica.py", "dmlsys/serving/messages.py"
_S, _T = "dmlsys/cluster/supervisor.py", "dmlsys/train/store.py"
_WL, _NL, _HL, _GC, _BC = codec.DEFAULT_LIMITS, DEFAULT_NODE_LIMITS, HttpLimits(), GatewayConfig(), BalancerConfig()
_RC = ReplicaConfig(model="-", store="-")

TABLE: tuple[Limit, ...] = (
    # -- the HTTP front door (per connection, per request) -------------------------------------
    Limit("connections open at the door", _HL.max_connections, "connections", f"{_H}: HttpLimits.max_connections",
          "gateway max_connections", '503 {"error": "the front door is at its limit of open connections '
          '(max_connections=1024); retry after 1s"}, Retry-After: 1, connection closed'),
    Limit("request head", _HL.max_head_bytes, "bytes", f"{_H}: HttpLimits.max_head_bytes", None,
          "431 naming max_head_bytes, connection closed"),
    Limit("header fields", _HL.max_headers, "fields", f"{_H}: HttpLimits.max_headers", None,
          "431 naming max_headers, connection closed"),
    Limit("idle connection", _HL.idle_timeout, "s", f"{_H}: HttpLimits.idle_timeout", "gateway idle_timeout",
          "connection closed without an answer (no request was under way)"),
    Limit("request body", _GC.max_body_bytes, "bytes", f"{_G}: GatewayConfig.max_body_bytes",
          "gateway max_body_bytes", '413 {"error": "... over max_body_bytes ..."} as soon as Content-Length '
          "(or the chunks so far) says so"),
    Limit("input a replica parses", _GC.replica_max_input_bytes, "bytes",
          f"{_G}: GatewayConfig.replica_max_input_bytes", "gateway replica_max_input_bytes",
          "413 naming the gateway's replica_max_input_bytes, at the door (before any replica sees it)"),
    Limit("body read time", _GC.read_timeout, "s", f"{_G}: GatewayConfig.read_timeout", "gateway read_timeout",
          '408 {"error": "body not received within 10s (read_timeout)"}'),
    Limit("request deadline", _GC.deadline, "s", f"{_G}: GatewayConfig.deadline (header X-Deadline-Ms, "
          "at most 600000)", "gateway deadline", '504 {"error": "... deadline ..."}; a bad X-Deadline-Ms: 400'),
    Limit("instances per request (door)", _GC.max_instances, "instances", f"{_G}: GatewayConfig.max_instances",
          "gateway max_instances", '400 {"error": "... (max_instances)"}, parsed and refused by the replica'),
    # -- the balancer (in the gateway) ---------------------------------------------------------
    Limit("in flight per replica, per gateway", _BC.max_in_flight, "requests", f"{_B}: BalancerConfig.max_in_flight",
          "gateway max_in_flight", "none: the request waits in the model's queue"),
    Limit("queued per model, per gateway", _BC.max_queue, "requests", f"{_B}: BalancerConfig.max_queue",
          "gateway max_queue", "503 {\"error\": \"model 'M' is overloaded: all replicas are at their in-flight "
          'limit and 1024 requests already wait; retry after 1s or add replicas"}, Retry-After: 1'),
    Limit("one try", _BC.try_timeout, "s", f"{_B}: BalancerConfig.try_timeout", "gateway try_timeout",
          "none: the request is retried on another replica within its deadline; else 504"),
    Limit("readiness probe", _BC.probe_timeout, "s", f"{_B}: BalancerConfig.probe_timeout", "gateway probe_timeout",
          "none: a replica that misses it leaves rotation; with none left, 503 no ready replica"),
    Limit("failures before ejection", _BC.ejection.consecutive_failures, "requests",
          "dmlsys/serving/policies.py: EjectionConfig.consecutive_failures", "gateway consecutive_failures",
          "none: the replica is out of rotation base_ejection..max_ejection seconds"),
    Limit("predicts per coalesced message", messages.MAX_ITEMS, "requests", f"{_M}: MAX_ITEMS", None,
          "none: more wait for the next message"),
    Limit("body carried inline", messages.INLINE_MAX, "bytes", f"{_M}: INLINE_MAX", None,
          "none: a larger body travels as an array frame"),
    # -- the replica --------------------------------------------------------------------------
    Limit("instances per request (replica)", _RC.max_instances, "instances", f"{_R}: ReplicaConfig.max_instances",
          "replica max_instances", '400 {"error": "... (max_instances)"}; the lower of door and replica applies'),
    Limit("batch", _RC.max_batch, "requests", f"{_R}: ReplicaConfig.max_batch", "replica max_batch",
          "none: the rest wait for the next batch"),
    Limit("batch queue", _RC.max_queue, "requests", f"{_R}: ReplicaConfig.max_queue", "replica max_queue",
          "QueueFull to the balancer, which tries another replica; all full: 503"),
    Limit("a replica's own HTTP listener", _RC.http_limits.max_body_bytes, "bytes",
          f"{_R}: ReplicaConfig.http_limits (HttpLimits: the door's defaults for body, head, "
          "connections, timeouts)", "replica http (the listener; its limits are the defaults)",
          "the same answers as the front door: 413, 408, 431, 503"),
    # -- every node ---------------------------------------------------------------------------
    Limit("handlers in flight per node", _NL.max_in_flight, "tasks", f"{_N}: NodeLimits.max_in_flight", None,
          "RemoteError NodeBusy: node X busy: N in flight (limit 1024, NodeLimits.max_in_flight); the balancer "
          "tries another replica"),
    Limit("deadline of a request without one", _NL.default_deadline_s, "s", f"{_N}: NodeLimits.default_deadline_s",
          None, "the handler is cancelled; the caller gets TimeoutError"),
    # -- the wire -----------------------------------------------------------------------------
    Limit("message header", _WL.max_header_bytes, "bytes", f"{_W}: Limits.max_header_bytes", None,
          "WireError at the sender (encode); at a receiver, an error reply naming max_header_bytes"),
    Limit("frames per message", _WL.max_frames, "frames", f"{_W}: Limits.max_frames", None,
          "WireError naming Limits.max_frames, at the sender or as the receiver's error reply"),
    Limit("bytes per array frame", _WL.max_frame_bytes, "bytes", f"{_W}: Limits.max_frame_bytes", None,
          "WireError naming the limit; ZeroMQ's MAXMSGSIZE drops the connection above it"),
    Limit("deadline on the wire", codec.MAX_DEADLINE, "s", f"{_W}: MAX_DEADLINE", None,
          "WireError: header field dl must be a number of seconds in [0, 1e9]"),
    # -- the supervisor and the model store -----------------------------------------------------
    Limit("node ready after start", supervisor.READY_TIMEOUT, "s", f"{_S}: READY_TIMEOUT", None,
          "up fails naming the node, with its log"),
    Limit("drain on stop", supervisor.STOP_TIMEOUT, "s", f"{_S}: STOP_TIMEOUT", None,
          "the node is SIGKILLed"),
    Limit("restart backoff", (supervisor.BACKOFF_START, supervisor.BACKOFF_MAX), "s",
          f"{_S}: BACKOFF_START, BACKOFF_MAX", None, "none: restarts slow down"),
    Limit("crash loop", (supervisor.CRASHLOOP_RESTARTS, supervisor.CRASHLOOP_WINDOW), "restarts in s",
          f"{_S}: CRASHLOOP_RESTARTS, CRASHLOOP_WINDOW", None, "status shows the node as crashloop"),
    Limit("log file", supervisor.LOG_MAX_BYTES, "bytes", f"{_S}: LOG_MAX_BYTES (env DMLSYS_LOG_MAX_BYTES), "
          f"LOG_KEEP={supervisor.LOG_KEEP}", None, "none: rotated to NAME.log.1 .. .3"),
    Limit("abandoned save", store.STALE_TMP_S, "s", f"{_T}: STALE_TMP_S", None,
          "none: a .tmp-* directory older than this is removed"),
)


@dataclasses.dataclass(frozen=True)
class Agreement:
    name: str
    holds: bool
    detail: str  # both sides, with their values and where they are set


def check(*, gateway: GatewayConfig | None = None, replica: ReplicaConfig | None = None,
          node: NodeLimits = DEFAULT_NODE_LIMITS, wire: codec.Limits = codec.DEFAULT_LIMITS,
          gateways: int = 1) -> list[Agreement]:
    """The agreements between layers for these configs (defaults where None), each evaluated."""
    g = gateway or _GC
    r = replica or _RC
    b = g.balancer
    coalesced = messages.MAX_ITEMS * (messages.INLINE_MAX + 256)
    in_flight = b.max_in_flight * gateways
    return [
        Agreement("body fits a frame", g.max_body_bytes <= wire.max_frame_bytes,
                  f"gateway max_body_bytes {g.max_body_bytes} <= wire Limits.max_frame_bytes {wire.max_frame_bytes} "
                  "(a body over INLINE_MAX travels as one array frame)"),
        Agreement("coalesced header fits", coalesced <= wire.max_header_bytes * 3 // 4,
                  f"MAX_ITEMS {messages.MAX_ITEMS} x (INLINE_MAX {messages.INLINE_MAX} + 256) = {coalesced} <= 3/4 "
                  f"of Limits.max_header_bytes {wire.max_header_bytes}"),
        Agreement("request head fits a header", HttpLimits().max_head_bytes + messages.INLINE_MAX
                  <= wire.max_header_bytes // 4,
                  f"HttpLimits.max_head_bytes {HttpLimits().max_head_bytes} + INLINE_MAX {messages.INLINE_MAX} <= 1/4 "
                  f"of Limits.max_header_bytes {wire.max_header_bytes} (X-Request-Key travels in the header)"),
        Agreement("door instances <= replica instances", g.max_instances <= r.max_instances,
                  f"gateway max_instances {g.max_instances} <= replica max_instances {r.max_instances} "
                  "(else the door promises what the replica refuses)"),
        Agreement("gateways' in-flight <= node's", in_flight <= node.max_in_flight,
                  f"{gateways} gateway(s) x max_in_flight {b.max_in_flight} = {in_flight} <= replica node "
                  f"NodeLimits.max_in_flight {node.max_in_flight} (else a replica answers NodeBusy)"),
        Agreement("gateways' in-flight <= replica queue", in_flight <= r.max_queue,
                  f"{gateways} gateway(s) x max_in_flight {b.max_in_flight} = {in_flight} <= replica max_queue "
                  f"{r.max_queue} (else a replica answers QueueFull to requests within the balancer's budget)"),
        Agreement("try within deadline", b.try_timeout <= g.deadline,
                  f"try_timeout {b.try_timeout} <= deadline {g.deadline} (a try longer than the request is moot)"),
        Agreement("deadline within node default", g.deadline <= node.default_deadline_s and 600.0 <= codec.MAX_DEADLINE,
                  f"gateway deadline {g.deadline} <= NodeLimits.default_deadline_s {node.default_deadline_s}; "
                  f"X-Deadline-Ms cap 600 s <= wire MAX_DEADLINE {codec.MAX_DEADLINE:g}"),
        Agreement("body read before a stop", g.read_timeout < supervisor.STOP_TIMEOUT,
                  f"read_timeout {g.read_timeout} < supervisor STOP_TIMEOUT {supervisor.STOP_TIMEOUT} "
                  "(a draining door can finish reading the bodies it accepted)"),
    ]


def check_spec(spec) -> list[Agreement]:
    """``check`` for a cluster spec (``dmlsys.cluster.spec.ClusterSpec``): its gateways' configs
    against each replica group's, with as many gateways as the spec starts."""
    from dmlsys.serving import roles

    gateways = [n for n in spec.nodes if n.role == "gateway"]
    replicas = [n for n in spec.nodes if n.role == "replica"]
    count = sum(n.replicas if n.replicas is not None else 1 for n in gateways)
    out: list[Agreement] = []
    for gw in gateways or [None]:
        g = _GC if gw is None else _gateway_config(roles, gw.config)
        for rep in replicas or [None]:
            r = _RC if rep is None else _replica_config(rep.config)
            out.extend(check(gateway=g, replica=r, gateways=max(count, 1)))
    return out


def _gateway_config(roles, config: dict[str, Any]) -> GatewayConfig:
    class _Ctx:  # the little of RoleContext that build_gateway reads
        http = "127.0.0.1:0"
        store = "-"

    ctx = _Ctx()
    ctx.config = {**config, "http": "off"}
    service = roles.build_gateway(ctx)[0]
    return service.config


def _replica_config(config: dict[str, Any]) -> ReplicaConfig:
    keys = {k: config[k] for k in ("max_batch", "max_instances", "max_queue") if k in config}
    return ReplicaConfig(model=str(config.get("model", "-")), store="-", **keys)


def markdown() -> str:
    """``TABLE`` as the Markdown table of ``docs/reliability.md`` (``python -m dmlsys.cluster.limits``)."""
    lines = ["| limit | default | where it is set | spec key (`[nodes.config]`) | what a client sees |",
             "|---|---|---|---|---|"]
    for row in TABLE:
        value = (" / ".join(map(_fmt, row.value)) + f" {row.unit}") if isinstance(row.value, tuple) else _fmt(row.value, row.unit)
        lines.append(f"| {row.name} | {value} | `{row.where}` | {f'`{row.key}`' if row.key else '—'} "
                     f"| {row.error.replace('|', '/')} |")
    return "\n".join(lines)


def _fmt(v: Any, unit: str = "") -> str:
    if unit == "bytes":
        for shift, prefix in ((30, "GiB"), (20, "MiB"), (10, "KiB")):
            if v >= 1 << shift and v % (1 << shift) == 0:
                return f"{v >> shift} {prefix}"
    text = f"{v:g}" if isinstance(v, float) else str(v)
    return f"{text} {unit}".strip()


if __name__ == "__main__":
    print(markdown())
    print()
    for a in check():
        print(f"- **{a.name}** ({'holds' if a.holds else 'FAILS'}): {a.detail}")
