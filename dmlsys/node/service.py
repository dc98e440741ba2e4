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
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import TYPE_CHECKING, Any, Callable, ClassVar

if TYPE_CHECKING:
    from dmlsys.node.node import Node

_HANDLER_ATTR = "_dmlsys_handler"


def rpc(fn: Callable) -> Callable:
    """Mark a method as a request/reply handler."""
    setattr(fn, _HANDLER_ATTR, "rpc")
    return fn


def oneway(fn: Callable) -> Callable:
    """Mark a method as a one-way handler: no reply is sent, errors are only logged."""
    setattr(fn, _HANDLER_ATTR, "oneway")
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
                bound, inspect.iscoroutinefunction(fn), len(params) == 2, mode == "oneway"
            )
        return found


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

    @oneway
    def peer_lost(self, body, ctx):
        """``{"name", "reason"}`` from the supervisor, which saw that node's process exit: calls
        waiting on it fail now (``PeerUnreachable``), not at their timeouts. From anyone else: ignored."""
        supervisor = self.node.directory.supervisor
        name = body.get("name") if isinstance(body, dict) else None
        if supervisor is None or ctx.sender != supervisor or not isinstance(name, str):
            self.node.metrics.error("peer_lost_refused")
            return
        self.node.peer_lost(name, str(body.get("reason") or "is gone"))
