"""Dtype and PRNG-key helpers: a dtype from its name with a clear error, and splitting a key that
may be None (deterministic calls pass no key); the rank check shared by the cell and the models.
"""

from typing import Any

import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, PRNGKeyArray


# arguments


def check_rank(name: str, x: Array, expected: str) -> None:
    """`ValueError` naming `name` unless x has as many axes as the shape `expected`, "(B, NH, ...)"."""
    rank = expected.count(",") + 1
    if x.ndim != rank:
        raise ValueError(f"{name} must have shape {expected} ({rank}-D), got shape {x.shape}")


# dtypes


def to_dtype(dtype: Any) -> np.dtype:
    """A dtype from a string such as ``"bfloat16"`` (or a dtype), with a clear error otherwise."""
    try:
        return jnp.dtype(dtype)
    except TypeError as e:
        raise ValueError(
            f"unknown dtype {dtype!r}; expected e.g. 'float32', 'bfloat16' or 'float16'"
        ) from e


def dtype_name(dtype: Any) -> str:
    return to_dtype(dtype).name


def split_optional_key(key: PRNGKeyArray | None, num: int) -> tuple[PRNGKeyArray | None, ...]:
    """``jr.split(key, num)`` as a tuple, or ``num`` Nones when ``key`` is None."""
    if key is None:
        return (None,) * num
    return tuple(jr.split(key, num))
