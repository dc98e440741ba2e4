"""Shared fixtures: a small slice of the real Fashion-MNIST, or a skip saying how to get it."""

from __future__ import annotations

import pytest

from dmlsys.train import data
from dmlsys.train.errors import DataNotFound


@pytest.fixture(scope="session")
def small_ds() -> data.Dataset:
    """3,000 training and 1,000 test samples (reads only those from the gzip files)."""
    try:
        return data.load(limit=3000, test_limit=1000)
    except DataNotFound as exc:
        pytest.skip(f"Fashion-MNIST not installed: {exc}")
