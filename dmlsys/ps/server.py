"""The parameter-server shard: holds its slices and table rows, applies updates with optax.

One ``PsService`` per shard node; it can hold one shard of several jobs. A job is opened by
the workers (``PsClient.open``, idempotent: the first open creates it, later ones with the same
partition map join it) and lives in ``<state_dir>/<job>/``.

Requests (one fused message per shard per step, arrays as frames):

* ``ps.pull {job, w, c, mv, keys, rows, floor}`` -> ``{floor, v: {slice key: array}, r: {table: rows}}``:
  parked until the clock lets worker ``w`` read at clock ``c`` (``dmlsys.ps.clock``), and until
  every live worker has pushed the steps below ``floor`` when that is given (a job's final read);
* ``ps.push {job, w, c, mv, n, g: {slice key: grad sum}, r: {table: {i: ids, g: row grads}}}`` ->
  ``{clock}``: worker ``w``'s step ``c`` over ``n`` samples. Every worker pushes every step to
  every shard, with no arrays when it has nothing for that shard, so that the clocks move.

**Updates.** Gradients travel as sums; the shard divides by the samples behind them. Under BSP
the pushes of one step are summed and applied as one optax update once every live worker has
pushed that step, so N workers compute what one worker does on the global batch. Under SSP and
ASP each push is one update, applied as it arrives. Dense slices: one jitted optax update over
the shard's slices (elementwise optimizers, so per slice = per leaf). Tables: **lazy row
updates**: only the rows a push touches are gathered with their optimizer state, updated, and
scattered back (state leaves shaped like the table are per row; scalar ones, such as Adam's
step count, are shared, as in TensorFlow's LazyAdam).

**Durability: ack after the write-ahead log.** A push is appended to the log and fsynced
before it is applied and acknowledged, so an acknowledged update is never lost: after a crash
the shard loads its last checkpoint and replays the log. A retried push (the ack was lost) is
recognised by its (worker, step) and acknowledged without being applied twice. A dropped worker
is logged too, since it decides when a BSP step completes. The shard checkpoints every
``checkpoint_every`` logged records and when it stops (drain), then truncates the log.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np

from dmlsys.node import ConfigError, Service, rpc
from dmlsys.ps.clock import Clock, Consistency
from dmlsys.ps.errors import JobUnknown, PsError, WorkerDropped
from dmlsys.ps.log import WriteAheadLog, read_checkpoint, write_checkpoint
from dmlsys.ps.partition import PartitionMap
from dmlsys.wire.sim import to_thread

log = logging.getLogger(__name__)

JOB_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
MAX_ROWS_PER_REQUEST = 1 << 22
CHECKPOINT = "shard.npz"
WAL = "wal.log"


@dataclasses.dataclass(frozen=True)
class PsConfig:
    """How a shard keeps its state. ``state_dir`` holds one directory per job."""

    state_dir: str
    checkpoint_every: int = 200  # log records between checkpoints
    drop_timeout: float = 30.0  # seconds a silent worker may hold up a waiting read before it is dropped
    fsync: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.checkpoint_every, int) or self.checkpoint_every < 1:
            raise ConfigError("checkpoint_every", f"an integer >= 1, got {self.checkpoint_every!r}")
        if not isinstance(self.drop_timeout, (int, float)) or not 0 < self.drop_timeout <= 86400:
            raise ConfigError("drop_timeout", f"seconds in (0, 86400], got {self.drop_timeout!r}")


def make_optimizer(spec: dict[str, Any]):
    """``{"hyperparams": {...}, "steps_per_epoch": n}`` -> optax transformation, by the same
    rules as the collective trainer (``dmlsys.train.trainer.Hyperparams.optimizer_for``)."""
    from dmlsys.train.trainer import Hyperparams

    try:
        hp = Hyperparams(**dict(spec.get("hyperparams") or {}))
    except TypeError as e:
        raise PsError(f"optimizer: hyperparams: {e}") from None
    return hp.optimizer_for(int(spec.get("steps_per_epoch") or 1))


_UPDATES: dict[str, Any] = {}


def _dense_update_for(spec: dict[str, Any], opt, *, scaled: bool = True) -> Any:
    """One jitted update per optimizer spec in this process: jobs and shards with the same
    optimizer share its compilations (a compilation costs far more than a small update).
    ``scaled``: (params, state, grads, scale); else (params, state, grads) for grads already scaled."""
    import json

    import jax
    import optax

    key = json.dumps([spec, scaled], sort_keys=True)
    fn = _UPDATES.get(key)
    if fn is None:
        def dense_update(params, state, grads, scale):
            grads = jax.tree_util.tree_map(lambda g: g * scale, grads)
            updates, state = opt.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        def row_update(params, state, grads):
            updates, state = opt.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        fn = _UPDATES[key] = jax.jit(dense_update if scaled else row_update)
    return fn


def _init_table(job: str, path: str, shard: int, rows: int, row_shape: tuple, dtype: str, spec: dict) -> np.ndarray:
    """A shard's rows of a table, made here (a table may be too large for any worker to send):
    normal(0, scale) from a seed of (seed, shard, path), or zeros."""
    scale = float(spec.get("scale", 0.0))
    if not scale:
        return np.zeros((rows, *row_shape), dtype)
    seed = [int(spec.get("seed", 0)), shard, *path.encode()]
    return (np.random.default_rng(seed).standard_normal((rows, *row_shape)) * scale).astype(dtype)


class ShardJob:
    """One job's shard: values, optimizer state, clock, pending BSP sums, log and checkpoint."""

    def __init__(self, name: str, directory: Path, pmap: PartitionMap, shard: int, clock: Clock,
                 optimizer: dict[str, Any], *, fsync: bool = True) -> None:
        self.name = name
        self.dir = directory
        self.map = pmap
        self.shard = shard
        self.clock = clock
        self.optimizer_spec = optimizer
        self.fsync = fsync
        self.opt = make_optimizer(optimizer)
        self.slices = {s.key: s for s in pmap.slices_of(shard)}
        self.tables = {t.path: t for t in pmap.tables}
        self.dense: dict[str, np.ndarray] = {}
        self.dense_state: Any = None
        self.rows: dict[str, np.ndarray] = {}
        self.row_state: dict[str, Any] = {}
        self.pending: dict[int, dict[str, Any]] = {}  # BSP: step -> {"n", "g", "r", "from"}
        self.seq = 0  # log records accepted so far (pushes and drops)
        self.updates = 0  # optax updates applied (dense or rows)
        self.applied_pushes = 0  # pushes whose gradients are in the values
        self.wal = WriteAheadLog(directory / WAL, fsync=fsync)
        self.lock = asyncio.Lock()  # one record at a time (log order = apply order), checkpoints too
        self._dense_update = _dense_update_for(optimizer, self.opt)
        self._row_update = _dense_update_for(optimizer, self.opt, scaled=False)

    # -- creation and recovery ---------------------------------------------------------------

    def init_values(self, values: dict[str, np.ndarray], table_init: dict[str, dict]) -> None:
        for key, s in self.slices.items():
            got = values.get(key)
            leaf = self.map.leaf(s.path)
            shape = leaf.shape if s.whole else (s.stop - s.start, *leaf.shape[1:])
            if got is None or np.shape(got) != shape or np.asarray(got).dtype != np.dtype(leaf.dtype):
                what = None if got is None else f"{np.asarray(got).dtype}{np.shape(got)}"
                raise PsError(f"job {self.name!r} shard {self.shard}: initial value of {key!r} is {what}, "
                              f"expected {np.dtype(leaf.dtype)}{shape}")
            self.dense[key] = np.array(got)
        for path, t in self.tables.items():
            rows = _init_table(self.name, path, self.shard, t.local_rows(self.shard, self.map.shards),
                               t.row_shape, t.dtype, dict(table_init.get(path) or {}))
            # One scratch row at the end: lazy updates pad their rows to a power of two with it,
            # so that a handful of shapes (and compilations) serve every batch.
            self.rows[path] = np.concatenate([rows, np.zeros((1, *t.row_shape), rows.dtype)])
        self.dense_state = self.opt.init(self.dense)
        self.row_state = {p: _numpy_tree(self.opt.init(r)) for p, r in self.rows.items()}

    def meta(self) -> dict[str, Any]:
        return {"job": self.name, "map": self.map.to_dict(), "shard": self.shard, "clock": self.clock.to_dict(),
                "optimizer": self.optimizer_spec, "seq": self.seq, "updates": self.updates,
                "applied_pushes": self.applied_pushes,
                "pending": {str(t): {"n": p["n"], "from": sorted(p["from"]), "tables": sorted(p["r"])}
                            for t, p in self.pending.items()}}

    def checkpoint(self) -> None:
        import jax

        arrays: dict[str, np.ndarray] = {}
        for key, value in self.dense.items():
            arrays[f"v/{key}"] = np.asarray(value)
        for i, leaf in enumerate(jax.tree_util.tree_leaves(self.dense_state)):
            arrays[f"o/{i}"] = np.asarray(leaf)
        for path, value in self.rows.items():
            arrays[f"t/{path}"] = value
            for i, leaf in enumerate(jax.tree_util.tree_leaves(self.row_state[path])):
                arrays[f"to/{path}/{i}"] = np.asarray(leaf)
        for t, p in self.pending.items():
            for key, g in p["g"].items():
                arrays[f"p/{t}/g/{key}"] = g
            for path, (ids, g) in p["r"].items():
                arrays[f"p/{t}/ri/{path}"] = ids
                arrays[f"p/{t}/rg/{path}"] = g
        write_checkpoint(self.dir / CHECKPOINT, arrays, self.meta(), fsync=self.fsync)
        self.wal.truncate()

    @classmethod
    def recover(cls, name: str, directory: Path, *, fsync: bool = True) -> ShardJob:
        """The job as its checkpoint left it, with the log replayed on top."""
        import jax

        arrays, meta = read_checkpoint(directory / CHECKPOINT)
        job = cls(name, directory, PartitionMap.from_dict(meta["map"]), int(meta["shard"]),
                  Clock.from_dict(meta["clock"]), meta["optimizer"], fsync=fsync)
        job.seq, job.updates = int(meta["seq"]), int(meta["updates"])
        job.applied_pushes = int(meta.get("applied_pushes", 0))
        job.dense = {key: arrays[f"v/{key}"] for key in job.slices}
        template, treedef = jax.tree_util.tree_flatten(job.opt.init(job.dense))
        job.dense_state = jax.tree_util.tree_unflatten(treedef, [arrays[f"o/{i}"] for i in range(len(template))])
        for path in job.tables:
            job.rows[path] = np.array(arrays[f"t/{path}"])
            template, treedef = jax.tree_util.tree_flatten(job.opt.init(job.rows[path]))
            job.row_state[path] = jax.tree_util.tree_unflatten(
                treedef, [np.array(arrays[f"to/{path}/{i}"]) for i in range(len(template))])
        for t, p in meta["pending"].items():
            job.pending[int(t)] = {
                "n": int(p["n"]), "from": set(p["from"]),
                "g": {k[len(f"p/{t}/g/"):]: np.array(v) for k, v in arrays.items() if k.startswith(f"p/{t}/g/")},
                "r": {path: (arrays[f"p/{t}/ri/{path}"], arrays[f"p/{t}/rg/{path}"]) for path in p["tables"]}}
        replayed = 0
        for record in job.wal.replay():
            if int(record["seq"]) <= job.seq:
                continue  # already in the checkpoint (a crash between its rename and the truncation)
            job.accept(record)
            replayed += 1
        log.info("job %s shard %d recovered at log record %d (%d replayed), floor %d", name, job.shard,
                 job.seq, replayed, job.clock.floor)
        return job

    # -- updates -------------------------------------------------------------------------------

    def check_push(self, body: dict[str, Any]) -> dict[str, Any]:
        """The push as a log record, checked against the map; raises PsError naming what is wrong."""
        n = body.get("n")
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise PsError(f"push: n: the samples behind the gradients, an integer >= 0, got {n!r}")
        grads = body.get("g") or {}
        if not isinstance(grads, dict):
            raise PsError("push: g: a dict of slice key -> gradient")
        if grads and set(grads) != set(self.slices):
            missing = sorted(set(self.slices) - set(grads)) or sorted(set(grads) - set(self.slices))
            raise PsError(f"job {self.name!r} shard {self.shard}: push must carry every slice of this shard "
                          f"or none; mismatch at {missing[0]!r}")
        for key, g in grads.items():
            want = self.dense[key]
            if not isinstance(g, np.ndarray) or g.shape != want.shape or g.dtype != want.dtype:
                raise PsError(f"job {self.name!r} shard {self.shard}: gradient of {key!r} must be "
                              f"{want.dtype}{want.shape}, got {_describe(g)}")
        rows = body.get("r") or {}
        if not isinstance(rows, dict):
            raise PsError("push: r: a dict of table -> {i: ids, g: row gradients}")
        for path, part in rows.items():
            ids = self._check_ids(path, part.get("i") if isinstance(part, dict) else None)
            g = part.get("g")
            table = self.tables[path]
            if not isinstance(g, np.ndarray) or g.shape != (ids.size, *table.row_shape) or g.dtype != np.dtype(table.dtype):
                raise PsError(f"job {self.name!r}: row gradients of table {path!r} must be "
                              f"{np.dtype(table.dtype)}{(ids.size, *table.row_shape)}, got {_describe(g)}")
            if np.unique(ids).size != ids.size:
                raise PsError(f"job {self.name!r}: row ids of table {path!r} repeat within one push; sum them first")
        return {"w": body["w"], "c": body["c"], "n": n, "g": grads, "r": rows}

    def _check_ids(self, path: Any, ids: Any) -> np.ndarray:
        if path not in self.tables:
            raise PsError(f"job {self.name!r} has no table {path!r} (tables: {', '.join(self.tables) or 'none'})")
        table = self.tables[path]
        if not isinstance(ids, np.ndarray) or ids.ndim != 1 or ids.dtype.kind not in "iu":
            raise PsError(f"row ids of table {path!r}: a 1-d integer array, got {_describe(ids)}")
        if ids.size > MAX_ROWS_PER_REQUEST:
            raise PsError(f"{ids.size} row ids of table {path!r} in one request; the limit is {MAX_ROWS_PER_REQUEST}")
        if ids.size and (ids.min() < 0 or ids.max() >= table.rows or np.any(ids % self.map.shards != self.shard)):
            raise PsError(f"row ids of table {path!r} must be in [0, {table.rows}) and = {self.shard} "
                          f"mod {self.map.shards} on shard {self.shard}")
        return ids

    def accept(self, record: dict[str, Any]) -> Any:
        """Apply one log record, all on the caller's thread (recovery's replay; the live path,
        ``accept_async``, runs the same steps with the compute on a worker thread, so recovery
        ends in the same state). Returns the clock's Tick."""
        tick = self.peek(record)
        updates = self.collect(record, tick)
        for update in updates:
            self.install(self.compute(update))
        return self.commit(record, tick)

    async def accept_async(self, record: dict[str, Any], *, logged: bool = False) -> Any:
        """``accept`` for a live record, with the blocking parts on a worker thread
        (``dmlsys.wire.sim.to_thread``: inline on a simulated loop): appending the record to the
        log (and its fsync, unless ``logged``), summing BSP pushes and the optax updates. The
        values pulls read change only on the loop (``install``), and the clock moves only after
        every update is in (``commit``), so a read the clock lets through finds what it needs;
        the caller serialises records per job (``ShardJob.lock``), so updates apply in log order."""
        tick = self.peek(record)
        updates, first = await to_thread(self._log_and_compute, record, tick, logged)
        if first is not None:
            self.install(first)
        for update in updates[1:]:
            self.install(await to_thread(self.compute, update))
        return self.commit(record, tick)

    def _log_and_compute(self, record: dict[str, Any], tick: Any, logged: bool) -> tuple[list, Any]:
        if not logged:
            self.wal.append(record)  # on disk before it is applied and acknowledged
        updates = self.collect(record, tick)
        return updates, self.compute(updates[0]) if updates else None

    def peek(self, record: dict[str, Any]) -> Any:
        """What the record will do to the clock (completed steps, duplicate), clock unchanged."""
        if "drop" in record:
            return self.clock.peek_drop(record["drop"])
        return self.clock.peek_push(record["w"], int(record["c"]))

    def collect(self, record: dict[str, Any], tick: Any) -> list[tuple]:
        """The updates the record makes, in order: ``(n, grads, rows, pushes)``. Under BSP it
        adds the push to its step's pending sum and takes the sums of the steps it completes."""
        updates: list[tuple] = []
        if "drop" not in record:
            if tick.duplicate:
                return updates
            if self.clock.consistency.aggregates:
                self._add_pending(record)
            else:
                updates.append((record["n"], record["g"], record["r"], 1))
        for t in tick.completed:
            p = self.pending.pop(t, None)
            if p is not None:
                updates.append((p["n"], p["g"], {path: {"i": i, "g": g} for path, (i, g) in p["r"].items()},
                                len(p["from"])))
        return updates

    def commit(self, record: dict[str, Any], peeked: Any) -> Any:
        """Move the clock (on the loop, after the updates are installed)."""
        self.seq = max(self.seq, int(record["seq"]))
        tick = self.clock.drop(record["drop"]) if "drop" in record else self.clock.push(record["w"], int(record["c"]))
        if tick.completed != peeked.completed or tick.duplicate != peeked.duplicate:
            raise PsError(f"job {self.name!r} shard {self.shard}: the clock moved between peek and commit "
                          f"({peeked} then {tick}); records of a job must be accepted one at a time")
        return tick

    def _add_pending(self, record: dict[str, Any]) -> None:
        t = int(record["c"])
        p = self.pending.setdefault(t, {"n": 0, "g": {}, "r": {}, "from": set()})
        p["n"] += record["n"]
        p["from"].add(record["w"])
        for key, g in record["g"].items():
            if key in p["g"]:
                np.add(p["g"][key], g, out=p["g"][key])
            else:
                p["g"][key] = np.array(g)
        for path, part in record["r"].items():
            if path in p["r"]:
                ids, g = p["r"][path]
                p["r"][path] = _sum_rows(np.concatenate([ids, part["i"]]), np.concatenate([g, part["g"]]))
            else:
                p["r"][path] = (np.array(part["i"]), np.array(part["g"]))

    def compute(self, update: tuple) -> dict[str, Any]:
        """One update's new values and optimizer state, from the installed ones; changes nothing
        that a read sees (runs on a worker thread while the loop answers pulls)."""
        n, grads, rows, pushes = update
        out: dict[str, Any] = {"pushes": pushes, "dense": None, "rows": []}
        if n <= 0:
            return out
        scale = np.float32(1.0 / n)
        if grads:
            dense, state = self._dense_update(self.dense, self.dense_state, grads, scale)
            # New arrays every update, never written in place: a reply still being sent (zero-copy)
            # may hold the old ones.
            out["dense"] = ({k: np.asarray(v) for k, v in dense.items()}, state)
        for path, part in rows.items():
            if part["i"].size:
                out["rows"].append(self._compute_rows(path, part["i"] // self.map.shards, part["g"], scale))
        return out

    def install(self, result: dict[str, Any]) -> None:
        """Put a computed update in place (on the loop: a pull never sees half of one)."""
        if result["dense"] is not None:
            self.dense, self.dense_state = result["dense"]
            self.updates += 1
        for path, local, new_rows, new_state in result["rows"]:
            self.rows[path][local] = new_rows
            self.row_state[path] = _put_rows(self.row_state[path], new_state, local, self.rows[path].shape)
        self.updates += bool(result["rows"])
        self.applied_pushes += result["pushes"]

    def _compute_rows(self, path: str, local: np.ndarray, grads: np.ndarray, scale: np.float32) -> tuple:
        """Lazy update: only rows ``local`` and their optimizer state move. The rows are padded
        to a power of two with the scratch row (zero gradient; whatever it becomes is unused).
        Returns (path, local, their new rows, the new state: per-row leaves for those rows only)."""
        import jax

        table = self.rows[path]
        shape = table.shape
        scratch = shape[0] - 1
        k = local.size
        size = max(8, 1 << (k - 1).bit_length())
        idx = np.full(size, scratch, np.int64)
        idx[:k] = local
        g = np.zeros((size, *grads.shape[1:]), grads.dtype)
        np.multiply(grads, scale, out=g[:k])
        state = self.row_state[path]
        per_row = lambda s: np.shape(s) == shape
        sub_state = jax.tree_util.tree_map(lambda s: s[idx] if per_row(s) else s, state)
        new_rows, new_sub_state = self._row_update(table[idx], sub_state, g)
        new_state = jax.tree_util.tree_map(lambda old, new: np.asarray(new)[:k] if per_row(old) else new,
                                           state, new_sub_state)
        return path, local, np.asarray(new_rows)[:k], new_state

    # -- reads ---------------------------------------------------------------------------------

    def read(self, keys: Any, rows: Any) -> dict[str, Any]:
        if keys is None:
            values = dict(self.dense)
        else:
            if not isinstance(keys, list):
                raise PsError("pull: keys: a list of slice keys or null for all")
            unknown = [k for k in keys if k not in self.dense]
            if unknown:
                raise PsError(f"job {self.name!r} shard {self.shard} holds no slice {unknown[0]!r}")
            values = {k: self.dense[k] for k in keys}
        out_rows = {}
        for path, ids in (rows or {}).items():
            ids = self._check_ids(path, ids)
            out_rows[path] = self.rows[path][ids // self.map.shards]  # a gather: a fresh array
        return {"floor": self.clock.floor, "v": values, "r": out_rows}

    def close(self) -> None:
        self.wal.close()


class PsService(Service):
    """The ``ps`` service: shards of parameter-server jobs (see the module docstring)."""

    name = "ps"

    def __init__(self, config: PsConfig) -> None:
        self.config = config
        self.jobs: dict[str, ShardJob] = {}
        self._waiting: dict[int, tuple[str, asyncio.Future]] = {}
        self._tokens = itertools.count()
        self._watchdog: asyncio.Task | None = None

    async def start(self, node) -> None:
        await super().start(node)
        self._watchdog = asyncio.get_running_loop().create_task(self._drop_laggards())

    async def stop(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        for job in self.jobs.values():
            await job.lock.acquire()  # a record being accepted finishes first; kept: the job is closed
            try:
                job.checkpoint()  # on drain: a restart then replays nothing
            except OSError as e:
                log.error("job %s shard %d: checkpoint on stop failed: %s", job.name, job.shard, e)
            job.close()

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    # -- jobs ----------------------------------------------------------------------------------

    def _dir(self, name: Any) -> Path:
        if not isinstance(name, str) or not JOB_RE.match(name):
            raise PsError(f"job: a name of letters, digits and _.:- (at most 128), got {name!r}")
        return Path(self.config.state_dir) / name.replace(":", "_")

    def _job(self, name: Any) -> ShardJob:
        job = self.jobs.get(name)
        if job is not None:
            return job
        directory = self._dir(name)
        if not (directory / CHECKPOINT).exists():
            raise JobUnknown(f"node {self.node.name!r} holds no shard of job {name!r}; open it first")
        job = self.jobs[name] = ShardJob.recover(name, directory, fsync=self.config.fsync)
        now = self._now()
        for w in job.clock.last_heard:
            job.clock.last_heard[w] = now  # a restart does not count against the workers
        return job

    @rpc
    def open(self, body) -> dict[str, Any]:
        """``{job, map, shard, workers, consistency, staleness, optimizer, values, tables}``:
        create this shard of the job, or join it when it exists with the same map."""
        if not isinstance(body, dict):
            raise PsError("ps.open takes a dict")
        name = body.get("job")
        pmap = PartitionMap.from_dict(body.get("map") or {})
        try:
            job = self._job(name)
        except JobUnknown:
            job = None
        if job is not None:
            if job.map.digest != pmap.digest or job.map.version != pmap.version:
                raise PsError(f"job {name!r} exists on {self.node.name!r} with map v{job.map.version} "
                              f"#{job.map.digest}, not v{pmap.version} #{pmap.digest}; use another job name")
            return self._info(job)
        shard = body.get("shard")
        if not isinstance(shard, int) or not 0 <= shard < pmap.shards:
            raise PsError(f"ps.open: shard: an integer in [0, {pmap.shards}), got {shard!r}")
        consistency = Consistency(str(body.get("consistency", "bsp")), int(body.get("staleness", 0)))
        clock = Clock([str(w) for w in body.get("workers") or []], consistency, now=self._now())
        directory = self._dir(name)
        directory.mkdir(parents=True, exist_ok=True)
        job = ShardJob(name, directory, pmap, shard, clock, dict(body.get("optimizer") or {}), fsync=self.config.fsync)
        job.init_values(dict(body.get("values") or {}), dict(body.get("tables") or {}))
        job.wal.truncate()  # a log left by an earlier job of this name belongs to it, not to us
        job.checkpoint()  # from now on a restart finds the job on disk
        self.jobs[name] = job
        log.info("job %s: shard %d of %d opened on %s (%s, %d slices, %d tables)", name, shard, pmap.shards,
                 self.node.name, consistency.model, len(job.slices), len(job.tables))
        return self._info(job)

    def _info(self, job: ShardJob) -> dict[str, Any]:
        return {"job": job.name, "shard": job.shard, "version": job.map.version, "digest": job.map.digest,
                "clocks": dict(job.clock.clocks), "floor": job.clock.floor}

    def _check_version(self, job: ShardJob, body: dict) -> None:
        if body.get("mv") != job.map.version:
            raise PsError(f"job {job.name!r}: request for map v{body.get('mv')}, this shard has v{job.map.version}")

    # -- requests ------------------------------------------------------------------------------

    @rpc
    async def pull(self, body, ctx) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise PsError("ps.pull takes a dict")
        job = self._job(body.get("job"))
        self._check_version(job, body)
        worker, clock = body.get("w"), body.get("c")
        if not isinstance(clock, int) or isinstance(clock, bool) or clock < 0:
            raise PsError(f"pull: c: the reader's clock, an integer >= 0, got {clock!r}")
        at_least = body.get("floor") or 0
        if not isinstance(at_least, int) or isinstance(at_least, bool) or at_least < 0:
            raise PsError(f"pull: floor: an integer >= 0, got {at_least!r}")
        return await self._read(job, worker, clock, at_least, body.get("keys"), body.get("rows"))

    async def _read(self, job: ShardJob, worker: Any, clock: int, at_least: int, keys: Any, rows: Any) -> dict:
        """The values for ``worker`` at ``clock``, once the consistency model lets it read."""
        token = next(self._tokens)
        if not job.clock.read(str(worker), clock, token, now=self._now(), at_least=at_least):
            fut = asyncio.get_running_loop().create_future()
            self._waiting[token] = (job.name, fut)
            try:
                await fut
            finally:
                self._waiting.pop(token, None)
                job.clock.cancel(token)
            job = self._job(job.name)
            if str(worker) in job.clock.dropped:
                raise WorkerDropped(f"worker {worker!r} was dropped from job {job.name!r}'s barrier "
                                    f"at clock {job.clock.dropped[str(worker)]}")
        return job.read(keys, rows)

    @rpc
    async def push(self, body) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise PsError("ps.push takes a dict")
        job = self._job(body.get("job"))
        self._check_version(job, body)
        worker, clock = str(body.get("w")), body.get("c")
        if not isinstance(clock, int) or isinstance(clock, bool) or clock < 0:
            raise PsError(f"push: c: the step, an integer >= 0, got {clock!r}")
        if worker not in job.clock.clocks:
            raise PsError(f"no worker {worker!r} in job {job.name!r}")
        then = body.get("then")
        if then is not None and not isinstance(then, dict):
            raise PsError("push: then: a pull's {keys, rows} to answer at the next clock, or null")
        # Shielded: once begun, a push is logged, applied and its clock moved even if this
        # handler is cancelled (a half-accepted record would leave a BSP sum without its clock).
        ack = await asyncio.shield(self._push(job, worker, clock, body))
        if then is None:
            return ack
        # Fused with the pull of the next step: one message each way per shard per step. The
        # push is durable already; if the read is cut short the worker sends both again and the
        # push is recognised as a retry.
        return {**ack, "then": await self._read(job, worker, clock + 1, 0, then.get("keys"), then.get("rows"))}

    async def _push(self, job: ShardJob, worker: str, clock: int, body: dict) -> dict[str, Any]:
        async with job.lock:  # a push of this job in flight (log, compute) finishes first
            if worker in job.clock.dropped:
                raise WorkerDropped(f"worker {worker!r} was dropped from job {job.name!r}'s barrier "
                                    f"at clock {job.clock.dropped[worker]}")
            if clock < job.clock.clocks[worker]:
                return {"clock": job.clock.clocks[worker], "duplicate": True}  # a retry: already logged
            if clock > job.clock.clocks[worker]:  # refused before it reaches the log, which replays only what applies
                raise PsError(f"worker {worker!r} pushed step {clock} to job {job.name!r} shard {job.shard}, "
                              f"which has its steps up to {job.clock.clocks[worker] - 1} only; a push in between "
                              f"was lost")
            record = job.check_push(body)
            record["seq"] = job.seq + 1
            # Logged (and fsynced) before it is applied and acknowledged; both off the loop.
            await self._accept(job, record)
            return {"clock": job.clock.clocks[worker]}

    async def _accept(self, job: ShardJob, record: dict[str, Any]) -> None:
        await self._after(job, await job.accept_async(record))

    async def _after(self, job: ShardJob, tick) -> None:
        """Release the reads the tick lets through; checkpoint when due. Under ``job.lock``."""
        for token in tick.released:
            entry = self._waiting.get(token)
            if entry is not None and not entry[1].done():
                entry[1].set_result(None)
        if job.wal.records >= self.config.checkpoint_every:
            await to_thread(job.checkpoint)  # reads what pulls read, changes none of it

    async def _drop_laggards(self) -> None:
        period = max(0.01, self.config.drop_timeout / 4)
        while True:
            try:
                # Ends with the node, a killed one too (kill() stops no service).
                await asyncio.wait_for(self.node.wait_stopped(), period)
                return
            except TimeoutError:
                pass
            now = self._now()
            for job in list(self.jobs.values()):
                for worker in job.clock.laggards(now, self.config.drop_timeout):
                    await asyncio.shield(self._drop(job, worker))

    async def _drop(self, job: ShardJob, worker: str) -> None:
        async with job.lock:
            now = self._now()
            if worker in job.clock.dropped or worker not in job.clock.laggards(now, self.config.drop_timeout):
                return  # it was heard from (or dropped) while this waited for the lock
            log.warning("job %s shard %d: worker %s silent for %.1fs at clock %d while others wait; "
                        "dropped from the barrier", job.name, job.shard, worker,
                        now - job.clock.last_heard[worker], job.clock.clocks[worker])
            await self._accept(job, {"seq": job.seq + 1, "drop": worker})

    @rpc
    def info(self, body) -> dict[str, Any]:
        job = self._job(body.get("job") if isinstance(body, dict) else None)
        return {**self._info(job), "updates": job.updates, "applied_pushes": job.applied_pushes,
                "dropped": dict(job.clock.dropped), "seq": job.seq}

    def status(self) -> dict[str, Any]:
        return {name: {"shard": j.shard, "floor": j.clock.floor, "updates": j.updates, "parked": j.clock.parked}
                for name, j in self.jobs.items()}


def _sum_rows(ids: np.ndarray, grads: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows with the same id summed: (unique ids, their summed gradients)."""
    unique, inverse = np.unique(ids, return_inverse=True)
    if unique.size == ids.size:
        order = np.argsort(ids, kind="stable")
        return ids[order], grads[order]
    out = np.zeros((unique.size, *grads.shape[1:]), grads.dtype)
    np.add.at(out, inverse.reshape(-1), grads)
    return unique, out


def _put_rows(state: Any, new_state: Any, local: np.ndarray, shape: tuple) -> Any:
    """A table's optimizer state with rows ``local`` of its per-row leaves (shaped like the
    table) replaced by ``new_state``'s, and its shared leaves (a step count) replaced whole."""
    import jax

    def put(old, new):
        if np.shape(old) == shape:
            old[local] = new
            return old
        return np.array(new)

    return jax.tree_util.tree_map(put, state, new_state)


def _numpy_tree(tree: Any) -> Any:
    import jax

    return jax.tree_util.tree_map(lambda x: np.array(x), tree)


def _describe(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"{value.dtype}{value.shape}"
    return type(value).__name__
