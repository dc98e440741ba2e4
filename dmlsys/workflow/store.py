"""The memo store: an SQLite index plus a directory of blobs, embedded, no server.

Layout under ``root`` (default ``.dmlsys/cache``)::

    index.sqlite                 one row per entry: key, step, created, last_hit, hits, size,
                                 fingerprint (of the value), checksum (of the blob bytes)
    blobs/<key[:2]>/<key>        the value, serialised by ``serial`` (msgpack + raw arrays)

**Atomicity.** ``put`` writes the blob to a temporary file in the same directory, fsyncs it,
renames it over the final name (atomic on POSIX), and only then inserts the index row. A crash
before the rename leaves a stray temp file; a crash between rename and insert leaves a blob
with no row, or (when refreshing a stale entry) a row whose checksum no longer matches the
blob. Neither is ever served: ``get`` only returns a value whose row exists *and* whose blob
checksum matches the row. ``gc`` sweeps the debris.

**Time.** ``clock`` (seconds, like ``time.time``) is injected, so freshness and GC are tested
by moving a fake clock instead of sleeping.

**GC.** Every hit records ``last_hit``. ``gc(max_age=, max_bytes=)`` removes entries unused
(neither written nor hit) for longer than ``max_age``, then the least recently used ones until
the total size fits ``max_bytes``; see ``select_for_gc`` for the exact rule.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import xxhash

from . import serial
from .errors import CacheError
from .memo import fingerprint

DEFAULT_ROOT = Path(".dmlsys/cache")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    key TEXT PRIMARY KEY,
    step TEXT NOT NULL,
    created REAL NOT NULL,
    last_hit REAL,
    hits INTEGER NOT NULL DEFAULT 0,
    size INTEGER NOT NULL,
    fingerprint TEXT NOT NULL,
    checksum TEXT NOT NULL
)
"""
_COLS = "key, step, created, last_hit, hits, size, fingerprint, checksum"


@dataclasses.dataclass(frozen=True, slots=True)
class Entry:
    """One stored result, as the index describes it."""

    key: str
    step: str
    created: float
    last_hit: float | None
    hits: int
    size: int  # blob bytes
    fingerprint: str  # of the value (what a downstream INPUTS policy folds into its key)
    checksum: str  # xxh3_64 of the blob bytes

    @property
    def last_used(self) -> float:
        return self.created if self.last_hit is None else max(self.created, self.last_hit)


@dataclasses.dataclass(frozen=True, slots=True)
class Hit:
    value: Any
    entry: Entry


def select_for_gc(entries: Iterable[Entry], now: float, max_age: float | None = None,
                  max_bytes: int | None = None) -> list[Entry]:
    """Which entries a GC removes (pure).

    1. every entry with ``now - last_used > max_age``;
    2. then, oldest ``last_used`` first (ties by key, for determinism), until the survivors'
       total size is ``<= max_bytes``.
    An entry used at least as recently as every removed one is never removed before it.
    """
    if max_age is not None and max_age < 0:
        raise ValueError(f"max_age must be >= 0, got {max_age}")
    if max_bytes is not None and max_bytes < 0:
        raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
    ordered = sorted(entries, key=lambda e: (e.last_used, e.key))
    removed = [e for e in ordered if max_age is not None and now - e.last_used > max_age]
    survivors = [e for e in ordered if not (max_age is not None and now - e.last_used > max_age)]
    if max_bytes is not None:
        total = sum(e.size for e in survivors)
        for e in survivors:
            if total <= max_bytes:
                break
            removed.append(e)
            total -= e.size
    return removed


class MemoStore:
    """Step results keyed by cache key. Safe to share between threads of one process; several
    processes may share a root (SQLite locking; a lost race on ``put`` is a harmless overwrite).

    Usage::

        with MemoStore(".dmlsys/cache") as store:
            store.put(key, "train", {"w": w})
            hit = store.get(key, max_age=3600)   # Hit(value, entry) or None
    """

    def __init__(self, root: str | os.PathLike[str] = DEFAULT_ROOT, *, clock: Callable[[], float] = time.time) -> None:
        self.root = Path(root)
        self.clock = clock
        self._lock = threading.Lock()
        try:
            (self.root / "blobs").mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.root / "index.sqlite", timeout=30, check_same_thread=False,
                                       isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(_SCHEMA)
        except (OSError, sqlite3.Error) as e:
            raise CacheError(f"cannot open the memo store at {self.root}: {e}; check the path and its permissions") from e

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> "MemoStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ paths
    def blob_path(self, key: str) -> Path:
        return self.root / "blobs" / key[:2] / key

    # ------------------------------------------------------------------ read
    def get(self, key: str, *, max_age: float | None = None) -> Hit | None:
        """The stored value for ``key`` if present, intact, and younger than ``max_age``; else None.

        A hit updates the entry's ``last_hit`` and ``hits``. A row whose blob is missing or does
        not match its checksum (a crash mid-write, a disk error) is dropped and counts as a miss."""
        entry = self.entry(key)
        if entry is None:
            return None
        now = self.clock()
        if max_age is not None and now - entry.created > max_age:
            return None  # stale: the caller recomputes and put() overwrites
        try:
            blob = self.blob_path(key).read_bytes()
        except FileNotFoundError:
            blob = None
        if blob is None or xxhash.xxh3_64_hexdigest(blob) != entry.checksum:
            self._delete_rows([key])
            return None
        try:
            value = serial.loads(blob)
        except serial.SerialError:
            self._delete_rows([key])
            return None
        with self._lock:
            self._db.execute("UPDATE entries SET last_hit = ?, hits = hits + 1 WHERE key = ?", (now, key))
        return Hit(value, dataclasses.replace(entry, last_hit=now, hits=entry.hits + 1))

    def entry(self, key: str) -> Entry | None:
        with self._lock:
            row = self._db.execute(f"SELECT {_COLS} FROM entries WHERE key = ?", (key,)).fetchone()
        return Entry(*row) if row else None

    def find(self, prefix: str) -> list[Entry]:
        """Entries whose key starts with ``prefix`` (the CLI accepts abbreviated keys)."""
        with self._lock:
            rows = self._db.execute(f"SELECT {_COLS} FROM entries WHERE key >= ? AND key < ? ORDER BY key",
                                    (prefix, prefix + "\U0010ffff")).fetchall()
        return [Entry(*r) for r in rows]

    def entries(self) -> list[Entry]:
        with self._lock:
            rows = self._db.execute(f"SELECT {_COLS} FROM entries ORDER BY created, key").fetchall()
        return [Entry(*r) for r in rows]

    # ------------------------------------------------------------------ write
    def put(self, key: str, step: str, value: Any, *, value_fingerprint: str | None = None) -> Entry:
        """Store ``value`` under ``key`` atomically (see the module docstring) and return its entry.

        Raises:
            serial.SerialError: the value cannot be stored without pickle.
            CacheError: the blob could not be written.
        """
        blob = serial.dumps(value)
        fp = value_fingerprint if value_fingerprint is not None else fingerprint(value)
        entry = Entry(key, step, self.clock(), None, 0, len(blob), fp, xxhash.xxh3_64_hexdigest(blob))
        self._write_blob(key, blob)
        self._insert_row(entry)
        return entry

    def _write_blob(self, key: str, blob: bytes) -> None:
        path = self.blob_path(key)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(blob)
                f.flush()
                os.fsync(f.fileno())  # the bytes are on disk before the name points at them
            os.replace(tmp, path)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise CacheError(f"cannot write blob {path}: {e}; check free space and permissions") from e

    def _insert_row(self, entry: Entry) -> None:
        with self._lock:
            self._db.execute(f"INSERT OR REPLACE INTO entries ({_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                             dataclasses.astuple(entry))

    # ------------------------------------------------------------------ removal
    def delete(self, keys: Sequence[str]) -> None:
        """Remove entries: index rows first (so nothing can hit them), then their blobs."""
        self._delete_rows(keys)
        for key in keys:
            with contextlib.suppress(FileNotFoundError):
                self.blob_path(key).unlink()

    def _delete_rows(self, keys: Sequence[str]) -> None:
        with self._lock:
            self._db.executemany("DELETE FROM entries WHERE key = ?", [(k,) for k in keys])

    def gc(self, *, max_age: float | None = None, max_bytes: int | None = None) -> list[Entry]:
        """Remove what ``select_for_gc`` selects, plus blobs and temp files no row refers to.
        Returns the removed entries."""
        doomed = select_for_gc(self.entries(), self.clock(), max_age, max_bytes)
        self.delete([e.key for e in doomed])
        self._sweep_orphans()
        return doomed

    def clear(self) -> int:
        """Remove every entry; returns how many there were."""
        keys = [e.key for e in self.entries()]
        self.delete(keys)
        self._sweep_orphans()
        return len(keys)

    def _sweep_orphans(self) -> None:
        with self._lock:
            live = {r[0] for r in self._db.execute("SELECT key FROM entries")}
        for path in (self.root / "blobs").glob("*/*"):
            if path.name.startswith("."):
                # Another process may be mid-put on this temp file: leave young ones alone.
                with contextlib.suppress(FileNotFoundError):
                    if time.time() - path.stat().st_mtime > 3600:
                        path.unlink()
            elif path.name not in live:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

    def total_bytes(self) -> int:
        with self._lock:
            (n,) = self._db.execute("SELECT COALESCE(SUM(size), 0) FROM entries").fetchone()
        return int(n)
