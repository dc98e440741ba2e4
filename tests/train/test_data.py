"""Locating, verifying, downloading and loading Fashion-MNIST; the content fingerprint."""

from __future__ import annotations

import gzip
import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from dmlsys.train import data
from dmlsys.train.errors import ChecksumMismatch, DataError, DataNotFound
from dmlsys.train.idx import write_idx


def make_fake_dir(d: Path, n_train: int = 20, n_test: int = 10, seed: int = 0, level: int = 9) -> Path:
    """Four small IDX .gz files shaped like Fashion-MNIST."""
    rng = np.random.default_rng(seed)
    d.mkdir(parents=True, exist_ok=True)
    parts = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, n_train, dtype=np.uint8),
        "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for part, a in parts.items():
        write_idx(d / data.FILES[part], a, compress=False)
        raw = (d / data.FILES[part]).read_bytes()
        (d / data.FILES[part]).write_bytes(gzip.compress(raw, compresslevel=level))
    return d


@pytest.fixture
def no_system_data(monkeypatch, tmp_path):
    """Point the system and cache locations at empty directories."""
    monkeypatch.setattr(data, "SYSTEM_DIR", tmp_path / "system")
    monkeypatch.setattr(data, "CACHE_DIR", tmp_path / "cache")


def test_env_dir_wins_over_system_and_cache(tmp_path, no_system_data):
    env_dir = make_fake_dir(tmp_path / "env")
    make_fake_dir(tmp_path / "cache", seed=1)
    assert data.find_data_dir({"DMLSYS_DATA": str(env_dir)}) == env_dir
    assert data.find_data_dir({}) == tmp_path / "cache"


def test_missing_data_lists_every_place_searched_and_the_fix(tmp_path, no_system_data):
    (tmp_path / "env").mkdir()
    (tmp_path / "env" / data.FILES["train_images"]).write_bytes(b"")  # 1 of 4 is not enough
    with pytest.raises(DataNotFound) as info:
        data.find_data_dir({"DMLSYS_DATA": str(tmp_path / "env")})
    msg = str(info.value)
    assert str(tmp_path / "env") in msg and str(tmp_path / "system") in msg and "--download" in msg


def test_load_reads_shapes_and_limits(tmp_path):
    d = make_fake_dir(tmp_path)
    ds = data.load(d)
    assert ds.train_images.shape == (20, 28, 28) and ds.test_labels.shape == (10,)
    small = data.load(d, limit=5, test_limit=3)
    assert (small.num_train, small.num_test) == (5, 3)
    np.testing.assert_array_equal(small.train_images, ds.train_images[:5])


def test_wrong_image_shape_names_the_file(tmp_path):
    d = make_fake_dir(tmp_path)
    write_idx(d / data.FILES["test_images"], np.zeros((10, 27, 28), np.uint8), compress=True)
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz: shape"):
        data.load(d)


def test_out_of_range_label_names_the_file(tmp_path):
    d = make_fake_dir(tmp_path)
    write_idx(d / data.FILES["train_labels"], np.full(20, 10, np.uint8), compress=True)
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz: label 10"):
        data.load(d)


def test_fingerprint_depends_on_content_not_gzip_packaging(tmp_path):
    a = data.load(make_fake_dir(tmp_path / "a", level=1))
    b = data.load(make_fake_dir(tmp_path / "b", level=9))
    assert (tmp_path / "a" / data.FILES["train_images"]).read_bytes() != (
        tmp_path / "b" / data.FILES["train_images"]).read_bytes()
    assert a.fingerprint == b.fingerprint == data.load(tmp_path / "a").fingerprint
    assert data.load(make_fake_dir(tmp_path / "c", seed=5)).fingerprint != a.fingerprint


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 4 * 28 * 28 - 1), st.integers(1, 255))
def test_fingerprint_changes_when_any_pixel_changes(pos, delta):
    imgs = np.zeros((4, 28, 28), np.uint8)
    labels = np.zeros(4, np.uint8)
    base = data.fingerprint({"x": imgs, "y": labels})
    changed = imgs.copy()
    changed.reshape(-1)[pos] = delta
    assert data.fingerprint({"x": changed, "y": labels}) != base
    assert data.fingerprint({"x": imgs.copy(), "y": labels.copy()}) == base


def test_verify_file_accepts_the_right_digest_and_names_the_file_otherwise(tmp_path):
    path = tmp_path / "f.gz"
    path.write_bytes(gzip.compress(b"hello"))
    data.verify_file(path, hashlib.md5(path.read_bytes()).hexdigest())
    data.verify_file(path, hashlib.md5(b"hello").hexdigest(), decompress=True)
    data.verify_file(path, hashlib.sha256(path.read_bytes()).hexdigest(), algorithm="sha256")
    with pytest.raises(ChecksumMismatch) as info:
        data.verify_file(path, "0" * 32)
    assert str(path) in str(info.value) and "0" * 32 in str(info.value)
    assert info.value.actual == hashlib.md5(path.read_bytes()).hexdigest()


class FakeServer:
    """Stands in for urlopen: serves bytes by file name, records the URLs asked for."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files, self.urls = files, []

    def __call__(self, url: str, timeout: float):
        self.urls.append(url)
        return io.BytesIO(self.files[url.rsplit("/", 1)[1]])


def test_download_verifies_and_installs_all_four_files(tmp_path, monkeypatch):
    payload = {name: gzip.compress(name.encode()) for name in data.FILES.values()}
    monkeypatch.setattr(data, "GZ_MD5", {n: hashlib.md5(b).hexdigest() for n, b in payload.items()})
    server = FakeServer(payload)
    out = data.download(tmp_path / "cache", base_url="http://example.invalid/fm/", urlopen=server)
    assert sorted(p.name for p in out.iterdir()) == sorted(data.FILES.values())
    assert server.urls[0].startswith("http://example.invalid/fm/")
    data.download(tmp_path / "cache", urlopen=server)  # valid files are kept, not fetched again
    assert len(server.urls) == 4


def test_corrupt_download_raises_and_leaves_nothing_behind(tmp_path, monkeypatch):
    payload = {name: b"evil" for name in data.FILES.values()}
    with pytest.raises(ChecksumMismatch, match="train-images-idx3-ubyte.gz"):
        data.download(tmp_path / "cache", urlopen=FakeServer(payload))
    assert list((tmp_path / "cache").iterdir()) == []


def test_real_data_matches_published_content_checksums(small_ds):
    d = data.find_data_dir()
    data.verify(d)
    assert small_ds.train_images.dtype == np.uint8 and small_ds.train_images.shape == (3000, 28, 28)
    assert set(np.unique(small_ds.train_labels)) == set(range(10))


def test_cli_ensure_prints_the_data_dir(small_ds, capsys):
    assert data.main(["ensure"]) == 0
    assert capsys.readouterr().out.strip() == str(data.find_data_dir())
