"""The pool's hands: start and stop function instances as node processes, through the supervisor.

``SupervisorLauncher`` is ``FunctionPool``'s ``Launcher`` in a cluster. The instances are members
of one node group of the spec (role ``function``, e.g. ``[[nodes]] name = "function"``), started
and stopped one by one with the supervisor's ``cluster.pool_start`` / ``cluster.pool_stop``.

Spares hide the process start. A fresh process spends seconds importing JAX before it can load
anything (docs/events.md, "Cold start"), so the launcher keeps ``spares`` processes of the group
started, warmed and *modelless*. ``start(function)`` takes a spare and tells it its model
(``function.load``: parameters from the store, one compilation from the persistent cache), then
asks the supervisor for a new spare in the background. Only with no spare left does a start
wait for a whole process. Spares are not pool slots: they hold memory, not work, and the pool
counts an instance from the moment it is asked to start.

Deaths: the supervisor tells every node when a member's process exits (``node.peer_lost``); the
launcher hears it (``Node.on_peer_lost``), tells the function pool (``instance_died``: its events
retry elsewhere and a replacement starts), and has the supervisor remove the member rather than
restart it into a modelless process the pool no longer knows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping

from dmlsys.node import Member, Node

log = logging.getLogger(__name__)


class LaunchError(Exception):
    """An instance could not be started (the supervisor refused, or the model would not load)."""


class SupervisorLauncher:
    """Start/stop instances as members of ``group`` through the supervisor; see the module docstring."""

    def __init__(self, node: Node, group: str, models: Mapping[str, tuple[str, int | None]], *, spares: int = 1,
                 supervisor: str = "supervisor", start_timeout: float = 240.0, load_timeout: float = 60.0) -> None:
        self.node, self.group, self.models, self.spares = node, group, models, spares
        self.supervisor, self.start_timeout, self.load_timeout = supervisor, start_timeout, load_timeout
        self.idle: list[str] = []  # spare members, warmed, no model
        self.members: dict[str, str] = {}  # instance -> member name
        self.starting_spares = 0
        self.on_died: Callable[[str], None] | None = None
        self.load_seconds: list[float] = []  # the spare's part of each cold start
        self._tasks: set[asyncio.Task] = set()
        self._adopted = False
        node.on_peer_lost(self._peer_lost)

    async def start_spares(self) -> None:
        """Top the spares up to ``spares`` (in the background). Members of the group the spec
        started at ``up`` and nobody uses yet are adopted as spares first."""
        if not self._adopted:
            self._adopted = True
            used = set(self.members.values())
            for m in self.node.directory.members():
                if m.name.startswith(self.group + "-") and m.name not in used and m.name not in self.idle:
                    self.idle.append(m.name)
        while len(self.idle) + self.starting_spares < self.spares:
            self.starting_spares += 1
            self._spawn(self._new_spare())

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for name in list(self.idle):
            with contextlib.suppress(Exception):
                await self._pool_stop(name)
        self.idle.clear()

    def _spawn(self, coro) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    async def _pool_start(self) -> str:
        row = await self.node.call(self.supervisor, "cluster", "pool_start", {"group": self.group},
                                   timeout=self.start_timeout)
        # Learn its address now: the directory's refresh from the supervisor comes up to a second later.
        member = Member(row["name"], row["role"], row["zmq"])
        self.node.directory.update([*(m for m in self.node.directory.members() if m.name != member.name), member])
        return row["name"]

    async def _pool_stop(self, name: str) -> None:
        await self.node.call(self.supervisor, "cluster", "pool_stop", {"name": name}, timeout=60.0)

    async def _new_spare(self) -> None:
        try:
            name = await self._pool_start()
        except Exception as e:  # noqa: BLE001 - any refusal: logged, retried at the next start
            log.warning("launcher: cannot start a spare in group %r: %s", self.group, e)
            await asyncio.sleep(2.0)  # don't spin on a supervisor that refuses
            return
        finally:
            self.starting_spares -= 1
        self.idle.append(name)

    # -- Launcher ---------------------------------------------------------------------------

    async def start(self, function: str, instance: str) -> str:
        model, version = self.models[function]
        name = self.idle.pop(0) if self.idle else None
        self._spawn(self.start_spares())
        if name is None:
            name = await self._pool_start()  # no spare: a whole process start (seconds)
        self.members[instance] = name
        try:
            reply = await self.node.call(name, "function", "load", {"model": model, "version": version},
                                         timeout=self.load_timeout)
        except Exception as e:
            self.members.pop(instance, None)
            self._spawn(self._pool_stop(name))
            raise LaunchError(f"instance {instance} ({name}) could not load {model!r}: {e}") from e
        self.load_seconds.append(float(reply.get("load_seconds") or 0.0))
        return name

    async def stop(self, instance: str) -> None:
        name = self.members.pop(instance, None)
        if name is not None:
            await self._pool_stop(name)

    def _peer_lost(self, peer: str, reason: str) -> None:
        if peer in self.idle:
            self.idle.remove(peer)
            self._spawn(self._pool_stop(peer))
            self._spawn(self.start_spares())
            return
        for instance, name in list(self.members.items()):
            if name == peer:
                log.warning("launcher: instance %s (%s) %s; replacing it", instance, peer, reason)
                del self.members[instance]
                self._spawn(self._pool_stop(peer))
                if self.on_died is not None:
                    self.on_died(instance)
