"""Roles: what services a node of a given role hosts.

A role is a factory ``build(ctx: RoleContext) -> list[Service]`` living in its subsystem's own
package; this registry names them by "module:function" so that starting a node imports only the
subsystem it needs (a gateway never imports JAX's trainer, a worker never imports aiohttp's door).

A role and the service it hosts: the table in docs/architecture.md maps each role to its
services (the ``worker`` role hosts ``collective`` and ``train``; ``replica`` hosts ``model``;
``gateway`` hosts ``serving``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
from pathlib import Path
from typing import Any, Callable

from dmlsys.node import ConfigError, Service, rpc

ROLES: dict[str, str] = {
    "echo": "dmlsys.assembly.roles:build_echo",
    "worker": "dmlsys.collective.roles:build_worker",
    "replica": "dmlsys.serving.roles:build_replica",
    "gateway": "dmlsys.serving.roles:build_gateway",
    "events": "dmlsys.events.roles:build_events",
    "function": "dmlsys.events.roles:build_function",
    "ps": "dmlsys.ps.roles:build_ps",
    "ps-worker": "dmlsys.ps.roles:build_ps_worker",
    "router": "dmlsys.sharding.roles:build_router",
    "shard": "dmlsys.sharding.roles:build_shard",
}


@dataclasses.dataclass(frozen=True)
class RoleContext:
    """What a role factory is told: its node, its ``[nodes.config]``, and the cluster's places."""

    name: str
    role: str
    config: dict[str, Any]
    store: Path  # the model store
    state_dir: Path  # the cluster's .dmlsys directory (logs, sockets, caches)
    http: str | None = None  # the cluster's HTTP front door (host:port), if the spec has one


def factory(role: str) -> Callable[[RoleContext], list[Service]]:
    """The role's factory. Raises ConfigError naming the role and the known ones."""
    target = ROLES.get(role)
    if target is None:
        raise ConfigError("role", f"one of {', '.join(sorted(ROLES))}, got {role!r}")
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
