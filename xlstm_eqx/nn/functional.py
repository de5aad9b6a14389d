"""Stateless helpers of the building blocks: the soft cap, the activation table, inverted dropout
and a row-flattened matmul (the same product, laid out for a faster backward pass).
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray


# small functions


def soft_cap(x: Float[Array, "*shape"], cap: float | int | None) -> Float[Array, "*shape"]:
    """``cap * tanh(x / cap)`` in the dtype of ``x``; identity when ``cap`` is None."""
    if cap is None:
        return x
    cap = float(cap)
    return cap * jnp.tanh(x / cap)


def sigmoid(x: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
    """σ(x) computed as ``½·tanh(x/2) + ½``: the same function up to float rounding (a few ulp).

    Why: XLA:CPU evaluates tanh with a vectorised rational approximation but the logistic as
    ``1 / (1 + exp(-x))`` with a division; fwd+bwd of SiLU at (2048, 704) ran about 2x faster
    (min of alternated runs). The sigmoids and SiLUs of the layers were ~10% of the small_xlstm
    train step's profile."""
    return 0.5 * jnp.tanh(0.5 * x) + 0.5


def silu(x: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
    """SiLU (swish) ``x·σ(x)`` with `sigmoid` above."""
    return x * sigmoid(x)


def _relu_squared(x: Array) -> Array:
    return jnp.square(jax.nn.relu(x))


def _gelu_tanh(x: Array) -> Array:
    return jax.nn.gelu(x, approximate=True)


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": _gelu_tanh,  # Flax registry: the tanh approximation
    "relu": jax.nn.relu,
    "relu^2": _relu_squared,
    "sigmoid": sigmoid,
    "swish": silu,
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
