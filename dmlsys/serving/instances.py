"""Request bodies to input arrays: ``{"instances": [...]}`` -> float32 ``(n, 784)``, and back.

Parsing is the most expensive part of a prediction on this model: ``json.loads`` spends about
180 ns per number (a Python float object each), 140 µs for one 784-pixel image, ten times the
cost of the model itself. So the common case takes a vectorised path instead: a body of flat
instances of plain decimals (``{"instances": [[0.1,0.25,...], ...]}``, any whitespace) is parsed
with a handful of numpy passes over its bytes, the numbers' grammar checked on the way, for a
whole batch of bodies at once. Everything else (nested 28x28 lists, exponents, oddities) goes
through ``json.loads`` and full validation, so both paths accept exactly valid JSON and give
the same arrays (to float32 rounding).

Errors are ``BadInput`` naming what was wrong and what is expected.
"""

from __future__ import annotations

import json
import re
from typing import Any, Sequence

import numpy as np

from dmlsys.serving.errors import BadInput

PIXELS = 784
SIDE = 28
_ENVELOPE = re.compile(rb'\A\s*\{\s*"instances"\s*:\s*\[\s*\[(.*)\]\s*\]\s*\}\s*\Z', re.S)
_WHITESPACE = b" \t\r\n"
_NUMBER_CHARS = b"0123456789.,-"
_POW10 = 10.0 ** np.arange(-60, 61, dtype=np.float64)  # index e + 60


def expected() -> str:
    return (f'a JSON object {{"instances": [...]}} where each instance is a list of {PIXELS} numbers '
            f"or {SIDE} lists of {SIDE} numbers (pixel values, scaled to [0, 1])")


def parse_many(bodies: Sequence[bytes], max_instances: int) -> list[np.ndarray | BadInput]:
    """Parse several request bodies; each entry is its float32 ``(n, 784)`` array or its error.

    A body the fast path cannot vouch for falls back to ``json.loads`` on its own, so one odd
    body never fails the others.
    """
    out: list[np.ndarray | BadInput | None] = [None] * len(bodies)
    for i, body in enumerate(bodies):
        segs = _fast_segments(body)
        if segs is None:
            out[i] = _parse_slow(body, max_instances)
        elif len(segs) > max_instances:
            out[i] = _too_many(len(segs), max_instances)
        else:
            # One body at a time: its few KiB of temporaries stay in cache, which measured faster
            # than one pass over a whole batch's bytes.
            values = _parse_numbers(segs)
            out[i] = _parse_slow(body, max_instances) if values is None else values
    return out  # type: ignore[return-value]


def parse(body: bytes, max_instances: int) -> np.ndarray:
    """One body -> float32 ``(n, 784)``. Raises BadInput."""
    result = parse_many([body], max_instances)[0]
    if isinstance(result, BadInput):
        raise result
    return result


def _too_many(n: int, limit: int) -> BadInput:
    return BadInput(f"{n} instances in one request; the limit is {limit}: split the request")


def _fast_segments(body: bytes) -> list[bytes] | None:
    """The instances' number lists if the body is flat plain decimals, else None (use json)."""
    m = _ENVELOPE.match(body)
    if m is None:
        return None
    inner = m.group(1).translate(None, _WHITESPACE)
    segs = inner.split(b"],[")
    for s in segs:
        # Only digits, '.', ',', '-' inside: no brackets (nested 28x28), no exponents, no strings.
        if s.translate(None, _NUMBER_CHARS) or s.count(b",") != PIXELS - 1:
            return None
    return segs


def _parse_numbers(segments: list[bytes]) -> np.ndarray | None:
    """``n`` segments of exactly 784 comma-separated tokens -> float32 ``(n, 784)``, or None if a
    token is not a JSON number of the form ``-?(0|[1-9][0-9]*)(\\.[0-9]+)?``."""
    a = np.frombuffer(b",".join(segments) + b",", np.uint8)
    n = a.size
    comma = np.flatnonzero(a == 44)  # token ends
    starts = np.empty_like(comma)
    starts[0] = 0
    starts[1:] = comma[:-1] + 1
    if np.any(comma == starts):
        return None  # an empty token: ",," 
    digit = (a - 48) < 10  # uint8 wrap-around makes this one comparison
    minus = a == 45
    neg = minus[starts]
    if np.count_nonzero(minus) != np.count_nonzero(neg):
        return None  # a '-' that does not start its token
    first = starts + neg  # first character after the sign
    if not digit[first].all():
        return None  # "-" alone, "-.5", ".5"
    nxt = np.minimum(first + 1, n - 1)
    if np.any((a[first] == 48) & digit[nxt]):
        return None  # leading zero: "01"
    dots = np.flatnonzero(a == 46)
    anchor = comma.copy()  # where the units digit ends: the '.' or the token's end
    if dots.size:
        tok = np.searchsorted(comma, dots)
        if np.any(tok[1:] == tok[:-1]) or not (digit[dots - 1].all() and digit[dots + 1].all()):
            return None  # two dots in a token, or "1." / "-."
        anchor[tok] = dots
    # Place value of each digit: units digit just left of the anchor is 10^0, right of it 10^-1...
    lengths = np.diff(comma, prepend=-1).astype(np.int32)
    tok_anchor = np.repeat(anchor.astype(np.int32), lengths)
    pos = np.arange(n, dtype=np.int32)
    exp = tok_anchor - pos
    exp -= pos < tok_anchor
    if exp.max() > 38 or exp.min() < -45:
        return None  # beyond float32: let json decide (and fail) on it
    d = a - 48
    d *= digit  # 0 for ',' '.' '-'
    exp += 60
    contrib = d * _POW10[exp]
    values = np.add.reduceat(contrib, starts)
    values[neg] *= -1.0
    return values.astype(np.float32).reshape(len(segments), PIXELS)


def _parse_slow(body: bytes, max_instances: int) -> np.ndarray | BadInput:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        return BadInput(f"body is not valid JSON ({e}); expected {expected()}")
    return instances_array(doc, max_instances)


def instances_array(doc: Any, max_instances: int) -> np.ndarray | BadInput:
    """Validate a decoded request document and stack its instances."""
    if not isinstance(doc, dict) or "instances" not in doc:
        return BadInput(f"missing \"instances\"; expected {expected()}")
    inst = doc["instances"]
    if not isinstance(inst, list) or not inst:
        return BadInput(f"\"instances\" must be a non-empty list; expected {expected()}")
    if len(inst) > max_instances:
        return _too_many(len(inst), max_instances)
    out = np.empty((len(inst), PIXELS), np.float32)
    for i, x in enumerate(inst):
        row = _instance(x)
        if isinstance(row, str):
            return BadInput(f"instance {i}: {row}; expected {expected()}")
        out[i] = row
    return out


def _instance(x: Any) -> np.ndarray | str:
    if not isinstance(x, list):
        return f"got {type(x).__name__}, not a list"
    if len(x) == SIDE and all(isinstance(r, list) for r in x):
        if any(len(r) != SIDE for r in x):
            return f"rows of a {SIDE}x{SIDE} image must each hold {SIDE} numbers"
        flat = [v for r in x for v in r]
    elif len(x) == PIXELS:
        flat = x
    else:
        return f"has length {len(x)}"
    # bool is an int in Python, but true/false are not pixel values.
    if not all(type(v) in (int, float) for v in flat):
        bad = next(v for v in flat if type(v) not in (int, float))
        return f"value {bad!r} is not a number"
    arr = np.asarray(flat, dtype=np.float32)
    if not np.isfinite(arr).all():
        return "values must be finite"
    return arr


def response_body(model: str, version: int | None, scores: np.ndarray, labels: Sequence[str]) -> bytes:
    """The KServe v1 reply: ``{"predictions": [{"class", "label", "scores"}], "model", "model_version"}``."""
    classes = scores.argmax(axis=1).tolist()
    rows = np.round(scores.astype(np.float64), 6).tolist()
    preds = [{"class": c, "label": labels[c], "scores": s} for c, s in zip(classes, rows)]
    return json.dumps({"predictions": preds, "model": model, "model_version": version},
                      separators=(",", ":")).encode()
