"""The worker's side: scatter pulls and pushes to the shards holding each slice, gather replies.

    client = PsClient(node, ["ps0", "ps1"], job="fmnist-1", worker="w0")
    await client.open(params, workers=["w0", "w1"], consistency=ssp(2),
                      optimizer={"hyperparams": {"lr": 1e-3}, "steps_per_epoch": 468})
    for step in range(steps):
        pulled = await client.pull(step)                 # waits as the consistency model says
        grads = compute(pulled.values)                   # {path: gradient summed over the batch}
        await client.push(step, grads, n=len(batch))     # one message per shard, arrays as frames

Every worker builds the same ``PartitionMap`` from the same parameter shapes (``partition`` is
a pure function), so every worker knows where each slice lives without asking; the map's
version travels with each request and a shard refuses another version.

**Sparse tables.** ``pull(rows={"emb": ids})`` fetches only those rows (each id once, from the
shard ``id % S``) and returns them in the order of ``ids``; ``push(rows={"emb": (ids, grads)})``
sums the gradients of repeated ids before sending, as a shard requires.

**Faults.** Every call has a timeout; a shard that times out or is unreachable is retried
with backoff until ``deadline`` seconds have passed, then ``ShardUnavailable`` names it. Retrying
a push is safe: the shard recognises a step it already logged and acknowledges it again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from dmlsys.node import Node, NodeStopped, PeerUnreachable, RemoteError, RpcTimeout
from dmlsys.ps.clock import BSP, Consistency
from dmlsys.ps.errors import JobUnknown, PsError, ShardUnavailable, WorkerDropped
from dmlsys.ps.partition import PartitionMap, leaves_by_path, partition

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Pulled:
    """What one pull returned: dense values by path, table rows by table (in the order of the ids
    asked for), and ``floor``: the least clock among the live workers on any shard asked, so
    the values hold every update of every step below it."""

    values: dict[str, np.ndarray]
    rows: dict[str, np.ndarray]
    floor: int


class PsClient:
    """One worker's connection to the shards of one job."""

    def __init__(self, node: Node, shards: list[str], *, job: str, worker: str | None = None,
                 call_timeout: float = 10.0, deadline: float = 120.0, backoff: float = 0.05) -> None:
        if not shards or len(set(shards)) != len(shards):
            raise PsError(f"shards: distinct node names, at least one, got {shards}")
        self.node = node
        self.shards = list(shards)
        self.job = job
        self.worker = worker or node.name
        self.call_timeout = call_timeout
        self.deadline = deadline
        self.backoff = backoff
        self.map: PartitionMap | None = None
        self.resume_clock = 0  # after open: the first step this worker has not pushed to every shard
        self.retries = 0  # calls that had to be sent again

    # -- setup -------------------------------------------------------------------------------------

    async def open(self, params: Any, *, workers: Iterable[str], tables: Iterable[str] = (),
                   consistency: Consistency = BSP, optimizer: Mapping[str, Any] | None = None,
                   table_init: Mapping[str, Mapping[str, Any]] | None = None, split_factor: int = 4,
                   version: int = 1) -> PartitionMap:
        """Partition ``params`` and open the job on every shard (or join it, when another worker
        opened it first with the same map). Dense leaves must be arrays (their values are the
        initial ones); a table leaf needs only ``shape`` and ``dtype`` (the shards make its rows
        from ``table_init[path] = {"scale", "seed"}``, zeros by default)."""
        pmap = partition(params, len(self.shards), tables=tables, split_factor=split_factor, version=version)
        flat, _ = leaves_by_path(params)
        dense = {leaf.path: np.asarray(flat[leaf.path]) for leaf in pmap.leaves}
        parts = pmap.split(dense)
        base = {"job": self.job, "map": pmap.to_dict(), "workers": list(workers),
                "consistency": consistency.model, "staleness": consistency.staleness,
                "optimizer": dict(optimizer or {}), "tables": {k: dict(v) for k, v in (table_init or {}).items()}}
        infos = await asyncio.gather(*(self._call(i, "open", {**base, "shard": i, "values": parts[i]})
                                       for i in range(len(self.shards))))
        self.map = pmap
        # A worker joining a job that has its steps (a restarted process): it resumes at the least
        # step some shard lacks; a shard that has it acknowledges that push again without applying it.
        self.resume_clock = min(int((info.get("clocks") or {}).get(self.worker, 0)) for info in infos)
        return pmap

    def _need_map(self) -> PartitionMap:
        if self.map is None:
            raise PsError(f"job {self.job!r}: call open() before pull or push")
        return self.map

    # -- pull --------------------------------------------------------------------------------------

    async def pull(self, clock: int, paths: Iterable[str] | None = None,
                   rows: Mapping[str, np.ndarray] | None = None, *, floor: int = 0) -> Pulled:
        """Dense values (``paths``, default all) and table rows for the step at ``clock``; waits
        until the job's consistency model lets this worker read at ``clock`` and, with
        ``floor``, until every live worker has pushed its steps below ``floor`` (the final
        parameters of a job of ``floor`` steps, whatever the consistency model)."""
        pmap = self._need_map()
        keys, row_req, inverse, wanted = self._plan_read(pmap, paths, rows)
        asked = [i for i in range(len(self.shards)) if keys[i] or row_req[i]]

        async def one(i: int) -> dict:
            body = {"job": self.job, "w": self.worker, "c": clock, "mv": pmap.version,
                    "keys": keys[i], "rows": row_req[i], "floor": floor}
            return await self._call(i, "pull", body)

        replies = dict(zip(asked, await asyncio.gather(*(one(i) for i in asked)), strict=True))
        return self._gather(pmap, replies, inverse, wanted, clock)

    def _plan_read(self, pmap: PartitionMap, paths, rows) -> tuple:
        wanted = None if paths is None else set(paths)
        keys: list[list[str]] = [[] for _ in self.shards]
        for s in pmap.slices:
            if wanted is None or s.path in wanted:
                keys[s.shard].append(s.key)
        row_req: list[dict[str, np.ndarray]] = [{} for _ in self.shards]
        inverse: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # path -> (unique ids, where each asked id is)
        for path, ids in (rows or {}).items():
            unique, inv = np.unique(np.asarray(ids, np.int64).reshape(-1), return_inverse=True)
            for shard, group in pmap.rows_by_shard(path, unique).items():
                row_req[shard][path] = group
            inverse[path] = (unique, inv.reshape(-1))
        return keys, row_req, inverse, wanted

    def _gather(self, pmap: PartitionMap, replies: dict[int, dict], inverse, wanted, clock: int) -> Pulled:
        merged: dict[str, np.ndarray] = {}
        for reply in replies.values():
            merged.update(reply["v"])
        values = pmap.join(merged, wanted)
        out_rows = {}
        for path, (unique, inv) in inverse.items():
            table = pmap.table(path)
            unique_rows = np.empty((unique.size, *table.row_shape), table.dtype)
            homes = unique % pmap.shards
            for shard in {int(h) for h in np.unique(homes)}:
                unique_rows[homes == shard] = replies[shard]["r"][path]  # in the order we sent the ids
            out_rows[path] = unique_rows[inv]
        floor = min((int(r["floor"]) for r in replies.values()), default=clock)
        return Pulled(values, out_rows, floor)

    # -- push --------------------------------------------------------------------------------------

    async def push(self, clock: int, grads: Mapping[str, Any] | None = None, *,
                   rows: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None, n: int,
                   then_pull: bool = False) -> Pulled | None:
        """This worker's step ``clock``: gradient *sums* over ``n`` samples, dense by path (all of
        them or none) and table rows as ``(ids, grads)``. One message to every shard, even those
        with nothing from this step, so that every shard's clock moves. With ``then_pull`` the
        same messages also ask for every dense value at clock ``clock + 1`` (what ``pull(clock + 1)``
        returns): one round trip per shard per step instead of two."""
        pmap = self._need_map()
        grads = {p: np.ascontiguousarray(g) for p, g in (grads or {}).items()}
        for path, g in grads.items():
            leaf = pmap.leaf(path)
            if g.shape != leaf.shape or g.dtype != np.dtype(leaf.dtype):
                raise PsError(f"job {self.job!r}: gradient of {path!r} must be {np.dtype(leaf.dtype)}{leaf.shape}, "
                              f"got {g.dtype}{g.shape}")
        dense = pmap.split(grads)
        row_parts: list[dict[str, dict]] = [{} for _ in self.shards]
        for path, (ids, g) in (rows or {}).items():
            ids = np.asarray(ids, np.int64).reshape(-1)
            g = np.asarray(g)
            unique, inv = np.unique(ids, return_inverse=True)
            if unique.size != ids.size:
                summed = np.zeros((unique.size, *g.shape[1:]), g.dtype)
                np.add.at(summed, inv.reshape(-1), g)
                ids, g = unique, summed
            homes = ids % pmap.shards
            for shard in np.unique(homes):
                mask = homes == shard
                row_parts[int(shard)][path] = {"i": ids[mask], "g": np.ascontiguousarray(g[mask])}

        keys = self._plan_read(pmap, None, None)[0] if then_pull else None

        async def one(i: int) -> dict:
            body = {"job": self.job, "w": self.worker, "c": clock, "mv": pmap.version, "n": int(n),
                    "g": dense[i], "r": row_parts[i]}
            if keys is not None:
                body["then"] = {"keys": keys[i], "rows": {}}
            return await self._call(i, "push", body)

        acks = await asyncio.gather(*(one(i) for i in range(len(self.shards))))
        if keys is None:
            return None
        return self._gather(pmap, {i: ack["then"] for i, ack in enumerate(acks)}, {}, None, clock + 1)

    async def info(self, shard: int) -> dict[str, Any]:
        return await self._call(shard, "info", {"job": self.job})

    # -- retries -----------------------------------------------------------------------------------

    async def _call(self, shard: int, method: str, body: dict) -> Any:
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self.deadline
        peer = self.shards[shard]
        delay = self.backoff
        while True:
            try:
                return await self.node.call(peer, "ps", method, body,
                                            timeout=min(self.call_timeout, max(0.001, give_up - loop.time())))
            except (RpcTimeout, PeerUnreachable) as e:
                error = e
            except RemoteError as e:
                if e.type == "TimeoutError":
                    error = e  # a pull parked past our deadline (others are slow): ask again
                    if loop.time() >= give_up:
                        raise ShardUnavailable(f"job {self.job!r}: shard {shard} ({peer}) did not answer "
                                               f"{method} within {self.deadline:g}s ({error})") from None
                    continue
                # Otherwise the shard answered: asking again would get the same answer.
                if e.type == "WorkerDropped":
                    raise WorkerDropped(e.message) from None
                if e.type == "JobUnknown":
                    raise JobUnknown(e.message) from None
                raise PsError(f"shard {shard} ({peer}) {method}: {e.type}: {e.message}") from None
            except NodeStopped:
                raise
            if loop.time() + delay >= give_up:
                raise ShardUnavailable(f"job {self.job!r}: shard {shard} ({peer}) did not answer {method} "
                                       f"within {self.deadline:g}s ({error})")
            self.retries += 1
            log.debug("job %s: %s to shard %d (%s) failed (%s); retrying in %.2fs", self.job, method, shard,
                      peer, error, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
