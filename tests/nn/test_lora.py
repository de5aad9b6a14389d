"""LoRA layers (xlstm_eqx/nn/lora.py): the adapted layer is ``x W + b + alpha/r · x A B`` (a
float64 NumPy reference), equals its base at init (B = 0), and `merged` folds the adapter in."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from xlstm_eqx.nn.linear import Dense, DenseGeneral, LinearHeadwiseExpand
from xlstm_eqx.nn.lora import LoRADense, LoRADenseGeneral, LoRAHeadwise, lora_adapted


def _with_random_b(layer):
    """The layer with a non-zero B (as after training), so the adapter contributes."""
    b = 0.3 * jr.normal(jr.key(7), layer.lora_b.shape)
    return eqx.tree_at(lambda m: m.lora_b, layer, b)


def _f64(x):
    return np.asarray(x, np.float64)


def _dense_reference(x, kernel, bias, a, b, scale):
    y = _f64(x) @ _f64(kernel) + scale * (_f64(x) @ _f64(a)) @ _f64(b)
    return y if bias is None else y + _f64(bias)


def test_lora_dense_matches_float64_and_merges():
    base = Dense(12, 10, use_bias=True, key=jr.key(0))
    base = eqx.tree_at(lambda m: m.bias, base, jr.normal(jr.key(3), (10,)))
    layer = lora_adapted(base, rank=3, alpha=6.0, key=jr.key(1))
    assert isinstance(layer, LoRADense) and layer.scale == 2.0
    x = jr.normal(jr.key(2), (2, 5, 12))
    np.testing.assert_array_equal(layer(x), base(x))  # B starts at zero
    # A as PEFT's kaiming-uniform(a=sqrt(5)): within ±1/sqrt(in), spread over the range
    bound = 1 / math.sqrt(12)
    assert float(jnp.max(jnp.abs(layer.lora_a))) <= bound
    assert float(jnp.max(jnp.abs(layer.lora_a))) > 0.8 * bound
    layer = _with_random_b(layer)
    want = _dense_reference(x, base.kernel, base.bias, layer.lora_a, layer.lora_b, 2.0)
    np.testing.assert_allclose(layer(x), want, rtol=1e-5, atol=1e-5)
    merged = layer.merged()
    assert type(merged) is Dense
    np.testing.assert_allclose(merged(x), want, rtol=1e-5, atol=1e-5)


def test_lora_dense_general_matches_float64():
    base = DenseGeneral(8, (2, 3), key=jr.key(0))  # q/k/v-like: D -> (NH, hd)
    layer = _with_random_b(lora_adapted(base, rank=2, alpha=2.0, key=jr.key(1)))
    assert isinstance(layer, LoRADenseGeneral)
    assert layer.lora_a.shape == (8, 2) and layer.lora_b.shape == (2, 6)
    x = jr.normal(jr.key(2), (4, 8))
    flat = _dense_reference(x, base.kernel.reshape(8, 6), None, layer.lora_a, layer.lora_b, 1.0)
    np.testing.assert_allclose(layer(x), flat.reshape(4, 2, 3), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer.merged()(x), flat.reshape(4, 2, 3), rtol=1e-5, atol=1e-5)
    out = DenseGeneral((2, 3), 8, key=jr.key(4))  # the attention output: (NH, hd) -> D
    out_layer = _with_random_b(lora_adapted(out, rank=2, alpha=2.0, key=jr.key(5)))
    xo = jr.normal(jr.key(6), (4, 2, 3))
    np.testing.assert_allclose(out_layer.merged()(xo), out_layer(xo), rtol=1e-5, atol=1e-5)


def test_lora_headwise_stays_block_diagonal():
    base = LinearHeadwiseExpand(8, 2, 12, key=jr.key(0))
    layer = _with_random_b(lora_adapted(base, rank=2, alpha=4.0, key=jr.key(1)))
    assert isinstance(layer, LoRAHeadwise)
    x = jr.normal(jr.key(2), (3, 8))
    want = np.zeros((3, 12))
    for p in range(2):  # block p maps x[:, 4p:4p+4] to y[:, 6p:6p+6]
        xp = _f64(x[:, 4 * p : 4 * p + 4])
        w = _f64(base.kernel[p]).T + 2.0 * _f64(layer.lora_a[p]) @ _f64(layer.lora_b[p])
        want[:, 6 * p : 6 * p + 6] = xp @ w
    np.testing.assert_allclose(layer(x), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer.merged()(x), want, rtol=1e-5, atol=1e-5)


def test_stacked_layer_gets_stacked_adapters():
    """A layer built under vmap (scanned blocks) gets adapters with the same stacked axis; each
    slice is that layer's adapter."""
    stacked = jax.vmap(lambda k: Dense(6, 4, key=k))(jr.split(jr.key(0), 3))
    layer = _with_random_b(lora_adapted(stacked, rank=2, alpha=2.0, key=jr.key(1)))
    assert layer.lora_a.shape == (3, 6, 2) and layer.lora_b.shape == (3, 2, 4)
    x = jr.normal(jr.key(2), (5, 6))
    per_layer = jax.vmap(lambda m: m(x))(layer)
    merged = jax.vmap(lambda m: m(x))(layer.merged())
    np.testing.assert_allclose(merged, per_layer, rtol=1e-5, atol=1e-5)


def test_lora_rank_must_be_positive():
    with pytest.raises(ValueError, match="rank must be positive"):
        lora_adapted(Dense(4, 4, key=jr.key(0)), rank=0, alpha=1.0, key=jr.key(1))
