"""FIXME docstring."""

import copy
import dataclasses
from typing import ClassVar, Literal, no_type_check

import jax.numpy as jnp

from ..core.config import (
    DTYPES,
    _check_bool,
    _check_choice,
    _check_divides,
    _check_nonneg_int,
    _check_positive_float,
    _check_positive_int,
    _check_positive_or_unset,
    _check_rate,
    _Config,
    _config,
    _derived_copy,
    _fail,
    _validate_block_position,
    _validate_child,
)
from ..core.parallel_config import ParallelConfig, _validate_parallel
from ..nn.feedforward_config import FeedForwardConfig


SLSTM_BACKENDS = ("cuda", "vanilla")


SLSTM_FUNCTIONS = ("slstm", "lstm")


SLSTM_BIAS_INITS = ("powerlaw_blockdependent", "small_init", "standard", "zeros")


SLSTM_RECURRENT_INITS = ("zeros", "standard")


# sLSTM (§6.1)


@no_type_check
@_config
class sLSTMCellConfig(_Config):
    """sLSTM cell (PyTorch xLSTM, §6.1). `hidden_size` is set by the layer; `head_dim = hidden_size/num_heads`.

    Kept from the reference: `backend` ("cuda" | "vanilla": both run the same `lax.scan` here, with the
    CUDA kernel's per-element first-step rule), `function` ("slstm" | "lstm"), `bias_init`,
    `recurrent_weight_init`, `gradient_recurrent_cut` (stop the gradient through the recurrent input),
    `forward_clipval` (clip y to +-value), `_block_idx`/`_num_blocks` (forget-bias init), `dtype` (compute
    dtype of the gate projections; the cell state and gates are float32). Not kept: the CUDA kernel layout
    fields (`batch_size`, `input_shape`, `internal_input_shape`, `output_shape`, `constants`), the
    per-tensor dtypes (`dtype_b/r/w/g/s/a`: parameters are float32, the recurrence float32) and
    `initial_val`. `gradient_recurrent_clipval` (a CUDA-only backward clip) must stay None.
    `num_states` follows `function` (4 for slstm, 2 for lstm) as in the reference.
    """

    hidden_size: int = -1
    num_heads: int = 4
    num_states: int = 4
    backend: Literal["cuda", "vanilla"] = "cuda"
    function: Literal["slstm", "lstm"] = "slstm"
    bias_init: Literal["powerlaw_blockdependent", "small_init", "standard", "zeros"] = (
        "powerlaw_blockdependent"
    )
    recurrent_weight_init: Literal["zeros", "standard"] = "zeros"
    _block_idx: int = 0
    _num_blocks: int = 1
    num_gates: int = 4
    gradient_recurrent_cut: bool = False
    gradient_recurrent_clipval: float | None = None
    forward_clipval: float | None = None
    dtype: str = "bfloat16"

    def _derive(self) -> None:
        if self.function in SLSTM_FUNCTIONS:
            self.num_states = 4 if self.function == "slstm" else 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def _validate(self, root: str, prefix: str) -> None:
        p = prefix
        _check_positive_or_unset(root, p + "hidden_size", self.hidden_size)
        _check_positive_int(root, p + "num_heads", self.num_heads)
        _check_choice(root, p + "backend", self.backend, SLSTM_BACKENDS)
        _check_choice(root, p + "function", self.function, SLSTM_FUNCTIONS)
        _check_choice(root, p + "bias_init", self.bias_init, SLSTM_BIAS_INITS)
        _check_choice(
            root, p + "recurrent_weight_init", self.recurrent_weight_init, SLSTM_RECURRENT_INITS
        )
        _check_nonneg_int(root, p + "_block_idx", self._block_idx)
        _check_positive_int(root, p + "_num_blocks", self._num_blocks)
        if self._block_idx >= self._num_blocks:
            _fail(
                root, p + "_block_idx", f"must be < _num_blocks={self._num_blocks}", self._block_idx
            )
        if self.num_gates != 4:
            _fail(root, p + "num_gates", "must be 4 (i, f, z, o)", self.num_gates)
        _check_bool(root, p + "gradient_recurrent_cut", self.gradient_recurrent_cut)
        if self.gradient_recurrent_clipval is not None:
            _fail(
                root,
                p + "gradient_recurrent_clipval",
                "is a CUDA-kernel backward option not supported here; must be None",
                self.gradient_recurrent_clipval,
            )
        _check_positive_float(root, p + "forward_clipval", self.forward_clipval, allow_none=True)
        _check_choice(root, p + "dtype", self.dtype, DTYPES)
        if self.hidden_size != -1:
            _check_divides(root, p + "num_heads", self.num_heads, self.hidden_size, "hidden_size")

    @property
    def _dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)


@no_type_check
@_config
class sLSTMLayerConfig(sLSTMCellConfig):
    """sLSTM layer (§6.2): conv + 4 headwise gate projections + cell + per-head group norm.

    `hidden_size` is set to `embedding_dim`. `group_norm_eps` (port addition; PyTorch value 1e-5) is the eps
    of the per-head group norm. `parallel` is pushed by the block (unused: the sLSTM is not tensor-parallel).
    """

    embedding_dim: int = -1
    num_heads: int = 4
    conv1d_kernel_size: int = 4
    group_norm_weight: bool = True
    dropout: float = 0.0
    group_norm_eps: float = 1e-5
    parallel: ParallelConfig | None = None

    _nested: ClassVar[dict[str, type[_Config]]] = {"parallel": ParallelConfig}

    def _derive(self) -> None:
        self.hidden_size = self.embedding_dim
        super()._derive()

    def _validate(self, root: str, prefix: str) -> None:
        p = prefix
        _check_positive_or_unset(root, p + "embedding_dim", self.embedding_dim)
        super()._validate(root, prefix)
        _check_nonneg_int(root, p + "conv1d_kernel_size", self.conv1d_kernel_size)
        _check_bool(root, p + "group_norm_weight", self.group_norm_weight)
        _check_rate(root, p + "dropout", self.dropout)
        _check_positive_float(root, p + "group_norm_eps", self.group_norm_eps)
        _validate_parallel(self, root, p)


@no_type_check
@_config
class sLSTMBlockConfig(_Config):
    """Template for sLSTM blocks: the layer and a gated FFN by default (proj_factor 1.3, GELU)."""

    slstm: sLSTMLayerConfig = dataclasses.field(default_factory=sLSTMLayerConfig)
    feedforward: FeedForwardConfig | None = dataclasses.field(default_factory=FeedForwardConfig)
    parallel: ParallelConfig | None = None
    _num_blocks: int | None = None
    _block_idx: int | None = None

    _nested: ClassVar[dict[str, type[_Config]]] = {
        "slstm": sLSTMLayerConfig,
        "feedforward": FeedForwardConfig,
        "parallel": ParallelConfig,
    }

    def _derive(self) -> None:
        self.slstm = _derived_copy(
            self.slstm, sLSTMLayerConfig, self, parallel=copy.deepcopy(self.parallel)
        )
        self.feedforward = _derived_copy(self.feedforward, FeedForwardConfig, self, block_idx=False)

    def _validate(self, root: str, prefix: str) -> None:
        p = prefix
        _validate_child(root, p + "slstm", self.slstm, sLSTMLayerConfig, optional=False)
        _validate_child(root, p + "feedforward", self.feedforward, FeedForwardConfig, optional=True)
        _validate_parallel(self, root, p)
        _validate_block_position(self, root, p)
