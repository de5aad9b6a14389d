"""The training objective: mean next-token cross-entropy in float32, its evaluation over held-out
windows, and the conversion to bits per byte."""

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, Int, PRNGKeyArray

from ..data.batch import TokenBatch, map_batch


# When to chunk (measured on small_llama with V=50304, B=1, S=2048, float32, 2-core CPU: the
# train step's temp+argument memory 1629 -> 943 MiB, same FLOPs, wall time 0.94x at chunks of 256,
# 1.02x at 64): the plain path's float32 logits, their softmax and gradient are each B·S·V floats;
# above this many logits they are computed chunk by chunk along the sequence instead.
CHUNK_LOGITS_THRESHOLD = 1 << 24
# Logits per chunk (B·C·V) that the automatic chunk length C aims at, and its lower bound.
CHUNK_LOGITS_TARGET = 1 << 24
MIN_CHUNK_TOKENS = 16


@runtime_checkable
class HiddenStatesModel(Protocol):
    """A language model split at its LM head (`xLSTMLMModel`, `LlamaTransformer`):
    ``model(t) == model.project_logits(model.hidden_states(t))``."""

    def hidden_states(self, tokens: Any, *, key: Any = None, **kwargs: Any) -> Any: ...

    def project_logits(self, h: Any) -> Any: ...


def loss_chunk_tokens(
    model: Any, batch_size: int, seq_len: int, chunk_size: int | None = None
) -> int | None:
    """Sequence positions per chunk of the loss, or None for the plain (whole-logits) path.

    ``chunk_size``: None chooses (chunk only when the model has `HiddenStatesModel`'s two pieces
    and ``B·S·V > CHUNK_LOGITS_THRESHOLD``, with ``C = max(MIN_CHUNK_TOKENS,
    CHUNK_LOGITS_TARGET // (B·V))`` rounded down to a power of two); 0 never chunks; ``N > 0``
    chunks by ``N`` (one chunk when ``N >= S``). Models without the pieces (e.g. a context-parallel
    wrapper) always take the plain path."""
    if chunk_size is not None and chunk_size < 0:
        raise ValueError(f"loss_chunk_size must be >= 0 (0: never chunk), got {chunk_size}")
    if chunk_size == 0 or not isinstance(model, HiddenStatesModel):
        return None
    if chunk_size is not None:
        return min(chunk_size, seq_len)
    vocab = int(getattr(model, "vocab_size", 0))
    if batch_size * seq_len * vocab <= CHUNK_LOGITS_THRESHOLD:
        return None
    tokens = max(MIN_CHUNK_TOKENS, CHUNK_LOGITS_TARGET // max(batch_size * vocab, 1))
    return min(1 << (tokens.bit_length() - 1), seq_len)


def chunked_cross_entropy(
    project_logits: Callable[[Array], Float[Array, "B C V"]],
    hidden: Float[Array, "B S D"],
    targets: Int[Array, "B S"],
    weights: Float[Array, "B S"],
    chunk: int,
) -> Float[Array, ""]:
    """``sum(weights · ce)`` in float32 (at least), where ``ce = logsumexp(logits) -
    logits[target]`` and ``logits = project_logits(hidden)``, computed ``chunk`` positions at a
    time in a ``lax.scan`` (the sequence zero-padded to a multiple of ``chunk``; the padding has
    weight 0): no more than one chunk's ``(B, chunk, V)`` logits ever exist.

    Differentiated, the forward scan also takes each chunk's gradient (``softmax - onehot`` back
    through the head) and keeps only the gradients of ``hidden`` and of the head's weights, so the
    backward pass recomputes nothing: the FLOPs are the plain path's. The weights and targets get
    no gradient. The head's weights are found by ``jax.closure_convert``."""
    B, S, _ = hidden.shape
    n = -(-S // chunk)
    pad = n * chunk - S
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets, weights = (jnp.pad(a, ((0, 0), (0, pad))) for a in (targets, weights))

    def to_chunks(a: Array) -> Array:  # (B, n·C, ...) -> (n, B, C, ...)
        return jnp.moveaxis(a.reshape(B, n, chunk, *a.shape[2:]), 1, 0)

    hs, ts, ws = to_chunks(hidden), to_chunks(targets), to_chunks(weights)
    # (a fresh function: closure_convert caches on it, and a bound method of a module holding
    # tracers cannot be hashed)
    head, consts = jax.closure_convert(lambda h: project_logits(h), hs[0])
    return _chunked_ce(head, hs, ts, ws, *consts)


def _at_least_float32(dtype: Any) -> Any:
    return dtype if jnp.finfo(dtype).bits >= 32 else jnp.float32


def _ce_scan(
    head: Callable[..., Array],
    hs: Array,
    ts: Array,
    ws: Array,
    consts: tuple[Array, ...],
    grads: bool,
) -> tuple[Array, Any]:
    """The scan of `chunked_cross_entropy` over ``(n, B, C, ...)`` chunks: the weighted sum, and
    with ``grads`` the gradients of ``hs`` (stacked per chunk) and of ``consts`` (summed)."""
    acc = _at_least_float32(ws.dtype)  # float32 (float64 in x64 tests)

    def body(carry: tuple[Array, Any], xs: tuple[Array, Array, Array]) -> tuple[Any, Any]:
        total, dconsts = carry
        h, t, w = xs
        if grads:
            logits, pullback = jax.vjp(head, h, *consts)
        else:
            logits, pullback = head(h, *consts), None
        z = logits.astype(_at_least_float32(logits.dtype))  # this chunk's copy only
        lse = jax.nn.logsumexp(z, axis=-1)
        picked = jnp.take_along_axis(z, t[..., None], axis=-1)[..., 0]
        total = total + jnp.sum((lse - picked) * w).astype(acc)
        if pullback is None:
            return (total, dconsts), None
        one_hot = jax.nn.one_hot(t, z.shape[-1], dtype=z.dtype)
        dz = (jnp.exp(z - lse[..., None]) - one_hot) * w[..., None].astype(z.dtype)
        dh, *dc = pullback(dz.astype(logits.dtype))
        return (total, jax.tree.map(jnp.add, dconsts, tuple(dc))), dh

    zeros = tuple(jnp.zeros_like(c) for c in consts) if grads else ()
    (total, dconsts), dhs = jax.lax.scan(body, (jnp.zeros((), acc), zeros), (hs, ts, ws))
    return total, (dhs, dconsts)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _chunked_ce(
    head: Callable[..., Array], hs: Array, ts: Array, ws: Array, *consts: Array
) -> Array:
    return _ce_scan(head, hs, ts, ws, consts, grads=False)[0]


def _chunked_ce_fwd(
    head: Callable[..., Array], hs: Array, ts: Array, ws: Array, *consts: Array
) -> tuple[Array, Any]:
    return _ce_scan(head, hs, ts, ws, consts, grads=True)


def _chunked_ce_bwd(head: Callable[..., Array], res: Any, g: Array) -> tuple[Any, ...]:
    dhs, dconsts = res
    scaled = tuple(g.astype(c.dtype) * c for c in dconsts)
    return (g.astype(dhs.dtype) * dhs, None, None, *scaled)


_chunked_ce.defvjp(_chunked_ce_fwd, _chunked_ce_bwd)


@jax.named_scope("loss")
def next_token_loss(
    model: Callable[..., Float[Array, "B S V"]],
    tokens: "Int[Array, 'B S1'] | TokenBatch",
    key: PRNGKeyArray | None = None,
    *,
    chunk_size: int | None = None,
) -> Float[Array, ""]:
    """Mean cross-entropy (nats) of predicting `tokens[:, 1:]` from `tokens[:, :-1]`, float32.

    A `TokenBatch` (packed fine-tuning examples) gives the model its document borders (the mLSTM
    memory reset, Llama's same-document mask) and averages only over the targets its loss mask
    selects, never a token that starts an example (nothing of its own example precedes it):
    `sum(mask · ce) / max(sum(mask), 1)`.

    Large vocabularies take the chunked path (`loss_chunk_tokens` decides from ``chunk_size``,
    the `TrainConfig.loss_chunk_size`): the model's hidden states, then `chunked_cross_entropy`,
    so the whole ``(B, S, V)`` logits (and their float32 copy and gradient) never exist."""
    batch = tokens if isinstance(tokens, TokenBatch) else None
    ids = tokens.tokens if isinstance(tokens, TokenBatch) else tokens
    inputs, targets = ids[:, :-1], ids[:, 1:]
    kwargs = {} if batch is None else {"document_borders": batch.document_borders[:, :-1]}
    chunk = loss_chunk_tokens(model, inputs.shape[0], inputs.shape[1], chunk_size)
    if batch is None:
        weights, count = None, float(targets.size)
    else:
        weights = (batch.loss_mask[:, 1:] & ~batch.document_borders[:, 1:]).astype(jnp.float32)
        count = jnp.maximum(jnp.sum(weights), 1.0)
    if chunk is None:
        logits = model(inputs, key=key, **kwargs)
        losses = optax.softmax_cross_entropy_with_integer_labels(
            logits.astype(jnp.float32), targets
        )
        return jnp.mean(losses) if weights is None else jnp.sum(losses * weights) / count
    assert isinstance(model, HiddenStatesModel)
    hidden = model.hidden_states(inputs, key=key, **kwargs)
    if weights is None:
        weights = jnp.ones(targets.shape, jnp.float32)
    return chunked_cross_entropy(model.project_logits, hidden, targets, weights, chunk) / count


@eqx.filter_jit
def _eval_batch_loss(model: Any, tokens: "Int[Array, 'B S1'] | TokenBatch") -> Float[Array, ""]:
    return next_token_loss(model, tokens, None)


def evaluate_loss(model: Any, batches: "Sequence[np.ndarray] | Sequence[TokenBatch]") -> float:
    """Mean held-out next-token loss (nats) over equally sized batches, deterministic (no key)
    (for `TokenBatch`es: the mean over batches of each batch's mean over its targets)."""
    losses = [float(_eval_batch_loss(model, map_batch(jnp.asarray, b))) for b in batches]
    return float(np.mean(losses))


def bits_per_byte(loss_nats_per_token: float, tokens_per_byte: float) -> float:
    return loss_nats_per_token * tokens_per_byte / math.log(2.0)
