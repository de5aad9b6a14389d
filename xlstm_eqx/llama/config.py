"""`LlamaConfig`: the Llama baseline, one flat config (docs/architecture.md, "Llama")."""

import copy
from typing import Literal

import jax.numpy as jnp

from ..core.config import (
    POSITIVE,
    POSITIVE_OR_UNSET,
    RATE,
    Config,
    DType,
    check_field_divides,
    configclass,
    fail_field,
    field,
)
from ..core.parallel_config import ParallelConfig


AttentionBackend = Literal["xla", "cudnn", "pallas_triton"]


# Llama (docs/architecture.md, "Llama")


@configclass
class LlamaConfig(Config):
    """Llama baseline, one flat config (docs/architecture.md, "Llama"). `num_heads = embedding_dim // head_dim`;
    `ffn_hidden_dim` is the SwiGLU hidden size of docs/architecture.md, "Llama"."""

    vocab_size: int = field(check=POSITIVE)
    """Vocabulary size V."""
    embedding_dim: int = field(check=POSITIVE)
    """Model width D; a multiple of `head_dim`."""
    num_blocks: int = field(check=POSITIVE)
    """Number of transformer blocks."""
    head_dim: int = field(default=128, check=POSITIVE)
    """Width of an attention head (even: RoPE rotates pairs)."""
    qk_norm: bool = False
    """RMS-norm q and k per head."""
    causal: bool = True
    """Causal attention mask."""
    theta: float = field(default=1e4, check=POSITIVE)
    """RoPE base."""
    ffn_multiple_of: int = field(default=64, check=POSITIVE)
    """The SwiGLU hidden size is rounded up to a multiple of this."""
    ffn_dim_multiplier: float | None = field(default=1.0, check=POSITIVE)
    """Factor on the SwiGLU hidden size int(8D/3) (None: 1)."""
    use_bias: bool = False
    """Biases in the dense layers."""
    scan_blocks: bool = True
    """Stack the block parameters and apply them with `lax.scan`."""
    attention_backend: AttentionBackend = "xla"
    """Attention core: "xla" (any device), "cudnn" and "pallas_triton" (GPU)."""
    mask_across_document_boundaries: bool = False
    """Attend only within a document (segment ids from the document borders)."""
    dtype: DType = "float32"
    """Compute dtype."""
    dropout_rate: float = field(default=0.0, check=RATE)
    """Dropout rate on the attention and FFN outputs (and on the embeddings, see
    `add_embedding_dropout`)."""
    add_embedding_dropout: bool = False
    """Dropout on the token embeddings."""
    logits_soft_cap: float | None = field(default=None, check=POSITIVE)
    """Soft cap `c * tanh(x / c)` of the logits (None: no cap)."""
    parallel: ParallelConfig | None = field(default_factory=ParallelConfig)
    """Mesh layout (a dict is parsed, None means the default); `model_axis_size` must be 1 (no
    tensor parallelism)."""
    context_length: int = field(default=-1, check=POSITIVE_OR_UNSET)
    """Port addition: an upper bound on the sequence length callers such as the CLI may enforce
    (-1: unbounded; nothing is sized by it)."""
    query_scale_quirk: bool = False
    """Port addition: scale queries by NH^-1/2 as the reference does, instead of head_dim^-1/2
    (docs/architecture.md, "Llama")."""

    def _derive(self) -> None:
        if self.parallel is None:
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

    def _cross_check(self, root: str, prefix: str) -> None:
        p = prefix
        check_field_divides(
            root, p + "head_dim", self.head_dim, self.embedding_dim, "embedding_dim"
        )
        if self.head_dim % 2 != 0:
            fail_field(
                root,
                p + "head_dim",
                "must be even (RoPE rotates pairs of dimensions)",
                self.head_dim,
            )
        if isinstance(self.parallel, ParallelConfig) and self.parallel.model_axis_size != 1:
            fail_field(
                root,
                p + "parallel.model_axis_size",
                "must be 1: the Llama baseline has no tensor parallelism",
                self.parallel.model_axis_size,
            )
        if self.ffn_hidden_dim <= 0:
            fail_field(
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
