"""The balancer's I/O shell: probes, queueing, retries, membership and rolling updates.

The decisions live in :mod:`dmlsys.serving.policies`; this module feeds them what the network
shows and acts on their answers:

* **Membership.** Replicas are the directory's members of role ``replica``, grouped by their
  config's ``model``. ``node.directory.watch`` tells us of scaling; a new replica gets traffic
  only after a probe finds it ready.
* **Active probes.** Every ``probe_period`` each replica is asked ``node.status``: ready,
  draining, which version it serves. No answer within ``probe_timeout`` counts as not ready.
* **Queue.** A replica takes at most ``max_in_flight`` requests; when every eligible one is
  full, requests wait in a FIFO of at most ``max_queue`` (then 503 ``Overloaded``).
* **Retries.** A try that times out (``try_timeout``), cannot be sent, or is refused by a
  loading or draining replica is retried once on another replica, if the request's deadline
  leaves time. A timed-out try may have run on the dead replica, and that is fine here: a
  prediction has no side effects, so running it twice costs only CPU. ``BadInput`` is never
  retried: it would fail anywhere.
* **Rolling update.** ``rollout(model, version)`` holds one replica at a time (no new
  requests), waits for its in-flight requests, reloads it, waits for a probe to see it ready
  with the new version, releases it, and moves on. With one replica it reloads in place; the
  replica keeps answering with the old version until the swap.
* **One version per model.** The version a model is served at changes only by a rollout: the
  first version seen ready is pinned, and a rollout pins the version it rolled out. A replica
  that comes up on another version (restarted after a rollback, or started after a newer
  version was trained but not rolled out, both of which load "latest") gets no traffic; the
  balancer reloads it to the pinned version first.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import random
from typing import Any

from dmlsys.node import Member, NodeStopped, PeerUnreachable, RemoteError, RpcTimeout
from dmlsys.serving.errors import (RETRIABLE_REMOTE, BadInput, DeadlineExceeded, NoReplicaReady, Overloaded,
                                   RolloutError, ServingError, UnknownModel, from_remote)
from dmlsys.serving.policies import DEFAULT_POLICY, EjectionConfig, Pool, Replica, make_policy

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class BalancerConfig:
    policy: str = DEFAULT_POLICY
    probe_period: float = 0.5
    probe_timeout: float = 1.0
    try_timeout: float = 2.0  # one try; the request's deadline bounds the tries together
    max_in_flight: int = 64  # per replica
    max_queue: int = 1024  # per model
    max_not_ready_retries: int = 3  # refusals by loading/draining replicas: nothing ran, cheap to retry
    models: tuple[str, ...] = ()  # serve only these (empty: every model a replica serves)
    ejection: EjectionConfig = EjectionConfig()

    def __post_init__(self) -> None:
        make_policy(self.policy)  # raises for an unknown name
        for name in ("probe_period", "probe_timeout", "try_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.max_in_flight < 1 or self.max_queue < 0:
            raise ValueError("max_in_flight must be >= 1 and max_queue >= 0")


class Balancer:
    def __init__(self, node, config: BalancerConfig = BalancerConfig(), *, rng: random.Random | None = None) -> None:
        self.node = node
        self.config = config
        self.rng = rng or random.Random()
        self.pools: dict[str, Pool] = {}
        self._waiters: dict[str, collections.deque] = {}
        self._held: set[str] = set()  # replicas a rollout holds back from new requests
        self.pinned: dict[str, int] = {}  # model -> the version it is served at
        self._rolling: set[str] = set()  # models a rollout is changing the version of
        self._aligning: dict[str, asyncio.Task] = {}  # replica -> its reload to the pinned version
        self._align_failed: dict[str, float] = {}  # replica -> when its last such reload failed
        self._probe_task: asyncio.Task | None = None
        self._outbox: dict[str, list] = {}
        self._deliveries: set[asyncio.Task] = set()
        self.retries = 0
        self.failures = 0

    # -- membership -----------------------------------------------------------------------

    def set_members(self, members: list[Member]) -> None:
        by_model: dict[str, list[str]] = collections.defaultdict(list)
        for m in members:
            model = m.config.get("model") if m.role == "replica" else None
            if model and (not self.config.models or model in self.config.models):
                by_model[model].append(m.name)
        for model in set(self.pools) | set(by_model) | set(self.config.models):
            pool = self.pools.get(model)
            if pool is None:
                pool = self.pools[model] = Pool(model, make_policy(self.config.policy),
                                                max_in_flight=self.config.max_in_flight,
                                                ejection=self.config.ejection)
                self._waiters[model] = collections.deque()
            pool.set_members(by_model.get(model, []))

    async def start(self) -> None:
        self.set_members(self.node.directory.members())
        self.node.directory.watch(self._on_directory)
        self.node.on_peer_lost(self._on_peer_lost)
        await self.probe_all()
        self._probe_task = asyncio.get_running_loop().create_task(self._probe_loop())

    def _on_directory(self, members: list[Member]) -> None:
        self.set_members(members)
        asyncio.get_running_loop().create_task(self.probe_all())  # newcomers get a chance at once

    def _on_peer_lost(self, name: str, reason: str) -> None:
        # Its in-flight tries have just failed over (Node.peer_lost); send it nothing new
        # until a probe finds its next incarnation ready.
        for pool in self.pools.values():
            if name in pool.replicas:
                pool.observe(name, ready=False, serving=False)

    async def stop(self) -> None:
        if self._probe_task is not None:
            self._probe_task.cancel()
            await asyncio.gather(self._probe_task, return_exceptions=True)
            self._probe_task = None
        for task in list(self._deliveries) + list(self._aligning.values()):
            task.cancel()
        await asyncio.gather(*self._deliveries, *self._aligning.values(), return_exceptions=True)

    # -- probes ---------------------------------------------------------------------------

    async def _probe_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.probe_period)
            try:
                await self.probe_all()
            except Exception:  # a probe round must never end the loop
                log.exception("probe round failed")

    async def probe_all(self) -> None:
        targets = [(pool, name) for pool in self.pools.values() for name in list(pool.replicas)]
        await asyncio.gather(*(self.probe(pool, name) for pool, name in targets))

    async def probe(self, pool: Pool, name: str) -> None:
        try:
            st = await self.node.call(name, "node", "status", None, timeout=self.config.probe_timeout)
        except (RpcTimeout, PeerUnreachable, RemoteError, NodeStopped):
            pool.observe(name, ready=False, serving=False)
            return
        model = (st.get("services") or {}).get("model") or {}
        state, version = st.get("state"), model.get("version")
        if state == "ready" and version is not None and not self._on_pinned_version(pool, name, version):
            pool.observe(name, ready=False, serving=False, draining=True, version=version)
            return
        pool.observe(name, ready=state == "ready", serving=bool(model.get("serving")) and state in ("ready", "alive"),
                     draining=state == "draining" or name in self._held, version=version)
        self._wake(pool.model)

    def _on_pinned_version(self, pool: Pool, name: str, version: int) -> bool:
        """Whether replica ``name``, ready on ``version``, may serve; if not, reload it."""
        if pool.model in self._rolling:
            return True
        pinned = self.pinned.setdefault(pool.model, version)
        if version == pinned:
            return True
        loop = asyncio.get_running_loop()
        failed_at = self._align_failed.get(name)
        if name not in self._aligning and (failed_at is None or loop.time() - failed_at > 30.0):
            log.warning("replica %s came up on %s v%s, but v%s is served: reloading it to v%s before it "
                        "gets traffic", name, pool.model, version, pinned, pinned)
            task = loop.create_task(self._align(pool, name, pinned))
            self._aligning[name] = task
            task.add_done_callback(lambda _: self._aligning.pop(name, None))
        return False

    async def _align(self, pool: Pool, name: str, version: int) -> None:
        try:
            await self.node.call(name, "model", "reload", {"version": version}, timeout=300.0)
        except (RemoteError, RpcTimeout, PeerUnreachable, NodeStopped) as e:
            self._align_failed[name] = asyncio.get_running_loop().time()
            log.warning("reloading replica %s to %s v%s failed (%s); it stays out of rotation", name, pool.model,
                        version, e)
            return
        self._align_failed.pop(name, None)
        await self.probe(pool, name)

    # -- requests -------------------------------------------------------------------------

    async def predict(self, model: str, body: dict[str, Any], *, deadline: float, key: str | None = None) -> dict:
        """Send one predict to a replica of ``model``; retry once elsewhere if that replica fails.

        ``deadline`` is loop time. Raises UnknownModel, BadInput, NoReplicaReady, Overloaded,
        DeadlineExceeded, or ServingError for a replica's internal error.
        """
        pool = self.pools.get(model)
        if pool is None:
            raise UnknownModel(model, list(self.pools))
        loop = asyncio.get_running_loop()
        tried: list[str] = []
        failed_tries = refusals = 0
        last: Exception | None = None
        while True:
            r = await self._acquire(pool, deadline, key, tried)
            remaining = deadline - loop.time()
            try:
                if remaining <= 0:
                    raise DeadlineExceeded(f"deadline passed before a replica of {model!r} was free")
                timeout = min(self.config.try_timeout, remaining) if failed_tries == 0 else remaining
                reply = await self._send(r.name, body, timeout)
                pool.record_success(r)
                version = reply.get("version")
                if (version is not None and refusals < self.config.max_not_ready_retries
                        and not self._on_pinned_version(pool, r.name, version)):
                    # A replica restarted since its last probe, on another version: ask elsewhere.
                    refusals += 1
                    pool.observe(r.name, ready=False, serving=False, draining=True, version=version)
                    tried.append(r.name)
                    continue
                return reply
            except RemoteError as e:
                typed = from_remote(e.type, e.message)
                if isinstance(typed, BadInput):
                    pool.record_success(r)  # the replica is fine; the request is not
                    raise typed from None
                if e.type in RETRIABLE_REMOTE and refusals < self.config.max_not_ready_retries:
                    refusals += 1  # nothing ran there: mark it and go elsewhere at once
                    pool.observe(r.name, ready=False, serving=r.serving, draining=True, version=r.version)
                    tried.append(r.name)
                    continue
                last = typed or ServingError(f"replica {r.name}: {e.type}: {e.message}")
                pool.record_failure(r, loop.time())
            except (RpcTimeout, PeerUnreachable) as e:
                last = e
                pool.record_failure(r, loop.time())
            finally:
                self._release(pool, r)
            failed_tries += 1
            tried.append(r.name)
            if failed_tries >= 2 or deadline - loop.time() <= 0:
                self.failures += 1
                if isinstance(last, ServingError):
                    raise last
                raise DeadlineExceeded(f"model {model!r}: {last}")
            self.retries += 1

    # -- coalescing -----------------------------------------------------------------------
    #
    # Requests for the same replica that arrive in the same turn of the event loop travel as
    # one ``predict_many`` message. A message costs about as much as parsing a small request,
    # and under load a turn brings several, so this cuts the gateway's work per request
    # without adding any wait: the flush runs on the very next turn.

    def _send(self, replica: str, body: dict, timeout: float) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        box = self._outbox.get(replica)
        if box is None:
            box = self._outbox[replica] = []
            loop.call_soon(self._flush, replica)
        box.append((body, fut, timeout))
        timer = loop.call_later(timeout, _expire_try, fut, replica, timeout)
        fut.add_done_callback(lambda _: timer.cancel())
        return fut

    def _flush(self, replica: str) -> None:
        items = self._outbox.pop(replica, None)
        if items:
            task = asyncio.get_running_loop().create_task(self._deliver(replica, items))
            self._deliveries.add(task)
            task.add_done_callback(self._deliveries.discard)

    async def _deliver(self, replica: str, items: list) -> None:
        timeout = max(t for _, _, t in items) + 1.0  # each item's own timer fires first
        try:
            if len(items) == 1:
                results = [await self.node.call(replica, "model", "predict", items[0][0], timeout=timeout)]
            else:
                reply = await self.node.call(replica, "model", "predict_many", {"items": [b for b, _, _ in items]},
                                             timeout=timeout)
                results = reply["results"]
        except Exception as e:  # the whole message failed: every item failed the same way
            for _, fut, _ in items:
                if not fut.done():
                    fut.set_exception(e)
            return
        for (_, fut, _), res in zip(items, results):
            if fut.done():
                continue
            if "error" in res:
                fut.set_exception(RemoteError(replica, "model.predict", res["error"], res.get("message", "")))
            else:
                fut.set_result(res)

    async def _acquire(self, pool: Pool, deadline: float, key: str | None, tried: list[str]) -> Replica:
        loop = asyncio.get_running_loop()
        waiters = self._waiters[pool.model]
        while True:
            now = loop.time()
            r = pool.pick(now, self.rng, key, exclude=tried) if not waiters or tried else None
            if r is None and tried:  # nobody else: the one we tried beats no one
                r = pool.pick(now, self.rng, key)
            if r is not None:
                r.in_flight += 1
                return r
            if not pool.saturated(now) and not waiters:
                self.failures += 1
                raise NoReplicaReady(pool.model, pool.why_none(now), retry_after=max(1.0, self.config.probe_period))
            if len(waiters) >= self.config.max_queue:
                self.failures += 1
                raise Overloaded(pool.model, self.config.max_queue)
            fut = loop.create_future()
            waiters.append(fut)
            timer = loop.call_later(max(0.0, deadline - now), _expire, fut)
            try:
                if not await fut:
                    raise DeadlineExceeded(f"deadline passed while queued for a replica of {pool.model!r}")
            finally:
                timer.cancel()
                if fut in waiters:
                    waiters.remove(fut)
            # Woken as first in line: pick without yielding to the queue (it may hold others).
            r = pool.pick(loop.time(), self.rng, key, exclude=tried) or (pool.pick(loop.time(), self.rng, key)
                                                                        if tried else None)
            if r is not None:
                r.in_flight += 1
                return r
            if not pool.saturated(loop.time()):
                raise NoReplicaReady(pool.model, pool.why_none(loop.time()))

    def _release(self, pool: Pool, r: Replica) -> None:
        r.in_flight -= 1
        self._wake(pool.model)

    def _wake(self, model: str) -> None:
        waiters = self._waiters.get(model)
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(True)
                return

    # -- rolling update -------------------------------------------------------------------

    async def rollout(self, model: str, version: int | None, *, ready_timeout: float = 300.0) -> dict[str, Any]:
        """Reload every replica of ``model`` to ``version``, one at a time, without failing a request."""
        pool = self.pools.get(model)
        if pool is None:
            raise UnknownModel(model, list(self.pools))
        done: list[dict[str, Any]] = []
        self._rolling.add(model)
        try:
            report = await self._roll(pool, model, version, ready_timeout, done)
            if done:  # the new version is served; any replica not on it is brought to it
                self.pinned[model] = done[-1]["version"]
            return report
        finally:
            # A rollout that stopped halfway leaves the old version pinned: the replicas it
            # moved are reloaded back, so the model is never served at two versions for long.
            self._rolling.discard(model)

    async def _roll(self, pool: Pool, model: str, version: int | None, ready_timeout: float,
                    done: list[dict[str, Any]]) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        for name in sorted(pool.replicas):
            r = pool.replicas.get(name)
            if r is None:
                continue  # left while we were busy with another
            others = [x for x in pool.replicas.values() if x.name != name and x.ready and not x.draining]
            if others:
                self._held.add(name)
                r.draining = True
                t_end = loop.time() + 30.0
                while r.in_flight and loop.time() < t_end:
                    await asyncio.sleep(0.01)
            try:
                reply = await self.node.call(name, "model", "reload", {"version": version}, timeout=ready_timeout)
                t_end = loop.time() + ready_timeout
                while True:  # traffic returns only once a probe sees it ready on the new version
                    await self.probe(pool, name)
                    if r.ready and r.version == reply["version"]:
                        break
                    if loop.time() > t_end:
                        raise RolloutError(f"replica {name} of {model!r} not ready on v{reply['version']} "
                                           f"within {ready_timeout:g}s; the rollout stopped there")
                    await asyncio.sleep(min(0.05, self.config.probe_period))
            except (RemoteError, RpcTimeout, PeerUnreachable) as e:
                raise RolloutError(f"reloading replica {name} of {model!r} to "
                                   f"{'latest' if version is None else f'v{version}'} failed: {e}; "
                                   f"replicas done so far: {[d['replica'] for d in done]}") from None
            finally:
                self._held.discard(name)
                r.draining = False
                self._wake(model)
            done.append({"replica": name, "version": reply["version"], "previous": reply.get("previous")})
            log.info("rollout of %s: %s now on v%s", model, name, reply["version"])
        return {"model": model, "replicas": done}

    # -- introspection --------------------------------------------------------------------

    def models(self) -> dict[str, dict[str, Any]]:
        now = asyncio.get_running_loop().time()
        out = {}
        for model, pool in sorted(self.pools.items()):
            ready = [r for r in pool.replicas.values() if r.ready and not r.draining]
            versions = sorted({r.version for r in ready if r.version is not None})
            out[model] = {"name": model, "versions": versions, "version": versions[-1] if versions else None,
                          "ready_replicas": sorted(r.name for r in ready), "replicas": len(pool.replicas),
                          "queued": len(self._waiters[model]), **pool.summary(now)}
        return out


def _expire_try(fut, replica: str, timeout: float) -> None:
    if not fut.done():
        fut.set_exception(RpcTimeout(replica, "model.predict", timeout))


def _expire(fut) -> None:
    if not fut.done():
        fut.set_result(False)
