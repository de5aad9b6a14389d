"""The chunkwise form's written-out backward on the fast path (`cell.chunkwise_vjp`) against autodiff
of its careful path (`fast_path=False`): the gradient of all five inputs and of the initial state,
through h and through the final state."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import xlstm_eqx as X

from .test_pallas import loss_fn, make_case, rel_err


# B, NH, S, DHQK, DHV, chunk_size, ĩ range, f̃ range
CASES = {
    # S not a multiple of the chunk: the last chunk padded (ĩ = -inf there); DHQK ≠ DHV.
    "padded": (2, 2, 10, 8, 6, 4, (-5.0, 5.0), (-2.0, 8.0)),
    # a chunk of one token: L×L matrices of 1×1, everything through the reverse scan.
    "chunk_of_one": (1, 2, 5, 4, 4, 1, (-5.0, 5.0), (-2.0, 8.0)),
    # S < chunk: one chunk of S tokens; tiny input gates, the stabiliser from the carried state.
    "shorter_than_chunk": (1, 2, 5, 4, 3, 16, (-10.0, -5.0), (3.0, 8.0)),
}


def _gradients(dtype, case, fast_path):
    batch, heads, seq_len, dhqk, dhv, chunk, i_range, f_range = CASES[case]
    inputs, state, w_h, w_state = make_case(
        3, batch, heads, seq_len, dhqk, dhv, i_range, f_range, True, dtype=dtype
    )
    cell = functools.partial(X.mlstm_chunkwise, chunk_size=chunk, fast_path=fast_path)
    (_, (h, _)), grads = loss_fn(cell)(inputs, state, w_h, w_state)
    return h, grads


@pytest.mark.parametrize("case", CASES)
def test_written_out_gradient_matches_autodiff_float32(case):
    """Float32: every gradient within 2e-5 of the largest entry. Both are float32 sums of the same
    terms in a different order (the backward recomputes the L×L matrices, autodiff reuses them;
    the reverse scan against autodiff's transposed scan): measured 3e-6 at most, i.e. ~25 ulp
    (errors of exp'd log decays and sums of up to L terms); 2e-5 leaves room for other BLAS
    orders while a missing derivative path (as in a stop-gradient variant) shows at ~1e-2."""
    h, fast = _gradients(np.float32, case, True)
    _, careful = _gradients(np.float32, case, False)
    assert h.dtype == jnp.float32
    for g, g_ref in zip(jax.tree.leaves(fast), jax.tree.leaves(careful), strict=True):
        assert g.dtype == g_ref.dtype == jnp.float32
        assert rel_err(g, g_ref) <= 2e-5, rel_err(g, g_ref)


@pytest.mark.parametrize("case", ["padded", "chunk_of_one"])
def test_written_out_gradient_matches_autodiff_float64(case):
    """Float64: the same to 1e-12 (measured ~1e-15): every derivative path is there, the ones
    through the stabiliser and eps included."""
    with jax.enable_x64(True):
        _, fast = _gradients(np.float64, case, True)
        _, careful = _gradients(np.float64, case, False)
        for g, g_ref in zip(jax.tree.leaves(fast), jax.tree.leaves(careful), strict=True):
            assert g.dtype == jnp.float64
            assert rel_err(g, g_ref) <= 1e-12, rel_err(g, g_ref)


def test_non_finite_input_takes_autodiff_of_the_careful_path():
    """A NaN key: the predicate is false in the forward, and the backward is autodiff of the careful
    path (the other branch of its `cond`), bit for bit as with `fast_path=False`; the written-out
    backward's recomputed matrices never see the NaN."""
    inputs, state, w_h, w_state = make_case(4, 1, 2, 10, 8, 8, (-5.0, 5.0), (-2.0, 8.0), True)
    inputs = (inputs[0], inputs[1].at[0, 1, 6, 2].set(jnp.nan), *inputs[2:])
    grads = {}
    for fast_path in (True, False):
        cell = functools.partial(X.mlstm_chunkwise, chunk_size=4, fast_path=fast_path)
        grads[fast_path] = loss_fn(cell)(inputs, state, w_h, w_state)[1]
    for g, g_ref in zip(jax.tree.leaves(grads[True]), jax.tree.leaves(grads[False]), strict=True):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(g_ref))
    dq = np.asarray(grads[True][0][0])
    assert np.all(np.isfinite(dq[0, 0])) and np.all(np.isfinite(dq[0, 1, :6]))
