"""A shard's durable state: a write-ahead log of accepted updates and atomic checkpoints.

**The write-ahead log** is one file of records, each ``[u32 length][u32 crc32][payload]`` with a
msgpack payload whose arrays are ``[dtype, shape, bytes]`` (no pickle: a log is data, never code).
``append`` writes a record and fsyncs before it returns; the shard acknowledges an update only
after that, so an acknowledged update survives a crash of the process or the machine. A crash in
the middle of an append leaves a torn last record: ``replay`` stops at the first record whose
length or checksum does not hold and cuts the file there (that update was never acknowledged).

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
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from dmlsys.ps.errors import PsError

_HEAD = struct.Struct("<II")
_ARRAY = 1  # msgpack ext code
MAX_RECORD = 1 << 31


class LogError(PsError):
    """A checkpoint or log file cannot be read; names the file."""


def _default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray) or hasattr(obj, "__array__") and hasattr(obj, "dtype"):
        array = np.ascontiguousarray(np.asarray(obj))
        if array.dtype.kind not in "biufc":
            raise TypeError(f"cannot log an array of dtype {array.dtype}")
        return msgpack.ExtType(_ARRAY, msgpack.packb([array.dtype.str, list(array.shape), array.tobytes()]))
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot log a {type(obj).__name__}")


def _ext(code: int, data: bytes) -> Any:
    if code != _ARRAY:
        raise LogError(f"unknown ext type {code} in a log record")
    dtype, shape, raw = msgpack.unpackb(data)
    dtype = np.dtype(dtype)
    if dtype.kind not in "biufc":
        raise LogError(f"array of dtype {dtype} in a log record")
    return np.frombuffer(raw, dtype).reshape(shape)


def pack(record: Any) -> bytes:
    return msgpack.packb(record, default=_default, use_bin_type=True)


def unpack(payload: bytes) -> Any:
    return msgpack.unpackb(payload, ext_hook=_ext, raw=False, strict_map_key=False)


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
        payload = pack(record)
        f = self._open()
        f.write(_HEAD.pack(len(payload), zlib.crc32(payload)) + payload)
        f.flush()
        if self.fsync:
            os.fsync(f.fileno())
        self.records += 1

    def replay(self) -> Iterator[Any]:
        """Every whole record in order; a torn or corrupt tail is cut off the file."""
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        pos = good = 0
        out = []
        while pos + _HEAD.size <= len(data):
            length, crc = _HEAD.unpack_from(data, pos)
            start, stop = pos + _HEAD.size, pos + _HEAD.size + length
            if length > MAX_RECORD or stop > len(data) or zlib.crc32(data[start:stop]) != crc:
                break
            try:
                out.append(unpack(data[start:stop]))
            except (ValueError, LogError, msgpack.UnpackException):
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
