"""Dtype and PRNG-key helpers: a dtype from its name with a clear error, and splitting a key that
may be None (deterministic calls pass no key).
"""

from typing import Any

import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import PRNGKeyArray


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


def split_optional_key(key: PRNGKeyArray | None, num: int) -> tuple[PRNGKeyArray | None, ...]:
    """``jr.split(key, num)`` as a tuple, or ``num`` Nones when ``key`` is None."""
    if key is None:
        return (None,) * num
    return tuple(jr.split(key, num))
