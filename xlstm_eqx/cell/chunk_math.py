"""The chunkwise mLSTM, one chunk at a time, forward and backward, on plain arrays (docs/architecture.md,
"The mLSTM cell"): the per-chunk math of the Pallas kernels (`pallas`, on tiles) and of the
chunkwise form's hand-written backward (`chunkwise_vjp`, vmapped over (batch·head, chunk)).

Every backward here is the true reverse-mode derivative of its forward, through the stabiliser `m`
and the normaliser, with ties in max/abs split as JAX splits them (tests/cell/test_pallas.py,
tests/cell/test_chunkwise_vjp.py check them against autodiff).
"""

import jax
import jax.numpy as jnp

from .forms import max_exp_argument, running_log_decay_sums
from .nonfinite import finite_stabiliser


def gate_sums(igate, log_fgate, *, careful: bool):
    """Per-chunk gate bookkeeping on (..., L) gates, every log decay a sum of its own terms: b =
    Σ_{u≤s} f̄_u, the log weights a_t = Σ_{u>t} f̄_u + ĩ_t of the tokens in the end-of-chunk state,
    and (hi, lo, resets) of `forms.running_log_decay_sums` (resets None unless `careful`)."""
    to_here = jnp.cumsum(log_fgate, axis=-1)
    after = jax.lax.cumsum(log_fgate, axis=log_fgate.ndim - 1, reverse=True)[..., 1:]
    after = jnp.concatenate([after, jnp.zeros_like(log_fgate[..., :1])], axis=-1)
    return to_here, after + igate, *running_log_decay_sums(log_fgate, careful=careful)


def dot(a, b, *, trans_a: bool = False, trans_b: bool = False):
    """a @ b (optionally transposed operands) in full precision of the operand dtype."""
    contract = (0 if trans_a else 1, 1 if trans_b else 0)
    return jax.lax.dot_general(
        a,
        b,
        (((contract[0],), (contract[1],)), ((), ())),
        precision=jax.lax.Precision.HIGHEST,
        preferred_element_type=a.dtype,
    )


def weight_of_first(x, y):
    """d max(x, y) / dx as JAX defines it: 1, 0, or 1/2 on a tie."""
    # Casts rather than `where`: the Triton lowering failed on `where` over 0-d operands here.
    return (x > y).astype(x.dtype) + 0.5 * (x == y).astype(x.dtype)


def sum_all(x):
    return jnp.sum(jnp.sum(x, axis=1), axis=0)


def chunk_update(k, v, a, amax, g, c, n, m):
    """State after a chunk from the state before it: the inter-chunk step of `mlstm_chunkwise`.

    k (L, DK), v (L, DV), a (L) = log weight of each token in the end-of-chunk state, amax = max(a),
    g = Σ f̄ over the chunk; c (DK, DV), n (DK), m () the entering state.
    """
    w = jnp.exp(a - finite_stabiliser(amax))
    kw = k * w[:, None]
    kv = dot(kw, v, trans_a=True)
    kk = jnp.sum(kw, axis=0)
    gm = g + m
    m_new = jnp.maximum(gm, amax)
    m_sub = finite_stabiliser(m_new)
    alpha = jnp.exp(gm - m_sub)
    beta = jnp.exp(amax - m_sub)
    return alpha * c + beta * kv, alpha * n + beta * kk, m_new


def chunk_outputs(q, k, v, ig, b, hi, lo, resets, c, n, m_prev, eps):
    """Outputs of one chunk and the intermediates the backward needs.

    q (L, DK) already scaled by 1/√DHQK; ig (L) input-gate pre-activations; b (L) = Σ_{u≤s} f̄_u inside
    the chunk (-inf from an f̄ = -inf on); (hi, lo, resets) the same cumulative sum for the pairwise
    log decays, as `forms.running_log_decay_sums` gives it (resets None on the fast path: no f̄ is
    -inf); (c, n, m_prev) the state entering the chunk.
    """
    length = q.shape[0]
    rows = jax.lax.broadcasted_iota(jnp.int32, (length, length), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (length, length), 1)
    strict = cols < rows
    causal = cols <= rows
    diff = (hi[:, None] - hi[None, :]) + (lo[:, None] - lo[None, :])
    if resets is not None:
        diff = diff + (resets[:, None] - resets[None, :])
    seg = jnp.where(strict, diff, 0.0)
    log_d = jnp.where(causal, seg + ig[None, :], -jnp.inf)
    row_max = jnp.max(log_d, axis=1)
    m_state = b + m_prev
    m = jnp.maximum(m_state, row_max)
    decay = jnp.exp(log_d - finite_stabiliser(m)[:, None])
    qk = dot(q, k, trans_b=True)
    scores = jnp.where(causal, qk * decay, 0.0)
    sigma = jnp.exp(m_state - finite_stabiliser(m))
    qc = dot(q, c)
    qn = jnp.sum(q * n[None, :], axis=1)
    num = sigma[:, None] * qc + dot(scores, v)
    den = sigma * qn + jnp.sum(scores, axis=1)
    lower = jnp.exp(jnp.minimum(-m, max_exp_argument(m.dtype)))
    denom = jnp.maximum(jnp.abs(den), lower) + eps
    h = num / denom[:, None]
    return dict(
        strict=strict,
        causal=causal,
        log_d=log_d,
        row_max=row_max,
        m_state=m_state,
        m=m,
        decay=decay,
        qk=qk,
        scores=scores,
        sigma=sigma,
        qc=qc,
        qn=qn,
        den=den,
        lower=lower,
        denom=denom,
        h=h,
    )


def chunk_outputs_backward(
    q, k, v, ig, b, hi, lo, resets, c, n, m_prev, dh, eps, h=None, scores=None
):
    """Reverse-mode derivative of `chunk_outputs` (h only) for the cotangent dh (L, DV); `h`, the
    forward's output if kept, spares recomputing the numerator (two L×L·D matrix products), and
    `scores`, the forward's causal (q kᵀ) ⊙ decay if kept, the product q kᵀ.

    Returns dq, dk, dv, d ig, d b, d hi (= d lo), dc, dn, dm_prev. Ties in max/min/abs are split as
    JAX's own derivatives split them. Where m = -inf (a row with nothing to read) the subtracted
    stabiliser is a finite constant, as in `forms`: every term through it is then 0.
    """
    f = chunk_outputs(q, k, v, ig, b, hi, lo, resets, c, n, m_prev, eps)
    h = f["h"] if h is None else h  # the numerator's products are dead code then (XLA drops them)
    lower, m, sigma, decay = f["lower"], f["m"], f["sigma"], f["decay"]
    if scores is None:
        scores, den, denom = f["scores"], f["den"], f["denom"]
    else:  # q kᵀ is dead code then
        den = sigma * f["qn"] + jnp.sum(scores, axis=1)
        denom = jnp.maximum(jnp.abs(den), lower) + eps

    # h = num / (max(|den|, exp(min(-m, A))) + eps)
    dnum = dh / denom[:, None]
    ddenom = -jnp.sum(dh * h, axis=1) / denom
    w_abs = weight_of_first(jnp.abs(den), lower)
    dden = ddenom * w_abs * jnp.where(den >= 0, 1.0, -1.0).astype(den.dtype)
    dlower = ddenom * (1.0 - w_abs)
    dm = -dlower * lower * weight_of_first(jnp.full_like(m, max_exp_argument(m.dtype)), -m)

    # num = σ (q C) + scores v,  den = σ (q·n) + Σ_t scores
    dnum_c = dot(dnum, c, trans_b=True)  # Σ dnum·(q C) = Σ q·(dnum Cᵀ): no q C needed
    dsigma = jnp.sum(q * dnum_c, axis=1) + dden * f["qn"]
    dq = sigma[:, None] * (dnum_c + dden[:, None] * n[None, :])
    dc = dot(q * sigma[:, None], dnum, trans_a=True)
    dn = jnp.sum(q * (sigma * dden)[:, None], axis=0)
    dscores = dot(dnum, v, trans_b=True) + dden[:, None]
    dv = dot(scores, dnum, trans_a=True)

    # scores = (q kᵀ) ⊙ exp(log_d - m) on the causal entries, 0 elsewhere
    dscores = jnp.where(f["causal"], dscores, 0.0)
    dqk = dscores * decay
    dq = dq + dot(dqk, k)
    dk = dot(dqk, q, trans_a=True)
    dlog_d = dscores * scores  # = dscores · (q kᵀ) · decay on the causal entries
    dm = dm - jnp.sum(dlog_d, axis=1)

    # σ = exp(m_state - m),  m = max(m_state, max_t log_d)
    dm_state = dsigma * sigma
    dm = dm - dm_state
    w_state = weight_of_first(f["m_state"], f["row_max"])
    dm_state = dm_state + dm * w_state
    drow = dm * (1.0 - w_state)
    is_max = f["log_d"] == f["row_max"][:, None]
    count = jnp.sum(is_max.astype(dm.dtype), axis=1)
    dlog_d = dlog_d + jnp.where(is_max, (drow / count)[:, None], 0.0)

    # log_d = seg + ig (causal part), seg[s, t] = (hi_s - hi_t) + (lo_s - lo_t) + const for t < s
    dlog_d = jnp.where(f["causal"], dlog_d, 0.0)
    dig = jnp.sum(dlog_d, axis=0)
    dseg = jnp.where(f["strict"], dlog_d, 0.0)
    dhi = jnp.sum(dseg, axis=1) - jnp.sum(dseg, axis=0)
    return dq, dk, dv, dig, dm_state, dhi, dc, dn, jnp.sum(dm_state)


def chunk_update_weights(k, v, a, amax):
    """w = exp(a - max a) (L), and the chunk's stabilised contributions Σ w k vᵀ (DK, DV), Σ w k (DK)
    to the state (`chunk_update`)."""
    w = jnp.exp(a - finite_stabiliser(amax))
    kw = k * w[:, None]
    return w, dot(kw, v, trans_a=True), jnp.sum(kw, axis=0)


def chunk_update_state_backward(kv, kk, amax, g, c, n, m, dc_new, dn_new, dm_new):
    """The state part of `chunk_update_backward` (O(DK·DV), no token): the cotangent (dc, dn, dm)
    of the state before the chunk, d amax through the stabiliser, and β = exp(amax - m_new)."""
    gm = g + m
    m_sub = finite_stabiliser(jnp.maximum(gm, amax))
    alpha = jnp.exp(gm - m_sub)
    beta = jnp.exp(amax - m_sub)
    dalpha = sum_all(dc_new * c) + jnp.sum(dn_new * n)
    dbeta = sum_all(dc_new * kv) + jnp.sum(dn_new * kk)
    dm_total = dm_new - dalpha * alpha - dbeta * beta
    w_gm = weight_of_first(gm, amax)
    dgm = dalpha * alpha + dm_total * w_gm
    damax = dbeta * beta + dm_total * (1.0 - w_gm)
    return alpha * dc_new, alpha * dn_new, dgm, damax, beta


def chunk_update_token_backward(k, v, w, beta, dc_new, dn_new):
    """The token part of `chunk_update_backward`: dk, dv, da (d amax gets -Σ da as well)."""
    dkv = beta * dc_new
    dkw = dot(v, dkv, trans_b=True) + (beta * dn_new)[None, :]  # (L, DK)
    da = jnp.sum(k * dkw, axis=1) * w
    return w[:, None] * dkw, w[:, None] * dot(k, dkv), da


def chunk_update_backward(k, v, a, amax, g, c, n, m, dc_new, dn_new, dm_new):
    """Reverse-mode derivative of `chunk_update` for the cotangent of the state after the chunk.

    Returns dk, dv, da, d amax, dg and the cotangent (dc, dn, dm) of the state before the chunk.
    """
    w, kv, kk = chunk_update_weights(k, v, a, amax)
    dc, dn, dm, damax, beta = chunk_update_state_backward(
        kv, kk, amax, g, c, n, m, dc_new, dn_new, dm_new
    )
    dk, dv, da = chunk_update_token_backward(k, v, w, beta, dc_new, dn_new)
    return dk, dv, da, damax - jnp.sum(da), dm, dc, dn, dm
