"""The building blocks of `xlstm_eqx.nn` against NumPy float64 implementations of their
equations."""

import math

import equinox as eqx
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from xlstm_eqx.core import count_params
from xlstm_eqx.nn import (
    ACTIVATIONS,
    CausalConv1d,
    Dense,
    DenseGeneral,
    Embedding,
    FeedForward,
    FeedForwardConfig,
    LayerNorm,
    LinearHeadwiseExpand,
    MultiHeadNorm,
    RMSNorm,
    bias_linspace_init,
    dropout,
    get_activation,
    init_array,
    make_norm,
    output_initializer,
    sigmoid,
    silu,
    small_init_std,
    soft_cap,
    wang_std,
)


def f64(x):
    return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


def rand(key, shape, scale=1.0):
    return scale * jr.normal(key, shape, jnp.float32)


# ------------------------------------------------------------------------------------------------
# initialisers


def test_init_std_formulas():
    assert small_init_std(768) == pytest.approx(math.sqrt(2 / (5 * 768)))
    assert wang_std(768, 24) == pytest.approx(2 / (24 * math.sqrt(768)))


@pytest.mark.parametrize(
    "distribution, ratio",
    [("normal", 1.0), ("uniform", 1.0), ("truncated_normal", 0.8796)],
)
def test_init_distributions_std(distribution, ratio):
    std = 0.05
    x = np.asarray(init_array(jr.key(0), (200_000,), std, distribution))
    assert x.dtype == np.float32
    assert abs(x.mean()) < 1e-3
    assert x.std() == pytest.approx(ratio * std, rel=0.02)
    if distribution == "uniform":
        assert np.abs(x).max() <= math.sqrt(3) * std + 1e-7
        assert np.abs(x).max() > 0.99 * math.sqrt(3) * std
    if distribution == "truncated_normal":
        assert np.abs(x).max() <= 2 * std + 1e-7


def test_output_initializers():
    key = jr.key(1)
    shape = (400, 500)
    wang = np.asarray(output_initializer("wang", 64, 4)(key, shape))
    wang2 = np.asarray(output_initializer("wang2", 64, 4)(key, shape))
    small = np.asarray(output_initializer("small", 64, 4)(key, shape))
    assert wang.std() == pytest.approx(2 / (4 * 8), rel=0.02)
    assert wang2.std() == pytest.approx(2 / (8 * 8), rel=0.02)
    assert small.std() == pytest.approx(math.sqrt(2 / (5 * 64)), rel=0.02)
    assert not np.any(np.asarray(output_initializer("zeros", 64, 4)(key, shape)))
    with pytest.raises(ValueError, match="output_init_fn"):
        output_initializer("bogus", 64, 4)
    with pytest.raises(ValueError, match="init distribution"):
        init_array(key, (3,), 1.0, "cauchy")


def test_bias_linspace_init():
    key = jr.key(0)
    np.testing.assert_allclose(bias_linspace_init((3.0, 6.0), 4, key=key), [3, 4, 5, 6])
    np.testing.assert_allclose(bias_linspace_init(-10.0, 3, key=key), [-10, -10, -10])
    b = bias_linspace_init(None, 10_000, key=key)
    assert float(jnp.std(b)) == pytest.approx(0.1, rel=0.05)


# ------------------------------------------------------------------------------------------------
# dense layers


def test_dense_matches_numpy(getkey):
    layer = Dense(5, 3, use_bias=True, key=getkey())
    layer = eqx.tree_at(lambda m: m.bias, layer, rand(getkey(), (3,)))
    x = rand(getkey(), (2, 4, 5))
    expected = f64(x) @ f64(layer.kernel) + f64(layer.bias)
    np.testing.assert_allclose(f64(layer(x)), expected, rtol=1e-5, atol=1e-6)
    assert layer.kernel.shape == (5, 3)  # Flax (in, out) layout


def test_dense_compute_dtype(getkey):
    layer = Dense(8, 4, dtype="bfloat16", key=getkey())
    assert layer.kernel.dtype == jnp.float32  # parameters stay float32
    y = layer(rand(getkey(), (3, 8)))
    assert y.dtype == jnp.bfloat16


def test_dense_general_matches_numpy(getkey):
    qkv = DenseGeneral(6, (2, 3), use_bias=True, key=getkey())
    out = DenseGeneral((2, 3), 6, key=getkey())
    x = rand(getkey(), (2, 5, 6))
    h = qkv(x)
    assert h.shape == (2, 5, 2, 3)
    np.testing.assert_allclose(
        f64(h), np.einsum("bsd,dnh->bsnh", f64(x), f64(qkv.kernel)), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        f64(out(h)), np.einsum("bsnh,nhd->bsd", f64(h), f64(out.kernel)), rtol=1e-5, atol=1e-6
    )
    with pytest.raises(ValueError, match="trailing input dims"):
        out(x)


@hypothesis.given(
    num_blocks=st.sampled_from([1, 2, 4]),
    in_per=st.integers(1, 3),
    out_per=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
@hypothesis.settings(max_examples=6)
def test_headwise_is_block_diagonal(num_blocks, in_per, out_per, seed):
    k1, k2 = jr.split(jr.key(seed))
    d_in, d_out = num_blocks * in_per, num_blocks * out_per
    layer = LinearHeadwiseExpand(d_in, num_blocks, d_out, key=k1)
    assert layer.kernel.shape == (num_blocks, out_per, in_per)  # out before in
    x = rand(k2, (3, d_in))
    # Independent form: one (in, out) block-diagonal matrix.
    w = np.zeros((d_in, d_out))
    kern = f64(layer.kernel)
    for p in range(num_blocks):
        w[p * in_per : (p + 1) * in_per, p * out_per : (p + 1) * out_per] = kern[p].T
    np.testing.assert_allclose(f64(layer(x)), f64(x) @ w, rtol=1e-5, atol=1e-6)


def test_headwise_rejects_bad_sizes(getkey):
    with pytest.raises(ValueError, match="in_features=6 .*num_blocks=4"):
        LinearHeadwiseExpand(6, 4, key=getkey())


def test_embedding_and_tied_head(getkey):
    emb = Embedding(10, 4, dtype="bfloat16", key=getkey())
    tokens = jnp.array([[1, 9, 0]])
    x = emb(tokens)
    assert x.dtype == jnp.bfloat16
    np.testing.assert_array_equal(f64(x), f64(emb.embedding.astype(jnp.bfloat16))[[1, 9, 0]][None])
    logits = emb.attend(rand(getkey(), (2, 4)), "float32")
    assert logits.shape == (2, 10) and logits.dtype == jnp.float32


# ------------------------------------------------------------------------------------------------
# causal conv


def conv_numpy(x, kernel, bias):
    """y[t, c] = b[c] + Σ_j W[j, c] x[t − (K−1) + j, c], x[<0] = 0."""
    K = kernel.shape[0]
    B, S, C = x.shape
    y = np.zeros((B, S, C)) + bias
    for t in range(S):
        for j in range(K):
            src = t - (K - 1) + j
            if src >= 0:
                y[:, t] += kernel[j] * x[:, src]
    return y


@hypothesis.given(K=st.integers(1, 5), S=st.integers(1, 9), seed=st.integers(0, 2**16))
@hypothesis.settings(max_examples=5)
def test_causal_conv_matches_numpy(K, S, seed):
    k1, k2 = jr.split(jr.key(seed))
    conv = CausalConv1d(3, K, key=k1)
    assert conv.kernel.shape == (K, 3)
    bound = 1 / math.sqrt(K)
    assert float(jnp.max(jnp.abs(conv.kernel))) <= bound
    x = rand(k2, (2, S, 3))
    np.testing.assert_allclose(
        f64(conv(x)), conv_numpy(f64(x), f64(conv.kernel), f64(conv.bias)), rtol=1e-5, atol=1e-6
    )


def test_causal_conv_identity_and_decode(getkey):
    ident = CausalConv1d(3, 0, key=getkey())
    x = rand(getkey(), (2, 7, 3))
    assert ident(x) is x and count_params(ident) == 0
    conv = CausalConv1d(3, 4, key=getkey())
    full = conv(x)
    state = conv.init_state(2)
    outs = []
    for t in range(7):
        y, state = conv.step(state, x[:, t])
        outs.append(y)
    np.testing.assert_allclose(f64(jnp.stack(outs, 1)), f64(full), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(f64(conv.state_from_sequence(x)), f64(state))


# ------------------------------------------------------------------------------------------------
# norms


def layer_norm_numpy(x, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps)


def rms_norm_numpy(x, eps):
    return x / np.sqrt((x**2).mean(-1, keepdims=True) + eps)


@pytest.mark.parametrize("norm_type", ["layernorm", "rmsnorm"])
def test_norms_match_numpy(norm_type, getkey):
    eps = 1e-5
    norm = make_norm(norm_type, 6, eps=eps, use_bias=True)
    assert isinstance(norm, LayerNorm if norm_type == "layernorm" else RMSNorm)
    norm = eqx.tree_at(
        lambda n: (n.scale, n.bias), norm, (rand(getkey(), (6,)), rand(getkey(), (6,)))
    )
    x = rand(getkey(), (2, 3, 6), scale=3.0) + 1.0
    fn = layer_norm_numpy if norm_type == "layernorm" else rms_norm_numpy
    expected = fn(f64(x), eps) * f64(norm.scale) + f64(norm.bias)
    np.testing.assert_allclose(f64(norm(x)), expected, rtol=1e-4, atol=1e-5)


def test_norm_bf16_stats_in_float32(getkey):
    norm = make_norm("layernorm", 64, dtype="bfloat16")
    x = (rand(getkey(), (4, 64)) + 100.0).astype(jnp.bfloat16)
    y = norm(x)
    assert y.dtype == jnp.bfloat16
    expected = layer_norm_numpy(f64(x.astype(jnp.float32)), 1e-6)
    np.testing.assert_allclose(f64(y.astype(jnp.float32)), expected, atol=0.05)


def test_layer_norm_constant_input_is_finite():
    # fast variance E[x²] − E[x]² can go slightly negative: it is clamped at 0.
    y = make_norm("layernorm", 8)(jnp.full((8,), 1234.567, jnp.float32))
    assert np.all(np.isfinite(np.asarray(y)))


@pytest.mark.parametrize("norm_type", ["layernorm", "rmsnorm"])
def test_multihead_norm_is_groupnorm(norm_type, getkey):
    NH, DH = 3, 4
    norm = MultiHeadNorm(NH, DH, norm_type=norm_type, eps=1e-6)
    assert norm.scale.shape == (NH, DH)
    norm = eqx.tree_at(lambda n: n.scale, norm, rand(getkey(), (NH, DH)))
    x = rand(getkey(), (2, 5, NH, DH))
    # GroupNorm with NH groups over the flattened NH·DH features, per-channel affine.
    flat = f64(x).reshape(2, 5, NH * DH)
    fn = layer_norm_numpy if norm_type == "layernorm" else rms_norm_numpy
    groups = [fn(flat[..., h * DH : (h + 1) * DH], 1e-6) for h in range(NH)]
    expected = np.concatenate(groups, -1) * f64(norm.scale).reshape(-1)
    np.testing.assert_allclose(f64(norm(x)).reshape(2, 5, -1), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 5, 3, 8), (7, 16)])
def test_layer_norm_backward_matches_autodiff(shape, getkey):
    # The layernorm's written-out backward (nn/norm.py) against autodiff of a plain two-pass
    # layer norm: gradients of x, scale and bias, for the per-head norm and a plain LayerNorm.
    if len(shape) == 4:
        norm = MultiHeadNorm(shape[-2], shape[-1], norm_type="layernorm", use_bias=True)
    else:
        norm = make_norm("layernorm", shape[-1], use_bias=True)
    norm = eqx.tree_at(lambda n: (n.scale, n.bias), norm, (rand(getkey(), norm.scale.shape),) * 2)
    x = rand(getkey(), shape, scale=3.0) + 1.5
    weights = rand(getkey(), shape)

    def reference(params, inputs):
        scale, bias = params
        mean = jnp.mean(inputs, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(inputs - mean), axis=-1, keepdims=True)
        return jnp.sum(((inputs - mean) / jnp.sqrt(var + 1e-6) * scale + bias) * weights)

    def ours(params, inputs):
        n = eqx.tree_at(lambda m: (m.scale, m.bias), norm, params)
        return jnp.sum(n(inputs) * weights)

    params = (norm.scale, norm.bias)
    got = jax.grad(ours, argnums=(0, 1))(params, x)
    want = jax.grad(reference, argnums=(0, 1))(params, x)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=2e-4, atol=2e-4)


def test_layer_norm_backward_keeps_input_dtype(getkey):
    norm = make_norm("layernorm", 8, dtype="bfloat16")
    x = rand(getkey(), (4, 8)).astype(jnp.bfloat16)
    grad = jax.grad(lambda inputs: jnp.sum(norm(inputs).astype(jnp.float32)))(x)
    assert grad.dtype == jnp.bfloat16
    assert np.all(np.isfinite(np.asarray(grad, np.float32)))


def test_unknown_norm_type():
    with pytest.raises(ValueError, match="norm_type"):
        make_norm("batchnorm", 4)


# ------------------------------------------------------------------------------------------------
# functions


def test_sigmoid_and_silu_match_float64(getkey):
    # sigmoid is computed as tanh(x/2)/2 + 1/2 (nn/functional.py); against the logistic in
    # float64, values and gradients, including large |x| where it saturates.
    x = jnp.concatenate(
        [rand(getkey(), (512,), scale=6.0), jnp.array([-80.0, -20.0, 0.0, 20.0, 80.0])]
    )
    x64 = f64(x)
    expected = 1.0 / (1.0 + np.exp(-x64))
    # absolute error within float32 rounding of 1: below x ≈ -16 (logistic < 1.2e-7) it is 0
    np.testing.assert_allclose(f64(sigmoid(x)), expected, rtol=1e-6, atol=2e-7)
    np.testing.assert_allclose(f64(silu(x)), x64 * expected, rtol=1e-6, atol=5e-6)
    grad = jax.vmap(jax.grad(silu))(x)
    np.testing.assert_allclose(
        f64(grad), expected * (1 + x64 * (1 - expected)), rtol=1e-5, atol=5e-6
    )
    bf16 = sigmoid(x.astype(jnp.bfloat16))
    assert bf16.dtype == jnp.bfloat16
    np.testing.assert_allclose(f64(bf16.astype(jnp.float32)), expected, atol=1e-2)


@hypothesis.given(
    x=st.lists(st.floats(-1e4, 1e4), min_size=1, max_size=8),
    cap=st.floats(0.5, 50.0),
)
def test_soft_cap(x, cap):
    y = f64(soft_cap(jnp.asarray(x, jnp.float32), cap))
    np.testing.assert_allclose(y, cap * np.tanh(np.asarray(x) / cap), rtol=1e-5, atol=1e-5)
    assert np.all(np.abs(y) <= cap * (1 + 1e-6))
    np.testing.assert_array_equal(f64(soft_cap(jnp.asarray(x, jnp.float32), None)), np.float32(x))


def test_activation_registry():
    x = np.linspace(-4, 4, 33)
    sig = 1 / (1 + np.exp(-x))
    expected = {
        "gelu": 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3))),
        "relu": np.maximum(x, 0),
        "relu^2": np.maximum(x, 0) ** 2,
        "sigmoid": sig,
        "swish": x * sig,
        "selu": 1.0507009873554805 * np.where(x > 0, x, 1.6732632423543772 * (np.exp(x) - 1)),
    }
    assert set(ACTIVATIONS) == set(expected)
    for name, value in expected.items():
        got = f64(get_activation(name)(jnp.asarray(x, jnp.float32)))
        np.testing.assert_allclose(got, value, rtol=1e-5, atol=1e-5, err_msg=name)
    with pytest.raises(ValueError, match="unknown activation 'tanhh'"):
        get_activation("tanhh")


def test_dropout_only_with_key():
    x = jnp.ones((1000,), jnp.float32)
    assert dropout(x, 0.5, key=None) is x
    assert dropout(x, 0.0, key=jr.key(0)) is x
    y = np.asarray(dropout(x, 0.25, key=jr.key(0)))
    kept = y != 0
    assert 0.7 < kept.mean() < 0.8
    np.testing.assert_allclose(y[kept], 1 / 0.75, rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# feed-forward


def _ffn_config(**kw):
    """D = 8 and F = `_proj_up_dim` = 12 (1.5 * 8 rounded to a multiple of 4) unless overridden."""
    base = dict(
        embedding_dim=8,
        proj_factor=1.5,
        round_proj_up_to_multiple_of=4,
        ff_type="ffn_gated",
        act_fn="swish",
        dtype="float32",
        _num_blocks=3,
    )
    return FeedForwardConfig(**{**base, **kw})


@pytest.mark.parametrize("ff_type", ["ffn_gated", "ffn"])
def test_feedforward_matches_numpy(ff_type, getkey):
    ffn = FeedForward(_ffn_config(ff_type=ff_type, act_fn="gelu"), key=getkey())
    x = rand(getkey(), (2, 3, 8))
    xn = f64(x)
    act = lambda a: 0.5 * a * (1 + np.tanh(np.sqrt(2 / np.pi) * (a + 0.044715 * a**3)))  # noqa: E731
    up = xn @ f64(ffn.proj_up.kernel)
    if ff_type == "ffn_gated":
        h = act(xn @ f64(ffn.proj_up_gate.kernel)) * up
    else:
        assert ffn.proj_up_gate is None
        h = act(up)
    np.testing.assert_allclose(f64(ffn(x)), h @ f64(ffn.proj_down.kernel), rtol=1e-4, atol=1e-6)


def test_feedforward_init_scales():
    config = _ffn_config(embedding_dim=256, proj_factor=2.0, _num_blocks=2)
    assert config._proj_up_dim == 512
    ffn = FeedForward(config, key=jr.key(0))
    assert float(jnp.std(ffn.proj_up.kernel)) == pytest.approx(math.sqrt(2 / (5 * 256)), rel=0.03)
    assert float(jnp.std(ffn.proj_down.kernel)) == pytest.approx(2 / (2 * 16), rel=0.03)


# ------------------------------------------------------------------------------------------------
# parameter counting


class _WithBuffer(eqx.Module):
    weight: jax.Array
    table: jax.Array
    _buffer_fields = ("table",)


def test_count_params_skips_buffers_and_works_on_skeletons():
    m = _WithBuffer(jnp.zeros((3, 4)), jnp.zeros((100,)))
    assert count_params(m) == 12
    nested = (m, [Dense(4, 2, use_bias=True, key=jr.key(0))], {"x": jnp.zeros(5)})
    assert count_params(nested) == 12 + 10 + 5
    skeleton = eqx.filter_eval_shape(Dense, 7, 3, use_bias=True, key=jr.key(0))
    assert isinstance(skeleton.kernel, jax.ShapeDtypeStruct)
    assert count_params(skeleton) == 7 * 3 + 3
