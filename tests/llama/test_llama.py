"""The Llama baseline against a float64 NumPy forward written from the equations in
docs/architecture.md, "Llama", plus causality, document masking, scan/unrolled equality,
decoding, bf16 and parameter counts."""

import functools
import inspect

import equinox as eqx
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from xlstm_eqx.core import ParallelConfig, count_params
from xlstm_eqx.llama import (
    FFNBlock,
    LlamaConfig,
    LlamaTransformer,
    SelfAttentionBlock,
    TransformerBlockStack,
    apply_rope,
    multihead_attention,
    rope_sin_cos,
)


def tree_allclose(x, y, *, rtol=1e-5, atol=1e-8) -> bool:
    # conftest's helper, copied because tests/ is not a package here. Note `bool(...)`: with
    # array leaves eqx.tree_equal returns a jax bool array, never the object `True`.
    return bool(eqx.tree_equal(x, y, typematch=True, rtol=rtol, atol=atol))


V, D, HD, L = 64, 32, 8, 2
NH = D // HD


def tiny_config(**overrides) -> LlamaConfig:
    base = dict(vocab_size=V, embedding_dim=D, num_blocks=L, head_dim=HD)
    base.update(overrides)
    return LlamaConfig(**base)


def perturb(model, seed: int, scale: float = 0.05):
    """Add noise to every float parameter, so that zero biases and unit norm scales become
    generic values that a wrong formula cannot hide behind."""
    params, static = eqx.partition(model, eqx.is_inexact_array)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    rng = np.random.default_rng(seed)
    leaves = [
        jnp.asarray(np.asarray(leaf) + scale * rng.standard_normal(leaf.shape), leaf.dtype)
        for leaf in leaves
    ]
    return eqx.combine(jax.tree_util.tree_unflatten(treedef, leaves), static)


@functools.cache
def _model(seed: int = 7, noise_seed: int | None = None, **overrides) -> LlamaTransformer:
    """A tiny model, built once per argument set (optionally with perturbed parameters)."""
    model = LlamaTransformer(tiny_config(**overrides), key=jr.key(seed))
    return model if noise_seed is None else perturb(model, noise_seed)


@eqx.filter_jit
def _logits(model, tokens, borders=None, positions=None, key=None):
    return model(tokens, key=key, document_borders=borders, positions=positions)


def layer(model: LlamaTransformer, i: int):
    """Block ``i`` of the stack as its own module (unstacked when the stack is scanned)."""
    blocks = model.blocks.blocks
    if isinstance(blocks, tuple):
        return blocks[i]
    return jax.tree_util.tree_map(lambda a: a[i] if eqx.is_array(a) else a, blocks)


# ---------------------------------------------------------------------------------------------------
# Independent float64 NumPy reference
# ---------------------------------------------------------------------------------------------------


def f64(a):
    return None if a is None else np.asarray(a, np.float64)


def np_rms(x, scale, eps=1e-6):
    return x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + eps) * f64(scale)


def np_rope(x, pos, theta):
    """Interleaved RoPE as a complex product: z_j = x_{2j} + i·x_{2j+1}, z_j · exp(i·pos·θ^(−2j/hd))."""
    hd = x.shape[-1]
    z = x[..., 0::2] + 1j * x[..., 1::2]
    omega = float(theta) ** (-2.0 * np.arange(hd // 2) / hd)
    rot = np.exp(1j * np.asarray(pos, np.float64)[..., None] * omega)  # (B, S, hd/2)
    z = z * rot[:, :, None, :]
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = z.real, z.imag
    return out


def np_dense(x, dense, n_in=1):
    y = np.tensordot(x, f64(dense.kernel), axes=n_in)
    return y if dense.bias is None else y + f64(dense.bias)


def np_attention_block(blk, x, pos, theta, *, causal, qk_scale, segment_ids=None):
    """``Attn(RMSNorm(x))``: softmax(q kᵀ·scale + mask) v, projected out. x (B, S, D) float64."""
    h = np_rms(x, blk.pre_norm.scale)
    q, k, v = np_dense(h, blk.dense_q), np_dense(h, blk.dense_k), np_dense(h, blk.dense_v)
    if blk.q_norm is not None:
        q, k = np_rms(q, blk.q_norm.scale), np_rms(k, blk.k_norm.scale)
    q, k = np_rope(q, pos, theta), np_rope(k, pos, theta)
    S = x.shape[1]
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) * qk_scale
    allowed = np.ones((x.shape[0], 1, S, S), bool)
    if causal:
        allowed &= np.tril(np.ones((S, S), bool))[None, None]
    if segment_ids is not None:
        seg = np.asarray(segment_ids)
        allowed &= (seg[:, :, None] == seg[:, None, :])[:, None]
    logits = np.where(allowed, logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    attn = np.einsum("bhqk,bkhd->bqhd", p, v)
    return np_dense(attn, blk.dense_out, n_in=2)


def np_ffn_block(blk, x):
    h = np_rms(x, blk.pre_norm.scale)
    g = np_dense(h, blk.proj_up_gate)
    return np_dense(np_dense(h, blk.proj_up) * g / (1.0 + np.exp(-g)), blk.proj_down)


def np_llama(model, cfg, tokens, *, positions=None, segment_ids=None, qk_scale=None):
    tokens = np.asarray(tokens)
    B, S = tokens.shape
    pos = np.broadcast_to(np.arange(S), (B, S)) if positions is None else np.asarray(positions)
    qk_scale = cfg.head_dim**-0.5 if qk_scale is None else qk_scale
    x = f64(model.token_embedding.embedding)[tokens]
    for i in range(cfg.num_blocks):
        blk = layer(model, i)
        x = x + np_attention_block(
            blk.attn,
            x,
            pos,
            cfg.theta,
            causal=cfg.causal,
            qk_scale=qk_scale,
            segment_ids=segment_ids,
        )
        x = x + np_ffn_block(blk.ffn, x)
    logits = np_dense(np_rms(x, model.out_norm.scale), model.lm_head)
    if cfg.logits_soft_cap is not None:
        logits = cfg.logits_soft_cap * np.tanh(logits / cfg.logits_soft_cap)
    return logits


# ---------------------------------------------------------------------------------------------------
# Pieces
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dim, multiple_of, multiplier, expected",
    [
        (768, 64, 1.0, 2048),  # llama165M (docs/architecture.md, "Llama")
        (2048, 64, 1.0, 5504),  # 1.3B
        (4096, 64, 1.0, 10944),  # 7B
        (768, 64, 1.3, 2688),  # int(2048·1.3) = 2662 → up to 2688
        (32, 64, 1.0, 128),  # int(85.33) = 85 → 128
        (32, 16, 0.5, 48),  # int(85·0.5) = 42 → 48
        (32, 16, None, 96),  # no multiplier: 85 → 96
    ],
)
def test_ffn_hidden_dim(dim, multiple_of, multiplier, expected):
    cfg = LlamaConfig(
        vocab_size=V,
        embedding_dim=dim,
        num_blocks=L,
        head_dim=16,
        ffn_multiple_of=multiple_of,
        ffn_dim_multiplier=multiplier,
    )
    ffn = eqx.filter_eval_shape(FFNBlock, cfg, key=jr.key(0))
    assert ffn.proj_up.kernel.shape == ffn.proj_up_gate.kernel.shape == (dim, expected)
    assert ffn.proj_down.kernel.shape == (expected, dim)


def test_rope_matches_complex_numpy():
    rng = np.random.default_rng(0)
    B, S, H, hd, theta = 2, 7, 3, 8, 500.0
    x = rng.standard_normal((B, S, H, hd)).astype(np.float32)
    pos = rng.integers(0, 100, size=(B, S))
    sin, cos = rope_sin_cos(jnp.asarray(pos, jnp.int32), hd, theta)
    out = apply_rope(jnp.asarray(x), sin, cos)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), np_rope(f64(x), pos, theta), rtol=1e-5, atol=2e-5)


def test_rope_scores_depend_on_relative_position_only():
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.standard_normal((1, 1, 1, 16)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((1, 1, 1, 16)), jnp.float32)

    def score(pq, pk):
        rq = apply_rope(q, *rope_sin_cos(jnp.full((1, 1), pq, jnp.int32), 16, 1e4))
        rk = apply_rope(k, *rope_sin_cos(jnp.full((1, 1), pk, jnp.int32), 16, 1e4))
        return float(jnp.sum(rq * rk))

    assert score(5, 2) == pytest.approx(score(13, 10), rel=1e-4, abs=1e-5)
    assert score(5, 2) != pytest.approx(score(5, 3), rel=1e-3)


@pytest.mark.parametrize(
    "qk_norm, use_bias, causal, quirk, with_segments",
    [
        (False, False, True, False, False),
        (True, True, True, False, True),
        (False, True, False, False, True),
        (True, False, True, True, False),
    ],
)
def test_attention_block_matches_numpy(qk_norm, use_bias, causal, quirk, with_segments):
    cfg = tiny_config(qk_norm=qk_norm, use_bias=use_bias, causal=causal, query_scale_quirk=quirk)
    blk = perturb(SelfAttentionBlock(cfg, key=jr.key(3)), seed=4)
    rng = np.random.default_rng(5)
    B, S = 2, 6
    x = rng.standard_normal((B, S, D)).astype(np.float32)
    pos = rng.integers(0, 50, size=(B, S))
    seg = np.cumsum(rng.random((B, S)) < 0.3, axis=1).astype(np.int32) if with_segments else None
    sin, cos = rope_sin_cos(jnp.asarray(pos, jnp.int32), HD, cfg.theta)
    out = eqx.filter_jit(lambda b, *args: b(*args))(
        blk, jnp.asarray(x), sin, cos, None if seg is None else jnp.asarray(seg)
    )
    qk_scale = NH**-0.5 if quirk else HD**-0.5
    expected = np_attention_block(
        blk, f64(x), pos, cfg.theta, causal=causal, qk_scale=qk_scale, segment_ids=seg
    )
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# The whole model
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),
        dict(scan_blocks=False, logits_soft_cap=0.5, qk_norm=True, use_bias=True, theta=100.0),
    ],
)
def test_model_matches_numpy(overrides):
    cfg = tiny_config(**overrides)
    model = _model(seed=0, noise_seed=1, **overrides)
    tokens = np.random.default_rng(2).integers(0, V, size=(2, 9))
    out = _logits(model, jnp.asarray(tokens, jnp.int32))
    assert out.shape == (2, 9, V) and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), np_llama(model, cfg, tokens), rtol=1e-4, atol=1e-5)
    if cfg.logits_soft_cap is not None:
        assert float(jnp.max(jnp.abs(out))) < cfg.logits_soft_cap


def test_document_positions_and_mask_match_numpy():
    cfg = tiny_config(mask_across_document_boundaries=True)
    model = _model(seed=0, noise_seed=1, mask_across_document_boundaries=True)
    tokens = np.random.default_rng(2).integers(0, V, size=(2, 9))
    borders = np.zeros((2, 9), bool)
    borders[:, 0] = True
    borders[0, [3, 7]] = True
    borders[1, 5] = True
    seg = np.cumsum(borders, axis=1)
    last_border = np.maximum.accumulate(np.where(borders, np.arange(9), 0), axis=1)
    positions = np.arange(9) - last_border  # restart at 0 in each document
    out = _logits(
        model,
        jnp.asarray(tokens, jnp.int32),
        jnp.asarray(borders),
        jnp.asarray(positions, jnp.int32),
    )
    expected = np_llama(model, cfg, tokens, positions=positions, segment_ids=seg)
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-4, atol=1e-5)


S_HYP = 8


@hypothesis.given(
    tokens=st.lists(st.integers(0, V - 1), min_size=S_HYP, max_size=S_HYP),
    other=st.lists(st.integers(0, V - 1), min_size=S_HYP, max_size=S_HYP),
    t=st.integers(0, S_HYP - 1),
)
def test_causal(tokens, other, t):
    """Logits up to t do not depend on the tokens after t."""
    model = _model()
    a = jnp.asarray([tokens], jnp.int32)
    b = a.at[0, t + 1 :].set(jnp.asarray(other[t + 1 :], jnp.int32))
    la, lb = _logits(model, a), _logits(model, b)
    np.testing.assert_allclose(np.asarray(la[:, : t + 1]), np.asarray(lb[:, : t + 1]), atol=1e-6)


def test_non_causal_sees_the_future():
    """The causality test can fail: with causal=False the first logits change."""
    model = _model(causal=False)
    a = jnp.arange(S_HYP, dtype=jnp.int32)[None]
    b = a.at[0, -1].set(V - 1)
    assert not np.allclose(_logits(model, a)[0, 0], _logits(model, b)[0, 0], atol=1e-6)


@hypothesis.given(
    tokens=st.lists(st.integers(0, V - 1), min_size=S_HYP, max_size=S_HYP),
    other=st.lists(st.integers(0, V - 1), min_size=S_HYP, max_size=S_HYP),
    border=st.integers(1, S_HYP - 1),
)
def test_document_masking(tokens, other, border):
    """With mask_across_document_boundaries, tokens of an earlier document do not affect the
    logits of a later one; without it they do."""
    a = jnp.asarray([tokens], jnp.int32)
    b = a.at[0, :border].set(jnp.asarray(other[:border], jnp.int32))
    borders = jnp.zeros((1, S_HYP), bool).at[0, border].set(True)
    masked = _model(mask_across_document_boundaries=True)
    la, lb = _logits(masked, a, borders), _logits(masked, b, borders)
    np.testing.assert_allclose(np.asarray(la[:, border:]), np.asarray(lb[:, border:]), atol=1e-6)
    if other[:border] != tokens[:border]:
        unmasked = _model()
        ua, ub = _logits(unmasked, a, borders), _logits(unmasked, b, borders)
        assert not np.allclose(np.asarray(ua[:, border:]), np.asarray(ub[:, border:]), atol=1e-6)


@pytest.mark.slow
def test_scan_and_unrolled_agree():
    drop = dict(dropout_rate=0.3, add_embedding_dropout=True)
    scanned = _model(seed=11, scan_blocks=True, **drop)
    unrolled = _model(seed=11, scan_blocks=False, **drop)
    assert isinstance(unrolled.blocks.blocks, tuple) and len(unrolled.blocks.blocks) == L
    assert scanned.blocks.blocks.attn.dense_q.kernel.shape == (L, D, NH, HD)
    for i in range(L):  # the same key gives the same weights
        assert tree_allclose(layer(scanned, i), unrolled.blocks.blocks[i], rtol=0, atol=0)
    tokens = jr.randint(jr.key(12), (2, 11), 0, V)
    assert tree_allclose(_logits(scanned, tokens), _logits(unrolled, tokens), rtol=1e-6, atol=1e-6)
    # with dropout, the same key drops the same units in both modes
    k = jr.key(13)
    assert tree_allclose(
        _logits(scanned, tokens, key=k), _logits(unrolled, tokens, key=k), rtol=1e-6, atol=1e-6
    )


def test_dropout_only_with_key():
    drop = dict(dropout_rate=0.3, add_embedding_dropout=True)
    model = _model(seed=11, scan_blocks=True, **drop)
    tokens = jr.randint(jr.key(12), (2, 11), 0, V)
    base = _logits(model, tokens)
    assert tree_allclose(base, _logits(model, tokens), rtol=0, atol=0)
    d1, d2 = _logits(model, tokens, key=jr.key(2)), _logits(model, tokens, key=jr.key(3))
    assert not np.allclose(d1, base, atol=1e-4)
    assert not np.allclose(d1, d2, atol=1e-4)
    # the deterministic path is the plain model: rate 0 gives the same logits with or without key
    plain = _model(seed=11, scan_blocks=True)
    assert tree_allclose(base, _logits(plain, tokens), rtol=0, atol=0)
    assert tree_allclose(_logits(plain, tokens, key=jr.key(2)), base, rtol=0, atol=0)


def test_dynamic_sequence_length():
    """The same model at S = 1, 5, 17 (no length baked in); causal prefixes agree."""
    model = _model()
    tokens = jr.randint(jr.key(4), (2, 17), 0, V)
    full = _logits(model, tokens)
    for S in (1, 5, 17):
        out = _logits(model, tokens[:, :S])
        assert out.shape == (2, S, V)
        np.testing.assert_allclose(np.asarray(out), np.asarray(full[:, :S]), rtol=1e-5, atol=1e-6)


def test_bfloat16_close_to_float32():
    """bf16 compute (parameters stay float32): logits finite and within 0.05 of float32, where the
    logits themselves are O(1) (perturbed weights)."""
    model32 = _model(seed=0, noise_seed=1)
    model16 = _model(seed=0, noise_seed=1, dtype="bfloat16")
    params16 = jax.tree_util.tree_leaves(eqx.filter(model16, eqx.is_array))
    assert all(leaf.dtype == jnp.float32 for leaf in params16)
    params32 = jax.tree_util.tree_leaves(eqx.filter(model32, eqx.is_array))
    assert tree_allclose(params16, params32, rtol=0, atol=0)  # same weights, other compute dtype
    tokens = jr.randint(jr.key(2), (2, 12), 0, V)
    l32, l16 = _logits(model32, tokens), _logits(model16, tokens)
    assert l16.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(l16)))
    assert float(jnp.max(jnp.abs(l32))) > 0.3  # the tolerance below is meaningful
    assert float(jnp.max(jnp.abs(l16 - l32))) > 0  # bf16 really ran
    np.testing.assert_allclose(np.asarray(l16), np.asarray(l32), atol=5e-2)


# ---------------------------------------------------------------------------------------------------
# Decoding with a KV cache
# ---------------------------------------------------------------------------------------------------


@eqx.filter_jit
def _decode(model, tokens, cache):
    return model.call_with_state(tokens, cache)


@pytest.mark.parametrize("scan_blocks", [True, False])
def test_decode_matches_full_forward(scan_blocks):
    model = _model(seed=0, noise_seed=3, scan_blocks=scan_blocks)
    tokens = jr.randint(jr.key(1), (2, 9), 0, V)
    full = _logits(model, tokens)
    cache = model.init_state(2, 12)
    assert cache.keys.shape == (L, 2, 12, NH, HD)
    prefill, cache = _decode(model, tokens[:, :4], cache)
    np.testing.assert_allclose(np.asarray(prefill), np.asarray(full[:, :4]), rtol=1e-5, atol=1e-5)
    for t in range(4, 9):
        logits, cache = _decode(model, tokens[:, t : t + 1], cache)
        np.testing.assert_allclose(
            np.asarray(logits[:, 0]), np.asarray(full[:, t]), rtol=1e-5, atol=1e-5
        )
    assert int(cache.length) == 9


def test_decode_overflow_is_an_error():
    model = _model()
    cache = model.init_state(1, 4)
    _, cache = _decode(model, jnp.zeros((1, 3), jnp.int32), cache)
    with pytest.raises(Exception, match="KV cache overflow"):
        _decode(model, jnp.zeros((1, 2), jnp.int32), cache)
    with pytest.raises(ValueError, match="max_len"):
        model.call_with_state(jnp.zeros((1, 5), jnp.int32), model.init_state(1, 4))
    with pytest.raises(ValueError, match="one document per sequence"):
        model.call_with_state(
            jnp.zeros((1, 2), jnp.int32),
            model.init_state(1, 4),
            document_borders=jnp.zeros((1, 2), bool),
        )


# ---------------------------------------------------------------------------------------------------
# PyTree behaviour, parameter count, errors
# ---------------------------------------------------------------------------------------------------


def llama165m_closed_form(vocab=50304, d=768, blocks=12, ffn=2048):
    """Embedding + LM head (V·D each), out norm (D); per block: two RMSNorm scales (2D),
    q/k/v/out (4·D·NH·hd = 4D²), SwiGLU (3·D·F)."""
    return 2 * vocab * d + d + blocks * (2 * d + 4 * d * d + 3 * d * ffn)


@pytest.mark.parametrize("scan_blocks", [True, False])
def test_llama165m_param_count(scan_blocks):
    cfg = LlamaConfig(
        vocab_size=50304, embedding_dim=768, num_blocks=12, head_dim=128, scan_blocks=scan_blocks
    )
    skeleton = eqx.filter_eval_shape(LlamaTransformer, cfg, key=jr.key(0))
    expected = llama165m_closed_form()
    assert expected == 162_220_800
    assert count_params(skeleton) == expected
    leaves = jax.tree_util.tree_leaves(skeleton)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)  # nothing was allocated
    assert sum(int(np.prod(x.shape)) for x in leaves) == expected
    blocks = skeleton.blocks.blocks
    attn = blocks.attn if scan_blocks else blocks[0].attn
    assert attn.dense_q.kernel.shape[-3:] == (768, 6, 128)  # NH = 768 / 128 = 6


def test_invalid_attention_backend_is_rejected():
    cfg = tiny_config()
    cfg.attention_backend = "flash"  # mutated after construction: the model checks again
    with pytest.raises(ValueError, match="attention_backend") as info:
        LlamaTransformer(cfg, key=jr.key(0))
    assert "'flash'" in str(info.value) and "xla" in str(info.value)
    q = jnp.zeros((1, 2, NH, HD))
    with pytest.raises(ValueError, match="attention_backend='flash' is unknown"):
        multihead_attention(q, q, q, causal=True, backend="flash")


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("head_dim", 12, "head_dim.*must divide embedding_dim=32"),
        ("head_dim", 1, "head_dim.*even"),
        ("num_blocks", 0, "num_blocks"),
        ("vocab_size", -1, "vocab_size"),
        ("dropout_rate", 1.0, "dropout_rate"),
        ("dtype", "float33", "dtype"),
    ],
)
def test_mutated_invalid_config_is_rejected(field, value, match):
    cfg = tiny_config()
    setattr(cfg, field, value)
    with pytest.raises(ValueError, match=match):
        TransformerBlockStack(cfg, key=jr.key(0))


@pytest.mark.slow
def test_grads_reach_every_parameter_and_remat_changes_nothing():
    """filter_grad through the jitted model: finite, non-zero gradients for every parameter; the
    `parallel.remat` variants give the same loss and gradients."""
    tokens = jr.randint(jr.key(1), (2, 5), 0, V)
    extra = dict(qk_norm=True, use_bias=True)

    @eqx.filter_jit
    def value_and_grad(m):
        return eqx.filter_value_and_grad(lambda m: -jnp.mean(jax.nn.log_softmax(m(tokens))))(m)

    plain = _model(seed=0, noise_seed=1, **extra)
    value, grads = value_and_grad(plain)
    ref = jax.tree_util.tree_leaves(grads)
    assert len(ref) == len(jax.tree_util.tree_leaves(eqx.filter(plain, eqx.is_array)))
    for g in ref:
        assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.max(jnp.abs(g))) > 0
    for remat in (["TransformerBlock"], ["AttnBlock", "FFNBlock"]):
        cfg = tiny_config(parallel=ParallelConfig(remat=remat), **extra)
        model = perturb(LlamaTransformer(cfg, key=jr.key(0)), 1)
        assert model.blocks.remat_block == ("TransformerBlock" in remat)
        assert model.blocks.blocks.remat_attn == ("AttnBlock" in remat)
        v, g = value_and_grad(model)
        assert tree_allclose(v, value, rtol=1e-6, atol=1e-7)
        assert tree_allclose(jax.tree_util.tree_leaves(g), ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", ["cudnn", "pallas_triton"])
def test_gpu_backends(backend):
    """Off GPU: a clear error naming the backend and the platform. On GPU: the fused kernel
    agrees with the XLA core."""
    model = _model(seed=0, attention_backend=backend, dtype="bfloat16")
    tokens = jr.randint(jr.key(1), (1, 128), 0, V)
    platform = jax.default_backend()
    if platform != "gpu":
        with pytest.raises(RuntimeError, match=f"{backend}.*GPU.*'{platform}'"):
            _logits(model, tokens)
        return
    reference = _model(seed=0, dtype="bfloat16")
    np.testing.assert_allclose(_logits(model, tokens), _logits(reference, tokens), atol=5e-2)


def test_cudnn_needs_half_precision():
    model = _model(attention_backend="cudnn")
    expected = (
        (ValueError, "cudnn.*float32")
        if jax.default_backend() == "gpu"
        else (
            RuntimeError,
            "cudnn",
        )
    )
    with pytest.raises(expected[0], match=expected[1]):
        _logits(model, jnp.zeros((1, 4), jnp.int32))


@pytest.mark.parametrize("shape", [(4,), (1, 2, 3)], ids=["1-D", "3-D"])
def test_tokens_must_be_two_dimensional(shape):
    """(issue 14) Tokens that are not (B, S): the jaxtyping checker of the test run fires first
    (a TypeError naming tokens); without it, the model's own ValueError names the shape."""
    model = _model()
    tokens = jnp.ones(shape, jnp.int32)
    cases = [("__call__", ()), ("call_with_state", (model.init_state(1, 8),))]
    for method, extra in cases:
        with pytest.raises((ValueError, TypeError), match="tokens"):
            getattr(model, method)(tokens, *extra)
        unchecked = inspect.unwrap(getattr(type(model), method))
        with pytest.raises(ValueError, match=r"^tokens must have shape \(B, S\)"):
            unchecked(model, tokens, *extra)
