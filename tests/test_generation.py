"""Generation: greedy decoding equals the full forward pass, sampling filters, streaming, checks.

Greedy reference: the models are causal, so the logits a full forward pass gives at position t of
the *final* sequence are exactly the logits of the prefix ``out[:, :t+1]``. Greedy decoding is
correct iff every generated token is the argmax of the full-forward logits at the previous
position — one teacher-forced forward pass replaces recomputing the forward pass per step.
"""

import re
import traceback
from typing import Any

import equinox as eqx
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import xlstm_eqx as X
import xlstm_eqx.generation as gen
from xlstm_eqx import (
    LlamaTransformer,
    generate,
    mLSTMBackendNameAndKwargs,
    mLSTMBlockConfig,
    mLSTMCellConfig,
    mLSTMLayerConfig,
    sample_logits,
    stream_generate,
    stream_text,
    xLSTMLMModel,
    xLSTMLMModelConfig,
)
from xlstm_eqx.generation import text_pieces
from xlstm_eqx.presets import tiny_llama, tiny_xlstm, tiny_xlstm_slstm
from xlstm_eqx.xlstm.mlstm_layer_v1 import mLSTMLayerV1Decode


V = 64
P = 7  # prompt length: not a multiple of the chunk size below
N = 16  # new tokens


def _tiny_mlstm_chunkwise() -> xLSTMLMModelConfig:
    """2 "mlstm" (Mamba-style) blocks, chunkwise backend with chunk 4, so the prompt's prefill
    crosses a chunk border and ends inside a chunk."""
    cell = mLSTMCellConfig(
        backend=mLSTMBackendNameAndKwargs(name="chunkwise", kwargs={"chunk_size": 4})
    )
    return xLSTMLMModelConfig(
        vocab_size=V,
        embedding_dim=32,
        num_blocks=2,
        context_length=64,
        dtype="float32",
        lm_head_dtype="float32",
        scan_blocks=True,
        mlstm_block=mLSTMBlockConfig(
            mlstm=mLSTMLayerConfig(
                layer_type="mlstm", num_heads=4, qkv_proj_blocksize=4, mlstm_cell=cell
            )
        ),
    )


_CONFIGS = {
    "mlstm_v1": tiny_xlstm,  # v1 layer + SwiGLU FFN, scanned blocks, parallel backend
    "mlstm": _tiny_mlstm_chunkwise,
    "mlstm+slstm": tiny_xlstm_slstm,  # mLSTM, sLSTM, mLSTM blocks, unscanned
    "llama": tiny_llama,
}
_MODELS: dict = {}


def tiny_model(name: str):
    """Tiny random model, built once per test session (building/compiling is the slow part)."""
    if name not in _MODELS:
        cfg = _CONFIGS[name]()
        cls = LlamaTransformer if name == "llama" else xLSTMLMModel
        _MODELS[name] = cls(cfg, key=jr.key(7))
    return _MODELS[name]


def random_prompt(B: int = 2, seed: int = 1) -> jax.Array:
    return jr.randint(jr.key(seed), (B, P), 0, V, dtype=jnp.int32)


@eqx.filter_jit
def _forward(model, tokens):
    """The plain full forward pass (``__call__``), logits ``(B, S, V)``."""
    return model(tokens)


# ------------------------------------------------------------------------------------------------
# greedy == full forward + argmax


@pytest.mark.slow
@pytest.mark.parametrize("name", list(_CONFIGS))
def test_greedy_equals_full_forward_argmax(name):
    """Step by step: full forward pass over the sequence so far, argmax at its last position,
    append. (The sequence lives in a fixed ``(B, P+N)`` buffer, zero-padded on the right, so one
    compiled forward serves every step; the models are causal, so the padding after the last
    real token cannot change its logits.)"""
    model = tiny_model(name)
    prompt = random_prompt()
    out = generate(model, prompt, N)
    assert out.shape == (2, P + N) and out.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(out[:, :P]), np.asarray(prompt))

    buf = np.zeros((2, P + N), np.int32)
    buf[:, :P] = np.asarray(prompt)
    for t in range(P, P + N):
        logits = _forward(model, jnp.asarray(buf))
        buf[:, t] = np.asarray(logits[:, t - 1]).argmax(-1)
    np.testing.assert_array_equal(np.asarray(out), buf)
    # temperature 0 with a key is greedy too
    np.testing.assert_array_equal(
        np.asarray(generate(model, prompt, N, temperature=0.0, key=jr.key(3))), buf
    )


# ------------------------------------------------------------------------------------------------
# sampling through generate (one compiled sampler per model: top_k=10 with a top_p)

_SAMPLED = ["mlstm", "llama"]


def _sample(model, key, temperature=1.0, top_p=0.99):
    return generate(
        model, random_prompt(), N, temperature=temperature, top_k=10, top_p=top_p, key=key
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", _SAMPLED)
def test_top_k_1_and_tiny_top_p_equal_greedy(name):
    model = tiny_model(name)
    prompt = random_prompt()
    greedy = np.asarray(generate(model, prompt, N))
    k1 = generate(model, prompt, N, temperature=1.5, top_k=1, key=jr.key(11))
    np.testing.assert_array_equal(np.asarray(k1), greedy)
    p0 = _sample(model, jr.key(12), temperature=1.5, top_p=1e-6)
    np.testing.assert_array_equal(np.asarray(p0), greedy)


@pytest.mark.parametrize("name", _SAMPLED)
def test_sampling_reproducible_and_key_dependent(name):
    model = tiny_model(name)
    a, b, c = (np.asarray(_sample(model, jr.key(s))) for s in (0, 0, 1))
    np.testing.assert_array_equal(a, b)
    # near-uniform 10-way draws: 32 equal tokens by chance is impossible in practice
    assert not np.array_equal(a, c)
    # sampling is not greedy here (the greedy checks above would be vacuous otherwise)
    assert not np.array_equal(a, np.asarray(generate(model, random_prompt(), N)))


@pytest.mark.parametrize("name", _SAMPLED)
def test_sampled_tokens_inside_top_k(name):
    model = tiny_model(name)
    out = _sample(model, jr.key(4), temperature=3.0, top_p=1.0)
    logits = np.asarray(_forward(model, out), np.float64)[:, P - 1 : -1]  # predicted each new token
    chosen = np.take_along_axis(logits, np.asarray(out[:, P:])[..., None], axis=-1)[..., 0]
    kth = np.sort(logits, axis=-1)[..., -10]
    assert (chosen >= kth - 1e-5).all()
    # ... and not all from the top few (the filter is what keeps them inside)
    rank = (logits > chosen[..., None]).sum(-1)
    assert rank.max() >= 3


@pytest.mark.slow
@pytest.mark.parametrize("name", _SAMPLED)
def test_stream_generate_matches_generate(name):
    model = tiny_model(name)
    kw: dict[str, Any] = dict(temperature=0.9, top_k=10, top_p=0.99, key=jr.key(21))
    streamed = list(stream_generate(model, random_prompt(), N, **kw))
    assert len(streamed) == N and all(t.shape == (2,) and t.dtype == np.int32 for t in streamed)
    np.testing.assert_array_equal(
        np.stack(streamed, axis=1), np.asarray(_sample(model, kw["key"], 0.9))[:, P:]
    )


def test_no_recompilation_per_token(monkeypatch):
    """The decode step is traced at most once for a whole stream and for a whole ``generate``
    scan (0 times if an earlier test compiled the same shapes), and so is the prefill (which ends
    in one decode step of its own, counted apart); changing temperature / top_p / key does not
    retrace."""
    model = tiny_model("mlstm")
    traces = {"prefill": 0, "per-token": 0}
    real_step = gen.decode_step

    def counting_step(*args):
        in_prefill = any(frame.name == "prefill" for frame in traceback.extract_stack())
        traces["prefill" if in_prefill else "per-token"] += 1
        return real_step(*args)

    monkeypatch.setattr(gen, "decode_step", counting_step)
    for t, p in ((0.5, 0.8), (1.5, 0.95)):
        kw: dict[str, Any] = dict(temperature=t, top_k=10, top_p=p, key=jr.key(int(10 * t)))
        assert len(list(stream_generate(model, random_prompt(), N, **kw))) == N
    assert traces["per-token"] <= 1 and traces["prefill"] <= 1, traces
    traces.update({"prefill": 0, "per-token": 0})
    for t, p in ((0.7, 0.5), (1.3, 0.9)):
        _sample(model, jr.key(2), temperature=t, top_p=p)
    assert traces["per-token"] <= 1 and traces["prefill"] <= 1, traces


def test_llama_decode_step_updates_the_kv_cache_in_place():
    """One compiled decode step (state donated) holds no copy of the whole stacked KV cache: the
    layers read it and the stack writes the new keys and values once, in place. (When each
    layer's slice went through the scan's xs/ys, XLA copied the whole cache 3 times per token
    for this model.)"""
    model = tiny_model("llama")
    state = model.init_state(2, 64)
    params, static = eqx.partition(model, eqx.is_array)
    step = jax.jit(lambda p, s, t: gen.decode_step(eqx.combine(p, static), s, t), donate_argnums=1)
    hlo = step.lower(params, state, jnp.zeros((2,), jnp.int32)).compile().as_text() or ""
    cache = f"f32[{','.join(map(str, state.keys.shape))}]"
    assert state.keys.dtype == jnp.float32 and cache in hlo  # the cache is in the program
    assert re.findall(rf"= {re.escape(cache)}\{{[\d,]*\}} copy\(", hlo) == []


def test_zero_new_tokens_returns_prompt():
    prompt = random_prompt()
    out = generate(tiny_model("llama"), prompt, 0)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(prompt))
    assert list(stream_generate(tiny_model("mlstm"), prompt, 0)) == []


class _Bytes64:
    """A stand-in tokenizer for the vocab-64 models: id i is the byte 0x30 + i (ASCII digits,
    letters, punctuation), decoded as UTF-8 with replacement like the package's byte tokenizer."""

    def encode(self, text):
        return np.frombuffer(text.encode(), np.uint8).astype(np.int32) - 0x30

    def decode(self, ids):
        return bytes((np.asarray(ids) + 0x30).astype(np.uint8)).decode("utf-8", errors="replace")


class _Utf8Bytes:
    def decode(self, ids):
        return bytes(np.asarray(ids, np.uint8)).decode("utf-8", errors="replace")


def test_stream_text_matches_generate():
    model, tok = tiny_model("llama"), _Bytes64()
    prompt = "DEF:F9=X1"  # bytes 0x30..0x6F: ids 0..63
    kw: dict[str, Any] = dict(temperature=0.9, top_k=10, key=jr.key(5))
    pieces = list(stream_text(model, tok, prompt, N, **kw))
    ids = jnp.asarray(tok.encode(prompt))[None, :]
    expect = tok.decode(np.asarray(generate(model, ids, N, **kw))[0, ids.shape[1] :])
    assert "".join(pieces) == expect and all(pieces)
    with pytest.raises(ValueError, match="encodes to no tokens"):
        stream_text(model, tok, "", 4)


def test_text_pieces_never_split_a_character():
    text = "héllo €1 ✓"
    ids = list(text.encode())
    pieces = list(text_pieces(iter(np.asarray([[i]]) for i in ids), _Utf8Bytes(), len(ids)))
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert len(pieces) == len(text)  # one piece per character: nothing held back needlessly
    # an invalid byte at the very end is still emitted (as U+FFFD) when the stream ends
    tail = list(text_pieces(iter(np.asarray([[i]]) for i in [0x41, 0xC3]), _Utf8Bytes(), 2))
    assert "".join(tail) == "A\ufffd"


# ------------------------------------------------------------------------------------------------
# sample_logits against NumPy float64


def _allowed(logits: np.ndarray, temperature: float, top_k, top_p) -> np.ndarray:
    """Boolean (B, V): tokens the filters keep, from the definitions in float64 (with a small
    tolerance at the borders, where float32 rounding may decide either way)."""
    z = logits.astype(np.float64) / temperature
    B, Vn = z.shape
    keep = np.ones_like(z, dtype=bool)
    if top_k is not None:
        kth = np.sort(z, axis=-1)[:, -top_k][:, None]
        keep &= z >= kth - 1e-6
    if top_p is not None:
        for b in range(B):
            cand = np.where(keep[b])[0]
            order = cand[np.argsort(-z[b, cand], kind="stable")]
            p = np.exp(z[b, order] - z[b, order].max())
            p /= p.sum()
            before = np.cumsum(p) - p
            row = np.zeros(Vn, dtype=bool)
            row[order[before < top_p + 1e-5]] = True
            keep[b] &= row
    return keep


@eqx.filter_jit
def _draw_jit(logits, keys, temperature, top_k, top_p):
    return jax.vmap(
        lambda k: sample_logits(logits, k, temperature=temperature, top_k=top_k, top_p=top_p)
    )(keys)


def _draw(logits, n, seed, *, temperature, top_k, top_p) -> np.ndarray:
    """``n`` independent draws ``(n, B)``; temperature and top_p traced (fewer compiles)."""
    keys = jr.split(jr.key(seed), n)
    t = jnp.asarray(temperature, jnp.float32)
    p = None if top_p is None else jnp.asarray(top_p, jnp.float32)
    return np.asarray(_draw_jit(logits, keys, t, top_k, p))


@hypothesis.settings(max_examples=8)
@hypothesis.given(
    vocab=st.sampled_from([2, 7, 40]),
    data=st.data(),
    temperature=st.floats(0.2, 3.0),
    seed=st.integers(0, 2**16),
)
def test_samples_inside_top_k_and_nucleus(vocab, data, temperature, seed):
    top_k = data.draw(st.none() | st.integers(1, vocab), label="top_k")
    top_p = data.draw(st.none() | st.floats(0.05, 1.0), label="top_p")
    logits = np.asarray(
        jr.normal(jr.key(seed), (3, vocab), jnp.float32) * data.draw(st.floats(0.1, 8.0))
    )
    samples = _draw(
        jnp.asarray(logits), 64, seed, temperature=temperature, top_k=top_k, top_p=top_p
    )
    allowed = _allowed(logits, temperature, top_k, top_p)
    for b in range(3):
        assert allowed[b, samples[:, b]].all()


def test_sampling_frequencies_match_filtered_softmax():
    """Empirical frequencies of 20k draws vs the float64 target distribution: temperature,
    then top-k, then nucleus renormalised over what is kept."""
    logits = np.array([[2.0, 1.5, 1.0, 0.2, -1.0, 0.7]], np.float32)
    temperature, top_k, top_p = 0.8, 4, 0.85
    z = logits[0].astype(np.float64) / temperature
    order = np.argsort(-z)[:top_k]
    p = np.exp(z[order] - z[order].max())
    p /= p.sum()
    kept = order[(np.cumsum(p) - p) < top_p]
    target = np.zeros(6)
    target[kept] = np.exp(z[kept] - z[kept].max())
    target /= target.sum()
    assert 2 <= len(kept) < top_k  # both filters matter for this example
    n = 20_000
    samples = _draw(jnp.asarray(logits), n, 0, temperature=temperature, top_k=top_k, top_p=top_p)
    freq = np.bincount(samples[:, 0], minlength=6) / n
    np.testing.assert_allclose(freq, target, atol=0.015)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_sample_logits_greedy_rules(dtype):
    logits = jnp.asarray([[0.1, 3.0, -2.0, 2.5], [5.0, 4.5, 0.0, -1.0]], dtype)
    expect = np.array([1, 0])
    cases: tuple[dict[str, Any], ...] = (
        dict(key=None),  # no key: greedy whatever the temperature
        dict(key=jr.key(0), temperature=0.0),
        dict(key=jr.key(0), temperature=0),
        dict(key=jr.key(0), top_k=1, temperature=5.0),
        dict(key=jr.key(0), top_p=1e-6, temperature=5.0),
    )
    for kwargs in cases:
        got = sample_logits(logits, **kwargs)
        assert got.dtype == jnp.int32
        np.testing.assert_array_equal(np.asarray(got), expect)


# ------------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize(
    "bad_id, shown", [(V, f"token id {V}"), (-1, "token id -1")], ids=["too_big", "negative"]
)
@pytest.mark.parametrize("name", ["mlstm", "llama"])
def test_token_ids_outside_vocab(name, bad_id, shown):
    prompt = random_prompt().at[1, 3].set(bad_id)
    with pytest.raises(ValueError, match=f"{shown} is outside the vocabulary.*vocab_size={V}"):
        generate(tiny_model(name), prompt, 4)
    with pytest.raises(ValueError, match=shown):
        stream_generate(tiny_model(name), prompt, 4)  # raised at the call, before any next()


def test_kv_cache_too_small():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=rf"{P} \+ max_new_tokens 10 = {P + 10}.*max_len=12"):
        generate(model, random_prompt(), 10, max_len=12)
    with pytest.raises(ValueError, match="max_len=12"):
        stream_generate(model, random_prompt(), 10, max_len=12)
    # exactly full is fine, and a larger cache gives the same greedy tokens
    a = generate(model, random_prompt(), 5, max_len=P + 5)
    b = generate(model, random_prompt(), 5, max_len=P + 20)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="KV-cache models only"):
        generate(tiny_model("mlstm"), random_prompt(), 4, max_len=100)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(temperature=-0.5), "temperature must be >= 0"),
        (dict(top_k=0), r"top_k must be in \[1, vocab_size=64\], got 0"),
        (dict(top_k=V + 1), r"top_k must be in \[1, vocab_size=64\], got 65"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\], got 0.0"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\], got 1.5"),
    ],
)
def test_bad_sampling_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate(tiny_model("mlstm"), random_prompt(), 4, key=jr.key(0), **kwargs)


def test_bad_lengths_and_model():
    model = tiny_model("mlstm")
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0, got -1"):
        generate(model, random_prompt(), -1)
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, jnp.zeros((2, 0), jnp.int32), 4)
    with pytest.raises(TypeError, match="Linear has no decode API"):
        generate(eqx.nn.Linear(2, 2, key=jr.key(0)), random_prompt(), 4)


def test_recurrent_step_fast_path_equals_careful_path():
    """The decode step's fast path (finite token and state: no replacement, detection or NaN
    add-back) gives the careful path's output and state bit for bit; a -inf input gate (a valid
    limit the predicate routes to the careful path) too, and its state stays the limit's."""
    rng = np.random.default_rng(3)
    b, nh, dqk, dv = 2, 3, 8, 5

    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape), jnp.float32)

    state = X.mLSTMState(c=normal(b, nh, dqk, dv), n=normal(b, nh, dqk), m=normal(b, nh))
    token = (
        normal(b, nh, dqk),
        normal(b, nh, dqk),
        normal(b, nh, dv),
        normal(b, nh),
        normal(b, nh),
    )
    step = jax.jit(X.mlstm_recurrent_step, static_argnames="fast_path")
    for igate in (token[3], token[3].at[0, 1].set(-jnp.inf)):
        args = (state, *token[:3], igate, token[4])
        fast, careful = step(*args), step(*args, fast_path=False)
        assert np.all(np.isfinite(np.asarray(fast[0])))
        for x, y in zip(jax.tree.leaves(fast), jax.tree.leaves(careful), strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("name", ["mlstm_v1", "mlstm"])
def test_decode_view_is_bit_identical(name):
    """`decode_view` (once per generate call) unstacks a scanned stack and its state and gives
    every mlstm_v1 layer one q|k|v|o kernel: a B = 1 decode step from it has the logits and
    states of the plain model bit for bit, with fewer matrix products for mlstm_v1 and no loop
    over the blocks. The stored model is untouched (same leaves and paths, no
    decode-only field)."""
    model = tiny_model(name)
    paths = [p for p, _ in jax.tree_util.tree_leaves_with_path(model)]
    state, token = model.init_state(1), jnp.asarray([3], jnp.int32)
    plain = jax.jit(gen.decode_step).lower(model, state, token).compile()
    _, state = plain(model, state, token)  # a memory that is not empty
    ready, ready_state = gen.decode_view(model, state)
    stack = ready.xlstm_block_stack
    assert isinstance(stack.blocks, tuple) and len(stack.blocks) == stack.num_blocks
    layers = [b.xlstm_res_block.layer for b in stack.blocks]
    fused = name == "mlstm_v1"
    assert all(isinstance(x, mLSTMLayerV1Decode) == fused for x in layers)
    if fused:
        assert layers[0].qkvo_kernel.shape[-1] == sum(
            d.kernel.shape[-1]
            for d in (
                layers[0].layer.dense_q,
                layers[0].layer.dense_k,
                layers[0].layer.dense_v,
                layers[0].layer.dense_o,
            )
        )
    step = jax.jit(gen.decode_step).lower(ready, ready_state, token).compile()
    step_hlo, plain_hlo = step.as_text() or "", plain.as_text() or ""
    want_logits, want_state = plain(model, state, token)
    got_logits, got_state = step(ready, ready_state, token)
    np.testing.assert_array_equal(np.asarray(got_logits), np.asarray(want_logits))
    want_state = model.xlstm_block_stack.unstack_state(want_state)
    for x, y in zip(jax.tree.leaves(got_state), jax.tree.leaves(want_state), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert " while(" not in step_hlo and " while(" in plain_hlo
    if fused:  # fewer products than the same unstacked model without the fused kernels
        unfused = eqx.tree_at(
            lambda m: m.xlstm_block_stack, model, model.xlstm_block_stack.unstacked()
        )
        four = jax.jit(gen.decode_step).lower(unfused, ready_state, token).compile()
        assert step_hlo.count(" dot(") < (four.as_text() or "").count(" dot(")
    assert [p for p, _ in jax.tree_util.tree_leaves_with_path(model)] == paths
    assert not any("qkvo" in jax.tree_util.keystr(p) for p in paths)


def test_decode_view_keeps_a_large_scanned_stack_scanned(monkeypatch):
    """Above `UNSTACK_MAX_BYTES` the stack stays scanned (no second copy of a large model's
    parameters during generation); its greedy tokens are those of the unstacked view."""
    model = tiny_model("mlstm")
    assert not isinstance(model.xlstm_block_stack.blocks, tuple)
    prompt = jnp.asarray([[1, 2, 3]], jnp.int32)
    unstacked = np.asarray(gen.generate(model, prompt, max_new_tokens=4))
    assert gen.parameter_bytes(model.xlstm_block_stack) > 0
    monkeypatch.setattr(gen, "UNSTACK_MAX_BYTES", 0)
    ready, ready_state = gen.decode_view(model, model.init_state(1))
    assert not isinstance(ready.xlstm_block_stack.blocks, tuple)
    assert jax.tree.structure(ready_state) == jax.tree.structure(model.init_state(1))
    jax.clear_caches()  # the bound is read while tracing: trace `generate` again
    eqx.clear_caches()
    np.testing.assert_array_equal(
        np.asarray(gen.generate(model, prompt, max_new_tokens=4)), unstacked
    )
