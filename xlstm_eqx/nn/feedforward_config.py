"""`FeedForwardConfig`: the feed-forward sub-block of xLSTM blocks (docs/architecture.md, "Building blocks")."""

from typing import Literal

import jax.numpy as jnp

from ..core.config import (
    POSITIVE,
    POSITIVE_OR_UNSET,
    RATE,
    ActFn,
    Config,
    DType,
    InitDistribution,
    OutputInitFn,
    check_field_divides,
    configclass,
    fail_field,
    field,
    proj_up_dim_of,
)
from ..core.parallel_config import ParallelConfig, tp_size


@configclass
class FeedForwardConfig(Config):
    """Feed-forward sub-block (docs/architecture.md, "Building blocks"): F = `_proj_up_dim` = round-up of `proj_factor *
    embedding_dim`."""

    proj_factor: float = field(default=1.3, check=POSITIVE)
    """Hidden width F over the model width, before rounding (see `round_proj_up_to_multiple_of`)."""
    act_fn: ActFn = "gelu"
    """Activation of the hidden layer ("gelu" is the tanh approximation, as Flax)."""
    embedding_dim: int = field(default=-1, check=POSITIVE_OR_UNSET)
    """Model width D; set by the block (-1 until then)."""
    dropout: float = field(default=0.0, check=RATE)
    """Dropout rate on the output (not pushed by the stack)."""
    bias: bool = False
    """Biases in the three projections."""
    init_distribution: InitDistribution = "normal"
    """Distribution of the kernel inits."""
    output_init_fn: OutputInitFn = "wang"
    """Init of the down projection (scaled by `_num_blocks` for "wang")."""
    ff_type: Literal["ffn_gated", "ffn"] = "ffn_gated"
    """"ffn_gated": `(act(x W_gate) * x W_up) W_down`; "ffn": `act(x W_up) W_down`."""
    dtype: DType = "bfloat16"
    """Compute dtype; the block pushes its own (a port choice, see `xLSTMBlockConfig`)."""
    parallel: ParallelConfig | None = None
    """Mesh layout, pushed by the block (the FFN width must divide by the tensor-parallel size)."""
    round_proj_up_dim_up: bool = True
    """Round `proj_factor * embedding_dim` up (True) or down to the multiple."""
    round_proj_up_to_multiple_of: int = field(default=64, check=POSITIVE)
    """F is a multiple of this."""
    _proj_up_dim: int | None = None
    """Derived: the hidden width F (None while `embedding_dim` is unset)."""
    _num_blocks: int = field(default=1, check=POSITIVE)
    """Number of blocks of the stack (for the "wang" init); pushed by the stack."""

    def _derive(self) -> None:
        self._proj_up_dim = proj_up_dim_of(
            self.embedding_dim,
            self.proj_factor,
            self.round_proj_up_to_multiple_of,
            self.round_proj_up_dim_up,
        )

    def _cross_check(self, root: str, prefix: str) -> None:
        p = prefix
        if self.embedding_dim == -1:
            return
        if self._proj_up_dim is None or self._proj_up_dim <= 0:
            fail_field(
                root,
                p + "proj_factor",
                f"proj_factor * embedding_dim rounded to a multiple of "
                f"{self.round_proj_up_to_multiple_of} must be positive "
                f"(embedding_dim={self.embedding_dim})",
                self.proj_factor,
            )
        tp = tp_size(self.parallel)
        if tp > 1:
            check_field_divides(
                root, p + "parallel.model_axis_size", tp, self._proj_up_dim, "FFN dim"
            )

    @property
    def _dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)
