"""The sharding router: split a request, scatter the parts to their shards, gather, merge, clean up.

``RouterService`` (service ``router``) runs a ``ShardedApp`` (see :mod:`dmlsys.sharding.app`):

1. ``split(request)`` cuts the request into ``(key, part)`` pairs;
2. each part goes to its key's owner on the hash ring of the ``shard`` members in the node's
   directory, all parts at once;
   (stateless apps: the first shard along the key's walk still under a bounded load, so the
   parts of one request spread evenly; see ``_spread``);
3. a part gets ``part_timeout`` seconds (never past the request's deadline); when it fails to
   arrive (timeout, shard unreachable, or the shard says it does not own the key) it is tried
   once more on the next shard along the key's walk, the one that would own the key were the
   first gone;
4. ``merge(results)`` with the results in split order, then ``cleanup(merged)``.

A part that cannot be served fails the whole request with ``PartFailed``, whose message names
the part, its key and every shard tried with what went wrong; the other parts are cancelled.
Never a partial answer: merge runs only when every part has a result.

A shard that answers ``ShardLeft`` (it was scaled away and handed its keys over) leaves this
router's ring at once, and the part goes on along its walk without spending its retry.

Over HTTP: with ``http`` set (``HOST:PORT``, loopback unless configured), the node also serves
``POST /v1/models/{app}:{verb}`` for apps that have an ``HttpDoor`` (see :mod:`dmlsys.sharding.door`);
``router.http`` is the same over RPC, for a gateway forwarding what a replica cannot take.

Sub-results are kept in a ``ResultCache`` (bounded, with a TTL) under the caller's request id,
so a request retried with the same id after a failure sends only the parts still missing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from typing import Any

from dmlsys.node import Member, PeerUnreachable, RemoteError, RpcTimeout, Service, rpc
from dmlsys.sharding.app import ShardedApp, load_app
from dmlsys.sharding.cache import ResultCache
from dmlsys.sharding.errors import PartFailed, ShardingError
from dmlsys.sharding.ring import DEFAULT_VNODES, BoundedLoads, HashRing

log = logging.getLogger(__name__)

_MISSING = object()


@dataclasses.dataclass(frozen=True)
class RouterConfig:
    app: str = "dmlsys.sharding.app:identity"
    role: str = "shard"  # the directory role whose members form the ring
    vnodes: int = DEFAULT_VNODES
    part_timeout: float = 2.0  # seconds one try of one part may take
    deadline: float = 10.0  # seconds a whole request may take, unless the caller says less
    max_parts: int = 4096
    cache_entries: int = 4096
    cache_ttl: float = 60.0
    # Stateless apps: no shard gets more than ceil((1 + eps) * parts / shards) of a request's parts
    # (bounded loads over the ring); None sends every part to its key's owner.
    balance_eps: float | None = 0.1
    app_options: dict = dataclasses.field(default_factory=dict)  # keyword arguments of the app's function
    http: str | None = None  # HOST:PORT of the HTTP door (port 0: a free one); None: RPC only
    max_body_bytes: int = 256 << 20  # the door's cap on a request body; over it: 413


class RouterService(Service):
    name = "router"

    def __init__(self, config: RouterConfig = RouterConfig(), app: ShardedApp | None = None) -> None:
        self.config = config
        self.app = app or load_app(config.app, config.app_options)
        self.ring = HashRing(vnodes=config.vnodes)
        self.cache = ResultCache(config.cache_entries, config.cache_ttl)
        self.counters = {"requests": 0, "failed": 0, "parts": 0, "retries": 0, "resumed_parts": 0, "left": 0}
        self.last_parts = 0  # parts of the last request split
        self._left: set[str] = set()  # shards that said ShardLeft, off the ring until the directory drops them
        self.door = None

    async def start(self, node) -> None:
        await super().start(node)
        self._on_members(node.directory.members())
        node.directory.watch(self._on_members)
        if self.config.http is not None:
            from dmlsys.sharding.door import RouterDoor

            door = RouterDoor(self, self.config.http)
            await door.start()
            self.door = door

    async def stop(self) -> None:
        if self.door is not None:
            await self.door.stop()
            self.door = None

    def _on_members(self, members: list[Member]) -> None:
        names = {m.name for m in members if m.role == self.config.role}
        self._left &= names
        names -= self._left
        known = set(self.ring.names)
        for gone in known - names:
            self.ring.remove(gone)
        for new in sorted(names - known):
            self.ring.add(new)

    def status(self) -> dict[str, Any]:
        return {"app": self.app.name, "shards": list(self.ring.names), "cached_parts": len(self.cache),
                "http": self.door.url if self.door else None, **self.counters}

    @rpc
    async def request(self, body: dict, ctx) -> Any:
        """``{"request": ..., "id": optional str}`` -> the app's merged, cleaned-up answer."""
        timeout = self.config.deadline
        if ctx.deadline is not None:  # the caller's own deadline, if it is sooner
            timeout = min(timeout, max(0.0, ctx.deadline - asyncio.get_running_loop().time()))
        return await self.run(body["request"], request_id=body.get("id"), timeout=timeout)

    @rpc
    async def http(self, body: dict, ctx) -> dict:
        """An HTTP request handed over by a gateway: ``{"model", "verb", "body": bytes or uint8
        array, "content_type", "params": {}}`` -> ``{"status": int, "json": {...}}``, exactly what
        the router's own door would answer (see :mod:`dmlsys.sharding.door`)."""
        from dmlsys.sharding.door import answer, as_bytes

        timeout = self.config.deadline
        if ctx.deadline is not None:
            timeout = min(timeout, max(0.0, ctx.deadline - asyncio.get_running_loop().time()))
        status, doc = await answer(self, str(body.get("model")), str(body.get("verb")), as_bytes(body.get("body")),
                                   str(body.get("content_type") or ""), body.get("params") or {}, timeout)
        return {"status": status, "json": doc}

    async def run(self, request: Any, *, request_id: str | None = None, timeout: float | None = None) -> Any:
        """Split, scatter, gather, merge and clean up one request (see the module docstring)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.config.deadline if timeout is None else timeout)
        self.counters["requests"] += 1
        parts = self.app.split(request)
        self.last_parts = len(parts)
        if len(parts) > self.config.max_parts:
            raise ShardingError(f"the request splits into {len(parts)} parts, over max_parts={self.config.max_parts}")
        results: list[Any] = [_MISSING] * len(parts)
        if request_id is not None:
            for i, (key, _) in enumerate(parts):
                results[i] = self.cache.get((request_id, i, key), loop.time(), _MISSING)
            self.counters["resumed_parts"] += sum(r is not _MISSING for r in results)
        # Every part carries an id, so a shard that sees one twice (our retry after a timeout, or a
        # message that waited for a restarted shard) answers it from memory instead of applying it twice.
        rid = request_id if request_id is not None else uuid.uuid4().hex
        first = self._spread(parts, results)
        tasks = {loop.create_task(self._serve(i, key, part, deadline, request_id, f"{rid}/{i}", first[i])): i
                 for i, (key, part) in enumerate(parts) if results[i] is _MISSING}
        try:
            if tasks:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
                failed = sorted((tasks[t], t.exception()) for t in done if t.exception() is not None)
                if failed:
                    raise failed[0][1]
        except BaseException:
            self.counters["failed"] += 1
            raise
        finally:  # the first failure cancels the siblings; none outlives the request
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for t, i in tasks.items():
            results[i] = t.result()
        return self.app.cleanup(self.app.merge(results))

    def _spread(self, parts: list, results: list) -> list[str | None]:
        """For a stateless app, the shard each missing part tries first, by bounded loads: a
        request's parts spread evenly even when the ring gives one shard more than its share of
        these few keys (64 tiles on 4 shards: 24 for one of them on the plain ring, 17 at most
        with eps 0.1). None: the key's owner on the ring."""
        if self.app.stateful or self.config.balance_eps is None or not len(self.ring):
            return [None] * len(parts)
        bounded = BoundedLoads(self.ring, self.config.balance_eps)
        first: list[str | None] = []
        for (key, _), result in zip(parts, results):
            try:
                first.append(bounded.assign(key) if result is _MISSING else None)
            except KeyError:  # the same key twice in one request: its owner, like the first one
                first.append(None)
        return first

    async def _serve(self, index: int, key: str, part: Any, deadline: float, request_id: str | None,
                     part_id: str, first: str | None = None) -> Any:
        """One part: its owner (or ``first``), then once more on the next shard along its walk."""
        loop = asyncio.get_running_loop()
        self.counters["parts"] += 1
        if not len(self.ring):
            raise PartFailed(f"part {index} (key {key!r}): there are no {self.config.role!r} members to serve it",
                             part=index, shard=None)
        order = list(self.ring.walk(key))
        if first is not None:
            order.remove(first)
            order.insert(0, first)
        walk, tried, attempt = iter(order), [], 0
        while attempt < 2:
            shard = next(walk, None)
            while shard is not None and shard in self._left:  # learnt of while this part waited
                shard = next(walk, None)
            remaining = deadline - loop.time()
            if shard is None or remaining <= 0:
                break
            if attempt:
                self.counters["retries"] += 1
            attempt += 1
            try:
                result = await self.node.call(shard, "shard", "handle", {"key": key, "part": part, "id": part_id},
                                              timeout=min(self.config.part_timeout, remaining))
            except RemoteError as e:
                if e.type == "ShardLeft":  # scaled away, its keys handed over: not a try, a stale ring
                    self._drop_left(shard)
                    attempt -= 1
                    continue
                if e.type != "NotOwner":  # the app itself failed: another shard would fail alike
                    raise PartFailed(f"part {index} (key {key!r}) failed on shard {shard!r}: {e.type}: {e.message}",
                                     part=index, shard=shard) from None
                tried.append((shard, f"NotOwner: {e.message}"))
            except (RpcTimeout, PeerUnreachable) as e:
                tried.append((shard, str(e)))
            else:
                if request_id is not None:
                    self.cache.put((request_id, index, key), result, loop.time())
                return result
        why = "; ".join(f"{s}: {w}" for s, w in tried) or "the request's deadline passed before it could be sent"
        raise PartFailed(f"part {index} (key {key!r}) could not be served; tried {len(tried)} shard(s): {why}",
                         part=index, shard=tried[-1][0] if tried else None)

    def _drop_left(self, shard: str) -> None:
        if shard not in self._left:
            self._left.add(shard)
            self.counters["left"] += 1
            if shard in self.ring.names:
                self.ring.remove(shard)
