"""Transport factories: how the assembly point gives each node its transport.

A factory makes the transport for a node name and the address it should listen on, and knows
the address a node gets when nobody chose one. The two kinds mirror ``dmlsys.wire``'s seam:
ZeroMQ sockets for real processes and hosts, and a ``SimNetwork`` where a whole cluster runs
in one process on virtual time. Nothing above this layer names a concrete transport.
"""

from __future__ import annotations

from typing import Protocol

from dmlsys.wire import DEFAULT_LIMITS, Limits, Transport
from dmlsys.wire.curve import ClusterKey
from dmlsys.wire.sim import SimNetwork
from dmlsys.wire.zmq_transport import ZmqTransport


class Transports(Protocol):
    """Makes a node's transport; ``default_address`` is where a node listens unless told."""

    kind: str

    def default_address(self, name: str) -> str: ...

    def __call__(self, name: str, address: str) -> Transport: ...


class ZmqTransports:
    """ZeroMQ: ``tcp://HOST:0`` by default (a free port, the bound one is read back after start).

    ``keys``: the cluster's ``ClusterKey``; every transport made then speaks CURVE and admits
    only members of that cluster (docs/security.md). None: no authentication, as in tests."""

    kind = "zmq"

    def __init__(self, host: str = "127.0.0.1", *, limits: Limits = DEFAULT_LIMITS,
                 keys: ClusterKey | None = None) -> None:
        self.host = host
        self.limits = limits
        self.keys = keys

    def default_address(self, name: str) -> str:
        return f"tcp://{self.host}:0"

    def __call__(self, name: str, address: str) -> Transport:
        return ZmqTransport(name, address, limits=self.limits, keys=self.keys)


class SimTransports:
    """The simulated network: every node is reachable by its name; addresses are ``sim://NAME``."""

    kind = "sim"

    def __init__(self, net: SimNetwork) -> None:
        self.net = net

    def default_address(self, name: str) -> str:
        return f"sim://{name}"

    def __call__(self, name: str, address: str) -> Transport:
        return self.net.transport(name)
