"""sLSTM configs: the cell, the layer and the block template (docs/architecture.md, "sLSTM").

Kept from the PyTorch reference: the fields below. Not kept: the CUDA kernel layout fields
(`batch_size`, `input_shape`, `internal_input_shape`, `output_shape`, `constants`), the
per-tensor dtypes (`dtype_b/r/w/g/s/a`: parameters are float32, the recurrence float32) and
`initial_val`.
"""

import copy
from typing import Literal

import jax.numpy as jnp

from ..core.config import (
    NON_NEGATIVE,
    POSITIVE,
    POSITIVE_OR_UNSET,
    RATE,
    Config,
    DType,
    check_field_divides,
    configclass,
    derived_copy,
    fail_field,
    field,
)
from ..core.parallel_config import ParallelConfig
from ..nn.feedforward_config import FeedForwardConfig


# sLSTM (docs/architecture.md, "sLSTM")


@configclass
class sLSTMCellConfig(Config):
    """sLSTM cell (PyTorch xLSTM, docs/architecture.md, "sLSTM"). `hidden_size` is set by the layer;
    `head_dim = hidden_size / num_heads`."""

    hidden_size: int = field(default=-1, check=POSITIVE_OR_UNSET)
    """Width of the cell; set by the layer from its `embedding_dim`."""
    num_heads: int = field(default=4, check=POSITIVE)
    """Number of heads (block-diagonal recurrence); divides `hidden_size`."""
    num_states: int = 4
    """Derived from `function` (4 for "slstm", 2 for "lstm"), as in the reference."""
    backend: Literal["cuda", "vanilla"] = "cuda"
    """Both run the same `lax.scan` here, with the CUDA kernel's per-element first-step rule."""
    function: Literal["slstm", "lstm"] = "slstm"
    """"slstm": exponential gating with a stabiliser state; "lstm": a classic LSTM."""
    bias_init: Literal["powerlaw_blockdependent", "small_init", "standard", "zeros"] = (
        "powerlaw_blockdependent"
    )
    """Gate bias init; "powerlaw_blockdependent" depends on `_block_idx` / `_num_blocks`."""
    recurrent_weight_init: Literal["zeros", "standard"] = "zeros"
    """Init of the recurrent kernel."""
    _block_idx: int = field(default=0, check=NON_NEGATIVE)
    """Index of the block (forget-bias init); set by the block."""
    _num_blocks: int = field(default=1, check=POSITIVE)
    """Number of blocks of the stack (forget-bias init); set by the stack."""
    num_gates: Literal[4] = 4
    """The four gates i, f, z, o."""
    gradient_recurrent_cut: bool = False
    """Stop the gradient through the recurrent input."""
    gradient_recurrent_clipval: None = None
    """The reference's CUDA-kernel backward clip; not supported here, so it must stay None."""
    forward_clipval: float | None = field(default=None, check=POSITIVE)
    """Clip the cell output y to +-value (None: no clip)."""
    dtype: DType = "bfloat16"
    """Compute dtype of the gate projections (the cell state and gates are float32)."""

    def _derive(self) -> None:
        self.num_states = 4 if self.function == "slstm" else 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def _cross_check(self, root: str, prefix: str) -> None:
        p = prefix
        if self._block_idx >= self._num_blocks:
            fail_field(
                root, p + "_block_idx", f"must be < _num_blocks={self._num_blocks}", self._block_idx
            )
        if self.hidden_size != -1:
            check_field_divides(
                root, p + "num_heads", self.num_heads, self.hidden_size, "hidden_size"
            )

    @property
    def _dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)


@configclass
class sLSTMLayerConfig(sLSTMCellConfig):
    """sLSTM layer (docs/architecture.md, "sLSTM"): conv + 4 headwise gate projections + cell + per-head group norm.
    `hidden_size` is set to `embedding_dim`."""

    embedding_dim: int = field(default=-1, check=POSITIVE_OR_UNSET)
    """Model width D; set by the stack (-1 until then)."""
    conv1d_kernel_size: int = field(default=4, check=NON_NEGATIVE)
    """Kernel size of the causal conv feeding the i and f gates (0: no conv)."""
    group_norm_weight: bool = True
    """A learnable scale in the per-head group norm."""
    dropout: float = field(default=0.0, check=RATE)
    """Dropout rate on the output; set by the stack."""
    group_norm_eps: float = field(default=1e-5, check=POSITIVE)
    """Eps of the per-head group norm (a port addition; the PyTorch value)."""
    parallel: ParallelConfig | None = None
    """Mesh layout, pushed by the block (unused: the sLSTM is not tensor-parallel)."""

    def _derive(self) -> None:
        self.hidden_size = self.embedding_dim
        super()._derive()


@configclass
class sLSTMBlockConfig(Config):
    """Template for sLSTM blocks: the layer and a gated FFN by default (proj_factor 1.3, GELU)."""

    slstm: sLSTMLayerConfig = field(default_factory=sLSTMLayerConfig)
    """The layer (a dict is parsed); gets `_num_blocks`, `_block_idx` and `parallel`."""
    feedforward: FeedForwardConfig | None = field(default_factory=FeedForwardConfig)
    """The FFN after the layer, if any (a dict is parsed); gets `_num_blocks`."""
    parallel: ParallelConfig | None = None
    """Mesh layout; set by the stack."""
    _num_blocks: int | None = field(default=None, check=POSITIVE)
    """Number of blocks of the stack; set by the stack."""
    _block_idx: int | None = field(default=None, check=NON_NEGATIVE)
    """Index of the block; set by `xLSTMBlockStackConfig.block_config`."""

    def _derive(self) -> None:
        self.slstm = derived_copy(self.slstm, self, parallel=copy.deepcopy(self.parallel))
        if self.feedforward is not None:
            self.feedforward = derived_copy(self.feedforward, self, block_idx=False)
