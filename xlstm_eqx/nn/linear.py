"""Linear maps and the token embedding: `Dense` ``(in, out)``, `DenseGeneral` over several axes,
the block-diagonal `LinearHeadwiseExpand`, and `Embedding` ``(V, D)`` (whose ``attend`` is the
tied LM head). Kernels are float32 parameters in the Flax ``(in, out)`` layout; each call computes
in the layer's ``dtype``.
"""

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from ..core.utils import dtype_name
from .axes import REPLICATED, LogicalAxes
from .functional import matmul_rows
from .init import Initializer, init_array, small_init_std, small_initializer


def _trailing_axes(axes: LogicalAxes | None, count: int) -> LogicalAxes | None:
    """The logical axes of a bias: the kernel's last ``count`` (output) axes."""
    if axes is None or axes == REPLICATED:
        return axes
    return axes[len(axes) - count :]


class Dense(eqx.Module):
    """``y = x @ kernel (+ bias)`` over the last axis, computed in ``dtype``.

    kernel ``(in, out)`` (Flax layout), bias ``(out,)``. Any leading dims. ``axes`` names the
    kernel's logical axes (``nn.axes``); the bias takes the output axis unless ``bias_axes`` says
    otherwise (a row-parallel layer's bias, added after the reduction, is `REPLICATED`).
    """

    kernel: Float[Array, "d_in d_out"]
    bias: Float[Array, " d_out"] | None
    in_features: int = eqx.field(static=True)
    out_features: int = eqx.field(static=True)
    dtype: str = eqx.field(static=True)
    kernel_axes: LogicalAxes | None = eqx.field(static=True)
    bias_axes: LogicalAxes | None = eqx.field(static=True)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool = False,
        dtype: Any = "float32",
        kernel_init: Initializer | None = None,
        axes: LogicalAxes | None = None,
        bias_axes: LogicalAxes | None = None,
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
        self.dtype = dtype_name(dtype)
        self.kernel_axes = axes
        self.bias_axes = _trailing_axes(axes, 1) if bias_axes is None else bias_axes

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
    ``axes``/``bias_axes``: the logical axes, as for `Dense` (the bias takes the output axes).
    """

    kernel: Float[Array, "..."]
    bias: Float[Array, "..."] | None
    in_shape: tuple[int, ...] = eqx.field(static=True)
    out_shape: tuple[int, ...] = eqx.field(static=True)
    dtype: str = eqx.field(static=True)
    kernel_axes: LogicalAxes | None = eqx.field(static=True)
    bias_axes: LogicalAxes | None = eqx.field(static=True)

    def __init__(
        self,
        in_shape: int | Sequence[int],
        out_shape: int | Sequence[int],
        *,
        use_bias: bool = False,
        dtype: Any = "float32",
        kernel_init: Initializer | None = None,
        axes: LogicalAxes | None = None,
        bias_axes: LogicalAxes | None = None,
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
        self.dtype = dtype_name(dtype)
        self.kernel_axes = axes
        self.bias_axes = _trailing_axes(axes, len(out_shape)) if bias_axes is None else bias_axes

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
    """Block-diagonal linear map (docs/architecture.md, "Building blocks").

    The input's last axis is split into ``num_blocks`` contiguous chunks of size ``in/P``; chunk
    ``p`` is mapped by its own matrix ``kernel[p]`` of shape ``(out/P, in/P)`` (out before in, as
    the reference): ``y[p, o] = Σ_d x[p, d] kernel[p, o, d]``. Bias ``(out,)``, whose logical
    axis (``features_axis``, e.g. ``"mlp"``) the caller names; the blocks are heads.
    """

    kernel: Float[Array, "P out_per_block in_per_block"]
    bias: Float[Array, " d_out"] | None
    in_features: int = eqx.field(static=True)
    out_features: int = eqx.field(static=True)
    num_blocks: int = eqx.field(static=True)
    dtype: str = eqx.field(static=True)
    bias_axes: LogicalAxes | None = eqx.field(static=True)
    kernel_axes: ClassVar[LogicalAxes] = ("heads", "head_dim", "head_dim")

    def __init__(
        self,
        in_features: int,
        num_blocks: int,
        out_features: int | None = None,
        *,
        use_bias: bool = False,
        dtype: Any = "float32",
        kernel_init: Initializer | None = None,
        features_axis: str | None = None,
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
        self.dtype = dtype_name(dtype)
        self.bias_axes = None if features_axis is None else (features_axis,)

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
    embedding_axes: ClassVar[LogicalAxes] = ("vocab", "embed")

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
        self.dtype = dtype_name(dtype)

    @jax.named_scope("Embedding")
    def __call__(self, tokens: Int[Array, "*batch"]) -> Float[Array, "*batch D"]:
        return jnp.take(self.embedding, tokens, axis=0).astype(jnp.dtype(self.dtype))

    def attend(self, x: Float[Array, "*batch D"], dtype: Any = None) -> Float[Array, "*batch V"]:
        """Tied LM head: ``x @ embeddingᵀ`` in ``dtype`` (default: the embedding's dtype)."""
        dtype = jnp.dtype(self.dtype if dtype is None else dtype)
        return jnp.matmul(x.astype(dtype), self.embedding.astype(dtype).T)
