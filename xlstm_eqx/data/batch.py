"""`TokenBatch`: a batch of packed examples with their loss mask and document borders.

Pretraining batches stay plain int arrays `(..., S+1)`. Supervised fine-tuning batches carry two
more arrays of the same shape, so every field is sliced, scanned and placed like the tokens:
`loss_mask[..., t]` says whether token `t` is a target of the loss (a completion token), and
`document_borders[..., t]` whether token `t` starts an example (the mLSTM memory reset, Llama's
same-document attention mask). Per token the store keeps both in one `uint8` flag (`FLAG_TARGET`,
`FLAG_BORDER`).
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np


FLAG_TARGET = 1  # the token is predicted by the loss (a completion / assistant token)
FLAG_BORDER = 2  # the token starts an example (a document)


class TokenBatch(NamedTuple):
    """Tokens `(..., S+1)` int32 with `loss_mask` and `document_borders`, both bool `(..., S+1)`
    and aligned with the tokens (the model reads `[..., :-1]` of the borders, the loss reads
    `[..., 1:]` of the mask). A NamedTuple, so it is a pytree: `jax.tree.map`, `lax.scan` and a
    single sharding (a pytree prefix) treat each field like the tokens."""

    tokens: Any
    loss_mask: Any
    document_borders: Any


def batch_from_flags(tokens: np.ndarray, flags: np.ndarray) -> TokenBatch:
    """A `TokenBatch` from tokens and their per-token store flags (same shape)."""
    return TokenBatch(
        np.asarray(tokens, np.int32),
        (flags & FLAG_TARGET) != 0,
        (flags & FLAG_BORDER) != 0,
    )


def map_batch(fn: Callable[[Any], Any], batch: Any) -> Any:
    """`fn` applied to a plain token array, or to each field of a `TokenBatch`."""
    if isinstance(batch, TokenBatch):
        return TokenBatch(*(fn(x) for x in batch))
    return fn(batch)


def batch_tokens(batch: Any) -> Any:
    """The token array of a plain batch or a `TokenBatch`."""
    return batch.tokens if isinstance(batch, TokenBatch) else batch
