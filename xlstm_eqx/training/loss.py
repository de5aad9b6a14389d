"""The training objective: mean next-token cross-entropy in float32, its evaluation over held-out
windows, and the conversion to bits per byte."""

import math
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, Int, PRNGKeyArray

from ..data.batch import TokenBatch, map_batch


# steps


@jax.named_scope("loss")
def next_token_loss(
    model: Callable[..., Float[Array, "B S V"]],
    tokens: "Int[Array, 'B S1'] | TokenBatch",
    key: PRNGKeyArray | None = None,
) -> Float[Array, ""]:
    """Mean cross-entropy (nats) of predicting `tokens[:, 1:]` from `tokens[:, :-1]`, float32.

    A `TokenBatch` (packed fine-tuning examples) gives the model its document borders (the mLSTM
    memory reset, Llama's same-document mask) and averages only over the targets its loss mask
    selects, never a token that starts an example (nothing of its own example precedes it):
    `sum(mask · ce) / max(sum(mask), 1)`."""
    if not isinstance(tokens, TokenBatch):
        logits = model(tokens[:, :-1], key=key)
        losses = optax.softmax_cross_entropy_with_integer_labels(
            logits.astype(jnp.float32), tokens[:, 1:]
        )
        return jnp.mean(losses)
    ids, loss_mask, borders = tokens
    logits = model(ids[:, :-1], key=key, document_borders=borders[:, :-1])
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), ids[:, 1:])
    mask = (loss_mask[:, 1:] & ~borders[:, 1:]).astype(jnp.float32)
    return jnp.sum(losses * mask) / jnp.maximum(jnp.sum(mask), 1.0)


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
