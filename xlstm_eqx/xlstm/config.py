"""The xLSTM model configs: one block (`xLSTMBlockConfig`), the block stack
(`xLSTMBlockStackConfig`) and the language model (`xLSTMLMModelConfig`).

Names, fields and defaults are xlstm-jax's. Configs hold no arrays: they are cheap to build,
compare and hash (modules keep them in static fields) and serialise with `to_dict()` /
`from_dict()`. Derived fields (names starting with `_`) are pushed down by the parents: the stack
pushes `embedding_dim`, `bias`, `dropout`, `context_length`, `dtype`, `norm_type` and `parallel`
into its mLSTM and sLSTM templates, builds `_block_map` from `slstm_at`, and `block_configs()`
returns one `xLSTMBlockConfig` per block (docs/architecture.md, "From config to module").

Deliberate differences from the reference: a parent copies the child configs it is given before
pushing values into them (building a config never mutates the caller's objects); the stack also
pushes `dtype` into the feed-forward and sLSTM configs, so `dtype` is the compute dtype of the whole
model; invalid values raise a `ValueError` naming the field instead of asserting or silently
fixing up. `vocab_size=-1` ("unset, filled from the tokenizer") is accepted at construction and
`validate()` requires a real one; `context_length=-1` means unbounded. Reference quirks kept as
fields are listed in docs/architecture.md, "Reference quirks kept".
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
    InitDistribution,
    NormType,
    check_field_divides,
    configclass,
    fail_field,
    field,
    is_int,
)
from ..core.parallel_config import ParallelConfig, tp_size
from ..nn.feedforward_config import FeedForwardConfig
from .mlstm_config import mLSTMBlockConfig, mLSTMLayerConfig
from .slstm_config import sLSTMBlockConfig, sLSTMLayerConfig


# xLSTMBlockConfig (docs/architecture.md, "From config to module"): one concrete block


_LAYERS = (mLSTMLayerConfig, sLSTMLayerConfig)


@configclass
class xLSTMBlockConfig(Config):
    """One block: exactly one of `mlstm` / `slstm`, an optional FFN, pre-norms of
    `norm_type`/`norm_eps`."""

    mlstm: mLSTMLayerConfig | None = None
    """The mLSTM layer (a dict is parsed); gets `_num_blocks`, `_block_idx`, `parallel` and
    `norm_type`."""
    slstm: sLSTMLayerConfig | None = None
    """The sLSTM layer (a dict is parsed); gets `_num_blocks`, `_block_idx` and `parallel`."""
    parallel: ParallelConfig | None = None
    """Mesh layout, pushed into the layer and the FFN."""
    feedforward: FeedForwardConfig | None = None
    """The FFN after the layer, if any (a dict is parsed); gets `embedding_dim`, `parallel`,
    `_num_blocks` and `dtype` (the `dtype` push is a port choice)."""
    dtype: DType = "bfloat16"
    """Compute dtype, pushed into the FFN."""
    norm_eps: float = field(default=1e-6, check=POSITIVE)
    """Eps of the pre-norms (and post-norms)."""
    norm_type: NormType = "layernorm"
    """Type of the block norms, pushed into the mLSTM layer."""
    add_post_norm: bool = False
    """A norm on the output of the layer and of the FFN, before each residual add."""
    _num_blocks: int | None = field(default=None, check=POSITIVE)
    """Number of blocks of the stack."""
    _block_idx: int | None = field(default=None, check=NON_NEGATIVE)
    """Index of this block."""

    def _derive(self) -> None:
        self.mlstm, self.slstm = copy.deepcopy(self.mlstm), copy.deepcopy(self.slstm)
        self.feedforward = copy.deepcopy(self.feedforward)
        layer: mLSTMLayerConfig | sLSTMLayerConfig | None = None
        if isinstance(self.mlstm, mLSTMLayerConfig):
            layer = self.mlstm
            self.mlstm.norm_type = self.norm_type
        elif isinstance(self.slstm, sLSTMLayerConfig):
            layer = self.slstm
        if layer is not None:
            if self._num_blocks is not None:
                layer._num_blocks = self._num_blocks
            if self._block_idx is not None:
                layer._block_idx = self._block_idx
            layer.parallel = copy.deepcopy(self.parallel)
            layer._derive()
            if isinstance(self.feedforward, FeedForwardConfig):
                self.feedforward.embedding_dim = layer.embedding_dim
                self.feedforward.parallel = copy.deepcopy(self.parallel)
                if self._num_blocks is not None:
                    self.feedforward._num_blocks = self._num_blocks
                self.feedforward.dtype = self.dtype
                self.feedforward._derive()

    def _cross_check(self, root: str, prefix: str) -> None:
        p = prefix
        if (self.mlstm is None) == (self.slstm is None):
            fail_field(root, p + "mlstm", "exactly one of 'mlstm' and 'slstm' must be set")
        tp = tp_size(self.parallel)
        layer = self.mlstm if self.mlstm is not None else self.slstm
        if tp > 1 and isinstance(layer, _LAYERS) and layer.embedding_dim != -1:
            check_field_divides(
                root, p + "parallel.model_axis_size", tp, layer.embedding_dim, "embedding_dim"
            )

    @property
    def _dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)


# Stack and LM model (docs/architecture.md, "Forward pass of xLSTMLMModel")


@configclass
class xLSTMBlockStackConfig(Config):
    """The block stack: templates for mLSTM and sLSTM blocks, placement by `slstm_at`, and
    stack-wide values pushed into the templates (docs/architecture.md, "From config to module"). `block_map` lists 0 (mLSTM) / 1 (sLSTM)
    per block; `block_configs()` gives the per-block `xLSTMBlockConfig`s."""

    mlstm_block: mLSTMBlockConfig | None = None
    """Template of the mLSTM blocks (a dict is parsed); None: every block is an sLSTM block."""
    slstm_block: sLSTMBlockConfig | None = None
    """Template of the sLSTM blocks (a dict is parsed); needed when `slstm_at` places any."""
    context_length: int = field(default=-1, check=POSITIVE_OR_UNSET)
    """Sequence length bound (-1: unbounded; nothing in the port is sized by it)."""
    num_blocks: int = field(default=1, check=POSITIVE)
    """Number of blocks L."""
    embedding_dim: int = field(default=128, check=POSITIVE)
    """Model width D, pushed into the layers and FFNs."""
    add_post_blocks_norm: bool = True
    """A norm after the last block (never read by the reference's Flax model)."""
    bias: bool = False
    """Biases in the mLSTM layer projections, pushed into the mLSTM template."""
    dropout: float = field(default=0.0, check=RATE)
    """Dropout rate of the layers, pushed into the templates (not into the FFNs)."""
    scan_blocks: bool = False
    """Stack the block parameters and apply them with `lax.scan` (pure mLSTM stacks only)."""
    dtype: DType = "bfloat16"
    """Compute dtype of the whole model, pushed into the layers and FFNs."""
    parallel: ParallelConfig | None = None
    """Mesh layout (a dict is parsed), pushed everywhere."""
    init_distribution_embed: InitDistribution = "normal"
    """Distribution of the token embedding init."""
    init_distribution_out: InitDistribution = "normal"
    """Distribution of the LM head init."""
    slstm_at: list[int] | Literal["all"] = field(default_factory=list)
    """Indices of the sLSTM blocks, or "all" (also when `mlstm_block` is None)."""
    _block_map: str | None = None
    """Derived: "0,1,..." per block, 0 = mLSTM, 1 = sLSTM."""

    @property
    def block_map(self) -> list[int]:
        """Per block: 0 = mLSTM block, 1 = sLSTM block."""
        assert self._block_map is not None
        return [int(x) for x in self._block_map.split(",")]

    def _create_block_map(self) -> str:
        block_map = [0] * self.num_blocks
        slstm_at = range(self.num_blocks) if self.slstm_at == "all" else self.slstm_at
        for idx in slstm_at:
            block_map[idx] = 1
        return ",".join(map(str, block_map))

    def _derive(self) -> None:
        if self.mlstm_block is None:
            self.slstm_at = "all"
        if self.slstm_at == "all":
            self.slstm_at = list(range(self.num_blocks))
        norm_type = getattr(self, "norm_type", None)  # only the LM config has one
        if isinstance(self.mlstm_block, mLSTMBlockConfig):
            block = copy.deepcopy(self.mlstm_block)
            layer = block.mlstm
            if isinstance(layer, mLSTMLayerConfig):
                layer.embedding_dim = self.embedding_dim
                layer.bias = self.bias
                layer.dropout = self.dropout
                layer.context_length = self.context_length
                layer.dtype = self.dtype
                if norm_type is not None:
                    layer.norm_type = norm_type
                layer.parallel = copy.deepcopy(self.parallel)
            block.parallel = copy.deepcopy(self.parallel)
            block._num_blocks = self.num_blocks
            self._push_ffn(block.feedforward)
            block._derive()
            self.mlstm_block = block
        if isinstance(self.slstm_block, sLSTMBlockConfig):
            block = copy.deepcopy(self.slstm_block)
            if isinstance(block.slstm, sLSTMLayerConfig):
                block.slstm.dropout = self.dropout
                block.slstm.embedding_dim = self.embedding_dim
                block.slstm.dtype = self.dtype
            block._num_blocks = self.num_blocks
            block.parallel = copy.deepcopy(self.parallel)
            self._push_ffn(block.feedforward)
            block._derive()
            self.slstm_block = block
        if self._slstm_at_ok():
            self._block_map = self._create_block_map()

    def _push_ffn(self, ffn: FeedForwardConfig | None) -> None:
        if isinstance(ffn, FeedForwardConfig):
            ffn.embedding_dim = self.embedding_dim
            ffn.parallel = copy.deepcopy(self.parallel)
            ffn.dtype = self.dtype

    def _slstm_at_ok(self) -> bool:
        return isinstance(self.slstm_at, list) and all(
            0 <= i < self.num_blocks for i in self.slstm_at
        )

    def _cross_check(self, root: str, prefix: str) -> None:
        p = prefix
        slstm_at = list(range(self.num_blocks)) if self.slstm_at == "all" else self.slstm_at
        for i in slstm_at:
            if not 0 <= i < self.num_blocks:
                fail_field(
                    root,
                    p + "slstm_at",
                    f"indices must be in [0, num_blocks={self.num_blocks})",
                    self.slstm_at,
                )
        if len(set(slstm_at)) != len(slstm_at):
            fail_field(root, p + "slstm_at", "indices must not repeat", self.slstm_at)
        if slstm_at and self.slstm_block is None:
            fail_field(
                root,
                p + "slstm_block",
                f"must be set: slstm_at={self.slstm_at} places sLSTM blocks"
                + (
                    " (mlstm_block is None, so every block is an sLSTM block)"
                    if self.mlstm_block is None
                    else ""
                ),
            )
        if self.scan_blocks and slstm_at:
            fail_field(
                root,
                p + "scan_blocks",
                f"must be False when the stack has sLSTM blocks (slstm_at={self.slstm_at}): "
                "their forget-gate init depends on the block index",
                True,
            )

    def block_config(self, idx: int) -> xLSTMBlockConfig:
        """The `xLSTMBlockConfig` of block `idx` (a deep copy of its template with `_block_idx=idx`)."""
        if not is_int(idx) or not 0 <= idx < self.num_blocks:
            raise ValueError(
                f"block index must be in [0, num_blocks={self.num_blocks}), got {idx!r}"
            )
        parallel = copy.deepcopy(self.parallel)
        # `_block_map` joins one digit per block with ",": block idx is character 2 * idx. (Parsing
        # the whole map per block made `block_configs()` quadratic in num_blocks.)
        assert self._block_map is not None
        if self._block_map[2 * idx] == "0":
            assert self.mlstm_block is not None
            block = copy.deepcopy(self.mlstm_block)
            block._block_idx = idx
            block._derive()
            return xLSTMBlockConfig(
                mlstm=block.mlstm,
                slstm=None,
                parallel=parallel,
                feedforward=block.feedforward,
                dtype=block.mlstm.dtype,
                norm_eps=block.mlstm.mlstm_cell.norm_eps,
                norm_type=block.mlstm.mlstm_cell.norm_type,
                add_post_norm=block.add_post_norm,
                _num_blocks=self.num_blocks,
                _block_idx=idx,
            )
        assert self.slstm_block is not None
        block_s = copy.deepcopy(self.slstm_block)
        block_s._block_idx = idx
        block_s._derive()
        # sLSTM block norms: the model's norm_type/norm_eps when this is an LM config (a port choice; the
        # PyTorch sLSTM block uses LayerNorm with eps 1e-5), else the xLSTMBlockConfig defaults.
        lm = self if isinstance(self, xLSTMLMModelConfig) else None
        norm_type: NormType = lm.norm_type if lm is not None else "layernorm"
        norm_eps = lm.norm_eps if lm is not None else 1e-6
        return xLSTMBlockConfig(
            mlstm=None,
            slstm=block_s.slstm,
            parallel=parallel,
            feedforward=block_s.feedforward,
            dtype=self.dtype,
            norm_eps=norm_eps,
            norm_type=norm_type,
            add_post_norm=False,
            _num_blocks=self.num_blocks,
            _block_idx=idx,
        )

    def block_configs(self) -> list[xLSTMBlockConfig]:
        """Per-block configs in stack order (deep copies with `_block_idx` set)."""
        return [self.block_config(i) for i in range(self.num_blocks)]

    @property
    def _dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)


@configclass
class xLSTMLMModelConfig(xLSTMBlockStackConfig):
    """xLSTM language model: the stack plus embedding and LM head settings (docs/architecture.md, "Forward pass of xLSTMLMModel").

    `vocab_size=-1` (the reference default, "fill from the tokenizer") is accepted here;
    `validate()` — which the model calls before making any array — requires a positive
    `vocab_size`.
    """

    vocab_size: int = field(default=-1, check=POSITIVE_OR_UNSET)
    """Vocabulary size V (-1: unset, to be filled from the tokenizer before building a model)."""
    tie_weights: bool = False
    """Use the embedding table as the LM head (the reference's Flax model ignores it)."""
    weight_decay_on_embedding: bool = False
    """Apply weight decay to the embedding table."""
    add_embedding_dropout: bool = False
    """Dropout (rate `dropout`) on the token embeddings."""
    norm_eps: float = field(default=1e-6, check=POSITIVE)
    """Eps of the block norms and the output norm."""
    norm_type: NormType = "layernorm"
    """Type of the block norms and the output norm; also overwrites the mLSTM layer's and cell's
    `norm_type` (reference behaviour)."""
    logits_soft_cap: float | None = field(default=None, check=POSITIVE)
    """Soft cap `c * tanh(x / c)` of the logits (None: no cap)."""
    lm_head_dtype: DType = "float32"
    """Dtype the LM head computes in."""

    def _cross_check(self, root: str, prefix: str) -> None:
        super()._cross_check(root, prefix)
        tp = tp_size(self.parallel)
        if tp > 1:
            check_field_divides(
                root, prefix + "parallel.model_axis_size", tp, self.embedding_dim, "embedding_dim"
            )

    def validate(self) -> None:
        """Full check before building a model: everything `__post_init__` checks, plus `vocab_size > 0`."""
        self._validate(type(self).__name__, "")
        if self.vocab_size <= 0:
            fail_field(
                type(self).__name__,
                "vocab_size",
                "must be set to a positive int before a model is built (-1 means unset)",
                self.vocab_size,
            )

    @property
    def _lm_head_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.lm_head_dtype)
