"""Rolling update: move every replica of a model to a new version without failing a request.

One replica at a time, in name order: hold it (no new requests; see ``Membership.hold``), wait
for its in-flight requests (at most ``drain_timeout``), reload it, wait until a probe sees it
ready on the new version (at most ``ready_timeout``), release it, move on. A replica that is the
only one ready is not held: it reloads in place and keeps answering with the old version until
the swap (the replica builds the new version beside the old one). The version pin
(:mod:`dmlsys.serving.versions`) moves only when every replica has moved.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from dmlsys.node import PeerUnreachable, RemoteError, RpcTimeout
from dmlsys.serving.errors import RolloutError, UnknownModel
from dmlsys.serving.membership import Membership
from dmlsys.serving.policies import Pool
from dmlsys.serving.versions import VersionPins

log = logging.getLogger(__name__)


class Rollout:
    def __init__(self, node, membership: Membership, pins: VersionPins, *, poll: float = 0.05,
                 drain_timeout: float = 30.0) -> None:
        self.node = node
        self.membership = membership
        self.pins = pins
        self.poll = poll
        self.drain_timeout = drain_timeout

    async def run(self, model: str, version: int | None, *, ready_timeout: float = 300.0) -> dict[str, Any]:
        """Reload every replica of ``model`` to ``version`` (None: latest), one at a time.

        Returns ``{"model", "replicas": [{"replica", "version", "previous"}]}``. Raises
        UnknownModel, or RolloutError naming the replica where it stopped and those done.
        """
        pool = self.membership.pools.get(model)
        if pool is None:
            raise UnknownModel(model, list(self.membership.pools))
        done: list[dict[str, Any]] = []
        moved_to = None
        self.pins.begin_rollout(model)
        try:
            for name in sorted(pool.replicas):
                if name in pool.replicas:  # else it left while we were busy with another
                    done.append(await self._one(pool, name, version, ready_timeout, done))
            moved_to = done[-1]["version"] if done else None
            return {"model": model, "replicas": done}
        finally:
            self.pins.end_rollout(model, moved_to)

    async def _one(self, pool: Pool, name: str, version: int | None, ready_timeout: float,
                   done: list[dict[str, Any]]) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        r = pool.replicas[name]
        if any(x.name != name and x.ready and not x.draining for x in pool.replicas.values()):
            self.membership.hold(pool, name)
            t_end = loop.time() + self.drain_timeout
            while r.in_flight and loop.time() < t_end:
                await asyncio.sleep(0.01)
        try:
            reply = await self.node.call(name, "model", "reload", {"version": version}, timeout=ready_timeout)
            t_end = loop.time() + ready_timeout
            while True:  # traffic returns only once a probe sees it ready on the new version
                await self.membership.probe(pool, name)
                if r.ready and r.version == reply["version"]:
                    break
                if loop.time() > t_end:
                    raise RolloutError(f"replica {name} of {pool.model!r} not ready on v{reply['version']} "
                                       f"within {ready_timeout:g}s; the rollout stopped there")
                await asyncio.sleep(self.poll)
        except (RemoteError, RpcTimeout, PeerUnreachable) as e:
            raise RolloutError(f"reloading replica {name} of {pool.model!r} to "
                               f"{'latest' if version is None else f'v{version}'} failed: {e}; "
                               f"replicas done so far: {[d['replica'] for d in done]}") from None
        finally:
            self.membership.release(pool, name)
        log.info("rollout of %s: %s now on v%s", pool.model, name, reply["version"])
        return {"replica": name, "version": reply["version"], "previous": reply.get("previous")}
