"""The xLSTM language model (docs/architecture.md, "Forward pass of xLSTMLMModel").

tokens ``(B, S)`` → embedding ``(B, S, D)`` in ``dtype`` → optional embedding dropout → block
stack → post-blocks norm → LM head in ``lm_head_dtype`` → float32 logits → optional soft cap.

Choices where the reference is quirky (docs/architecture.md, "Reference quirks kept"):

- ``add_post_blocks_norm`` is honoured: the reference always applies ``out_norm`` (it ignores the
  flag). Its default is True, so every shipped config behaves as in the reference.
- ``tie_weights=True`` makes the LM head use the embedding table (``x @ Eᵀ``); there is then no
  ``lm_head`` parameter. The Flax reference ignores the flag (it follows the PyTorch copy here).
- ``weight_decay_on_embedding`` is read by ``decay_mask``.
- Dropout acts only when a ``key`` is passed (the reference's layers default to ``train=True``).
- Nothing is sized by ``context_length``: any ``S ≥ 1`` works at call time.
"""

from collections.abc import Mapping
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jax.core import Tracer
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray, PyTree

from ..core.utils import check_rank, split_optional_key
from ..nn.axes import LM_HEAD_AXES
from ..nn.functional import dropout, soft_cap
from ..nn.init import small_init_std, small_initializer
from ..nn.linear import Dense, Embedding
from ..nn.norm import LayerNorm, RMSNorm, make_norm
from .blocks import xLSTMBlockStack
from .config import xLSTMLMModelConfig


class xLSTMLMModel(eqx.Module):
    """xLSTM language model from an ``xLSTMLMModelConfig``.

    ``model(tokens, *, key=None, document_borders=None) -> logits (B, S, V) float32``, which is
    ``project_logits(hidden_states(tokens, ...))`` (the chunked loss uses the two pieces).
    Deterministic when ``key`` is None. ``document_borders[b, t]`` marks the first token of a new
    document; with ``mlstm_cell.reset_at_document_boundaries`` the mLSTM memory is reset there.

    Parameters: ``token_embedding.embedding (V, D)`` (small-init(D), ``init_distribution_embed``),
    the block stack, ``out_norm.scale (D,)``, ``lm_head.kernel (D, V)`` (small-init(D),
    ``init_distribution_out``; absent with ``tie_weights``). All float32.
    """

    token_embedding: Embedding
    xlstm_block_stack: xLSTMBlockStack
    out_norm: LayerNorm | RMSNorm | None
    lm_head: Dense | None
    vocab_size: int = eqx.field(static=True)
    embedding_dim: int = eqx.field(static=True)
    dtype: str = eqx.field(static=True)
    lm_head_dtype: str = eqx.field(static=True)
    dropout_rate: float = eqx.field(static=True)
    add_embedding_dropout: bool = eqx.field(static=True)
    tie_weights: bool = eqx.field(static=True)
    weight_decay_on_embedding: bool = eqx.field(static=True)
    logits_soft_cap: float | None = eqx.field(static=True)
    # the reference's names of the embedding and the LM head (fsdp_modules / remat)
    field_reference_names: ClassVar[Mapping[str, str | None]] = {
        "token_embedding": "Embed",
        "out_norm": "LMHead",
        "lm_head": "LMHead",
    }

    def __init__(self, config: xLSTMLMModelConfig, *, key: PRNGKeyArray):
        config.validate()  # e.g. vocab_size=-1 (unset) fails here, before any array is made
        V, D = config.vocab_size, config.embedding_dim
        kemb, kstack, khead = jr.split(key, 3)
        self.token_embedding = Embedding(
            V,
            D,
            dtype=config.dtype,
            distribution=config.init_distribution_embed,
            std=small_init_std(D),
            key=kemb,
        )
        self.xlstm_block_stack = xLSTMBlockStack(config, key=kstack)
        self.out_norm = (
            make_norm(
                config.norm_type, D, eps=config.norm_eps, dtype=config.dtype, axes=LM_HEAD_AXES[:1]
            )
            if config.add_post_blocks_norm
            else None
        )
        self.lm_head = (
            None
            if config.tie_weights
            else Dense(
                D,
                V,
                dtype=config.lm_head_dtype,
                kernel_init=small_initializer(D, config.init_distribution_out),
                axes=LM_HEAD_AXES,
                key=khead,
            )
        )
        self.vocab_size = V
        self.embedding_dim = D
        self.dtype = config.dtype
        self.lm_head_dtype = config.lm_head_dtype
        self.dropout_rate = float(config.dropout)
        self.add_embedding_dropout = bool(config.add_embedding_dropout)
        self.tie_weights = bool(config.tie_weights)
        self.weight_decay_on_embedding = bool(config.weight_decay_on_embedding)
        cap = config.logits_soft_cap
        self.logits_soft_cap = None if cap is None else float(cap)

    def _check_inputs(self, tokens: Array, document_borders: Array | None) -> None:
        check_rank("tokens", tokens, "(B, S)")
        if document_borders is not None and document_borders.shape != tokens.shape:
            raise ValueError(
                f"document_borders has shape {document_borders.shape}; expected the tokens' "
                f"shape (B, S) = {tokens.shape}"
            )
        if tokens.shape[1] < 1:
            raise ValueError("tokens must have a sequence length S >= 1, got S = 0")
        # Range check only on concrete arrays (cheap there; under jit it is the data layer's job).
        if not isinstance(tokens, Tracer):
            lo, hi = int(jnp.min(tokens)), int(jnp.max(tokens))
            if lo < 0 or hi >= self.vocab_size:
                bad = lo if lo < 0 else hi
                raise ValueError(
                    f"token id {bad} is outside the vocabulary [0, vocab_size={self.vocab_size})"
                )

    def embed(
        self, tokens: Int[Array, "*batch"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "*batch D"]:
        """Token embedding in ``dtype`` (with embedding dropout if configured and keyed)."""
        x = self.token_embedding(tokens)
        if self.add_embedding_dropout:
            x = dropout(x, self.dropout_rate, key=key)
        return x

    @jax.named_scope("LMHead")
    def final_norm(self, x: Float[Array, "*batch D"]) -> Float[Array, "*batch D"]:
        """The post-blocks norm (identity without ``add_post_blocks_norm``)."""
        return x if self.out_norm is None else self.out_norm(x)

    @jax.named_scope("LMHead")
    def project_logits(self, h: Float[Array, "*batch D"]) -> Float[Array, "*batch V"]:
        """LM head on normed hidden states (any leading shape, e.g. a chunk of tokens): the head
        (or the tied embedding) in ``lm_head_dtype``, float32 logits, soft cap. No dropout."""
        if self.lm_head is None:
            logits = self.token_embedding.attend(h, self.lm_head_dtype)
        else:
            logits = self.lm_head(h)
        return soft_cap(logits.astype(jnp.float32), self.logits_soft_cap)

    def head(self, x: Float[Array, "*batch D"]) -> Float[Array, "*batch V"]:
        """Post-blocks norm, then `project_logits`."""
        return self.project_logits(self.final_norm(x))

    def hidden_states(
        self,
        tokens: Int[Array, "B S"],
        *,
        key: PRNGKeyArray | None = None,
        document_borders: Bool[Array, "B S"] | None = None,
    ) -> Float[Array, "B S D"]:
        """The activations entering the LM head (after the post-blocks norm), in ``dtype``:
        ``project_logits(hidden_states(t))`` is ``__call__(t)`` bit for bit. The chunked loss
        (training/loss.py) applies the head to slices of them."""
        self._check_inputs(tokens, document_borders)
        kemb, kstack = split_optional_key(key, 2)
        x = self.embed(tokens, key=kemb)
        x = self.xlstm_block_stack(x, document_borders=document_borders, key=kstack)
        return self.final_norm(x)

    def __call__(
        self,
        tokens: Int[Array, "B S"],
        *,
        key: PRNGKeyArray | None = None,
        document_borders: Bool[Array, "B S"] | None = None,
    ) -> Float[Array, "B S V"]:
        self._check_inputs(tokens, document_borders)  # before the typed hidden_states sees them
        h = self.hidden_states(tokens, key=key, document_borders=document_borders)
        return self.project_logits(h)

    # decode API (docs/architecture.md, "Generation") --------------------------------------------

    has_kv_cache: ClassVar[bool] = False  # the decode state has a fixed size, whatever the context

    def init_state(self, batch_size: int) -> PyTree:
        """Zero decode state of every block (conv windows and cell memories)."""
        return self.xlstm_block_stack.init_state(batch_size)

    def call_with_state(
        self,
        tokens: Int[Array, "B S"],
        state: PyTree,
        *,
        document_borders: Bool[Array, "B S"] | None = None,
    ) -> tuple[Float[Array, "B S V"], PyTree]:
        """Logits of ``S`` tokens that continue from ``state`` and the state after the last one
        (deterministic): a prompt from ``init_state(B)`` (prefill), one token (``S = 1``, the
        recurrent step, O(1) in the length of the context) or a whole sequence. The logits agree
        with ``__call__`` to the backends' tolerance."""
        self._check_inputs(tokens, document_borders)
        x, state = self.xlstm_block_stack.call_with_state(
            self.embed(tokens), state, document_borders=document_borders
        )
        return self.head(x), state


def decay_mask(model: PyTree) -> PyTree:
    """Weight-decay mask for optax (same structure as the model; a bool per array leaf).

    True for kernels (every array stored in a field named ``kernel``: dense, headwise, conv and
    gate kernels — the reference decays parameters matching ``.*kernel``). False for norm scales,
    biases, ``learnable_skip`` and the embedding — unless the model has
    ``weight_decay_on_embedding=True``, in which case the embedding table is decayed too.
    """
    decay_embedding = bool(getattr(model, "weight_decay_on_embedding", False))

    def rule(path: tuple[Any, ...], leaf: Any) -> bool:
        if not eqx.is_array(leaf) and not isinstance(leaf, jax.ShapeDtypeStruct):
            return False
        names = [p.name for p in path if isinstance(p, jax.tree_util.GetAttrKey)]
        last = names[-1] if names else ""
        if last == "kernel":
            return True
        if last == "embedding":
            return decay_embedding
        return False

    return jax.tree_util.tree_map_with_path(rule, model)
