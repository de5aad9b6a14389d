"""The chunked next-token loss (training/loss.py) and the models' split at the LM head.

Chunked and plain losses agree (loss and every gradient leaf), with and without a `TokenBatch`,
at chunk lengths that do and do not divide S, for both model kinds; the chunked cross-entropy
equals a float64 reference to float64 precision; the whole logits never exist in the chunked
path's compiled gradient; and each model's ``__call__`` is its head applied to its hidden states.
"""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest

from xlstm_eqx.core.timing import memory_analysis
from xlstm_eqx.data.batch import TokenBatch
from xlstm_eqx.models import build_model
from xlstm_eqx.presets import tiny_llama, tiny_xlstm
from xlstm_eqx.training import TrainConfig, make_train_step
from xlstm_eqx.training.loss import (
    CHUNK_LOGITS_THRESHOLD,
    chunked_cross_entropy,
    loss_chunk_tokens,
    next_token_loss,
)


VOCAB = 96
S1 = 21  # S = 20 positions: chunks of 6 leave a partial chunk of 2


def _model(kind: str, dtype: str = "float32"):
    """A tiny model with every piece of the head (xLSTM: tied embedding; both: a soft cap) and
    dropout, which acts when the loss passes a key."""
    if kind == "xlstm":
        cfg = dataclasses.replace(
            tiny_xlstm(),
            vocab_size=VOCAB,
            tie_weights=True,
            logits_soft_cap=5.0,
            dtype=dtype,
            dropout=0.1,
            add_embedding_dropout=True,
        )
    else:
        cfg = dataclasses.replace(
            tiny_llama(), vocab_size=VOCAB, logits_soft_cap=5.0, dtype=dtype, dropout_rate=0.1
        )
    return build_model(cfg, key=jr.key(0))


def _batch(packed: bool):
    tokens = jr.randint(jr.key(1), (2, S1), 0, VOCAB)
    if not packed:
        return tokens
    mask = jr.bernoulli(jr.key(2), 0.7, tokens.shape)
    borders = jr.bernoulli(jr.key(3), 0.15, tokens.shape).at[:, 0].set(True)
    return TokenBatch(tokens, mask, borders)


@eqx.filter_jit
def _loss_and_grads(model, batch, key, chunk_size):
    f = lambda m: next_token_loss(m, batch, key, chunk_size=chunk_size)  # noqa: E731
    return eqx.filter_value_and_grad(f)(model)


@eqx.filter_jit
def _plain_and_chunked(model, batch, key, chunk_size):
    """Loss and gradients of the plain path and of chunks of ``chunk_size``, one compile."""
    return _loss_and_grads(model, batch, key, 0), _loss_and_grads(model, batch, key, chunk_size)


def _assert_trees_close(a, b, rel: float) -> None:
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        scale = float(jnp.max(jnp.abs(x))) + 1e-30
        assert float(jnp.max(jnp.abs(x - y))) <= rel * scale


@pytest.mark.parametrize("kind", ["xlstm", "llama"])
def test_call_is_head_of_hidden_states(kind):
    """``model(t) == project_logits(hidden_states(t))`` bit for bit (jitted, with borders), and
    ``hidden_states`` is the block output after the final norm: (B, S, D) in the compute dtype."""
    model = _model(kind)
    batch = _batch(packed=True)
    assert isinstance(batch, TokenBatch)
    ids, borders = batch.tokens[:, :-1], batch.document_borders[:, :-1]

    @eqx.filter_jit
    def both(m, ids, borders):
        h = m.hidden_states(ids, document_borders=borders)
        return m(ids, document_borders=borders), m.project_logits(h), h

    logits, from_hidden, hidden = both(model, ids, borders)
    assert hidden.shape == (*ids.shape, model.embedding_dim) and hidden.dtype == jnp.float32
    assert logits.dtype == jnp.float32 and bool(jnp.all(logits == from_hidden))
    # the soft cap is applied (|logits| < cap) by the head, not by hidden_states
    assert float(jnp.max(jnp.abs(logits))) < 5.0


@pytest.mark.parametrize("kind", ["xlstm", "llama"])
@pytest.mark.parametrize("packed", [False, True], ids=["tokens", "TokenBatch"])
def test_chunked_equals_plain(kind, packed):
    """Loss and gradients of the chunked path (chunks of 6 over S = 20: a partial last chunk)
    equal the plain path's to float32 rounding; dropout keys are honoured the same way."""
    model = _model(kind)
    batch = _batch(packed)
    (ref_loss, ref_grads), (loss, grads) = _plain_and_chunked(model, batch, jr.key(4), 6)
    assert abs(float(loss) - float(ref_loss)) <= 1e-6 * abs(float(ref_loss))
    _assert_trees_close(grads, ref_grads, 2e-6)


def test_chunked_cross_entropy_float64():
    """In float64 the chunked sum and its gradients (hidden states and head weight) equal the
    direct formula over the whole logits to float64 rounding, with a partial last chunk."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        h = jnp.asarray(rng.normal(size=(3, 11, 8)))
        w = jnp.asarray(rng.normal(size=(8, 40)))
        t = jnp.asarray(rng.integers(0, 40, size=(3, 11)))
        wt = jnp.asarray(rng.uniform(size=(3, 11)))

        def head(w, x):
            return 4.0 * jnp.tanh((x @ w) / 4.0)

        def direct(h, w):
            logits = head(w, h)
            picked = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
            return jnp.sum((jax.nn.logsumexp(logits, axis=-1) - picked) * wt)

        def chunked(h, w):
            return chunked_cross_entropy(lambda x: head(w, x), h, t, wt, 4)

        ref, ref_g = jax.value_and_grad(direct, argnums=(0, 1))(h, w)
        got, got_g = jax.value_and_grad(chunked, argnums=(0, 1))(h, w)
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(float(got), float(ref), rtol=1e-13)
        for a, b in zip(got_g, ref_g, strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-11, atol=1e-13)


def test_chunked_bfloat16_finite_and_close():
    """bf16 compute: the chunked loss and gradients are finite, the loss close to the plain
    bf16 path and to float32."""
    batch = _batch(packed=True)
    loss32 = eqx.filter_jit(next_token_loss)(_model("llama"), batch, chunk_size=0)
    (plain, _), (loss, grads) = _plain_and_chunked(_model("llama", "bfloat16"), batch, None, 6)
    assert loss.dtype == jnp.float32
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    assert abs(float(loss) - float(plain)) <= 1e-3 * float(plain)
    assert abs(float(loss) - float(loss32)) <= 2e-2 * float(loss32)


def test_chunked_gradient_never_holds_the_whole_logits():
    """Compiled memory of the gradient: the plain path holds several (B, S, V) float32 arrays
    (logits, softmax, their gradient); the chunked one only a chunk's."""
    B, S, D, V = 2, 512, 16, 2048
    logits_bytes = B * S * V * 4
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.normal(size=(B, S, D)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(D, V)), jnp.float32)
    t = jnp.asarray(rng.integers(0, V, size=(B, S)))
    ones = jnp.ones((B, S), jnp.float32)

    def plain(h, w):
        logits = h @ w
        picked = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
        return jnp.sum(jax.nn.logsumexp(logits, axis=-1) - picked)

    def chunked(h, w):
        return chunked_cross_entropy(lambda x: x @ w, h, t, ones, 32)

    def temp_bytes(f):
        compiled = jax.jit(jax.grad(f, argnums=(0, 1))).lower(h, w).compile()
        m = memory_analysis(compiled)
        assert m is not None
        return m.temp_size_in_bytes

    assert temp_bytes(plain) >= logits_bytes
    assert temp_bytes(chunked) < logits_bytes // 4


def test_loss_chunk_tokens_rule():
    """None chooses (plain below the threshold, a power of two above it), 0 never chunks, N
    chunks by N (at most S), a negative size is refused naming the option, and a model without
    the two pieces (e.g. a wrapper) keeps the plain path."""
    model = _model("llama")
    assert loss_chunk_tokens(model, 2, 20) is None
    assert loss_chunk_tokens(model, 2, 20, 0) is None
    assert loss_chunk_tokens(model, 2, 20, 6) == 6
    assert loss_chunk_tokens(model, 2, 20, 64) == 20
    S = CHUNK_LOGITS_THRESHOLD // (2 * VOCAB) + 1
    chunk = loss_chunk_tokens(model, 2, S)
    assert chunk is not None and chunk & (chunk - 1) == 0 and chunk <= S
    assert loss_chunk_tokens(lambda t, **kw: t, 2, S, 6) is None
    with pytest.raises(ValueError, match="loss_chunk_size"):
        loss_chunk_tokens(model, 2, 20, -1)


def test_train_config_loss_chunk_size():
    """`--loss-chunk-size`: None by default, 0 allowed, negative refused naming the field."""
    assert TrainConfig().loss_chunk_size is None
    assert TrainConfig(loss_chunk_size=0).loss_chunk_size == 0
    with pytest.raises(ValueError, match="loss.chunk.size"):
        TrainConfig(loss_chunk_size=-2)


def test_train_step_takes_the_chunk_size():
    """`make_train_step(loss_chunk_size=N)` runs the chunked loss, whose loss equals the plain
    one (no dropout here: the step draws its own keys)."""
    model = build_model(dataclasses.replace(tiny_llama(), vocab_size=VOCAB), key=jr.key(0))
    tokens = jr.randint(jr.key(1), (2, S1), 0, VOCAB)
    opt = optax.sgd(0.0)
    opt_state = opt.init(eqx.filter(model, eqx.is_inexact_array))
    plain = eqx.filter_jit(next_token_loss)(model, tokens, chunk_size=0)
    step = make_train_step(opt, loss_chunk_size=6)
    _, _, loss, _ = step((tokens[None], jr.key(0)), model, opt_state)
    assert abs(float(loss) - float(plain)) <= 1e-6 * float(plain)
