"""The mLSTM cell in three interchangeable forms (docs/architecture.md, "The mLSTM cell").

All forms compute, per batch element and head, with f̄ = logσ(f̃) and exponential input gates,

    h_s = Σ_t C[s,t] v_t / (max(|Σ_t C[s,t]|, exp(-m_s)) + eps),
    C[s,t] = (q_s·k_t / √DHQK) · exp(Σ_{t<u≤s} f̄_u + ĩ_t - m_s)   for t ≤ s,

and differ only in how they organise the work and choose the stabiliser `m_s`:

- `parallel_stabilized_simple`: the S×S matrix at once, `m_s` the row maximum. O(S²) memory.
- `mlstm_chunkwise`: chunks of L tokens; an L×L matrix inside each chunk and a (C, n, m) state carried
  between chunks. O(S) memory, forward and backward.
- `mlstm_recurrent` / `mlstm_recurrent_step`: one token at a time. O(1) memory per step.

The recurrent and chunkwise forms start from m₀ = 0 and so place `eps` slightly differently from the
parallel form (the forms agree to about eps·exp(m)/|den|).

Gates, their cumulative sums, the stabiliser and the states are computed in float32 (float64 for
float64 inputs) whatever the dtype of q, k, v. Log-decay sums are never formed as differences of a
running cumulative sum (which loses float32 precision once the sum grows large); every entry is a sum
of its own terms only.

Edge cases are the same in every form (and in `pallas.mlstm_chunkwise_pallas`); docs/architecture.md,
"Edge cases", states them: the gates' -inf are limits (no write; a cleared memory), a non-finite
input never reaches earlier outputs (`nonfinite`), S = 0 or B = 0 give empty results, and bad
arguments are a `ValueError` naming them before any computation (`checks`). All of that costs
nothing in the common case: one whole-call finiteness predicate picks, by `lax.cond`, a fast path
without the masking, replacement and NaN add-back work when every input (and the initial state) is
finite (`run_fast_or_careful`); both paths give the same outputs, states and gradients.
"""

import functools
import math
from collections.abc import Callable
from typing import overload

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float

from .checks import IntLike, check_chunk_size, check_inputs, check_step
from .nonfinite import (
    RESET_LOG_DECAY,
    all_finite,
    bad_query_and_write,
    finite_stabiliser,
    log_forget,
    poison,
    poison_state,
    poisoned_rows,
    sanitize,
    sanitize_state,
)
from .one_token import step_with_nan_added


GatePreact = Float[Array, "B NH S 1"] | Float[Array, "B NH S"]


# Padded positions get this input-gate pre-activation: no write (the limit ĩ = -inf), so the memory
# after the padding is exactly the memory after the last real token.
NO_INPUT_PREACT = -math.inf


class mLSTMState(eqx.Module):
    """Recurrent mLSTM memory, stabilised: the true state is (c, n) · exp(m)."""

    c: Float[Array, "B NH DHQK DHV"]
    n: Float[Array, "B NH DHQK"]
    m: Float[Array, "B NH"]

    @classmethod
    def zeros(
        cls, batch_size: int, num_heads: int, dhqk: int, dhv: int, dtype=jnp.float32
    ) -> "mLSTMState":
        return cls(
            c=jnp.zeros((batch_size, num_heads, dhqk, dhv), dtype),
            n=jnp.zeros((batch_size, num_heads, dhqk), dtype),
            m=jnp.zeros((batch_size, num_heads), dtype),
        )


def accumulation_dtype(*arrays: Array) -> jnp.dtype:
    """float32, or float64 if any input is: the dtype of gates, stabiliser, states and sums."""
    wide = any(a.dtype == jnp.float64 for a in arrays)
    return jnp.dtype(jnp.float64 if wide else jnp.float32)


def max_exp_argument(dtype: jnp.dtype) -> float:
    """The clamp of exp(-m) in the normaliser: it and its derivative stay finite when m is very
    negative (then h ≈ 0 either way: the clamped normaliser is still ~1e19 in float32)."""
    return 0.5 * math.log(float(jnp.finfo(dtype).max))


def _normalise(num, den, m, eps):
    lower = jnp.exp(jnp.minimum(-m, max_exp_argument(m.dtype)))
    return num / (jnp.maximum(jnp.abs(den), lower) + eps)[..., None]


def validate_and_cast_inputs(
    queries: Array, keys: Array, values: Array, igate_preact: Array, fgate_preact: Array
) -> tuple[Array, Array, Array, Float[Array, "B NH S"], Float[Array, "B NH S"]]:
    """Validate shapes and dtypes (the arguments are untyped here: this is the check that names
    a wrong one in a ValueError, with or without a type checker); return (q, k, v, ĩ, f̄ = logσ(f̃)) in the accumulation dtype,
    gates as (B, NH, S). Non-finite values pass through (`sanitize_inputs_and_state` handles
    them)."""
    igate, fgate = check_inputs(queries, keys, values, igate_preact, fgate_preact)
    acc = accumulation_dtype(queries, keys, values, igate, fgate)
    q, k, v = (x.astype(acc) for x in (queries, keys, values))
    return q, k, v, igate.astype(acc), log_forget(fgate.astype(acc))


_Inputs = tuple[Array, Array, Array, Array, Array]


@overload
def sanitize_inputs_and_state(
    q: Array, k: Array, v: Array, igate: Array, log_fgate: Array, state: mLSTMState
) -> tuple[_Inputs, mLSTMState, Bool[Array, "B NH S"], Bool[Array, "B NH"]]: ...


@overload
def sanitize_inputs_and_state(
    q: Array, k: Array, v: Array, igate: Array, log_fgate: Array, state: None
) -> tuple[_Inputs, None, Bool[Array, "B NH S"], Bool[Array, "B NH"]]: ...


@overload
def sanitize_inputs_and_state(
    q: Array, k: Array, v: Array, igate: Array, log_fgate: Array, state: mLSTMState | None
) -> tuple[_Inputs, mLSTMState | None, Bool[Array, "B NH S"], Bool[Array, "B NH"]]: ...


def sanitize_inputs_and_state(
    q: Array, k: Array, v: Array, igate: Array, log_fgate: Array, state: mLSTMState | None
) -> tuple[_Inputs, mLSTMState | None, Bool[Array, "B NH S"], Bool[Array, "B NH"]]:
    """The inputs (and state) with invalid values replaced, and where NaN is to be set afterwards:
    (inputs, state, poisoned outputs (B, NH, S), poisoned final states (B, NH))."""
    bad_query, bad_write = bad_query_and_write(q, k, v, igate, log_fgate)
    if state is None:
        bad_state = jnp.zeros(q.shape[:2], bool)
    else:
        state, bad_state = sanitize_state(state)
    rows, final = poisoned_rows(bad_query, bad_write, bad_state)
    return sanitize(q, k, v, igate, log_fgate), state, rows, final


_Run = Callable[[_Inputs, mLSTMState | None, bool], tuple[Array, mLSTMState | None]]


def run_fast_or_careful(
    run: _Run, inputs: _Inputs, state: mLSTMState | None, *, fast_path: bool = True
) -> tuple[Array, mLSTMState | None]:
    """`run(inputs, state, careful)` -> (h (B, NH, S, DHV), final state or None) on the fast or the
    careful path.

    Careful: invalid values replaced, `run(..., careful=True)` (the reset count), NaN added where they reach (`nonfinite`). Fast: `run(..., careful=False)` on the
    inputs as they are (no replacement, detection, NaN add-back or reset count; the caller's
    padding is added inside `run`, after the predicate). The causal masks stay selections on both
    paths: a product lets XLA fuse the mask into the matrix products and round differently (1e-6
    relative), and the paths are to agree exactly. The choice is a `lax.cond` on one
    scalar, `nonfinite.all_finite` of every input and the state: a reduction over the whole call,
    so it stays a `cond` under `vmap` of a caller unless the predicate is itself batched (then both
    paths run, as a select).

    Under differentiation (`jax.custom_jvp`: grad, jvp, linearize) the careful path alone runs,
    with the gradient of today's careful computation: a `cond` would have to hand every one of the
    path's residuals (the L×L matrices of every chunk) across its boundary, which cost more than
    the checks save (chunkwise S=4096 forward+backward: +17% bytes accessed, ~10% slower). Both
    paths give the same outputs and states on finite inputs (tests/cell/test_fast_path.py);
    `fast_path=False` forces the careful path. `run` must not close over traced values (a
    `custom_jvp` function cannot): pass them in `inputs` or `state`.
    """

    careful = functools.partial(run_careful, run)
    if not fast_path:
        return careful(inputs, state)

    @jax.custom_jvp
    def fast_or_careful(inputs: _Inputs, state: mLSTMState | None):
        ok = all_finite(*inputs, *jax.tree.leaves(state))
        return jax.lax.cond(ok, lambda i, s: run(i, s, False), careful, inputs, state)

    @fast_or_careful.defjvp
    def _differentiated(primals, tangents):
        return jax.jvp(careful, primals, tangents)

    return fast_or_careful(inputs, state)


def run_careful(run: _Run, inputs: _Inputs, state: mLSTMState | None):
    """The careful path of `run_fast_or_careful`: invalid values replaced, run, NaN added back."""
    clean, state, rows, final = sanitize_inputs_and_state(*inputs, state)
    h, state = run(clean, state, True)
    return poison(h, rows), None if state is None else poison_state(state, final)


def _two_sum(a, b):
    """a + b = s + e exactly (Knuth); e is the rounding error of s."""
    s = a + b
    b_virtual = s - a
    e = (a - (s - b_virtual)) + (b - b_virtual)
    return s, e


def _double_cumsum(x: Float[Array, "*batch L"]) -> tuple[Array, Array]:
    """Cumulative sum along the last axis as an unevaluated pair hi + lo (about twice the precision).

    An associative scan of double-word additions: O(L log L) work, log depth, any dtype.
    """

    def add(a, b):
        s, e = _two_sum(a[0], b[0])
        e = e + (a[1] + b[1])
        hi = s + e
        return hi, e - (hi - s)

    return jax.lax.associative_scan(add, (x, jnp.zeros_like(x)), axis=x.ndim - 1)


def running_log_decay_sums(
    log_fgate: Float[Array, "*batch L"], *, careful: bool = True
) -> tuple[Array, Array, Array | None]:
    """Running sums of f̄ for pairwise log decays: (hi, lo) = Σ_{u≤s} f̄_u in double-word form with the
    -inf terms left out (they would make it NaN), and `resets` = -2^100 · #{u ≤ s: f̄_u = -inf}
    (`nonfinite.RESET_LOG_DECAY`); `careful=False` (no f̄ is -inf: the fast path) gives no
    `resets` (None) and leaves nothing out.

    The count is an associative scan, not `cumsum`: XLA fuses a cumsum's reduce-window into the L×L
    loops that use it, which made the whole chunkwise forward+backward ~15% slower on CPU.
    """
    if not careful:
        return (*_double_cumsum(log_fgate), None)
    cleared = log_fgate == -jnp.inf
    hi, lo = _double_cumsum(jnp.where(cleared, 0.0, log_fgate))
    count = jax.lax.associative_scan(jnp.add, cleared.astype(hi.dtype), axis=hi.ndim - 1)
    return hi, lo, count * RESET_LOG_DECAY


def _segment_log_decay(
    log_fgate: Float[Array, "*batch L"], careful: bool
) -> Float[Array, "*batch L L"]:
    """logF[s, t] = Σ_{t<u≤s} f̄_u for t < s, 0 on and above the diagonal; each f̄_u = -inf counts as
    -2^100 (`nonfinite.RESET_LOG_DECAY`).

    A plain difference of running sums F_s - F_t has an absolute error of eps·|F_s|, which is large
    once |F| grows (strongly negative forget gates, long sequences). Here F is carried in double-word
    precision, so the difference is accurate relative to logF itself. The diagonal is exactly 0 and
    takes no part in the gradient: its cotangent would otherwise enter twice with opposite signs and
    cancel in float32. The reset term is exact: a difference of equal counts is exactly 0 (the fast
    path, `careful=False`, has none).
    """
    hi, lo, resets = running_log_decay_sums(log_fgate, careful=careful)
    diff = (hi[..., :, None] - hi[..., None, :]) + (lo[..., :, None] - lo[..., None, :])
    if resets is not None:
        diff = diff + (resets[..., :, None] - resets[..., None, :])
    length = log_fgate.shape[-1]
    return jnp.where(jnp.tri(length, length, k=-1, dtype=bool), diff, 0.0)


def parallel_stabilized_simple(
    queries: Float[Array, "B NH S DHQK"],
    keys: Float[Array, "B NH S DHQK"],
    values: Float[Array, "B NH S DHV"],
    igate_preact: GatePreact,
    fgate_preact: GatePreact,
    lower_triangular_matrix: Bool[Array, "SL SL"] | None = None,
    stabilize_rowwise: bool = True,
    eps: float = 1e-6,
    qkv_dtype=None,
    gate_dtype=None,
    fast_path: bool = True,
) -> Float[Array, "B NH S DHV"]:
    """The mLSTM cell in parallel form, stabilised by the row maximum of the log gate matrix.

    `lower_triangular_matrix` (S', S') with S' ≥ S is an optional causal mask (the top-left S×S block is
    used); `stabilize_rowwise=False` subtracts one maximum per (batch, head) instead of per row.
    `qkv_dtype` / `gate_dtype` cast the inputs first. Returns (B, NH, S, DHV) in the qkv dtype.
    Memory is O(S²) per head. `fast_path=False` forces the careful path (`run_fast_or_careful`).
    """
    if qkv_dtype is not None:
        queries, keys, values = (x.astype(qkv_dtype) for x in (queries, keys, values))
    if gate_dtype is not None:
        igate_preact, fgate_preact = (
            igate_preact.astype(gate_dtype),
            fgate_preact.astype(gate_dtype),
        )
    out_dtype = queries.dtype
    q, k, v, igate, log_fgate = validate_and_cast_inputs(
        queries, keys, values, igate_preact, fgate_preact
    )
    batch, heads, seq_len, dhqk = q.shape
    if lower_triangular_matrix is not None and lower_triangular_matrix.shape[0] < seq_len:
        raise ValueError(
            f"lower_triangular_matrix is {lower_triangular_matrix.shape} but the sequence "
            f"length S is {seq_len}"
        )
    if seq_len == 0:
        return jnp.zeros((batch, heads, 0, v.shape[-1]), out_dtype)
    # A constant (NumPy), not a traced value: `run` may not close over a tracer (`custom_jvp`). A
    # traced mask of the caller's runs the careful path only.
    if lower_triangular_matrix is None:
        causal = np.tri(seq_len, seq_len, dtype=bool)
    else:
        causal = lower_triangular_matrix[:seq_len, :seq_len].astype(bool)
        try:
            causal = np.asarray(causal)
        except jax.errors.TracerArrayConversionError:
            fast_path = False

    def run(inputs: _Inputs, _: mLSTMState | None, careful: bool) -> tuple[Array, None]:
        q, k, v, igate, log_fgate = inputs
        seg = _segment_log_decay(log_fgate, careful)
        log_d = jnp.where(causal, seg + igate[..., None, :], -jnp.inf)
        if stabilize_rowwise:
            m = jnp.max(log_d, axis=-1)
        else:
            m = jnp.broadcast_to(jnp.max(log_d, axis=(-2, -1))[..., None], log_d.shape[:-1])
        decay = jnp.exp(log_d - finite_stabiliser(m)[..., None])
        qk = jnp.einsum("bhsd,bhtd->bhst", q, k / math.sqrt(dhqk))
        scores = jnp.where(causal, qk * decay, 0.0)  # selection: inf·0 above the diagonal is not 0
        num = jnp.einsum("bhst,bhtv->bhsv", scores, v)
        return _normalise(num, jnp.sum(scores, axis=-1), m, eps), None

    inputs = (q, k, v, igate, log_fgate)
    h, _ = run_fast_or_careful(run, inputs, None, fast_path=fast_path)
    return h.astype(out_dtype)


def _step(state: mLSTMState, q, k, v, igate, log_fgate, eps: float):
    """(C, n, m) ← one token; all arguments already in the accumulation dtype, f̄ = logσ(f̃).

    The read-out is taken from the previous state plus the new token's own term, not from the updated
    state: then the gradient's cancellation between numerator and normaliser happens on the scalar
    q·k (as in the parallel form), which keeps float32 gradients accurate when one token dominates.
    """
    m_new = jnp.maximum(log_fgate + state.m, igate)
    m_sub = finite_stabiliser(m_new)  # m_new = -inf: nothing in the memory, nothing written
    f_scale = jnp.exp(log_fgate + state.m - m_sub)
    i_scale = jnp.exp(igate - m_sub)
    c_new = f_scale[..., None, None] * state.c + i_scale[..., None, None] * (
        k[..., :, None] * v[..., None, :]
    )
    n_new = f_scale[..., None] * state.n + i_scale[..., None] * k

    q_scaled = q / math.sqrt(q.shape[-1])
    qk = i_scale * jnp.einsum("bhd,bhd->bh", q_scaled, k)
    num = f_scale[..., None] * jnp.einsum("bhd,bhdv->bhv", q_scaled, state.c) + qk[..., None] * v
    den = f_scale * jnp.einsum("bhd,bhd->bh", q_scaled, state.n) + qk
    return _normalise(num, den, m_new, eps), mLSTMState(c=c_new, n=n_new, m=m_new)


def mlstm_recurrent_step(
    state: mLSTMState,
    q: Float[Array, "B NH DHQK"],
    k: Float[Array, "B NH DHQK"],
    v: Float[Array, "B NH DHV"],
    igate_preact: Float[Array, "B NH"],
    fgate_preact: Float[Array, "B NH"],
    *,
    eps: float = 1e-6,
    fast_path: bool = True,
) -> tuple[Float[Array, "B NH DHV"], mLSTMState]:
    """One time step: update (C, n, m) with (k, v, gates), then read out with q.

    Used for generation: O(1) time and memory per token. The state is kept in float32 (or wider).
    Edge cases as in the other forms, for one token (`one_token`: the checks folded into the step;
    `fast_path=False` forces the careful path): a bad q makes h NaN; a bad k, v or gate makes h
    and the new state NaN; a state with invalid entries makes both NaN."""
    check_step(q, k, v, igate_preact, fgate_preact)
    expected = (*q.shape, v.shape[-1])
    if state.c.shape != expected:
        raise ValueError(
            f"state.c has shape {state.c.shape} but q and v give (B, NH, DHQK, DHV) = {expected}"
        )
    out_dtype = q.dtype
    acc = accumulation_dtype(state.c, q, k, v, igate_preact, fgate_preact)
    state = jax.tree.map(lambda x: x.astype(acc), state)
    q, k, v = (x.astype(acc) for x in (q, k, v))
    inputs = (q, k, v, igate_preact.astype(acc), log_forget(fgate_preact.astype(acc)))
    h, state = step_with_nan_added(_step, inputs, state, eps=eps, fast_path=fast_path)
    return h.astype(out_dtype), state


def initial_state_or_zeros(
    initial_state: mLSTMState | None, batch: int, heads: int, dhqk: int, dhv: int, acc: jnp.dtype
) -> mLSTMState:
    """`initial_state` (shape-checked) in the accumulation dtype `acc`, or a zero state."""
    if initial_state is None:
        return mLSTMState.zeros(batch, heads, dhqk, dhv, acc)
    expected = (batch, heads, dhqk, dhv)
    if initial_state.c.shape != expected:
        raise ValueError(
            f"initial_state.c has shape {initial_state.c.shape}; "
            f"expected (B, NH, DHQK, DHV) = {expected}"
        )
    return jax.tree.map(lambda x: x.astype(acc), initial_state)


def mlstm_recurrent(
    queries: Float[Array, "B NH S DHQK"],
    keys: Float[Array, "B NH S DHQK"],
    values: Float[Array, "B NH S DHV"],
    igate_preact: GatePreact,
    fgate_preact: GatePreact,
    *,
    initial_state: mLSTMState | None = None,
    eps: float = 1e-6,
    fast_path: bool = True,
) -> tuple[Float[Array, "B NH S DHV"], mLSTMState]:
    """The step form scanned over the sequence (`lax.scan`). Returns h and the final state.
    `fast_path=False` forces the careful path (`run_fast_or_careful`)."""
    out_dtype = queries.dtype
    q, k, v, igate, log_fgate = validate_and_cast_inputs(
        queries, keys, values, igate_preact, fgate_preact
    )
    batch, heads, seq_len, dhqk = q.shape
    state = initial_state_or_zeros(initial_state, batch, heads, dhqk, v.shape[-1], q.dtype)
    if seq_len == 0:
        h = jnp.zeros((batch, heads, 0, v.shape[-1]), out_dtype)
        return h, state

    def body(carry, xs):
        h_t, carry = _step(carry, *xs, eps=eps)
        return carry, h_t

    def run(inputs: _Inputs, state: mLSTMState | None, _: bool) -> tuple[Array, mLSTMState]:
        time_major = tuple(jnp.moveaxis(x, 2, 0) for x in inputs)
        final, h = jax.lax.scan(body, state, time_major)
        assert final is not None
        return jnp.moveaxis(h, 0, 2), final

    inputs = (q, k, v, igate, log_fgate)
    h, final = run_fast_or_careful(run, inputs, state, fast_path=fast_path)
    assert final is not None
    return h.astype(out_dtype), final


def pad_time_axis(x: Array, length: int, value: float) -> Array:
    """Pad axis 2 (time) of `x` at the end up to `length` with `value`."""
    pad = [(0, 0)] * x.ndim
    pad[2] = (0, length - x.shape[2])
    return jnp.pad(x, pad, constant_values=value)


def mlstm_chunkwise(
    queries: Float[Array, "B NH S DHQK"],
    keys: Float[Array, "B NH S DHQK"],
    values: Float[Array, "B NH S DHV"],
    igate_preact: GatePreact,
    fgate_preact: GatePreact,
    *,
    chunk_size: IntLike = 64,
    initial_state: mLSTMState | None = None,
    eps: float = 1e-6,
    fast_path: bool = True,
) -> tuple[Float[Array, "B NH S DHV"], mLSTMState]:
    """The chunkwise form: L×L matrices inside chunks of `chunk_size`, a (C, n, m) state between them.

    Memory is linear in S in the forward pass and under autodiff (the carried states are
    NC·DHQK·DHV, the within-chunk matrices NC·L²). Any S works: the sequence is padded internally
    with tokens that leave the state unchanged (f̄ = 0, no input), so the returned final state is
    exactly that after the last real token. Returns h and the final state. The fast path has a
    written-out backward (`chunkwise_vjp`; no jvp); `fast_path=False` forces the careful path
    (the padding's ĩ = -inf is added after the predicate, so it does not count)."""
    chunk_size = check_chunk_size(chunk_size)
    out_dtype = queries.dtype
    q, k, v, igate, log_fgate = validate_and_cast_inputs(
        queries, keys, values, igate_preact, fgate_preact
    )
    batch, heads, seq_len, dhqk = q.shape
    dhv = v.shape[-1]
    state = initial_state_or_zeros(initial_state, batch, heads, dhqk, dhv, q.dtype)
    if seq_len == 0:
        h = jnp.zeros((batch, heads, 0, dhv), out_dtype)
        return h, state
    from .chunkwise_vjp import chunkwise_fast_or_careful  # (it builds on this module)

    inputs, chunk = (q, k, v, igate, log_fgate), min(chunk_size, seq_len)
    h, final = chunkwise_fast_or_careful(inputs, state, chunk=chunk, eps=eps, fast_path=fast_path)
    assert final is not None
    return h.astype(out_dtype), final


def chunkwise_run(
    inputs: _Inputs, state: mLSTMState | None, careful: bool, *, chunk: int, eps: float
) -> tuple[Array, mLSTMState, tuple[Array, ...]]:
    """`mlstm_chunkwise` on inputs in the accumulation dtype: h (B, NH, S, DHV), the final state,
    and the written-out backward's residuals (`chunkwise_vjp`): the (C, n, m) entering every chunk
    (B, NH, NC, ...), each chunk's contributions Σ w k vᵀ, Σ w k (NC, B, NH, ...), the scores."""
    assert state is not None
    q, k, v, igate, log_fgate = inputs
    batch, heads, seq_len, dhqk = q.shape
    dhv = v.shape[-1]
    num_chunks = -(-seq_len // chunk)
    padded = num_chunks * chunk
    if padded != seq_len:
        q, k, v = (pad_time_axis(x, padded, 0.0) for x in (q, k, v))
        igate = pad_time_axis(igate, padded, NO_INPUT_PREACT)
        log_fgate = pad_time_axis(log_fgate, padded, 0.0)

    def chunked(x):  # (B, NH, S, ...) -> (B, NH, NC, L, ...)
        return x.reshape(batch, heads, num_chunks, chunk, *x.shape[3:])

    q, k, v, igate, log_fgate = map(chunked, (q, k, v, igate, log_fgate))
    q = q / math.sqrt(dhqk)

    # Log decays inside each chunk, each a sum of its own terms.
    to_here = jnp.cumsum(log_fgate, axis=-1)  # b_s = Σ_{u≤s} f̄_u
    after = jnp.concatenate(  # Σ_{u>t} f̄_u
        [
            jax.lax.cumsum(log_fgate, axis=3, reverse=True)[..., 1:],
            jnp.zeros_like(log_fgate[..., :1]),
        ],
        axis=-1,
    )
    total = to_here[..., -1]  # g_k, (B, NH, NC)
    log_weight = after + igate  # a_t: weight of token t in the end-of-chunk state
    log_weight_max = jnp.max(log_weight, axis=-1)
    # Each chunk's contribution to the state, stabilised by its own maximum; rescaled in the scan.
    weight = jnp.exp(log_weight - finite_stabiliser(log_weight_max)[..., None])
    chunk_kv = jnp.einsum("bhcl,bhcld,bhclv->bhcdv", weight, k, v)
    chunk_k = jnp.einsum("bhcl,bhcld->bhcd", weight, k)

    def inter_chunk(carry: mLSTMState, xs):
        g, a_max, kv, kk = xs
        m_new = jnp.maximum(g + carry.m, a_max)
        m_sub = finite_stabiliser(m_new)
        decay = jnp.exp(g + carry.m - m_sub)
        scale = jnp.exp(a_max - m_sub)
        new = mLSTMState(
            c=decay[..., None, None] * carry.c + scale[..., None, None] * kv,
            n=decay[..., None] * carry.n + scale[..., None] * kk,
            m=m_new,
        )
        return new, carry

    chunk_major = tuple(jnp.moveaxis(x, 2, 0) for x in (total, log_weight_max, chunk_kv, chunk_k))
    final, before = jax.lax.scan(inter_chunk, state, chunk_major)
    c_prev, n_prev, m_prev = (jnp.moveaxis(x, 0, 2) for x in (before.c, before.n, before.m))

    # Within-chunk (causal L×L) part combined with the state entering the chunk.
    causal = jnp.tri(chunk, chunk, dtype=bool)
    log_d = jnp.where(
        causal, _segment_log_decay(log_fgate, careful) + igate[..., None, :], -jnp.inf
    )
    m_from_state = to_here + m_prev[..., None]
    m = jnp.maximum(m_from_state, jnp.max(log_d, axis=-1))
    m_sub = finite_stabiliser(m)
    qk = jnp.einsum("bhcsd,bhctd->bhcst", q, k)
    scores = jnp.where(causal, qk * jnp.exp(log_d - m_sub[..., None]), 0.0)  # selection
    state_scale = jnp.exp(m_from_state - m_sub)
    num = state_scale[..., None] * jnp.einsum("bhcsd,bhcdv->bhcsv", q, c_prev) + jnp.einsum(
        "bhcst,bhctv->bhcsv", scores, v
    )
    den = state_scale * jnp.einsum("bhcsd,bhcd->bhcs", q, n_prev) + jnp.sum(scores, axis=-1)
    h = _normalise(num, den, m, eps).reshape(batch, heads, padded, dhv)[:, :, :seq_len]
    return h, final, (c_prev, n_prev, m_prev, *chunk_major[2:], scores)
