"""Step results to bytes and back, without pickle (pure).

A blob is ``MAGIC`` followed by one msgpack document. Plain data (None, bool, int, float, str,
bytes, lists, dicts with any msgpack-able keys) is msgpack itself; three ext types carry the rest:

* ``EXT_ARRAY``  numpy arrays (and JAX arrays, stored as their host numpy copy):
  msgpack ``[dtype.str, shape, raw C-order bytes]``;
* ``EXT_TUPLE``  tuples, so that pytrees such as ``(params, opt_state)`` come back as tuples;
* ``EXT_SCALAR`` numpy scalars (``np.float32(1.5)`` comes back as an ``np.float32``).

Loading never executes anything: the only constructors reachable from a blob are the ones
above, object dtypes are refused both ways. Arrays come back as read-only views of the blob's
bytes (no copy); ``.copy()`` one before writing to it.
"""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np

from .memo import as_array

MAGIC = b"DMLW1\n"  # format tag; bump the digit when the layout changes
EXT_ARRAY, EXT_TUPLE, EXT_SCALAR = 1, 2, 3


class SerialError(TypeError):
    """A value cannot be stored, or a blob is not one of ours. The message says which part."""


def _default(obj: Any) -> Any:
    if isinstance(obj, tuple):
        return msgpack.ExtType(EXT_TUPLE, dumps_body(list(obj)))
    if isinstance(obj, np.generic):
        if obj.dtype.hasobject:
            raise SerialError("object-dtype numpy scalars cannot be stored (they would need pickle)")
        return msgpack.ExtType(EXT_SCALAR, msgpack.packb([obj.dtype.str, obj.tobytes()]))
    arr = as_array(obj)
    if arr is None:
        raise SerialError(f"a {type(obj).__module__}.{type(obj).__qualname__} cannot be stored without pickle")
    if arr.dtype.hasobject:
        raise SerialError("object-dtype arrays cannot be stored (they would need pickle)")
    shape = list(arr.shape)  # before ascontiguousarray, which turns a 0-d array into 1-d
    flat = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
    return msgpack.ExtType(EXT_ARRAY, msgpack.packb([arr.dtype.str, shape, flat.data]))


def _ext_hook(code: int, data: bytes) -> Any:
    if code == EXT_TUPLE:
        return tuple(loads_body(data))
    if code == EXT_SCALAR:
        dtype_str, raw = msgpack.unpackb(data)
        dtype = _safe_dtype(dtype_str)
        return np.frombuffer(raw, dtype=dtype)[0]
    if code == EXT_ARRAY:
        dtype_str, shape, raw = msgpack.unpackb(data)
        dtype = _safe_dtype(dtype_str)
        shape = tuple(int(d) for d in shape)
        count = 1
        for d in shape:
            count *= d
        if count * dtype.itemsize != len(raw):
            raise SerialError(f"array of dtype {dtype.str} shape {shape} needs {count * dtype.itemsize} bytes, blob has {len(raw)}")
        return np.frombuffer(raw, dtype=dtype).reshape(shape) if count else np.empty(shape, dtype)
    raise SerialError(f"unknown ext type {code} in blob")


def _safe_dtype(dtype_str: Any) -> np.dtype:
    dtype = np.dtype(str(dtype_str))
    if dtype.hasobject:
        raise SerialError(f"object dtype {dtype_str!r} in blob refused")
    return dtype


def dumps_body(value: Any) -> bytes:
    # strict_types: a tuple must reach _default (else msgpack silently turns it into a list).
    return msgpack.packb(value, default=_default, use_bin_type=True, strict_types=True)


def loads_body(data: bytes) -> Any:
    return msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False)


def dumps(value: Any) -> bytes:
    """Value -> blob bytes.

    Raises:
        SerialError: something in ``value`` is not plain data, an array, or a tuple/list/dict of them.
    """
    try:
        return MAGIC + dumps_body(value)
    except SerialError:
        raise
    except (TypeError, ValueError, OverflowError) as e:
        raise SerialError(str(e)) from e


def loads(blob: bytes) -> Any:
    """Blob bytes -> value. Raises SerialError on anything that is not a well-formed blob."""
    if not blob.startswith(MAGIC):
        raise SerialError("not a dmlsys workflow blob (bad magic)")
    try:
        return loads_body(memoryview(blob)[len(MAGIC):])
    except SerialError:
        raise
    except Exception as e:  # msgpack raises a zoo of types on garbage; all mean "corrupt blob"
        raise SerialError(f"corrupt blob: {type(e).__name__}: {e}") from None
