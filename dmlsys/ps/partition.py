"""The partition map: which parameter server shard holds which part of a model. Pure: no I/O.

A model's parameters are a pytree (nested dicts, lists, tuples) of arrays. Each leaf has a path
("dense0/w"). A leaf is either **dense** (pulled and pushed whole or by slice) or a **table**
(a 2-D array whose rows are addressed by id; a worker pulls only the rows its batch touches).

**Dense leaves: slice, then greedy largest-first.** Let ``T`` be the dense bytes and ``S`` the
shards. A leaf larger than the cap ``c = ceil(T / (k·S))`` (``k = split_factor``, default 4) is
cut along its first axis into contiguous row ranges of at most ``max(c, one row)`` bytes, their
row counts differing by at most one. The pieces, largest first (ties by path, so the
map is a pure function of its inputs), each go to the shard with the least bytes so far (ties
to the lowest index), starting from the bytes the tables already put on each shard. Adjacent
pieces of a leaf that land on one shard are merged back into one slice.

**Tables: rows by id modulo S.** Row ``i`` of a table lives on shard ``i % S`` at local index
``i // S``: no lookup table, any worker computes a row's home from its id, and every shard gets
``floor`` or ``ceil`` of ``rows / S`` rows of every table.

**Guarantee** (checked by ``tests/ps/test_partition.py`` for any list of shapes): with ``B`` the
total bytes, ``p`` the largest dense piece (before merging) and ``R`` the sum over tables of one row's bytes,

    max bytes on a shard  <=  B / S  +  max(p, R),      and  p <= max(c, largest row of any leaf).

Why: when the last piece is placed on the fullest shard, that shard was the least loaded, so at
most the mean (<= B/S) before it took at most ``p`` more; a shard that took no dense piece holds
table rows only, at most ``rows/S + 1`` per table, i.e. at most its share plus ``R``. With the
default k = 4 no shard holds more than 1.25 x the mean, plus one row of the largest-rowed leaf.

The map is **versioned**: ``version`` counts re-partitions of one job, and ``digest`` is a hash
of the layout; workers send the version with every request and a shard refuses another one.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from dmlsys.arrays import segments
from dmlsys.ps.errors import PartitionError

SEP = "/"


# -- pytrees by path ---------------------------------------------------------------------------


def leaves_by_path(tree: Any) -> tuple[dict[str, Any], Callable[[Mapping[str, Any]], Any]]:
    """``{"a/b": leaf}`` in a fixed order, and a function that rebuilds the structure from such a
    dict. Dict keys must be non-empty strings without '/'; list and tuple items are numbered."""
    found: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> Callable[[Mapping[str, Any]], Any]:
        if isinstance(node, Mapping):
            keys = list(node)
            for key in keys:
                if not isinstance(key, str) or not key or SEP in key:
                    raise PartitionError(f"parameter key {key!r} under {prefix or '/'!r}: "
                                         "a non-empty string without '/'")
            parts = [walk(node[k], f"{prefix}{k}{SEP}") for k in keys]
            return lambda d: {k: p(d) for k, p in zip(keys, parts)}
        if isinstance(node, (list, tuple)):
            parts = [walk(v, f"{prefix}{i}{SEP}") for i, v in enumerate(node)]
            if isinstance(node, list):
                return lambda d: [p(d) for p in parts]
            if hasattr(node, "_fields"):
                cls = type(node)
                return lambda d: cls(*(p(d) for p in parts))
            return lambda d: tuple(p(d) for p in parts)
        path = prefix[:-1]
        if not path:
            raise PartitionError("a bare array is not a pytree of named parameters; wrap it: {'w': array}")
        found[path] = node
        return lambda d: d[path]

    build = walk(tree, "")
    return found, build


# -- the map's parts ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class LeafSpec:
    """A parameter's path, shape and dtype (what the map needs; not its values)."""

    path: str
    shape: tuple[int, ...]
    dtype: str  # numpy dtype.str, e.g. "<f4"

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize

    @property
    def row_bytes(self) -> int:
        """Bytes of one index of the first axis (the whole leaf for a 0-d one)."""
        return self.nbytes // self.shape[0] if self.shape and self.shape[0] else self.nbytes


@dataclasses.dataclass(frozen=True, slots=True)
class Slice:
    """Rows ``[start, stop)`` of dense leaf ``path`` (the whole leaf when it is not split), on ``shard``."""

    path: str
    start: int
    stop: int
    whole: bool
    shard: int
    nbytes: int

    @property
    def key(self) -> str:
        """The name a shard and the wire use for this slice."""
        return self.path if self.whole else f"{self.path}[{self.start}:{self.stop}]"


@dataclasses.dataclass(frozen=True, slots=True)
class Table:
    """A sparse table: ``rows`` rows of shape ``row_shape``; row i lives on shard i % S."""

    path: str
    rows: int
    row_shape: tuple[int, ...]
    dtype: str

    def local_rows(self, shard: int, shards: int) -> int:
        """How many of the table's rows shard ``shard`` holds."""
        return len(range(shard, self.rows, shards))

    @property
    def row_bytes(self) -> int:
        return math.prod(self.row_shape) * np.dtype(self.dtype).itemsize


@dataclasses.dataclass(frozen=True)
class PartitionMap:
    """Where every slice and table row lives. Build with :func:`plan`; send with ``to_dict``."""

    shards: int
    leaves: tuple[LeafSpec, ...]  # dense leaves, in pytree order
    slices: tuple[Slice, ...]  # in leaf order, then row order
    tables: tuple[Table, ...]
    version: int = 1

    @property
    def digest(self) -> str:
        """A short hash of the layout: two maps with one digest put every byte in the same place."""
        return f"{zlib.crc32(repr((self.shards, self.leaves, self.slices, self.tables)).encode()):08x}"

    # -- where things are --------------------------------------------------------------------

    def slices_of(self, shard: int) -> list[Slice]:
        return [s for s in self.slices if s.shard == shard]

    def table(self, path: str) -> Table:
        for t in self.tables:
            if t.path == path:
                return t
        raise PartitionError(f"no sparse table {path!r} in the partition map "
                             f"(tables: {', '.join(t.path for t in self.tables) or 'none'})")

    def leaf(self, path: str) -> LeafSpec:
        for leaf in self.leaves:
            if leaf.path == path:
                return leaf
        raise PartitionError(f"no dense parameter {path!r} in the partition map")

    def loads(self) -> list[int]:
        """Bytes held by each shard: its dense slices plus its rows of every table."""
        out = [0] * self.shards
        for s in self.slices:
            out[s.shard] += s.nbytes
        for t in self.tables:
            for shard in range(self.shards):
                out[shard] += t.local_rows(shard, self.shards) * t.row_bytes
        return out

    def rows_by_shard(self, path: str, ids: np.ndarray) -> dict[int, np.ndarray]:
        """Row ids of table ``path`` grouped by the shard holding them (each group keeps the
        order the ids had). Raises PartitionError for an id out of range."""
        table = self.table(path)
        ids = np.asarray(ids)
        if ids.ndim != 1 or ids.dtype.kind not in "iu":
            raise PartitionError(f"row ids of table {path!r}: a 1-d integer array, got {ids.dtype}{ids.shape}")
        if ids.size and (ids.min() < 0 or ids.max() >= table.rows):
            raise PartitionError(f"row ids of table {path!r} must be in [0, {table.rows}), "
                                 f"got [{ids.min()}, {ids.max()}]")
        homes = ids % self.shards
        return {int(s): ids[homes == s] for s in np.unique(homes)}

    # -- values --------------------------------------------------------------------------------

    def split(self, values: Mapping[str, Any]) -> list[dict[str, np.ndarray]]:
        """Dense values by path -> per shard ``{slice key: array}``; row ranges are views."""
        out: list[dict[str, np.ndarray]] = [{} for _ in range(self.shards)]
        for s in self.slices:
            if s.path not in values:
                continue
            array = np.asarray(values[s.path])
            out[s.shard][s.key] = array if s.whole else array[s.start:s.stop]
        return out

    def join(self, parts: Mapping[str, np.ndarray], paths: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """Per-slice arrays (any shard's) -> dense values by path, for ``paths`` (default all).

        Raises PartitionError naming the first slice missing or of the wrong shape."""
        wanted = None if paths is None else set(paths)
        by_path: dict[str, list[Slice]] = {}
        for s in self.slices:
            if wanted is None or s.path in wanted:
                by_path.setdefault(s.path, []).append(s)
        out: dict[str, np.ndarray] = {}
        for leaf in self.leaves:
            pieces = by_path.get(leaf.path)
            if pieces is None:
                continue
            if len(pieces) == 1 and pieces[0].whole:
                out[leaf.path] = _checked(parts, pieces[0], leaf.shape)
                continue
            array = np.empty(leaf.shape, leaf.dtype)
            for s in pieces:
                array[s.start:s.stop] = _checked(parts, s, (s.stop - s.start, *leaf.shape[1:]))
            out[leaf.path] = array
        return out

    # -- the wire --------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {"shards": self.shards, "version": self.version,
                "leaves": [[l.path, list(l.shape), l.dtype] for l in self.leaves],
                "slices": [[s.path, s.start, s.stop, s.whole, s.shard, s.nbytes] for s in self.slices],
                "tables": [[t.path, t.rows, list(t.row_shape), t.dtype] for t in self.tables]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PartitionMap:
        try:
            return cls(int(d["shards"]),
                       tuple(LeafSpec(str(p), tuple(int(x) for x in shape), str(dt)) for p, shape, dt in d["leaves"]),
                       tuple(Slice(str(p), int(a), int(b), bool(w), int(sh), int(nb)) for p, a, b, w, sh, nb in d["slices"]),
                       tuple(Table(str(p), int(r), tuple(int(x) for x in shape), str(dt))
                             for p, r, shape, dt in d["tables"]),
                       int(d.get("version", 1)))
        except (KeyError, TypeError, ValueError) as e:
            raise PartitionError(f"malformed partition map ({type(e).__name__}: {e})") from None


def _checked(parts: Mapping[str, np.ndarray], s: Slice, shape: tuple[int, ...]) -> np.ndarray:
    got = parts.get(s.key)
    if got is None:
        raise PartitionError(f"slice {s.key!r} (shard {s.shard}) is missing")
    got = np.asarray(got)
    if got.shape != tuple(shape):
        raise PartitionError(f"slice {s.key!r} (shard {s.shard}) has shape {got.shape}, expected {tuple(shape)}")
    return got


# -- planning ----------------------------------------------------------------------------------


def specs_of(tree: Any) -> list[LeafSpec]:
    """The LeafSpec of every leaf of ``tree``, in pytree order."""
    leaves, _ = leaves_by_path(tree)
    out = []
    for path, leaf in leaves.items():
        shape = tuple(int(x) for x in np.shape(leaf))
        dtype = np.dtype(getattr(leaf, "dtype", None) or np.asarray(leaf).dtype)
        if dtype.kind not in "biufc":
            raise PartitionError(f"parameter {path!r} has dtype {dtype}; parameters are numeric arrays")
        out.append(LeafSpec(path, shape, dtype.str))
    return out


def plan(specs: Iterable[LeafSpec], shards: int, *, tables: Iterable[str] = (), split_factor: int = 4,
         version: int = 1) -> PartitionMap:
    """Partition leaves over ``shards`` shards (the module docstring says how and what it guarantees).

    ``tables`` names the leaves that are sparse tables (2-D or more: rows by id).

    Raises:
        PartitionError: shards < 1, split_factor < 1, a table name that is no leaf, or a table
            of fewer than 2 dimensions.
    """
    if not isinstance(shards, int) or shards < 1:
        raise PartitionError(f"shards: an integer >= 1, got {shards!r}")
    if not isinstance(split_factor, int) or split_factor < 1:
        raise PartitionError(f"split_factor: an integer >= 1, got {split_factor!r}")
    specs = list(specs)
    table_names = set(tables)
    paths = {s.path for s in specs}
    if len(paths) != len(specs):
        raise PartitionError("two parameters share one path")
    unknown = sorted(table_names - paths)
    if unknown:
        raise PartitionError(f"table {unknown[0]!r} is not a parameter (parameters: {', '.join(sorted(paths))})")
    table_list, dense = [], []
    for spec in specs:
        if spec.path in table_names:
            if len(spec.shape) < 2:
                raise PartitionError(f"table {spec.path!r} has shape {spec.shape}; a table is rows x features")
            table_list.append(Table(spec.path, spec.shape[0], spec.shape[1:], spec.dtype))
        else:
            dense.append(spec)

    total = sum(s.nbytes for s in dense)
    cap = max(1, math.ceil(total / (split_factor * shards)))
    pieces: list[tuple[int, str, int, int, bool, int]] = []  # (bytes, path, start, stop, whole, order)
    for order, spec in enumerate(dense):
        rows = spec.shape[0] if spec.shape else 1
        # As many rows per piece as fit the cap (one when a single row is over it): pieces of
        # at most max(cap, one row), row counts differing by at most one.
        n = math.ceil(rows / max(1, cap // max(1, spec.row_bytes))) if spec.shape and spec.nbytes > cap else 1
        if n <= 1:
            pieces.append((spec.nbytes, spec.path, 0, rows, True, order))
            continue
        for a, b in segments(rows, n):
            pieces.append(((b - a) * spec.row_bytes, spec.path, a, b, False, order))

    load = [0] * shards
    for t in table_list:
        for shard in range(shards):
            load[shard] += t.local_rows(shard, shards) * t.row_bytes
    placed: list[tuple[int, int, Slice]] = []
    # Largest first, ties by path then rows: the same inputs give the same map on every worker.
    for nbytes, path, a, b, whole, order in sorted(pieces, key=lambda p: (-p[0], p[1], p[2])):
        shard = min(range(shards), key=lambda i: (load[i], i))
        load[shard] += nbytes
        placed.append((order, a, Slice(path, a, b, whole, shard, nbytes)))
    placed.sort(key=lambda p: (p[0], p[1]))
    return PartitionMap(shards, tuple(dense), tuple(_merge([s for _, _, s in placed], dense)), tuple(table_list),
                        version)


def _merge(slices: list[Slice], leaves: list[LeafSpec]) -> list[Slice]:
    """Adjacent pieces of one leaf that landed on one shard become one slice (fewer keys and
    arrays per message; every shard's bytes stay the same, so the bound still holds)."""
    rows = {leaf.path: (leaf.shape[0] if leaf.shape else 1) for leaf in leaves}
    out: list[Slice] = []
    for s in slices:
        last = out[-1] if out else None
        if last is not None and last.path == s.path and last.shard == s.shard and last.stop == s.start:
            out[-1] = Slice(s.path, last.start, s.stop, last.start == 0 and s.stop == rows[s.path],
                            s.shard, last.nbytes + s.nbytes)
        else:
            out.append(s)
    return out


def partition(tree: Any, shards: int, *, tables: Iterable[str] = (), split_factor: int = 4,
              version: int = 1) -> PartitionMap:
    """``plan(specs_of(tree), ...)``: the map for a pytree of parameters."""
    return plan(specs_of(tree), shards, tables=tables, split_factor=split_factor, version=version)
