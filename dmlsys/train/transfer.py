"""Models and data over the wire: the cluster's store serves files in chunks, another host fetches them.

A second machine has its own disk: the model the workers saved on the first one, and the
Fashion-MNIST files, are not there. ``TransferService`` (service ``store``) serves both from the
host that has them; ``fetch_model`` and ``fetch_data`` pull them into a local directory::

    manifest = await node.call(peer, "store", "manifest", {"kind": "model", "model": "fashion-mlp"})
    # {"kind", "model", "version", "card", "files": [{"name", "size", "sha256"}], "chunk_bytes"}
    chunk = await node.call(peer, "store", "chunk", {... "file": "params.npz", "offset": 0, "size": n})
    # {"data": uint8 array}: the bytes travel as one raw array frame, never through msgpack

**Verified twice.** Each file's SHA-256 (computed by the serving side from the file it reads)
is checked when its last chunk has arrived; a mismatch (a flipped bit on the way, a chunk
from a file replaced mid-transfer) refuses the file and fetches it again, up to ``RETRIES``
times. A model is then read back through ``ModelStore``, which checks the card's
``params_sha`` over the parameters themselves; data is loaded back and its fingerprint
(:func:`dmlsys.arrays.fingerprint` of the arrays) compared with the serving side's.

**Atomic.** Files land in a hidden temporary directory beside their final place, which is
moved there with one ``rename`` once everything checks out, the model store's own discipline
(:mod:`dmlsys.train.store`): a reader sees a version complete or not at all, and two replicas
of one host fetching the same version at once both end with the one that won the rename.

**Bounded.** A chunk is at most ``MAX_CHUNK`` bytes, a file at most ``MAX_FILE`` bytes; the
fetcher keeps ``WINDOW`` chunk requests in flight (a LAN's latency times a few chunks covers its
bandwidth) and asks only for offsets inside the size the manifest announced.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import os
import shutil
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np

from dmlsys.node import Service, rpc
from dmlsys.wire.sim import to_thread

from .errors import ModelNotFound, TrainError

log = logging.getLogger("dmlsys.train")

CHUNK_BYTES = 1 << 20
MAX_CHUNK = 8 << 20
MAX_FILE = 2 << 30
WINDOW = 4
RETRIES = 3
MODEL_FILES = ("params.npz", "card.json")

Upstream = Callable[[str, dict], Awaitable[Any]]  # (method, body) -> reply: a relay to the cluster's store


class TransferError(TrainError):
    """A transfer failed: the serving side refused, the peer is unreachable, or a file kept
    failing its checksum. Names the file and the peer."""


class TransferCorrupt(TransferError):
    """A fetched file's SHA-256 differs from the one its manifest announced."""


# -- the serving side ----------------------------------------------------------------------------


class TransferService(Service):
    """Service ``store``: manifests and chunks of the models in ``store_root`` and of the data in
    ``data_dir`` (found lazily with :func:`dmlsys.train.data.find_data_dir` when None).

    With ``upstream`` it is a relay: every request goes on to the cluster's store (a secondary
    host's supervisor runs one, so its replicas ask the supervisor they know and the bytes come
    from the primary's). ``corrupt_chunks``: flip a byte in that many chunk replies (tests)."""

    name = "store"

    def __init__(self, store_root: str | os.PathLike, *, data_dir: str | os.PathLike | None = None,
                 upstream: Upstream | None = None, chunk_bytes: int = CHUNK_BYTES, corrupt_chunks: int = 0) -> None:
        self.root = Path(store_root)
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self.upstream = upstream
        self.chunk_bytes = chunk_bytes
        self.corrupt_chunks = corrupt_chunks
        self._digests: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256
        self._fingerprint: tuple[str, str] | None = None  # (data dir, fingerprint)
        self.served_bytes = 0
        self.manifests = 0

    @rpc
    async def manifest(self, body: Any) -> dict[str, Any]:
        if self.upstream is not None:
            return await self.upstream("manifest", body)
        self.manifests += 1
        kind = _field(body, "kind", str)
        if kind == "model":
            return await to_thread(self._model_manifest, _field(body, "model", str), body.get("version"))
        if kind == "data":
            return await self._data_manifest()
        raise TransferError(f'store.manifest: kind is "model" or "data", got {kind!r}')

    @rpc
    async def chunk(self, body: Any) -> dict[str, Any]:
        if self.upstream is not None:
            return await self.upstream("chunk", body)
        path = self._file(body)
        offset, size = _field(body, "offset", int), _field(body, "size", int)
        if not 0 < size <= MAX_CHUNK or offset < 0:
            raise TransferError(f"store.chunk: offset >= 0 and size in (0, {MAX_CHUNK}], got {offset}, {size}")
        data = await to_thread(_read_range, path, offset, size)
        if self.corrupt_chunks > 0 and data.size:
            self.corrupt_chunks -= 1
            data = data.copy()
            data[data.size // 2] ^= 0xFF
        self.served_bytes += int(data.size)
        return {"data": data}

    def status(self) -> dict[str, Any]:
        return {"relay": self.upstream is not None, "served_bytes": self.served_bytes, "manifests": self.manifests}

    # -- files -----------------------------------------------------------------------------

    def _model_manifest(self, model: str, version: Any) -> dict[str, Any]:
        from .store import ModelStore

        store = ModelStore(self.root)
        if version is not None and (not isinstance(version, int) or isinstance(version, bool)):
            raise TransferError(f"store.manifest: version is an integer or null, got {version!r}")
        if version is None:
            version = store.intact_version(model)
            if version is None:
                raise ModelNotFound(model, None, store.models())
        card = store.card(model, version)
        vdir = store.root / model / str(version)
        return {"kind": "model", "model": model, "version": version, "card": card,
                "files": [self._describe(vdir / name) for name in MODEL_FILES], "chunk_bytes": self.chunk_bytes}

    async def _data_manifest(self) -> dict[str, Any]:
        from . import data

        d = self.data_dir or data.find_data_dir()
        if self._fingerprint is None or self._fingerprint[0] != str(d):
            dataset = await to_thread(data.load, d)
            self._fingerprint = (str(d), dataset.fingerprint)
        files = [await to_thread(self._describe, d / name) for name in data.FILES.values()]
        return {"kind": "data", "files": files, "fingerprint": self._fingerprint[1], "chunk_bytes": self.chunk_bytes}

    def _describe(self, path: Path) -> dict[str, Any]:
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        if key not in self._digests:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                while block := f.read(1 << 20):
                    h.update(block)
            self._digests[key] = h.hexdigest()
        return {"name": path.name, "size": st.st_size, "sha256": self._digests[key]}

    def _file(self, body: Any) -> Path:
        from . import data
        from .store import NAME_RE

        kind, name = _field(body, "kind", str), _field(body, "file", str)
        if kind == "model":
            model, version = _field(body, "model", str), _field(body, "version", int)
            if not NAME_RE.match(model) or name not in MODEL_FILES:
                raise TransferError(f"store.chunk: no file {name!r} of model {model!r} (files: {', '.join(MODEL_FILES)})")
            return self.root / model / str(version) / name
        if kind == "data":
            if name not in data.FILES.values():
                raise TransferError(f"store.chunk: no data file {name!r} (files: {', '.join(data.FILES.values())})")
            return (self.data_dir or data.find_data_dir()) / name
        raise TransferError(f'store.chunk: kind is "model" or "data", got {kind!r}')


def _field(body: Any, key: str, kind: type) -> Any:
    value = body.get(key) if isinstance(body, dict) else None
    if not isinstance(value, kind) or isinstance(value, bool):
        raise TransferError(f"store: {key!r} must be a {kind.__name__}, got {value!r:.60}")
    return value


def _read_range(path: Path, offset: int, size: int) -> np.ndarray:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return np.frombuffer(f.read(size), np.uint8)
    except FileNotFoundError:
        raise TransferError(f"store.chunk: {path} is gone (deleted or replaced since its manifest)") from None


# -- the fetching side ---------------------------------------------------------------------------


class Fetcher:
    """Pulls the files of one manifest from ``peer``'s ``store`` service into a directory."""

    def __init__(self, node, peer: str, *, window: int = WINDOW, retries: int = RETRIES, timeout: float = 30.0) -> None:
        self.node, self.peer, self.window, self.retries, self.timeout = node, peer, window, retries, timeout
        self.refused = 0  # files refused by their checksum (and fetched again)
        self.bytes = 0

    async def manifest(self, body: dict) -> dict[str, Any]:
        return await self.node.call(self.peer, "store", "manifest", body, timeout=self.timeout)

    async def files(self, manifest: dict, key: dict, dest: Path) -> None:
        """Every file of ``manifest`` into ``dest``, each checked against its SHA-256 (retried)."""
        chunk_bytes = int(manifest.get("chunk_bytes") or CHUNK_BYTES)
        if not 0 < chunk_bytes <= MAX_CHUNK:
            raise TransferError(f"{self.peer}: chunk_bytes {chunk_bytes} outside (0, {MAX_CHUNK}]")
        for spec in manifest["files"]:
            name, size, sha = str(spec["name"]), int(spec["size"]), str(spec["sha256"])
            if "/" in name or name.startswith(".") or not 0 <= size <= MAX_FILE:
                raise TransferError(f"{self.peer}: manifest names a bad file {name!r} of {size} bytes")
            for attempt in range(self.retries + 1):
                try:
                    await self._one(dict(key, file=name), size, sha, chunk_bytes, dest / name)
                    break
                except TransferCorrupt as e:
                    self.refused += 1
                    if attempt == self.retries:
                        raise TransferError(f"{e} ({self.retries + 1} tries); giving up") from None
                    log.warning("%s; fetching it again (try %d of %d)", e, attempt + 2, self.retries + 1)

    async def _one(self, key: dict, size: int, sha: str, chunk_bytes: int, path: Path) -> None:
        offsets = list(range(0, size, chunk_bytes))
        results: dict[int, np.ndarray] = {}
        sem = asyncio.Semaphore(self.window)

        async def get(offset: int) -> None:
            async with sem:
                n = min(chunk_bytes, size - offset)
                reply = await self.node.call(self.peer, "store", "chunk", dict(key, offset=offset, size=n),
                                             timeout=self.timeout)
                data = reply.get("data") if isinstance(reply, dict) else None
                if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.size != n:
                    raise TransferCorrupt(f"{key['file']} from {self.peer}: chunk at {offset} is not {n} bytes")
                results[offset] = data

        await asyncio.gather(*(get(o) for o in offsets))
        digest = await to_thread(_write_chunks, path, [results[o] for o in offsets])
        self.bytes += size
        if digest != sha:
            path.unlink(missing_ok=True)
            raise TransferCorrupt(f"{key['file']} from {self.peer}: sha256 {digest[:16]}... differs from the "
                                  f"manifest's {sha[:16]}... (corrupted in transfer)")


def _write_chunks(path: Path, chunks: list[np.ndarray]) -> str:
    """Write ``chunks`` to ``path`` (fsynced); their SHA-256."""
    h = hashlib.sha256()
    with open(path, "wb") as f:
        for chunk in chunks:
            h.update(chunk)
            f.write(chunk.tobytes())
        f.flush()
        os.fsync(f.fileno())
    return h.hexdigest()


async def fetch_model(node, peer: str, root: str | os.PathLike, model: str, version: int | None = None,
                      *, manifest: dict | None = None, fetcher: Fetcher | None = None) -> int:
    """Make ``model`` at ``version`` (None: the store's latest) present in the local store at
    ``root``, fetching it from ``peer``'s store service if it is not; returns the version.

    Raises:
        TransferError: unreachable peer, refused request, or a file corrupted on every try.
        ModelNotFound: the cluster's store has no such model or version (a RemoteError from
            the peer is turned into this, so callers can wait for a model still in training).
        StoreError: the fetched parameters fail the card's ``params_sha``.
    """
    from dmlsys.node import NodeError, RemoteError

    from .store import TMP_PREFIX, ModelStore, _fsync_dir

    fetcher = fetcher or Fetcher(node, peer)
    if manifest is None:
        try:
            manifest = await fetcher.manifest({"kind": "model", "model": model, "version": version})
        except RemoteError as e:
            if e.type == "ModelNotFound":
                raise ModelNotFound(model, version, [f"(none at {peer}: {e.message})"]) from None
            raise TransferError(f"the store at {peer} refused the manifest of {model!r}: {e.message}") from None
        except NodeError as e:
            raise TransferError(f"cannot reach the store at {peer} for {model!r}: {e}") from None
    version = int(manifest["version"])
    store = ModelStore(root)
    target = store.root / model / str(version)
    if (target / "card.json").is_file():
        return version  # already here (a shared directory, or fetched before)
    mdir = store.root / model
    mdir.mkdir(parents=True, exist_ok=True)
    tmp = mdir / f"{TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        try:
            await fetcher.files(manifest, {"kind": "model", "model": model, "version": version}, tmp)
        except NodeError as e:
            raise TransferError(f"fetching {model!r} v{version} from {peer}: {e}") from None
        await to_thread(ModelStore._read, tmp)  # params_sha over the parameters, or StoreError
        _fsync_dir(tmp)
        try:
            os.rename(tmp, target)
            _fsync_dir(mdir)
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            # another replica of this host fetched it first: theirs is as good as ours
        log.info("fetched model %r v%d from %s (%d bytes, %d file(s) refused by checksum and fetched again)",
                 model, version, peer, fetcher.bytes, fetcher.refused)
        return version
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


async def fetch_data(node, peer: str, dest: str | os.PathLike, *, fetcher: Fetcher | None = None) -> Path:
    """Fetch the four Fashion-MNIST files from ``peer``'s store into ``dest`` (made if needed),
    checked by SHA-256 per file and by the serving side's fingerprint of the loaded arrays;
    returns ``dest``. (The published MD5s are checked by ``python -m dmlsys.train.data ensure
    --verify``: the store serves what its host loads, which need not be the official files.)

    Raises:
        TransferError: unreachable, refused, corrupted on every try, or a fingerprint mismatch.
    """
    from dmlsys.node import NodeError, RemoteError

    from . import data

    fetcher = fetcher or Fetcher(node, peer)
    dest = Path(dest).expanduser()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        try:
            manifest = await fetcher.manifest({"kind": "data"})
            await fetcher.files(manifest, {"kind": "data"}, tmp)
        except RemoteError as e:
            raise TransferError(f"the store at {peer} has no Fashion-MNIST to give: {e.message}") from None
        except NodeError as e:
            raise TransferError(f"cannot fetch Fashion-MNIST from the store at {peer}: {e}") from None
        got = (await to_thread(data.load, tmp)).fingerprint  # the content, as the store read it
        if manifest.get("fingerprint") and got != manifest["fingerprint"]:
            raise TransferError(f"Fashion-MNIST from {peer}: fingerprint {got} differs from the store's "
                                f"{manifest['fingerprint']}")
        try:
            os.rename(tmp, dest)
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
        log.info("fetched Fashion-MNIST from %s into %s (fingerprint %s)", peer, dest, got)
        return dest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

