"""Initialisers: small-init and wang standard deviations, the three distributions, output-
projection and gate-bias inits. Every initialiser returns float32 arrays
(docs/architecture.md, "Initialisation").
"""

import math
from collections.abc import Callable, Sequence
from typing import Any, get_args

import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray

from ..core.config import InitDistribution as InitDistribution, OutputInitFn as OutputInitFn


Initializer = Callable[[PRNGKeyArray, tuple[int, ...]], Float[Array, "..."]]


INIT_DISTRIBUTIONS: tuple[str, ...] = get_args(InitDistribution)


OUTPUT_INIT_FNS: tuple[str, ...] = get_args(OutputInitFn)


# initialisers (docs/architecture.md, "Initialisation")


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
