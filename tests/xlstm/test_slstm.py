"""sLSTM cell and layer (docs/architecture.md, "sLSTM") against independent float64 NumPy
computations."""

import equinox as eqx
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from xlstm_eqx.xlstm import (
    slstm_bias_init,
    sLSTMCell,
    sLSTMCellConfig,
    sLSTMLayer,
    sLSTMLayerConfig,
    sLSTMLayerState,
    sLSTMState,
)


# --------------------------------------------------------------------------------------------------
# Independent references (float64 NumPy, written from the equations)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _recurrent_input(y, R):
    """r[b, g, h, :] = y[b, h, :] @ R[h, :, g, :], one head and gate at a time."""
    B, NH, DH = y.shape
    r = np.zeros((B, 4, NH, DH))
    for h in range(NH):
        for g in range(4):
            r[:, g, h, :] = y[:, h, :] @ R[h, :, g, :]
    return r


def np_slstm_unstabilised(wx, R, b):
    """sLSTM without the stabiliser: c_t = σ(f̃) c + exp(ĩ) tanh(z̃), n_t = σ(f̃) n + exp(ĩ),
    y = σ(õ) c / n. Exact in float64 for moderate gates; m cancels from y in the stabilised form."""
    wx, R, b = (np.asarray(a, np.float64) for a in (wx, R, b))
    B, S, _, NH, DH = wx.shape
    y = c = n = np.zeros((B, NH, DH))
    ys = []
    for t in range(S):
        raw = wx[:, t] + _recurrent_input(y, R) + b.transpose(1, 0, 2)[None]
        i, f, z, o = raw[:, 0], raw[:, 1], raw[:, 2], raw[:, 3]
        c = _sigmoid(f) * c + np.exp(i) * np.tanh(z)
        n = _sigmoid(f) * n + np.exp(i)
        y = _sigmoid(o) * c / n
        ys.append(y)
    return np.stack(ys, axis=2)  # (B, NH, S, DH)


def np_slstm_stabilised(wx, R, b):
    """The stabilised recurrence (per-element first-step rule), float64, returning y and (c, n, m)."""
    wx, R, b = (np.asarray(a, np.float64) for a in (wx, R, b))
    B, S, _, NH, DH = wx.shape
    y = c = n = m = np.zeros((B, NH, DH))
    ys = []
    for t in range(S):
        raw = wx[:, t] + _recurrent_input(y, R) + b.transpose(1, 0, 2)[None]
        i, f, z, o = raw[:, 0], raw[:, 1], raw[:, 2], raw[:, 3]
        logf = -np.logaddexp(0.0, -f) + m
        m_new = np.where(n == 0.0, i, np.maximum(i, logf))
        ig = np.exp(i - m_new)
        fg = np.where(n == 0.0, 0.0, np.exp(np.minimum(logf - m_new, 0.0)))
        c = fg * c + ig * np.tanh(z)
        n = fg * n + ig
        m = m_new
        y = _sigmoid(o) * c / n
        ys.append(y)
    return np.stack(ys, axis=2), (c, n, m)


def np_lstm(wx, R, b):
    wx, R, b = (np.asarray(a, np.float64) for a in (wx, R, b))
    B, S, _, NH, DH = wx.shape
    y = c = np.zeros((B, NH, DH))
    ys = []
    for t in range(S):
        raw = wx[:, t] + _recurrent_input(y, R) + b.transpose(1, 0, 2)[None]
        i, f, z, o = raw[:, 0], raw[:, 1], raw[:, 2], raw[:, 3]
        c = _sigmoid(f) * c + _sigmoid(i) * np.tanh(z)
        y = _sigmoid(o) * np.tanh(c)
        ys.append(y)
    return np.stack(ys, axis=2)


def np_causal_conv(x, kernel, bias):
    """y[t, c] = b[c] + Σ_j kernel[j, c] x[t - (K-1) + j, c], x[<0] = 0."""
    x, kernel, bias = (np.asarray(a, np.float64) for a in (x, kernel, bias))
    B, S, C = x.shape
    K = kernel.shape[0]
    y = np.tile(bias, (B, S, 1))
    for t in range(S):
        for j in range(K):
            src = t - (K - 1) + j
            if src >= 0:
                y[:, t] += kernel[j] * x[:, src]
    return y


def np_headwise(x, kernel):
    """Block-diagonal map: chunk p of the input goes through kernel[p] (out/P, in/P)."""
    x, kernel = np.asarray(x, np.float64), np.asarray(kernel, np.float64)
    P = kernel.shape[0]
    chunks = np.split(x, P, axis=-1)
    return np.concatenate([c @ kernel[p].T for p, c in enumerate(chunks)], axis=-1)


def np_layer(layer: sLSTMLayer, x):
    """The whole sLSTM layer in float64 from the layer's parameters."""
    cfg = layer.config
    x = np.asarray(x, np.float64)
    B, S, D = x.shape
    NH, DH = cfg.num_heads, cfg.head_dim
    if cfg.conv1d_kernel_size > 0:
        xc = np_causal_conv(x, layer.conv1d.kernel, layer.conv1d.bias)
        xc = xc * _sigmoid(xc)
    else:
        xc = x
    gates = [
        np_headwise(xc, layer.igate.kernel),
        np_headwise(xc, layer.fgate.kernel),
        np_headwise(x, layer.zgate.kernel),
        np_headwise(x, layer.ogate.kernel),
    ]
    wx = np.stack(gates, axis=2).reshape(B, S, 4, NH, DH)
    y, _ = np_slstm_stabilised(wx, layer.cell.recurrent_kernel, layer.cell.bias)  # (B, NH, S, DH)
    y = y.transpose(0, 2, 1, 3)
    mean = y.mean(-1, keepdims=True)
    var = ((y - mean) ** 2).mean(-1, keepdims=True)
    y = ((y - mean) / np.sqrt(var + cfg.group_norm_eps)).reshape(B, S, D)
    if layer.group_norm_weight is not None:
        y = y * np.asarray(layer.group_norm_weight, np.float64)
    return y


# --------------------------------------------------------------------------------------------------
# helpers


def _cell_config(nh=2, dh=4, **kw):
    return sLSTMCellConfig(hidden_size=nh * dh, num_heads=nh, dtype="float32", **kw)


def _random_cell(key, nh=2, dh=4, scale=0.5, **kw):
    cell = sLSTMCell(_cell_config(nh, dh, **kw), key=key)
    k1, k2 = jr.split(jr.fold_in(key, 1))
    cell = eqx.tree_at(
        lambda c: (c.recurrent_kernel, c.bias),
        cell,
        (
            scale * jr.normal(k1, cell.recurrent_kernel.shape),
            2.0 * jr.normal(k2, cell.bias.shape),
        ),
    )
    return cell


@eqx.filter_jit
def _run(module, x):
    return module(x)


@eqx.filter_jit
def _run_with_state(module, x):
    """Outputs and the last state from a zero state (``call_with_state``)."""
    return module.call_with_state(x, module.init_state(x.shape[0]))


@eqx.filter_jit
def _run_key(module, x, key):
    return module(x, key=key)


def _layer(embedding_dim=16, num_heads=4, dtype="float32", **kw):
    cfg = sLSTMLayerConfig(embedding_dim=embedding_dim, num_heads=num_heads, dtype=dtype, **kw)
    return cfg


def _randomise_layer(layer: sLSTMLayer, key) -> sLSTMLayer:
    """Non-trivial recurrent weights, biases and norm weight (the defaults are zeros / ones)."""
    k1, k2, k3 = jr.split(key, 3)
    new = (
        0.3 * jr.normal(k1, layer.cell.recurrent_kernel.shape),
        jr.normal(k2, layer.cell.bias.shape),
        1.0 + 0.1 * jr.normal(k3, layer.group_norm_weight.shape),
    )
    return eqx.tree_at(
        lambda m: (m.cell.recurrent_kernel, m.cell.bias, m.group_norm_weight), layer, new
    )


# --------------------------------------------------------------------------------------------------
# cell


@pytest.mark.parametrize("gate_scale", [1.0, 8.0])
def test_cell_matches_unstabilised_float64(getkey, gate_scale):
    cell = _random_cell(getkey())
    wx = gate_scale * jr.normal(getkey(), (2, 8, 4, 2, 4))
    y, last = _run_with_state(cell, wx)
    expected = np_slstm_unstabilised(wx, cell.recurrent_kernel, cell.bias)
    assert y.shape == (2, 2, 8, 4) and y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y), expected, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(np.asarray(last.y), expected[:, :, -1], rtol=2e-5, atol=2e-5)


def test_cell_state_matches_stabilised_float64_large_gates(getkey):
    """Gates in ±60: exp(ĩ) would overflow float32 without the stabiliser; the states (c, n, m) of
    the stabilised recurrence match a float64 loop."""
    cell = _random_cell(getkey(), scale=0.1)
    wx = 60.0 * jnp.tanh(3.0 * jr.normal(getkey(), (2, 8, 4, 2, 4)))
    y, last = _run_with_state(cell, wx)
    y_np, (c_np, n_np, m_np) = np_slstm_stabilised(wx, cell.recurrent_kernel, cell.bias)
    assert bool(jnp.all(jnp.isfinite(y)))
    np.testing.assert_allclose(np.asarray(y), y_np, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(last.m), m_np, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(last.n), n_np, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(last.c), c_np, rtol=1e-4, atol=1e-5)


def test_first_step_rule_is_per_element(getkey):
    """A state with n == 0 in some units only: those units restart (m = ĩ, old c ignored), the
    others continue."""
    cell = _random_cell(getkey())
    B, NH, DH = 2, 2, 4
    n0 = np.ones((B, NH, DH))
    n0[0, 1, 2] = 0.0
    n0[1, 0, :] = 0.0
    state = sLSTMState(
        y=jnp.zeros((B, NH, DH)),
        c=jnp.asarray(n0 * 0.7, jnp.float32),
        n=jnp.asarray(n0, jnp.float32),
        m=jnp.full((B, NH, DH), 0.3, jnp.float32),
    )
    wx = jr.normal(getkey(), (B, 4, NH, DH))
    y, new = cell.call_with_state(wx[:, None], state)
    y = y[:, :, 0]
    raw = np.asarray(wx, np.float64) + np.asarray(cell.bias, np.float64).transpose(1, 0, 2)
    i, f, z, o = raw[:, 0], raw[:, 1], raw[:, 2], raw[:, 3]
    logf = 0.3 - np.logaddexp(0.0, -f)
    first = n0 == 0.0
    m = np.where(first, i, np.maximum(i, logf))
    fg = np.where(first, 0.0, np.exp(logf - m))
    ig = np.exp(i - m)
    c = fg * n0 * 0.7 + ig * np.tanh(z)
    n = fg * n0 + ig
    np.testing.assert_allclose(np.asarray(new.m), m, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(y), _sigmoid(o) * c / n, rtol=1e-5, atol=1e-6)


def test_lstm_function(getkey):
    cell = _random_cell(getkey(), function="lstm")
    assert cell.config.num_states == 2
    wx = 2.0 * jr.normal(getkey(), (2, 8, 4, 2, 4))
    y = _run(cell, wx)
    np.testing.assert_allclose(
        np.asarray(y), np_lstm(wx, cell.recurrent_kernel, cell.bias), rtol=1e-5, atol=1e-6
    )


def test_forward_clipval(getkey):
    cell = _random_cell(getkey(), forward_clipval=0.05)
    y = _run(cell, 3.0 * jr.normal(getkey(), (2, 8, 4, 2, 4)))
    assert float(jnp.max(jnp.abs(y))) <= 0.05 + 1e-7
    unclipped = _run(_random_cell(jr.key(5)), 3.0 * jr.normal(jr.key(6), (2, 8, 4, 2, 4)))
    assert float(jnp.max(jnp.abs(unclipped))) > 0.05


def test_cell_gradient_matches_unstabilised_autodiff(getkey):
    """stop_gradient on m is exact: the float32 gradient equals autodiff of the m-free form in
    float64."""
    cell = _random_cell(getkey())
    wx = 2.0 * jr.normal(getkey(), (2, 8, 4, 2, 4))
    weights = jr.normal(getkey(), (2, 2, 8, 4))

    def loss32(cell, wx):
        return jnp.sum(cell(wx) * weights)

    g_cell, g_wx = jax.jit(jax.grad(loss32, argnums=(0, 1)))(cell, wx)

    with jax.enable_x64(True):
        R = jnp.asarray(np.asarray(cell.recurrent_kernel), jnp.float64)
        b = jnp.asarray(np.asarray(cell.bias), jnp.float64)
        x64 = jnp.asarray(np.asarray(wx), jnp.float64)
        w64 = jnp.asarray(np.asarray(weights), jnp.float64)

        def loss64(R, b, wx):
            B, S = wx.shape[:2]
            y = c = n = jnp.zeros((B, 2, 4), jnp.float64)
            total = jnp.zeros((), jnp.float64)
            for t in range(S):
                raw = wx[:, t] + jnp.einsum("bhi,higo->bgho", y, R) + b.transpose(1, 0, 2)
                i, f, z, o = raw[:, 0], raw[:, 1], raw[:, 2], raw[:, 3]
                c = jax.nn.sigmoid(f) * c + jnp.exp(i) * jnp.tanh(z)
                n = jax.nn.sigmoid(f) * n + jnp.exp(i)
                y = jax.nn.sigmoid(o) * c / n
                total = total + jnp.sum(y * w64[:, :, t])
            return total

        gR, gb, gx = jax.jit(jax.grad(loss64, argnums=(0, 1, 2)))(R, b, x64)
        gR, gb, gx = np.asarray(gR), np.asarray(gb), np.asarray(gx)
    np.testing.assert_allclose(np.asarray(g_cell.recurrent_kernel), gR, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(g_cell.bias), gb, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(g_wx), gx, rtol=1e-4, atol=1e-5)


def test_gradients_finite_with_extreme_gates(getkey):
    """First-step units with very negative ĩ (f' would be exp(+large)) and large gates overall."""
    cell = _random_cell(getkey())
    wx = 80.0 * jr.normal(getkey(), (2, 8, 4, 2, 4))
    wx = wx.at[:, 0, 0].set(-200.0)  # ĩ at t=0 far below logσ(f̃)
    grads = jax.jit(jax.grad(lambda c, x: jnp.sum(c(x)), argnums=(0, 1)))(cell, wx)
    for leaf in jax.tree_util.tree_leaves(grads):
        assert bool(jnp.all(jnp.isfinite(leaf)))


def test_gradient_recurrent_cut(getkey):
    cell = _random_cell(getkey(), gradient_recurrent_cut=True)
    wx = jr.normal(getkey(), (2, 8, 4, 2, 4))
    # The last output depends on earlier inputs only through c and n (y_{t-1} is cut)...
    g = jax.jit(jax.grad(lambda x: jnp.sum(cell(x)[:, :, -1])))(wx)
    cut_free = _random_cell(jr.key(99))
    cut_free = eqx.tree_at(
        lambda c: (c.recurrent_kernel, c.bias), cut_free, (cell.recurrent_kernel, cell.bias)
    )
    g_full = jax.jit(jax.grad(lambda x: jnp.sum(cut_free(x)[:, :, -1])))(wx)
    # ...so the forward pass is unchanged but the o-gate inputs of earlier steps get no gradient.
    np.testing.assert_allclose(
        np.asarray(_run(cell, wx)), np.asarray(_run(cut_free, wx)), rtol=1e-6
    )
    assert float(jnp.max(jnp.abs(g[:, :-1, 3]))) == 0.0
    assert float(jnp.max(jnp.abs(g_full[:, :-1, 3]))) > 0.0


# --------------------------------------------------------------------------------------------------
# init


@pytest.mark.parametrize("block_idx,num_blocks", [(0, 1), (0, 4), (2, 4), (3, 4)])
def test_powerlaw_forget_bias(block_idx, num_blocks):
    cfg = sLSTMCellConfig(hidden_size=24, num_heads=3, _block_idx=block_idx, _num_blocks=num_blocks)
    bias = np.asarray(slstm_bias_init(cfg, key=jr.key(0)))
    r = block_idx / (num_blocks - 1) if num_blocks > 1 else 0.0
    j = np.arange(8)
    expected = [-(-5.0 + 12.0 * (jj / 7) ** (0.3 + 1.3 * r)) for jj in j]
    assert bias.shape == (3, 4, 8)
    for h in range(3):
        np.testing.assert_allclose(bias[h, 1], expected, rtol=1e-6, atol=1e-6)
        for g in (0, 2, 3):
            assert np.all(bias[h, g] == 0.0)
    assert bias[0, 1, 0] == pytest.approx(5.0) and bias[0, 1, -1] == pytest.approx(-7.0)


def test_other_bias_and_recurrent_inits():
    cfg = sLSTMCellConfig(hidden_size=16, num_heads=2, bias_init="small_init")
    b = np.asarray(slstm_bias_init(cfg, key=jr.key(0)))
    np.testing.assert_allclose(b[1, 1], np.linspace(3.0, 6.0, 8), rtol=1e-6)
    assert np.all(b[:, [0, 2, 3]] == 0.0)
    cfg = sLSTMCellConfig(hidden_size=16, num_heads=2, bias_init="zeros")
    assert np.all(np.asarray(slstm_bias_init(cfg, key=jr.key(0))) == 0.0)
    cfg = sLSTMCellConfig(
        hidden_size=16, num_heads=2, bias_init="standard", recurrent_weight_init="standard"
    )
    cell = sLSTMCell(cfg, key=jr.key(1))
    bound = 1.0 / np.sqrt(16)
    for arr in (cell.bias, cell.recurrent_kernel):
        a = np.asarray(arr)
        assert np.all(np.abs(a) <= bound) and np.std(a) > 0.3 * bound
    zero = sLSTMCell(sLSTMCellConfig(hidden_size=16, num_heads=2), key=jr.key(1))
    assert zero.recurrent_kernel.shape == (2, 8, 4, 8)
    assert np.all(np.asarray(zero.recurrent_kernel) == 0.0)


def test_layer_init_shapes_and_stds():
    cfg = _layer(embedding_dim=64, num_heads=4)
    layer = sLSTMLayer(cfg, key=jr.key(0))
    assert layer.igate.kernel.shape == (4, 16, 16)
    assert layer.conv1d.kernel.shape == (4, 64)
    assert layer.group_norm_weight.shape == (64,)
    assert np.all(np.asarray(layer.group_norm_weight) == 1.0)
    ws = np.concatenate([np.asarray(g.kernel).ravel() for g in (layer.igate, layer.zgate)])
    assert np.std(ws) == pytest.approx(np.sqrt(2 / (5 * 64)), rel=0.1)
    # different gates get different weights
    assert not np.allclose(np.asarray(layer.igate.kernel), np.asarray(layer.fgate.kernel))
    for leaf in jax.tree_util.tree_leaves(eqx.filter(layer, eqx.is_array)):
        assert leaf.dtype == jnp.float32


# --------------------------------------------------------------------------------------------------
# layer


@pytest.mark.parametrize("kernel_size,norm_weight", [(4, True), (0, True), (2, False)])
def test_layer_matches_numpy(getkey, kernel_size, norm_weight):
    cfg = _layer(conv1d_kernel_size=kernel_size, group_norm_weight=norm_weight)
    layer = sLSTMLayer(cfg, key=getkey())
    if norm_weight:
        layer = _randomise_layer(layer, getkey())
    else:
        layer = eqx.tree_at(
            lambda m: (m.cell.recurrent_kernel, m.cell.bias),
            layer,
            (0.3 * jr.normal(getkey(), (4, 4, 4, 4)), jr.normal(getkey(), (4, 4, 4))),
        )
        assert layer.group_norm_weight is None
    x = jr.normal(getkey(), (2, 8, 16))
    y = _run(layer, x)
    assert y.shape == (2, 8, 16) and y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y), np_layer(layer, x), rtol=1e-4, atol=1e-4)


def test_decode_steps_equal_full_sequence(getkey):
    layer = _randomise_layer(sLSTMLayer(_layer(), key=getkey()), getkey())
    x = jr.normal(getkey(), (2, 8, 16))
    y = _run(layer, x)
    state = layer.init_state(2)
    assert isinstance(state, sLSTMLayerState) and state.conv.shape == (2, 4, 16)
    call_with_state = eqx.filter_jit(lambda m, x, s: m.call_with_state(x, s))
    outs = []
    for t in range(8):  # one token at a time (S = 1, the step form)
        y_t, state = call_with_state(layer, x[:, t : t + 1], state)
        outs.append(y_t)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, 1)), np.asarray(y), atol=2e-5)
    # prefill then continue: same outputs and the same final state
    y1, s1 = call_with_state(layer, x[:, :4], layer.init_state(2))
    y2, s2 = call_with_state(layer, x[:, 4:], s1)
    np.testing.assert_allclose(np.asarray(jnp.concatenate([y1, y2], 1)), np.asarray(y), atol=2e-5)
    _, s_full = call_with_state(layer, x, layer.init_state(2))
    assert bool(eqx.tree_equal(s2, s_full, rtol=1e-5, atol=1e-5))
    assert bool(eqx.tree_equal(state, s_full, rtol=1e-5, atol=1e-5))


@hypothesis.settings(max_examples=6)
@hypothesis.given(t=st.integers(0, 7), seed=st.integers(0, 2**16))
def test_layer_causal(t, seed):
    layer = _randomise_layer(sLSTMLayer(_layer(), key=jr.key(0)), jr.key(1))
    x = jr.normal(jr.key(seed), (2, 8, 16))
    x2 = x.at[:, t + 1 :].add(jr.normal(jr.key(seed + 1), (2, 7 - t, 16)))
    y, y2 = _run(layer, x), _run(layer, x2)
    np.testing.assert_allclose(np.asarray(y[:, : t + 1]), np.asarray(y2[:, : t + 1]), atol=1e-6)
    if t < 7:
        assert not np.allclose(np.asarray(y[:, t + 1 :]), np.asarray(y2[:, t + 1 :]))


@hypothesis.given(
    batch=st.integers(1, 3),
    seq=st.integers(1, 6),
    num_heads=st.sampled_from([1, 2, 4]),
    head_dim=st.sampled_from([1, 2, 4]),
    kernel_size=st.sampled_from([0, 1, 3]),
    dtype=st.sampled_from(["float32", "bfloat16"]),
)
def test_layer_shapes(batch, seq, num_heads, head_dim, kernel_size, dtype):
    """Shapes and dtypes by tracing only (eqx.filter_eval_shape: no compile, no arrays)."""
    D = num_heads * head_dim
    cfg = _layer(D, num_heads, dtype=dtype, conv1d_kernel_size=kernel_size)
    layer = eqx.filter_eval_shape(sLSTMLayer, cfg, key=jr.key(0))
    x = jax.ShapeDtypeStruct((batch, seq, D), jnp.dtype(dtype))
    y = eqx.filter_eval_shape(lambda m, x: m(x), layer, x)
    assert y.shape == (batch, seq, D) and y.dtype == jnp.dtype(dtype)
    state = eqx.filter_eval_shape(lambda m: m.init_state(batch), layer)
    y_t, state2 = eqx.filter_eval_shape(
        lambda m, s, x: m.call_with_state(x[:, :1], s), layer, state, x
    )
    assert y_t.shape == (batch, 1, D) and y_t.dtype == jnp.dtype(dtype)
    assert state2.cell.c.shape == (batch, num_heads, head_dim)
    assert state2.cell.c.dtype == jnp.float32
    assert state2.conv.shape == (batch, kernel_size, D)
    y_p, state3 = eqx.filter_eval_shape(lambda m, s, x: m.call_with_state(x, s), layer, state, x)
    assert y_p.shape == (batch, seq, D)
    assert jax.tree_util.tree_structure(state3) == jax.tree_util.tree_structure(state2)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_layer_finite_small_shapes(dtype):
    """Odd sizes run for real: one head of width 1 (DH=1) and one step (S=1), no conv."""
    for D, nh, S, K in ((2, 2, 1, 0), (3, 1, 3, 1)):
        layer = sLSTMLayer(_layer(D, nh, dtype=dtype, conv1d_kernel_size=K), key=jr.key(0))
        y = layer(jr.normal(jr.key(1), (2, S, D)).astype(dtype))
        assert y.shape == (2, S, D) and y.dtype == jnp.dtype(dtype)
        assert bool(jnp.all(jnp.isfinite(y.astype(jnp.float32))))


def test_bfloat16_close_to_float32(getkey):
    k, kr = getkey(), getkey()
    layer32 = _randomise_layer(sLSTMLayer(_layer(), key=k), kr)
    layer16 = _randomise_layer(sLSTMLayer(_layer(dtype="bfloat16"), key=k), kr)
    for a, b in zip(jax.tree.leaves(layer32), jax.tree.leaves(layer16), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # same key, same weights
    x = jr.normal(getkey(), (2, 8, 16))
    y32, y16 = _run(layer32, x), _run(layer16, x.astype(jnp.bfloat16))
    assert y16.dtype == jnp.bfloat16
    assert bool(jnp.all(jnp.isfinite(y16.astype(jnp.float32))))
    # bf16 conv (8 mantissa bits) feeding float32 gates and a unit-variance group norm.
    assert float(jnp.max(jnp.abs(y16.astype(jnp.float32) - y32))) < 0.1


def test_dropout_only_with_key(getkey):
    k, kr = getkey(), getkey()
    layer = _randomise_layer(sLSTMLayer(_layer(dropout=0.5), key=k), kr)
    no_drop = _randomise_layer(sLSTMLayer(_layer(dropout=0.0), key=k), kr)
    x = jr.normal(getkey(), (2, 8, 16))
    y = _run(layer, x)
    np.testing.assert_array_equal(np.asarray(_run(layer, x)), np.asarray(y))
    np.testing.assert_allclose(np.asarray(y), np.asarray(_run(no_drop, x)), rtol=1e-6)
    y_drop = _run_key(layer, x, getkey())
    assert not np.allclose(np.asarray(y_drop), np.asarray(y))
    np.testing.assert_array_equal(np.asarray(_run_key(no_drop, x, getkey())), np.asarray(y))


def test_layer_pytree_round_trip_and_jit_grad(getkey, tmp_path):
    layer = _randomise_layer(sLSTMLayer(_layer(), key=getkey()), getkey())
    x = jr.normal(getkey(), (2, 8, 16))
    leaves, treedef = jax.tree_util.tree_flatten(layer)
    again = jax.tree_util.tree_unflatten(treedef, leaves)
    np.testing.assert_array_equal(np.asarray(_run(again, x)), np.asarray(_run(layer, x)))
    path = tmp_path / "slstm.eqx"
    eqx.tree_serialise_leaves(path, layer)
    loaded = eqx.tree_deserialise_leaves(path, sLSTMLayer(_layer(), key=getkey()))
    np.testing.assert_array_equal(np.asarray(_run(loaded, x)), np.asarray(_run(layer, x)))
    grads = eqx.filter_jit(eqx.filter_grad(lambda m, x: jnp.sum(m(x) ** 2)))(layer, x)
    for leaf in jax.tree_util.tree_leaves(grads):
        assert bool(jnp.all(jnp.isfinite(leaf)))
    assert float(jnp.max(jnp.abs(grads.cell.recurrent_kernel))) > 0.0


def test_layer_errors():
    with pytest.raises(ValueError, match="embedding_dim"):
        sLSTMLayer(sLSTMLayerConfig(), key=jr.key(0))
    with pytest.raises(ValueError, match="hidden_size"):
        sLSTMCell(sLSTMCellConfig(), key=jr.key(0))
    with pytest.raises(ValueError, match="num_heads"):
        sLSTMLayerConfig(embedding_dim=10, num_heads=4)
