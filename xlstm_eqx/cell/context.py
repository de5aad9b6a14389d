"""The mLSTM across devices: context parallelism over a mesh axis that splits the sequence
(docs/architecture.md, "Context parallelism").

The state recurrence is linear: the memory after a segment is the memory before it decayed by the
segment's total forget gate, plus what the segment writes. So each device, holding one segment of
the sequence (a `jax.shard_map` with the cp axis manual), computes what its segment writes into an
empty memory (`segment_state`: O(S_local·DHQK·DHV), no L×L work) and its total log decay; the
devices exchange these small states (`lax.all_gather`: cp × (C, n, m) per batch and head); each
device folds the states of the devices before it (an exclusive prefix, in the stabilised log space
of the forms: `append_segment` is the chunkwise form's inter-chunk step) and runs the chunkwise form
on its segment from that incoming state. Gradients flow through the all-gather (its transpose is a
reduce-scatter).

The fold starts from the empty memory's stabiliser m = -inf inside a segment and from the caller's
initial state (m = 0 by default) on rank 0, so the incoming stabiliser is the one-device run's own
(the max-plus fold is associative) and the outputs equal the one-device chunkwise form to rounding.
Forget-gate resets (f̃ = -inf: document borders) carry as -inf in the segment totals and clear the
memory wherever they fall, a segment boundary included. Invalid inputs (NaN, ±inf in q, k, v, NaN
or +inf gates) are replaced in the state pass and NaN is added to every later segment's incoming
state (`nonfinite`), so nothing leaks backwards, in the forward or the backward pass; each device's
chunkwise form keeps its own fast and careful paths.
"""

from typing import Literal

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from .checks import IntLike, check_chunk_size
from .forms import (
    NO_INPUT_PREACT,
    GatePreact,
    initial_state_or_zeros,
    mlstm_chunkwise,
    mLSTMState,
    pad_time_axis,
    validate_and_cast_inputs,
)
from .nonfinite import (
    bad_query_and_write,
    finite_stabiliser,
    poison_state,
    sanitize,
    sanitize_state,
)


def append_segment(
    state: mLSTMState, total_log_decay: Float[Array, "*batch"], segment: mLSTMState
) -> mLSTMState:
    """The memory after a segment: `state` (before it) decayed by exp(`total_log_decay`) = exp(Σ f̄)
    over the segment, plus `segment` (what the segment writes into an empty memory), restabilised
    by the larger of the two stabilisers. Shapes (*batch, DHQK, DHV), (*batch, DHQK), (*batch)."""
    decayed_m = total_log_decay + state.m
    m_new = jnp.maximum(decayed_m, segment.m)
    m_sub = finite_stabiliser(m_new)
    decay = jnp.exp(decayed_m - m_sub)
    scale = jnp.exp(segment.m - m_sub)
    return mLSTMState(
        c=decay[..., None, None] * state.c + scale[..., None, None] * segment.c,
        n=decay[..., None] * state.n + scale[..., None] * segment.n,
        m=m_new,
    )


def segment_state(
    keys: Float[Array, "B NH S DHQK"],
    values: Float[Array, "B NH S DHV"],
    igate: Float[Array, "B NH S"],
    log_fgate: Float[Array, "B NH S"],
    *,
    chunk: int,
) -> tuple[mLSTMState, Float[Array, "B NH"]]:
    """What a segment writes into an empty memory (stabiliser m = -inf before it, so m is the max
    of the tokens' log weights), and its total log decay Σ f̄ (-inf if a reset is in it).

    Gates already as (ĩ, f̄ = logσ(f̃)) in the accumulation dtype, inputs finite. Chunks of `chunk`
    tokens as in the chunkwise form (every log weight a sum of its own terms inside a chunk); the
    chunks' contributions folded by `append_segment`."""
    batch, heads, seq_len, dhqk = keys.shape
    num_chunks = -(-seq_len // chunk)
    padded = num_chunks * chunk
    k, v = (pad_time_axis(x, padded, 0.0) for x in (keys, values))
    ig = pad_time_axis(igate, padded, NO_INPUT_PREACT)
    lf = pad_time_axis(log_fgate, padded, 0.0)
    k, v, ig, lf = (
        x.reshape(batch, heads, num_chunks, chunk, *x.shape[3:]) for x in (k, v, ig, lf)
    )
    after = jax.lax.cumsum(lf, axis=3, reverse=True)[..., 1:]  # Σ_{u>t} f̄_u
    after = jnp.concatenate([after, jnp.zeros_like(lf[..., :1])], axis=-1)
    log_weight = after + ig
    weight_max = jnp.max(log_weight, axis=-1)
    weight = jnp.exp(log_weight - finite_stabiliser(weight_max)[..., None])
    chunks = (  # each chunk's own (C, n, m), (B, NH, NC, ...)
        jnp.einsum("bhcl,bhcld,bhclv->bhcdv", weight, k, v),
        jnp.einsum("bhcl,bhcld->bhcd", weight, k),
        weight_max,
    )
    totals = jnp.sum(lf, axis=-1)  # (B, NH, NC)
    empty = mLSTMState(  # like the inputs (`zeros_like`): varying over the same manual axes
        c=jnp.zeros_like(chunks[0][:, :, 0]),
        n=jnp.zeros_like(chunks[1][:, :, 0]),
        m=jnp.full_like(weight_max[:, :, 0], -jnp.inf),
    )

    def fold(state, xs):
        total, chunk_state = xs
        return append_segment(state, total, mLSTMState(*chunk_state)), None

    chunk_major = jax.tree.map(lambda x: jnp.moveaxis(x, 2, 0), (totals, chunks))
    final, _ = jax.lax.scan(fold, empty, chunk_major)
    return final, jnp.sum(totals, axis=-1)


def exclusive_prefix_states(
    start: mLSTMState,
    totals: Float[Array, "R B NH"],
    segments: mLSTMState,
) -> tuple[mLSTMState, mLSTMState]:
    """The memory entering each of R segments, (R, *batch, ...), and after the last one: `start`
    followed by the segments in order (`append_segment`), a `lax.scan` over R."""

    def fold(state, xs):
        total, segment = xs
        return append_segment(state, total, segment), state

    # A scan's carry must vary over the same manual axes as its body's output: add a zero that does.
    zero = jnp.zeros_like(totals[0])
    start = mLSTMState(
        c=start.c + zero[..., None, None], n=start.n + zero[..., None], m=start.m + zero
    )
    final, entering = jax.lax.scan(fold, start, (totals, segments))
    return entering, final


def _poison_where_earlier_bad(
    entering: mLSTMState, final: mLSTMState, bad: Bool[Array, "R B NH"], start_bad: Array
) -> tuple[mLSTMState, mLSTMState]:
    """NaN added to the entering state of every segment after one with an invalid write (and to
    all of them if the start state is invalid), and to the final state if any is."""
    after_bad = jnp.cumsum(bad.astype(jnp.int32), axis=0) > 0
    before_bad = jnp.concatenate([jnp.zeros_like(after_bad[:1]), after_bad[:-1]], axis=0)
    entering = poison_state(entering, before_bad | start_bad)
    return entering, poison_state(final, after_bad[-1] | start_bad)


def incoming_state(
    segment: mLSTMState,
    total_log_decay: Float[Array, "B NH"],
    bad_write: Bool[Array, "B NH"],
    start: mLSTMState,
    *,
    axis_name: str,
    exchange: Literal["all_gather", "ppermute"] = "all_gather",
) -> tuple[mLSTMState, mLSTMState]:
    """(the memory entering this device's segment, the memory after the whole sequence) from this
    segment's `segment_state` (of valid inputs; `bad_write`: whether an invalid write was replaced)
    and `start` (the memory before rank 0's segment, the same on every device). "all_gather": one
    `lax.all_gather` over `axis_name` of each segment's (C, n, m), total log decay and flags, the
    final state on every device; "ppermute": `_incoming_by_ppermute`."""
    start, start_bad = sanitize_state(start)
    if exchange == "ppermute":
        return _incoming_by_ppermute(
            (total_log_decay, segment, bad_write), start, start_bad, axis_name
        )
    gathered = jax.lax.all_gather((total_log_decay, segment, bad_write), axis_name, axis=0)
    totals, segments, bad = gathered
    entering, final = exclusive_prefix_states(start, totals, segments)
    entering, final = _poison_where_earlier_bad(entering, final, bad, start_bad)
    rank = jax.lax.axis_index(axis_name)
    mine = jax.tree.map(
        lambda x: jax.lax.dynamic_index_in_dim(x, rank, 0, keepdims=False), entering
    )
    return mine, final


def _where(condition: Array, a, b):
    """`jnp.where(condition, ·, ·)` over two pytrees of the same structure."""
    return jax.tree.map(lambda x, y: jnp.where(condition, x, y), a, b)


def _shifted(x, axis_name: str, shift: int, size: int):
    """`x` of the device `shift` places before along `axis_name` (zeros for the first `shift`)."""
    return jax.lax.ppermute(x, axis_name, [(r, r + shift) for r in range(size - shift)])


def _incoming_by_ppermute(
    acc: tuple[Array, mLSTMState, Array], start: mLSTMState, start_bad: Array, axis_name: str
) -> tuple[mLSTMState, mLSTMState]:
    """`incoming_state` by ⌈log2 cp⌉ + 1 rounds of `lax.ppermute` of `acc` = (total log decay,
    segment state, invalid-write flags): a Hillis-Steele scan of the segments, (G, state) ∘
    (G', state') = (G + G', append_segment(state, G', state')), then a shift by one. Each device
    receives ⌈log2 cp⌉ + 1 states instead of cp - 1; the memory after the whole sequence is valid
    on the last device only."""
    size, rank = jax.lax.axis_size(axis_name), jax.lax.axis_index(axis_name)
    shift = 1
    while shift < size:
        earlier_total, earlier, earlier_bad = _shifted(acc, axis_name, shift, size)
        combined = (
            earlier_total + acc[0],
            append_segment(earlier, acc[0], acc[1]),
            earlier_bad | acc[2],
        )
        acc = _where(rank >= shift, combined, acc)  # devices with `shift` earlier ones
        shift *= 2
    before_total, before, before_bad = _shifted(acc, axis_name, 1, size)
    entering = _where(rank == 0, start, append_segment(start, before_total, before))
    entering = poison_state(entering, before_bad | start_bad)  # (rank 0 receives False)
    final = poison_state(append_segment(start, acc[0], acc[1]), acc[2] | start_bad)
    return entering, final


def mlstm_chunkwise_context_parallel(
    queries: Float[Array, "B NH S_local DHQK"],
    keys: Float[Array, "B NH S_local DHQK"],
    values: Float[Array, "B NH S_local DHV"],
    igate_preact: GatePreact,
    fgate_preact: GatePreact,
    *,
    axis_name: str,
    chunk_size: IntLike = 64,
    initial_state: mLSTMState | None = None,
    eps: float = 1e-6,
    fast_path: bool = True,
    exchange: Literal["all_gather", "ppermute"] = "all_gather",
) -> tuple[Float[Array, "B NH S_local DHV"], mLSTMState]:
    """`forms.mlstm_chunkwise` on a sequence split over the mesh axis `axis_name` (call inside
    `jax.shard_map` with that axis manual; device r holds tokens [r·S_local, (r+1)·S_local)).

    Returns this segment's h (B, NH, S_local, DHV) and the memory after the whole sequence (the
    same on every device: what decoding continues from). `initial_state` is the memory before the
    sequence (replicated over the axis; zeros by default). Any S_local (the chunkwise form pads);
    the outputs and gradients equal the one-device chunkwise form's to rounding. `exchange`: one
    all-gather of the segments' states (`incoming_state`; the final state on every device) or
    ⌈log2 cp⌉ + 1 ppermutes (`incoming_state`; fewer bytes for cp > 4, more rounds;
    the final state on the last device only)."""
    chunk_size = check_chunk_size(chunk_size)
    q, k, v, igate, log_fgate = validate_and_cast_inputs(
        queries, keys, values, igate_preact, fgate_preact
    )
    batch, heads, seq_len, dhqk = k.shape
    start = initial_state_or_zeros(initial_state, batch, heads, dhqk, v.shape[-1], k.dtype)
    # The state pass sees valid values only (`nonfinite.sanitize`); an invalid write poisons the
    # later segments' incoming states after the exchange.
    _, bad_write = bad_query_and_write(q, k, v, igate, log_fgate)
    _, k, v, igate, log_fgate = sanitize(q, k, v, igate, log_fgate)
    chunk = min(chunk_size, max(seq_len, 1))
    segment, total = segment_state(k, v, igate, log_fgate, chunk=chunk)
    entering, final = incoming_state(
        segment, total, jnp.any(bad_write, axis=-1), start, axis_name=axis_name, exchange=exchange
    )
    h, _ = mlstm_chunkwise(
        queries,
        keys,
        values,
        igate_preact,
        fgate_preact,
        chunk_size=chunk_size,
        initial_state=entering,
        eps=eps,
        fast_path=fast_path,
    )
    return h, final
