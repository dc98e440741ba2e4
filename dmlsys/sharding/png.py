"""8-bit greyscale PNG, both ways, with numpy and zlib only: how a canvas travels over HTTP.

Runtime dependencies are fixed (no Pillow), and a canvas is one channel of bytes, so this module
reads and writes exactly that: colour type 0, bit depth 8, no interlacing (RFC 2083 / the W3C
PNG spec, sections 4 and 9). Anything else is refused with ``BadRequest`` saying what was found.

Reading is bounded before it is done: the header's width and height are checked against
``max_pixels`` before a byte is inflated, and inflation stops at the size those dimensions
allow (a "zip bomb" of a few kilobytes cannot make us allocate gigabytes).

Filters (section 9): None, Sub and Up rows are undone with numpy a row at a time. Average and
Paeth depend on the pixel to their left, so they need a loop per pixel, but Paeth (what Pillow and
libpng pick for most rows of a garment) reduces to Sub wherever the row above is black, which on a
canvas is most of it: those stretches are a running sum in numpy and only the rest loops in Python
(``_paeth``). ``encode`` writes filter None, which for a canvas of garments on black compresses
about as well as the adaptive choice and decodes fastest.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

from dmlsys.sharding.errors import BadRequest

SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_PIXELS = 64 << 20  # 8,192 x 8,192


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode(pixels: np.ndarray, level: int = 6) -> bytes:
    """A PNG of a 2-D uint8 array (greyscale, filter None)."""
    pixels = np.asarray(pixels)
    if pixels.ndim != 2 or pixels.dtype != np.uint8 or 0 in pixels.shape:
        raise ValueError(f"a PNG canvas is a non-empty 2-D uint8 array, got {pixels.dtype} {pixels.shape}")
    h, w = pixels.shape
    raw = np.zeros((h, w + 1), np.uint8)  # a filter-type byte (0: None) before each row
    raw[:, 1:] = pixels
    header = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw.tobytes(), level)) + \
        _chunk(b"IEND", b"")


def decode(data: bytes, *, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """The 2-D uint8 array of an 8-bit greyscale PNG. Raises ``BadRequest`` naming what is wrong."""
    data = memoryview(data)
    if bytes(data[:8]) != SIGNATURE:
        raise BadRequest("not a PNG (the body does not start with the PNG signature)")
    pos, header, idat = 8, None, []
    while True:
        if pos + 8 > len(data):
            raise BadRequest("truncated PNG: no IEND chunk")
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if len(body) != length or pos + 12 + length > len(data):
            raise BadRequest(f"truncated PNG: chunk {kind!r} says {length} bytes")
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
            w, h, depth, colour, _, _, interlace = header
            if (depth, colour, interlace) != (8, 0, 0):
                raise BadRequest(f"the canvas PNG must be 8-bit greyscale, not interlaced (bit depth 8, colour type "
                                 f"0, interlace 0); got bit depth {depth}, colour type {colour}, interlace {interlace}",
                                 status=415)
            if not 0 < w * h <= max_pixels:
                raise BadRequest(f"a {w}x{h} PNG is over the {max_pixels}-pixel cap", status=413)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
        pos += 12 + length
    if header is None:
        raise BadRequest("PNG without an IHDR chunk")
    w, h = header[0], header[1]
    want = h * (w + 1)
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(b"".join(idat), want)
    except zlib.error as e:
        raise BadRequest(f"PNG image data does not inflate: {e}") from None
    if len(raw) != want or inflater.unconsumed_tail:
        raise BadRequest(f"PNG image data holds {len(raw)}{'+' if inflater.unconsumed_tail else ''} bytes; a {w}x{h} "
                         f"image needs {want}")
    return unfilter(np.frombuffer(raw, np.uint8).reshape(h, w + 1))


def unfilter(rows: np.ndarray) -> np.ndarray:
    """Undo the per-row filters of (filter byte, pixels) rows, one byte per pixel."""
    h, w1 = rows.shape
    out = np.zeros((h, w1 - 1), np.uint8)
    prior = np.zeros(w1 - 1, np.uint8)
    for y in range(h):
        kind, cur = rows[y, 0], rows[y, 1:]
        if kind == 0:
            out[y] = cur
        elif kind == 1:  # Sub: x[i] = raw[i] + x[i-1]; a running sum, modulo 256
            out[y] = np.cumsum(cur, dtype=np.uint8)
        elif kind == 2:  # Up
            out[y] = cur + prior
        elif kind == 3:
            out[y] = _sequential(3, cur.tolist(), prior.tolist())
        elif kind == 4:
            out[y] = _paeth(cur, prior)
        else:
            raise BadRequest(f"PNG row {y} has filter type {kind}; only 0-4 exist")
        prior = out[y]
    return out


def _paeth(cur: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """One Paeth row. Where the pixel above and the one above-left are both 0 the predictor is the
    left pixel (p = a, so |p - a| = 0 wins), i.e. Sub: such runs are a running sum from the value
    on their left; the other pixels go through the per-pixel loop."""
    n = len(cur)
    flat = prior == 0
    flat[1:] &= prior[:-1] == 0  # c, the pixel above-left, is 0 too (0 before the first pixel)
    out = np.empty(n, np.uint8)
    edges = np.flatnonzero(np.diff(flat.view(np.int8))) + 1
    starts = np.concatenate(([0], edges))
    stops = np.concatenate((edges, [n]))
    left = 0
    for start, stop in zip(starts.tolist(), stops.tolist()):
        if flat[start]:
            run = np.cumsum(cur[start:stop], dtype=np.uint8) + np.uint8(left)
        else:
            up_left = int(prior[start - 1]) if start else 0
            run = _sequential(4, cur[start:stop].tolist(), prior[start:stop].tolist(), left, up_left)
        out[start:stop] = run
        left = int(out[stop - 1])
    return out


def _sequential(kind: int, cur: list[int], prior: list[int], left: int = 0, up_left: int = 0) -> list[int]:
    out = []
    for x, b in zip(cur, prior):
        if kind == 3:  # Average
            value = (x + ((left + b) >> 1)) & 0xFF
        else:  # Paeth
            p = left + b - up_left
            pa, pb, pc = abs(p - left), abs(p - b), abs(p - up_left)
            value = (x + (left if pa <= pb and pa <= pc else b if pb <= pc else up_left)) & 0xFF
        out.append(value)
        left, up_left = value, b
    return out
