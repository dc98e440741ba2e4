"""Fashion-MNIST classifiers in pure JAX, built from a plain architecture dict.

An architecture is data (it goes into the model card as JSON, and serving rebuilds the
model from it)::

    {"kind": "mlp", "hidden": [256, 128]}
    {"kind": "cnn", "channels": [32, 64], "dense": 128}

``build(arch)`` returns a :class:`Model` whose ``init(rng)`` makes the parameters, a nested
dict of arrays (``{"dense0": {"w": ..., "b": ...}, ..., "out": {...}}``), and whose
``apply(params, x)`` maps a float32 batch ``(B, 28, 28)`` or ``(B, 784)`` to logits ``(B, 10)``.
No framework beyond ``jax.numpy`` and ``jax.lax``: a layer is two arrays and one line.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .errors import UnknownArchitecture

LABELS = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
NUM_CLASSES = len(LABELS)
IMAGE_SHAPE = (28, 28)

Params = dict[str, dict[str, Any]]

# kind -> default fields; an arch may override these and nothing else.
DEFAULTS: dict[str, dict[str, Any]] = {
    "mlp": {"hidden": [256, 128]},
    "cnn": {"channels": [32, 64], "dense": 128},
}
KINDS = sorted(DEFAULTS)


@dataclasses.dataclass(frozen=True)
class Model:
    """A built architecture: ``init(rng) -> params`` and ``apply(params, x) -> logits``."""

    arch: dict[str, Any]  # normalised: every field present
    init: Callable[[jax.Array], Params]
    apply: Callable[[Params, jax.Array], jax.Array]


def _dense_init(key: jax.Array, fan_in: int, fan_out: int) -> dict[str, jax.Array]:
    # He initialisation: keeps activations' variance steady through ReLU layers.
    w = jax.random.normal(key, (fan_in, fan_out), jnp.float32) * math.sqrt(2.0 / fan_in)
    return {"w": w, "b": jnp.zeros((fan_out,), jnp.float32)}


def _conv_init(key: jax.Array, c_in: int, c_out: int, k: int = 3) -> dict[str, jax.Array]:
    fan_in = k * k * c_in
    w = jax.random.normal(key, (k, k, c_in, c_out), jnp.float32) * math.sqrt(2.0 / fan_in)
    return {"w": w, "b": jnp.zeros((c_out,), jnp.float32)}


def _check_ints(arch: dict, field: str, value: Any, *, allow_empty: bool = True) -> list[int]:
    items = value if isinstance(value, (list, tuple)) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in items) or (
        not items and not allow_empty
    ):
        raise UnknownArchitecture(f"arch {arch}: {field!r} must be positive integers, got {value!r}")
    return list(items)


def normalize(arch: dict[str, Any]) -> dict[str, Any]:
    """Fill defaults and validate; the result is what goes into a model card.

    Raises:
        UnknownArchitecture: unknown kind (listing the known ones) or unknown / invalid fields.
    """
    if not isinstance(arch, dict) or arch.get("kind") not in DEFAULTS:
        kind = arch.get("kind") if isinstance(arch, dict) else arch
        raise UnknownArchitecture(f"unknown model kind {kind!r}; known kinds: {', '.join(KINDS)}")
    defaults = DEFAULTS[arch["kind"]]
    extra = set(arch) - set(defaults) - {"kind"}
    if extra:
        raise UnknownArchitecture(
            f"arch {arch}: unknown field(s) {sorted(extra)} for kind {arch['kind']!r}; "
            f"allowed: {sorted(defaults)}"
        )
    out = {"kind": arch["kind"], **defaults, **{k: v for k, v in arch.items() if k != "kind"}}
    if out["kind"] == "mlp":
        out["hidden"] = _check_ints(arch, "hidden", out["hidden"])
    else:
        out["channels"] = _check_ints(arch, "channels", out["channels"], allow_empty=False)
        if len(out["channels"]) > 4:  # 28 -> 14 -> 7 -> 3 -> 1: a fifth pool has nothing left
            raise UnknownArchitecture(f"arch {arch}: at most 4 conv layers fit a 28x28 image")
        out["dense"] = _check_ints(arch, "dense", out["dense"])[0]
    return out


def _mlp(arch: dict[str, Any]) -> Model:
    sizes = [IMAGE_SHAPE[0] * IMAGE_SHAPE[1], *arch["hidden"]]

    def init(rng: jax.Array) -> Params:
        keys = jax.random.split(rng, len(sizes))
        params = {f"dense{i}": _dense_init(keys[i], a, b) for i, (a, b) in enumerate(zip(sizes, sizes[1:]))}
        params["out"] = _dense_init(keys[-1], sizes[-1], NUM_CLASSES)
        return params

    def apply(params: Params, x: jax.Array) -> jax.Array:
        h = x.reshape(x.shape[0], -1)
        for i in range(len(sizes) - 1):
            layer = params[f"dense{i}"]
            h = jax.nn.relu(h @ layer["w"] + layer["b"])
        return h @ params["out"]["w"] + params["out"]["b"]

    return Model(arch, init, apply)


def _maxpool2(h: jax.Array) -> jax.Array:
    # 2x2 max pooling as reshape + max: much faster than reduce_window on CPU.
    b, hh, ww, c = h.shape
    h = h[:, : hh - hh % 2, : ww - ww % 2, :]
    return h.reshape(b, hh // 2, 2, ww // 2, 2, c).max(axis=(2, 4))


def _cnn(arch: dict[str, Any]) -> Model:
    channels = arch["channels"]
    side = IMAGE_SHAPE[0]
    for _ in channels:
        side //= 2
    flat = side * side * channels[-1]

    def init(rng: jax.Array) -> Params:
        keys = jax.random.split(rng, len(channels) + 2)
        c_in = [1, *channels]
        params = {f"conv{i}": _conv_init(keys[i], c_in[i], c) for i, c in enumerate(channels)}
        params["dense0"] = _dense_init(keys[-2], flat, arch["dense"])
        params["out"] = _dense_init(keys[-1], arch["dense"], NUM_CLASSES)
        return params

    def apply(params: Params, x: jax.Array) -> jax.Array:
        h = x.reshape(x.shape[0], *IMAGE_SHAPE, 1)  # NHWC
        for i in range(len(channels)):
            layer = params[f"conv{i}"]
            h = jax.lax.conv_general_dilated(
                h, layer["w"], window_strides=(1, 1), padding="SAME",
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
            )
            h = _maxpool2(jax.nn.relu(h + layer["b"]))
        h = h.reshape(h.shape[0], -1)
        h = jax.nn.relu(h @ params["dense0"]["w"] + params["dense0"]["b"])
        return h @ params["out"]["w"] + params["out"]["b"]

    return Model(arch, init, apply)


def build(arch: dict[str, Any]) -> Model:
    """Build the model an architecture dict describes (see the module docstring).

    Raises:
        UnknownArchitecture: unknown kind or invalid fields; the message lists what is allowed.
    """
    arch = normalize(arch)
    return _mlp(arch) if arch["kind"] == "mlp" else _cnn(arch)


def num_params(params: Params) -> int:
    return int(sum(np.prod(np.shape(leaf)) for leaf in jax.tree_util.tree_leaves(params)))
