"""FIXME docstring."""

import copy
import dataclasses
import math
from typing import Any, ClassVar, Literal, no_type_check

import jax.numpy as jnp

from ..cell.backend_config import mLSTMBackendNameAndKwargs
from ..core.config import (
    DTYPES,
    INIT_DISTRIBUTIONS,
    NORM_TYPES,
    OUTPUT_INIT_FNS,
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
    _is_number,
    _proj_up_dim_of,
    _validate_block_position,
    _validate_child,
)
from ..core.parallel_config import ParallelConfig, _tp_size, _validate_parallel
from ..nn.feedforward_config import FeedForwardConfig


LAYER_TYPES = ("mlstm", "mlstm_v1")


GATE_INPUTS = ("qkv", "x_mlstm", "x_mlstm_conv", "x_mlstm_conv_act")


# mLSTM cell, layer, block (§2.3, §2.5, §2.6)


def _check_bias_range(root: str, path: str, value: Any) -> None:
    if value is None or _is_number(value):
        return
    if isinstance(value, tuple) and len(value) == 2 and all(_is_number(x) for x in value):
        return
    _fail(root, path, "must be a (start, end) pair, a number, or None", value)


def _as_range(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(value)
    return value


@no_type_check
@_config
class mLSTMCellConfig(_Config):
    """mLSTM cell: backend, gates, out-norm. `context_length`, `embedding_dim`, `num_heads`, `dtype`,
    `norm_type` and `parallel` are set by the layer."""

    context_length: int = -1
    embedding_dim: int = -1
    num_heads: int = -1
    backend: mLSTMBackendNameAndKwargs | str = dataclasses.field(
        default_factory=mLSTMBackendNameAndKwargs
    )
    norm_eps: float = 1e-6
    norm_type: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_type_v1: Literal["layernorm", "rmsnorm"] = "layernorm"
    dtype: str = "bfloat16"
    gate_dtype: str = "float32"
    gate_soft_cap: float | None = None
    gate_linear_headwise: bool = False
    igate_bias_init_range: tuple[float, float] | float | None = None
    fgate_bias_init_range: tuple[float, float] | float | None = (3.0, 6.0)
    add_qk_norm: bool = False
    reset_at_document_boundaries: bool = False
    reset_fgate_value: float = -25.0
    parallel: ParallelConfig | None = None

    _nested: ClassVar[dict[str, type[_Config]]] = {
        "backend": mLSTMBackendNameAndKwargs,
        "parallel": ParallelConfig,
    }

    def _derive(self) -> None:
        if isinstance(self.backend, str):
            self.backend = mLSTMBackendNameAndKwargs(name=self.backend)
        elif isinstance(self.backend, dict):
            self.backend = mLSTMBackendNameAndKwargs.from_dict(self.backend)
        elif isinstance(self.backend, mLSTMBackendNameAndKwargs):
            self.backend = copy.deepcopy(self.backend)
        self.igate_bias_init_range = _as_range(self.igate_bias_init_range)
        self.fgate_bias_init_range = _as_range(self.fgate_bias_init_range)

    def _validate(self, root: str, prefix: str) -> None:
        p = prefix
        _check_positive_or_unset(root, p + "context_length", self.context_length)
        _check_positive_or_unset(root, p + "embedding_dim", self.embedding_dim)
        _check_positive_or_unset(root, p + "num_heads", self.num_heads)
        if not isinstance(self.backend, mLSTMBackendNameAndKwargs):
            _fail(
                root,
                p + "backend",
                "must be a backend name or mLSTMBackendNameAndKwargs",
                self.backend,
            )
        self.backend._validate(root, p + "backend.")
        _check_positive_float(root, p + "norm_eps", self.norm_eps)
        _check_choice(root, p + "norm_type", self.norm_type, NORM_TYPES)
        _check_choice(root, p + "norm_type_v1", self.norm_type_v1, NORM_TYPES)
        _check_choice(root, p + "dtype", self.dtype, DTYPES)
        _check_choice(root, p + "gate_dtype", self.gate_dtype, DTYPES)
        _check_positive_float(root, p + "gate_soft_cap", self.gate_soft_cap, allow_none=True)
        _check_bool(root, p + "gate_linear_headwise", self.gate_linear_headwise)
        _check_bias_range(root, p + "igate_bias_init_range", self.igate_bias_init_range)
        _check_bias_range(root, p + "fgate_bias_init_range", self.fgate_bias_init_range)
        _check_bool(root, p + "add_qk_norm", self.add_qk_norm)
        _check_bool(root, p + "reset_at_document_boundaries", self.reset_at_document_boundaries)
        if not _is_number(self.reset_fgate_value) or not math.isfinite(self.reset_fgate_value):
            _fail(root, p + "reset_fgate_value", "must be a finite number", self.reset_fgate_value)
        _validate_parallel(self, root, p)

    @property
    def _dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def _gate_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.gate_dtype)


@no_type_check
@_config
class mLSTMLayerConfig(_Config):
    """mLSTM layer (`layer_type` "mlstm": Mamba-style, §3; "mlstm_v1": xLSTM-7B style, §4).

    Derived: `_proj_up_dim` = `_inner_embedding_dim` = round-up of `proj_factor * embedding_dim` to a multiple
    of `round_proj_up_to_multiple_of` (None while `embedding_dim` is unset). `embedding_dim`, `bias`,
    `dropout`, `context_length`, `dtype`, `norm_type`, `parallel` and `_num_blocks` are set by the stack.
    """

    conv1d_kernel_size: int = 4
    qkv_proj_blocksize: int = 4
    num_heads: int = 4
    proj_factor: float = 2.0
    vmap_qk: bool = False
    init_distribution: Literal["normal", "truncated_normal", "uniform"] = "normal"
    output_init_fn: Literal["small", "wang", "wang2", "zeros"] = "wang"
    layer_type: Literal["mlstm", "mlstm_v1"] = "mlstm"
    norm_type: Literal["layernorm", "rmsnorm"] = "layernorm"
    qk_dim_factor: float = 1.0
    v_dim_factor: float = 1.0
    embedding_dim: int = -1
    bias: bool = False
    dropout: float = 0.0
    context_length: int = -1
    dtype: str = "bfloat16"
    parallel: ParallelConfig | None = None
    debug_cell: bool = False
    gate_input: Literal["qkv", "x_mlstm", "x_mlstm_conv", "x_mlstm_conv_act"] = "qkv"
    round_proj_up_dim_up: bool = True
    round_proj_up_to_multiple_of: int = 64
    _proj_up_dim: int | None = None
    _num_blocks: int = 1
    _block_idx: int | None = None
    _inner_embedding_dim: int | None = None
    mlstm_cell: mLSTMCellConfig = dataclasses.field(default_factory=mLSTMCellConfig)

    _nested: ClassVar[dict[str, type[_Config]]] = {
        "mlstm_cell": mLSTMCellConfig,
        "parallel": ParallelConfig,
    }

    def _derive(self) -> None:
        self._proj_up_dim = _proj_up_dim_of(self)
        self._inner_embedding_dim = self._proj_up_dim
        if isinstance(self.mlstm_cell, dict):
            self.mlstm_cell = mLSTMCellConfig.from_dict(self.mlstm_cell)
        if isinstance(self.mlstm_cell, mLSTMCellConfig):
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

    def _validate(self, root: str, prefix: str) -> None:
        p = prefix
        _check_choice(root, p + "layer_type", self.layer_type, LAYER_TYPES)
        _check_nonneg_int(root, p + "conv1d_kernel_size", self.conv1d_kernel_size)
        _check_positive_int(root, p + "qkv_proj_blocksize", self.qkv_proj_blocksize)
        _check_positive_int(root, p + "num_heads", self.num_heads)
        _check_positive_float(root, p + "proj_factor", self.proj_factor)
        _check_bool(root, p + "vmap_qk", self.vmap_qk)
        _check_choice(root, p + "init_distribution", self.init_distribution, INIT_DISTRIBUTIONS)
        _check_choice(root, p + "output_init_fn", self.output_init_fn, OUTPUT_INIT_FNS)
        _check_choice(root, p + "norm_type", self.norm_type, NORM_TYPES)
        _check_positive_float(root, p + "qk_dim_factor", self.qk_dim_factor)
        _check_positive_float(root, p + "v_dim_factor", self.v_dim_factor)
        _check_positive_or_unset(root, p + "embedding_dim", self.embedding_dim)
        _check_bool(root, p + "bias", self.bias)
        _check_rate(root, p + "dropout", self.dropout)
        _check_positive_or_unset(root, p + "context_length", self.context_length)
        _check_choice(root, p + "dtype", self.dtype, DTYPES)
        _check_bool(root, p + "debug_cell", self.debug_cell)
        _check_choice(root, p + "gate_input", self.gate_input, GATE_INPUTS)
        _check_bool(root, p + "round_proj_up_dim_up", self.round_proj_up_dim_up)
        _check_positive_int(
            root, p + "round_proj_up_to_multiple_of", self.round_proj_up_to_multiple_of
        )
        _check_positive_int(root, p + "_num_blocks", self._num_blocks)
        if self._block_idx is not None:
            _check_nonneg_int(root, p + "_block_idx", self._block_idx)
        _validate_parallel(self, root, p)
        if not isinstance(self.mlstm_cell, mLSTMCellConfig):
            _fail(root, p + "mlstm_cell", "must be an mLSTMCellConfig", self.mlstm_cell)
        self.mlstm_cell._validate(root, p + "mlstm_cell.")
        if self.embedding_dim == -1:
            return  # dimension checks need embedding_dim, which the stack sets
        nh = self.num_heads
        if self._proj_up_dim is None or self._proj_up_dim <= 0:
            _fail(
                root,
                p + "proj_factor",
                f"proj_factor * embedding_dim rounded to a multiple of {self.round_proj_up_to_multiple_of} "
                f"must be positive (embedding_dim={self.embedding_dim})",
                self.proj_factor,
            )
        qk_dim, v_dim = self.qk_dim, self.v_dim
        assert qk_dim is not None and v_dim is not None
        if qk_dim <= 0:
            _fail(root, p + "qk_dim_factor", "gives an empty q/k dimension", self.qk_dim_factor)
        if v_dim <= 0:
            _fail(root, p + "v_dim_factor", "gives an empty v dimension", self.v_dim_factor)
        if self.layer_type == "mlstm":
            inner = self._inner_embedding_dim
            assert inner is not None
            _check_divides(
                root, p + "qkv_proj_blocksize", self.qkv_proj_blocksize, inner, "inner dim"
            )
            num_blocks = inner // self.qkv_proj_blocksize
            if qk_dim % num_blocks != 0:
                _fail(
                    root,
                    p + "qk_dim_factor",
                    f"q/k dim {qk_dim} must be a multiple of the {num_blocks} headwise blocks "
                    f"(inner dim {inner} / qkv_proj_blocksize {self.qkv_proj_blocksize})",
                    self.qk_dim_factor,
                )
            if v_dim % num_blocks != 0:
                _fail(
                    root,
                    p + "v_dim_factor",
                    f"v dim {v_dim} must be a multiple of the {num_blocks} headwise blocks "
                    f"(inner dim {inner} / qkv_proj_blocksize {self.qkv_proj_blocksize})",
                    self.v_dim_factor,
                )
            if self.mlstm_cell.gate_linear_headwise and self.gate_input != "qkv":
                _check_divides(root, p + "num_heads", nh, inner, "inner dim (headwise gates)")
        _check_divides(root, p + "num_heads", nh, qk_dim, "q/k dim")
        _check_divides(root, p + "num_heads", nh, v_dim, "v dim")
        tp = _tp_size(self.parallel)
        if tp > 1:
            _check_divides(root, p + "parallel.model_axis_size", tp, nh, "num_heads")
            _check_divides(root, p + "parallel.model_axis_size", tp, v_dim, "v dim")
            if self.layer_type == "mlstm" and not self.mlstm_cell.gate_linear_headwise:
                _fail(
                    root,
                    p + "mlstm_cell.gate_linear_headwise",
                    "must be True when parallel.model_axis_size > 1 (dense gates are not tensor-parallel)",
                    False,
                )

    @property
    def _dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)


@no_type_check
@_config
class mLSTMBlockConfig(_Config):
    """Template for every mLSTM block: the layer, an optional FFN, an optional Gemma-2 style post-norm."""

    mlstm: mLSTMLayerConfig = dataclasses.field(default_factory=mLSTMLayerConfig)
    feedforward: FeedForwardConfig | None = None
    add_post_norm: bool = False
    parallel: ParallelConfig | None = None
    _num_blocks: int | None = None
    _block_idx: int | None = None

    _nested: ClassVar[dict[str, type[_Config]]] = {
        "mlstm": mLSTMLayerConfig,
        "feedforward": FeedForwardConfig,
        "parallel": ParallelConfig,
    }

    def _derive(self) -> None:
        self.mlstm = _derived_copy(self.mlstm, mLSTMLayerConfig, self)
        self.feedforward = _derived_copy(self.feedforward, FeedForwardConfig, self, block_idx=False)

    def _validate(self, root: str, prefix: str) -> None:
        p = prefix
        _validate_child(root, p + "mlstm", self.mlstm, mLSTMLayerConfig, optional=False)
        _validate_child(root, p + "feedforward", self.feedforward, FeedForwardConfig, optional=True)
        _check_bool(root, p + "add_post_norm", self.add_post_norm)
        _validate_parallel(self, root, p)
        _validate_block_position(self, root, p)
