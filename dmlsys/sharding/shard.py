"""A stateful shard: per-key state that lives on the key's shard, on disk, and moves with the key.

``ShardService`` (service ``shard``) runs a ``ShardedApp``'s ``handle(key, part, state)`` for the
keys the hash ring gives it, over the members of the ``shard`` role in its node's directory.

State. Each key's state is a msgpack value held in memory and written to
``<state_dir>/snapshot.msgpack`` every ``snapshot_every`` changes (1: before the reply, so an
answered request's state survives a crash) and on stop. A snapshot is written to a temporary
file, fsynced and renamed over the old one (rename is atomic on POSIX), so a crash mid-write
leaves the previous snapshot whole; a restarted shard loads it and carries on.

Ownership. A shard serves a key only if its ring says the key is its own; otherwise it raises
``NotOwner`` naming the owner, so a router with a stale ring retries instead of forking state.
When membership changes, the keys whose owner changed move, and only those (the ring's minimal
movement): the old owner marks them moving (requests for them are refused), waits for requests
already running on them, pushes them with their state to the new owner (``shard.accept``), and
only after the ack drops them and leaves a tombstone naming where they went. A new owner asked
for a key it holds no state for first asks the member that would own the key were it absent
(the next shard along the key's walk: exactly the old owner when it has just joined) to hand the
key over (``shard.handoff``), so a request that overtakes the push still finds the state. A key
is thus served by one shard at a time: the holder of its state, or nobody while it moves.

A shard leaving for good calls ``leave()`` first (``shard.leave``, which the cluster's ``scale
shard N`` sends to every member it is about to stop, naming them all in ``gone``): it pushes every
key to its owner on the ring without the leavers and then serves nothing (``ShardLeft``). A shard
that receives keys from a leaver drops the leavers from its ring at once, so it serves them
before its directory hears of the removal (the directory refreshes every second). A shard that crashes keeps its keys on
disk; they are served again when it restarts (requests for them fail with a named error meanwhile:
another shard starting them afresh would fork their state).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import msgpack

from dmlsys.node import ADMIN, Member, NodeError, Service, rpc
from dmlsys.sharding.app import ShardedApp, load_app
from dmlsys.sharding.errors import NotOwner, ShardingError, ShardLeft
from dmlsys.sharding.ring import DEFAULT_VNODES, HashRing

log = logging.getLogger(__name__)

SNAPSHOT = "snapshot.msgpack"
APPLIED_KEPT = 16  # part ids remembered per key for deduplication
_FORMAT = 1


class SnapshotStore:
    """One file of msgpack ``{key: state}``, replaced atomically (write, fsync, rename, fsync dir)."""

    def __init__(self, directory: str | os.PathLike, *, fsync: bool = True) -> None:
        self.path = Path(directory) / SNAPSHOT
        self.fsync = fsync

    def load(self) -> tuple[dict[str, Any], dict[str, list]]:
        """(state per key, applied part ids per key) as last saved; empty when never saved."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {}, {}
        try:
            doc = msgpack.unpackb(raw, raw=False, strict_map_key=False)
        except Exception as e:
            raise ShardingError(f"snapshot {self.path} is unreadable ({type(e).__name__}: {e}); move it away to "
                                "start this shard empty") from None
        if not isinstance(doc, dict) or doc.get("v") != _FORMAT or not isinstance(doc.get("keys"), dict):
            raise ShardingError(f"snapshot {self.path} is not a version-{_FORMAT} shard snapshot")
        return doc["keys"], doc.get("applied") or {}

    def save(self, state: dict[str, Any], applied: dict[str, list] | None = None) -> int:
        """Write ``state`` (and the applied part ids); returns the bytes written."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = msgpack.packb({"v": _FORMAT, "keys": state, "applied": applied or {}}, use_bin_type=True)
        tmp = self.path.with_name(f".{SNAPSHOT}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            if self.fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, self.path)
        if self.fsync:
            fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        return len(data)


@dataclasses.dataclass(frozen=True)
class ShardConfig:
    state_dir: str
    app: str = "dmlsys.sharding.app:identity"
    app_options: dict = dataclasses.field(default_factory=dict)  # keyword arguments of the app's function
    role: str = "shard"  # the directory role whose members form the ring
    vnodes: int = DEFAULT_VNODES
    snapshot_every: int = 1  # changes between snapshots; 1: every change is on disk before the reply
    call_timeout: float = 5.0  # seconds for a handoff or a push to another shard
    fsync: bool = True


class ShardService(Service):
    name = "shard"

    def __init__(self, config: ShardConfig, app: ShardedApp | None = None) -> None:
        self.config = config
        self.app = app or load_app(config.app, config.app_options)
        self.store = SnapshotStore(config.state_dir, fsync=config.fsync)
        self.state: dict[str, Any] = {}
        # Per key, the last APPLIED_KEPT part ids applied with their results: a part delivered twice
        # (the router's retry after a timeout, or a message queued for a shard that then restarted)
        # is answered from here instead of being applied twice. Kept, snapshotted and moved with the key.
        self.applied: dict[str, list[list]] = {}
        self.moved_to: dict[str, str] = {}  # tombstones: key -> the shard it was pushed or handed to
        self._moving: set[str] = set()
        self._locks: dict[str, list] = {}  # key -> [lock, users]; dropped when nobody uses it
        self._arrived = asyncio.Event()  # set whenever accept() brings keys in
        self.ring = HashRing(vnodes=config.vnodes)
        self._dirty = 0
        self._left = False
        # Shards that left (we, or a leaver that pushed us its keys): off our ring while the
        # directory still lists them; forgotten once it does not, so the name may join again.
        self._excluded: set[str] = set()
        # The ring with the leavers still on it, while there are any: who held a key before them.
        self._prior: HashRing | None = None
        self._rebalance: asyncio.Task | None = None
        self._push_again = False
        self.counters = {"handled": 0, "pulled": 0, "pushed": 0, "accepted": 0, "refused": 0, "snapshots": 0,
                         "deduplicated": 0}

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self, node) -> None:
        await super().start(node)
        self.state, self.applied = self.store.load()
        self._on_members(node.directory.members())
        node.directory.watch(self._on_members)

    async def stop(self) -> None:
        if self._rebalance is not None:
            self._rebalance.cancel()
            await asyncio.gather(self._rebalance, return_exceptions=True)
        self._snapshot()

    def status(self) -> dict[str, Any]:
        # The node files it under the service's name: /status's services.shard.keys
        return {"keys": len(self.state), "bytes": self.store.path.stat().st_size if self.store.path.exists() else 0,
                "members": list(self.ring.names), "moving": len(self._moving), **self.counters}

    def _on_members(self, members: list[Member]) -> None:
        names = {m.name for m in members if m.role == self.config.role}
        self._excluded &= names | {self.node.name}
        if not self._excluded - {self.node.name}:
            self._prior = None
        elif self._prior is None or set(self._prior.names) != names | {self.node.name}:
            self._prior = HashRing(sorted(names | {self.node.name}), vnodes=self.config.vnodes)
        names -= self._excluded
        if not self._left:
            names.add(self.node.name)
        else:
            names.discard(self.node.name)
        known = set(self.ring.names)
        if names == known:
            return
        for gone in known - names:
            self.ring.remove(gone)
        for new in sorted(names - known):
            self.ring.add(new)
        # A tombstone matters only while our ring still calls the key ours; keep no others.
        if len(self.ring):
            self.moved_to = {k: v for k, v in self.moved_to.items() if self.ring.lookup(k) == self.node.name}
        self._push_again = True  # a running push goes round once more, with the ring as it is then
        if self._rebalance is None or self._rebalance.done():
            self._rebalance = asyncio.get_running_loop().create_task(self._push_moved())

    @contextlib.asynccontextmanager
    async def _exclusive(self, key: str):
        """One request, handoff or push at a time per key; the lock lives only while in use, so
        a shard that has seen millions of keys does not keep millions of locks."""
        entry = self._locks.get(key)
        if entry is None:
            entry = self._locks[key] = [asyncio.Lock(), 0]
        entry[1] += 1
        try:
            async with entry[0]:
                yield
        finally:
            entry[1] -= 1
            if not entry[1]:
                del self._locks[key]

    def _snapshot(self, force: bool = True) -> None:
        if force or self._dirty >= self.config.snapshot_every:
            self.store.save(self.state, self.applied)
            self._dirty = 0
            self.counters["snapshots"] += 1

    # -- serving a key --------------------------------------------------------------------

    def _check_owner(self, key: str) -> None:
        if self._left:
            raise ShardLeft(f"shard {self.node.name!r} has left the ring; key {key!r} belongs to another shard")
        if key in self._moving or key in self.moved_to and key not in self.state:
            self.counters["refused"] += 1
            where = self.moved_to.get(key, "its new owner")
            raise NotOwner(f"key {key!r} is moving from shard {self.node.name!r} to {where!r}; retry there")
        owner = self.ring.lookup(key)
        if owner != self.node.name:
            self.counters["refused"] += 1
            raise NotOwner(f"key {key!r} belongs to shard {owner!r}, not {self.node.name!r}")

    @rpc
    async def handle(self, body: dict) -> Any:
        """Run the app on one part: ``{"key": str, "part": ...}`` -> the app's result."""
        key = body["key"]
        if not isinstance(key, str):
            raise TypeError(f"a part's key is a str, got {type(key).__name__}")
        if not self.app.stateful:  # any shard may serve it: no ownership, no state
            self.counters["handled"] += 1
            return self.app.handle(key, body.get("part"), None)[0]
        self._check_owner(key)
        async with self._exclusive(key):
            self._check_owner(key)  # the ring may have moved while we waited
            if key not in self.state:
                await self._pull(key)
            part_id = body.get("id")
            if part_id is not None:
                for seen, earlier in self.applied.get(key, ()):
                    if seen == part_id:
                        self.counters["deduplicated"] += 1
                        return earlier
            result, new = self.app.handle(key, body.get("part"), self.state.get(key))
            if new is None:
                changed = self.state.pop(key, None) is not None
                self.applied.pop(key, None)
            else:
                changed = True
                self.state[key] = new
                if part_id is not None:
                    ids = self.applied.setdefault(key, [])
                    ids.append([part_id, result])
                    del ids[:-APPLIED_KEPT]
            self.moved_to.pop(key, None)
            if changed:
                self._dirty += 1
                self._snapshot(force=False)
            self.counters["handled"] += 1
            return result

    async def _pull(self, key: str) -> None:
        """Before serving a key we hold no state for, ask whoever held it before us: a shard that
        left and is pushing it to us, or else the shard that would own it were we absent."""
        previous = self._prior.lookup(key) if self._prior is not None else None
        if previous is None or previous == self.node.name:
            walk = self.ring.walk(key)
            next(walk)  # ourselves
            previous = next(walk, None)
        if previous is None:
            return
        deadline = asyncio.get_running_loop().time() + self.config.call_timeout
        while True:
            try:
                reply = await self.node.call(previous, "shard", "handoff", {"key": key, "to": self.node.name},
                                             timeout=self.config.call_timeout)
            except NodeError as e:
                raise ShardingError(f"key {key!r} may still be held by shard {previous!r}, which did not answer "
                                    f"a handoff ({e}); not starting it afresh") from None
            if key in self.state:  # its push arrived while we asked
                return
            if reply.get("found"):
                self.state[key] = reply["state"]
                self.applied[key] = reply.get("applied") or []
                self.counters["pulled"] += 1
                return
            if reply.get("moved_to") not in (None, self.node.name):
                raise ShardingError(f"key {key!r} was moved from shard {previous!r} to {reply['moved_to']!r}, "
                                    f"not to {self.node.name!r}: the shards disagree on the ring; retry")
            if not reply.get("moving"):
                return  # nobody had it: a new key
            if asyncio.get_running_loop().time() > deadline:
                raise ShardingError(f"key {key!r} is still moving to shard {self.node.name!r} from {previous!r} "
                                    f"after {self.config.call_timeout:g}s")
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), 0.05)
            except TimeoutError:
                pass
            if key in self.state:
                return

    # -- moving keys ----------------------------------------------------------------------

    @rpc  # any member: a shard just scaled up calls before its peers' directories list it
    async def handoff(self, body: dict) -> dict:
        """Another shard now owns ``key``: give it the state (or say we have none)."""
        key, to = body["key"], body["to"]
        if key in self._moving:
            return {"found": False, "moving": True}
        async with self._exclusive(key):
            if key not in self.state:
                return {"found": False, "moving": key in self._moving, "moved_to": self.moved_to.get(key)}
            value, applied = self.state.pop(key), self.applied.pop(key, [])
            self.moved_to[key] = to
            self._snapshot()  # the key is gone from our disk before it is anyone else's
            return {"found": True, "state": value, "applied": applied}

    @rpc  # any member: a shard just scaled up calls before its peers' directories list it
    def accept(self, body: dict) -> int:
        """Keys pushed to us with their state: ``{"items": [[key, state, applied ids], ...],
        "left": [shards that left]}``. A shard that has left takes nothing (it is about to stop)."""
        if self._left:
            raise ShardLeft(f"shard {self.node.name!r} has left the ring and takes no keys")
        left = set(body.get("left") or ()) - {self.node.name}
        if left - self._excluded:  # a leaver's keys: serve them now, not when the directory drops it
            self._excluded |= left
            self._on_members(self.node.directory.members())
        items = body["items"]
        for key, value, applied in items:
            if key in self.state:
                log.warning("shard %s: key %r pushed to us while we hold it; the pushed state wins",
                            self.node.name, key)
            self.state[key] = value
            self.applied[key] = applied
            self.moved_to.pop(key, None)
        self.counters["accepted"] += len(items)
        self._snapshot()  # on our disk before the sender drops it from its own
        self._arrived.set()
        return len(items)

    async def _push_moved(self) -> None:
        """Push every key the ring gives to another shard, grouped by new owner; again while the
        ring changed meanwhile, and (after ``call_timeout``) while a push failed."""
        while self._push_again:
            self._push_again = False
            if not await self._push_once():
                self._push_again = True
                await asyncio.sleep(self.config.call_timeout)

    async def _push_once(self) -> bool:
        by_owner: dict[str, list[str]] = defaultdict(list)
        if self.ring.names:
            for key in list(self.state):
                owner = self.ring.lookup(key)
                if owner != self.node.name:
                    by_owner[owner].append(key)
        ok = True
        for owner, keys in sorted(by_owner.items()):
            self._moving.update(keys)
            try:
                for key in keys:  # let requests already running on these keys finish
                    async with self._exclusive(key):
                        pass
                items = [[k, self.state[k], self.applied.get(k, [])] for k in keys if k in self.state]
                left = sorted(self._excluded | ({self.node.name} if self._left else set()))
                await self.node.call(owner, "shard", "accept", {"items": items, "left": left},
                                     timeout=self.config.call_timeout)
            except NodeError as e:
                log.warning("shard %s: pushing %d key(s) to %s failed (%s); they stay here for now",
                            self.node.name, len(keys), owner, e)
                ok = False
                continue
            finally:
                self._moving.difference_update(keys)
            for key, *_ in items:
                self.state.pop(key, None)
                self.applied.pop(key, None)
                self.moved_to[key] = owner
            self.counters["pushed"] += len(items)
            self._snapshot()
        return ok

    @rpc(allow=ADMIN)
    async def leave(self, body: Any = None) -> int:
        """Hand every key to its owner on the ring without us, then serve nothing (scale-down).
        ``{"gone": [names]}``: every shard leaving at once, so no key is pushed to another leaver."""
        gone = set((body or {}).get("gone") or ()) if isinstance(body, dict) else set()
        self._excluded |= gone - {self.node.name}
        if not self._left:
            self._left = True
            self._excluded.add(self.node.name)
        self._on_members(self.node.directory.members())
        self._push_again = True
        if self._rebalance is None or self._rebalance.done():
            self._rebalance = asyncio.get_running_loop().create_task(self._push_moved())
        give_up = asyncio.get_running_loop().time() + 3 * self.config.call_timeout
        while self.state and not self._rebalance.done() and asyncio.get_running_loop().time() < give_up:
            await asyncio.sleep(0.01)
        return len(self.state)  # keys not pushed yet (0 when all went)

    @rpc
    def keys(self, body: Any = None) -> list[str]:
        """The keys this shard holds state for (sorted)."""
        return sorted(self.state)
