"""`FeedForward`: the gated (``ffn_gated``) or plain (``ffn``) feed-forward sub-layer of xLSTM
blocks, ``(..., D) -> (..., D)`` through a hidden width ``F`` fixed by its config.
"""

import equinox as eqx
import jax
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray

from .axes import REPLICATED
from .feedforward_config import FeedForwardConfig
from .functional import ACTIVATIONS, dropout, get_activation
from .init import output_initializer, small_initializer
from .linear import Dense


# feed-forward (docs/architecture.md, "Building blocks")


class FeedForward(eqx.Module):
    """Feed-forward sub-layer from a ``FeedForwardConfig``.

    ``ffn_gated``: ``y = (act(x W_gate) ⊙ x W_up) W_down``; ``ffn``: ``y = act(x W_up) W_down``.
    Hidden size ``F = config._proj_up_dim`` (round-up rule of the config). Up projections use
    small-init(D), the down projection ``output_init_fn`` with dim D and the block count L.
    Dropout (rate ``config.dropout``) on the output, only with a key.
    """

    proj_up: Dense
    proj_up_gate: Dense | None
    proj_down: Dense
    act_fn: str = eqx.field(static=True)
    dropout_rate: float = eqx.field(static=True)

    def __init__(self, config: FeedForwardConfig, *, key: PRNGKeyArray):
        D = config.embedding_dim
        F = config._proj_up_dim
        if D is None or D <= 0 or F is None or F <= 0:
            raise ValueError(
                f"FeedForwardConfig: embedding_dim ({D}) and _proj_up_dim ({F}) must be positive"
            )
        if config.ff_type not in ("ffn_gated", "ffn"):
            raise ValueError(f"unknown ff_type {config.ff_type!r}; allowed: ffn_gated, ffn")
        get_activation(config.act_fn)
        num_blocks = config._num_blocks or 1
        up_init = small_initializer(D, config.init_distribution)
        down_init = output_initializer(
            config.output_init_fn, D, num_blocks, config.init_distribution
        )
        kup, kgate, kdown = jr.split(key, 3)

        # Megatron layout: column-parallel up-projections, a row-parallel down-projection.
        def up_projection(key: PRNGKeyArray) -> Dense:
            return Dense(
                D,
                F,
                use_bias=config.bias,
                dtype=config.dtype,
                kernel_init=up_init,
                axes=("embed", "mlp"),
                key=key,
            )

        self.proj_up = up_projection(kup)
        self.proj_up_gate = up_projection(kgate) if config.ff_type == "ffn_gated" else None
        self.proj_down = Dense(
            F,
            D,
            use_bias=config.bias,
            dtype=config.dtype,
            kernel_init=down_init,
            axes=("mlp", "embed"),
            bias_axes=REPLICATED,
            key=kdown,
        )
        self.act_fn = config.act_fn
        self.dropout_rate = float(config.dropout)

    @jax.named_scope("FeedForward")
    def __call__(
        self, x: Float[Array, "*batch D"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "*batch D"]:
        act = ACTIVATIONS[self.act_fn]
        if self.proj_up_gate is None:
            h = act(self.proj_up(x))
        else:
            h = act(self.proj_up_gate(x)) * self.proj_up(x)
        return dropout(self.proj_down(h), self.dropout_rate, key=key)
