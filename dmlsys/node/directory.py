"""Who is in the cluster: each node's view of its peers, kept fresh from the supervisor.

A node starts with the members its cluster spec lists. When a supervisor runs, the directory
asks it for the member list every ``refresh`` seconds, so nodes added by scaling (or moved by a
restart) become reachable by name without restarting anyone. Services subscribe with ``watch``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import TYPE_CHECKING, Any, Callable, Iterable

if TYPE_CHECKING:
    from dmlsys.node.node import Node

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class Member:
    name: str
    role: str
    address: str  # where its transport listens: tcp://, ipc:// (ZeroMQ) or a SimNetwork name
    admin: str | None = None
    host: str = "local"
    config: dict[str, Any] = dataclasses.field(default_factory=dict, hash=False, compare=True)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Member":
        return cls(d["name"], d["role"], d["address"], d.get("admin"), d.get("host", "local"), dict(d.get("config") or {}))


class Directory:
    """``members(role=...)`` answers from memory; ``watch(cb)`` hears of every change."""

    def __init__(self, members: Iterable[Member] = (), *, supervisor: str | None = None, refresh: float = 1.0) -> None:
        self._members: dict[str, Member] = {m.name: m for m in members}
        self._watchers: list[Callable[[list[Member]], None]] = []
        self.supervisor = supervisor
        self.refresh = refresh
        self._node: "Node" | None = None
        self._task: asyncio.Task | None = None

    def members(self, role: str | None = None) -> list[Member]:
        return [m for m in self._members.values() if role is None or m.role == role]

    def get(self, name: str) -> Member | None:
        return self._members.get(name)

    def watch(self, callback: Callable[[list[Member]], None]) -> None:
        self._watchers.append(callback)

    def update(self, members: Iterable[Member]) -> None:
        """Replace the member list; teach the transport new addresses; tell watchers if it changed."""
        new = {m.name: m for m in members}
        if new == self._members:
            return
        self._members = new
        self._teach_transport()
        for callback in list(self._watchers):
            try:
                callback(self.members())
            except Exception:
                log.exception("directory watcher %r failed", callback)

    def _teach_transport(self) -> None:
        if self._node is None:
            return
        for m in self._members.values():
            if m.name != self._node.name:
                self._node.transport.add_peer(m.name, m.address)

    async def start(self, node: "Node") -> None:
        self._node = node
        self._teach_transport()
        if self.supervisor and self.supervisor != node.name:
            self._task = asyncio.get_running_loop().create_task(self._refresh_loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _refresh_loop(self) -> None:
        assert self._node is not None
        while True:
            try:
                body = await self._node.call(self.supervisor, "cluster", "members", None, timeout=max(self.refresh, 1.0))
                self.update(Member.from_dict(d) for d in body)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the supervisor restarting is routine; keep the last view
                log.debug("directory refresh from %s failed: %s", self.supervisor, e)
            await asyncio.sleep(self.refresh)
