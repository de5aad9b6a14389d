"""The chunkwise mLSTM as Pallas kernels (docs/architecture.md, "Pallas kernel").

`mlstm_chunkwise_pallas` computes exactly what `forms.mlstm_chunkwise` computes (same stabiliser,
same eps placement, same final state) with four kernels joined by `jax.custom_vjp`:

- states (forward): one program per (batch, head) walks the chunks in order and writes the state
  (C, n, m) entering every chunk, plus the final state. Work O(S·DHQK·DHV), sequential over chunks.
- outputs (forward): one program per (batch, head, chunk): the causal L×L matrix of the chunk plus the
  read-out of the entering state. Parallel over chunks.
- outputs (backward): per (batch, head, chunk) again; recomputes the chunk's L×L matrices from the
  saved chunk states and returns the token gradients and the cotangent of the entering state.
- states (backward): per (batch, head), chunks in reverse; carries the state cotangent back and adds the
  token gradients of the state updates.

The only residuals kept between forward and backward are the inputs and the chunk states
(NC·DHQK·DHV per head), so memory is linear in S with a small constant. The backward is the true
gradient of the forward — the same as autodiff of `mlstm_chunkwise`, including the paths through the
stabiliser `m` and the normaliser — not the convention of treating them as constants. Gate
pre-processing (log-sigmoid, in-chunk cumulative sums, padding) is plain JAX around the kernels and is
differentiated by JAX.

Edge cases are those of `forms` (docs/architecture.md, "Edge cases"), exactly: invalid tokens (NaN,
inf) are replaced before the kernels and NaN is set after them where they reach (`nonfinite`);
S = 0 and B·NH = 0 return without a kernel call; a forget gate at -inf (a cleared memory) enters
the pairwise log decays as the count `resets` (`forms.running_log_decay_sums`), and every
stabiliser is floored where it is subtracted (`nonfinite.finite_stabiliser`). The causal mask
inside a chunk is a selection (`where`), not a product.

Kernels are written for the Triton lowering (`pl.pallas_call` on GPU): tiles are powers of two of at
least 16, so the chunk length is rounded up to one (the result does not depend on the chunk length
beyond rounding) and DHQK, DHV are zero-padded to one. A program lowered for any other platform runs
them in Pallas interpret mode (slow; for tests); the choice is made at lowering time.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton
from jaxtyping import Array, Float

from .checks import IntLike, check_chunk_size
from .chunk_math import (
    chunk_outputs,
    chunk_outputs_backward,
    chunk_update,
    chunk_update_backward,
    gate_sums,
)
from .forms import (
    NO_INPUT_PREACT,
    GatePreact,
    initial_state_or_zeros,
    mLSTMState,
    pad_time_axis,
    run_fast_or_careful,
    validate_and_cast_inputs,
)


# Smallest tile edge of a Triton `dot`.
_MIN_TILE = 16


@dataclasses.dataclass(frozen=True)
class _KernelConfig:
    """Static settings shared by the four kernels (hashable: a `custom_vjp` non-diff argument)."""

    eps: float
    interpret: bool | None  # None: chosen per platform when the program is lowered (`_call`)
    num_warps: int
    num_stages: int


# Kernels


def _states_kernel(
    k_ref, v_ref, a_ref, amax_ref, g_ref, c0_ref, n0_ref, m0_ref, c_ref, n_ref, m_ref
):
    """One (batch, head): c_ref[j], n_ref[j], m_ref[j] = state entering chunk j (j = NC: final)."""
    num_chunks = k_ref.shape[0]

    def body(j, carry):
        c, n, m = carry
        c_ref[j] = c
        n_ref[j] = n
        m_ref[j] = m
        return chunk_update(k_ref[j], v_ref[j], a_ref[j], amax_ref[j], g_ref[j], c, n, m)

    c, n, m = jax.lax.fori_loop(0, num_chunks, body, (c0_ref[...], n0_ref[...], m0_ref[...]))
    c_ref[num_chunks] = c
    n_ref[num_chunks] = n
    m_ref[num_chunks] = m


def _outputs_kernel(*refs, eps, with_resets=True):
    """One (batch, head, chunk): h of the chunk's L tokens. refs: the inputs of `chunk_outputs`
    (without `resets` when not `with_resets`: the fast path), h."""
    *in_refs, h_ref = refs
    values = [ref[...] for ref in in_refs]
    if not with_resets:
        values.insert(7, None)
    h_ref[...] = chunk_outputs(*values, eps=eps)["h"]


def _outputs_backward_kernel(*refs, eps):
    """One (batch, head, chunk): gradients through the chunk's outputs, its L×L matrices recomputed.

    refs: the inputs of `chunk_outputs_backward`, then one output per gradient it returns.
    """
    in_refs, out_refs = refs[:12], refs[12:]
    grads = chunk_outputs_backward(*(ref[...] for ref in in_refs), eps=eps)
    for ref, value in zip(out_refs, grads, strict=True):
        ref[...] = value


def _states_backward_kernel(
    k_ref,
    v_ref,
    a_ref,
    amax_ref,
    g_ref,
    c_ref,
    n_ref,
    m_ref,
    dc_out_ref,
    dn_out_ref,
    dm_out_ref,
    dc_fin_ref,
    dn_fin_ref,
    dm_fin_ref,
    dk_ref,
    dv_ref,
    da_ref,
    damax_ref,
    dg_ref,
    dc0_ref,
    dn0_ref,
    dm0_ref,
):
    """One (batch, head), chunks in reverse: carry the state cotangent back through the updates.

    d*_out_ref[j] is the cotangent of the state entering chunk j from the outputs of chunk j.
    """
    num_chunks = k_ref.shape[0]

    def body(step, carry):
        j = num_chunks - 1 - step
        dc, dn, dm = carry
        dk, dv, da, damax, dg, dc, dn, dm = chunk_update_backward(
            k_ref[j],
            v_ref[j],
            a_ref[j],
            amax_ref[j],
            g_ref[j],
            c_ref[j],
            n_ref[j],
            m_ref[j],
            dc,
            dn,
            dm,
        )
        dk_ref[j] = dk
        dv_ref[j] = dv
        da_ref[j] = da
        damax_ref[j] = damax
        dg_ref[j] = dg
        return dc + dc_out_ref[j], dn + dn_out_ref[j], dm + dm_out_ref[j]

    dc, dn, dm = jax.lax.fori_loop(
        0, num_chunks, body, (dc_fin_ref[...], dn_fin_ref[...], dm_fin_ref[...])
    )
    dc0_ref[...] = dc
    dn0_ref[...] = dn
    dm0_ref[...] = dm


# pallas_call wrappers. Array layout: (BH, NC, L, ·) for tokens, (BH, NC + 1, ·) for chunk states.


def _call(kernel, cfg: _KernelConfig, grid: tuple[int, ...], inputs, out_shapes, name: str):
    """`pallas_call` on grid (BH,) or (BH, NC): each program sees every array's slice at its own
    leading indices — a whole (batch, head), or one chunk (row j of the states: the entering one)."""
    lead = len(grid)

    def spec(shape):
        rest = tuple(shape[lead:])
        return pl.BlockSpec((None,) * lead + rest, lambda *idx: (*idx, *(0,) * len(rest)))

    def run(interpret: bool, *arrays):
        return pl.pallas_call(
            kernel,
            grid=grid,
            in_specs=[spec(x.shape) for x in arrays],
            out_specs=[spec(s.shape) for s in out_shapes],
            out_shape=out_shapes,
            interpret=interpret,
            compiler_params=pl_triton.CompilerParams(
                num_warps=cfg.num_warps, num_stages=cfg.num_stages
            ),
            name=name,
        )(*arrays)

    if cfg.interpret is not None:
        return run(cfg.interpret, *inputs)
    # Decided when the program is lowered, not from the host's backend: a program lowered for a
    # GPU (also an export for CUDA from a CPU host) holds the Triton kernel, one lowered for any
    # other platform the interpreted kernel (docs/architecture.md, "Platform choices at lowering
    # time").
    compiled = functools.partial(run, False)
    return jax.lax.platform_dependent(
        *inputs, cuda=compiled, rocm=compiled, default=functools.partial(run, True)
    )


def _shapes(dtype, *shapes):
    return [jax.ShapeDtypeStruct(shape, dtype) for shape in shapes]


def _states_forward(cfg: _KernelConfig, k, v, a, amax, g, c0, n0, m0):
    """States entering each chunk and the final one: (BH, NC+1, DK, DV), (BH, NC+1, DK), (BH, NC+1)."""
    bh, nc, _, dk = k.shape
    dv = v.shape[-1]
    out = _shapes(k.dtype, (bh, nc + 1, dk, dv), (bh, nc + 1, dk), (bh, nc + 1))
    inputs = (k, v, a, amax, g, c0, n0, m0)
    return _call(_states_kernel, cfg, (bh,), inputs, out, "mlstm_chunk_states_fwd")


def _outputs_forward(cfg: _KernelConfig, q, k, v, ig, b, hi, lo, resets, c_all, n_all, m_all):
    """h, (BH, NC, L, DV). `resets` None: no f̄ is -inf (the fast path)."""
    bh, nc, length, _ = q.shape
    kernel = functools.partial(_outputs_kernel, eps=cfg.eps, with_resets=resets is not None)
    inputs = (q, k, v, ig, b, hi, lo, resets, c_all, n_all, m_all)
    inputs = tuple(x for x in inputs if x is not None)
    out = _shapes(q.dtype, (bh, nc, length, v.shape[-1]))
    return _call(kernel, cfg, (bh, nc), inputs, out, "mlstm_chunk_outputs_fwd")[0]


def _outputs_backward(cfg: _KernelConfig, q, k, v, ig, b, hi, lo, resets, c_all, n_all, m_all, dh):
    """Per chunk: dq, dk, dv, d ig, d b, d hi, and the cotangent of the entering state."""
    bh, nc, length, dk = q.shape
    dv = v.shape[-1]
    kernel = functools.partial(_outputs_backward_kernel, eps=cfg.eps)
    inputs = (q, k, v, ig, b, hi, lo, resets, c_all, n_all, m_all, dh)
    token, vector = (bh, nc, length), (bh, nc)
    out = _shapes(
        q.dtype,
        (*token, dk),
        (*token, dk),
        (*token, dv),
        token,
        token,
        token,
        (*vector, dk, dv),
        (*vector, dk),
        vector,
    )
    return _call(kernel, cfg, (bh, nc), inputs, out, "mlstm_chunk_outputs_bwd")


def _states_backward(
    cfg: _KernelConfig, k, v, a, amax, g, c_all, n_all, m_all, dc_out, dn_out, dm_out, dfinal
):
    """dk, dv, da, d amax, dg from the state updates, and the cotangent of the initial state."""
    bh, nc, length, dk = k.shape
    dv = v.shape[-1]
    inputs = (k, v, a, amax, g, c_all, n_all, m_all, dc_out, dn_out, dm_out, *dfinal)
    out = _shapes(
        k.dtype,
        (bh, nc, length, dk),
        (bh, nc, length, dv),
        (bh, nc, length),
        (bh, nc),
        (bh, nc),
        (bh, dk, dv),
        (bh, dk),
        (bh,),
    )
    return _call(_states_backward_kernel, cfg, (bh,), inputs, out, "mlstm_chunk_states_bwd")


# custom_vjp core: inputs already padded, chunked and gate-preprocessed


def _core_fwd(cfg, q, k, v, ig, b, hi, lo, resets, a, amax, g, c0, n0, m0):
    """(h, final c, n, m) and the residuals: the inputs and the states entering every chunk."""
    c_all, n_all, m_all = _states_forward(cfg, k, v, a, amax, g, c0, n0, m0)
    h = _outputs_forward(cfg, q, k, v, ig, b, hi, lo, resets, c_all, n_all, m_all)
    residuals = (q, k, v, ig, b, hi, lo, resets, a, amax, g, c_all, n_all, m_all)
    return (h, c_all[:, -1], n_all[:, -1], m_all[:, -1]), residuals


def _core_bwd(cfg, residuals, cotangents):
    q, k, v, ig, b, hi, lo, resets, a, amax, g, c_all, n_all, m_all = residuals
    dh, *dfinal = cotangents
    dq, dk_out, dv_out, dig, db, dhi, dc_out, dn_out, dm_out = _outputs_backward(
        cfg, q, k, v, ig, b, hi, lo, resets, c_all, n_all, m_all, dh
    )
    dk_state, dv_state, da, damax, dg, dc0, dn0, dm0 = _states_backward(
        cfg, k, v, a, amax, g, c_all, n_all, m_all, dc_out, dn_out, dm_out, dfinal
    )
    return (
        dq,
        dk_out + dk_state,
        dv_out + dv_state,
        dig,
        db,
        dhi,
        dhi,
        None,  # resets: a count of -inf gates, no derivative
        da,
        damax,
        dg,
        dc0,
        dn0,
        dm0,
    )


def _core_impl(cfg, *arrays):
    """h and the final state; `cfg` is static (a hashable dataclass)."""
    return _core_fwd(cfg, *arrays)[0]


_core = jax.custom_vjp(_core_impl, nondiff_argnums=(0,))


_core.defvjp(_core_fwd, _core_bwd)


# Public functions


def _tile(size: int) -> int:
    """Smallest power of two ≥ max(size, 16)."""
    return max(_MIN_TILE, pl.next_power_of_2(size))


def _pad_last(x: Array, size: int) -> Array:
    if x.shape[-1] == size:
        return x
    pad = [(0, 0)] * (x.ndim - 1) + [(0, size - x.shape[-1])]
    return jnp.pad(x, pad)


def mlstm_chunkwise_pallas(
    queries: Float[Array, "B NH S DHQK"],
    keys: Float[Array, "B NH S DHQK"],
    values: Float[Array, "B NH S DHV"],
    igate_preact: GatePreact,
    fgate_preact: GatePreact,
    *,
    chunk_size: IntLike = 64,
    initial_state: mLSTMState | None = None,
    eps: float = 1e-6,
    interpret: bool | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
    fast_path: bool = True,
) -> tuple[Float[Array, "B NH S DHV"], mLSTMState]:
    """`mlstm_chunkwise` as Pallas kernels with a Pallas backward (`jax.custom_vjp`).

    Same arguments, result and gradient as `mlstm_chunkwise`; like it, computes in float32 (float64
    for float64 inputs) and returns h in the dtype of the queries. The chunk length used is
    max(16, next power of two ≥ min(chunk_size, S)) (Triton tile constraint). `interpret=None` runs
    the kernels compiled (Triton) in a program lowered for a GPU and in Pallas interpret mode in one
    lowered for any other platform, decided at lowering time (`jax.lax.platform_dependent`). `num_warps` /
    `num_stages` are Triton launch settings (GPU only). Memory: inputs plus one (C, n, m) per chunk
    are kept for the backward; the L×L matrices are recomputed there. `fast_path` as in
    `mlstm_chunkwise` (`forms.run_fast_or_careful`: the fast path has no replacement, no NaN
    added back and no reset count in the kernels).
    """
    chunk_size = check_chunk_size(chunk_size)
    cfg = _KernelConfig(
        eps=float(eps),
        interpret=None if interpret is None else bool(interpret),
        num_warps=num_warps,
        num_stages=num_stages,
    )
    out_dtype = queries.dtype
    q, k, v, igate, log_fgate = validate_and_cast_inputs(
        queries, keys, values, igate_preact, fgate_preact
    )
    batch, heads, seq_len, dhqk = q.shape
    dhv = v.shape[-1]
    state = initial_state_or_zeros(initial_state, batch, heads, dhqk, dhv, q.dtype)
    if seq_len == 0 or batch * heads == 0:  # nothing to run the kernels on
        h = jnp.zeros((batch, heads, seq_len, dhv), out_dtype)
        return h, state
    run = functools.partial(_run_kernels, cfg, chunk_size)
    h, final = run_fast_or_careful(run, (q, k, v, igate, log_fgate), state, fast_path=fast_path)
    assert final is not None
    return h.astype(out_dtype), final


def _run_kernels(
    cfg: _KernelConfig,
    chunk_size: int,
    inputs: tuple[Array, Array, Array, Array, Array],
    state: mLSTMState | None,
    careful: bool,
) -> tuple[Array, mLSTMState]:
    """`mlstm_chunkwise_pallas` on inputs in the accumulation dtype (for `run_fast_or_careful`):
    padding to whole tiles, the gate bookkeeping and the kernels; h (B, NH, S, DHV) and the final
    state."""
    assert state is not None
    q, k, v, igate, log_fgate = inputs
    batch, heads, seq_len, dhqk = q.shape
    dhv = v.shape[-1]
    length = _tile(min(chunk_size, seq_len))
    num_chunks = -(-seq_len // length)
    padded = num_chunks * length
    dk, dv = _tile(dhqk), _tile(dhv)
    if padded != seq_len:
        q, k, v = (pad_time_axis(x, padded, 0.0) for x in (q, k, v))
        igate = pad_time_axis(igate, padded, NO_INPUT_PREACT)
        log_fgate = pad_time_axis(log_fgate, padded, 0.0)
    q = _pad_last(q / math.sqrt(dhqk), dk)
    k = _pad_last(k, dk)
    v = _pad_last(v, dv)

    def chunked(x):  # (B, NH, S, ...) -> (B·NH, NC, L, ...)
        return x.reshape(batch * heads, num_chunks, length, *x.shape[3:])

    q, k, v, igate, log_fgate = map(chunked, (q, k, v, igate, log_fgate))

    # Gate bookkeeping per chunk, as in `mlstm_chunkwise` (every log decay a sum of its own terms).
    to_here, log_weight, hi, lo, resets = gate_sums(igate, log_fgate, careful=careful)

    c0 = _pad_last(_pad_last(state.c, dv).swapaxes(-1, -2), dk).swapaxes(-1, -2)
    h, c, n, m = _core(
        cfg,
        q,
        k,
        v,
        igate,
        to_here,
        hi,
        lo,
        resets,
        log_weight,
        jnp.max(log_weight, axis=-1),
        to_here[..., -1],
        c0.reshape(batch * heads, dk, dv),
        _pad_last(state.n, dk).reshape(batch * heads, dk),
        state.m.reshape(batch * heads),
    )
    h = h.reshape(batch, heads, padded, dv)[:, :, :seq_len, :dhv]
    final = mLSTMState(
        c=c.reshape(batch, heads, dk, dv)[..., :dhqk, :dhv],
        n=n.reshape(batch, heads, dk)[..., :dhqk],
        m=m.reshape(batch, heads),
    )
    return h, final
