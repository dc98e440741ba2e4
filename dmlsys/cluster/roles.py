"""Roles: what services a node of a given role hosts.

A role is a factory ``build(ctx: RoleContext) -> list[Service]`` living in its subsystem's own
package; this registry names them by "module:function" so that starting a node imports only the
subsystem it needs (a gateway never imports JAX's trainer, a worker never imports aiohttp's door).
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
from pathlib import Path
from typing import Any, Callable

from dmlsys.node import Service, rpc
from dmlsys.node.directory import Member

ROLES: dict[str, str] = {
    "echo": "dmlsys.cluster.roles:build_echo",
    "worker": "dmlsys.collective.roles:build_worker",
    "replica": "dmlsys.serving.roles:build_replica",
    "gateway": "dmlsys.serving.roles:build_gateway",
}


@dataclasses.dataclass(frozen=True)
class ResolvedCluster:
    name: str
    members: tuple[Member, ...]
    store: str  # absolute path of the model store
    state_dir: str
    http: str | None
    supervisor: str  # the supervisor's zmq address

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["members"] = [m.to_dict() for m in self.members]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ResolvedCluster":
        return cls(d["name"], tuple(Member.from_dict(m) for m in d["members"]), d["store"], d["state_dir"],
                   d.get("http"), d["supervisor"])


@dataclasses.dataclass(frozen=True)
class RoleContext:
    name: str
    role: str
    config: dict[str, Any]
    store: Path
    state_dir: Path
    spec: ResolvedCluster


def factory(role: str) -> Callable[[RoleContext], list[Service]]:
    target = ROLES.get(role)
    if target is None:
        raise KeyError(f"unknown role {role!r} (known roles: {', '.join(sorted(ROLES))})")
    module, _, function = target.partition(":")
    return getattr(importlib.import_module(module), function)


class EchoService(Service):
    """A do-nothing service for tests, demos and benchmarks of the node machinery itself."""

    name = "echo"

    @rpc
    def echo(self, body):
        return body

    @rpc
    async def sleep(self, seconds):
        await asyncio.sleep(float(seconds))
        return seconds


def build_echo(ctx: RoleContext) -> list[Service]:
    return [EchoService()]
