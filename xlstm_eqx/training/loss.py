"""The training objective: mean next-token cross-entropy in float32, its evaluation over held-out
windows, and the conversion to bits per byte."""

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


# When to chunk (measured, see the commit message of the chunked loss): the plain path's float32
# logits, their softmax and their gradient are each B·S·V floats; above this many the logits are
# instead computed chunk by chunk along the sequence.
CHUNK_LOGITS_THRESHOLD = 1 << 23
# Logits per chunk (B·C·V) that the automatic chunk length C aims at, and its lower bound.
CHUNK_LOGITS_TARGET = 1 << 22
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


def _at_least_float32(dtype: Any) -> Any:
    return dtype if jnp.finfo(dtype).bits >= 32 else jnp.float32


def chunked_cross_entropy(
    project_logits: Callable[[Array], Float[Array, "B C V"]],
    hidden: Float[Array, "B S D"],
    targets: Int[Array, "B S"],
    weights: Float[Array, "B S"],
    chunk: int,
) -> Float[Array, ""]:
    """``sum(weights · ce)`` in float32 (at least), where ``ce = logsumexp(logits) - logits[target]`` and
    ``logits = project_logits(hidden)``, computed ``chunk`` positions at a time in a
    ``lax.scan`` whose body is rematerialised: neither the forward nor the backward ever holds
    more than one chunk's ``(B, chunk, V)`` logits (the sequence is zero-padded to a multiple of
    ``chunk``; the padding has weight 0)."""
    B, S, _ = hidden.shape
    n = -(-S // chunk)
    pad = n * chunk - S
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets, weights = (jnp.pad(a, ((0, 0), (0, pad))) for a in (targets, weights))

    def to_chunks(a: Array) -> Array:  # (B, n·C, ...) -> (n, B, C, ...)
        return jnp.moveaxis(a.reshape(B, n, chunk, *a.shape[2:]), 1, 0)

    acc = _at_least_float32(weights.dtype)  # float32 (float64 in x64 tests)

    @jax.checkpoint
    def body(total: Array, xs: tuple[Array, Array, Array]) -> tuple[Array, None]:
        h, t, w = xs
        logits = project_logits(h)
        logits = logits.astype(_at_least_float32(logits.dtype))  # this chunk's copy only
        picked = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
        ce = jax.nn.logsumexp(logits, axis=-1) - picked
        return total + jnp.sum(ce * w).astype(acc), None

    zero = jnp.zeros((), acc)
    total, _ = jax.lax.scan(body, zero, (to_chunks(hidden), to_chunks(targets), to_chunks(weights)))
    return total


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
