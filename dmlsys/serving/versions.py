"""One version per model: the version a model is served at changes only by a rollout.

The first version seen ready is pinned, and a rollout pins the version it rolled out. A replica
that comes up on another version (restarted after a rollback, or started after a newer version
was trained but not rolled out, both of which load "latest") gets no traffic: ``may_serve`` says
no, and the replica is reloaded to the pinned version in the background, then probed again. A
reload that fails is retried no sooner than ``retry_after`` seconds later; the replica stays out
of rotation meanwhile. While a rollout changes a model's version, every version may serve.

**Shared between gateways.** A cluster with several gateways (a gateway group sharing the front
door's port) must serve one version per model, not one per gateway: else a gateway that missed a
rollout sees replicas on the new version and reloads them back. The pins then live with the
supervisor (``cluster.pins``, see :mod:`dmlsys.cluster.supervisor`): a gateway asks for them
before its first probe (a restarted gateway starts on the current pins), then every
``SYNC_PERIOD`` seconds (one that missed an update converges), and the supervisor pushes them to
every gateway when a rollout begins and ends (``apply``). What a gateway pinned first (no pin yet
anywhere) it reports, and the first report wins; what a rollout run on it moved a model to
(``serving.rollout`` asked of one gateway directly) it reports too, and that replaces the
cluster's pin. A model the supervisor says is ``rolling`` may serve at every version on every
gateway, as on the one that runs the rollout.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

from dmlsys.node import NodeStopped, PeerUnreachable, RemoteError, RpcTimeout
from dmlsys.serving.policies import Pool

log = logging.getLogger(__name__)

SYNC_PERIOD = 1.0  # seconds between a gateway's asks for the cluster's pins


class VersionPins:
    """``pinned[model]``: the version ``model`` is served at."""

    def __init__(self, node, *, reprobe: Callable[[Pool, str], Awaitable[None]], retry_after: float = 30.0,
                 reload_timeout: float = 300.0) -> None:
        self.node = node
        self.reprobe = reprobe
        self.retry_after = retry_after
        self.reload_timeout = reload_timeout
        self.pinned: dict[str, int] = {}
        self._rolling: set[str] = set()  # models a rollout (run here) is changing the version of
        self._shared_rolling: set[str] = set()  # models a rollout run anywhere is changing, as the cluster says
        self.seq = -1  # the cluster's pins last applied (a reply older than that is ignored)
        self.changed: dict[str, int] = {}  # pins a rollout here moved, not yet reported to the cluster
        self._aligning: dict[str, asyncio.Task] = {}  # replica -> its reload to the pinned version
        self._align_failed: dict[str, float] = {}  # replica -> when its last such reload failed

    def may_serve(self, pool: Pool, name: str, version: int) -> bool:
        """Whether replica ``name``, ready on ``version``, may serve; if not, start reloading it."""
        if pool.model in self._rolling or pool.model in self._shared_rolling:
            return True
        pinned = self.pinned.setdefault(pool.model, version)
        if version == pinned:
            return True
        loop = asyncio.get_running_loop()
        failed_at = self._align_failed.get(name)
        if name not in self._aligning and (failed_at is None or loop.time() - failed_at > self.retry_after):
            log.warning("replica %s came up on %s v%s, but v%s is served: reloading it to v%s before it "
                        "gets traffic", name, pool.model, version, pinned, pinned)
            task = loop.create_task(self._align(pool, name, pinned))
            self._aligning[name] = task
            task.add_done_callback(lambda _: self._aligning.pop(name, None))
        return False

    async def _align(self, pool: Pool, name: str, version: int) -> None:
        try:
            await self.node.call(name, "model", "reload", {"version": version}, timeout=self.reload_timeout)
        except (RemoteError, RpcTimeout, PeerUnreachable, NodeStopped) as e:
            self._align_failed[name] = asyncio.get_running_loop().time()
            log.warning("reloading replica %s to %s v%s failed (%s); it stays out of rotation", name, pool.model,
                        version, e)
            return
        self._align_failed.pop(name, None)
        await self.reprobe(pool, name)

    # -- rollouts -------------------------------------------------------------------------

    def begin_rollout(self, model: str) -> None:
        self._rolling.add(model)

    def end_rollout(self, model: str, version: int | None) -> None:
        """``version``: what a finished rollout moved every replica to, or None. A rollout that
        stopped halfway (or moved nothing) passes None: the old version stays pinned, and the
        replicas it did move are reloaded back, so a model is never served at two versions for long."""
        if version is not None:
            self.pinned[model] = version
            self.changed[model] = version
        self._rolling.discard(model)

    def reported(self, sent: dict[str, int]) -> None:
        """The cluster took the changes in ``sent`` (what ``changed`` was when they were sent)."""
        for model, version in sent.items():
            if self.changed.get(model) == version:
                del self.changed[model]

    def apply(self, shared: dict) -> bool:
        """The cluster's pins ``{"pinned": {model: version}, "rolling": [model], "seq": n}``: they
        replace this gateway's (except for a model a rollout run here is changing). A document older
        than one already applied is ignored. Returns whether it was applied."""
        seq = shared.get("seq")
        if not isinstance(seq, int) or seq < self.seq:
            return False
        self.seq = seq
        self._shared_rolling = {m for m in shared.get("rolling") or () if isinstance(m, str)}
        for model, version in (shared.get("pinned") or {}).items():
            if (isinstance(version, int) and model not in self._rolling and model not in self.changed
                    and self.pinned.get(model) != version):
                log.info("%s: the cluster serves v%s (this gateway pinned %s)", model, version,
                         f"v{self.pinned[model]}" if model in self.pinned else "none")
                self.pinned[model] = version
        return True

    async def stop(self) -> None:
        tasks = list(self._aligning.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
