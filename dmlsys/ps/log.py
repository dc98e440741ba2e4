"""A shard's durable state: a write-ahead log of accepted updates and atomic checkpoints.

**The write-ahead log** is one file of records, each
``[u32 meta length][u64 data length][u64 xxh3-64 of meta and data][meta][data]``: ``meta`` is
msgpack (no pickle: a log is data, never code) in which each array is a reference
``[dtype, shape, offset]`` into ``data``, the arrays' raw bytes one after another. The arrays
are written from their own buffers (no copy into a payload) and the checksum is xxh3 (a push
carries megabytes; crc32 over them cost more than the rest of the shard's work). ``append``
writes a record and fsyncs before it returns; the shard acknowledges an update only after that,
so an acknowledged update survives a crash of the process or the machine. A crash in the middle
of an append leaves a torn last record: ``replay`` stops at the first record whose lengths or
checksum do not hold and cuts the file there (that update was never acknowledged).

**Checkpoints** are one ``.npz`` (``allow_pickle=False``) of named arrays plus a JSON ``meta``
entry, written to a temporary file in the same directory, fsynced, renamed over the old one, and
the directory fsynced so that the rename itself survives a power cut. A reader sees the old
checkpoint or the new one, never a mix.

The log is truncated after each checkpoint. A crash between the rename and the truncation
leaves records the checkpoint already holds; every record carries a sequence number and the
checkpoint the last one it includes, so replay skips them (see ``dmlsys.ps.server``).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import xxhash

from dmlsys.ps.errors import PsError

_HEAD = struct.Struct("<IQQ")
_REF = 2  # msgpack ext code: an array in the record's data (dtype, shape, offset)
MAX_RECORD = 1 << 31


class LogError(PsError):
    """A checkpoint or log file cannot be read; names the file."""


def _array(obj: Any) -> np.ndarray | None:
    if isinstance(obj, np.ndarray) or hasattr(obj, "__array__") and hasattr(obj, "dtype"):
        array = np.ascontiguousarray(np.asarray(obj))
        if array.dtype.kind not in "biufc":
            raise TypeError(f"cannot log an array of dtype {array.dtype}")
        return array
    return None


def _checked_dtype(dtype: Any) -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype.kind not in "biufc":
        raise LogError(f"array of dtype {dtype} in a log record")
    return dtype


def pack_parts(record: Any) -> tuple[bytes, list[memoryview]]:
    """``(meta, buffers)``: msgpack with each array replaced by a reference to its place in the
    concatenated buffers, and the arrays' own bytes (not copied)."""
    buffers: list[memoryview] = []
    offset = 0

    def default(obj: Any) -> Any:
        nonlocal offset
        array = _array(obj)
        if array is None:
            if isinstance(obj, np.generic):
                return obj.item()
            raise TypeError(f"cannot log a {type(obj).__name__}")
        view = memoryview(array).cast("B") if array.nbytes else memoryview(b"")
        buffers.append(view)
        ref = msgpack.ExtType(_REF, msgpack.packb([array.dtype.str, list(array.shape), offset]))
        offset += array.nbytes
        return ref

    return msgpack.packb(record, default=default, use_bin_type=True), buffers


def unpack_parts(meta: bytes | memoryview, data: memoryview) -> Any:
    """The record ``pack_parts`` made; its arrays are read-only views of ``data``."""

    def ext(code: int, raw: bytes) -> Any:
        if code != _REF:
            raise LogError(f"unknown ext type {code} in a log record")
        dtype, shape, offset = msgpack.unpackb(raw)
        dtype = _checked_dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if offset < 0 or count < 0 or offset + count * dtype.itemsize > len(data):
            raise LogError(f"an array of a log record ({dtype}{tuple(shape)} at {offset}) lies outside its data")
        return np.frombuffer(data, dtype, count, offset).reshape(shape)

    return msgpack.unpackb(meta, ext_hook=ext, raw=False, strict_map_key=False)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class WriteAheadLog:
    """Append-only records with a checksum each; ``append`` returns once they are on disk."""

    def __init__(self, path: str | os.PathLike, *, fsync: bool = True) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self.records = 0  # appended since the last truncation
        self._file = None

    def _open(self):
        if self._file is None:
            self._file = open(self.path, "ab")  # noqa: SIM115 (open for the log's life, closed by close())
        return self._file

    def append(self, record: Any) -> None:
        meta, buffers = pack_parts(record)
        digest = xxhash.xxh3_64(meta)
        size = 0
        for b in buffers:
            digest.update(b)
            size += b.nbytes
        f = self._open()
        f.write(_HEAD.pack(len(meta), size, digest.intdigest()))
        f.write(meta)
        for b in buffers:
            f.write(b)  # a large buffer goes straight to the file, not through the writer's buffer
        f.flush()
        if self.fsync:
            os.fsync(f.fileno())
        self.records += 1

    def replay(self) -> Iterator[Any]:
        """Every whole record in order; a torn or corrupt tail is cut off the file."""
        if not self.path.exists():
            return
        data = memoryview(self.path.read_bytes())
        pos = good = 0
        out = []
        while pos + _HEAD.size <= len(data):
            meta_len, data_len, digest = _HEAD.unpack_from(data, pos)
            start = pos + _HEAD.size
            middle, stop = start + meta_len, start + meta_len + data_len
            if meta_len + data_len > MAX_RECORD or stop > len(data) or \
                    xxhash.xxh3_64_intdigest(data[start:stop]) != digest:
                break
            try:
                out.append(unpack_parts(data[start:middle], data[middle:stop]))
            except (ValueError, TypeError, LogError, msgpack.UnpackException):
                break
            pos = good = stop
        if good < len(data):
            with open(self.path, "r+b") as f:
                f.truncate(good)
                os.fsync(f.fileno())
        yield from out

    def truncate(self) -> None:
        self.close()
        with open(self.path, "wb") as f:
            os.fsync(f.fileno())
        self.records = 0

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def write_checkpoint(path: str | os.PathLike, arrays: dict[str, np.ndarray], meta: dict[str, Any],
                     *, fsync: bool = True) -> None:
    """Atomically replace ``path`` with ``arrays`` and ``meta`` (tmp, fsync, rename, fsync dir)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    payload = dict(arrays)
    payload["__meta__"] = np.frombuffer(json.dumps(meta, sort_keys=True).encode(), np.uint8)
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **payload)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if fsync:
            fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        meta = json.loads(arrays.pop("__meta__").tobytes())
    except (OSError, ValueError, KeyError, EOFError) as e:
        raise LogError(f"{path}: unreadable shard checkpoint ({type(e).__name__}: {e})") from None
    return arrays, meta
