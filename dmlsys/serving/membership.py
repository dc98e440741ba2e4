"""Membership: which replicas serve each model, and what the last probe saw of each.

The active half of health checking; the passive half (outlier ejection of a replica that fails
requests) is the pool's, :meth:`dmlsys.serving.policies.Pool.record_failure`, fed by the
balancer with each request's outcome.

* **Who.** Replicas are the directory's members of role ``replica``, grouped by their config's
  ``model`` (only the configured ``models``, if any). ``node.directory.watch`` tells us of
  scaling; a newcomer is probed at once and gets traffic only after a probe finds it ready.
* **Probes.** Every ``probe_period`` each replica is asked ``node.status``: ready, draining,
  which version it serves. No answer within ``probe_timeout`` counts as not ready. A replica
  that is ready on a version it may not serve (``may_serve`` says no: see
  :mod:`dmlsys.serving.versions`) is kept out of rotation as if draining.
* **Loss.** When the supervisor reports a replica's process gone (``node.peer_lost``), its
  in-flight tries have already failed over; it gets nothing new until a probe finds its next
  incarnation ready.
* **Held.** A replica a rollout holds (``hold``) counts as draining, whatever it says, until
  ``release``.

Whenever a probe may have made a replica eligible, ``on_change(model)`` is called, so that a
request queued for that model can take it.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import Callable

from dmlsys.node import Member, NodeStopped, PeerUnreachable, RemoteError, RpcTimeout
from dmlsys.serving.policies import Pool

log = logging.getLogger(__name__)


class Membership:
    """The pools of a balancer (one per model), kept current by the directory and by probes."""

    def __init__(self, node, *, new_pool: Callable[[str], Pool], models: tuple[str, ...] = (),
                 probe_period: float = 0.5, probe_timeout: float = 1.0,
                 may_serve: Callable[[Pool, str, int], bool] = lambda pool, name, version: True,
                 on_change: Callable[[str], None] = lambda model: None) -> None:
        self.node = node
        self.new_pool = new_pool
        self.models = models
        self.probe_period = probe_period
        self.probe_timeout = probe_timeout
        self.may_serve = may_serve
        self.on_change = on_change
        self.pools: dict[str, Pool] = {}
        self.held: set[str] = set()  # replicas a rollout keeps from new requests
        self._probe_task: asyncio.Task | None = None

    def set_members(self, members: list[Member]) -> None:
        by_model: dict[str, list[str]] = collections.defaultdict(list)
        for m in members:
            model = m.config.get("model") if m.role == "replica" else None
            if model and (not self.models or model in self.models):
                by_model[model].append(m.name)
        for model in set(self.pools) | set(by_model) | set(self.models):
            pool = self.pools.get(model)
            if pool is None:
                pool = self.pools[model] = self.new_pool(model)
            pool.set_members(by_model.get(model, []))

    async def start(self) -> None:
        self.set_members(self.node.directory.members())
        self.node.directory.watch(self._on_directory)
        self.node.on_peer_lost(self._on_peer_lost)
        await self.probe_all()
        self._probe_task = asyncio.get_running_loop().create_task(self._probe_loop())

    async def stop(self) -> None:
        if self._probe_task is not None:
            self._probe_task.cancel()
            await asyncio.gather(self._probe_task, return_exceptions=True)
            self._probe_task = None

    def _on_directory(self, members: list[Member]) -> None:
        self.set_members(members)
        asyncio.get_running_loop().create_task(self.probe_all())  # newcomers get a chance at once

    def _on_peer_lost(self, name: str, reason: str) -> None:
        for pool in self.pools.values():
            if name in pool.replicas:
                pool.observe(name, ready=False, serving=False)

    # -- held replicas (a rollout's) ------------------------------------------------------

    def hold(self, pool: Pool, name: str) -> None:
        """Send ``name`` nothing new until ``release``; requests in flight finish."""
        self.held.add(name)
        r = pool.replicas.get(name)
        if r is not None:
            r.draining = True

    def release(self, pool: Pool, name: str) -> None:
        self.held.discard(name)
        r = pool.replicas.get(name)
        if r is not None:
            r.draining = False
        self.on_change(pool.model)

    # -- probes ---------------------------------------------------------------------------

    async def _probe_loop(self) -> None:
        while True:
            await asyncio.sleep(self.probe_period)
            try:
                await self.probe_all()
            except Exception:  # a probe round must never end the loop
                log.exception("probe round failed")

    async def probe_all(self) -> None:
        targets = [(pool, name) for pool in self.pools.values() for name in list(pool.replicas)]
        await asyncio.gather(*(self.probe(pool, name) for pool, name in targets))

    async def probe(self, pool: Pool, name: str) -> None:
        try:
            st = await self.node.call(name, "node", "status", None, timeout=self.probe_timeout)
        except (RpcTimeout, PeerUnreachable, RemoteError, NodeStopped):
            pool.observe(name, ready=False, serving=False)
            return
        model = (st.get("services") or {}).get("model") or {}
        state, version = st.get("state"), model.get("version")
        if state == "ready" and version is not None and not self.may_serve(pool, name, version):
            pool.observe(name, ready=False, serving=False, draining=True, version=version)
            return
        pool.observe(name, ready=state == "ready", serving=bool(model.get("serving")) and state in ("ready", "alive"),
                     draining=state == "draining" or name in self.held, version=version)
        self.on_change(pool.model)
