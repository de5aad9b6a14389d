"""Argument checks of the mLSTM cell forms (docs/architecture.md, "Edge cases").

Every check looks at shapes, dtypes and Python values only (never at array values), so it costs
nothing under `jit` and runs before any computation. Each failure is a `ValueError` with a one-line
message that names the argument.
"""

import numbers

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from ..core.utils import check_rank


# A Python or NumPy integer: what `check_chunk_size` accepts, as an annotation.
IntLike = int | np.integer


def check_floating(**arrays: Array) -> None:
    """`ValueError` naming the first argument whose dtype is not floating point (int, bool, complex):
    an integer q would otherwise be cast silently and compute in float32."""
    for name, x in arrays.items():
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} must have a floating-point dtype, got {x.dtype}")


def check_chunk_size(value: object, name: str = "chunk_size") -> int:
    """A positive Python or NumPy integer (not a bool, not a float such as 2.5 or 4.0), as `int`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def squeeze_gate(gate: Array, name: str, shape: tuple[int, ...]) -> Array:
    """A gate pre-activation (B, NH, S) or (B, NH, S, 1) as (B, NH, S) = `shape`."""
    if gate.ndim == 4:
        if gate.shape[-1] != 1:
            raise ValueError(
                f"{name} must have shape (B, NH, S) or (B, NH, S, 1), got {gate.shape}"
            )
        gate = gate[..., 0]
    if gate.shape != shape:
        raise ValueError(
            f"{name} has shape {gate.shape}; expected (B, NH, S) = {shape} from the queries"
        )
    return gate


def check_qkv(queries: Array, keys: Array, values: Array) -> None:
    """Ranks, then the shared dimensions B, NH, S (and DHQK of q and k), each error naming both."""
    check_rank("queries", queries, "(B, NH, S, DHQK)")
    check_rank("keys", keys, "(B, NH, S, DHQK)")
    check_rank("values", values, "(B, NH, S, DHV)")
    for axis, name in enumerate(("B", "NH", "S")):
        for other_name, other in (("keys", keys), ("values", values)):
            if other.shape[axis] != queries.shape[axis]:
                raise ValueError(
                    f"dimension {name} of {other_name} is {other.shape[axis]} but "
                    f"{queries.shape[axis]} in queries"
                )
    if keys.shape[-1] != queries.shape[-1]:
        raise ValueError(
            f"dimension DHQK of keys is {keys.shape[-1]} but {queries.shape[-1]} in queries"
        )


def check_step(q: Array, k: Array, v: Array, igate: Array, fgate: Array) -> None:
    """Ranks and dtypes of one token's inputs (`mlstm_recurrent_step`)."""
    check_floating(q=q, k=k, v=v, igate_preact=igate, fgate_preact=fgate)
    for name, x, expected in (
        ("q", q, "(B, NH, DHQK)"),
        ("k", k, "(B, NH, DHQK)"),
        ("v", v, "(B, NH, DHV)"),
        ("igate_preact", igate, "(B, NH)"),
        ("fgate_preact", fgate, "(B, NH)"),
    ):
        check_rank(name, x, expected)
    if k.shape != q.shape:
        raise ValueError(f"k has shape {k.shape} but q has {q.shape}; expected (B, NH, DHQK)")
    for name, x in (("v", v), ("igate_preact", igate), ("fgate_preact", fgate)):
        if x.shape[:2] != q.shape[:2]:
            raise ValueError(f"{name} has (B, NH) = {x.shape[:2]} but q has {q.shape[:2]}")


def check_inputs(
    queries: Array, keys: Array, values: Array, igate_preact: Array, fgate_preact: Array
) -> tuple[Array, Array]:
    """Every check of a sequence form's inputs, before any computation; the gates as (B, NH, S)."""
    check_floating(
        queries=queries,
        keys=keys,
        values=values,
        igate_preact=igate_preact,
        fgate_preact=fgate_preact,
    )
    check_qkv(queries, keys, values)
    shape = queries.shape[:3]
    return (
        squeeze_gate(igate_preact, "igate_preact", shape),
        squeeze_gate(fgate_preact, "fgate_preact", shape),
    )
