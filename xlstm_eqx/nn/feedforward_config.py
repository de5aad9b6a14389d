"""FIXME docstring."""

from typing import ClassVar, Literal, no_type_check

import jax.numpy as jnp

from ..core.config import (
    ACT_FNS,
    DTYPES,
    INIT_DISTRIBUTIONS,
    OUTPUT_INIT_FNS,
    _check_bool,
    _check_choice,
    _check_divides,
    _check_positive_float,
    _check_positive_int,
    _check_positive_or_unset,
    _check_rate,
    _Config,
    _config,
    _fail,
    _proj_up_dim_of,
)
from ..core.parallel_config import ParallelConfig, _tp_size, _validate_parallel


FF_TYPES = ("ffn_gated", "ffn")


@no_type_check
@_config
class FeedForwardConfig(_Config):
    """Feed-forward sub-block (§2.9, §4.2): F = `_proj_up_dim` = round-up of `proj_factor * embedding_dim`."""

    proj_factor: float = 1.3
    act_fn: str = "gelu"
    embedding_dim: int = -1
    dropout: float = 0.0
    bias: bool = False
    init_distribution: Literal["normal", "truncated_normal", "uniform"] = "normal"
    output_init_fn: Literal["small", "wang", "wang2", "zeros"] = "wang"
    ff_type: Literal["ffn_gated", "ffn"] = "ffn_gated"
    dtype: str = "bfloat16"
    parallel: ParallelConfig | None = None
    round_proj_up_dim_up: bool = True
    round_proj_up_to_multiple_of: int = 64
    _proj_up_dim: int | None = None
    _num_blocks: int = 1

    _nested: ClassVar[dict[str, type[_Config]]] = {"parallel": ParallelConfig}

    def _derive(self) -> None:
        self._proj_up_dim = _proj_up_dim_of(self)

    def _validate(self, root: str, prefix: str) -> None:
        p = prefix
        _check_positive_float(root, p + "proj_factor", self.proj_factor)
        _check_choice(root, p + "act_fn", self.act_fn, ACT_FNS)
        _check_positive_or_unset(root, p + "embedding_dim", self.embedding_dim)
        _check_rate(root, p + "dropout", self.dropout)
        _check_bool(root, p + "bias", self.bias)
        _check_choice(root, p + "init_distribution", self.init_distribution, INIT_DISTRIBUTIONS)
        _check_choice(root, p + "output_init_fn", self.output_init_fn, OUTPUT_INIT_FNS)
        _check_choice(root, p + "ff_type", self.ff_type, FF_TYPES)
        _check_choice(root, p + "dtype", self.dtype, DTYPES)
        _check_bool(root, p + "round_proj_up_dim_up", self.round_proj_up_dim_up)
        _check_positive_int(
            root, p + "round_proj_up_to_multiple_of", self.round_proj_up_to_multiple_of
        )
        _check_positive_int(root, p + "_num_blocks", self._num_blocks)
        _validate_parallel(self, root, p)
        if self.embedding_dim != -1:
            if self._proj_up_dim is None or self._proj_up_dim <= 0:
                _fail(
                    root,
                    p + "proj_factor",
                    f"proj_factor * embedding_dim rounded to a multiple of "
                    f"{self.round_proj_up_to_multiple_of} must be positive "
                    f"(embedding_dim={self.embedding_dim})",
                    self.proj_factor,
                )
            tp = _tp_size(self.parallel)
            if tp > 1:
                _check_divides(
                    root, p + "parallel.model_axis_size", tp, self._proj_up_dim, "FFN dim"
                )

    @property
    def _dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)
