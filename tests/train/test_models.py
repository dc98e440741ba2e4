"""Models built from architecture dicts: shapes, determinism, errors that list what is allowed."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from dmlsys.train import models
from dmlsys.train.errors import UnknownArchitecture

ARCHS = [
    {"kind": "mlp", "hidden": [32, 16]},
    {"kind": "mlp", "hidden": []},  # logistic regression
    {"kind": "cnn", "channels": [4, 8], "dense": 16},
    {"kind": "cnn", "channels": [2, 2, 2], "dense": 8},
]


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"{a['kind']}{a.get('hidden', a.get('channels'))}")
def test_logits_have_one_row_per_image_and_ten_columns_for_both_input_layouts(arch):
    m = models.build(arch)
    params = jax.jit(m.init)(jax.random.PRNGKey(0))
    x = np.random.default_rng(0).random((5, 28, 28), dtype=np.float32)
    apply = jax.jit(m.apply)  # one compilation instead of one per primitive
    logits = apply(params, x)
    assert logits.shape == (5, models.NUM_CLASSES) and logits.dtype == np.float32
    np.testing.assert_allclose(apply(params, x.reshape(5, 784)), logits, rtol=1e-5, atol=1e-5)


def test_init_is_a_function_of_the_key():
    m = models.build({"kind": "mlp", "hidden": [8]})
    a, b, c = (m.init(jax.random.PRNGKey(k)) for k in (1, 1, 2))
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, a, b))
    assert not np.array_equal(a["dense0"]["w"], c["dense0"]["w"])
    assert models.num_params(a) == 784 * 8 + 8 + 8 * 10 + 10


def test_defaults_are_filled_into_the_normalised_arch():
    assert models.build({"kind": "cnn"}).arch == {"kind": "cnn", "channels": [32, 64], "dense": 128}
    assert models.build({"kind": "mlp", "hidden": (64,)}).arch == {"kind": "mlp", "hidden": [64]}


def test_unknown_kind_lists_the_known_kinds():
    with pytest.raises(UnknownArchitecture, match="unknown model kind 'resnet'; known kinds: cnn, mlp"):
        models.build({"kind": "resnet"})


def test_unknown_field_is_named_with_the_allowed_fields():
    with pytest.raises(UnknownArchitecture, match=r"unknown field\(s\) \['dropout'\].*allowed: \['hidden'\]"):
        models.build({"kind": "mlp", "dropout": 0.5})


@pytest.mark.parametrize("arch", [{"kind": "mlp", "hidden": [0]}, {"kind": "mlp", "hidden": "64"},
                                  {"kind": "cnn", "channels": []}, {"kind": "cnn", "dense": True},
                                  {"kind": "cnn", "channels": [1, 1, 1, 1, 1]}])
def test_invalid_sizes_are_refused(arch):
    with pytest.raises(UnknownArchitecture):
        models.build(arch)


def test_labels_are_the_ten_fashion_mnist_classes():
    assert len(models.LABELS) == 10 and models.LABELS[0] == "T-shirt/top" and models.LABELS[9] == "Ankle boot"
