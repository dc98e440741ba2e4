"""The IDX file format (LeCun's MNIST format, also used by Fashion-MNIST).

An IDX file is a tiny header followed by a dense big-endian array::

    byte 0-1   0x00 0x00          magic: always zero
    byte 2     type code          0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
                                  0x0D float32, 0x0E float64
    byte 3     ndim               number of dimensions
    4*ndim     dims               each a big-endian uint32
    ...        data               prod(dims) items, big-endian, C order

:func:`decode_idx` / :func:`encode_idx` are the pure core (bytes in, array out);
:func:`read_idx` / :func:`write_idx` add files, optional gzip, and a ``limit`` that reads only
the first records, so small tests never decompress the whole 26 MB training set.
"""

from __future__ import annotations

import gzip
import io
import os
import struct
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np

from .errors import DataError, InvalidArgument

# type code -> big-endian numpy dtype. IDX stores every multi-byte type big-endian.
DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
CODES: dict[str, int] = {dt.newbyteorder("=").str[1:]: code for code, dt in DTYPES.items()}

# A guard against headers that claim absurd sizes (a corrupt dims field must fail clearly
# instead of asking numpy for exabytes).
MAX_ITEMS = 1 << 34


def encode_idx(array: np.ndarray) -> bytes:
    """Serialise ``array`` (any shape with ndim >= 1, one of the six IDX dtypes) to IDX bytes."""
    array = np.asarray(array)
    key = array.dtype.newbyteorder("=").str[1:]
    if key not in CODES:
        raise InvalidArgument(f"IDX cannot store dtype {array.dtype}; use one of {sorted(CODES)}")
    if array.ndim < 1 or array.ndim > 255:
        raise InvalidArgument(f"IDX needs 1..255 dimensions, got shape {array.shape}")
    code = CODES[key]
    header = struct.pack(">BBBB", 0, 0, code, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=DTYPES[code]).tobytes()


def _read_exact(stream: BinaryIO, n: int, name: object, what: str) -> bytes:
    data = stream.read(n)
    if len(data) != n:
        raise DataError(name, f"truncated: expected {n} bytes of {what}, got {len(data)}")
    return data


def _decode_stream(stream: BinaryIO, name: object, limit: int | None) -> np.ndarray:
    magic = _read_exact(stream, 4, name, "header")
    zero0, zero1, code, ndim = struct.unpack(">BBBB", magic)
    if zero0 or zero1 or code not in DTYPES or ndim == 0:
        raise DataError(
            name,
            f"not an IDX file (magic bytes {magic.hex()}; expected 0000, a type code in "
            f"{[hex(c) for c in DTYPES]} and ndim >= 1)",
        )
    dims = list(struct.unpack(f">{ndim}I", _read_exact(stream, 4 * ndim, name, "dimensions")))
    if limit is not None:
        if limit < 0:
            raise InvalidArgument(f"limit must be >= 0, got {limit}")
        dims[0] = min(dims[0], limit)
    count = int(np.prod(dims, dtype=np.int64))
    if count > MAX_ITEMS:
        raise DataError(name, f"header claims {count} items (shape {dims}); file is corrupt")
    dtype = DTYPES[code]
    payload = _read_exact(stream, count * dtype.itemsize, name, f"data for shape {tuple(dims)}")
    if limit is None and stream.read(1):
        raise DataError(name, f"trailing bytes after data for shape {tuple(dims)}")
    # Convert to native byte order once, so callers never see a big-endian dtype.
    return np.frombuffer(payload, dtype=dtype).astype(dtype.newbyteorder("="), copy=True).reshape(dims)


def decode_idx(data: bytes, *, name: object = "<bytes>", limit: int | None = None) -> np.ndarray:
    """Parse IDX bytes. ``limit`` keeps only the first ``limit`` records (rows of axis 0).

    Raises:
        DataError: bad magic, truncated data or trailing garbage; the message names ``name``.
    """
    return _decode_stream(io.BytesIO(data), name, limit)


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def read_idx(path: str | os.PathLike, *, limit: int | None = None) -> np.ndarray:
    """Read an IDX file, gzip-compressed or not (detected from its first bytes).

    With ``limit`` only the header and the first ``limit`` records are decompressed.

    Raises:
        DataError: missing file, bad gzip stream, bad magic, truncated data; names the file.
    """
    path = Path(path)
    try:
        opener = gzip.open if _is_gzip(path) else open
        with opener(path, "rb") as stream:
            return _decode_stream(stream, path, limit)
    except FileNotFoundError:
        raise DataError(path, "no such file") from None
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        raise DataError(path, f"unreadable gzip stream ({exc}); the file is corrupt or truncated") from exc


def write_idx(path: str | os.PathLike, array: np.ndarray, *, compress: bool | None = None) -> Path:
    """Write ``array`` as IDX; gzip it when ``compress`` is true (default: name ends in .gz)."""
    path = Path(path)
    data = encode_idx(array)
    if compress is None:
        compress = path.suffix == ".gz"
    # mtime=0 keeps the gzip bytes reproducible for identical arrays.
    path.write_bytes(gzip.compress(data, mtime=0) if compress else data)
    return path
