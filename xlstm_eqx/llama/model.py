"""The Llama baseline (docs/architecture.md, "Llama"): a pre-norm transformer with RoPE attention
and SwiGLU.

Data flow of ``LlamaTransformer``: tokens ``(B, S)`` → embedding ``(B, S, D)`` in ``dtype`` → optional
embedding dropout → ``num_blocks`` × ``TransformerBlock`` (``x + Attn(RMSNorm(x))``, then
``x + FFN(RMSNorm(x))``; scanned with stacked parameters if ``scan_blocks``) → ``out_norm`` →
LM head ``(D, V)`` in ``dtype`` → float32 logits → optional soft cap.

Departures from the reference, each deliberate:

- Query scale: ``head_dim^-1/2``. The reference multiplies q by ``NH^-1/2`` (it reads the head
  *count* axis; docs/architecture.md, "Reference quirks kept"); set ``query_scale_quirk=True`` on
  the config to reproduce that for converted checkpoints.
- RoPE is applied in float32 and the result cast back to ``dtype`` (the reference casts the sin/cos
  tables to ``dtype`` first); the tables are computed at call time for the positions in use, so they
  are not parameters and any sequence length works.
- Dropout acts only when a ``key`` is passed (the reference's ``train`` flag).
"""

from collections.abc import Mapping
from functools import partial
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray, PyTree

from ..core.parallel_config import ParallelConfig
from ..core.utils import check_rank, split_optional_key, to_dtype
from ..nn.axes import LM_HEAD_AXES, REPLICATED, LogicalAxes
from ..nn.functional import dropout, silu, soft_cap
from ..nn.init import output_initializer, small_init_std, small_initializer
from ..nn.linear import Dense, Embedding
from ..nn.norm import RMSNorm
from .attention import (
    NORM_EPS,
    LlamaKVCache,
    SelfAttentionBlock,
    check_config,
    check_one_document,
    maybe_remat,
    rope_sin_cos,
)
from .config import LlamaConfig


def _remat_names(config: LlamaConfig) -> tuple[str, ...]:
    """The module names in ``parallel.remat`` (none without a ``ParallelConfig``)."""
    parallel = config.parallel
    return tuple(parallel.remat) if isinstance(parallel, ParallelConfig) else ()


class FFNBlock(eqx.Module):
    """``FFN(RMSNorm(x))`` without the residual: SwiGLU ``(x W_up ⊙ SiLU(x W_gate)) W_down``.

    Up/gate kernels ``(D, H)`` small-init(D), down ``(H, D)`` wang(D, 2·num_blocks), with
    ``H = config.ffn_hidden_dim`` (``int(8D/3)``, times ``ffn_dim_multiplier``, rounded up to a
    multiple of ``ffn_multiple_of``); dropout on the output with a key.
    """

    pre_norm: RMSNorm
    proj_up: Dense
    proj_up_gate: Dense
    proj_down: Dense
    dropout_rate: float = eqx.field(static=True)
    reference_name: ClassVar[str] = "FFNBlock"  # fsdp_modules / remat name

    def __init__(self, config: LlamaConfig, *, key: PRNGKeyArray):
        check_config(config)
        D = config.embedding_dim
        H = config.ffn_hidden_dim
        kup, kgate, kdown = jr.split(key, 3)
        up_init = small_initializer(D)
        down_init = output_initializer("wang", D, 2 * config.num_blocks)
        # Megatron layout (logical axes: nn.axes): the residual stream replicated over tp,
        # column-parallel up/gate, a row-parallel down-projection.
        self.pre_norm = RMSNorm(D, eps=NORM_EPS, dtype=config.dtype, axes=REPLICATED)

        up = partial(Dense, D, H, use_bias=config.use_bias, dtype=config.dtype, kernel_init=up_init)
        self.proj_up = up(axes=("embed", "mlp"), key=kup)
        self.proj_up_gate = up(axes=("embed", "mlp"), key=kgate)
        self.proj_down = Dense(
            H,
            D,
            use_bias=config.use_bias,
            dtype=config.dtype,
            kernel_init=down_init,
            axes=("mlp", "embed"),
            bias_axes=REPLICATED,
            key=kdown,
        )
        self.dropout_rate = float(config.dropout_rate)

    @jax.named_scope("FFNBlock")
    def __call__(
        self, x: Float[Array, "B S D"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "B S D"]:
        h = self.pre_norm(x)
        h = self.proj_up(h) * silu(self.proj_up_gate(h))
        return dropout(self.proj_down(h), self.dropout_rate, key=key)


class TransformerBlock(eqx.Module):
    """``x = x + Attn(RMSNorm(x))``; ``x = x + FFN(RMSNorm(x))``. ``"AttnBlock"`` / ``"FFNBlock"``
    in ``parallel.remat`` rematerialise the two sub-blocks in the backward pass."""

    attn: SelfAttentionBlock
    ffn: FFNBlock
    remat_attn: bool = eqx.field(static=True)
    remat_ffn: bool = eqx.field(static=True)
    reference_name: ClassVar[str] = "TransformerBlock"  # fsdp_modules / remat name

    def __init__(self, config: LlamaConfig, *, key: PRNGKeyArray):
        kattn, kffn = jr.split(key)
        self.attn = SelfAttentionBlock(config, key=kattn)
        self.ffn = FFNBlock(config, key=kffn)
        remat = _remat_names(config)
        self.remat_attn = SelfAttentionBlock.reference_name in remat
        self.remat_ffn = FFNBlock.reference_name in remat

    def __call__(
        self,
        x: Float[Array, "B S D"],
        sin: Float[Array, "B S half"],
        cos: Float[Array, "B S half"],
        segment_ids: Int[Array, "B S"] | None = None,
        *,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "B S D"]:
        kattn, kffn = split_optional_key(key, 2)
        # Called through the sub-modules themselves (not an unbound __call__): FSDP may have
        # wrapped them (parallel/fsdp.py, gather-at-use).
        x = x + maybe_remat(self.attn, self.remat_attn)(x, sin, cos, segment_ids, key=kattn)
        return x + maybe_remat(self.ffn, self.remat_ffn)(x, key=kffn)

    def call_with_state(
        self,
        x: Float[Array, "B S D"],
        state: LlamaKVCache,
        *,
        document_borders: Bool[Array, "B S"] | None = None,
    ) -> tuple[Float[Array, "B S D"], LlamaKVCache]:
        """``S`` tokens continuing this layer's KV cache (deterministic): outputs and the cache
        with their keys and values."""
        y, state = self.attn.call_with_state(x, state, document_borders=document_borders)
        x = x + y
        return x + self.ffn(x), state

    def call_with_layer_cache(
        self, x: Float[Array, "B S D"], cache: LlamaKVCache, layer: Int[Array, ""]
    ) -> tuple[Float[Array, "B S D"], tuple[Array, Array]]:
        """`call_with_state` reading layer ``layer`` of the stack's cache: outputs and the new
        tokens' keys and values, for the stack to write (`SelfAttentionBlock.call_with_layer_cache`)."""
        y, new_kv = self.attn.call_with_layer_cache(x, cache, layer)
        x = x + y
        return x + self.ffn(x), new_kv


class TransformerBlockStack(eqx.Module):
    """``num_blocks`` transformer blocks applied in order.

    ``scan_blocks=True``: one ``TransformerBlock`` whose array leaves carry a leading axis of
    length L (built with ``eqx.filter_vmap``), applied with ``jax.lax.scan``. ``False``: a tuple of
    L blocks. Block ``l`` is built from key ``jr.split(key, L)[l]`` in both modes, so the same key
    gives the same weights. ``"TransformerBlock" in parallel.remat`` rematerialises each block.
    """

    blocks: TransformerBlock | tuple[TransformerBlock, ...]
    num_blocks: int = eqx.field(static=True)
    scan_blocks: bool = eqx.field(static=True)
    remat_block: bool = eqx.field(static=True)
    # logical name (nn.axes) of the leading axis of the scanned (single, stacked) block
    blocks_axes: ClassVar[LogicalAxes] = ("layers",)
    reference_name: ClassVar[str] = "BlockStack"  # fsdp_modules / remat name

    def __init__(self, config: LlamaConfig, *, key: PRNGKeyArray):
        check_config(config)
        keys = jr.split(key, config.num_blocks)
        if config.scan_blocks:
            self.blocks = eqx.filter_vmap(lambda k: TransformerBlock(config, key=k))(keys)
        else:
            self.blocks = tuple(TransformerBlock(config, key=k) for k in keys)
        self.num_blocks = config.num_blocks
        self.scan_blocks = bool(config.scan_blocks)
        self.remat_block = TransformerBlock.reference_name in _remat_names(config)

    def __call__(
        self,
        x: Float[Array, "B S D"],
        sin: Float[Array, "B S half"],
        cos: Float[Array, "B S half"],
        segment_ids: Int[Array, "B S"] | None = None,
        *,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "B S D"]:
        keys = None if key is None else jr.split(key, self.num_blocks)

        remat = self.remat_block
        if isinstance(self.blocks, tuple):
            for i, block in enumerate(self.blocks):
                block_key = None if keys is None else keys[i]
                x = maybe_remat(block, remat)(x, sin, cos, segment_ids, key=block_key)
            return x
        params, static = eqx.partition(self.blocks, eqx.is_array)

        def body(h: Array, xs: tuple[PyTree, PRNGKeyArray | None]) -> tuple[Array, None]:
            block_params, block_key = xs
            block = maybe_remat(eqx.combine(block_params, static), remat)
            return block(h, sin, cos, segment_ids, key=block_key), None

        x, _ = jax.lax.scan(body, x, (params, keys))
        return x

    def call_with_state(
        self,
        x: Float[Array, "B S D"],
        state: LlamaKVCache,
        *,
        document_borders: Bool[Array, "B S"] | None = None,
    ) -> tuple[Float[Array, "B S D"], LlamaKVCache]:
        """``S`` new tokens through the blocks; the cache length advances by ``S``. Every layer
        reads its part of the whole cache (no slice of it copied in or out through the scan's
        xs/ys, which copied the whole cache at every decoded token) and returns its new keys and
        values; they are written into the cache once, after the last layer has read it, so XLA
        updates it in place."""
        check_one_document(document_borders)
        layers = jnp.arange(self.num_blocks, dtype=state.length.dtype)
        if isinstance(self.blocks, tuple):
            new_kv = []
            for block, layer in zip(self.blocks, layers, strict=True):
                x, kv = block.call_with_layer_cache(x, state, layer)
                new_kv.append(kv)
            new_keys, new_values = (jnp.stack(a) for a in zip(*new_kv, strict=True))
        else:
            params, static = eqx.partition(self.blocks, eqx.is_array)

            def body(h: Array, xs: tuple[PyTree, Array]) -> tuple[Array, tuple[Array, Array]]:
                block_params, layer = xs
                return eqx.combine(block_params, static).call_with_layer_cache(h, state, layer)

            x, (new_keys, new_values) = jax.lax.scan(body, x, (params, layers))
        zero = jnp.zeros((), state.length.dtype)
        start = (zero, zero, state.length, zero, zero)
        keys = jax.lax.dynamic_update_slice(state.keys, new_keys, start)
        values = jax.lax.dynamic_update_slice(state.values, new_values, start)
        S = x.shape[1]
        return x, LlamaKVCache(keys, values, state.length + jnp.asarray(S, state.length.dtype))


# the model


class LlamaTransformer(eqx.Module):
    """Llama language model from a ``LlamaConfig``: tokens ``(B, S)`` → float32 logits ``(B, S, V)``.

    Parameters are float32; ``dtype`` is the compute dtype of every layer and of the LM head.
    Deterministic without a key; dropout (rate ``dropout_rate``: attention and FFN outputs, and the
    embedding if ``add_embedding_dropout``) only with a key.
    """

    token_embedding: Embedding
    blocks: TransformerBlockStack
    out_norm: RMSNorm
    lm_head: Dense
    vocab_size: int = eqx.field(static=True)
    embedding_dim: int = eqx.field(static=True)
    num_heads: int = eqx.field(static=True)
    head_dim: int = eqx.field(static=True)
    theta: float = eqx.field(static=True)
    dtype: str = eqx.field(static=True)
    dropout_rate: float = eqx.field(static=True)
    add_embedding_dropout: bool = eqx.field(static=True)
    mask_across_document_boundaries: bool = eqx.field(static=True)
    causal: bool = eqx.field(static=True)
    logits_soft_cap: float | None = eqx.field(static=True)
    # the context-parallel axis inside `parallel.context_parallel`'s shard_map (None: off); the
    # default RoPE positions of a segment then start at its offset in the whole sequence
    context_axis: str | None = eqx.field(static=True)
    # the reference's names of the embedding and the LM head (fsdp_modules / remat)
    field_reference_names: ClassVar[Mapping[str, str | None]] = {
        "token_embedding": "Embed",
        "out_norm": "LMHead",
        "lm_head": "LMHead",
    }

    def __init__(self, config: LlamaConfig, *, key: PRNGKeyArray):
        check_config(config)
        kembed, kblocks, khead = jr.split(key, 3)
        D = config.embedding_dim
        self.token_embedding = Embedding(
            config.vocab_size, D, dtype=config.dtype, std=small_init_std(D), key=kembed
        )
        self.blocks = TransformerBlockStack(config, key=kblocks)
        self.out_norm = RMSNorm(D, eps=NORM_EPS, dtype=config.dtype, axes=LM_HEAD_AXES[:1])
        self.lm_head = Dense(
            D,
            config.vocab_size,
            use_bias=False,
            dtype=config.dtype,
            kernel_init=small_initializer(D),
            axes=LM_HEAD_AXES,
            key=khead,
        )
        self.vocab_size = config.vocab_size
        self.embedding_dim = D
        self.num_heads = D // config.head_dim
        self.head_dim = config.head_dim
        self.theta = float(config.theta)
        self.dtype = to_dtype(config.dtype).name
        self.dropout_rate = float(config.dropout_rate)
        self.add_embedding_dropout = bool(config.add_embedding_dropout)
        self.mask_across_document_boundaries = bool(config.mask_across_document_boundaries)
        self.causal = bool(config.causal)
        self.logits_soft_cap = (
            None if config.logits_soft_cap is None else float(config.logits_soft_cap)
        )
        self.context_axis = None

    @jax.named_scope("LMHead")
    def final_norm(self, x: Float[Array, "*batch D"]) -> Float[Array, "*batch D"]:
        """The RMSNorm after the last block."""
        return self.out_norm(x)

    @jax.named_scope("LMHead")
    def project_logits(self, h: Float[Array, "*batch D"]) -> Float[Array, "*batch V"]:
        """LM head on normed hidden states (any leading shape, e.g. a chunk of tokens) in
        ``dtype``, float32 logits, soft cap. No dropout."""
        return soft_cap(self.lm_head(h).astype(jnp.float32), self.logits_soft_cap)

    def _head(self, x: Float[Array, "B S D"]) -> Float[Array, "B S V"]:
        return self.project_logits(self.final_norm(x))

    def __call__(
        self,
        tokens: Int[Array, "B S"],
        *,
        key: PRNGKeyArray | None = None,
        document_borders: Bool[Array, "B S"] | None = None,
        positions: Int[Array, "B S"] | None = None,
    ) -> Float[Array, "B S V"]:
        """Logits for every position: ``project_logits(hidden_states(tokens, ...))``."""
        check_rank("tokens", tokens, "(B, S)")  # before the typed hidden_states sees them
        h = self.hidden_states(
            tokens, key=key, document_borders=document_borders, positions=positions
        )
        return self.project_logits(h)

    def hidden_states(
        self,
        tokens: Int[Array, "B S"],
        *,
        key: PRNGKeyArray | None = None,
        document_borders: Bool[Array, "B S"] | None = None,
        positions: Int[Array, "B S"] | None = None,
    ) -> Float[Array, "B S D"]:
        """The activations entering the LM head (after ``out_norm``), in ``dtype``; the chunked
        loss (training/loss.py) applies `project_logits` to slices of them.

        - ``document_borders``: True where a token starts a new document. Used only when
          ``mask_across_document_boundaries``: tokens then attend only within their document
          (document index = cumsum of the borders).
        - ``positions``: RoPE positions (e.g. restarting at 0 in each document, as the reference
          trainer passes them); default ``arange(S)`` (on a cp mesh: the segment's own positions
          in the whole sequence, ``axis_index · S_local + arange(S_local)``).
        """
        check_rank("tokens", tokens, "(B, S)")
        B, S = tokens.shape
        if document_borders is not None and document_borders.shape != (B, S):
            raise ValueError(
                f"document_borders has shape {document_borders.shape}; expected (B, S) = {(B, S)}"
            )
        if positions is not None and positions.shape != (B, S):
            raise ValueError(f"positions has shape {positions.shape}; expected (B, S) = {(B, S)}")
        kembed, kblocks = split_optional_key(key, 2)
        x = self.token_embedding(tokens)
        if self.add_embedding_dropout:
            x = dropout(x, self.dropout_rate, key=kembed)
        if positions is None:
            start = 0 if self.context_axis is None else jax.lax.axis_index(self.context_axis) * S
            positions = jnp.broadcast_to(start + jnp.arange(S, dtype=jnp.int32), (B, S))
        sin, cos = rope_sin_cos(positions, self.head_dim, self.theta)
        segment_ids = None
        if document_borders is not None and self.mask_across_document_boundaries:
            segment_ids = jnp.cumsum(document_borders.astype(jnp.int32), axis=1, dtype=jnp.int32)
        x = self.blocks(x, sin, cos, segment_ids, key=kblocks)
        return self.final_norm(x)

    # -- decoding (docs/architecture.md, "Generation") ------------------------------------------

    has_kv_cache: ClassVar[bool] = True  # the decode state grows with the context (max_len)

    def init_state(self, batch_size: int, max_len: int) -> LlamaKVCache:
        """An empty KV cache for ``batch_size`` sequences of up to ``max_len`` tokens."""
        if batch_size <= 0 or max_len <= 0:
            raise ValueError(
                f"init_state: batch_size ({batch_size}) and max_len ({max_len}) must be positive"
            )
        shape = (self.blocks.num_blocks, batch_size, max_len, self.num_heads, self.head_dim)
        zeros = jnp.zeros(shape, jnp.dtype(self.dtype))
        return LlamaKVCache(zeros, zeros, jnp.zeros((), jnp.int32))

    def call_with_state(
        self,
        tokens: Int[Array, "B S"],
        state: LlamaKVCache,
        *,
        document_borders: Bool[Array, "B S"] | None = None,
    ) -> tuple[Float[Array, "B S V"], LlamaKVCache]:
        """Logits of ``S`` tokens that continue the cached sequence (prefill from an empty cache,
        one decode step with ``S = 1``) and the cache extended by them. No dropout; one
        document per sequence (``document_borders`` must be None). Equal to the matching rows of
        ``__call__`` on the whole sequence."""
        if not self.causal:
            raise ValueError("decoding needs a causal model (LlamaConfig.causal=True)")
        check_one_document(document_borders)
        check_rank("tokens", tokens, "(B, S)")
        B, S = tokens.shape
        S_max = state.keys.shape[2]
        if state.keys.shape[1] != B:
            raise ValueError(
                f"cache batch size {state.keys.shape[1]} does not match tokens batch size {B}"
            )
        if S > S_max:
            raise ValueError(f"{S} tokens do not fit in a KV cache of max_len {S_max}")
        length = eqx.error_if(
            state.length,
            state.length + S > S_max,
            f"KV cache overflow: decoding past max_len={S_max}",
        )
        state = eqx.tree_at(lambda c: c.length, state, length)
        x, state = self.blocks.call_with_state(self.token_embedding(tokens), state)
        return self._head(x), state
