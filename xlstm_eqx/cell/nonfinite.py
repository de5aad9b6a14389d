"""Non-finite inputs and infinite gates in the mLSTM cell forms (docs/architecture.md, "Edge cases").

Two mechanisms, shared by `forms` and `pallas`:

- Invalid values (NaN or ±inf in q, k, v; NaN or +inf in ĩ; NaN in f̃; NaN or ±inf in an initial
  c or n, NaN or +inf in its m) are replaced by 0 before any matrix product (`sanitize`), and NaN
  is added afterwards exactly where the invalid token reaches (`poisoned_rows`, `poison`): its own
  output for a query, every output from it on and the final state for a write. So nothing leaks
  backwards in time, in the forward or the backward pass: a masked entry times a NaN inside a
  matrix product would be NaN, whatever the mask.
- The gates' -inf are limits, not errors: ĩ = -inf writes nothing, f̃ = -inf (f̄ = -inf) clears
  the memory before the token's own write. A stabiliser is floored where it is subtracted
  (`finite_stabiliser`), and a cleared memory enters the pairwise log decays as a count of resets
  times `RESET_LOG_DECAY` (see `forms.running_log_decay_sums`), never as -inf - -inf.

Only element-wise work and one cumulative maximum over S: no host sync, no value-dependent
Python branch. The forms skip all of it when nothing needs it: `all_finite` is the one scalar
predicate of a `lax.cond` between a fast path (no replacement, no NaN added back, no reset count)
and the careful path (`forms.run_fast_or_careful`).
"""

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float


# A forget gate f̄ = -inf inside a pairwise log decay Σ_{t<u≤s} f̄_u counts as this instead: -inf
# cannot be carried in the double-word sums (-inf - -inf = NaN), and a separate count of them is
# exact (entries that cross none get exactly +0). Every stabiliser subtracted is at least
# STABILISER_FLOOR (`finite_stabiliser`), so an entry that crosses one has weight exp(≤ -2^99) = 0
# exactly, as long as the gates and their sums stay below ~1e29 in magnitude (a boolean mask of the
# same entries would be one more L×L residual in the backward). Sums of f̄ that are not pairwise
# (chunk totals, states) carry the -inf as it is.
RESET_LOG_DECAY = -(2.0**100)
STABILISER_FLOOR = -(2.0**99)


def finite_stabiliser(m: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
    """The stabiliser to subtract: max(m, -2^99). Below -2^99 (m = -inf: nothing written, or every
    log weight crosses a cleared memory) there is nothing to read, and exp(x - max(m, -2^99)) is
    exactly 0 for every x ≤ m instead of NaN (-inf - -inf) or 1; no derivative passes through the
    floor. (A maximum, not a `where`: also used on scalars inside the Pallas kernels.)"""
    return jnp.maximum(m, STABILISER_FLOOR)


def all_finite(*arrays: Array) -> Bool[Array, ""]:
    """One scalar: no NaN and no ±inf in any entry of any of `arrays` (the gates' -inf included,
    so that the fast path needs no reset count either). A reduction over the whole call, batch
    axes included: under `vmap` a per-example predicate would turn the `lax.cond` it feeds into a
    select that runs both paths."""
    finite = (jnp.all(jnp.isfinite(a)) for a in arrays)
    return functools.reduce(jnp.logical_and, finite, jnp.asarray(True))


def log_forget(fgate: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
    """f̄ = logσ(f̃), NaN where f̃ is NaN; logσ itself never sees the NaN (its derivative there would be
    NaN, and 0·NaN through the later replacement of the NaN would still be NaN)."""
    nan = jnp.isnan(fgate)
    return jnp.where(nan, jnp.nan, jax.nn.log_sigmoid(jnp.where(nan, 0.0, fgate)))


def bad_query_and_write(
    q: Float[Array, "*batch S DHQK"],
    k: Float[Array, "*batch S DHQK"],
    v: Float[Array, "*batch S DHV"],
    igate: Float[Array, "*batch S"],
    log_fgate: Float[Array, "*batch S"],
) -> tuple[Bool[Array, "*batch S"], Bool[Array, "*batch S"]]:
    """Invalid tokens: a non-finite query, and a non-finite write (k, v, NaN or +inf ĩ, NaN f̄).
    The gates' -inf are valid limits; f̄ = logσ(f̃) is never +inf."""
    bad_query = ~jnp.all(jnp.isfinite(q), axis=-1)
    bad_write = (
        ~jnp.all(jnp.isfinite(k), axis=-1)
        | ~jnp.all(jnp.isfinite(v), axis=-1)
        | jnp.isnan(igate)
        | (igate == jnp.inf)
        | jnp.isnan(log_fgate)
    )
    return bad_query, bad_write


@jax.custom_jvp
def _finite_or_zero(x: Array) -> Array:
    return jnp.where(jnp.isfinite(x), x, 0.0)


@_finite_or_zero.defjvp
def _finite_or_zero_jvp(primals, tangents):
    # Tangents pass unchanged: the backward has no extra pass over dq, dk, dv. (A cotangent that
    # reaches an invalid entry comes only from outputs that are NaN anyway.)
    return _finite_or_zero(primals[0]), tangents[0]


def sanitize(
    q: Array, k: Array, v: Array, igate: Array, log_fgate: Array
) -> tuple[Array, Array, Array, Array, Array]:
    """Invalid values replaced by 0 (which value does not matter: every output they reach is set to
    NaN by `poison`), so that no NaN or inf enters a matrix product."""
    q, k, v = (_finite_or_zero(x) for x in (q, k, v))
    igate = jnp.where(jnp.isnan(igate) | (igate == jnp.inf), 0.0, igate)
    log_fgate = jnp.where(jnp.isnan(log_fgate), 0.0, log_fgate)
    return q, k, v, igate, log_fgate


def _bad_m(state) -> Bool[Array, "*batch"]:
    return jnp.isnan(state.m) | (state.m == jnp.inf)


def bad_state(state) -> Bool[Array, "*batch"]:
    """Whether the `mLSTMState` has an invalid entry, per (B, NH): NaN or ±inf in c or n, NaN or
    +inf in m. m = -inf (an empty memory) is valid."""
    bad_c = ~jnp.all(jnp.isfinite(state.c), axis=(-2, -1))
    return bad_c | ~jnp.all(jnp.isfinite(state.n), axis=-1) | _bad_m(state)


def sanitize_state(state):
    """(the state with invalid entries replaced by 0, `bad_state`). `state` is an `mLSTMState`."""
    clean = type(state)(
        c=jnp.where(jnp.isfinite(state.c), state.c, 0.0),
        n=jnp.where(jnp.isfinite(state.n), state.n, 0.0),
        m=jnp.where(_bad_m(state), 0.0, state.m),
    )
    return clean, bad_state(state)


def poisoned_rows(
    bad_query: Bool[Array, "*batch S"],
    bad_write: Bool[Array, "*batch S"],
    bad_state: Bool[Array, "*batch"],
) -> tuple[Bool[Array, "*batch S"], Bool[Array, "*batch"]]:
    """Which outputs and which final states an invalid token or state reaches: a bad query its own
    output; a bad write every output from it on, and the final state; a bad state everything."""
    written = jax.lax.cummax(bad_write.astype(jnp.int32), axis=bad_write.ndim - 1) > 0
    rows = written | bad_query | bad_state[..., None]
    return rows, written[..., -1] | bad_state


def poison(x: Array, where: Bool[Array, "..."]) -> Array:
    """x + NaN where `where` (broadcast over x's trailing axes); x itself elsewhere. Added rather than
    selected, so that a cotangent passes through to x unchanged."""
    nan = jnp.where(where, jnp.nan, 0.0).astype(x.dtype)
    return x + nan.reshape(nan.shape + (1,) * (x.ndim - nan.ndim))


def poison_state(state, where: Bool[Array, "*batch"]):
    """Every field of the `mLSTMState` made NaN for the (B, NH) pairs in `where`."""
    return jax.tree.map(lambda x: poison(x, where), state)
