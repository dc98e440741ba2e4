"""The model store: a directory of versioned models, each with parameters and a JSON card.

Layout::

    <root>/<model_name>/<version>/params.npz    flattened params, keys like "conv0/w"
    <root>/<model_name>/<version>/card.json     {"name", "version", "arch", "hyperparams",
                                                 "test_accuracy", "data_fingerprint",
                                                 "created", "params_sha", ...}

The root defaults to ``$DMLSYS_STORE`` or ``.dmlsys/models`` under the working directory.

**Atomic saves.** A version is written into a hidden temporary directory beside its final
place and moved there with one ``os.rename``. A reader therefore sees a version complete or
not at all, and two processes saving the same model at once cannot both claim a number:
``rename`` onto an existing non-empty directory fails, and the loser takes the next number.

**Integrity.** ``params_sha`` (SHA-256 over keys, dtypes, shapes and bytes) is checked on
every load, so a damaged file fails loudly instead of serving garbage predictions.
``np.load(..., allow_pickle=False)``: a parameter file is data, never code.

Serving loads a model with::

    params, card = ModelStore().load("fmnist-cnn")
    logits = models.build(card["arch"]).apply(params, x)
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ModelNotFound, StoreError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
PARAMS_FILE = "params.npz"
CARD_FILE = "card.json"


# -- pure core: pytree <-> flat dict ---------------------------------------------------------


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
    """Nested dicts of arrays -> ``{"a/b": array}``; keys must be non-empty and '/'-free."""
    flat: dict[str, np.ndarray] = {}
    for key, value in tree.items():
        if not isinstance(key, str) or not key or "/" in key:
            raise StoreError(f"parameter key {key!r} under {prefix or '/'!r} must be a non-empty str without '/'")
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, path + "/"))
        else:
            flat[path] = np.asarray(value)
    return flat


def unflatten(flat: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Inverse of :func:`flatten`."""
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def params_sha(flat: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over sorted keys, dtypes, shapes and raw bytes: equal iff bitwise-equal params."""
    h = hashlib.sha256()
    for key in sorted(flat):
        a = np.ascontiguousarray(flat[key])
        h.update(f"{key}\0{a.dtype.str}\0{a.shape}\0".encode())
        h.update(a.reshape(-1).view(np.uint8))
    return h.hexdigest()


def default_root() -> Path:
    return Path(os.environ.get("DMLSYS_STORE") or Path.cwd() / ".dmlsys" / "models")


# -- the store ---------------------------------------------------------------------------------


class ModelStore:
    """Versioned models in a directory. Versions count up from 1 per model name."""

    __slots__ = ("root",)

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        self.root = Path(root) if root is not None else default_root()

    def __repr__(self) -> str:
        return f"ModelStore({str(self.root)!r})"

    def _dir(self, name: str) -> Path:
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise StoreError(
                f"model name {name!r} is invalid: use 1-128 letters, digits, '_', '.', '-', "
                "starting with a letter or digit"
            )
        return self.root / name

    def models(self) -> list[str]:
        """Names of models with at least one version, sorted."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if NAME_RE.match(p.name) and self._versions(p))

    @staticmethod
    def _versions(model_dir: Path) -> list[int]:
        if not model_dir.is_dir():
            return []
        return sorted(int(p.name) for p in model_dir.iterdir() if p.name.isdigit() and (p / CARD_FILE).is_file())

    def versions(self, name: str) -> list[int]:
        """Saved versions of ``name``, ascending.

        Raises:
            ModelNotFound: no such model; lists the models that exist.
        """
        found = self._versions(self._dir(name))
        if not found:
            raise ModelNotFound(name, None, self.models())
        return found

    def _version_dir(self, name: str, version: int | None) -> Path:
        found = self.versions(name)
        if version is None:
            version = found[-1]
        if version not in found:
            raise ModelNotFound(name, version, found)
        return self._dir(name) / str(version)

    def card(self, name: str, version: int | None = None) -> dict[str, Any]:
        """The card of ``name`` at ``version`` (None = latest)."""
        path = self._version_dir(name, version) / CARD_FILE
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise StoreError(f"{path}: unreadable card ({exc})") from exc

    def load(self, name: str, version: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(params, card)`` of ``name`` at ``version`` (None = latest); params as numpy arrays.

        Raises:
            ModelNotFound: unknown model or version, listing what exists.
            StoreError: the parameter file is unreadable or fails its ``params_sha``.
        """
        vdir = self._version_dir(name, version)
        card = self.card(name, int(vdir.name))
        path = vdir / PARAMS_FILE
        try:
            with np.load(path, allow_pickle=False) as npz:
                flat = {k: npz[k] for k in npz.files}
        except (OSError, ValueError) as exc:
            raise StoreError(f"{path}: unreadable parameters ({exc})") from exc
        sha = params_sha(flat)
        if card.get("params_sha") not in (None, sha):
            raise StoreError(
                f"{path}: params_sha {sha} differs from the card's {card['params_sha']}; "
                "the file is damaged: save the model again"
            )
        return unflatten(flat), card

    def save(self, name: str, params: Mapping[str, Any], card: Mapping[str, Any] | None = None) -> int:
        """Save ``params`` (nested dicts of arrays) with ``card`` as the next version of ``name``.

        The store fills ``name``, ``version``, ``params_sha``, ``param_count`` and (if absent)
        ``created``. Returns the new version number.

        Raises:
            StoreError: invalid name, keys, or a card that is not JSON-serialisable.
        """
        mdir = self._dir(name)
        flat = flatten(params)
        card = dict(card or {})
        card.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        card.update(name=name, params_sha=params_sha(flat),
                    param_count=int(sum(a.size for a in flat.values())))
        mdir.mkdir(parents=True, exist_ok=True)
        tmp = mdir / f".tmp-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            with open(tmp / PARAMS_FILE, "wb") as f:
                np.savez(f, **flat)
                f.flush()
                os.fsync(f.fileno())
            version = (self._versions(mdir) or [0])[-1] + 1
            while True:
                card["version"] = version
                try:
                    text = json.dumps(card, indent=2, sort_keys=True, allow_nan=False)
                except (TypeError, ValueError) as exc:
                    raise StoreError(f"card for model {name!r} is not JSON-serialisable: {exc}") from exc
                (tmp / CARD_FILE).write_text(text + "\n")
                try:
                    os.rename(tmp, mdir / str(version))
                    return version
                except OSError as exc:
                    if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                        raise
                    version += 1  # another writer took this number first
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
