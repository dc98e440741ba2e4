"""Cache keys and fingerprints: stable hashes over a canonical encoding (pure, no I/O).

A step's cache key is ``xxh3_128`` over a *canonical encoding* of its name and the parts its
cache policy contributes (code version, params, input fingerprints, probe results). Canonical
means: the same value gives the same bytes in every process, on every run, on every machine
with the same byte order. That rules out ``pickle`` and ``repr`` (dict order, memory addresses,
float formatting and pickle protocol all leak into them), so the encoding is spelled out here,
type by type, and anything else is refused with ``CacheKeyError`` rather than hashed by accident.

Encoding (each value is a one-byte tag, then its payload)::

    None  N          bool  T / F         int   i<decimal>;        float  f<8 bytes LE> (NaN: one form)
    str   s<len>:<utf-8>                 bytes b<len>:<bytes>
    list  l<len>;<items>                 tuple t<len>;<items>
    dict  d<len>;<key,value ...>  sorted by the encoded key bytes, so insertion order is irrelevant
    set   S<len>;<items sorted by encoding>
    array a:<dtype.str>:<shape tuple>;<raw C-order bytes>   (numpy, JAX and anything with __array__;
                                   ``dmlsys.arrays.hash_array``, the datasets' and params' encoding)
    numpy scalar g<dtype.str>;<raw bytes>
    dataclass D<module.qualname>;<fields as a dict>   enum E<module.qualname>;<value>

Arrays are fed to the hasher as buffers (no copy for C-contiguous arrays), so fingerprinting
a 50 MB dataset costs one pass of xxh3 (several GB/s), not a serialisation.
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import math
import os
import struct
import textwrap
from typing import Any, Callable, Mapping

import numpy as np
import xxhash

from dmlsys.arrays import hash_array

KEY_SCHEMA = "dmlsys.workflow.key/2"  # bump when the encoding changes: old entries then miss


class NotCanonical(TypeError):
    """A value has no canonical encoding. Callers turn it into a CacheKeyError naming the step."""


def _update(h: Any, value: Any) -> None:
    """Feed the canonical encoding of ``value`` to the hasher ``h`` (anything with .update)."""
    # Order matters: bool before int (bool is an int), enums before their base types.
    if value is None:
        h.update(b"N")
    elif value is True:
        h.update(b"T")
    elif value is False:
        h.update(b"F")
    elif isinstance(value, enum.Enum):
        cls = type(value)
        h.update(f"E{cls.__module__}.{cls.__qualname__};".encode())
        _update(h, value.value)
    elif isinstance(value, int):
        h.update(b"i%d;" % value)
    elif isinstance(value, float):
        # One NaN, whatever its payload bits; -0.0 stays distinct from 0.0 (they differ under 1/x).
        h.update(b"fnan" if math.isnan(value) else b"f" + struct.pack("<d", value))
    elif isinstance(value, str):
        data = value.encode("utf-8", "surrogatepass")
        h.update(b"s%d:" % len(data))
        h.update(data)
    elif isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        h.update(b"b%d:" % len(data))
        h.update(data)
    elif isinstance(value, (list, tuple)):
        h.update(b"%c%d;" % (ord("l") if isinstance(value, list) else ord("t"), len(value)))
        for item in value:
            _update(h, item)
    elif isinstance(value, dict):
        items = sorted(((encode(k), v) for k, v in value.items()), key=_first)
        h.update(b"d%d;" % len(items))
        for kbytes, v in items:
            h.update(kbytes)
            _update(h, v)
    elif isinstance(value, (set, frozenset)):
        encoded = sorted(encode(v) for v in value)
        h.update(b"S%d;" % len(encoded))
        for e in encoded:
            h.update(e)
    elif isinstance(value, np.generic):
        if value.dtype.hasobject:
            raise NotCanonical("object-dtype numpy scalar")
        h.update(b"g" + value.dtype.str.encode() + b";")
        h.update(value.tobytes())
    elif isinstance(value, os.PathLike):
        _update(h, ("path", os.fspath(value)))
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        cls = type(value)
        h.update(f"D{cls.__module__}.{cls.__qualname__};".encode())
        _update(h, {f.name: getattr(value, f.name) for f in dataclasses.fields(value)})
    else:
        arr = as_array(value)
        if arr is None:
            raise NotCanonical(f"a {type(value).__module__}.{type(value).__qualname__} has no canonical encoding")
        if arr.dtype.hasobject:
            raise NotCanonical("object-dtype array (its elements are arbitrary Python objects)")
        h.update(b"a")
        hash_array(h, arr)  # the one array encoding, shared with dataset and params fingerprints


def _first(pair: tuple) -> Any:
    return pair[0]


def as_array(value: Any) -> np.ndarray | None:
    """numpy arrays as they are; JAX (and other array-likes with dtype/shape) as host numpy."""
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "__array__") and hasattr(value, "dtype") and hasattr(value, "shape"):
        return np.asarray(value)
    return None


class _Collect:
    """A 'hasher' that keeps the bytes: used to sort dict keys by their encoding."""

    __slots__ = ("parts",)

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def update(self, data: Any) -> None:
        self.parts.append(bytes(data))


def encode(value: Any) -> bytes:
    """The canonical encoding of ``value`` as bytes (for small values; hashing streams instead)."""
    c = _Collect()
    _update(c, value)
    return b"".join(c.parts)


def fingerprint(value: Any) -> str:
    """Hex xxh3_128 of the canonical encoding: equal values, equal fingerprints, in any process.

    Raises:
        NotCanonical: the value (or something inside it) has no canonical encoding.
    """
    h = xxhash.xxh3_128()
    _update(h, value)
    return h.hexdigest()


def cache_key(step: str, parts: Mapping[str, Any]) -> str:
    """The cache key of one execution of ``step``: a hash of its name and its policy's parts."""
    return fingerprint((KEY_SCHEMA, step, dict(parts)))


_SOURCE_CACHE: dict[Any, str] = {}


def code_version(fn: Callable[..., Any], version: str | None = None) -> str:
    """``version`` when given (you decide when results go stale), else a hash of ``fn``'s source.

    The source hash follows edits to the function's own text, not to the functions it calls: give
    an explicit version when a helper's change must invalidate the step's cached results.

    Raises:
        NotCanonical: no explicit version and the source is unavailable (a builtin, a REPL lambda).
    """
    if version is not None:
        return "v:" + version
    target = inspect.unwrap(fn)
    cached = _SOURCE_CACHE.get(target)
    if cached is None:
        try:
            src = textwrap.dedent(inspect.getsource(target))
        except (OSError, TypeError) as e:
            raise NotCanonical(f"the source of {fn!r} is unavailable ({e}); pass version='...'") from None
        cached = _SOURCE_CACHE[target] = "src:" + xxhash.xxh3_128_hexdigest(src.encode())
    return cached
