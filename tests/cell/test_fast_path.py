"""The cell's fast path (finite inputs: no replacement, detection, NaN add-back or reset count)
against its careful path (`fast_path=False`): the same outputs, final states and gradients, bit
for bit, in every form (`forms.run_fast_or_careful`, docs/architecture.md, "Edge cases")."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import xlstm_eqx as X
from xlstm_eqx.cell import mlstm_chunkwise_pallas

from .test_edge_cases import random_state
from .test_forms import make_inputs
from .test_pallas import rel_err


FORMS = {
    "parallel": lambda *a, initial_state, fast_path: (
        X.parallel_stabilized_simple(*a, fast_path=fast_path),
        None,
    ),
    # chunk 4 with S = 10: padding inside the last chunk (ĩ = -inf there, after the predicate).
    "chunkwise": functools.partial(X.mlstm_chunkwise, chunk_size=4),
    "recurrent": X.mlstm_recurrent,
    "pallas": functools.partial(mlstm_chunkwise_pallas, chunk_size=16),
}


def _run(form, inputs, initial_state, fast_path):
    fn = functools.partial(FORMS[form], initial_state=initial_state, fast_path=fast_path)
    if form == "parallel":
        initial_state = None
    weights = jnp.asarray(np.random.default_rng(7).standard_normal(inputs[2].shape), jnp.float32)

    def loss(*a):
        return jnp.sum(fn(*a)[0] * weights)

    out = jax.jit(fn)(*inputs)
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(*inputs)
    return out, grads


def _assert_same(fast, careful):
    for x, y in zip(jax.tree.leaves(fast), jax.tree.leaves(careful), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize(
    "form, with_state",
    [
        ("parallel", False),
        ("chunkwise", True),
        pytest.param("chunkwise", False, marks=pytest.mark.slow),
        pytest.param("recurrent", True, marks=pytest.mark.slow),
        pytest.param("pallas", True, marks=pytest.mark.slow),
    ],
)
def test_fast_path_equals_careful_path(form, with_state):
    """Finite inputs (the fast path runs): outputs and final states bit for bit as on the forced
    careful path. Gradients too: a differentiated call runs the careful path (`custom_jvp`), and
    this checks that the fast path's primal does not change them (the chunkwise form's written-out
    backward: to rounding). Exact, not a tolerance: the
    fast path leaves out only work that is the identity on finite inputs (replacing non-finite
    values, adding NaN, a reset count of 0) and keeps every causal selection, so XLA rounds the
    same way (a product in place of a selection differs by ~1e-6 relative)."""
    inputs = tuple(map(jnp.asarray, make_inputs(3, 2, 2, 10, 8, 8, (-5, 5), (-2, 8))))
    state = random_state(4, 2, 2, 8, 8) if with_state else None
    fast, careful = _run(form, inputs, state, True), _run(form, inputs, state, False)
    if form != "chunkwise":
        _assert_same(fast, careful)
        return
    # The chunkwise form's fast path has its own backward (`cell.chunkwise_vjp`): the same
    # gradient summed in another order (tests/cell/test_chunkwise_vjp.py); outputs bit for bit.
    _assert_same(fast[0], careful[0])
    for g, g_ref in zip(fast[1], careful[1], strict=True):
        assert rel_err(g, g_ref) <= 2e-5, rel_err(g, g_ref)


@pytest.mark.parametrize(
    "form",
    [pytest.param("parallel", marks=pytest.mark.slow), "chunkwise", "recurrent"],
)
def test_careful_path_taken_for_infinite_gates_and_empty_state(form):
    """A gate at -inf, or an initial state with m = -inf (an empty memory), is not finite: the
    `cond` takes the careful path, whose reset count and floors give the limits; results as on the
    forced careful path, and finite."""
    q, k, v, i, f = make_inputs(5, 1, 2, 10, 8, 8, (-5, 5), (-2, 8))
    i[0, 0, 3] = -np.inf
    f[0, 1, 6] = -np.inf
    inputs = tuple(map(jnp.asarray, (q, k, v, i, f)))
    state = None
    if form != "parallel":
        state = X.mLSTMState.zeros(1, 2, 8, 8)
        state = X.mLSTMState(c=state.c, n=state.n, m=jnp.full((1, 2), -jnp.inf))
    fast, careful = _run(form, inputs, state, True), _run(form, inputs, state, False)
    _assert_same(fast, careful)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(fast))


def test_predicate_is_one_scalar_under_vmap():
    """vmap over calls: a finite and a non-finite example side by side (the batched predicate
    turns the `cond` into a select of both paths) each get what the careful path gives them."""
    q, k, v, i, f = make_inputs(6, 2, 2, 10, 8, 8, (-5, 5), (-2, 8))
    q[1, 0, 4, 0] = np.nan
    inputs = tuple(jnp.asarray(x)[:, None] for x in (q, k, v, i, f))  # vmap over axis 0

    def run(fast_path):
        cell = functools.partial(X.mlstm_chunkwise, chunk_size=4, fast_path=fast_path)
        return np.asarray(jax.jit(jax.vmap(lambda *a: cell(*a)[0]))(*inputs))[:, 0]

    h = run(True)
    np.testing.assert_array_equal(h, run(False))
    assert np.all(np.isnan(h[1, 0, 4])) and np.all(np.isfinite(np.delete(h[1, 0], 4, axis=0)))
