"""The chunkwise form's gradient on the fast path, written out (docs/architecture.md, "Edge cases, the
fast path").

`chunkwise_fast_or_careful` runs `forms.chunkwise_run` as `forms.run_fast_or_careful` does (one
finiteness predicate, a `lax.cond` between the fast and the careful path), but is a `jax.custom_vjp`:
its forward keeps the inputs, the initial state, h, the (C, n, m) entering every chunk, each chunk's
contributions (Σ w k vᵀ, Σ w k) to the state and its causal score matrix (q kᵀ) ⊙ decay: arrays
the forward forms anyway, cheap to pass out of the `cond` (one L×L matrix per chunk, not the
autodiff residuals' several). Its backward recomputes the rest of each chunk's L×L work (the log
decays and their exponentials; `chunk_math`, vmapped over (batch·head, chunk)) and carries the
state cotangent back through the chunks with a reverse `lax.scan`. Keeping the scores and the
contributions spares two of the backward's matrix products per chunk (S=4096: fast-path backward
1437 → 1164 MFLOP, 419 → 347 MB). That is the true gradient (through the stabiliser and the
normaliser), the same as autodiff of the forward up to rounding (tests/cell/test_chunkwise_vjp.py).
Inputs with a non-finite value take the careful path, and its backward is autodiff of it
(`jax.vjp`, recomputing its forward): that is paid only when the predicate is false.

Forward-mode (jvp, linearize) is not defined for a `custom_vjp`: it needs `fast_path=False`.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from .chunk_math import (
    chunk_outputs_backward,
    chunk_update_state_backward,
    chunk_update_token_backward,
    gate_sums,
)
from .forms import (
    NO_INPUT_PREACT,
    chunkwise_run,
    mLSTMState,
    pad_time_axis,
    run_careful,
    run_fast_or_careful,
)
from .nonfinite import all_finite, finite_stabiliser


_Inputs = tuple[Array, Array, Array, Array, Array]


def _run(chunk: int, eps: float, inputs: _Inputs, state: mLSTMState | None, careful: bool):
    """`forms.chunkwise_run` without the entering states: h and the final state."""
    h, final, _ = chunkwise_run(inputs, state, careful, chunk=chunk, eps=eps)
    return h, final


def chunkwise_fast_or_careful(
    inputs: _Inputs, state: mLSTMState, *, chunk: int, eps: float, fast_path: bool = True
) -> tuple[Float[Array, "B NH S DHV"], mLSTMState]:
    """h (B, NH, S, DHV) and the final state of `forms.chunkwise_run` on `inputs` = (q, k, v, ĩ, f̄)
    in the accumulation dtype; `fast_path=False` forces the careful path (and plain autodiff)."""
    if fast_path:
        return _differentiable(chunk, eps, inputs, state)
    h, final = run_careful(functools.partial(_run, chunk, eps), inputs, state)
    assert final is not None
    return h, final


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _differentiable(chunk: int, eps: float, inputs: _Inputs, state: mLSTMState):
    return run_fast_or_careful(functools.partial(_run, chunk, eps), inputs, state)


def _forward(chunk: int, eps: float, inputs: _Inputs, state: mLSTMState):
    ok = all_finite(*inputs, *jax.tree.leaves(state))

    def fast(inputs, state):
        h, final, entering = chunkwise_run(inputs, state, False, chunk=chunk, eps=eps)
        return (h, final), (h, *entering)

    def careful(inputs, state):
        out = run_careful(functools.partial(_run, chunk, eps), inputs, state)
        kept = jax.eval_shape(fast, inputs, state)[1]
        # Zeros like h: inside a shard_map they vary over the same manual axes as the fast branch's.
        return out, jax.tree.map(lambda s: jnp.zeros_like(out[0], s.dtype, shape=s.shape), kept)

    out, kept = jax.lax.cond(ok, fast, careful, inputs, state)
    return out, (ok, inputs, state, kept)


def _backward(chunk: int, eps: float, residuals, cotangents):
    ok, inputs, state, kept = residuals

    def careful(inputs, state, kept, cotangents):
        del kept
        run = functools.partial(run_careful, functools.partial(_run, chunk, eps))
        return jax.vjp(run, inputs, state)[1](cotangents)

    written_out = functools.partial(_fast_backward, chunk, eps)
    return jax.lax.cond(ok, written_out, careful, inputs, state, kept, cotangents)


_differentiable.defvjp(_forward, _backward)


def _prepare(chunk: int, *inputs: Array):
    """The fast path's per-chunk operands, as `forms.chunkwise_run` forms them (differentiated by
    `jax.vjp`: O(S) work): q/√DHQK, k, v, ĩ (B·NH, NC, L, ·), the in-chunk running sum b of f̄,
    its double-word (hi, lo), the log weights a, their maximum and the chunk totals g."""
    batch, heads, seq_len, dhqk = inputs[0].shape
    num_chunks = -(-seq_len // chunk)
    values = (0.0, 0.0, 0.0, NO_INPUT_PREACT, 0.0)  # padded tokens: no write, no decay
    padded = (
        pad_time_axis(x, num_chunks * chunk, val) for x, val in zip(inputs, values, strict=True)
    )
    q, k, v, igate, log_fgate = (
        x.reshape(batch * heads, num_chunks, chunk, *x.shape[3:]) for x in padded
    )
    to_here, log_weight, hi, lo, _ = gate_sums(igate, log_fgate, careful=False)
    amax = jnp.max(log_weight, axis=-1)
    return q / math.sqrt(dhqk), k, v, igate, to_here, hi, lo, log_weight, amax, to_here[..., -1]


def _fast_backward(chunk: int, eps: float, inputs: _Inputs, state, kept, cotangents):
    """The written-out backward of the fast path: (d inputs, d initial state)."""
    dh, dfinal = cotangents
    batch, heads = inputs[0].shape[:2]
    prepared, prepare_vjp = jax.vjp(functools.partial(_prepare, chunk), *inputs)
    q, k, v, igate, to_here, hi, lo, log_weight, amax, total = prepared
    bh, num_chunks = q.shape[:2]

    def flat(x):  # (B, NH, ...) -> (B·NH, ...)
        return x.reshape(bh, *x.shape[2:])

    h, *entering, kv, kk, scores = kept  # the forward's h; padded tokens get h = 0 (dh = 0)
    c_in, n_in, m_in, scores = (flat(x) for x in (*entering, scores))
    h, dh = (pad_time_axis(x, num_chunks * chunk, 0.0) for x in (h, dh))
    h, dh = (x.reshape(bh, num_chunks, chunk, -1) for x in (h, dh))

    def outputs_backward(q, k, v, ig, b, hi, lo, c, n, m, dh, h, scores):
        args = (q, k, v, ig, b, hi, lo, None, c, n, m, dh, eps)
        return chunk_outputs_backward(*args, h=h, scores=scores)

    per_chunk = jax.vmap(jax.vmap(outputs_backward))
    dq, dk, dv, dig, db, dhi, dc_out, dn_out, dm_out = per_chunk(
        q, k, v, igate, to_here, hi, lo, c_in, n_in, m_in, dh, h, scores
    )

    # The states' backward: the O(DK·DV) recursion in a reverse scan, the token gradients batched.
    w = jnp.exp(log_weight - finite_stabiliser(amax)[..., None])
    state_backward = jax.vmap(chunk_update_state_backward)

    def reverse_step(carry, xs):
        *operands, dc_out, dn_out, dm_out = xs
        dc, dn, dm, damax, beta = state_backward(*operands, *carry)
        return (dc + dc_out, dn + dn_out, dm + dm_out), (carry[0], carry[1], dm, damax, beta)

    kv, kk = (x.reshape(num_chunks, bh, *x.shape[3:]) for x in (kv, kk))  # kept chunk-major
    chunk_major = (kv, kk) + tuple(
        jnp.moveaxis(x, 1, 0) for x in (amax, total, c_in, n_in, m_in, dc_out, dn_out, dm_out)
    )
    carry = tuple(flat(x) for x in (dfinal.c, dfinal.n, dfinal.m))
    dstate, per_chunk = jax.lax.scan(reverse_step, carry, chunk_major, reverse=True)
    dc_new, dn_new, dg, damax, beta = (jnp.moveaxis(x, 0, 1) for x in per_chunk)
    token_backward = jax.vmap(jax.vmap(chunk_update_token_backward))
    dk_s, dv_s, da = token_backward(k, v, w, beta, dc_new, dn_new)
    damax = damax - jnp.sum(da, axis=-1)
    dinputs = prepare_vjp((dq, dk + dk_s, dv + dv_s, dig, db, dhi, dhi, da, damax, dg))
    dc0, dn0, dm0 = (x.reshape(batch, heads, *x.shape[1:]) for x in dstate)
    return tuple(dinputs), mLSTMState(c=dc0, n=dn0, m=dm0)
