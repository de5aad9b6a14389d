"""mLSTM configs: the cell, the layer ("mlstm" and "mlstm_v1") and the block template
(docs/architecture.md, "From config to module")."""

import copy
from typing import Literal

import jax.numpy as jnp

from ..cell.backend_config import BackendName, ReferenceBackendName, mLSTMBackendNameAndKwargs
from ..core.config import (
    NON_NEGATIVE,
    POSITIVE,
    POSITIVE_OR_UNSET,
    RATE,
    Config,
    DType,
    InitDistribution,
    NormType,
    OutputInitFn,
    check_field_divides,
    configclass,
    derived_copy,
    fail_field,
    field,
    proj_up_dim_of,
)
from ..core.parallel_config import ParallelConfig, tp_size
from ..nn.feedforward_config import FeedForwardConfig


LayerType = Literal["mlstm", "mlstm_v1"]
"""The mLSTM layer variants: the xLSTM-jax layer and the xLSTM-7B ("v1") one."""

GateInput = Literal["qkv", "x_mlstm", "x_mlstm_conv", "x_mlstm_conv_act"]


# mLSTM cell, layer, block (docs/architecture.md, "From config to module")


@configclass
class mLSTMCellConfig(Config):
    """mLSTM cell: backend, gates, out-norm. `context_length`, `embedding_dim`, `num_heads`,
    `dtype`, `norm_type` and `parallel` are set by the layer."""

    context_length: int = field(default=-1, check=POSITIVE_OR_UNSET)
    """Sequence length bound (-1: unbounded); set by the layer, nothing is sized by it."""
    embedding_dim: int = field(default=-1, check=POSITIVE_OR_UNSET)
    """The layer's inner width; set by the layer."""
    num_heads: int = field(default=-1, check=POSITIVE_OR_UNSET)
    """Number of heads; set by the layer."""
    backend: mLSTMBackendNameAndKwargs | BackendName | ReferenceBackendName = field(
        default_factory=mLSTMBackendNameAndKwargs
    )
    """The cell backend: a name (ours or the reference's), its dict, or the config itself;
    stored as `mLSTMBackendNameAndKwargs`."""
    norm_eps: float = field(default=1e-6, check=POSITIVE)
    """Eps of the per-head out-norm (and of the q/k norms)."""
    norm_type: NormType = "layernorm"
    """Type of the per-head out-norm and the q/k norms; set by the layer."""
    norm_type_v1: NormType = "layernorm"
    """Type of the per-head out-norm of the "mlstm_v1" layer (not overwritten by the model)."""
    dtype: DType = "bfloat16"
    """Compute dtype; set by the layer."""
    gate_dtype: DType = "float32"
    """Dtype the gate projections run in."""
    gate_soft_cap: float | None = field(default=None, check=POSITIVE)
    """Soft cap `c * tanh(x / c)` of the gate pre-activations (None: no cap)."""
    gate_linear_headwise: bool = False
    """Headwise gate projections (head h sees only its slice) instead of dense ones."""
    igate_bias_init_range: tuple[float, float] | float | None = None
    """Input-gate bias init: a (start, end) pair is spread linearly over the heads, a number is
    a constant, None draws N(0, 0.1^2)."""
    fgate_bias_init_range: tuple[float, float] | float | None = (3.0, 6.0)
    """Forget-gate bias init, as `igate_bias_init_range`."""
    add_qk_norm: bool = False
    """Norm q and k per head before the cell."""
    reset_at_document_boundaries: bool = False
    """Wipe the memory at each document border (the forget pre-activation set to
    `reset_fgate_value`)."""
    reset_fgate_value: float = -25.0
    """Forget-gate pre-activation at document borders (lies outside the soft cap on purpose)."""
    parallel: ParallelConfig | None = None
    """Mesh layout; set by the layer."""

    def _derive(self) -> None:
        if isinstance(self.backend, str):
            self.backend = mLSTMBackendNameAndKwargs(name=self.backend)
        else:
            self.backend = copy.deepcopy(self.backend)

    @property
    def backend_config(self) -> mLSTMBackendNameAndKwargs:
        """`backend` as it is stored once the config is made (a name becomes its config)."""
        assert isinstance(self.backend, mLSTMBackendNameAndKwargs), self.backend
        return self.backend

    @property
    def _dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def _gate_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.gate_dtype)


@configclass
class mLSTMLayerConfig(Config):
    """mLSTM layer (`layer_type` "mlstm": Mamba-style, docs/architecture.md, "The mlstm layer"; "mlstm_v1": xLSTM-7B style, docs/architecture.md, "The mlstm_v1 layer").
    `embedding_dim`, `bias`, `dropout`, `context_length`, `dtype`, `norm_type`, `parallel` and
    `_num_blocks` are set by the stack."""

    conv1d_kernel_size: int = field(default=4, check=NON_NEGATIVE)
    """Kernel size of the causal conv ("mlstm"; 0: no conv)."""
    qkv_proj_blocksize: int = field(default=4, check=POSITIVE)
    """Block size of the headwise q/k/v projections ("mlstm"); must divide the inner dim."""
    num_heads: int = field(default=4, check=POSITIVE)
    """Number of heads; divides the q/k and v dims."""
    proj_factor: float = field(default=2.0, check=POSITIVE)
    """Inner width over the model width, before rounding ("mlstm")."""
    vmap_qk: bool = False
    """q and k as one vmapped headwise layer (kernels stacked as the reference)."""
    init_distribution: InitDistribution = "normal"
    """Distribution of the kernel inits."""
    output_init_fn: OutputInitFn = "wang"
    """Init of the down projection."""
    layer_type: LayerType = "mlstm"
    """"mlstm": Mamba-style (up-projection, conv, headwise q/k/v); "mlstm_v1": xLSTM-7B style
    (dense q/k/v/o on x)."""
    norm_type: NormType = "layernorm"
    """Norm type pushed into the cell (overwritten by the model's `norm_type`)."""
    qk_dim_factor: float = field(default=1.0, check=POSITIVE)
    """q/k dim over the inner dim ("mlstm") or the model width ("mlstm_v1")."""
    v_dim_factor: float = field(default=1.0, check=POSITIVE)
    """v dim over the inner dim ("mlstm") or the model width ("mlstm_v1")."""
    embedding_dim: int = field(default=-1, check=POSITIVE_OR_UNSET)
    """Model width D; set by the stack (-1 until then)."""
    bias: bool = False
    """Biases in the projections; set by the stack."""
    dropout: float = field(default=0.0, check=RATE)
    """Dropout rate on the output; set by the stack."""
    context_length: int = field(default=-1, check=POSITIVE_OR_UNSET)
    """Sequence length bound; set by the stack."""
    dtype: DType = "bfloat16"
    """Compute dtype; set by the stack."""
    parallel: ParallelConfig | None = None
    """Mesh layout; set by the stack."""
    debug_cell: bool = False
    """Skip the inner layer (`h = z`; debugging only)."""
    gate_input: GateInput = "qkv"
    """Features the gates see ("mlstm"): q, k, v concatenated, or the up-projected input before
    the conv, after it, or after its activation."""
    round_proj_up_dim_up: bool = True
    """Round `proj_factor * embedding_dim` up (True) or down to the multiple."""
    round_proj_up_to_multiple_of: int = field(default=64, check=POSITIVE)
    """The inner dim is a multiple of this."""
    _proj_up_dim: int | None = None
    """Derived: the inner dim I = round-up of `proj_factor * embedding_dim` (None while
    `embedding_dim` is unset)."""
    _num_blocks: int = field(default=1, check=POSITIVE)
    """Number of blocks of the stack (for the "wang" init); set by the stack."""
    _block_idx: int | None = field(default=None, check=NON_NEGATIVE)
    """Index of the block; set by the block."""
    _inner_embedding_dim: int | None = None
    """Derived: the same as `_proj_up_dim`, pushed into the cell as its `embedding_dim`."""
    mlstm_cell: mLSTMCellConfig = field(default_factory=mLSTMCellConfig)
    """The cell (a dict is parsed); gets `context_length`, `embedding_dim` (the inner dim),
    `num_heads`, `dtype`, `norm_type` and `parallel` from the layer."""

    def _derive(self) -> None:
        self._proj_up_dim = proj_up_dim_of(
            self.embedding_dim,
            self.proj_factor,
            self.round_proj_up_to_multiple_of,
            self.round_proj_up_dim_up,
        )
        self._inner_embedding_dim = self._proj_up_dim
        cell = copy.deepcopy(self.mlstm_cell)
        cell.context_length = self.context_length
        inner = self._inner_embedding_dim
        cell.embedding_dim = inner if inner is not None and inner > 0 else -1
        cell.num_heads = self.num_heads
        cell.dtype = self.dtype
        cell.norm_type = self.norm_type
        cell.parallel = copy.deepcopy(self.parallel)
        cell._derive()
        self.mlstm_cell = cell

    # Dimensions used by the layers (None while embedding_dim is unset).
    @property
    def qk_dim(self) -> int | None:
        """Total q/k feature dim: round(qk_dim_factor * I) for "mlstm", int(qk_dim_factor * D) for v1."""
        if self.layer_type == "mlstm_v1":
            return int(self.embedding_dim * self.qk_dim_factor) if self.embedding_dim > 0 else None
        if self._inner_embedding_dim is None:
            return None
        return round(self.qk_dim_factor * self._inner_embedding_dim)

    @property
    def v_dim(self) -> int | None:
        """Total v feature dim (also z and the v1 output gate): like `qk_dim` with `v_dim_factor`."""
        if self.layer_type == "mlstm_v1":
            return int(self.embedding_dim * self.v_dim_factor) if self.embedding_dim > 0 else None
        if self._inner_embedding_dim is None:
            return None
        return round(self.v_dim_factor * self._inner_embedding_dim)

    def _cross_check(self, root: str, prefix: str) -> None:
        p = prefix
        # the cell as derived (a dict set after construction is parsed by the next _derive)
        cell = self.mlstm_cell if isinstance(self.mlstm_cell, mLSTMCellConfig) else None
        if self.embedding_dim == -1:
            return  # dimension checks need embedding_dim, which the stack sets
        nh = self.num_heads
        if self._proj_up_dim is None or self._proj_up_dim <= 0:
            fail_field(
                root,
                p + "proj_factor",
                f"proj_factor * embedding_dim rounded to a multiple of {self.round_proj_up_to_multiple_of} "
                f"must be positive (embedding_dim={self.embedding_dim})",
                self.proj_factor,
            )
        qk_dim, v_dim = self.qk_dim, self.v_dim
        assert qk_dim is not None and v_dim is not None
        if qk_dim <= 0:
            fail_field(
                root, p + "qk_dim_factor", "gives an empty q/k dimension", self.qk_dim_factor
            )
        if v_dim <= 0:
            fail_field(root, p + "v_dim_factor", "gives an empty v dimension", self.v_dim_factor)
        if self.layer_type == "mlstm":
            inner = self._inner_embedding_dim
            assert inner is not None
            check_field_divides(
                root, p + "qkv_proj_blocksize", self.qkv_proj_blocksize, inner, "inner dim"
            )
            num_blocks = inner // self.qkv_proj_blocksize
            if qk_dim % num_blocks != 0:
                fail_field(
                    root,
                    p + "qk_dim_factor",
                    f"q/k dim {qk_dim} must be a multiple of the {num_blocks} headwise blocks "
                    f"(inner dim {inner} / qkv_proj_blocksize {self.qkv_proj_blocksize})",
                    self.qk_dim_factor,
                )
            if v_dim % num_blocks != 0:
                fail_field(
                    root,
                    p + "v_dim_factor",
                    f"v dim {v_dim} must be a multiple of the {num_blocks} headwise blocks "
                    f"(inner dim {inner} / qkv_proj_blocksize {self.qkv_proj_blocksize})",
                    self.v_dim_factor,
                )
            if cell is not None and cell.gate_linear_headwise and self.gate_input != "qkv":
                check_field_divides(root, p + "num_heads", nh, inner, "inner dim (headwise gates)")
        check_field_divides(root, p + "num_heads", nh, qk_dim, "q/k dim")
        check_field_divides(root, p + "num_heads", nh, v_dim, "v dim")
        tp = tp_size(self.parallel)
        if tp > 1:
            check_field_divides(root, p + "parallel.model_axis_size", tp, nh, "num_heads")
            check_field_divides(root, p + "parallel.model_axis_size", tp, v_dim, "v dim")
            if self.layer_type == "mlstm" and cell is not None and not cell.gate_linear_headwise:
                fail_field(
                    root,
                    p + "mlstm_cell.gate_linear_headwise",
                    "must be True when parallel.model_axis_size > 1 (dense gates are not tensor-parallel)",
                    False,
                )

    @property
    def _dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)


@configclass
class mLSTMBlockConfig(Config):
    """Template for every mLSTM block: the layer, an optional FFN, an optional Gemma-2 style
    post-norm."""

    mlstm: mLSTMLayerConfig = field(default_factory=mLSTMLayerConfig)
    """The layer (a dict is parsed); gets `_num_blocks` and `_block_idx` from the block."""
    feedforward: FeedForwardConfig | None = None
    """The FFN after the layer, if any (a dict is parsed); gets `_num_blocks` from the block."""
    add_post_norm: bool = False
    """A norm on the output of the layer and of the FFN, before each residual add."""
    parallel: ParallelConfig | None = None
    """Mesh layout; set by the stack."""
    _num_blocks: int | None = field(default=None, check=POSITIVE)
    """Number of blocks of the stack; set by the stack."""
    _block_idx: int | None = field(default=None, check=NON_NEGATIVE)
    """Index of the block; set by `xLSTMBlockStackConfig.block_config`."""

    def _derive(self) -> None:
        self.mlstm = derived_copy(self.mlstm, self)
        if self.feedforward is not None:
            self.feedforward = derived_copy(self.feedforward, self, block_idx=False)
