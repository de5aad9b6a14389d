"""Shared building blocks: initialisers, dense / headwise / conv layers, norms, feed-forward.

Every parameter is created in float32. Each layer carries a static ``dtype`` string (the *compute*
dtype): inputs and kernels are cast to it before the matmul, and outputs come back in it. Norm
statistics are always computed in float32.

Kernels use the Flax layout ``(in, out)`` so that converting a reference checkpoint is a plain copy.
"""

import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, Float, Int, PRNGKeyArray, PyTree


InitDistribution = Literal["normal", "truncated_normal", "uniform"]
OutputInitFn = Literal["small", "wang", "wang2", "zeros"]
Initializer = Callable[[PRNGKeyArray, tuple[int, ...]], Float[Array, "..."]]

INIT_DISTRIBUTIONS: tuple[str, ...] = ("normal", "truncated_normal", "uniform")
OUTPUT_INIT_FNS: tuple[str, ...] = ("small", "wang", "wang2", "zeros")
NORM_TYPES: tuple[str, ...] = ("layernorm", "rmsnorm")


# ----------------------------------------------------------------------------------------------
# dtypes


def to_dtype(dtype: Any) -> np.dtype:
    """A dtype from a string such as ``"bfloat16"`` (or a dtype), with a clear error otherwise."""
    try:
        return jnp.dtype(dtype)
    except TypeError as e:
        raise ValueError(
            f"unknown dtype {dtype!r}; expected e.g. 'float32', 'bfloat16' or 'float16'"
        ) from e


def _dtype_name(dtype: Any) -> str:
    return to_dtype(dtype).name


# ----------------------------------------------------------------------------------------------
# initialisers (ARCHITECTURE §3.6)


def small_init_std(dim: int) -> float:
    """std of "small init" (Nguyen & Salazar 2019): ``sqrt(2 / (5 dim))``."""
    return math.sqrt(2.0 / (5.0 * dim))


def wang_std(dim: int, num_blocks: int) -> float:
    """std of the "wang" init of output projections: ``2 / (num_blocks sqrt(dim))``."""
    return 2.0 / (num_blocks * math.sqrt(dim))


def _check_distribution(distribution: str) -> None:
    if distribution not in INIT_DISTRIBUTIONS:
        raise ValueError(
            f"unknown init distribution {distribution!r}; allowed: {', '.join(INIT_DISTRIBUTIONS)}"
        )


def init_array(
    key: PRNGKeyArray,
    shape: Sequence[int],
    std: float,
    distribution: str = "normal",
) -> Float[Array, "..."]:
    """A float32 array of ``shape`` drawn with standard deviation parameter ``std``.

    - ``normal``: N(0, std²).
    - ``truncated_normal``: a standard normal truncated to ±2, times ``std`` (as
      ``jax.nn.initializers.truncated_normal``; the realised std is about 0.88·std).
    - ``uniform``: U(−√3·std, √3·std), whose std is exactly ``std``.
    """
    _check_distribution(distribution)
    shape = tuple(int(s) for s in shape)
    if distribution == "normal":
        return std * jr.normal(key, shape, jnp.float32)
    if distribution == "truncated_normal":
        return std * jr.truncated_normal(key, -2.0, 2.0, shape, jnp.float32)
    bound = math.sqrt(3.0) * std
    return jr.uniform(key, shape, jnp.float32, minval=-bound, maxval=bound)


def make_initializer(distribution: str, std: float) -> Initializer:
    """An initializer ``(key, shape) -> float32 array`` for a distribution at a given std."""
    _check_distribution(distribution)

    def init(key: PRNGKeyArray, shape: tuple[int, ...]) -> Float[Array, "..."]:
        return init_array(key, shape, std, distribution)

    return init


def zeros_init(key: PRNGKeyArray, shape: tuple[int, ...]) -> Float[Array, "..."]:
    """Initializer giving zeros (float32); ``key`` is unused."""
    del key
    return jnp.zeros(shape, jnp.float32)


def small_initializer(dim: int, distribution: str = "normal") -> Initializer:
    """small-init(dim) with the given distribution."""
    return make_initializer(distribution, small_init_std(dim))


def output_initializer(
    output_init_fn: str, dim: int, num_blocks: int, distribution: str = "normal"
) -> Initializer:
    """Init of output projections: ``small`` = small(dim), ``wang`` = wang(dim, L),
    ``wang2`` = wang(dim, 2L), ``zeros``."""
    if output_init_fn == "small":
        return small_initializer(dim, distribution)
    if output_init_fn == "wang":
        return make_initializer(distribution, wang_std(dim, num_blocks))
    if output_init_fn == "wang2":
        return make_initializer(distribution, wang_std(dim, 2 * num_blocks))
    if output_init_fn == "zeros":
        _check_distribution(distribution)
        return zeros_init
    raise ValueError(
        f"unknown output_init_fn {output_init_fn!r}; allowed: {', '.join(OUTPUT_INIT_FNS)}"
    )


def bias_linspace_init(
    bias_init_range: Any,
    num_heads: int,
    *,
    key: PRNGKeyArray,
) -> Float[Array, " NH"]:
    """Gate bias init: a pair ``(a, b)`` gives ``linspace(a, b, NH)`` (both ends included), a
    float a constant, ``None`` a draw from N(0, 0.1²)."""
    if bias_init_range is None:
        return 0.1 * jr.normal(key, (num_heads,), jnp.float32)
    if isinstance(bias_init_range, int | float):
        return jnp.full((num_heads,), float(bias_init_range), jnp.float32)
    lo, hi = bias_init_range
    return jnp.linspace(float(lo), float(hi), num_heads, dtype=jnp.float32)


# ----------------------------------------------------------------------------------------------
# small functions


def soft_cap(x: Float[Array, "*shape"], cap: float | int | None) -> Float[Array, "*shape"]:
    """``cap * tanh(x / cap)`` in the dtype of ``x``; identity when ``cap`` is None."""
    if cap is None:
        return x
    cap = float(cap)
    return cap * jnp.tanh(x / cap)


def _relu_squared(x: Array) -> Array:
    return jnp.square(jax.nn.relu(x))


def _gelu_tanh(x: Array) -> Array:
    return jax.nn.gelu(x, approximate=True)


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": _gelu_tanh,  # Flax registry: the tanh approximation
    "relu": jax.nn.relu,
    "relu^2": _relu_squared,
    "sigmoid": jax.nn.sigmoid,
    "swish": jax.nn.silu,
    "selu": jax.nn.selu,
}


def get_activation(name: str) -> Callable[[Array], Array]:
    """Look up an activation of the registry by name, with a clear error."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"unknown activation {name!r}; allowed: {', '.join(ACTIVATIONS)}"
        ) from None


def dropout(
    x: Float[Array, "*shape"], rate: float | int, *, key: PRNGKeyArray | None
) -> Float[Array, "*shape"]:
    """Inverted dropout. Acts only when ``key`` is given and ``rate > 0``; else identity."""
    if key is None or rate <= 0.0:
        return x
    if rate >= 1.0:
        return jnp.zeros_like(x)
    keep = jr.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros_like(x))


def split_optional_key(key: PRNGKeyArray | None, num: int) -> tuple[PRNGKeyArray | None, ...]:
    """``jr.split(key, num)`` as a tuple, or ``num`` Nones when ``key`` is None."""
    if key is None:
        return (None,) * num
    return tuple(jr.split(key, num))


# ----------------------------------------------------------------------------------------------
# linear layers


def matmul_rows(
    x: Float[Array, "*batch d_in"], w: Float[Array, "d_in d_out"]
) -> Float[Array, "*batch d_out"]:
    """``x @ w`` with the leading axes of ``x`` flattened into one row axis first.

    Same result as ``jnp.matmul``; the reason is the backward pass. For an N-d ``x`` the weight
    gradient contracts several leading axes, and XLA (seen on CPU, jax 0.10) then materialises a
    transposed copy of the activation gradient first; with one row axis it calls the GEMM on the
    arrays as they are. Profiled on the small_xlstm train step at S=2048 (``xlstm-eqx bench profile``):
    those copies were 23% of the step.
    """
    rows = x.reshape(-1, x.shape[-1])
    return jnp.matmul(rows, w).reshape(*x.shape[:-1], w.shape[-1])


class Dense(eqx.Module):
    """``y = x @ kernel (+ bias)`` over the last axis, computed in ``dtype``.

    kernel ``(in, out)`` (Flax layout), bias ``(out,)``. Any leading dims.
    """

    kernel: Float[Array, "d_in d_out"]
    bias: Float[Array, " d_out"] | None
    in_features: int = eqx.field(static=True)
    out_features: int = eqx.field(static=True)
    dtype: str = eqx.field(static=True)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool = False,
        dtype: Any = "float32",
        kernel_init: Initializer | None = None,
        key: PRNGKeyArray,
    ):
        """``kernel_init`` defaults to small-init(in_features), normal. Bias starts at zero."""
        if in_features <= 0 or out_features <= 0:
            raise ValueError(
                f"Dense sizes must be positive, got in_features={in_features}, "
                f"out_features={out_features}"
            )
        if kernel_init is None:
            kernel_init = small_initializer(in_features)
        self.kernel = kernel_init(key, (in_features, out_features)).astype(jnp.float32)
        self.bias = jnp.zeros((out_features,), jnp.float32) if use_bias else None
        self.in_features = in_features
        self.out_features = out_features
        self.dtype = _dtype_name(dtype)

    def __call__(self, x: Float[Array, "*batch d_in"]) -> Float[Array, "*batch d_out"]:
        dtype = jnp.dtype(self.dtype)
        y = matmul_rows(x.astype(dtype), self.kernel.astype(dtype))
        if self.bias is not None:
            y = y + self.bias.astype(dtype)
        return y


class DenseGeneral(eqx.Module):
    """Dense over several trailing input axes to several output axes (Flax ``DenseGeneral``).

    kernel ``(*in_shape, *out_shape)``, e.g. ``(D, NH, hd)`` for attention q/k/v or
    ``(NH, hd, D)`` for the attention output; bias ``out_shape``. Computed in ``dtype``.
    """

    kernel: Float[Array, "..."]
    bias: Float[Array, "..."] | None
    in_shape: tuple[int, ...] = eqx.field(static=True)
    out_shape: tuple[int, ...] = eqx.field(static=True)
    dtype: str = eqx.field(static=True)

    def __init__(
        self,
        in_shape: int | Sequence[int],
        out_shape: int | Sequence[int],
        *,
        use_bias: bool = False,
        dtype: Any = "float32",
        kernel_init: Initializer | None = None,
        key: PRNGKeyArray,
    ):
        in_shape = (in_shape,) if isinstance(in_shape, int) else tuple(in_shape)
        out_shape = (out_shape,) if isinstance(out_shape, int) else tuple(out_shape)
        if any(s <= 0 for s in in_shape + out_shape):
            raise ValueError(
                f"DenseGeneral sizes must be positive, got in_shape={in_shape}, "
                f"out_shape={out_shape}"
            )
        if kernel_init is None:
            kernel_init = small_initializer(math.prod(in_shape))
        self.kernel = kernel_init(key, in_shape + out_shape).astype(jnp.float32)
        self.bias = jnp.zeros(out_shape, jnp.float32) if use_bias else None
        self.in_shape = in_shape
        self.out_shape = out_shape
        self.dtype = _dtype_name(dtype)

    def __call__(self, x: Float[Array, "..."]) -> Float[Array, "..."]:
        """``x (*batch, *in_shape) -> (*batch, *out_shape)``."""
        n_in = len(self.in_shape)
        if x.shape[x.ndim - n_in :] != self.in_shape:
            raise ValueError(
                f"DenseGeneral expects trailing input dims {self.in_shape}, got shape {x.shape}"
            )
        dtype = jnp.dtype(self.dtype)
        y = jnp.tensordot(x.astype(dtype), self.kernel.astype(dtype), axes=n_in)
        if self.bias is not None:
            y = y + self.bias.astype(dtype)
        return y


class LinearHeadwiseExpand(eqx.Module):
    """Block-diagonal linear map (ARCHITECTURE §3.5).

    The input's last axis is split into ``num_blocks`` contiguous chunks of size ``in/P``; chunk
    ``p`` is mapped by its own matrix ``kernel[p]`` of shape ``(out/P, in/P)`` (out before in, as
    the reference): ``y[p, o] = Σ_d x[p, d] kernel[p, o, d]``. Bias ``(out,)``.
    """

    kernel: Float[Array, "P out_per_block in_per_block"]
    bias: Float[Array, " d_out"] | None
    in_features: int = eqx.field(static=True)
    out_features: int = eqx.field(static=True)
    num_blocks: int = eqx.field(static=True)
    dtype: str = eqx.field(static=True)

    def __init__(
        self,
        in_features: int,
        num_blocks: int,
        out_features: int | None = None,
        *,
        use_bias: bool = False,
        dtype: Any = "float32",
        kernel_init: Initializer | None = None,
        key: PRNGKeyArray,
    ):
        """``out_features`` defaults to ``in_features``; ``kernel_init`` to small-init(in/P)."""
        out_features = in_features if out_features is None else out_features
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if value <= 0 or value % num_blocks != 0:
                raise ValueError(
                    f"LinearHeadwiseExpand: {name}={value} must be positive and divisible by "
                    f"num_blocks={num_blocks}"
                )
        if kernel_init is None:
            kernel_init = small_initializer(in_features // num_blocks)
        shape = (num_blocks, out_features // num_blocks, in_features // num_blocks)
        self.kernel = kernel_init(key, shape).astype(jnp.float32)
        self.bias = jnp.zeros((out_features,), jnp.float32) if use_bias else None
        self.in_features = in_features
        self.out_features = out_features
        self.num_blocks = num_blocks
        self.dtype = _dtype_name(dtype)

    def __call__(self, x: Float[Array, "*batch d_in"]) -> Float[Array, "*batch d_out"]:
        dtype = jnp.dtype(self.dtype)
        xs = x.astype(dtype).reshape(*x.shape[:-1], self.num_blocks, -1)
        y = jnp.einsum("...pd,pod->...po", xs, self.kernel.astype(dtype))
        y = y.reshape(*x.shape[:-1], self.out_features)
        if self.bias is not None:
            y = y + self.bias.astype(dtype)
        return y


class Embedding(eqx.Module):
    """Token embedding table ``(V, D)`` (float32); lookups are returned in ``dtype``."""

    embedding: Float[Array, "V D"]
    dtype: str = eqx.field(static=True)

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        dtype: Any = "float32",
        distribution: str = "normal",
        std: float | None = None,
        key: PRNGKeyArray,
    ):
        """``std`` defaults to small-init(embedding_dim)."""
        if num_embeddings <= 0 or embedding_dim <= 0:
            raise ValueError(
                f"Embedding sizes must be positive, got num_embeddings={num_embeddings}, "
                f"embedding_dim={embedding_dim}"
            )
        std = small_init_std(embedding_dim) if std is None else std
        self.embedding = init_array(key, (num_embeddings, embedding_dim), std, distribution)
        self.dtype = _dtype_name(dtype)

    @jax.named_scope("Embedding")
    def __call__(self, tokens: Int[Array, "*batch"]) -> Float[Array, "*batch D"]:
        return jnp.take(self.embedding, tokens, axis=0).astype(jnp.dtype(self.dtype))

    def attend(self, x: Float[Array, "*batch D"], dtype: Any = None) -> Float[Array, "*batch V"]:
        """Tied LM head: ``x @ embeddingᵀ`` in ``dtype`` (default: the embedding's dtype)."""
        dtype = jnp.dtype(self.dtype if dtype is None else dtype)
        return jnp.matmul(x.astype(dtype), self.embedding.astype(dtype).T)


# ----------------------------------------------------------------------------------------------
# causal depthwise convolution (ARCHITECTURE §3.4)


class CausalConv1d(eqx.Module):
    """Causal depthwise conv over the sequence axis, computed in ``dtype``.

    ``y[t, c] = b[c] + Σ_{j<K} kernel[j, c] · x[t − (K−1) + j, c]`` with ``x[<0] = 0``: ``kernel[K−1]``
    weights the current token. kernel ``(K, C)`` — the Flax ``(K, 1, C)`` with the singleton
    depthwise axis dropped (reshape when converting). ``K = 0`` is the identity (no params).
    Init: kernel and bias ``U(−1/√K, 1/√K)`` (PyTorch default, fan-in K).

    Decoding keeps a rolling state ``(B, K, C)`` of the last K inputs: see ``init_state``/``step``.
    """

    kernel: Float[Array, "K C"] | None
    bias: Float[Array, " C"] | None
    kernel_size: int = eqx.field(static=True)
    channels: int = eqx.field(static=True)
    dtype: str = eqx.field(static=True)

    def __init__(
        self,
        channels: int,
        kernel_size: int = 4,
        *,
        use_bias: bool = True,
        dtype: Any = "float32",
        key: PRNGKeyArray,
    ):
        if kernel_size < 0:
            raise ValueError(f"conv1d_kernel_size must be >= 0, got {kernel_size}")
        if channels <= 0:
            raise ValueError(f"CausalConv1d channels must be positive, got {channels}")
        self.kernel_size = kernel_size
        self.channels = channels
        self.dtype = _dtype_name(dtype)
        if kernel_size == 0:
            self.kernel = None
            self.bias = None
            return
        bound = 1.0 / math.sqrt(kernel_size)
        kkey, bkey = jr.split(key)
        self.kernel = jr.uniform(
            kkey, (kernel_size, channels), jnp.float32, minval=-bound, maxval=bound
        )
        self.bias = (
            jr.uniform(bkey, (channels,), jnp.float32, minval=-bound, maxval=bound)
            if use_bias
            else None
        )

    @jax.named_scope("CausalConv1d")
    def __call__(self, x: Float[Array, "*batch S C"]) -> Float[Array, "*batch S C"]:
        """Full sequence ``(..., S, C) -> (..., S, C)``."""
        if self.kernel is None:
            return x
        dtype = jnp.dtype(self.dtype)
        K, S = self.kernel_size, x.shape[-2]
        x = x.astype(dtype)
        w = self.kernel.astype(dtype)
        pad = [(0, 0)] * (x.ndim - 2) + [(K - 1, 0), (0, 0)]
        xp = jnp.pad(x, pad)
        y = xp[..., 0:S, :] * w[0]
        for j in range(1, K):
            y = y + xp[..., j : j + S, :] * w[j]
        if self.bias is not None:
            y = y + self.bias.astype(dtype)
        return y

    def init_state(self, batch_size: int) -> Float[Array, "B K C"]:
        """Zero conv state (the last K inputs) for decoding."""
        return jnp.zeros((batch_size, self.kernel_size, self.channels), jnp.dtype(self.dtype))

    def state_from_sequence(self, x: Float[Array, "B S C"]) -> Float[Array, "B K C"]:
        """The conv state after consuming ``x``: its last K inputs, zero-padded on the left."""
        K = self.kernel_size
        xp = jnp.pad(x.astype(jnp.dtype(self.dtype)), ((0, 0), (K, 0), (0, 0)))
        return xp[:, xp.shape[1] - K :, :]

    def step(
        self, state: Float[Array, "B K C"], x_t: Float[Array, "B C"]
    ) -> tuple[Float[Array, "B C"], Float[Array, "B K C"]]:
        """One decode step: push ``x_t`` into the window and return ``(y_t, new_state)``."""
        if self.kernel is None:
            return x_t, state
        dtype = jnp.dtype(self.dtype)
        state = jnp.concatenate([state[:, 1:, :], x_t.astype(dtype)[:, None, :]], axis=1)
        y = jnp.sum(state * self.kernel.astype(dtype), axis=1)
        if self.bias is not None:
            y = y + self.bias.astype(dtype)
        return y, state


# ----------------------------------------------------------------------------------------------
# norms


def _layer_norm_f32(x: Array, eps: float) -> Array:
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    mean_sq = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
    var = jnp.maximum(mean_sq - jnp.square(mean), 0.0)  # fast variance, as Flax
    return (x - mean) * jax.lax.rsqrt(var + eps)


def _rms_norm_f32(x: Array, eps: float) -> Array:
    x = x.astype(jnp.float32)
    mean_sq = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(mean_sq + eps)


_NORM_FNS: dict[str, Callable[[Array, float], Array]] = {
    "layernorm": _layer_norm_f32,
    "rmsnorm": _rms_norm_f32,
}


def _norm_rows(
    norm: Callable[[Array, float], Array], x: Array, eps: float, scale: Array, bias: Array | None
) -> Array:
    """``norm(x) * scale + bias`` (normalising the last axis; ``scale``/``bias`` over the
    trailing ``scale.ndim`` axes) with the leading axes flattened into one row axis first.

    Same result; the reason is the backward pass: XLA (seen on CPU, jax 0.10) reduces the scale
    gradient over several leading axes about 2.5x slower than over one. Profiled on the
    small_xlstm train step at S=2048 (``xlstm-eqx bench profile``): the norms' backward was 18%
    of the step before this.
    """
    rows = norm(x.reshape(-1, *scale.shape), eps) * scale
    if bias is not None:
        rows = rows + bias
    return rows.reshape(x.shape)


def _check_norm_type(norm_type: str) -> None:
    if norm_type not in NORM_TYPES:
        raise ValueError(f"unknown norm_type {norm_type!r}; allowed: {', '.join(NORM_TYPES)}")


class _Norm(eqx.Module):
    """Shared body of ``LayerNorm`` / ``RMSNorm`` (the subclasses only pick the statistic)."""

    scale: Float[Array, " D"]
    bias: Float[Array, " D"] | None
    eps: float = eqx.field(static=True)
    dtype: str = eqx.field(static=True)
    norm_type: ClassVar[str]

    def __init__(
        self,
        dim: int,
        *,
        eps: float | int = 1e-6,
        use_bias: bool = False,
        dtype: Any = "float32",
    ):
        self.scale = jnp.ones((dim,), jnp.float32)
        self.bias = jnp.zeros((dim,), jnp.float32) if use_bias else None
        self.eps = float(eps)
        self.dtype = _dtype_name(dtype)

    @jax.named_scope("Norm")
    def __call__(self, x: Float[Array, "*batch D"]) -> Float[Array, "*batch D"]:
        y = _norm_rows(_NORM_FNS[self.norm_type], x, self.eps, self.scale, self.bias)
        return y.astype(jnp.dtype(self.dtype))


class LayerNorm(_Norm):
    """LayerNorm over the last axis: stats in float32 (var = E[x²]−E[x]² clamped at 0, as Flax),
    learnable scale ``(D,)`` (init 1), optional bias (init 0), output in ``dtype``."""

    norm_type: ClassVar[str] = "layernorm"


class RMSNorm(_Norm):
    """RMSNorm over the last axis: ``x / sqrt(E[x²] + eps) * scale`` (stats in float32),
    optional bias, output in ``dtype``."""

    norm_type: ClassVar[str] = "rmsnorm"


def make_norm(
    norm_type: str,
    dim: int,
    *,
    eps: float | int = 1e-6,
    use_bias: bool = False,
    dtype: Any = "float32",
) -> LayerNorm | RMSNorm:
    """``LayerNorm`` or ``RMSNorm`` by name (``"layernorm"`` / ``"rmsnorm"``)."""
    _check_norm_type(norm_type)
    cls = LayerNorm if norm_type == "layernorm" else RMSNorm
    return cls(dim, eps=eps, use_bias=use_bias, dtype=dtype)


class MultiHeadNorm(eqx.Module):
    """Per-head norm (ARCHITECTURE §3.3 step 7): each head's ``DH`` vector is normalised over its
    own axis (``layernorm`` or ``rmsnorm``, stats in float32) and scaled by a separate learnable
    scale per head, ``(NH, DH)`` (init 1). Equals a GroupNorm with NH groups. Output in ``dtype``."""

    scale: Float[Array, "NH DH"]
    bias: Float[Array, "NH DH"] | None
    norm_type: str = eqx.field(static=True)
    eps: float = eqx.field(static=True)
    dtype: str = eqx.field(static=True)

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        *,
        norm_type: str = "layernorm",
        eps: float | int = 1e-6,
        use_bias: bool = False,
        dtype: Any = "float32",
    ):
        _check_norm_type(norm_type)
        self.scale = jnp.ones((num_heads, head_dim), jnp.float32)
        self.bias = jnp.zeros((num_heads, head_dim), jnp.float32) if use_bias else None
        self.norm_type = norm_type
        self.eps = float(eps)
        self.dtype = _dtype_name(dtype)

    @jax.named_scope("MultiHeadNorm")
    def __call__(self, x: Float[Array, "*batch NH DH"]) -> Float[Array, "*batch NH DH"]:
        y = _norm_rows(_NORM_FNS[self.norm_type], x, self.eps, self.scale, self.bias)
        return y.astype(jnp.dtype(self.dtype))


# ----------------------------------------------------------------------------------------------
# feed-forward (ARCHITECTURE §4.2)


class FeedForward(eqx.Module):
    """Feed-forward sub-layer from a ``FeedForwardConfig``.

    ``ffn_gated``: ``y = (act(x W_gate) ⊙ x W_up) W_down``; ``ffn``: ``y = act(x W_up) W_down``.
    Hidden size ``F = config._proj_up_dim`` (round-up rule of the config). Up projections use
    small-init(D), the down projection ``output_init_fn`` with dim D and the block count L.
    Dropout (rate ``config.dropout``) on the output, only with a key.
    """

    proj_up: Dense
    proj_up_gate: Dense | None
    proj_down: Dense
    act_fn: str = eqx.field(static=True)
    dropout_rate: float = eqx.field(static=True)

    def __init__(self, config: Any, *, key: PRNGKeyArray):
        D = config.embedding_dim
        F = config._proj_up_dim
        if D is None or D <= 0 or F is None or F <= 0:
            raise ValueError(
                f"FeedForwardConfig: embedding_dim ({D}) and _proj_up_dim ({F}) must be positive"
            )
        if config.ff_type not in ("ffn_gated", "ffn"):
            raise ValueError(f"unknown ff_type {config.ff_type!r}; allowed: ffn_gated, ffn")
        get_activation(config.act_fn)
        num_blocks = config._num_blocks or 1
        up_init = small_initializer(D, config.init_distribution)
        down_init = output_initializer(
            config.output_init_fn, D, num_blocks, config.init_distribution
        )
        kup, kgate, kdown = jr.split(key, 3)
        dense = dict(use_bias=config.bias, dtype=config.dtype)
        self.proj_up = Dense(D, F, kernel_init=up_init, key=kup, **dense)
        self.proj_up_gate = (
            Dense(D, F, kernel_init=up_init, key=kgate, **dense)
            if config.ff_type == "ffn_gated"
            else None
        )
        self.proj_down = Dense(F, D, kernel_init=down_init, key=kdown, **dense)
        self.act_fn = config.act_fn
        self.dropout_rate = float(config.dropout)

    @jax.named_scope("FeedForward")
    def __call__(
        self, x: Float[Array, "*batch D"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "*batch D"]:
        act = ACTIVATIONS[self.act_fn]
        if self.proj_up_gate is None:
            h = act(self.proj_up(x))
        else:
            h = act(self.proj_up_gate(x)) * self.proj_up(x)
        return dropout(self.proj_down(h), self.dropout_rate, key=key)


# ----------------------------------------------------------------------------------------------
# parameter counting


def _param_leaves(tree: Any) -> list[Any]:
    """Array leaves of ``tree`` that are parameters: every array (or ``ShapeDtypeStruct``) except
    the fields that a module names in its class attribute ``_buffer_fields`` (non-trainable
    buffers, e.g. a RoPE table)."""
    out: list[Any] = []

    def visit(node: Any) -> None:
        if isinstance(node, eqx.Module):
            skip = set(getattr(type(node), "_buffer_fields", ()))
            for name, value in vars(node).items():
                if name in skip:
                    continue
                visit(value)
            return
        if isinstance(node, jax.Array | np.ndarray | jax.ShapeDtypeStruct):
            out.append(node)
            return
        if node is None or isinstance(node, str | int | float | bool | complex):
            return
        if isinstance(node, list | tuple | dict) or _is_pytree_node(node):
            children = jax.tree_util.tree_leaves(
                node, is_leaf=lambda n: n is not node and isinstance(n, eqx.Module)
            )
            for child in children:
                visit(child)

    visit(tree)
    return out


def _is_pytree_node(node: Any) -> bool:
    leaves = jax.tree_util.tree_leaves(node)
    return not (len(leaves) == 1 and leaves[0] is node)


def count_params(model: PyTree) -> int:
    """Number of parameters (array elements) of a model, buffers excluded.

    Works on real models and on ``eqx.filter_eval_shape`` skeletons (``ShapeDtypeStruct``
    leaves). A module marks non-trainable arrays by listing their field names in a class
    attribute ``_buffer_fields: ClassVar[tuple[str, ...]]``.
    """
    return int(sum(math.prod(leaf.shape) for leaf in _param_leaves(model)))


__all__ = [
    "ACTIVATIONS",
    "CausalConv1d",
    "Dense",
    "DenseGeneral",
    "Embedding",
    "FeedForward",
    "LayerNorm",
    "LinearHeadwiseExpand",
    "MultiHeadNorm",
    "RMSNorm",
    "bias_linspace_init",
    "count_params",
    "dropout",
    "get_activation",
    "init_array",
    "make_initializer",
    "make_norm",
    "output_initializer",
    "small_init_std",
    "small_initializer",
    "soft_cap",
    "wang_std",
    "zeros_init",
]
