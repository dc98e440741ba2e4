"""Cluster specs: a TOML file that names the nodes, their roles, hosts and addresses.

    [cluster]
    name = "local"
    store = ".dmlsys/models"          # model store directory, relative to the working directory
    dashboard = "127.0.0.1:8080"      # the supervisor's web dashboard (left out: none); an admin surface

    [hosts.local]
    address = "127.0.0.1"             # where this host's nodes bind and are reached

    [[nodes]]
    name = "replica"
    role = "replica"
    replicas = 2                      # a group: nodes replica-0 and replica-1, scalable at run time
    zmq = "tcp://127.0.0.1:0"         # 0: a free port is picked at `up`, on the host that runs it;
                                      # left out on a single-host spec: ipc:// under .dmlsys/sock
    admin = "127.0.0.1:0"
    [nodes.config]                    # role-specific; the role's factory validates it
    model = "fashion-mlp"

Several hosts: ``[hosts.NAME]`` with an ``address`` (and optionally ``capacity``, how many nodes
it may run); ``cluster.supervisor`` names the primary host's supervisor at an explicit port (the
one address every host must know in advance). A single node goes on its ``host``; a group's
members are placed on its ``hosts`` by ``placement`` (``"spread"``, the default, or ``"pack"``:
see :mod:`dmlsys.cluster.placement`). Every other port is picked on the host that runs the node.

    [[nodes]]
    name = "replica"
    role = "replica"
    replicas = 4
    hosts = ["alpha", "beta"]         # placed on these, in this order of preference
    placement = "spread"

The spec is validated once, here, at the edge: every error names the file, the key and what was
expected. Inside, the resolved spec is trusted.
"""

from __future__ import annotations

import dataclasses
import random
import re
import socket
import tomllib
from pathlib import Path
from typing import Any

from dmlsys.cluster.errors import ClusterError, SpecError
from dmlsys.node.directory import Member

NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,62}$")
KNOWN_CLUSTER_KEYS = {"name", "store", "supervisor", "http", "state_dir", "train", "tls_cert", "tls_key", "dashboard"}
RESERVED_NAMES = ("supervisor", "cli")  # the supervisor's and the command line's principals (docs/security.md)
KNOWN_NODE_KEYS = {"name", "role", "host", "hosts", "placement", "zmq", "admin", "replicas", "config"}


@dataclasses.dataclass(frozen=True)
class NodeSpec:
    """One ``[[nodes]]`` entry. With ``replicas`` it is a group template, expanded at ``up``."""

    name: str
    role: str
    host: str
    zmq: str
    admin: str | None
    replicas: int | None  # None: a single node; N: a group named name-0 .. name-(N-1)
    config: dict[str, Any]
    zmq_auto: bool = False  # zmq was left out: ipc:// on a single-host cluster, else zmq's tcp default
    hosts: tuple[str, ...] = ()  # a group's allowed hosts (placement order); () means (host,)
    placement: str = "spread"

    @property
    def allowed_hosts(self) -> tuple[str, ...]:
        return self.hosts or (self.host,)

    def member_names(self, count: int | None = None) -> list[str]:
        if self.replicas is None:
            return [self.name]
        return [f"{self.name}-{i}" for i in range(self.replicas if count is None else count)]


@dataclasses.dataclass(frozen=True)
class ClusterSpec:
    path: str
    name: str
    store: str
    supervisor: str
    http: str | None
    train: dict[str, Any]
    hosts: dict[str, str]  # host name -> address
    nodes: tuple[NodeSpec, ...]
    capacity: dict[str, int] = dataclasses.field(default_factory=dict)  # host -> nodes it may run (absent: any)
    dashboard: str | None = None  # HOST:PORT of the supervisor's web dashboard (None: no dashboard)

    @property
    def primary(self) -> str | None:
        """The host whose address the supervisor's is: it runs the primary supervisor (None:
        the supervisor's address is no host's, as on a single-host spec with the default)."""
        address = self.supervisor.removeprefix("tcp://").rsplit(":", 1)[0]
        named = [h for h, a in self.hosts.items() if a == address and h != "local"]
        return named[0] if named else ("local" if self.hosts.get("local") == address else None)

    def placement(self) -> dict[str, str]:
        """Every member's host at ``up``: single nodes on their ``host``, groups placed on
        their ``hosts`` (:func:`dmlsys.cluster.placement.place_all`). The same on every host."""
        from dmlsys.cluster.placement import Group, place_all

        fixed = {n.name: n.host for n in self.nodes if n.replicas is None}
        used: dict[str, int] = {}
        for host in fixed.values():
            used[host] = used.get(host, 0) + 1
        groups = [(Group(n.name, n.allowed_hosts, n.placement), n.replicas) for n in self.nodes if n.replicas is not None]
        return {**fixed, **place_all(groups, capacity=self.capacity, used=used)}

    @property
    def multi_host(self) -> bool:
        return len(self.hosts) > 1 or any(h != "local" for n in self.nodes for h in n.allowed_hosts)

    def node_spec(self, name: str) -> NodeSpec:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def group_of(self, member_name: str) -> NodeSpec | None:
        for n in self.nodes:
            if n.replicas is not None and member_name.rsplit("-", 1)[0] == n.name:
                return n
        return None


def load(path: str | Path) -> ClusterSpec:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise SpecError(path, "(file)", "file not found; pass a spec path or run from the project root "
                        "so that cluster/local.toml exists") from None
    except OSError as e:
        raise SpecError(path, "(file)", f"cannot read: {e.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SpecError(path, "(syntax)", f"not valid TOML: {e}") from None
    return parse(data, path)


def parse(data: dict[str, Any], path: str | Path = "<spec>") -> ClusterSpec:
    def err(key: str, expected: str) -> SpecError:
        return SpecError(path, key, expected)

    unknown = set(data) - {"cluster", "hosts", "nodes"}
    if unknown:
        raise err(sorted(unknown)[0], "unknown top-level table (expected [cluster], [hosts.NAME], [[nodes]])")
    cluster = _table(data.get("cluster", {}), "cluster", err)
    unknown = set(cluster) - KNOWN_CLUSTER_KEYS
    if unknown:
        raise err(f"cluster.{sorted(unknown)[0]}", f"unknown key (known: {', '.join(sorted(KNOWN_CLUSTER_KEYS))})")
    name = _str(cluster.get("name", "local"), "cluster.name", err)
    store = _str(cluster.get("store", ".dmlsys/models"), "cluster.store", err)
    http = cluster.get("http")
    if http is not None:
        _host_port(_str(http, "cluster.http", err), "cluster.http", err)
    train = _table(cluster.get("train", {}), "cluster.train", err)
    dashboard = cluster.get("dashboard")  # an admin surface: give a loopback address unless you mean it
    if dashboard is not None:
        _host_port(_str(dashboard, "cluster.dashboard", err), "cluster.dashboard", err)
    # The front door's certificate: every gateway serves HTTPS with it unless its config names its own.
    tls = {k: _str(cluster[k], f"cluster.{k}", err) for k in ("tls_cert", "tls_key") if k in cluster}
    if len(tls) == 1:
        raise err(f"cluster.{({'tls_cert', 'tls_key'} - set(tls)).pop()}", "a PEM file path: tls_cert and tls_key go together")

    hosts_table = _table(data.get("hosts", {}), "hosts", err)
    hosts: dict[str, str] = {}
    capacity: dict[str, int] = {}
    for host_name, host in hosts_table.items():
        host = _table(host, f"hosts.{host_name}", err)
        unknown = set(host) - {"address", "capacity"}
        if unknown:
            raise err(f"hosts.{host_name}.{sorted(unknown)[0]}", "unknown key (known: address, capacity)")
        hosts[host_name] = _str(host.get("address", ""), f"hosts.{host_name}.address", err)
        if "capacity" in host:
            cap = host["capacity"]
            if not isinstance(cap, int) or isinstance(cap, bool) or not 0 <= cap <= 1024:
                raise err(f"hosts.{host_name}.capacity", f"how many nodes the host may run, 0 to 1024, got {cap!r}")
            capacity[host_name] = cap
    hosts.setdefault("local", "127.0.0.1")

    supervisor = _str(cluster.get("supervisor", f"tcp://{hosts['local']}:0"), "cluster.supervisor", err)
    _zmq_address(supervisor, "cluster.supervisor", err)

    raw_nodes = data.get("nodes", [])
    if not isinstance(raw_nodes, list) or not raw_nodes:
        raise err("nodes", "at least one [[nodes]] entry with a name and a role")
    nodes: list[NodeSpec] = []
    seen: set[str] = {"supervisor"}
    for i, raw in enumerate(raw_nodes):
        where = f"nodes[{i}]"
        raw = _table(raw, where, err)
        unknown = set(raw) - KNOWN_NODE_KEYS
        if unknown:
            raise err(f"{where}.{sorted(unknown)[0]}", f"unknown key (known: {', '.join(sorted(KNOWN_NODE_KEYS))})")
        node_name = _str(raw.get("name"), f"{where}.name", err)
        if not NAME_RE.match(node_name):
            raise err(f"{where}.name", f"{node_name!r} is not a valid node name (letters, digits, _ . -; starts with a letter)")
        if node_name in RESERVED_NAMES or node_name.startswith("cli-"):
            raise err(f"{where}.name", f"{node_name!r} is reserved (supervisor, cli and cli-* name the supervisor and "
                      f"the command line, whose keys are theirs)")
        where = f"nodes.{node_name}"
        role = _str(raw.get("role"), f"{where}.role", err)
        host = _str(raw.get("host", "local"), f"{where}.host", err)
        if host not in hosts:
            raise err(f"{where}.host", f"unknown host {host!r} (define it under [hosts.{host}] with an address)")
        replicas = raw.get("replicas")
        if replicas is not None and (not isinstance(replicas, int) or isinstance(replicas, bool) or not 0 <= replicas <= 64):
            raise err(f"{where}.replicas", f"an integer from 0 to 64, got {replicas!r}")
        allowed: tuple[str, ...] = ()
        if "hosts" in raw:
            value = raw["hosts"]
            if replicas is None:
                raise err(f"{where}.hosts", "a group's key (with `replicas = N`); a single node names its `host`")
            if "host" in raw:
                raise err(f"{where}.hosts", "either host (all members there) or hosts (placed on these), not both")
            if not isinstance(value, list) or not value or len(set(map(str, value))) != len(value):
                raise err(f"{where}.hosts", f"a non-empty list of host names without repeats, got {value!r}")
            for h in value:
                if h not in hosts:
                    raise err(f"{where}.hosts", f"unknown host {h!r} (define it under [hosts.{h}] with an address)")
            allowed = tuple(value)
        placement = raw.get("placement", "spread")
        if placement not in ("spread", "pack"):
            raise err(f"{where}.placement", f'"spread" or "pack", got {placement!r}')
        zmq_auto = "zmq" not in raw
        zmq = _str(raw.get("zmq", f"tcp://{hosts[host]}:0"), f"{where}.zmq", err)
        _zmq_address(zmq, f"{where}.zmq", err)
        admin = raw.get("admin", "127.0.0.1:0")  # admin endpoints stay on loopback unless configured
        if admin is not None:
            _host_port(_str(admin, f"{where}.admin", err), f"{where}.admin", err)
        config = _table(raw.get("config", {}), f"{where}.config", err)
        if role == "gateway" and tls and not ({"tls_cert", "tls_key"} & set(config)):
            config = {**config, **tls}
        if role == "gateway" and replicas is not None and "reuse_port" not in config and _door_shares_ports():
            # A gateway group shares one HTTP address: every member binds it with SO_REUSEPORT and
            # the kernel spreads new connections over the live ones, so the door stays open while
            # one member dies and restarts (docs/reliability.md, "The front door").
            config = {**config, "reuse_port": True}
        if len(allowed) > 1 and not zmq_auto and not zmq.startswith("ipc://"):
            raise err(f"{where}.zmq", "left out for a group placed on several hosts: each member binds its own "
                      "host's address, on a port picked there")
        spec = NodeSpec(node_name, role, host, zmq, admin, replicas, config, zmq_auto, allowed, placement)
        for member in spec.member_names():
            if member in seen:
                raise err(f"{where}.name", f"duplicate node name {member!r}")
            seen.add(member)
        nodes.append(spec)

    result = ClusterSpec(str(path), name, store, supervisor, http, train, hosts, tuple(nodes), capacity, dashboard)
    if result.multi_host:
        # Ports are picked on the host that runs each node and reported to the primary when its host
        # joins; only the primary's supervisor must be where every host can find it without asking.
        if supervisor.endswith(":0") or supervisor.startswith("ipc://"):
            raise err("cluster.supervisor", "an explicit tcp://ADDRESS:PORT on a multi-host spec: the primary "
                      "host's supervisor, where every other host joins")
        if result.primary is None:
            raise err("cluster.supervisor", f"the address of one of the hosts ({', '.join(f'{h} {a}' for h, a in hosts.items() if h != 'local')}): "
                      "the host that runs the primary supervisor")
    try:
        result.placement()
    except ClusterError as e:
        raise err("hosts", str(e)) from None
    return result


def _door_shares_ports() -> bool:
    """Whether the gateway role takes ``reuse_port`` (SO_REUSEPORT on the front door's socket)."""
    from dmlsys.serving.roles import GATEWAY_KEYS

    return "reuse_port" in GATEWAY_KEYS


# AF_UNIX paths hold 107 bytes; a longer socket path falls back to a TCP port.
MAX_IPC_PATH = 100


def resolve_member(node: NodeSpec, name: str, *, ipc_dir: str | Path | None = None, host: str | None = None,
                   host_address: str | None = None) -> Member:
    """Fix a member's addresses: ``:0`` becomes a free port now, so peers can be told in advance.

    With ``ipc_dir`` (single-host clusters), a node whose spec leaves ``zmq`` out binds
    ``ipc://IPC_DIR/NAME`` instead: a Unix socket skips the TCP stack (small RPCs at 0.65x raw
    pyzmq's throughput over ipc against 0.49x over TCP loopback, serving +10 % at 4 replicas).
    """
    zmq = node.zmq
    if node.zmq_auto and host_address is not None:  # a group member placed on `host`: bind its address
        zmq = f"tcp://{host_address}:0"
    if node.zmq_auto and ipc_dir is not None and len(f"{Path(ipc_dir).resolve()}/{name}") <= MAX_IPC_PATH:
        zmq = f"ipc://{Path(ipc_dir).resolve()}/{name}"
    elif zmq.endswith(":0"):
        bind = zmq[len("tcp://"):].rsplit(":", 1)[0]
        zmq = f"tcp://{bind}:{free_port(bind)}"
    elif zmq.startswith("ipc://") and node.replicas is not None:
        zmq = f"{zmq}.{name}"
    admin = node.admin
    if admin is not None and admin.endswith(":0"):
        bind = admin.rsplit(":", 1)[0]
        admin = f"{bind}:{free_port(bind)}"
    return Member(name, node.role, zmq, admin, host or node.host, dict(node.config))


_handed_out: set[int] = set()  # ports this process picked: never picked twice


def free_port(host: str = "127.0.0.1", rng: random.Random = random.SystemRandom()) -> int:
    """A port that can be bound on ``host`` now, below the kernel's ephemeral range.

    The node binds it a moment later. A port from the ephemeral range could be taken in
    between by any outgoing connection on the machine (a load generator's, a proxy's); below it
    only another explicit bind can race us, and the node's bind failure names the port. A port
    is never handed out twice by one process, so the members of one cluster never collide."""
    low = _ephemeral_low()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(64):
        port = rng.randrange(max(1024, low // 2), low)
        if port in _handed_out:
            continue
        _handed_out.add(port)
        with socket.socket(family) as s:
            try:
                s.bind((host, port))
                return port
            except OSError:
                continue
    with socket.socket(family) as s:  # a crowded range: let the kernel choose
        s.bind((host, 0))
        return s.getsockname()[1]


def _ephemeral_low() -> int:
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768  # Linux's default
    return low if low >= 4096 else 32768


def port_in_use(address: str) -> bool:
    """Whether a tcp://host:port or host:port can be bound right now."""
    if address.startswith("ipc://"):
        return False
    host, port = address.removeprefix("tcp://").rsplit(":", 1)
    if port in ("0", "*"):
        return False
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, int(port)))
        except OSError:
            return True
    return False


# -- validation helpers ---------------------------------------------------------------------------


def _table(value: Any, key: str, err) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise err(key, f"a table, got {type(value).__name__}")
    return value


def _str(value: Any, key: str, err) -> str:
    if not isinstance(value, str) or not value:
        raise err(key, f"a non-empty string, got {value!r}")
    return value


def _host_port(value: str, key: str, err) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise err(key, f"HOST:PORT with a port from 0 to 65535, got {value!r}")
    return host, int(port)


def _zmq_address(value: str, key: str, err) -> None:
    if value.startswith("ipc://"):
        if len(value) <= len("ipc://"):
            raise err(key, "an ipc:// path")
        return
    if not value.startswith("tcp://"):
        raise err(key, f"a tcp://HOST:PORT or ipc://PATH address, got {value!r}")
    _host_port(value[len("tcp://"):], key, err)


@dataclasses.dataclass(frozen=True)
class ResolvedCluster:
    """The spec with every member's addresses fixed: what the supervisor writes to
    ``.dmlsys/resolved.json`` for its node processes."""

    name: str
    members: tuple[Member, ...]
    store: str  # absolute path of the model store
    state_dir: str
    http: str | None
    supervisor: str  # the supervisor's address

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["members"] = [m.to_dict() for m in self.members]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ResolvedCluster":
        return cls(d["name"], tuple(Member.from_dict(m) for m in d["members"]), d["store"], d["state_dir"],
                   d.get("http"), d["supervisor"])
