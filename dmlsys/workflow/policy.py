"""Cache policies: small value objects that say what a step's cached result depends on.

A policy contributes *key parts* (what goes into the cache key) and, optionally, a *freshness
bound* (how old a stored result may be and still count as a hit). Policies combine with ``+``
and drop pieces with ``-``, after Prefect's ``cache_policies``::

    DEFAULT                                  # CODE + PARAMS + INPUTS
    DEFAULT + MaxAge(3600)                   # ... and a result is fresh for an hour
    DEFAULT + Probe(lambda p: file_stamp(p["path"]))   # ... and re-run when the file changes
    DEFAULT - CODE                           # ignore edits to the function's source
    NONE                                     # never cache (the default for a Step)

The two freshness ideas of the workflow issue map onto these pieces:

* **time-based** — ``MaxAge(seconds)``: the key stays the same, but an entry older than
  ``seconds`` (by the store's clock) is a miss and is overwritten by the new result;
* **content-based** — ``Probe(fn)``: ``fn(params)`` is a cheap look at the source (a file's
  size and mtime, a table's row count) whose result is folded into the key, so a changed source
  means a new key. The probe runs every time the step is considered, so keep it cheap.

Policies are pure: computing a key does no I/O except what a probe chooses to do.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable, Mapping


@dataclasses.dataclass(frozen=True, slots=True)
class KeyContext:
    """What a policy may look at when it builds the key of one step execution."""

    step: str
    params: Mapping[str, Any]
    code: Callable[[], str]  # lazily computed: hashing source is only paid when CODE is used
    inputs: Callable[[], Mapping[str, Any]]  # argument name -> fingerprint(s) of its value


class CachePolicy:
    """Base: a policy that caches nothing on its own. Subclasses override the hooks."""

    __slots__ = ()

    def parts(self, ctx: KeyContext) -> dict[str, Any]:
        """Key parts this policy contributes (name -> canonical-encodable value)."""
        return {}

    @property
    def max_age(self) -> float | None:
        """Seconds a stored result stays fresh; None = forever."""
        return None

    @property
    def enabled(self) -> bool:
        """False only for NONE: the step is never looked up nor stored."""
        return True

    def pieces(self) -> tuple["CachePolicy", ...]:
        return (self,)

    def __add__(self, other: "CachePolicy") -> "CachePolicy":
        if not isinstance(other, CachePolicy):
            return NotImplemented
        merged = [p for p in self.pieces() + other.pieces() if p.enabled]
        unique = tuple(dict.fromkeys(merged))  # same piece twice adds nothing
        return unique[0] if len(unique) == 1 else (Compound(unique) if unique else NONE)

    def __sub__(self, other: "CachePolicy") -> "CachePolicy":
        if not isinstance(other, CachePolicy):
            return NotImplemented
        drop = set(other.pieces())
        kept = tuple(p for p in self.pieces() if p not in drop)
        return kept[0] if len(kept) == 1 else (Compound(kept) if kept else NONE)


@dataclasses.dataclass(frozen=True, slots=True)
class _NoCache(CachePolicy):
    @property
    def enabled(self) -> bool:
        return False

    def pieces(self) -> tuple[CachePolicy, ...]:
        return ()

    def __repr__(self) -> str:
        return "NONE"


@dataclasses.dataclass(frozen=True, slots=True)
class Code(CachePolicy):
    """The step's code version: its explicit ``version=`` or a hash of its function's source."""

    def parts(self, ctx: KeyContext) -> dict[str, Any]:
        return {"code": ctx.code()}

    def __repr__(self) -> str:
        return "CODE"


@dataclasses.dataclass(frozen=True, slots=True)
class Params(CachePolicy):
    """The step's declared params (its configuration, e.g. hyperparameters)."""

    def parts(self, ctx: KeyContext) -> dict[str, Any]:
        return {"params": dict(ctx.params)}

    def __repr__(self) -> str:
        return "PARAMS"


@dataclasses.dataclass(frozen=True, slots=True)
class Inputs(CachePolicy):
    """The fingerprints of the step's input values (the results of the steps it depends on).

    Fingerprints are of *values*, not of upstream keys: an upstream step that re-runs and returns
    the same value leaves this step's key unchanged (early cut-off, as in Bazel and Shake)."""

    def parts(self, ctx: KeyContext) -> dict[str, Any]:
        return {"inputs": dict(ctx.inputs())}

    def __repr__(self) -> str:
        return "INPUTS"


@dataclasses.dataclass(frozen=True, slots=True)
class MaxAge(CachePolicy):
    """Time-based freshness: a stored result is a hit for ``seconds`` after it was written."""

    seconds: float

    def __post_init__(self) -> None:
        if not self.seconds >= 0:
            raise ValueError(f"MaxAge.seconds must be >= 0, got {self.seconds!r}")

    @property
    def max_age(self) -> float | None:
        return float(self.seconds)


@dataclasses.dataclass(frozen=True, slots=True)
class Probe(CachePolicy):
    """Content-based freshness: ``fn(params)`` is folded into the key under ``name``.

    ``fn`` should be cheap and return plain data: see ``file_stamp`` for files and directories.
    Two Probes are the same piece when they have the same function and name."""

    fn: Callable[[Mapping[str, Any]], Any]
    name: str = ""

    def parts(self, ctx: KeyContext) -> dict[str, Any]:
        return {"probe:" + (self.name or getattr(self.fn, "__qualname__", "probe")): self.fn(ctx.params)}


@dataclasses.dataclass(frozen=True, slots=True)
class Compound(CachePolicy):
    """Several pieces: the union of their key parts, the strictest of their freshness bounds."""

    policies: tuple[CachePolicy, ...]

    def parts(self, ctx: KeyContext) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for p in self.policies:
            out.update(p.parts(ctx))
        return out

    @property
    def max_age(self) -> float | None:
        ages = [p.max_age for p in self.policies if p.max_age is not None]
        return min(ages) if ages else None

    def pieces(self) -> tuple[CachePolicy, ...]:
        return self.policies

    def __repr__(self) -> str:
        return " + ".join(map(repr, self.policies))


NONE: CachePolicy = _NoCache()
CODE: CachePolicy = Code()
PARAMS: CachePolicy = Params()
INPUTS: CachePolicy = Inputs()
DEFAULT: CachePolicy = CODE + PARAMS + INPUTS


def file_stamp(path: str | os.PathLike[str]) -> tuple:
    """A cheap content probe: (size, mtime_ns) of a file, or of every file under a directory.

    Reads metadata only, never contents: a rewrite that keeps size and mtime goes unnoticed,
    which is the usual trade-off of make-style freshness. A missing path probes as ("missing",),
    so creating it later changes the key."""
    p = Path(path)
    if not p.exists():
        return ("missing", str(p))
    if p.is_file():
        st = p.stat()
        return (str(p), st.st_size, st.st_mtime_ns)
    out = []
    for f in sorted(q for q in p.rglob("*") if q.is_file()):
        st = f.stat()
        out.append((str(f.relative_to(p)), st.st_size, st.st_mtime_ns))
    return (str(p), tuple(out))
