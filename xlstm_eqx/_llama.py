"""The Llama baseline (ARCHITECTURE §7): a pre-norm transformer with RoPE attention and SwiGLU.

Data flow of ``LlamaTransformer``: tokens ``(B, S)`` → embedding ``(B, S, D)`` in ``dtype`` → optional
embedding dropout → ``num_blocks`` × ``TransformerBlock`` (``x + Attn(RMSNorm(x))``, then
``x + FFN(RMSNorm(x))``; scanned with stacked parameters if ``scan_blocks``) → ``out_norm`` →
LM head ``(D, V)`` in ``dtype`` → float32 logits → optional soft cap.

Departures from the reference, each deliberate:

- Query scale: ``head_dim^-1/2``. The reference multiplies q by ``NH^-1/2`` (it reads the head
  *count* axis, ARCHITECTURE §9.13); set ``query_scale_quirk=True`` on the config to reproduce that
  for converted checkpoints.
- RoPE is applied in float32 and the result cast back to ``dtype`` (the reference casts the sin/cos
  tables to ``dtype`` first); the tables are computed at call time for the positions in use, so they
  are not parameters and any sequence length works.
- Dropout acts only when a ``key`` is passed (the reference's ``train`` flag).
"""

from collections.abc import Callable
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from ._configs import LlamaConfig
from ._nn import (
    Dense,
    DenseGeneral,
    Embedding,
    RMSNorm,
    dropout,
    output_initializer,
    small_init_std,
    small_initializer,
    soft_cap,
    split_optional_key,
    to_dtype,
)


AttentionBackend = Literal["xla", "cudnn", "pallas_triton"]
ATTENTION_BACKENDS: tuple[str, ...] = ("xla", "cudnn", "pallas_triton")

# Flax RMSNorm default, used by every norm of the reference Llama.
_NORM_EPS = 1e-6


# ----------------------------------------------------------------------------------------------
# config helpers


def _check_config(config: LlamaConfig) -> None:
    """Re-validate the config (it may have been mutated since construction): a ``ValueError``
    naming the field, before any array is made."""
    if not isinstance(config, LlamaConfig):
        raise TypeError(f"expected a LlamaConfig, got {type(config).__name__}")
    config.validate()


def _query_scale(config: LlamaConfig) -> float:
    if config.query_scale_quirk:
        return config.num_heads**-0.5  # the reference's NH^-1/2 (ARCHITECTURE §9.13)
    return config.head_dim**-0.5


def _remat(fn: Callable, enabled: bool) -> Callable:
    """``fn`` rematerialised in the backward pass (``parallel.remat``, ARCHITECTURE §8.4)."""
    return eqx.filter_checkpoint(fn, prevent_cse=False) if enabled else fn


# ----------------------------------------------------------------------------------------------
# rotary position embedding (interleaved pairs)


def rope_sin_cos(
    positions: Int[Array, "B S"], head_dim: int, theta: float
) -> tuple[Float[Array, "B S half"], Float[Array, "B S half"]]:
    """float32 ``(sin, cos)`` of the angles ``pos · θ^(−2j/hd)``, ``j < hd/2``."""
    inv_freq = np.power(float(theta), -np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    return jnp.sin(angles), jnp.cos(angles)


def apply_rope(
    x: Float[Array, "B S NH hd"], sin: Float[Array, "B S half"], cos: Float[Array, "B S half"]
) -> Float[Array, "B S NH hd"]:
    """Rotate features ``(2j, 2j+1)`` of every head by the angle of pair ``j`` (in float32):
    ``x'_{2j} = x_{2j} cos − x_{2j+1} sin``, ``x'_{2j+1} = x_{2j} sin + x_{2j+1} cos``."""
    xf = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    even, odd = xf[..., 0], xf[..., 1]
    s, c = sin[:, :, None, :], cos[:, :, None, :]
    out = jnp.stack([even * c - odd * s, even * s + odd * c], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


# ----------------------------------------------------------------------------------------------
# attention core


def segment_mask(segment_ids: Int[Array, "B S"]) -> Bool[Array, "B 1 S S"]:
    """``mask[b, 0, i, j] = segment_ids[b, i] == segment_ids[b, j]`` (same document)."""
    return (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]


def _check_backend_platform(backend: str, dtype: Any) -> None:
    platform = jax.default_backend()
    if backend in ("cudnn", "pallas_triton") and platform != "gpu":
        raise RuntimeError(
            f"attention_backend={backend!r} needs an NVIDIA GPU, but the JAX platform here is "
            f"{platform!r}; use attention_backend='xla'"
        )
    if backend == "cudnn" and jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
        raise ValueError(
            f"attention_backend='cudnn' supports dtype bfloat16 or float16 only, got "
            f"{jnp.dtype(dtype).name}; use attention_backend='xla' for float32"
        )


def _xla_attention(
    q: Float[Array, "B T NH hd"],
    k: Float[Array, "B S NH hd"],
    v: Float[Array, "B S NH hd"],
    mask: Bool[Array, "B 1 T S"] | Bool[Array, "T S"] | None,
) -> Float[Array, "B T NH hd"]:
    """softmax(q kᵀ) v with logits and softmax in float32 (float64 for float64 inputs); masked
    logits get a large negative value, so a row keeps finite values even if fully masked."""
    acc = jnp.float64 if q.dtype == jnp.float64 else jnp.float32
    B, T, NH, _ = q.shape
    S = k.shape[1]

    # Batch and heads as one leading axis for both matmuls: with two batch axes XLA (seen on
    # CPU, jax 0.10) transposes the T x S matrices in the backward; this form was 2x faster
    # fwd+bwd at S=2048 (``xlstm-eqx bench profile --model llama``: 66% of the step before).
    def rows(x: Array) -> Array:
        return x.transpose(0, 2, 1, 3).reshape(B * NH, x.shape[1], x.shape[3])

    logits = jnp.einsum("xth,xsh->xts", rows(q), rows(k), preferred_element_type=acc)
    logits = logits.reshape(B, NH, T, S)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.asarray(-0.7 * jnp.finfo(acc).max, acc))
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype).reshape(B * NH, T, S)
    out = jnp.einsum("xts,xsh->xth", probs, rows(v))
    return out.reshape(B, NH, T, v.shape[3]).transpose(0, 2, 1, 3)


def multihead_attention(
    q: Float[Array, "B S NH hd"],
    k: Float[Array, "B S NH hd"],
    v: Float[Array, "B S NH hd"],
    *,
    causal: bool,
    segment_ids: Int[Array, "B S"] | None = None,
    backend: str = "xla",
) -> Float[Array, "B S NH hd"]:
    """Self-attention over a whole sequence with scale 1 (q comes pre-scaled).

    Masks: causal if ``causal``; with ``segment_ids`` only within the same segment (document).
    ``xla``: the einsum core above, on any platform; ``cudnn``: ``jax.nn.dot_product_attention``'s
    cuDNN flash kernel; ``pallas_triton``: the Pallas Triton flash kernel. The last two need an
    NVIDIA GPU and raise a clear error elsewhere.
    """
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(
            f"attention_backend={backend!r} is unknown; allowed: {', '.join(ATTENTION_BACKENDS)}"
        )
    _check_backend_platform(backend, q.dtype)
    if backend == "pallas_triton":
        from jax.experimental.pallas.ops.gpu.attention import mha

        return mha(q, k, v, segment_ids, sm_scale=1.0, causal=causal)
    seg_mask = None if segment_ids is None else segment_mask(segment_ids)
    if backend == "cudnn":
        return jax.nn.dot_product_attention(
            q, k, v, mask=seg_mask, scale=1.0, is_causal=causal, implementation="cudnn"
        )
    S = q.shape[1]
    mask = jnp.tril(jnp.ones((S, S), bool)) if causal else None
    if seg_mask is not None:
        mask = seg_mask if mask is None else mask & seg_mask
    return _xla_attention(q, k, v, mask)


# ----------------------------------------------------------------------------------------------
# blocks


class SelfAttentionBlock(eqx.Module):
    """``Attn(RMSNorm(x))`` without the residual (``TransformerBlock`` adds it).

    q/k/v kernels ``(D, NH, hd)`` small-init(D), optional bias ``(NH, hd)``; optional q/k RMSNorm
    over ``hd`` with scale ``(hd,)`` shared by the heads; RoPE; out kernel ``(NH, hd, D)``
    init wang(D, 2·num_blocks); dropout on the output with a key.
    """

    pre_norm: RMSNorm
    dense_q: DenseGeneral
    dense_k: DenseGeneral
    dense_v: DenseGeneral
    q_norm: RMSNorm | None
    k_norm: RMSNorm | None
    dense_out: DenseGeneral
    num_heads: int = eqx.field(static=True)
    head_dim: int = eqx.field(static=True)
    query_scale: float = eqx.field(static=True)
    causal: bool = eqx.field(static=True)
    attention_backend: str = eqx.field(static=True)
    dropout_rate: float = eqx.field(static=True)

    def __init__(self, config: LlamaConfig, *, key: PRNGKeyArray):
        _check_config(config)
        D, hd = config.embedding_dim, config.head_dim
        NH = D // hd
        kq, kk, kv, ko = jr.split(key, 4)
        dense = dict(use_bias=config.use_bias, dtype=config.dtype)
        qkv_init = small_initializer(D)
        out_init = output_initializer("wang", D, 2 * config.num_blocks)
        self.pre_norm = RMSNorm(D, eps=_NORM_EPS, dtype=config.dtype)
        self.dense_q = DenseGeneral(D, (NH, hd), kernel_init=qkv_init, key=kq, **dense)
        self.dense_k = DenseGeneral(D, (NH, hd), kernel_init=qkv_init, key=kk, **dense)
        self.dense_v = DenseGeneral(D, (NH, hd), kernel_init=qkv_init, key=kv, **dense)
        if config.qk_norm:
            self.q_norm = RMSNorm(hd, eps=_NORM_EPS, dtype=config.dtype)
            self.k_norm = RMSNorm(hd, eps=_NORM_EPS, dtype=config.dtype)
        else:
            self.q_norm = self.k_norm = None
        self.dense_out = DenseGeneral((NH, hd), D, kernel_init=out_init, key=ko, **dense)
        self.num_heads = NH
        self.head_dim = hd
        self.query_scale = float(_query_scale(config))
        self.causal = bool(config.causal)
        self.attention_backend = str(config.attention_backend)
        self.dropout_rate = float(config.dropout_rate)

    def project_qkv(
        self,
        x: Float[Array, "B S D"],
        sin: Float[Array, "B S half"],
        cos: Float[Array, "B S half"],
    ) -> tuple[Float[Array, "B S NH hd"], Float[Array, "B S NH hd"], Float[Array, "B S NH hd"]]:
        """Pre-norm, q/k/v projections, q/k norms, RoPE and the query scale."""
        h = self.pre_norm(x)
        q, k, v = self.dense_q(h), self.dense_k(h), self.dense_v(h)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, sin, cos), apply_rope(k, sin, cos)
        q = q * jnp.asarray(self.query_scale, q.dtype)
        return q, k, v

    def project_out(
        self, attn: Float[Array, "B S NH hd"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "B S D"]:
        return dropout(self.dense_out(attn), self.dropout_rate, key=key)

    @jax.named_scope("SelfAttention")
    def __call__(
        self,
        x: Float[Array, "B S D"],
        sin: Float[Array, "B S half"],
        cos: Float[Array, "B S half"],
        segment_ids: Int[Array, "B S"] | None = None,
        *,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "B S D"]:
        """``sin``/``cos`` from ``rope_sin_cos``; ``segment_ids`` (document index per token) restrict
        attention to the same document when given."""
        q, k, v = self.project_qkv(x, sin, cos)
        attn = multihead_attention(
            q, k, v, causal=self.causal, segment_ids=segment_ids, backend=self.attention_backend
        )
        return self.project_out(attn, key=key)

    def decode(
        self,
        x: Float[Array, "B T D"],
        sin: Float[Array, "B T half"],
        cos: Float[Array, "B T half"],
        cache_k: Float[Array, "B Smax NH hd"],
        cache_v: Float[Array, "B Smax NH hd"],
        length: Int[Array, ""],
    ) -> tuple[Float[Array, "B T D"], Float[Array, "B Smax NH hd"], Float[Array, "B Smax NH hd"]]:
        """Attend the ``T`` new tokens (absolute positions ``length … length+T−1``) to the cache
        plus themselves, causally; write their k/v into the cache. Always the XLA core."""
        q, k, v = self.project_qkv(x, sin, cos)
        zero = jnp.zeros((), length.dtype)
        cache_k = jax.lax.dynamic_update_slice(
            cache_k, k.astype(cache_k.dtype), (zero, length, zero, zero)
        )
        cache_v = jax.lax.dynamic_update_slice(
            cache_v, v.astype(cache_v.dtype), (zero, length, zero, zero)
        )
        T, S_max = x.shape[1], cache_k.shape[1]
        q_pos = length + jnp.arange(T, dtype=length.dtype)
        k_pos = jnp.arange(S_max, dtype=length.dtype)
        mask = k_pos[None, :] <= q_pos[:, None]  # (T, S_max): the past and the present
        attn = _xla_attention(q, cache_k.astype(q.dtype), cache_v.astype(q.dtype), mask)
        return self.project_out(attn), cache_k, cache_v


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

    def __init__(self, config: LlamaConfig, *, key: PRNGKeyArray):
        _check_config(config)
        D = config.embedding_dim
        H = config.ffn_hidden_dim
        kup, kgate, kdown = jr.split(key, 3)
        dense = dict(use_bias=config.use_bias, dtype=config.dtype)
        up_init = small_initializer(D)
        down_init = output_initializer("wang", D, 2 * config.num_blocks)
        self.pre_norm = RMSNorm(D, eps=_NORM_EPS, dtype=config.dtype)
        self.proj_up = Dense(D, H, kernel_init=up_init, key=kup, **dense)
        self.proj_up_gate = Dense(D, H, kernel_init=up_init, key=kgate, **dense)
        self.proj_down = Dense(H, D, kernel_init=down_init, key=kdown, **dense)
        self.dropout_rate = float(config.dropout_rate)

    @jax.named_scope("FFNBlock")
    def __call__(
        self, x: Float[Array, "B S D"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "B S D"]:
        h = self.pre_norm(x)
        h = self.proj_up(h) * jax.nn.silu(self.proj_up_gate(h))
        return dropout(self.proj_down(h), self.dropout_rate, key=key)


def _call_attn(attn, x, sin, cos, segment_ids, key):
    return attn(x, sin, cos, segment_ids, key=key)


def _call_ffn(ffn, x, key):
    return ffn(x, key=key)


def _call_block(block, x, sin, cos, segment_ids, key):
    return block(x, sin, cos, segment_ids, key=key)


class TransformerBlock(eqx.Module):
    """``x = x + Attn(RMSNorm(x))``; ``x = x + FFN(RMSNorm(x))``. ``"AttnBlock"`` / ``"FFNBlock"``
    in ``parallel.remat`` rematerialise the two sub-blocks in the backward pass."""

    attn: SelfAttentionBlock
    ffn: FFNBlock
    remat_attn: bool = eqx.field(static=True)
    remat_ffn: bool = eqx.field(static=True)

    def __init__(self, config: LlamaConfig, *, key: PRNGKeyArray):
        kattn, kffn = jr.split(key)
        self.attn = SelfAttentionBlock(config, key=kattn)
        self.ffn = FFNBlock(config, key=kffn)
        self.remat_attn = "AttnBlock" in config.parallel.remat
        self.remat_ffn = "FFNBlock" in config.parallel.remat

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
        attn = _remat(_call_attn, self.remat_attn)
        x = x + attn(self.attn, x, sin, cos, segment_ids, kattn)
        return x + _remat(_call_ffn, self.remat_ffn)(self.ffn, x, kffn)

    def decode(
        self,
        x: Float[Array, "B T D"],
        sin: Float[Array, "B T half"],
        cos: Float[Array, "B T half"],
        cache_k: Float[Array, "B Smax NH hd"],
        cache_v: Float[Array, "B Smax NH hd"],
        length: Int[Array, ""],
    ) -> tuple[Float[Array, "B T D"], Float[Array, "B Smax NH hd"], Float[Array, "B Smax NH hd"]]:
        y, cache_k, cache_v = self.attn.decode(x, sin, cos, cache_k, cache_v, length)
        x = x + y
        return x + self.ffn(x), cache_k, cache_v


class LlamaKVCache(eqx.Module):
    """Decode state of a ``LlamaTransformer``: per-layer keys and values (RoPE applied) for
    ``max_len`` positions, in the compute dtype, and the number of positions filled so far."""

    keys: Float[Array, "L B Smax NH hd"]
    values: Float[Array, "L B Smax NH hd"]
    length: Int[Array, ""]


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

    def __init__(self, config: LlamaConfig, *, key: PRNGKeyArray):
        _check_config(config)
        keys = jr.split(key, config.num_blocks)
        if config.scan_blocks:
            self.blocks = eqx.filter_vmap(lambda k: TransformerBlock(config, key=k))(keys)
        else:
            self.blocks = tuple(TransformerBlock(config, key=k) for k in keys)
        self.num_blocks = config.num_blocks
        self.scan_blocks = bool(config.scan_blocks)
        self.remat_block = "TransformerBlock" in config.parallel.remat

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
        call = _remat(_call_block, self.remat_block)
        if not self.scan_blocks:
            assert isinstance(self.blocks, tuple)
            for i, block in enumerate(self.blocks):
                x = call(block, x, sin, cos, segment_ids, None if keys is None else keys[i])
            return x
        params, static = eqx.partition(self.blocks, eqx.is_array)

        def body(carry, xs):
            block_params, block_key = xs
            block = eqx.combine(block_params, static)
            return call(block, carry, sin, cos, segment_ids, block_key), None

        x, _ = jax.lax.scan(body, x, (params, keys))
        return x

    def decode(
        self,
        x: Float[Array, "B T D"],
        sin: Float[Array, "B T half"],
        cos: Float[Array, "B T half"],
        cache: LlamaKVCache,
    ) -> tuple[Float[Array, "B T D"], LlamaKVCache]:
        """Run the blocks on ``T`` new tokens; the per-layer k/v caches go through the scan's
        xs/ys (or the loop), and the cache length advances by ``T``."""
        length = cache.length
        if not self.scan_blocks:
            assert isinstance(self.blocks, tuple)
            new_k, new_v = [], []
            for i, block in enumerate(self.blocks):
                x, ck, cv = block.decode(x, sin, cos, cache.keys[i], cache.values[i], length)
                new_k.append(ck)
                new_v.append(cv)
            keys, values = jnp.stack(new_k), jnp.stack(new_v)
        else:
            params, static = eqx.partition(self.blocks, eqx.is_array)

            def body(carry, xs):
                block_params, ck, cv = xs
                block = eqx.combine(block_params, static)
                carry, ck, cv = block.decode(carry, sin, cos, ck, cv, length)
                return carry, (ck, cv)

            x, (keys, values) = jax.lax.scan(body, x, (params, cache.keys, cache.values))
        T = x.shape[1]
        return x, LlamaKVCache(keys, values, length + jnp.asarray(T, length.dtype))


# ----------------------------------------------------------------------------------------------
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

    def __init__(self, config: LlamaConfig, *, key: PRNGKeyArray):
        _check_config(config)
        kembed, kblocks, khead = jr.split(key, 3)
        D = config.embedding_dim
        self.token_embedding = Embedding(
            config.vocab_size, D, dtype=config.dtype, std=small_init_std(D), key=kembed
        )
        self.blocks = TransformerBlockStack(config, key=kblocks)
        self.out_norm = RMSNorm(D, eps=_NORM_EPS, dtype=config.dtype)
        self.lm_head = Dense(
            D,
            config.vocab_size,
            use_bias=False,
            dtype=config.dtype,
            kernel_init=small_initializer(D),
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

    @jax.named_scope("LMHead")
    def _head(self, x: Float[Array, "B S D"]) -> Float[Array, "B S V"]:
        logits = self.lm_head(self.out_norm(x)).astype(jnp.float32)
        return soft_cap(logits, self.logits_soft_cap)

    def __call__(
        self,
        tokens: Int[Array, "B S"],
        *,
        key: PRNGKeyArray | None = None,
        document_borders: Bool[Array, "B S"] | None = None,
        positions: Int[Array, "B S"] | None = None,
    ) -> Float[Array, "B S V"]:
        """Logits for every position.

        - ``document_borders``: True where a token starts a new document. Used only when
          ``mask_across_document_boundaries``: tokens then attend only within their document
          (document index = cumsum of the borders).
        - ``positions``: RoPE positions (e.g. restarting at 0 in each document, as the reference
          trainer passes them); default ``arange(S)``.
        """
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
            positions = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
        sin, cos = rope_sin_cos(positions, self.head_dim, self.theta)
        segment_ids = None
        if document_borders is not None and self.mask_across_document_boundaries:
            segment_ids = jnp.cumsum(document_borders.astype(jnp.int32), axis=1, dtype=jnp.int32)
        x = self.blocks(x, sin, cos, segment_ids, key=kblocks)
        return self._head(x)

    # -- decoding ---------------------------------------------------------------------------

    def init_cache(self, batch_size: int, max_len: int) -> LlamaKVCache:
        """An empty KV cache for ``batch_size`` sequences of up to ``max_len`` tokens."""
        if batch_size <= 0 or max_len <= 0:
            raise ValueError(
                f"init_cache: batch_size ({batch_size}) and max_len ({max_len}) must be positive"
            )
        shape = (self.blocks.num_blocks, batch_size, max_len, self.num_heads, self.head_dim)
        zeros = jnp.zeros(shape, jnp.dtype(self.dtype))
        return LlamaKVCache(zeros, zeros, jnp.zeros((), jnp.int32))

    def decode(
        self, tokens: Int[Array, "B T"], cache: LlamaKVCache
    ) -> tuple[Float[Array, "B T V"], LlamaKVCache]:
        """Logits of ``T`` tokens that continue the cached sequence (prefill when the cache is
        empty, one step when ``T == 1``), and the cache extended by them. No dropout; one
        document per sequence. Equal to the matching rows of ``__call__`` on the whole sequence.
        """
        if not self.causal:
            raise ValueError("decode needs a causal model (LlamaConfig.causal=True)")
        B, T = tokens.shape
        S_max = cache.keys.shape[2]
        if cache.keys.shape[1] != B:
            raise ValueError(
                f"cache batch size {cache.keys.shape[1]} does not match tokens batch size {B}"
            )
        if T > S_max:
            raise ValueError(f"{T} tokens do not fit in a KV cache of max_len {S_max}")
        length = eqx.error_if(
            cache.length,
            cache.length + T > S_max,
            f"KV cache overflow: decoding past max_len={S_max}",
        )
        positions = jnp.broadcast_to(length + jnp.arange(T, dtype=length.dtype), (B, T))
        sin, cos = rope_sin_cos(positions, self.head_dim, self.theta)
        x = self.token_embedding(tokens)
        x, cache = self.blocks.decode(x, sin, cos, eqx.tree_at(lambda c: c.length, cache, length))
        return self._head(x), cache

    def decode_step(
        self, cache: LlamaKVCache, token: Int[Array, " B"]
    ) -> tuple[Float[Array, "B V"], LlamaKVCache]:
        """One generation step: logits of the next token after ``token``, and the new cache."""
        logits, cache = self.decode(token[:, None], cache)
        return logits[:, 0], cache


__all__ = [
    "ATTENTION_BACKENDS",
    "FFNBlock",
    "LlamaKVCache",
    "LlamaTransformer",
    "SelfAttentionBlock",
    "TransformerBlock",
    "TransformerBlockStack",
    "apply_rope",
    "multihead_attention",
    "rope_sin_cos",
    "segment_mask",
]
