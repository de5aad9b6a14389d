"""xLSTMLMModel end to end: causality, backend and scan equivalence, PyTree behaviour, dtypes,
dynamic sequence length, document resets, decode, parameter counts, weight-decay mask."""

import dataclasses
import functools
import inspect
import math

import equinox as eqx
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from xlstm_eqx import PRESETS
from xlstm_eqx.cell import mLSTMBackendNameAndKwargs
from xlstm_eqx.core import ParallelConfig, count_params
from xlstm_eqx.nn import FeedForwardConfig
from xlstm_eqx.xlstm import (
    decay_mask,
    mLSTMBlockConfig,
    mLSTMCellConfig,
    mLSTMLayerConfig,
    sLSTMBlockConfig,
    sLSTMLayerConfig,
    xLSTMBlockStack,
    xLSTMLMModel,
    xLSTMLMModelConfig,
)


def tree_allclose(x, y, *, rtol=1e-5, atol=1e-8) -> bool:
    # conftest's helper, copied: tests/ is not a package, so `from .conftest import` fails; and
    # `bool(...)` because with array leaves eqx.tree_equal returns a jax bool array, not `True`.
    return bool(eqx.tree_equal(x, y, typematch=True, rtol=rtol, atol=atol))


V, D, S = 64, 32, 12
BACKENDS = ("parallel_stabilized", "chunkwise", "recurrent")


def backend_config(name):
    if name == "chunkwise":
        return mLSTMBackendNameAndKwargs(name="chunkwise", kwargs={"chunk_size": 4})
    return name


def make_config(kind="v1", backend="parallel_stabilized", **overrides):
    """Tiny float32 configs. kind: "v1" (2 mlstm_v1 blocks + SwiGLU FFN), "mlstm" (2 Mamba-style
    blocks), "mixed" (mlstm, sLSTM, mlstm)."""
    cell = mLSTMCellConfig(
        backend=backend_config(backend),
        igate_bias_init_range=-2.0,
        gate_soft_cap=15.0,
        reset_at_document_boundaries=True,
    )
    if kind == "v1":
        layer = mLSTMLayerConfig(
            layer_type="mlstm_v1", num_heads=4, qk_dim_factor=0.5, mlstm_cell=cell
        )
        block = mLSTMBlockConfig(
            mlstm=layer, feedforward=FeedForwardConfig(proj_factor=2.0, act_fn="swish")
        )
    else:
        layer = mLSTMLayerConfig(
            layer_type="mlstm", num_heads=4, round_proj_up_to_multiple_of=16, mlstm_cell=cell
        )
        block = mLSTMBlockConfig(mlstm=layer)
    kw = dict(
        vocab_size=V,
        embedding_dim=D,
        num_blocks=2,
        dtype="float32",
        lm_head_dtype="float32",
        norm_type="rmsnorm",
        logits_soft_cap=30.0,
        scan_blocks=kind != "mixed",
        mlstm_block=block,
    )
    if kind == "mixed":
        kw.update(
            num_blocks=3,
            slstm_at=[1],
            slstm_block=sLSTMBlockConfig(slstm=sLSTMLayerConfig(num_heads=4)),
        )
    kw.update(overrides)
    return xLSTMLMModelConfig(**kw)


def perturb(module_or_model, key, scale=0.1):
    """Noise on every parameter so that the zero-initialised gate kernels matter."""
    params, static = eqx.partition(module_or_model, eqx.is_inexact_array)
    leaves, treedef = jax.tree.flatten(params)
    rng = np.random.default_rng(int(jr.randint(key, (), 0, 2**31 - 1)))
    noise = [rng.normal(size=a.shape).astype(np.float32) for a in leaves]
    leaves = [a + scale * n for a, n in zip(leaves, noise, strict=True)]
    return eqx.combine(jax.tree.unflatten(treedef, leaves), static)


@eqx.filter_jit
def _forward(model, tokens, borders):
    return model(tokens, document_borders=borders)


def forward(model, tokens, borders=None):
    """Jitted forward. Without borders, only token 0 is marked: the same logits as no borders
    (nothing precedes token 0 to forget) and one compilation shared with the bordered calls."""
    if borders is None:
        borders = jnp.zeros(tokens.shape, bool).at[:, 0].set(True)
    return _forward(model, tokens, borders)


@functools.cache
def built(kind, backend="parallel_stabilized"):
    """The same weights for every backend (same key, same perturbation)."""
    model = xLSTMLMModel(make_config(kind, backend), key=jr.key(0))
    return perturb(model, jr.key(1))


def tokens_of(seed, shape=(2, S)):
    return jr.randint(jr.key(seed), shape, 0, V)


def f64(x):
    return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


# ------------------------------------------------------------------------------------------------
# causality, backends, scan


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["v1", "mixed"])
@hypothesis.given(
    seed=st.integers(0, 2**16),
    t=st.integers(0, S - 1),
)
@hypothesis.settings(max_examples=5)
def test_causality(kind, backend, seed, t):
    model = built(kind, backend)
    tokens = tokens_of(seed)
    changed = tokens.at[:, t + 1 :].set((tokens[:, t + 1 :] + 1 + seed % 7) % V)
    a, b = forward(model, tokens), forward(model, changed)
    np.testing.assert_allclose(f64(a[:, : t + 1]), f64(b[:, : t + 1]), rtol=1e-5, atol=1e-5)
    if t + 1 < S:
        assert float(jnp.max(jnp.abs(a[:, t + 1 :] - b[:, t + 1 :]))) > 1e-4


@pytest.mark.parametrize("kind", ["v1", "mixed"])
def test_backends_agree(kind):
    tokens = tokens_of(3)
    borders = jnp.zeros((2, S), bool).at[:, 0].set(True).at[1, 7].set(True)
    outs = [f64(forward(built(kind, b), tokens, borders)) for b in BACKENDS]
    for o in outs[1:]:
        np.testing.assert_allclose(o, outs[0], rtol=0, atol=1e-4)


def test_scan_and_unrolled_blocks_agree():
    cfg = make_config("v1")
    scanned = xLSTMLMModel(cfg, key=jr.key(5))
    unrolled = xLSTMLMModel(dataclasses.replace(cfg, scan_blocks=False), key=jr.key(5))
    assert isinstance(unrolled.xlstm_block_stack.blocks, tuple)
    assert scanned.xlstm_block_stack.blocks.xlstm_res_block.norm.scale.shape == (2, D)
    # Same key → same weights, block by block.
    for a, b in zip(
        scanned.xlstm_block_stack.block_list(), unrolled.xlstm_block_stack.blocks, strict=True
    ):
        assert tree_allclose(a, b, rtol=0, atol=0)
    # Same weights → same outputs (perturb both identically through the unstacked form).
    blocks = tuple(perturb(b, jr.key(i)) for i, b in enumerate(unrolled.xlstm_block_stack.blocks))
    unrolled = eqx.tree_at(lambda m: m.xlstm_block_stack.blocks, unrolled, blocks)
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *eqx.filter(blocks, eqx.is_array))
    scanned = eqx.tree_at(
        lambda m: m.xlstm_block_stack.blocks,
        scanned,
        eqx.combine(
            stacked, eqx.filter(scanned.xlstm_block_stack.blocks, eqx.is_array, inverse=True)
        ),
    )
    tokens = tokens_of(4)
    np.testing.assert_allclose(
        f64(forward(scanned, tokens)), f64(forward(unrolled, tokens)), rtol=1e-5, atol=1e-5
    )


def test_scan_rejected_with_slstm_blocks():
    cfg = make_config("mixed")
    cfg.scan_blocks = True  # bypass the config's own check to reach the stack's
    with pytest.raises(ValueError, match="scan_blocks"):
        xLSTMBlockStack(cfg, key=jr.key(0))


# ------------------------------------------------------------------------------------------------
# PyTree behaviour


def test_filter_jit_and_filter_grad():
    model = built("v1")
    tokens = tokens_of(6)
    np.testing.assert_allclose(
        f64(forward(model, tokens)), f64(model(tokens)), rtol=1e-5, atol=1e-5
    )

    @eqx.filter_grad
    def loss(m, tokens):
        logits = m(tokens[:, :-1])
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))

    grads = eqx.filter_jit(loss)(model, tokens)
    assert jax.tree.structure(grads) == jax.tree.structure(eqx.filter(model, eqx.is_inexact_array))
    leaves = jax.tree.leaves(grads)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    gate_grad = grads.xlstm_block_stack.blocks.xlstm_res_block.layer.cell.fgate.kernel
    assert float(jnp.max(jnp.abs(gate_grad))) > 0
    # Rematerialisation (parallel.remat) changes memory, not math: same gradients.
    remat = ParallelConfig(remat=["mLSTMBlock", "xLSTMResBlock", "FFNResBlock"])
    remat_model = perturb(xLSTMLMModel(make_config("v1", parallel=remat), key=jr.key(0)), jr.key(1))
    assert remat_model.xlstm_block_stack.remat_blocks
    remat_grads = eqx.filter_jit(loss)(remat_model, tokens)
    for a, b in zip(leaves, jax.tree.leaves(remat_grads), strict=True):
        np.testing.assert_allclose(f64(a), f64(b), rtol=1e-4, atol=1e-6)


def test_tree_at_weight_surgery():
    model = built("v1")
    zero_head = eqx.tree_at(lambda m: m.lm_head.kernel, model, jnp.zeros((D, V), jnp.float32))
    np.testing.assert_array_equal(f64(forward(zero_head, tokens_of(7))), 0.0)
    assert float(jnp.max(jnp.abs(forward(model, tokens_of(7))))) > 0  # the original is untouched


def test_flatten_unflatten_round_trip():
    model = built("mixed")
    leaves, treedef = jax.tree_util.tree_flatten(model)
    rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
    assert tree_allclose(model, rebuilt, rtol=0, atol=0)
    tokens = tokens_of(8)
    np.testing.assert_array_equal(forward(model, tokens), forward(rebuilt, tokens))


def test_serialise_round_trip(tmp_path):
    model = built("v1")
    path = tmp_path / "model.eqx"
    eqx.tree_serialise_leaves(path, model)
    skeleton = xLSTMLMModel(make_config("v1"), key=jr.key(123))  # different weights
    assert not tree_allclose(skeleton, model)
    loaded = eqx.tree_deserialise_leaves(path, skeleton)
    assert tree_allclose(loaded, model, rtol=0, atol=0)


def test_pretty_print_and_eval_shape_count():
    cfg = make_config("mixed")
    model = xLSTMLMModel(cfg, key=jr.key(0))
    text = eqx.tree_pformat(model)
    for name in ("xLSTMLMModel(", "mLSTMLayer(", "sLSTMLayer(", "token_embedding=", "lm_head="):
        assert name in text
    skeleton = eqx.filter_eval_shape(xLSTMLMModel, cfg, key=jr.key(0))
    assert count_params(skeleton) == count_params(model)
    assert count_params(model) == sum(
        a.size for a in jax.tree.leaves(eqx.filter(model, eqx.is_array))
    )


# ------------------------------------------------------------------------------------------------
# dtypes, sequence length, borders, decode


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["v1", "mixed"])
def test_bfloat16_compute(kind):
    cfg32 = make_config(kind)
    cfg16 = make_config(kind, dtype="bfloat16", lm_head_dtype="bfloat16")
    m32 = perturb(xLSTMLMModel(cfg32, key=jr.key(0)), jr.key(1))
    m16 = perturb(xLSTMLMModel(cfg16, key=jr.key(0)), jr.key(1))
    # Parameters stay float32 whatever the compute dtype, and are the same.
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(eqx.filter(m16, eqx.is_array)))
    leaves16, leaves32 = (jax.tree.leaves(eqx.filter(m, eqx.is_array)) for m in (m16, m32))
    assert all(bool(jnp.all(a == b)) for a, b in zip(leaves16, leaves32, strict=True))
    tokens = tokens_of(9)
    lo, hi = forward(m16, tokens), forward(m32, tokens)
    assert lo.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(lo)))
    # Stated tolerance for bf16 compute (8-bit mantissa, ~0.4% per rounding) through 2-3 blocks:
    # max |Δlogit| ≤ 10% of max |logit| and mean |Δlogit| ≤ 5% of the logits' std (float32).
    err = jnp.abs(lo - hi)
    assert float(jnp.max(err)) <= 0.1 * float(jnp.max(jnp.abs(hi))), float(jnp.max(err))
    assert float(jnp.mean(err)) <= 0.05 * float(jnp.std(hi)), float(jnp.mean(err))
    assert float(jnp.std(hi)) > 0.3  # the comparison is not vacuous


@pytest.mark.slow
def test_same_model_at_several_lengths():
    model = built("v1", "chunkwise")  # chunk 4: S = 1, 5, 17 are below, off and above a multiple
    tokens = tokens_of(10, (2, 17))
    full = f64(forward(model, tokens))
    for s in (1, 5, 17):
        out = forward(model, tokens[:, :s])
        assert out.shape == (2, s, V)
        np.testing.assert_allclose(f64(out), full[:, :s], rtol=1e-5, atol=1e-5)


def test_document_borders_reset_only_after_border():
    model = built("v1")
    tokens = tokens_of(11)
    border = 5
    borders = jnp.zeros((2, S), bool).at[:, 0].set(True).at[:, border].set(True)
    with_b, without = forward(model, tokens, borders), model(tokens)  # eager: truly no borders
    np.testing.assert_allclose(f64(with_b[:, :border]), f64(without[:, :border]), atol=1e-5)
    assert float(jnp.min(jnp.max(jnp.abs(with_b[:, border:] - without[:, border:]), -1))) > 1e-4
    # After the reset the new document no longer sees the old one (v1 has no conv leak).
    other = tokens.at[:, :border].set((tokens[:, :border] + 3) % V)
    np.testing.assert_allclose(
        f64(forward(model, other, borders)[:, border:]), f64(with_b[:, border:]), atol=1e-4
    )


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["v1", "mixed"])
def test_prefill_and_step_match_forward(kind):
    """``call_with_state`` on a prompt from ``init_state`` (prefill), then on one token at a time
    (decode steps), gives the logits of the full forward pass."""
    model = built(kind, "parallel_stabilized")
    tokens = tokens_of(12)
    borders = jnp.zeros((2, S), bool).at[:, 0].set(True).at[0, 8].set(True)
    full = forward(model, tokens, borders)
    call_with_state = eqx.filter_jit(lambda m, t, s, b: m.call_with_state(t, s, document_borders=b))
    logits, state = call_with_state(model, tokens[:, :6], model.init_state(2), borders[:, :6])
    outs = [logits]
    for t in range(6, S):
        lt, state = call_with_state(model, tokens[:, t : t + 1], state, borders[:, t : t + 1])
        outs.append(lt)
    np.testing.assert_allclose(f64(jnp.concatenate(outs, 1)), f64(full), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# head options, dropout, errors


def test_tie_weights_and_post_blocks_norm():
    cfg = make_config("v1", tie_weights=True)
    tied = xLSTMLMModel(cfg, key=jr.key(0))
    untied = xLSTMLMModel(make_config("v1"), key=jr.key(0))
    assert tied.lm_head is None
    assert count_params(untied) - count_params(tied) == V * D
    tied = perturb(tied, jr.key(2))
    tokens = tokens_of(13)
    hidden = f64(tied.xlstm_block_stack(tied.embed(tokens)))
    normed = hidden / np.sqrt((hidden**2).mean(-1, keepdims=True) + 1e-6) * f64(tied.out_norm.scale)
    expected = 30.0 * np.tanh(normed @ f64(tied.token_embedding.embedding).T / 30.0)
    np.testing.assert_allclose(f64(tied(tokens)), expected, rtol=1e-4, atol=1e-5)
    no_norm = xLSTMLMModel(make_config("v1", add_post_blocks_norm=False), key=jr.key(0))
    assert no_norm.out_norm is None
    assert count_params(untied) - count_params(no_norm) == D
    # Gemma-2 style post-norms: one per sub-block (layer and FFN) of each of the 2 blocks.
    cfg = make_config("v1")
    cfg.mlstm_block.add_post_norm = True
    post = eqx.filter_eval_shape(
        xLSTMLMModel, make_config("v1", mlstm_block=cfg.mlstm_block), key=jr.key(0)
    )
    assert post.xlstm_block_stack.blocks.ffn_res_block.post_norm is not None
    assert count_params(post) - count_params(untied) == 2 * 2 * D


def test_init_distributions_of_embedding_and_head():
    cfg = make_config(
        "v1", init_distribution_embed="uniform", init_distribution_out="truncated_normal"
    )
    model = xLSTMLMModel(cfg, key=jr.key(0))
    std = math.sqrt(2 / (5 * D))  # small-init(D)
    emb, head = np.asarray(model.token_embedding.embedding), np.asarray(model.lm_head.kernel)
    assert np.abs(emb).max() <= math.sqrt(3) * std + 1e-7
    assert emb.std() == pytest.approx(std, rel=0.1)
    assert np.abs(head).max() <= 2 * std + 1e-7
    assert head.std() == pytest.approx(0.88 * std, rel=0.1)


def test_logits_soft_cap():
    model = built("v1")
    big = eqx.tree_at(lambda m: m.lm_head.kernel, model, 100.0 * model.lm_head.kernel)
    logits = forward(big, tokens_of(14))
    assert float(jnp.max(jnp.abs(logits))) <= 30.0
    assert float(jnp.max(jnp.abs(logits))) > 29.0
    uncapped = xLSTMLMModel(make_config("v1", logits_soft_cap=None), key=jr.key(0))
    uncapped = eqx.tree_at(lambda m: m.lm_head.kernel, uncapped, 1000.0 * uncapped.lm_head.kernel)
    assert float(jnp.max(jnp.abs(forward(uncapped, tokens_of(14))))) > 30.0


def test_dropout_only_with_key():
    cfg = make_config("v1", dropout=0.3, add_embedding_dropout=True)
    model = perturb(xLSTMLMModel(cfg, key=jr.key(0)), jr.key(1))
    tokens = tokens_of(15)
    run = eqx.filter_jit(lambda m, t, k: m(t, key=k))
    np.testing.assert_array_equal(forward(model, tokens), forward(model, tokens))
    a, b = run(model, tokens, jr.key(1)), run(model, tokens, jr.key(2))
    assert float(jnp.max(jnp.abs(a - b))) > 1e-3
    assert float(jnp.max(jnp.abs(a - forward(model, tokens)))) > 1e-3


def test_invalid_inputs_and_configs():
    with pytest.raises(ValueError, match="vocab_size"):
        xLSTMLMModel(make_config("v1", vocab_size=-1), key=jr.key(0))
    model = built("v1")
    with pytest.raises(ValueError, match="token id 64 .*vocab_size=64"):
        model(jnp.array([[1, 64]]))
    with pytest.raises(ValueError, match="token id -1"):
        model(jnp.array([[-1, 3]]))
    # (the test run's jaxtyping checker catches this first, as a TypeError; without it the model's
    # own ValueError fires — either way the message names document_borders)
    with pytest.raises((ValueError, TypeError), match="document_borders"):
        model(jnp.array([[1, 2]]), document_borders=jnp.array([[True, False, False]]))


@pytest.mark.parametrize("shape", [(4,), (1, 2, 3)], ids=["1-D", "3-D"])
def test_tokens_must_be_two_dimensional(shape):
    """(issue 14) Tokens that are not (B, S): the jaxtyping checker of the test run fires first
    (a TypeError naming tokens); without it, the model's own ValueError names the shape."""
    model = built("v1")
    tokens = jnp.ones(shape, jnp.int32)
    for method, extra in (("__call__", ()), ("call_with_state", (model.init_state(1),))):
        with pytest.raises((ValueError, TypeError), match="tokens"):
            getattr(model, method)(tokens, *extra)
        unchecked = inspect.unwrap(getattr(type(model), method))
        with pytest.raises(ValueError, match=r"^tokens must have shape \(B, S\)"):
            unchecked(model, tokens, *extra)


# ------------------------------------------------------------------------------------------------
# weight-decay mask


def test_decay_mask():
    model = xLSTMLMModel(make_config("mlstm", scan_blocks=False), key=jr.key(0))
    mask = decay_mask(model)
    assert jax.tree.structure(mask) == jax.tree.structure(model)
    assert mask.lm_head.kernel is True and mask.token_embedding.embedding is False
    assert mask.out_norm.scale is False
    layer = mask.xlstm_block_stack.blocks[0].xlstm_res_block.layer
    inner = layer.inner_layer
    assert layer.proj_up_mlstm.kernel and layer.proj_down.kernel
    assert inner.conv1d.kernel and not inner.conv1d.bias
    assert inner.q_proj.kernel and inner.mlstm_cell.igate.kernel
    assert not inner.mlstm_cell.igate.bias and not inner.learnable_skip
    assert not inner.mlstm_cell.outnorm.scale
    assert not mask.xlstm_block_stack.blocks[0].xlstm_res_block.norm.scale
    decayed = xLSTMLMModel(make_config("mlstm", weight_decay_on_embedding=True), key=jr.key(0))
    assert decay_mask(decayed).token_embedding.embedding is True


# ------------------------------------------------------------------------------------------------
# parameter counts of the reference configs (no allocation)


def mlstm_count(V, D, L, NH, I, K=4, blocksize=4):
    """Closed form for the Mamba-style model (factors 1, no bias, dense gates, no FFN)."""
    P = I // blocksize
    block = (
        D  # xlstm_norm
        + 2 * D * I  # proj_up_mlstm, proj_up_z
        + K * I
        + I  # conv kernel, bias
        + 3 * P * blocksize * blocksize  # q, k, v headwise
        + 2 * (3 * I * NH + NH)  # igate, fgate (kernel over [q|k|v], bias)
        + I  # outnorm (NH, DHV)
        + I  # learnable_skip
        + I * D  # proj_down
    )
    return 2 * V * D + D + L * block


def v1_count(V, D, L, NH, F, qk_factor=0.5):
    Dqk = int(D * qk_factor)
    block = (
        2 * D  # xlstm_norm, ffn_norm
        + 2 * D * Dqk  # dense_q, dense_k
        + 2 * D * D  # dense_v, dense_o
        + 2 * (D * NH + NH)  # igate, fgate
        + D  # outnorm
        + D * D  # proj_down
        + 3 * D * F  # SwiGLU FFN
    )
    return 2 * V * D + D + L * block


def test_reference_parameter_counts():
    counts = {}
    for name in ("mLSTMv1_165M", "mLSTM165M", "mLSTM120M"):
        skeleton = eqx.filter_eval_shape(xLSTMLMModel, PRESETS[name](), key=jr.key(0))
        assert isinstance(jax.tree.leaves(skeleton)[0], jax.ShapeDtypeStruct)  # nothing allocated
        counts[name] = count_params(skeleton)
    print("parameter counts:", counts)
    assert counts["mLSTMv1_165M"] == v1_count(50304, 768, 12, 4, 2112) == 164_073_312
    assert counts["mLSTM165M"] == mlstm_count(50304, 768, 24, 4, 1536) == 163_806_144
    assert counts["mLSTM120M"] == mlstm_count(50304, 768, 12, 4, 1536)
    assert math.isclose(counts["mLSTM165M"], 165e6, rel_tol=0.02)


@pytest.mark.parametrize("names", [[], ["mLSTMBlock"]])
def test_mlstm_block_remat_wraps_each_block(names):
    model = xLSTMLMModel(make_config("v1", parallel=ParallelConfig(remat=names)), key=jr.key(0))
    text = str(jax.make_jaxpr(lambda t: model(t))(jnp.zeros((1, 8), jnp.int32)))
    assert ("remat" in text) == bool(names)
