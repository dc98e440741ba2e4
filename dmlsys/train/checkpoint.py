"""Training checkpoints: everything needed to continue a run exactly where it stopped.

One ``.npz`` file (no pickle) holds

* ``params/<key path>``  the model parameters (flattened like the model store does),
* ``opt/<i>``            the optimizer state's leaves, in ``jax.tree_util`` order,
* ``epoch``              epochs completed,
* ``rng``                the PRNG key the run continues with,
* ``meta``               JSON (architecture, hyperparameters) as uint8 bytes.

The optimizer state is an optax pytree of tuples and named tuples, awkward to name leaf by
leaf; we store its leaves in order and rebuild the tree from a *template* (the state that
``optimizer.init(params)`` makes for the same architecture), checking every leaf's shape and
dtype on the way. ``meta`` must match the resuming trainer's, so a checkpoint of another
model or other hyperparameters is refused instead of silently mixed in.

Writes are atomic: a temporary file in the same directory, fsync, ``os.replace``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import jax
import numpy as np

from .errors import CheckpointError
from .store import flatten, unflatten


@dataclasses.dataclass
class Checkpoint:
    params: dict[str, Any]
    opt_state: Any
    epoch: int
    rng: np.ndarray
    meta: dict[str, Any]


def save_checkpoint(path: str | os.PathLike, ckpt: Checkpoint) -> Path:
    """Atomically write ``ckpt`` to ``path`` (a file name; its directory is created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {f"params/{k}": v for k, v in flatten(jax.device_get(ckpt.params)).items()}
    leaves = jax.tree_util.tree_leaves(jax.device_get(ckpt.opt_state))
    arrays.update({f"opt/{i}": np.asarray(leaf) for i, leaf in enumerate(leaves)})
    arrays["epoch"] = np.asarray(ckpt.epoch, np.int64)
    arrays["rng"] = np.asarray(jax.device_get(ckpt.rng))
    arrays["meta"] = np.frombuffer(json.dumps(ckpt.meta, sort_keys=True).encode(), np.uint8)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_checkpoint(path: str | os.PathLike, *, opt_template: Any, meta: dict[str, Any]) -> Checkpoint:
    """Read a checkpoint, rebuilding the optimizer state on ``opt_template``'s structure.

    Raises:
        CheckpointError: unreadable file, a different model/hyperparameters (``meta``), or
            optimizer leaves that do not fit the template; names the file and the mismatch.
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            files = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, EOFError) as exc:
        raise CheckpointError(f"{path}: unreadable checkpoint ({exc}); delete it to start afresh") from exc
    try:
        saved_meta = json.loads(files.pop("meta").tobytes())
        epoch = int(files.pop("epoch"))
        rng = files.pop("rng")
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a dmlsys checkpoint (missing {exc})") from exc
    want = json.loads(json.dumps(meta, sort_keys=True))
    if saved_meta != want:
        raise CheckpointError(
            f"{path}: written for {saved_meta}, but this run is {want}; "
            "use another checkpoint directory or delete the file"
        )
    params = unflatten({k[len("params/"):]: v for k, v in files.items() if k.startswith("params/")})
    template_leaves, treedef = jax.tree_util.tree_flatten(opt_template)
    opt_leaves = []
    for i, tmpl in enumerate(template_leaves):
        leaf = files.get(f"opt/{i}")
        if leaf is None or leaf.shape != np.shape(tmpl) or leaf.dtype != np.asarray(tmpl).dtype:
            got = None if leaf is None else (leaf.shape, leaf.dtype)
            raise CheckpointError(
                f"{path}: optimizer leaf {i} is {got}, expected {(np.shape(tmpl), np.asarray(tmpl).dtype)}"
            )
        opt_leaves.append(leaf)
    if f"opt/{len(template_leaves)}" in files:
        raise CheckpointError(f"{path}: more optimizer leaves than this optimizer has")
    return Checkpoint(params, jax.tree_util.tree_unflatten(treedef, opt_leaves), epoch, rng, saved_meta)
