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

**Durable saves.** Both files and the temporary directory are fsynced before the rename, and
the model's directory after it, so a version that ``save`` returned survives a power loss. A
version damaged all the same (a disk, a copy, a store written before saves were durable) is
skipped when the latest is asked for: ``load`` and ``card`` fall back to the newest intact
version and log a warning naming the damaged one, ``models`` lists only models with an intact
version, and ``intact_version`` says which version would load (None: train it again). The
``.tmp-<pid>-*`` directories of saves that crashed are removed by the next save of that model.

**Integrity.** ``params_sha`` (:func:`dmlsys.arrays.fingerprint` over keys, dtypes, shapes and
bytes; SHA-256 in cards saved before it, which still verify) is checked on every load, so a
damaged file fails loudly instead of serving garbage predictions.
``np.load(..., allow_pickle=False)``: a parameter file is data, never code.

Serving loads a model with::

    params, card = ModelStore().load("fmnist-cnn")
    logits = models.build(card["arch"]).apply(params, x)
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from dmlsys.arrays import fingerprint, flatten_with_paths

from .errors import ModelNotFound, StoreError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
PARAMS_FILE = "params.npz"
CARD_FILE = "card.json"
TMP_PREFIX = ".tmp-"
# A temporary directory is a crashed save's when its writer's pid is dead; when the name has no
# pid (saves before the pid was in it), when it is this old. A live pid is trusted for an hour:
# past that the pid has more likely been reused than a save lasted that long.
STALE_TMP_S = 60.0
STALE_TMP_LIVE_PID_S = 3600.0

log = logging.getLogger("dmlsys.train")


# -- pure core: pytree <-> flat dict ---------------------------------------------------------


def flatten(tree: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Nested dicts of arrays -> ``{"a/b": array}`` (the walk is :func:`dmlsys.arrays.flatten`'s);
    keys must be non-empty and '/'-free.

    Raises:
        StoreError: a bad key, or a list or tuple in the tree (parameter files hold dicts only).
    """
    flat: dict[str, np.ndarray] = {}
    for path, leaf in flatten_with_paths(tree)[0]:
        for i, key in enumerate(path):
            if not isinstance(key, str):
                raise StoreError(f"parameters under {'/'.join(map(str, path[:i])) or '/'!r} are a list or tuple: "
                                 "a parameter tree is nested dicts of arrays")
            if not key or "/" in key:
                raise StoreError(f"parameter key {key!r} under {'/'.join(path[:i]) or '/'!r} "
                                 "must be a non-empty str without '/'")
        flat["/".join(path)] = leaf
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
    """The params' fingerprint (:func:`dmlsys.arrays.fingerprint`, 32 hex digits): equal iff
    bitwise-equal params. The card field keeps its old name, ``params_sha``."""
    return fingerprint(flat)


def _sha256_v0(flat: Mapping[str, np.ndarray]) -> str:
    """What ``params_sha`` was before it became the shared fingerprint (64 hex digits): kept
    only so that cards saved then still verify on load."""
    h = hashlib.sha256()
    for key in sorted(flat):
        a = np.ascontiguousarray(flat[key])
        h.update(f"{key}\0{a.dtype.str}\0{a.shape}\0".encode())
        h.update(a.reshape(-1).view(np.uint8))
    return h.hexdigest()


def verify_params(flat: Mapping[str, np.ndarray], expected: str | None) -> str | None:
    """The params' digest in the format of ``expected`` (a card's ``params_sha``) when it
    differs from it; None when they match or there is nothing to check against."""
    if expected is None:
        return None
    actual = _sha256_v0(flat) if len(expected) == 64 else params_sha(flat)
    return None if actual == expected else actual


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
        """Names of models with at least one intact version (by its card), sorted."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir()
                      if NAME_RE.match(p.name) and any(_damage(p / str(v)) is None for v in reversed(self._versions(p))))

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

    def _candidates(self, name: str, version: int | None) -> list[Path]:
        """The version's directory; for the latest (None), every version's, newest first."""
        found = self.versions(name)
        if version is None:
            return [self._dir(name) / str(v) for v in reversed(found)]
        if version not in found:
            raise ModelNotFound(name, version, found)
        return [self._dir(name) / str(version)]

    def _latest(self, name: str, version: int | None, read: Any) -> Any:
        """``read(version_dir)`` of the version asked for; for the latest, of the newest version
        that reads without a StoreError, with a warning naming each damaged one passed over."""
        damaged: list[str] = []
        for vdir in self._candidates(name, version):
            try:
                return read(vdir)
            except StoreError as exc:
                if version is not None:
                    raise
                log.warning("model %r version %s is damaged, falling back to an older version: %s",
                            name, vdir.name, exc)
                damaged.append(f"version {vdir.name}: {exc}")
        raise StoreError(f"model {name!r} has no intact version in {self.root} ({'; '.join(damaged)}); "
                         "train it again or restore the store from a copy")

    def intact_version(self, name: str) -> int | None:
        """The version ``load(name)`` returns, its parameters read and checked; None when the model
        does not exist or no version of it is intact (``up`` then trains it again)."""
        def check(vdir: Path) -> int:
            self._read(vdir)
            return int(vdir.name)

        try:
            return self._latest(name, None, check)
        except (ModelNotFound, StoreError):
            return None

    def card(self, name: str, version: int | None = None) -> dict[str, Any]:
        """The card of ``name`` at ``version`` (None = the newest with a readable card)."""
        return self._latest(name, version, _read_card)

    def load(self, name: str, version: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(params, card)`` of ``name`` at ``version`` (None = the newest intact version);
        params as numpy arrays.

        Raises:
            ModelNotFound: unknown model or version, listing what exists.
            StoreError: the version asked for (or, for the latest, every version) has an
                unreadable card or parameter file, or fails its ``params_sha``.
        """
        return self._latest(name, version, self._read)

    @staticmethod
    def _read(vdir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
        card = _read_card(vdir)
        path = vdir / PARAMS_FILE
        try:
            with np.load(path, allow_pickle=False) as npz:
                flat = {k: npz[k] for k in npz.files}
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as exc:  # empty, truncated, garbage
            raise StoreError(f"{path}: unreadable parameters ({type(exc).__name__}: {exc})") from exc
        sha = verify_params(flat, card.get("params_sha"))
        if sha is not None:
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
        new_dirs = [d for d in (self.root, mdir) if not d.is_dir()]
        mdir.mkdir(parents=True, exist_ok=True)
        for d in new_dirs:  # a new model's directory entry must survive a power loss too
            _fsync_dir(d.parent)
        _remove_crashed_saves(mdir)
        tmp = mdir / f"{TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex}"
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
                with open(tmp / CARD_FILE, "w") as f:
                    f.write(text + "\n")
                    f.flush()
                    os.fsync(f.fileno())
                _fsync_dir(tmp)  # the files' directory entries, before the rename publishes them
                try:
                    os.rename(tmp, mdir / str(version))
                    _fsync_dir(mdir)  # and the rename itself: without it a power loss can undo it
                    return version
                except OSError as exc:
                    if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                        raise
                    version += 1  # another writer took this number first
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


# -- durability ----------------------------------------------------------------------------


def _read_card(vdir: Path) -> dict[str, Any]:
    path = vdir / CARD_FILE
    try:
        card = json.loads(path.read_text())
    except (OSError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
        raise StoreError(f"{path}: unreadable card ({exc})") from exc
    if not isinstance(card, dict):
        raise StoreError(f"{path}: unreadable card (a JSON {type(card).__name__}, not an object)")
    return card


def _damage(vdir: Path) -> str | None:
    """Why the version in ``vdir`` cannot load, by its card and its parameter file's size alone
    (cheap: no parameters are read); None when it looks whole."""
    try:
        _read_card(vdir)
        if (vdir / PARAMS_FILE).stat().st_size == 0:
            return f"{vdir / PARAMS_FILE} is empty"
    except StoreError as exc:
        return str(exc)
    except OSError as exc:
        return f"{vdir / PARAMS_FILE}: {exc.strerror}"
    return None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _remove_crashed_saves(mdir: Path, now: float | None = None) -> list[Path]:
    """Remove the temporary directories of saves that died before their rename: those whose
    writer's pid is gone, those without a pid older than ``STALE_TMP_S``, and any older than
    ``STALE_TMP_LIVE_PID_S``. A save in progress is never one of them. Returns what it removed."""
    now = time.time() if now is None else now
    removed = []
    for tmp in mdir.glob(f"{TMP_PREFIX}*"):
        try:
            age = now - tmp.lstat().st_mtime
        except OSError:
            continue  # its save finished (renamed) or failed (removed) while we looked
        pid_text = tmp.name[len(TMP_PREFIX):].partition("-")[0]
        pid = int(pid_text) if pid_text.isdigit() and tmp.name.count("-") >= 2 else None
        if pid == os.getpid():
            stale = age > STALE_TMP_LIVE_PID_S  # a thread of ours may be saving right now
        elif pid is not None:
            stale = not _pid_alive(pid) or age > STALE_TMP_LIVE_PID_S
        else:
            stale = age > STALE_TMP_S
        if stale:
            shutil.rmtree(tmp, ignore_errors=True)
            if not tmp.exists():
                log.info("removed %s, left by a save that crashed", tmp)
                removed.append(tmp)
    return removed
