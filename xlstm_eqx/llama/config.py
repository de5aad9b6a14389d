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
    _check_positive_float,
    _check_positive_int,
    _check_positive_or_unset,
    _check_rate,
    _Config,
    _config,
    _fail,
)
from ..core.parallel_config import ParallelConfig


ATTENTION_BACKENDS = ("xla", "cudnn", "pallas_triton")


# Llama (§2.10)


@no_type_check
@_config
class LlamaConfig(_Config):
    """Llama baseline, one flat config (§2.10). `num_heads = embedding_dim // head_dim`;
    `ffn_hidden_dim` is the SwiGLU hidden size of §7.3.

    Port additions: `context_length` (-1 = unbounded; an upper bound callers may enforce, nothing is sized by
    it) and `query_scale_quirk` (True reproduces the reference's q scale NH^-1/2 instead of head_dim^-1/2).
    """

    vocab_size: int
    embedding_dim: int
    num_blocks: int
    head_dim: int = 128
    qk_norm: bool = False
    causal: bool = True
    theta: float = 1e4
    ffn_multiple_of: int = 64
    ffn_dim_multiplier: float | None = 1.0
    use_bias: bool = False
    scan_blocks: bool = True
    attention_backend: Literal["xla", "cudnn", "pallas_triton"] = "xla"
    mask_across_document_boundaries: bool = False
    dtype: str = "float32"
    dropout_rate: float = 0.0
    add_embedding_dropout: bool = False
    logits_soft_cap: float | None = None
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    context_length: int = -1
    query_scale_quirk: bool = False

    _nested: ClassVar[dict[str, type[_Config]]] = {"parallel": ParallelConfig}

    def _derive(self) -> None:
        if isinstance(self.parallel, dict):
            self.parallel = ParallelConfig.from_dict(self.parallel)
        elif self.parallel is None:
            self.parallel = ParallelConfig()
        else:
            self.parallel = copy.deepcopy(self.parallel)

    @property
    def num_heads(self) -> int:
        return self.embedding_dim // self.head_dim

    @property
    def ffn_hidden_dim(self) -> int:
        """int(8D/3), times `ffn_dim_multiplier` (int-truncated), rounded up to `ffn_multiple_of`."""
        hidden = int(8 * self.embedding_dim / 3)
        if self.ffn_dim_multiplier:
            hidden = int(hidden * self.ffn_dim_multiplier)
        m = self.ffn_multiple_of
        return m * ((hidden + m - 1) // m)

    def _validate(self, root: str, prefix: str) -> None:
        p = prefix
        _check_positive_int(root, p + "vocab_size", self.vocab_size)
        _check_positive_int(root, p + "embedding_dim", self.embedding_dim)
        _check_positive_int(root, p + "num_blocks", self.num_blocks)
        _check_positive_int(root, p + "head_dim", self.head_dim)
        _check_divides(root, p + "head_dim", self.head_dim, self.embedding_dim, "embedding_dim")
        if self.head_dim % 2 != 0:
            _fail(
                root,
                p + "head_dim",
                "must be even (RoPE rotates pairs of dimensions)",
                self.head_dim,
            )
        _check_bool(root, p + "qk_norm", self.qk_norm)
        _check_bool(root, p + "causal", self.causal)
        _check_positive_float(root, p + "theta", self.theta)
        _check_positive_int(root, p + "ffn_multiple_of", self.ffn_multiple_of)
        _check_positive_float(
            root, p + "ffn_dim_multiplier", self.ffn_dim_multiplier, allow_none=True
        )
        _check_bool(root, p + "use_bias", self.use_bias)
        _check_bool(root, p + "scan_blocks", self.scan_blocks)
        _check_choice(root, p + "attention_backend", self.attention_backend, ATTENTION_BACKENDS)
        _check_bool(
            root, p + "mask_across_document_boundaries", self.mask_across_document_boundaries
        )
        _check_choice(root, p + "dtype", self.dtype, DTYPES)
        _check_rate(root, p + "dropout_rate", self.dropout_rate)
        _check_bool(root, p + "add_embedding_dropout", self.add_embedding_dropout)
        _check_positive_float(root, p + "logits_soft_cap", self.logits_soft_cap, allow_none=True)
        if not isinstance(self.parallel, ParallelConfig):
            _fail(root, p + "parallel", "must be a ParallelConfig", self.parallel)
        self.parallel._validate(root, p + "parallel.")
        if self.parallel.model_axis_size != 1:
            _fail(
                root,
                p + "parallel.model_axis_size",
                "must be 1: the Llama baseline has no tensor parallelism",
                self.parallel.model_axis_size,
            )
        _check_positive_or_unset(root, p + "context_length", self.context_length)
        _check_bool(root, p + "query_scale_quirk", self.query_scale_quirk)
        if self.ffn_hidden_dim <= 0:
            _fail(
                root,
                p + "ffn_dim_multiplier",
                "gives an empty FFN hidden dim",
                self.ffn_dim_multiplier,
            )

    def validate(self) -> None:
        """Full check (the same as at construction); for symmetry with `xLSTMLMModelConfig.validate`."""
        self._validate(type(self).__name__, "")

    @property
    def _dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)
