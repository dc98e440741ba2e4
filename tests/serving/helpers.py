"""Shared pieces for the serving tests: a tiny model store, a fake runtime for simulated nodes."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np

from dmlsys.node import Member
from dmlsys.serving.runtime import Runtime

LABELS = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def mlp_params(seed: int, hidden: int = 16) -> dict:
    rng = np.random.default_rng(seed)
    return {"dense0": {"w": (rng.standard_normal((784, hidden)) / 28).astype(np.float32),
                       "b": np.zeros(hidden, np.float32)},
            "out": {"w": (rng.standard_normal((hidden, 10)) / 4).astype(np.float32), "b": np.zeros(10, np.float32)}}


def make_store(root: Path, model: str = "tiny", versions: int = 1, hidden: int = 16) -> Path:
    """A model store holding ``versions`` versions of a small MLP, in the trainer's format."""
    from dmlsys.train.store import ModelStore

    store = ModelStore(root)
    for v in range(versions):
        store.save(model, mlp_params(v, hidden), {"arch": {"kind": "mlp", "hidden": [hidden]}})
    return root


def fake_runtime(model: str, version: int) -> Runtime:
    """A numpy runtime whose scores say which version computed them (class = version % 10)."""

    def fn(x):
        s = np.full((x.shape[0], 10), 0.01, np.float32)
        s[:, version % 10] = 0.91
        return s

    return Runtime(model, version, {"version": version}, LABELS, (1, 2, 4, 8, 16, 32, 64), fn)


def body(n: int = 1, seed: int = 0) -> bytes:
    rng = random.Random(seed)
    return json.dumps({"instances": [[round(rng.random(), 4) for _ in range(784)] for _ in range(n)]}).encode()


def members(replicas: dict[str, str], gateway: str = "gw") -> list[Member]:
    """Directory entries: replica name -> model, plus a gateway (sim addresses)."""
    out = [Member(name, "replica", f"sim://{name}", config={"model": model}) for name, model in replicas.items()]
    return out + [Member(gateway, "gateway", f"sim://{gateway}")]
