"""Norms: `LayerNorm` and `RMSNorm` over the last axis, and `MultiHeadNorm`, the per-head norm
after the mLSTM cell. Statistics are computed in float32 and the result is returned in the
layer's compute dtype; scales are float32 parameters initialised to 1.
"""

from collections.abc import Callable
from typing import Any, ClassVar, cast, get_args

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ..core.config import NormType
from ..core.utils import dtype_name
from .axes import LogicalAxes


NORM_TYPES: tuple[str, ...] = get_args(NormType)


# norms


def _layer_norm_stats(x: Array, eps: float) -> tuple[Array, Array]:
    """Mean and 1/std over the last axis (float32 ``x``), keepdims."""
    mean = jnp.mean(x, axis=-1, keepdims=True)
    mean_sq = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
    var = jnp.maximum(mean_sq - jnp.square(mean), 0.0)  # fast variance, as Flax
    return mean, jax.lax.rsqrt(var + eps)


def _layer_norm_f32(x: Array, eps: float) -> Array:
    x = x.astype(jnp.float32)
    mean, rstd = _layer_norm_stats(x, eps)
    return (x - mean) * rstd


def _scaled_layer_norm_fwd(x: Array, scale: Array, eps: float) -> tuple[Array, tuple[Array, ...]]:
    x32 = x.astype(jnp.float32)
    mean, rstd = _layer_norm_stats(x32, eps)
    return (x32 - mean) * rstd * scale, (x, mean, rstd, scale)


def _scaled_layer_norm_bwd(
    eps: float, residuals: tuple[Array, ...], g: Array
) -> tuple[Array, Array]:
    """dx = rstd·(g·s − mean(g·s) − x̂·mean(g·s·x̂)); dscale = Σ_rows g·x̂ (the clamp of the
    variance at 0 is taken as inactive: where it acts, x̂ is 0 up to rounding)."""
    del eps
    x, mean, rstd, scale = residuals
    x_hat = (x.astype(jnp.float32) - mean) * rstd
    g_scaled = g * scale
    mean_g = jnp.mean(g_scaled, axis=-1, keepdims=True)
    mean_g_x_hat = jnp.mean(g_scaled * x_hat, axis=-1, keepdims=True)
    dx = rstd * (g_scaled - mean_g - x_hat * mean_g_x_hat)
    return dx.astype(x.dtype), jnp.sum(g * x_hat, axis=0)


_scaled_layer_norm_vjp = jax.custom_vjp(
    lambda x, scale, eps: _scaled_layer_norm_fwd(x, scale, eps)[0], nondiff_argnums=(2,)
)
_scaled_layer_norm_vjp.defvjp(_scaled_layer_norm_fwd, _scaled_layer_norm_bwd)


def _scaled_layer_norm(x: Array, scale: Array, eps: float) -> Array:
    """``_layer_norm_f32(x) * scale`` (rows ``x (R, *scale.shape)``) with its backward written out.

    Why: autodiff's backward of the fast variance kept several full-size residuals, among them
    the scale broadcast to ``x``'s shape, materialised in the forward (XLA:CPU's fused backward
    takes no broadcast operands); profiled on the small_xlstm train step, that broadcast alone
    was the costliest norm op. Here the residuals are ``x`` and the per-row mean and 1/std.
    """
    # cast: the checker cannot solve custom_vjp's generic return type
    return cast(Array, _scaled_layer_norm_vjp(x, scale, eps))


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
    if norm is _layer_norm_f32:
        rows = _scaled_layer_norm(x.reshape(-1, *scale.shape), scale, eps)
    else:
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
    scale_axes: LogicalAxes | None = eqx.field(static=True)
    bias_axes: LogicalAxes | None = eqx.field(static=True)
    norm_type: ClassVar[str]

    def __init__(
        self,
        dim: int,
        *,
        eps: float | int = 1e-6,
        use_bias: bool = False,
        dtype: Any = "float32",
        axes: LogicalAxes | None = None,
    ):
        """``axes``: the logical axes of scale and bias (``nn.axes``), e.g. ``("embed",)``."""
        self.scale = jnp.ones((dim,), jnp.float32)
        self.bias = jnp.zeros((dim,), jnp.float32) if use_bias else None
        self.eps = float(eps)
        self.dtype = dtype_name(dtype)
        self.scale_axes = axes
        self.bias_axes = axes

    @jax.named_scope("Norm")
    def __call__(self, x: Float[Array, "*batch D"]) -> Float[Array, "*batch D"]:
        y = _norm_rows(_NORM_FNS[self.norm_type], x, self.eps, self.scale, self.bias)
        return y.astype(jnp.dtype(self.dtype))


class LayerNorm(_Norm):
    """LayerNorm over the last axis: stats in float32 (var = E[x²]−E[x]² clamped at 0, as Flax),
    learnable scale ``(D,)`` (init 1), optional bias (init 0), output in ``dtype``."""

    norm_type: ClassVar[str] = "layernorm"
    # Said explicitly: a type checker would otherwise give the subclass a generated __init__.
    __init__ = _Norm.__init__


class RMSNorm(_Norm):
    """RMSNorm over the last axis: ``x / sqrt(E[x²] + eps) * scale`` (stats in float32),
    optional bias, output in ``dtype``."""

    norm_type: ClassVar[str] = "rmsnorm"
    # Said explicitly: a type checker would otherwise give the subclass a generated __init__.
    __init__ = _Norm.__init__


def make_norm(
    norm_type: str,
    dim: int,
    *,
    eps: float | int = 1e-6,
    use_bias: bool = False,
    dtype: Any = "float32",
    axes: LogicalAxes | None = None,
) -> LayerNorm | RMSNorm:
    """``LayerNorm`` or ``RMSNorm`` by name (``"layernorm"`` / ``"rmsnorm"``)."""
    _check_norm_type(norm_type)
    cls = LayerNorm if norm_type == "layernorm" else RMSNorm
    return cls(dim, eps=eps, use_bias=use_bias, dtype=dtype, axes=axes)


class MultiHeadNorm(eqx.Module):
    """Per-head norm (docs/architecture.md, "Building blocks"): each head's ``DH`` vector is
    normalised over its own axis (``layernorm`` or ``rmsnorm``, stats in float32) and scaled by a
    separate learnable scale per head, ``(NH, DH)`` (init 1). Equals a GroupNorm with NH groups.
    Output in ``dtype``."""

    scale: Float[Array, "NH DH"]
    bias: Float[Array, "NH DH"] | None
    norm_type: str = eqx.field(static=True)
    eps: float = eqx.field(static=True)
    dtype: str = eqx.field(static=True)
    scale_axes: ClassVar[LogicalAxes] = ("heads", "head_dim")
    bias_axes: ClassVar[LogicalAxes] = ("heads", "head_dim")

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
        self.dtype = dtype_name(dtype)

    @jax.named_scope("MultiHeadNorm")
    def __call__(self, x: Float[Array, "*batch NH DH"]) -> Float[Array, "*batch NH DH"]:
        y = _norm_rows(_NORM_FNS[self.norm_type], x, self.eps, self.scale, self.bias)
        return y.astype(jnp.dtype(self.dtype))
