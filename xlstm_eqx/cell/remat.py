"""`mlstm_chunkwise_remat`: the pure-JAX chunkwise form under a rematerialisation policy
(`REMAT_POLICIES`), trading recomputation in the backward pass for activation memory; same
result and gradient as `mlstm_chunkwise` (docs/architecture.md, "Cell remat policies").
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from .checks import IntLike, check_chunk_size, check_inputs
from .forms import (
    GatePreact,
    accumulation_dtype,
    initial_state_or_zeros,
    mlstm_chunkwise,
    mLSTMState,
)


# Remat policies for the pure-JAX chunkwise form

#: Names accepted by `mlstm_chunkwise_remat(remat=...)`.
REMAT_POLICIES: tuple[str, ...] = ("none", "full", "chunk_states")


def mlstm_chunkwise_remat(
    queries: Float[Array, "B NH S DHQK"],
    keys: Float[Array, "B NH S DHQK"],
    values: Float[Array, "B NH S DHV"],
    igate_preact: GatePreact,
    fgate_preact: GatePreact,
    *,
    chunk_size: IntLike = 64,
    initial_state: mLSTMState | None = None,
    eps: float = 1e-6,
    remat: str = "chunk_states",
    chunks_per_step: IntLike = 1,
) -> tuple[Float[Array, "B NH S DHV"], mLSTMState]:
    """`mlstm_chunkwise` under a rematerialisation policy; same result (h and the final state),
    same gradient.

    - "none": `mlstm_chunkwise` as is (autodiff keeps every chunk's L×L matrices).
    - "full": `jax.checkpoint` around the whole cell: nothing but the inputs is kept, and the whole
      cell is recomputed in the backward. Lowers memory only across several layers (the backward of
      this one cell still builds all chunks' matrices at once).
    - "chunk_states": a `lax.scan` over groups of `chunks_per_step` chunks, each a checkpointed call
      of `mlstm_chunkwise` from the carried state. Only the states between groups are kept; the
      backward rebuilds one group's L×L matrices at a time, so the cell's peak memory is the
      inputs, their gradients and the chunk states. The forward runs the groups in sequence.
    """
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat must be one of {REMAT_POLICIES}, got {remat!r}")
    chunk_size = check_chunk_size(chunk_size)
    chunks_per_step = check_chunk_size(chunks_per_step, "chunks_per_step")
    check_inputs(queries, keys, values, igate_preact, fgate_preact)

    def cell(q, k, v, i, f, state):
        return mlstm_chunkwise(
            q,
            k,
            v,
            i,
            f,
            chunk_size=chunk_size,
            initial_state=state,
            eps=eps,
        )

    args = (queries, keys, values, igate_preact, fgate_preact)
    if remat == "none":
        h, final = cell(*args, initial_state)
    elif remat == "full":
        h, final = jax.checkpoint(cell)(*args, initial_state)
    else:
        h, final = _scan_chunks(cell, args, initial_state, chunk_size * chunks_per_step)
    return h, final


def _scan_chunks(cell: Callable, args, initial_state, step: int):
    """Run `cell` over consecutive time slices of `step` tokens, carrying the state."""
    queries, keys, values, igate, fgate = args
    batch, heads, seq_len, dhqk = queries.shape
    igate = igate.reshape(batch, heads, seq_len) if igate.ndim == 4 else igate
    fgate = fgate.reshape(batch, heads, seq_len) if fgate.ndim == 4 else fgate
    acc = accumulation_dtype(queries, keys, values, igate, fgate)
    initial_state = initial_state_or_zeros(initial_state, batch, heads, dhqk, values.shape[-1], acc)
    num_steps, rest = divmod(seq_len, step)
    if num_steps < 2:
        return cell(queries, keys, values, igate, fgate, initial_state)

    inputs = (queries, keys, values, igate, fgate)

    # The inputs are sliced inside the step (not rearranged into scan `xs`): no copy of them is made,
    # and their cotangents are accumulated in place.
    @jax.checkpoint
    def scan_step(state, index):
        start = index * step
        xs = (jax.lax.dynamic_slice_in_dim(x, start, step, axis=2) for x in inputs)
        h, state = cell(*xs, state)
        return state, h

    state, h = jax.lax.scan(scan_step, initial_state, jnp.arange(num_steps))
    h = jnp.moveaxis(h, 0, 2).reshape(batch, heads, num_steps * step, values.shape[-1])
    if rest:
        h_rest, state = cell(*(x[:, :, num_steps * step :] for x in inputs), state)
        h = jnp.concatenate([h, h_rest], axis=2)
    return h, state
