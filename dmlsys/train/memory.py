"""The per-worker memory cap: how many bytes of parameters one worker may hold.

A data-parallel (collective) worker holds a full replica of the model, so a job passes only when
the whole model fits the cap; :func:`check_fits` is that test and raises
:class:`MemoryCapExceeded` naming the cap and the need. The parameter servers
(:mod:`dmlsys.ps.wide`) use the same cap for what a worker pulls.

:func:`param_bytes` is a model's parameter bytes from its architecture dict without allocating
it: ``mlp`` / ``cnn`` by ``jax.eval_shape`` of :func:`dmlsys.train.models.build`, and the wide
hashed-feature model (``{"kind": "wide", "rows": R}``, trained through parameter servers only:
a table of ``R x 10`` float32 and a bias of 10) by its shape, which ``dmlsys.ps.wide.specs``
must match (a test checks it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

from dmlsys.train.errors import InvalidArgument, TrainError

WIDE_CLASSES = 10
WIDE_DEFAULT_ROWS = 1 << 22


class MemoryCapExceeded(TrainError):
    """Parameters (or a pull) would not fit a worker's memory cap; names the cap and the need."""


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB ({n} bytes)"


@dataclasses.dataclass(frozen=True)
class MemoryCap:
    """How many bytes of parameters one worker may hold."""

    bytes: int

    def __post_init__(self) -> None:
        if not isinstance(self.bytes, int) or isinstance(self.bytes, bool) or self.bytes < 1:
            raise InvalidArgument(f"memory cap: a positive number of bytes, got {self.bytes!r}")

    def check(self, need: int, what: str) -> None:
        if need > self.bytes:
            raise MemoryCapExceeded(f"{what} needs {_mib(need)} but the per-worker memory cap is "
                                    f"{_mib(self.bytes)}; train it through parameter servers "
                                    f"(the model's tables stay on the shards) or raise the cap")


def check_fits(sizes: int | Iterable[Any], cap: MemoryCap, what: str = "a full replica of the model") -> None:
    """Raise MemoryCapExceeded when the whole model would not fit ``cap``. ``sizes``: a byte
    count, or leaves with an ``nbytes`` (arrays, ``dmlsys.ps.partition.LeafSpec``)."""
    need = sizes if isinstance(sizes, int) else sum(int(s.nbytes) for s in sizes)
    cap.check(need, what)


def param_bytes(arch: dict[str, Any]) -> int:
    """Bytes of a model's parameters, from its architecture dict, allocating nothing."""
    if isinstance(arch, dict) and arch.get("kind") == "wide":
        rows = arch.get("rows", WIDE_DEFAULT_ROWS)
        if not isinstance(rows, int) or isinstance(rows, bool) or rows < 1:
            raise InvalidArgument(f"arch {arch}: rows: an integer >= 1, got {rows!r}")
        return (rows * WIDE_CLASSES + WIDE_CLASSES) * 4
    import jax

    from dmlsys.train.models import build

    model = build(arch)  # UnknownArchitecture names a bad kind or field
    shapes = jax.eval_shape(model.init, jax.ShapeDtypeStruct((2,), "uint32"))
    return sum(int(leaf.size) * leaf.dtype.itemsize for leaf in jax.tree_util.tree_leaves(shapes))
