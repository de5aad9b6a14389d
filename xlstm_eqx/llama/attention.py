"""Self-attention of the Llama baseline: interleaved RoPE, the causal and same-document masks,
the three attention cores (``xla``, ``cudnn``, ``pallas_triton``) and `SelfAttentionBlock`.

Activations are ``(B, S, NH, hd)``; the core is called with scale 1 because the block scales q
itself (docs/architecture.md, "Llama").
"""

import functools
from collections.abc import Callable
from typing import Any, ClassVar, cast, get_args

import equinox as eqx
import jax
import jax.extend.core
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jax.interpreters import batching, mlir
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from ..nn.axes import REPLICATED
from ..nn.functional import dropout
from ..nn.init import output_initializer, small_initializer
from ..nn.linear import DenseGeneral
from ..nn.norm import RMSNorm
from .config import AttentionBackend, LlamaConfig
from .context import context_parallel_attention


ATTENTION_BACKENDS: tuple[str, ...] = get_args(AttentionBackend)


# Flax RMSNorm default, used by every norm of the reference Llama.
NORM_EPS = 1e-6


# config helpers


def check_config(config: LlamaConfig) -> None:
    """Re-validate the config (it may have been mutated since construction): a ``ValueError``
    naming the field, before any array is made."""
    if not isinstance(config, LlamaConfig):
        raise TypeError(f"expected a LlamaConfig, got {type(config).__name__}")
    config.validate()


def _query_scale(config: LlamaConfig) -> float:
    if config.query_scale_quirk:
        # The reference's NH^-1/2 (docs/architecture.md, "Reference quirks kept").
        return config.num_heads**-0.5
    return config.head_dim**-0.5


def maybe_remat(fn: Callable, enabled: bool) -> Callable:
    """``fn`` rematerialised in the backward pass (``parallel.remat``; docs/architecture.md,
    "Module remat")."""
    return eqx.filter_checkpoint(fn, prevent_cse=False) if enabled else fn


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


# attention core


def segment_mask(segment_ids: Int[Array, "B S"]) -> Bool[Array, "B 1 S S"]:
    """``mask[b, 0, i, j] = segment_ids[b, i] == segment_ids[b, j]`` (same document)."""
    return (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]


# Platform choices at lowering time (docs/architecture.md, "Platform choices at lowering time")


_lowering_error_p = jax.extend.core.Primitive("xlstm_eqx_lowering_error")
_lowering_error_p.def_abstract_eval(lambda x, **_: x)
batching.primitive_batchers[_lowering_error_p] = lambda args, dims, **params: (
    _lowering_error_p.bind(*args, **params),
    dims[0],
)


def _raise_when_lowered(ctx: Any, x: Any, *, error: type[Exception], message: str) -> Any:
    platforms = ", ".join(repr(name) for name in ctx.module_context.platforms)
    raise error(message.replace("<platforms>", platforms))


mlir.register_lowering(_lowering_error_p, _raise_when_lowered)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def _fail_when_lowered(x: Array, error: type[Exception], message: str) -> Array:
    """``x`` as a program that raises ``error(message)`` when it is lowered (not when traced);
    ``<platforms>`` in the message names the platforms it is lowered for."""
    return _lowering_error_p.bind(x, error=error, message=message)


@_fail_when_lowered.defjvp
def _fail_when_lowered_jvp(
    error: type[Exception], message: str, primals: tuple[Array], tangents: tuple[Array]
) -> tuple[Array, Array]:
    out = _fail_when_lowered(primals[0], error, message)
    return out, jnp.zeros_like(out)  # never runs: lowering raises


def _cuda_only(backend: str, kernel: Callable[..., Array], *operands: Any) -> Array:
    """``kernel(*operands)`` in the program lowered for CUDA; lowering for any other platform
    raises. Errors raised while tracing the kernel (a dtype, a shape, a missing cuDNN) are raised
    when the CUDA program is lowered, so a CPU run still names the platform first."""

    def on_cuda(*args: Any) -> Array:
        try:
            return kernel(*args)
        except Exception as err:  # noqa: BLE001 - raised when the CUDA program is lowered
            return _fail_when_lowered(args[0], type(err), str(err))

    def elsewhere(*args: Any) -> Array:
        message = (
            f"attention_backend={backend!r} needs an NVIDIA GPU, but the program is lowered "
            f"for <platforms>; use attention_backend='xla'"
        )
        return _fail_when_lowered(args[0], RuntimeError, message)

    return jax.lax.platform_dependent(*operands, cuda=on_cuda, default=elsewhere)


def _cudnn_attention(
    q: Float[Array, "B S NH hd"],
    k: Float[Array, "B S NH hd"],
    v: Float[Array, "B S NH hd"],
    seg_mask: Bool[Array, "B 1 S S"] | None,
    *,
    causal: bool,
) -> Float[Array, "B S NH hd"]:
    if jnp.dtype(q.dtype) not in (jnp.bfloat16, jnp.float16):
        raise ValueError(
            f"attention_backend='cudnn' supports dtype bfloat16 or float16 only, got "
            f"{jnp.dtype(q.dtype).name}; use attention_backend='xla' for float32"
        )
    return jax.nn.dot_product_attention(
        q, k, v, mask=seg_mask, scale=1.0, is_causal=causal, implementation="cudnn"
    )


def _pallas_triton_attention(
    q: Float[Array, "B S NH hd"],
    k: Float[Array, "B S NH hd"],
    v: Float[Array, "B S NH hd"],
    segment_ids: Int[Array, "B S"] | None,
    *,
    causal: bool,
) -> Float[Array, "B S NH hd"]:
    from jax.experimental.pallas.ops.gpu.attention import mha

    return mha(q, k, v, segment_ids, sm_scale=1.0, causal=causal)


def _heads_as_rows(x: Float[Array, "B S NH hd"]) -> Float[Array, "BNH S hd"]:
    """(B, S, NH, hd) -> (B·NH, S, hd): batch and heads as one leading axis for both matmuls:
    with two batch axes XLA (seen on CPU, jax 0.10) transposes the T x S matrices in the
    backward; this form was 2x faster fwd+bwd at S=2048 (``xlstm-eqx bench profile --model
    llama``: 66% of the step before)."""
    B, S, NH, hd = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B * NH, S, hd)


def _accumulation_dtype(x: Array) -> Any:
    return jnp.float64 if x.dtype == jnp.float64 else jnp.float32


def _masked(x: Array, mask: Array | None, num_heads: int, fill: float) -> Array:
    """``where(mask, x, fill)`` for ``x (B·NH, T, S)`` and a ``(B, 1, T, S)`` or ``(T, S)``
    mask."""
    if mask is None:
        return x
    X, T, S = x.shape
    grouped = x.reshape(X // num_heads, num_heads, T, S)
    return jnp.where(mask, grouped, jnp.asarray(fill, x.dtype)).reshape(X, T, S)


def _attention_probs(
    q: Float[Array, "X T hd"],
    k: Float[Array, "X S hd"],
    mask: Bool[Array, "B 1 T S"] | Bool[Array, "T S"] | None,
    num_heads: int,
) -> Float[Array, "X T S"]:
    acc = _accumulation_dtype(q)
    logits = jnp.einsum("xth,xsh->xts", q, k, preferred_element_type=acc)
    logits = _masked(logits, mask, num_heads, -0.7 * float(jnp.finfo(acc).max))
    return jax.nn.softmax(logits, axis=-1)


def _attention_rows_fwd(
    q: Array, k: Array, v: Array, mask: Array | None, num_heads: int
) -> tuple[Array, tuple[Any, ...]]:
    probs = _attention_probs(q, k, mask, num_heads)
    out = jnp.einsum("xts,xsh->xth", probs.astype(v.dtype), v)
    return out, (q, k, v, mask, probs, out)


def _attention_rows_bwd(
    num_heads: int, residuals: tuple[Any, ...], d_out: Array
) -> tuple[Array, Array, Array, None]:
    """dV = Pᵀ dO, dP = dO Vᵀ, dlogits = P ⊙ (dP − dO·O) (zero where masked), dQ = dlogits K,
    dK = dlogitsᵀ Q; products accumulated as in the forward pass."""
    q, k, v, mask, probs, out = residuals
    acc = probs.dtype
    d_out = d_out.astype(v.dtype)
    d_v = jnp.einsum("xts,xth->xsh", probs.astype(v.dtype), d_out)
    d_probs = jnp.einsum("xth,xsh->xts", d_out, v, preferred_element_type=acc)
    row_dot = jnp.sum(d_out.astype(acc) * out.astype(acc), axis=-1, keepdims=True)
    d_logits = _masked(probs * (d_probs - row_dot), mask, num_heads, 0.0)
    d_q = jnp.einsum("xts,xsh->xth", d_logits.astype(k.dtype), k, preferred_element_type=acc)
    d_k = jnp.einsum("xts,xth->xsh", d_logits.astype(q.dtype), q, preferred_element_type=acc)
    return d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype), None


_attention_rows_vjp = jax.custom_vjp(
    lambda q, k, v, mask, num_heads: _attention_rows_fwd(q, k, v, mask, num_heads)[0],
    nondiff_argnums=(4,),
)
_attention_rows_vjp.defvjp(_attention_rows_fwd, _attention_rows_bwd)


def _attention_rows(
    q: Float[Array, "X T hd"],
    k: Float[Array, "X S hd"],
    v: Float[Array, "X S hdv"],
    mask: Bool[Array, "B 1 T S"] | Bool[Array, "T S"] | None,
    num_heads: int,
) -> Float[Array, "X T hdv"]:
    """softmax(q kᵀ) v on rows ``X = B·NH``, logits and softmax in float32 (float64 for float64
    inputs); masked logits get a large negative value, so a row keeps finite values even if
    fully masked (and a masked entry's weight is exactly 0 where the row has an unmasked one).

    The backward pass is written out (`_attention_rows_bwd`) for one reduction: the softmax's
    row sum ``Σ_s P dP`` equals ``dO · O``, a sum over the head dim instead of the keys.
    Autodiff's form reduced (B·NH, T, S) arrays, which XLA:CPU ran far below its matmul rate;
    the core's fwd+bwd was 1.4x faster with 8% fewer bytes (S=2048, 4 heads of 64, causal)."""
    # cast: the checker cannot solve custom_vjp's generic return type
    return cast(Array, _attention_rows_vjp(q, k, v, mask, num_heads))


def _rows_as_heads(out: Float[Array, "X T hd"], batch: int) -> Float[Array, "B T NH hd"]:
    X, T, hd = out.shape
    return out.reshape(batch, X // batch, T, hd).transpose(0, 2, 1, 3)


def _xla_attention(
    q: Float[Array, "B T NH hd"],
    k: Float[Array, "B S NH hd"],
    v: Float[Array, "B S NH hd"],
    mask: Bool[Array, "B 1 T S"] | Bool[Array, "T S"] | None,
) -> Float[Array, "B T NH hd"]:
    """softmax(q kᵀ) v over all T x S pairs (`_attention_rows`), any mask."""
    B, _, NH, _ = q.shape
    rows = _attention_rows(_heads_as_rows(q), _heads_as_rows(k), _heads_as_rows(v), mask, NH)
    return _rows_as_heads(rows, B)


# Query block of the causal XLA core: block i attends to the keys of blocks 0..i only.
CAUSAL_QUERY_BLOCK = 256


def _causal_xla_attention(
    q: Float[Array, "B S NH hd"],
    k: Float[Array, "B S NH hd"],
    v: Float[Array, "B S NH hd"],
    seg_mask: Bool[Array, "B 1 S S"] | None,
) -> Float[Array, "B S NH hd"]:
    """Causal softmax(q kᵀ) v in query blocks of `CAUSAL_QUERY_BLOCK`: block ``[t0, t1)`` takes
    the keys ``[0, t1)`` only, so the logits above the diagonal blocks are neither computed nor
    masked (about half the FLOPs and bytes of the full T x S form at S=2048; the masked entries
    carried weight exactly 0 there, so only float rounding of the sums differs). Measured on
    CPU (2 cores, S=2048, 4 heads of 64, fwd+bwd): 2x faster than the full form."""
    B, S, NH, _ = q.shape
    q_rows, k_rows, v_rows = (_heads_as_rows(x) for x in (q, k, v))
    outs = []
    for t0 in range(0, S, CAUSAL_QUERY_BLOCK):
        t1 = min(t0 + CAUSAL_QUERY_BLOCK, S)
        mask = jnp.arange(t1)[None, :] <= jnp.arange(t0, t1)[:, None]
        if seg_mask is not None:
            mask = mask & seg_mask[:, :, t0:t1, :t1]
        outs.append(_attention_rows(q_rows[:, t0:t1], k_rows[:, :t1], v_rows[:, :t1], mask, NH))
    return _rows_as_heads(jnp.concatenate(outs, axis=1), B)


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
    ``xla``: the einsum cores above (causal: in query blocks), on any platform; ``cudnn``:
    ``jax.nn.dot_product_attention``'s cuDNN flash kernel; ``pallas_triton``: the Pallas Triton
    flash kernel. The last two are chosen when the program is lowered: a program lowered for
    CUDA (on a GPU, or exported from any host) holds the kernel, lowering for any other platform
    raises a clear error.
    """
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(
            f"attention_backend={backend!r} is unknown; allowed: {', '.join(ATTENTION_BACKENDS)}"
        )
    if backend == "pallas_triton":
        kernel = functools.partial(_pallas_triton_attention, causal=causal)
        return _cuda_only(backend, kernel, q, k, v, segment_ids)
    seg_mask = None if segment_ids is None else segment_mask(segment_ids)
    if backend == "cudnn":
        kernel = functools.partial(_cudnn_attention, causal=causal)
        return _cuda_only(backend, kernel, q, k, v, seg_mask)
    if causal:
        return _causal_xla_attention(q, k, v, seg_mask)
    return _xla_attention(q, k, v, seg_mask)


# decode state


class LlamaKVCache(eqx.Module):
    """Decode state: keys (RoPE applied) and values for ``max_len`` positions in the compute
    dtype, and the number of positions filled so far. An attention block's cache has no leading
    axis; the stack's and the model's hold every layer's on a leading axis ``L`` (one length)."""

    keys: Float[Array, "*L B Smax NH hd"]
    values: Float[Array, "*L B Smax NH hd"]
    length: Int[Array, ""]


def check_one_document(document_borders: Array | None) -> None:
    """A KV cache holds one document per sequence: decoding takes no ``document_borders``."""
    if document_borders is not None:
        raise ValueError(
            "decoding with a KV cache holds one document per sequence: document_borders must be "
            "None"
        )


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
    theta: float = eqx.field(static=True)
    context_axis: str | None = eqx.field(static=True)  # `parallel.with_context_parallel`
    reference_name: ClassVar[str] = "AttnBlock"  # fsdp_modules / remat name

    def __init__(self, config: LlamaConfig, *, key: PRNGKeyArray):
        check_config(config)
        D, hd = config.embedding_dim, config.head_dim
        NH = D // hd
        kq, kk, kv, ko = jr.split(key, 4)
        qkv_init = small_initializer(D)
        out_init = output_initializer("wang", D, 2 * config.num_blocks)

        def qkv_projection(proj_key: PRNGKeyArray) -> DenseGeneral:
            return DenseGeneral(
                D,
                (NH, hd),
                use_bias=config.use_bias,
                kernel_init=qkv_init,
                dtype=config.dtype,
                axes=("embed", "heads", "head_dim"),
                key=proj_key,
            )

        # Megatron layout (logical axes: nn.axes): the residual stream replicated over tp, q/k/v
        # column-parallel over heads, the output projection row-parallel.
        self.pre_norm = RMSNorm(D, eps=NORM_EPS, dtype=config.dtype, axes=REPLICATED)
        self.dense_q = qkv_projection(kq)
        self.dense_k = qkv_projection(kk)
        self.dense_v = qkv_projection(kv)
        if config.qk_norm:
            self.q_norm = RMSNorm(hd, eps=NORM_EPS, dtype=config.dtype, axes=("head_dim",))
            self.k_norm = RMSNorm(hd, eps=NORM_EPS, dtype=config.dtype, axes=("head_dim",))
        else:
            self.q_norm = self.k_norm = None
        self.dense_out = DenseGeneral(
            (NH, hd),
            D,
            kernel_init=out_init,
            axes=("heads", "head_dim", "embed"),
            bias_axes=REPLICATED,
            use_bias=config.use_bias,
            dtype=config.dtype,
            key=ko,
        )
        self.num_heads = NH
        self.head_dim = hd
        self.query_scale = float(_query_scale(config))
        self.causal = bool(config.causal)
        self.attention_backend = str(config.attention_backend)
        self.dropout_rate = float(config.dropout_rate)
        self.theta = float(config.theta)
        self.context_axis = None

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
        if self.context_axis is not None:  # the sequence split over this axis: `llama.context`
            axis, causal = self.context_axis, self.causal
            attn = context_parallel_attention(
                q, k, v, segment_ids=segment_ids, axis_name=axis, causal=causal
            )
            return self.project_out(attn, key=key)
        attn = multihead_attention(
            q, k, v, causal=self.causal, segment_ids=segment_ids, backend=self.attention_backend
        )
        return self.project_out(attn, key=key)

    def call_with_state(
        self,
        x: Float[Array, "B S D"],
        state: LlamaKVCache,
        *,
        document_borders: Bool[Array, "B S"] | None = None,
    ) -> tuple[Float[Array, "B S D"], LlamaKVCache]:
        """Attend the ``S`` new tokens (absolute positions ``state.length …``, their RoPE angles
        from those) to the cached keys and values plus themselves, causally; write their keys and
        values into the cache. Always the XLA core; one document per sequence."""
        if self.context_axis is not None:
            raise ValueError(
                "Llama attention decodes from a KV cache, which is not split over the "
                f"context-parallel axis '{self.context_axis}': prefill and generate on cp=1"
            )
        stacked = LlamaKVCache(state.keys[None], state.values[None], state.length)
        zero = jnp.zeros((), state.length.dtype)
        y, (k, v) = self.call_with_layer_cache(x, stacked, zero, document_borders=document_borders)
        start = (zero, state.length, zero, zero)
        keys = jax.lax.dynamic_update_slice(state.keys, k, start)
        values = jax.lax.dynamic_update_slice(state.values, v, start)
        length = state.length + jnp.asarray(x.shape[1], state.length.dtype)
        return y, LlamaKVCache(keys, values, length)

    def call_with_layer_cache(
        self,
        x: Float[Array, "B S D"],
        cache: LlamaKVCache,
        layer: Int[Array, ""],
        *,
        document_borders: Bool[Array, "B S"] | None = None,
    ) -> tuple[Float[Array, "B S D"], tuple[Float[Array, "B S NH hd"], Float[Array, "B S NH hd"]]]:
        """`call_with_state` reading layer ``layer`` of the stack's cache (leading axis ``L``)
        and leaving it as it is: the output and the new tokens' keys and values (in the cache's
        dtype), which the stack writes into the cache once, after every layer has read it (so
        XLA updates the whole cache in place instead of copying it per token)."""
        check_one_document(document_borders)
        length = cache.length
        S = x.shape[1]
        positions = jnp.broadcast_to(length + jnp.arange(S, dtype=length.dtype), x.shape[:2])
        q, k, v = self.project_qkv(x, *rope_sin_cos(positions, self.head_dim, self.theta))
        k, v = k.astype(cache.keys.dtype), v.astype(cache.values.dtype)
        # this layer's cache with the new tokens written in: a copy, the stack's stays as it is
        zero = jnp.zeros((), length.dtype)
        layer_k, layer_v = (
            jax.lax.dynamic_update_slice(
                jax.lax.dynamic_index_in_dim(a, layer, keepdims=False),
                new,
                (zero, length, zero, zero),
            ).astype(q.dtype)
            for a, new in ((cache.keys, k), (cache.values, v))
        )
        k_pos = jnp.arange(layer_k.shape[1], dtype=length.dtype)
        mask = k_pos[None, :] <= positions[0][:, None]  # (S, S_max): past and present
        attn = _xla_attention(q, layer_k, layer_v, mask)
        return self.project_out(attn), (k, v)
