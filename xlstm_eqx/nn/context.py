"""Left context across devices for sequence ops with a finite window (docs/architecture.md, "Context
parallelism"): with the sequence split over a mesh axis (inside a `jax.shard_map` with that axis
manual; device r holds tokens [r·S_local, (r+1)·S_local)), a causal convolution of kernel size K
needs the last K−1 steps of the previous device's segment. One `lax.ppermute` along the axis
sends them (a halo exchange); the first device gets zeros, which is the one-device zero padding.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Shaped


def previous_segment_tail(
    x: Shaped[Array, "..."], length: int, axis_name: str, *, time_axis: int = -2
) -> Shaped[Array, "..."]:
    """The last `length` steps (along `time_axis`) of the previous device's `x` along the mesh axis
    `axis_name`, zeros (False) on its first device. Needs S_local ≥ `length` (one hop)."""
    axis = time_axis % x.ndim
    seq_len = x.shape[axis]
    if seq_len < length:
        raise ValueError(
            f"the sequence segment per device along '{axis_name}' has {seq_len} steps, fewer than "
            f"the {length} steps of left context a causal conv of kernel size {length + 1} needs "
            f"from the previous segment; use a longer sequence or a smaller '{axis_name}' size"
        )
    size = jax.lax.axis_size(axis_name)
    tail = jax.lax.slice_in_dim(x, seq_len - length, seq_len, axis=axis)
    return jax.lax.ppermute(tail, axis_name, [(r, r + 1) for r in range(size - 1)])


def with_left_context(
    conv: Callable[..., Array],
    x: Float[Array, "*batch S C"],
    length: int,
    axis_name: str,
    document_borders: Bool[Array, "*batch S"] | None = None,
    first_context: Float[Array, "*batch L C"] | None = None,
) -> Float[Array, "*batch S C"]:
    """`conv(x)` (or `conv(x, document_borders)`) of a causal op that reads `length` steps back,
    on a sequence split over `axis_name`: run on the previous segment's last `length` steps
    followed by this segment's, and those first `length` outputs dropped. Equal to the op on
    the whole sequence, segment by segment. `first_context`: the `length` steps before the
    sequence, for the first device (zeros by default; a decode window when continuing)."""
    if length == 0:
        return conv(x) if document_borders is None else conv(x, document_borders)
    halo = previous_segment_tail(x, length, axis_name)
    if first_context is not None:
        first = jax.lax.axis_index(axis_name) == 0
        halo = jnp.where(first, first_context.astype(halo.dtype), halo)
    extended = jnp.concatenate([halo, x], axis=-2)
    if document_borders is None:
        y = conv(extended)
    else:
        border_halo = previous_segment_tail(document_borders, length, axis_name, time_axis=-1)
        y = conv(extended, jnp.concatenate([border_halo, document_borders], axis=-1))
    return y[..., length:, :]
