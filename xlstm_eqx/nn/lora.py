"""Low-rank adapters (LoRA) on the projection layers: `LoRADense`, `LoRADenseGeneral` and
`LoRAHeadwise` add ``scale · (x A) B`` to a frozen `Dense` / `DenseGeneral` /
`LinearHeadwiseExpand` (docs/architecture.md, "Fine-tuning").

Each is a subclass of the layer it adapts and keeps its fields under the same names (``kernel``,
``bias``), so the base's parameter paths are unchanged and its weights still load; the adapter is
two new leaves ``lora_a`` / ``lora_b``. ``A`` starts as PEFT's (Kaiming-uniform, bound
``1/sqrt(in)``), ``B`` at zero (the adapted layer equals the base at start), ``scale =
alpha / rank``. Stacked layers (scanned blocks, the vmapped q/k pair) carry the same leading axes
on their adapters. `merged` folds the adapter into the kernel and returns the plain base layer.

Why not quax's LoRA: it replaces a kernel by a ``LoraArray`` whose leaves are ``_w``/``a``/``b``
(the base's path changes, so base checkpoints and the partition rules stop matching), finds only
``eqx.nn.Linear`` layers, has rules only for a plain 2-D ``dot_general`` (our kernels go through
``astype``, ``einsum`` over heads and ``tensordot`` over several axes first: those would
materialise ``W + AB`` or fail), and the whole forward (``lax.scan`` over stacked blocks,
``custom_vjp`` cell and norms) would have to run under ``quaxify``.
"""

import dataclasses
import math
from typing import Any, ClassVar, TypeVar

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray

from .axes import REPLICATED, LogicalAxes
from .functional import matmul_rows
from .linear import Dense, DenseGeneral, LinearHeadwiseExpand


__all__ = ["LoRADense", "LoRADenseGeneral", "LoRAHeadwise", "LoRALayer", "lora_adapted"]

BaseLayer = Dense | DenseGeneral | LinearHeadwiseExpand
_Layer = TypeVar("_Layer", Dense, DenseGeneral, LinearHeadwiseExpand)


def _copy_as(cls: type[_Layer], module: eqx.Module, **changes: Any) -> _Layer:
    """A ``cls`` holding ``module``'s values of ``cls``'s fields (with ``changes``), made
    without running ``cls.__init__`` (which would draw a new random kernel)."""
    new = object.__new__(cls)
    for f in dataclasses.fields(cls):
        object.__setattr__(new, f.name, changes.get(f.name, getattr(module, f.name)))
    return new


def _kaiming_a(key: PRNGKeyArray, shape: tuple[int, ...], fan_in: int) -> Array:
    """PEFT's ``lora_A`` init: ``kaiming_uniform_(a=sqrt(5))`` = U(-1/sqrt(fan_in), +)."""
    bound = 1.0 / math.sqrt(fan_in)
    return jr.uniform(key, shape, jnp.float32, -bound, bound)


class _Adapter:
    """The adapter fields and their shared helpers (mixed into the three layer classes)."""

    lora_a: Float[Array, "..."]
    lora_b: Float[Array, "..."]
    rank: int
    alpha: float
    lora_a_axes: ClassVar[LogicalAxes] = REPLICATED
    lora_b_axes: ClassVar[LogicalAxes] = REPLICATED

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def low_rank(self, x: Array, dtype: Any) -> Array:
        """``scale · (x A) B`` over the last axis of ``x`` in ``dtype`` (A ``(in, r)``, B
        ``(r, out)``)."""
        xa = matmul_rows(x.astype(dtype), self.lora_a.astype(dtype))
        return matmul_rows(xa, self.lora_b.astype(dtype)) * jnp.asarray(self.scale, dtype)


def _stack(kernel: Array, layer_ndim: int) -> tuple[int, ...]:
    """The leading stacked axes of a kernel whose single-layer rank is ``layer_ndim``."""
    return tuple(kernel.shape[: kernel.ndim - layer_ndim])


class LoRADense(Dense, _Adapter):
    """`Dense` + ``scale · (x A) B``: A ``(in, r)``, B ``(r, out)``."""

    lora_a: Float[Array, "d_in r"]
    lora_b: Float[Array, "r d_out"]
    rank: int = eqx.field(static=True)
    alpha: float = eqx.field(static=True)

    def __init__(self, base: Dense, *, rank: int, alpha: float, key: PRNGKeyArray):
        stack = _stack(base.kernel, 2)
        for f in dataclasses.fields(Dense):
            object.__setattr__(self, f.name, getattr(base, f.name))
        self.lora_a = _kaiming_a(key, stack + (base.in_features, rank), base.in_features)
        self.lora_b = jnp.zeros(stack + (rank, base.out_features), jnp.float32)
        self.rank, self.alpha = rank, float(alpha)

    def __call__(self, x: Float[Array, "*batch d_in"]) -> Float[Array, "*batch d_out"]:
        return super().__call__(x) + self.low_rank(x, jnp.dtype(self.dtype))

    def merged(self) -> Dense:
        """The plain `Dense` with ``kernel + scale · A B`` (float32 sum, the kernel's dtype)."""
        delta = jnp.einsum("...ir,...ro->...io", self.lora_a, self.lora_b) * self.scale
        kernel = (self.kernel.astype(jnp.float32) + delta).astype(self.kernel.dtype)
        return _copy_as(Dense, self, kernel=kernel)

    def without_adapter(self) -> Dense:
        """The base layer alone (its kernel and bias as stored)."""
        return _copy_as(Dense, self)


class LoRADenseGeneral(DenseGeneral, _Adapter):
    """`DenseGeneral` + ``scale · (x A) B`` over the flattened in/out axes: A
    ``(prod(in_shape), r)``, B ``(r, prod(out_shape))``."""

    lora_a: Float[Array, "d_in r"]
    lora_b: Float[Array, "r d_out"]
    rank: int = eqx.field(static=True)
    alpha: float = eqx.field(static=True)

    def __init__(self, base: DenseGeneral, *, rank: int, alpha: float, key: PRNGKeyArray):
        stack = _stack(base.kernel, len(base.in_shape) + len(base.out_shape))
        for f in dataclasses.fields(DenseGeneral):
            object.__setattr__(self, f.name, getattr(base, f.name))
        d_in, d_out = math.prod(base.in_shape), math.prod(base.out_shape)
        self.lora_a = _kaiming_a(key, stack + (d_in, rank), d_in)
        self.lora_b = jnp.zeros(stack + (rank, d_out), jnp.float32)
        self.rank, self.alpha = rank, float(alpha)

    def __call__(self, x: Float[Array, "..."]) -> Float[Array, "..."]:
        y = super().__call__(x)
        batch = x.shape[: x.ndim - len(self.in_shape)]
        flat = x.reshape(*batch, math.prod(self.in_shape))
        return y + self.low_rank(flat, jnp.dtype(self.dtype)).reshape(*batch, *self.out_shape)

    def merged(self) -> DenseGeneral:
        """The plain `DenseGeneral` with ``kernel + scale · A B`` reshaped to the kernel."""
        delta = jnp.einsum("...ir,...ro->...io", self.lora_a, self.lora_b) * self.scale
        delta = delta.reshape(self.kernel.shape)
        kernel = (self.kernel.astype(jnp.float32) + delta).astype(self.kernel.dtype)
        return _copy_as(DenseGeneral, self, kernel=kernel)

    def without_adapter(self) -> DenseGeneral:
        """The base layer alone (its kernel and bias as stored)."""
        return _copy_as(DenseGeneral, self)


class LoRAHeadwise(LinearHeadwiseExpand, _Adapter):
    """`LinearHeadwiseExpand` + a low-rank update per block (it stays block-diagonal, so it
    merges): A ``(P, in/P, r)``, B ``(P, r, out/P)``."""

    lora_a: Float[Array, "P d_in r"]
    lora_b: Float[Array, "P r d_out"]
    rank: int = eqx.field(static=True)
    alpha: float = eqx.field(static=True)

    def __init__(self, base: LinearHeadwiseExpand, *, rank: int, alpha: float, key: PRNGKeyArray):
        stack = _stack(base.kernel, 3)
        for f in dataclasses.fields(LinearHeadwiseExpand):
            object.__setattr__(self, f.name, getattr(base, f.name))
        P = base.num_blocks
        d_in, d_out = base.in_features // P, base.out_features // P
        self.lora_a = _kaiming_a(key, stack + (P, d_in, rank), d_in)
        self.lora_b = jnp.zeros(stack + (P, rank, d_out), jnp.float32)
        self.rank, self.alpha = rank, float(alpha)

    def __call__(self, x: Float[Array, "*batch d_in"]) -> Float[Array, "*batch d_out"]:
        dtype = jnp.dtype(self.dtype)
        xs = x.astype(dtype).reshape(*x.shape[:-1], self.num_blocks, -1)
        xa = jnp.einsum("...pd,pdr->...pr", xs, self.lora_a.astype(dtype))
        low = jnp.einsum("...pr,pro->...po", xa, self.lora_b.astype(dtype))
        low = low.reshape(*x.shape[:-1], self.out_features) * jnp.asarray(self.scale, dtype)
        return super().__call__(x) + low

    def merged(self) -> LinearHeadwiseExpand:
        """The plain `LinearHeadwiseExpand` with ``kernel[p] + scale · (A_p B_p)ᵀ``."""
        delta = jnp.einsum("...pdr,...pro->...pod", self.lora_a, self.lora_b) * self.scale
        kernel = (self.kernel.astype(jnp.float32) + delta).astype(self.kernel.dtype)
        return _copy_as(LinearHeadwiseExpand, self, kernel=kernel)

    def without_adapter(self) -> LinearHeadwiseExpand:
        """The base layer alone (its kernel and bias as stored)."""
        return _copy_as(LinearHeadwiseExpand, self)


LoRALayer = LoRADense | LoRADenseGeneral | LoRAHeadwise


def lora_adapted(layer: BaseLayer, *, rank: int, alpha: float, key: PRNGKeyArray) -> LoRALayer:
    """``layer`` with a rank-``rank`` adapter (the matching LoRA class)."""
    if rank <= 0:
        raise ValueError(f"LoRA rank must be positive, got {rank}")
    if isinstance(layer, LinearHeadwiseExpand):
        return LoRAHeadwise(layer, rank=rank, alpha=alpha, key=key)
    if isinstance(layer, DenseGeneral):
        return LoRADenseGeneral(layer, rank=rank, alpha=alpha, key=key)
    return LoRADense(layer, rank=rank, alpha=alpha, key=key)
