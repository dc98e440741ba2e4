"""Services are what nodes host: a class with a name and handlers marked ``@rpc`` or ``@oneway``.

    class Echo(Service):
        name = "echo"

        @rpc
        def echo(self, body):              # plain functions answer inline: the fast path
            return body

        @rpc
        async def slow(self, body, ctx):   # coroutines run as tasks; ctx is optional
            await asyncio.sleep(body)
            return ctx.sender

A handler takes ``body`` and, if it declares a second parameter, a ``CallContext``. Whatever it
returns is the reply body; whatever it raises reaches the caller as a ``RemoteError`` with the
exception's type name and message.

Who may call a handler is declared on it, and checked by the node before it runs::

        @rpc(allow=ADMIN)                  # the supervisor, the CLI and "client" members only
        async def shutdown(self, body): ...

A handler without ``allow`` answers every member. The caller is the principal its connection
authenticated as when the transport authenticates (CURVE, docs/security.md), else the sender
its header names; a refused call gets a ``NotAllowed`` error and is counted.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import TYPE_CHECKING, Any, Callable, ClassVar

if TYPE_CHECKING:
    from dmlsys.node.node import Node

_HANDLER_ATTR = "_dmlsys_handler"
_ALLOW_ATTR = "_dmlsys_allow"


@dataclasses.dataclass(frozen=True, slots=True)
class Allow:
    """Who may call a handler: principals by name, and members of the directory by role.

    ``Allow(names={"supervisor"}) | Allow(roles={"gateway"})`` admits the supervisor and every
    member whose directory entry says role "gateway". Roles come from the member list, which
    is the supervisor's word (its replies are accepted only from it)."""

    names: frozenset[str] = frozenset()
    roles: frozenset[str] = frozenset()

    def __or__(self, other: "Allow") -> "Allow":
        return Allow(self.names | other.names, self.roles | other.roles)

    def admits(self, principal: str, role: str | None) -> bool:
        return principal in self.names or (role is not None and role in self.roles)

    def __str__(self) -> str:
        return ", ".join([*sorted(self.names), *(f"role {r}" for r in sorted(self.roles))]) or "nobody"


def allow(*names: str, roles: tuple[str, ...] = ()) -> Allow:
    return Allow(frozenset(names), frozenset(roles))


SUPERVISOR = allow("supervisor")
# Administration: the supervisor, the command line (every ``cli-*`` client acts as ``cli``), and
# members of role "client" (drivers such as the pipeline's trainer, placed by the operator).
ADMIN = allow("supervisor", "cli", roles=("client",))


def rpc(fn: Callable | None = None, *, allow: Allow | None = None) -> Callable:
    """Mark a method as a request/reply handler: ``@rpc``, or ``@rpc(allow=ADMIN)``."""
    if fn is None:
        return lambda f: rpc(f, allow=allow)
    setattr(fn, _HANDLER_ATTR, "rpc")
    setattr(fn, _ALLOW_ATTR, allow)
    return fn


def oneway(fn: Callable | None = None, *, allow: Allow | None = None) -> Callable:
    """Mark a method as a one-way handler: no reply is sent, errors are only logged."""
    if fn is None:
        return lambda f: oneway(f, allow=allow)
    setattr(fn, _HANDLER_ATTR, "oneway")
    setattr(fn, _ALLOW_ATTR, allow)
    return fn


@dataclasses.dataclass(slots=True)
class CallContext:
    sender: str
    method: str
    deadline: float | None  # loop time at which the caller gives up, if it said
    node: "Node"


@dataclasses.dataclass(frozen=True, slots=True)
class Handler:
    fn: Callable
    is_async: bool
    wants_context: bool
    oneway: bool
    allow: Allow | None = None  # None: every member may call it


class Service:
    """Base class. Subclasses set ``name`` and may override ``start``, ``stop`` and ``status``."""

    name: ClassVar[str] = ""
    node: "Node"

    async def start(self, node: "Node") -> None:
        """Called once when the node starts, in the order services were added."""
        self.node = node

    async def stop(self) -> None:
        """Called once when the node stops, in reverse order, after in-flight calls drained."""

    def status(self) -> dict[str, Any]:
        """Extra fields for the node's ``/status`` document."""
        return {}

    def handlers(self) -> dict[str, Handler]:
        found = {}
        for attr in dir(type(self)):
            fn = getattr(type(self), attr, None)
            mode = getattr(fn, _HANDLER_ATTR, None)
            if mode is None:
                continue
            bound = getattr(self, attr)
            params = list(inspect.signature(bound).parameters)
            if len(params) not in (1, 2):
                raise TypeError(f"handler {type(self).__name__}.{attr} must take (body) or (body, ctx), takes {params}")
            found[f"{self.name}.{attr}"] = Handler(
                bound, inspect.iscoroutinefunction(fn), len(params) == 2, mode == "oneway", getattr(fn, _ALLOW_ATTR, None)
            )
        return found

    def acl(self) -> dict[str, Allow | None]:
        """``{"service.method": who may call it}``: this service's access rules, for review."""
        return {method: handler.allow for method, handler in self.handlers().items()}


class Gate:
    """One condition of readiness ("model loaded", "peers connected"). Closed until opened."""

    __slots__ = ("name", "reason", "_on_change")

    def __init__(self, name: str, reason: str, on_change: Callable[[], None]) -> None:
        self.name = name
        self.reason: str | None = reason
        self._on_change = on_change

    @property
    def is_open(self) -> bool:
        return self.reason is None

    def open(self) -> None:
        if self.reason is not None:
            self.reason = None
            self._on_change()

    def close(self, reason: str) -> None:
        if not reason:
            raise ValueError(f"gate {self.name!r} needs a reason to close (it is shown by /readyz)")
        if self.reason != reason:
            self.reason = reason
            self._on_change()


class NodeService(Service):
    """Built into every node: what balancers and supervisors probe."""

    name = "node"

    @rpc
    def status(self, body=None):  # doubles as the Service.status hook, which Node.status skips
        return self.node.status()

    @rpc
    def ping(self, body):
        return {"state": self.node.state.value, "failing_gates": self.node.failing_gates}

    @oneway(allow=SUPERVISOR)
    def peer_lost(self, body, ctx):
        """``{"name", "reason"}`` from the supervisor, which saw that node's process exit: calls
        waiting on it fail now (``PeerUnreachable``), not at their timeouts. From anyone else: ignored."""
        supervisor = self.node.directory.supervisor
        name = body.get("name") if isinstance(body, dict) else None
        if supervisor is None or ctx.sender != supervisor or not isinstance(name, str):
            self.node.metrics.error("peer_lost_refused")
            return
        self.node.peer_lost(name, str(body.get("reason") or "is gone"))
