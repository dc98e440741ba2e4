"""Fashion-MNIST ingest: find the files, verify them, load them into a :class:`Dataset`.

Where the data comes from, in order (the first directory holding all four files wins):

1. ``$DMLSYS_DATA``
2. ``/usr/share/datasets/fashion-mnist`` (Debian package ``dataset-fashion-mnist``)
3. ``~/.cache/dmlsys/fashion-mnist`` (where :func:`download` puts them)

A node of a cluster that finds none of them (a worker on a second machine) calls :func:`locate`,
which goes on to the cluster's store (the primary supervisor's data, fetched over the wire and
checked: :func:`dmlsys.train.transfer.fetch_data`), then to the official download, and when all
fail says what each attempt found.

Two kinds of checksum are published for Fashion-MNIST, and we use both:

* the MD5 of each official ``.gz`` file: checks a fresh :func:`download` byte for byte;
* the MD5 of each *decompressed* file: checks the content wherever it came from. Debian
  recompresses the files (its ``.gz`` digests differ from the official ones), yet the IDX
  content inside is identical, so :func:`verify` checks content, not packaging.

A :class:`Dataset` carries a content ``fingerprint`` (:func:`dmlsys.arrays.fingerprint`: xxh3-128
over the arrays' names, dtypes, shapes and raw bytes): cheap (a few ms for 55 MB) and stable across gzip packaging, so a model card can say
exactly which data trained it. Run ``python -m dmlsys.train.data --help`` for the CLI.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import hashlib
import os
import sys
import tempfile
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from dmlsys.arrays import fingerprint

from .errors import ChecksumMismatch, DataError, DataNotFound
from .idx import read_idx

SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
CACHE_DIR = Path("~/.cache/dmlsys/fashion-mnist")
BASE_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"

# part -> file name, as the official source and the Debian package both name them.
FILES: dict[str, str] = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
# Published MD5 of the official .gz files (zalandoresearch/fashion-mnist README).
GZ_MD5: dict[str, str] = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
# Published MD5 of the decompressed IDX files (same content in every packaging).
RAW_MD5: dict[str, str] = {
    "train-images-idx3-ubyte.gz": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train-labels-idx1-ubyte.gz": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte.gz": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte.gz": "15d484375f8d13e6eb1aabb0c3f46965",
}
EXPECTED_SHAPES: dict[str, tuple[int, ...]] = {
    "train_images": (60000, 28, 28),
    "train_labels": (60000,),
    "test_images": (10000, 28, 28),
    "test_labels": (10000,),
}
NUM_CLASSES = 10


def search_path(env: Mapping[str, str] | None = None) -> list[Path]:
    """The directories searched for the data, in priority order."""
    env = os.environ if env is None else env
    dirs = [Path(env["DMLSYS_DATA"]).expanduser()] if env.get("DMLSYS_DATA") else []
    return dirs + [SYSTEM_DIR, CACHE_DIR.expanduser()]


def find_data_dir(env: Mapping[str, str] | None = None) -> Path:
    """First directory of :func:`search_path` that holds all four files.

    Raises:
        DataNotFound: listing every place searched and how to get the data.
    """
    searched = search_path(env)
    for d in searched:
        if all((d / name).is_file() for name in FILES.values()):
            return d
    raise DataNotFound([str(d) for d in searched], "fashion-mnist")


# -- checksums ---------------------------------------------------------------------------


def file_digest(path: str | os.PathLike, algorithm: str = "md5", *, decompress: bool = False) -> str:
    """Hex digest of a file (or of its gzip-decompressed content), read in 1 MiB chunks."""
    h = hashlib.new(algorithm, usedforsecurity=False)
    opener = gzip.open if decompress else open
    try:
        with opener(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    except FileNotFoundError:
        raise DataError(path, "no such file") from None
    except (OSError, EOFError) as exc:
        raise DataError(path, f"unreadable ({exc}); the file is corrupt or truncated") from exc
    return h.hexdigest()


def verify_file(path: str | os.PathLike, expected: str, *, algorithm: str = "md5", decompress: bool = False) -> None:
    """Check a file's digest against a published one.

    Raises:
        ChecksumMismatch: naming the file, both digests and the fix.
    """
    actual = file_digest(path, algorithm, decompress=decompress)
    if actual != expected.lower():
        what = f"{algorithm} of decompressed content" if decompress else algorithm
        raise ChecksumMismatch(path, what, expected.lower(), actual)


def verify(data_dir: str | os.PathLike) -> None:
    """Check the decompressed content of all four files against the published MD5s."""
    for name in FILES.values():
        verify_file(Path(data_dir) / name, RAW_MD5[name], decompress=True)


# -- download ------------------------------------------------------------------------------


def download(
    cache_dir: str | os.PathLike | None = None,
    *,
    base_url: str = BASE_URL,
    urlopen: Callable = urllib.request.urlopen,
    timeout: float = 60.0,
) -> Path:
    """Fetch the four official ``.gz`` files into ``cache_dir`` and verify their MD5s.

    Each file is downloaded to a temporary name beside its destination and renamed only
    after its checksum matches, so an interrupted or corrupt download never leaves a file
    that :func:`find_data_dir` would accept. Files already present and valid are kept.
    ``urlopen`` is injectable so tests (and proxies) can substitute their own.

    Raises:
        ChecksumMismatch: a downloaded file differs from the published digest.
        DataError: the network failed; names the URL.
    """
    target = Path(cache_dir).expanduser() if cache_dir else CACHE_DIR.expanduser()
    target.mkdir(parents=True, exist_ok=True)
    for name in FILES.values():
        dest = target / name
        if dest.is_file():
            try:
                verify_file(dest, GZ_MD5[name])
                continue
            except ChecksumMismatch:
                dest.unlink()  # stale or partial from an older tool: fetch it again
        url = base_url.rstrip("/") + "/" + name
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=target)
        try:
            with os.fdopen(fd, "wb") as out, urlopen(url, timeout=timeout) as resp:
                while chunk := resp.read(1 << 20):
                    out.write(chunk)
            verify_file(tmp, GZ_MD5[name])
            os.replace(tmp, dest)
        except ChecksumMismatch as exc:
            raise ChecksumMismatch(url, exc.algorithm, exc.expected, exc.actual) from None
        except OSError as exc:
            raise DataError(url, f"download failed ({exc}); check the network or set $DMLSYS_DATA") from exc
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return target


# -- on a node: local, then the cluster, then the download ---------------------------------------


async def locate(node=None, *, env: Mapping[str, str] | None = None, allow_download: bool | None = None) -> Path:
    """The data directory for a node of a cluster, and where it came from (logged): a directory
    of :func:`search_path`; else, when ``node`` has a supervisor, fetched from the cluster's store
    into the first writable of ``$DMLSYS_DATA`` and the cache directory; else downloaded (unless
    ``allow_download`` is False or ``$DMLSYS_DOWNLOAD`` is "0").

    Raises:
        DataNotFound: every attempt failed; the message says what each one found.
    """
    import logging

    log = logging.getLogger("dmlsys.train")
    env = os.environ if env is None else env
    try:
        d = find_data_dir(env)
        log.info("Fashion-MNIST: %s", d)
        return d
    except DataNotFound as e:
        attempts = [f"{', '.join(e.searched)}: not there"]
    dest = Path(env["DMLSYS_DATA"]).expanduser() if env.get("DMLSYS_DATA") else CACHE_DIR.expanduser()
    peer = getattr(getattr(node, "directory", None), "supervisor", None)
    if peer is not None and peer != node.name:
        from .transfer import TransferError, fetch_data

        try:
            d = await fetch_data(node, peer, dest)
            log.info("Fashion-MNIST: fetched from the cluster's store at %s into %s", peer, d)
            return d
        except (TransferError, DataError, OSError) as exc:
            attempts.append(f"the cluster's store at {peer}: {exc}")
    else:
        attempts.append("the cluster's store: this node has no supervisor to ask")
    if allow_download is None:
        allow_download = env.get("DMLSYS_DOWNLOAD", "1") != "0"
    if allow_download:
        try:
            from dmlsys.wire.sim import to_thread

            d = await to_thread(download, dest)
            log.info("Fashion-MNIST: downloaded from %s into %s", BASE_URL, d)
            return d
        except DataError as exc:
            attempts.append(f"the download: {exc.problem}")
    else:
        attempts.append("the download: off ($DMLSYS_DOWNLOAD=0)")
    raise DataNotFound(["; ".join(attempts)], "fashion-mnist")


# -- the dataset -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """Fashion-MNIST in memory: uint8 images (N, 28, 28) and uint8 labels (N,).

    The arrays are the raw pixels; turning them into float batches is the job of
    :mod:`dmlsys.train.batching`, one mini-batch at a time.
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    source: str = "<memory>"
    fingerprint: str = ""

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            images, labels = getattr(self, f"{split}_images"), getattr(self, f"{split}_labels")
            if images.ndim != 3 or labels.shape != images.shape[:1]:
                raise DataError(
                    self.source,
                    f"{split} images {images.shape} and labels {labels.shape} do not match "
                    "(expected (N, H, W) and (N,))",
                )
        if not self.fingerprint:
            object.__setattr__(self, "fingerprint", fingerprint(self.arrays()))

    def arrays(self) -> dict[str, np.ndarray]:
        return {part: getattr(self, part) for part in FILES}

    @property
    def num_train(self) -> int:
        return len(self.train_labels)

    @property
    def num_test(self) -> int:
        return len(self.test_labels)

    def subset(self, train: int | None = None, test: int | None = None) -> Dataset:
        """The first ``train`` / ``test`` samples (a view, not a copy), re-fingerprinted."""
        return Dataset(
            self.train_images[:train], self.train_labels[:train],
            self.test_images[:test], self.test_labels[:test],
            source=f"{self.source}[:{train},:{test}]",
        )


def load(
    data_dir: str | os.PathLike | None = None,
    *,
    limit: int | None = None,
    test_limit: int | None = None,
    env: Mapping[str, str] | None = None,
) -> Dataset:
    """Load Fashion-MNIST from ``data_dir`` (default: :func:`find_data_dir`).

    ``limit`` / ``test_limit`` read only the first samples of each split (fast for tests).

    Raises:
        DataNotFound: no directory holds the files.
        DataError: a file is malformed or has an unexpected shape; names the file.
    """
    d = Path(data_dir) if data_dir is not None else find_data_dir(env)
    arrays = {}
    for part, name in FILES.items():
        n = test_limit if part.startswith("test") else limit
        a = read_idx(d / name, limit=n)
        want = EXPECTED_SHAPES[part]
        if a.shape[1:] != want[1:] or a.dtype != np.uint8:
            raise DataError(d / name, f"shape {a.shape} dtype {a.dtype}; expected (N, {want[1:]}) uint8")
        if part.endswith("labels") and a.size and int(a.max()) >= NUM_CLASSES:
            raise DataError(d / name, f"label {int(a.max())} out of range 0..{NUM_CLASSES - 1}")
        arrays[part] = a
    suffix = "" if limit is None and test_limit is None else f"[:{limit},:{test_limit}]"
    return Dataset(**arrays, source=f"{d}{suffix}")


# -- CLI: `python -m dmlsys.train.data ensure` --------------------------------------------------


def ensure(*, allow_download: bool = False, check: bool = False) -> Path:
    """Return the data directory; download into the cache when allowed and nothing is found."""
    try:
        d = find_data_dir()
    except DataNotFound:
        if not allow_download:
            raise
        d = download()
    if check:
        verify(d)
    return d


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dmlsys.train.data",
        description="Make sure Fashion-MNIST is present, verify it, and describe it.",
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("ensure", help="find the data (or download it with --download) and print where")
    p.add_argument("--download", action="store_true", help="download into ~/.cache/dmlsys if missing")
    p.add_argument("--verify", action="store_true", help="check decompressed content against published MD5s")
    sub.add_parser("info", help="load the data and print shapes and fingerprint")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "ensure":
            print(ensure(allow_download=args.download, check=args.verify))
        else:
            ds = load()
            print(f"source      {ds.source}")
            print(f"train       {ds.train_images.shape} images, {ds.num_train} labels")
            print(f"test        {ds.test_images.shape} images, {ds.num_test} labels")
            print(f"fingerprint {ds.fingerprint}")
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
