"""Nodes: host services, make and answer RPCs, expose health, readiness and metrics."""

from dmlsys.node.config import ConfigError
from dmlsys.node.directory import Directory, Member
from dmlsys.node.errors import NodeError, NodeStopped, PeerUnreachable, RemoteError, RpcTimeout
from dmlsys.node.limits import DEFAULT_NODE_LIMITS, NodeLimits
from dmlsys.node.node import Node, State
from dmlsys.node.service import ADMIN, SUPERVISOR, Allow, CallContext, Gate, Service, allow, oneway, rpc

__all__ = [
    "Node", "State", "Directory", "Member", "ConfigError", "Service", "Gate", "CallContext", "rpc", "oneway",
    "Allow", "allow", "ADMIN", "SUPERVISOR",
    "NodeError", "NodeStopped", "PeerUnreachable", "RemoteError", "RpcTimeout", "NodeLimits", "DEFAULT_NODE_LIMITS",
]
