"""Edge cases of the mLSTM cell forms (docs/architecture.md, "Edge cases"): non-finite inputs never
reach earlier outputs, the gates' -inf are limits on which every form agrees (with each other and
the float64 reference), empty dimensions give empty results, and bad arguments are a ValueError
naming them — the same in every form."""

import functools
import inspect

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import pytest

import xlstm_eqx as X
from xlstm_eqx.cell import mlstm_chunkwise_pallas, mlstm_chunkwise_remat

from .test_forms import make_inputs, np_mlstm, rel_err, weighted_loss


# ---------------------------------------------------------------------------------------------------
# The forms, each as (q, k, v, ĩ, f̃, initial_state=None) -> (h, final state or None)
# ---------------------------------------------------------------------------------------------------


@functools.cache
def _jitted_step():
    return jax.jit(X.mlstm_recurrent_step)


def _step_loop(q, k, v, i, f, *, initial_state=None):
    """`mlstm_recurrent_step` token by token: a form of its own."""
    batch, heads, seq_len, dhqk = q.shape
    state = initial_state
    if state is None:
        state = X.mLSTMState.zeros(batch, heads, dhqk, v.shape[-1])
    if not seq_len:  # no call at all
        h = jnp.zeros((batch, heads, 0, v.shape[-1]), q.dtype)
        return h, state
    outs = []
    for t in range(seq_len):
        h, state = _jitted_step()(state, q[:, :, t], k[:, :, t], v[:, :, t], i[:, :, t], f[:, :, t])
        outs.append(h)
    h = jnp.stack(outs, axis=2)
    return h, state


STATE_FORMS = {
    "chunkwise": functools.partial(X.mlstm_chunkwise, chunk_size=4),
    "recurrent": X.mlstm_recurrent,
    "step": _step_loop,
    "remat": functools.partial(
        mlstm_chunkwise_remat, chunk_size=4, remat="chunk_states", chunks_per_step=2
    ),
    # The kernels' chunk is 16 at least: S = 37 gives three chunks and padding.
    "pallas": functools.partial(mlstm_chunkwise_pallas, chunk_size=16),
}
ALL_FORMS = ["parallel", *STATE_FORMS]
FAST_FORMS = ["parallel", "chunkwise", "recurrent", "step", "remat"]  # not the interpreted kernels


@functools.cache
def _jitted(form):
    if form == "parallel":
        return jax.jit(lambda *a, initial_state=None: (X.parallel_stabilized_simple(*a), None))
    fn = STATE_FORMS[form]
    return fn if form == "step" else jax.jit(fn)


def run_form(form, inputs, initial_state=None):
    return _jitted(form)(*map(jnp.asarray, inputs), initial_state=initial_state)


def random_state(seed, batch, heads, dhqk, dhv):
    rng = np.random.default_rng(seed)

    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape), jnp.float32)

    return X.mLSTMState(
        c=normal(batch, heads, dhqk, dhv), n=normal(batch, heads, dhqk), m=normal(batch, heads)
    )


# ---------------------------------------------------------------------------------------------------
# Non-finite values never leak backwards in time
# ---------------------------------------------------------------------------------------------------

# Values that make a token invalid, per input (ĩ = -inf and f̃ = ±inf are valid limits).
INVALID = {
    "q": [np.nan, np.inf, -np.inf],
    "k": [np.nan, np.inf, -np.inf],
    "v": [np.nan, np.inf, -np.inf],
    "i": [np.nan, np.inf],
    "f": [np.nan],
}


def with_invalid(inputs, which, t, value, component=0):
    """The inputs with `value` at (batch 1, head 0, time t) of input `which` (one of "qkvif")."""
    index = "qkvif".index(which)
    bad = [np.array(x) for x in inputs]
    if which in "qkv":
        bad[index][1, 0, t, component] = value
    else:
        bad[index][1, 0, t] = value
    return bad


def check_invalid_token(h, state, h_clean, state_clean, which, t):
    """Earlier outputs and other (batch, head) pairs exactly as without the invalid value; NaN (all
    of DHV) where it reaches: h_t for a query, h_s for s ≥ t and the final state for a write."""
    h, h_clean = np.asarray(h), np.asarray(h_clean)
    mask = np.zeros(h.shape[:3], bool)
    mask[1, 0, t if which == "q" else slice(t, None)] = True
    assert np.all(np.isnan(h[mask]))
    assert np.all(np.isfinite(h[~mask]))
    np.testing.assert_array_equal(h[~mask], h_clean[~mask])
    if state is None:
        return
    for name in ("c", "n", "m"):
        x, x_clean = np.asarray(getattr(state, name)), np.asarray(getattr(state_clean, name))
        if which == "q":  # a query is not written into the memory
            np.testing.assert_array_equal(x, x_clean)
        else:
            assert np.all(np.isnan(x[1, 0])), name
            np.testing.assert_array_equal(x[0], x_clean[0])
            np.testing.assert_array_equal(x[1, 1], x_clean[1, 1])


@hypothesis.given(
    form=st.sampled_from(FAST_FORMS),
    which=st.sampled_from("qkvif"),
    seq_len=st.sampled_from([1, 5, 16, 37]),
    data=st.data(),
)
def test_invalid_value_reaches_only_later_outputs(form, which, seq_len, data):
    """Issue 14: NaN in k at t = 3 made every output NaN from t = 0 (parallel, chunkwise)."""
    value = data.draw(st.sampled_from(INVALID[which]), label="value")
    t = data.draw(st.integers(0, seq_len - 1), label="t")
    component = data.draw(st.integers(0, 3), label="component")
    inputs = make_inputs(10, 2, 2, seq_len, 8, 4, (-5, 5), (-2, 8))
    h_clean, state_clean = run_form(form, inputs)
    h, state = run_form(form, with_invalid(inputs, which, t, value, component))
    check_invalid_token(h, state, h_clean, state_clean, which, t)


@hypothesis.settings(max_examples=6)
@hypothesis.given(which=st.sampled_from("qkvif"), data=st.data())
def test_invalid_value_reaches_only_later_outputs_pallas(which, data):
    value = data.draw(st.sampled_from(INVALID[which]), label="value")
    t = data.draw(st.integers(0, 36), label="t")
    inputs = make_inputs(20, 2, 2, 37, 8, 4, (-5, 5), (-2, 8))
    state = random_state(20, 2, 2, 8, 4)
    h_clean, state_clean = run_form("pallas", inputs, state)
    h, final = run_form("pallas", with_invalid(inputs, which, t, value), state)
    check_invalid_token(h, final, h_clean, state_clean, which, t)


@functools.cache
def _grad_of_early_outputs(form, t):
    weights = jnp.asarray(np.random.default_rng(12).standard_normal((2, 2, t, 4)), jnp.float32)

    def loss(*inputs):
        return jnp.sum(_jitted(form)(*inputs)[0][:, :, :t] * weights)

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))


@pytest.mark.slow
@pytest.mark.parametrize("form", ALL_FORMS)
def test_gradient_of_outputs_before_an_invalid_value(form):
    """A loss on the outputs before a NaN has the (finite) gradient of the clean computation."""
    inputs = [jnp.asarray(x) for x in make_inputs(11, 2, 2, 9, 8, 4, (-5, 5), (-2, 8))]
    grad = _grad_of_early_outputs(form, 3)
    clean = grad(*inputs)
    for which in "qkvif":
        bad = grad(*map(jnp.asarray, with_invalid(inputs, which, 3, np.nan)))
        for name, g, g_clean in zip("qkvif", bad, clean, strict=True):
            assert bool(jnp.all(jnp.isfinite(g))), (which, name)
            assert rel_err(g, g_clean) <= 1e-6, (which, name)


@pytest.mark.slow
@pytest.mark.parametrize("form", [f for f in STATE_FORMS if f != "pallas"])
def test_invalid_initial_state_makes_everything_nan(form):
    inputs = make_inputs(13, 2, 2, 10, 8, 4, (-5, 5), (-2, 8))
    good = random_state(13, 2, 2, 8, 4)
    h_clean, state_clean = run_form(form, inputs, good)
    for bad in [
        X.mLSTMState(c=good.c.at[1, 0, 3, 2].set(jnp.nan), n=good.n, m=good.m),
        X.mLSTMState(c=good.c, n=good.n.at[1, 0, 5].set(-jnp.inf), m=good.m),
        X.mLSTMState(c=good.c, n=good.n, m=good.m.at[1, 0].set(jnp.inf)),
    ]:
        h, final = run_form(form, inputs, bad)
        check_invalid_token(h, final, h_clean, state_clean, "k", 0)
    # m = -inf is the empty memory, a valid state: (c, n) · exp(-inf) = 0
    empty = X.mLSTMState(c=good.c, n=good.n, m=good.m.at[1, 0].set(-jnp.inf))
    zeros = X.mLSTMState(c=good.c.at[1, 0].set(0), n=good.n.at[1, 0].set(0), m=empty.m)
    h, _ = run_form(form, inputs, empty)
    h_zeros, _ = run_form(form, inputs, zeros)
    assert bool(jnp.all(jnp.isfinite(h)))
    np.testing.assert_array_equal(np.asarray(h), np.asarray(h_zeros))


# ---------------------------------------------------------------------------------------------------
# The gates' infinities are limits, the same in every form
# ---------------------------------------------------------------------------------------------------


def np_limit_inputs(inputs):
    """The gates' ±inf as ±1e4 in float64: there exp(-1e4 - m) and 1/exp(1e4) are exactly 0, so the
    reference computes the limit."""
    q, k, v, i, f = (np.asarray(x, np.float64) for x in inputs)
    return q, k, v, np.clip(i, -1e4, 1e4), np.clip(f, -1e4, 1e4)


def gates_with_limits(inputs, seed, i_frac, f_frac, f_plus):
    q, k, v, i, f = (np.array(x) for x in inputs)
    rng = np.random.default_rng(seed)
    i = np.where(rng.random(i.shape) < i_frac, -np.inf, i).astype(np.float32)
    f = np.where(rng.random(f.shape) < f_frac, -np.inf, f)
    f = np.where(rng.random(f.shape) < f_plus, np.inf, f).astype(np.float32)
    return [q, k, v, i, f]


def assert_states_equal(x, y, tol):
    for name in ("c", "n", "m"):
        a, b = (np.asarray(getattr(s, name)) for s in (x, y))
        np.testing.assert_array_equal(np.isneginf(a), np.isneginf(b))  # empty memories
        assert rel_err(np.where(np.isneginf(a), 0, a), np.where(np.isneginf(b), 0, b)) <= tol


@pytest.mark.slow
@hypothesis.given(
    # a few lengths (each compiles every form once) across chunk boundaries; S = 0 included
    seq_len=st.sampled_from([0, 1, 7, 16, 40]),
    seed=st.integers(0, 2**16),
    i_frac=st.sampled_from([0.0, 0.3, 0.8, 1.0]),
    f_frac=st.sampled_from([0.0, 0.1, 0.4, 1.0]),
    f_plus=st.sampled_from([0.0, 0.3]),
)
def test_infinite_gates_are_the_limits(seq_len, seed, i_frac, f_frac, f_plus):
    """Issue 14: ĩ = -inf or f̃ = -inf gave NaN in some forms and 0 in others. ĩ = -inf writes
    nothing, f̃ = -inf clears the memory first, f̃ = +inf forgets nothing: every form equals the
    float64 reference at ±1e4 (the limit) and the others, final states included."""
    inputs = make_inputs(seed, 2, 2, seq_len, 8, 4, (-5, 5), (-2, 8))
    inputs = gates_with_limits(inputs, seed, i_frac, f_frac, f_plus)
    with np.errstate(over="ignore"):  # exp(1e4) = inf: the normaliser of a row with nothing to read
        ref = np_mlstm(*np_limit_inputs(inputs))
    outs = {form: run_form(form, inputs) for form in FAST_FORMS}
    for form, (h, _) in outs.items():
        assert h.shape == (2, 2, seq_len, 4), form
        assert bool(jnp.all(jnp.isfinite(h))), form
        if seq_len:
            assert rel_err(h, ref) <= 1e-4, form
    if seq_len:
        for form in ["recurrent", "step", "remat"]:
            assert rel_err(outs[form][0], outs["chunkwise"][0]) <= 1e-5, form
            assert_states_equal(outs[form][1], outs["chunkwise"][1], 1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("form", [f for f in ALL_FORMS if f != "step"])  # step: as recurrent
def test_infinite_gates_gradients_are_the_limits(form):
    """Gradients at ±inf gates: finite, and the float64 gradient at ±1e4."""
    inputs = make_inputs(14, 1, 2, 40, 8, 6, (-5.0, 5.0), (-2.0, 8.0))
    inputs = gates_with_limits(inputs, 14, 0.3, 0.1, 0.2)
    inputs[3][0, 1, :] = -np.inf  # one head that writes once, at t = 7, and is cleared at t = 20
    inputs[3][0, 1, 7] = 2.0
    inputs[4][0, 1, 20] = -np.inf
    weights = np.random.default_rng(15).standard_normal((1, 2, 40, 6))
    with jax.enable_x64(True):
        loss = weighted_loss("parallel", 16, jnp.asarray(weights))
        ref = jax.grad(loss, argnums=(0, 1, 2, 3, 4))(*map(jnp.asarray, np_limit_inputs(inputs)))
        ref = [np.asarray(g) for g in ref]
    w32 = jnp.asarray(weights, jnp.float32)

    def loss32(*args):
        return jnp.sum(_jitted(form)(*args)[0] * w32)

    grads = jax.jit(jax.grad(loss32, argnums=(0, 1, 2, 3, 4)))(*map(jnp.asarray, inputs))
    for name, g, g_ref in zip("qkvif", grads, ref, strict=True):
        assert bool(jnp.all(jnp.isfinite(g))), name
        assert rel_err(g, g_ref) <= 1e-3, name


@pytest.mark.slow
def test_infinite_gates_pallas_as_chunkwise():
    """The kernels at the limits, an empty initial memory (m = -inf) and a memory that ends empty:
    values, final state and gradients (through h and the final c, n) as `mlstm_chunkwise`."""
    inputs = gates_with_limits(make_inputs(22, 2, 2, 37, 8, 4, (-5, 5), (-2, 8)), 22, 0.3, 0.1, 0.2)
    inputs[3][1, 1, 30:] = -np.inf  # cleared at 33, nothing written after: an empty final memory
    inputs[4][1, 1, 33] = -np.inf
    inputs[4][0, 1, 16] = -np.inf  # cleared at a chunk's first token
    state = random_state(22, 2, 2, 8, 4)
    state = X.mLSTMState(c=state.c, n=state.n, m=state.m.at[0, 0].set(-jnp.inf))
    w = random_state(23, 2, 2, 8, 4)
    w_h = jnp.asarray(np.random.default_rng(23).standard_normal((2, 2, 37, 4)), jnp.float32)

    def loss(form):
        def total(inputs, state):
            h, final = STATE_FORMS[form](*inputs, initial_state=state)
            value = jnp.sum(h * w_h) + jnp.sum(final.c * w.c) + jnp.sum(final.n * w.n)
            return value, (h, final)

        return jax.jit(jax.value_and_grad(total, argnums=(0, 1), has_aux=True))

    inputs = [jnp.asarray(x) for x in inputs]
    (_, (h, final)), grads = loss("pallas")(inputs, state)
    (_, (h_ref, final_ref)), grads_ref = loss("chunkwise")(inputs, state)
    assert bool(jnp.all(jnp.isfinite(h))) and rel_err(h, h_ref) <= 1e-4
    assert float(final_ref.m[1, 1]) == -np.inf
    assert_states_equal(final, final_ref, 1e-4)
    for g, g_ref in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref), strict=True):
        assert bool(jnp.all(jnp.isfinite(g)))
        assert rel_err(g, g_ref) <= 1e-4


# ---------------------------------------------------------------------------------------------------
# Empty dimensions
# ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("form", ALL_FORMS)
@pytest.mark.parametrize(
    "shape",
    [(2, 3, 0, 8, 4), (0, 3, 5, 8, 4), (2, 0, 5, 8, 4), (2, 3, 5, 8, 0), (2, 3, 5, 0, 4)],
    ids=["S=0", "B=0", "NH=0", "DHV=0", "DHQK=0"],
)
def test_empty_dimensions(form, shape):
    """S = 0: an empty h and the initial state unchanged (issue 14: ZeroDivisionError, a NumPy
    reduction error); B, NH, DHV = 0: empty h; DHQK = 0: h = 0. The same in every form."""
    batch, heads, seq_len, dhqk, dhv = shape
    inputs = make_inputs(16, *shape, (-5, 5), (-2, 8))
    init = random_state(16, batch, heads, dhqk, dhv)
    h, state = run_form(form, inputs, None if form == "parallel" else init)
    assert h.shape == (batch, heads, seq_len, dhv) and h.dtype == jnp.float32
    if dhqk == 0:
        np.testing.assert_array_equal(np.asarray(h), 0.0)
    if seq_len == 0 and state is not None:
        for x, x0 in zip(jax.tree.leaves(state), jax.tree.leaves(init), strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(x0))
        _, zeros = run_form(form, inputs)  # without an initial state: zeros
        for x in jax.tree.leaves(zeros):
            np.testing.assert_array_equal(np.asarray(x), 0.0)


# ---------------------------------------------------------------------------------------------------
# Bad arguments: a ValueError naming them, before any computation, in every form. Under the test
# run's jaxtyping import hook an annotation check may fire first (a TypeCheckError, which names
# the parameter too); `inspect.unwrap` gives the function without the hook: the library's own check.
# ---------------------------------------------------------------------------------------------------


def _raises_both_ways(fn, args, kwargs, pattern):
    with pytest.raises((jaxtyping.TypeCheckError, ValueError), match=pattern):
        fn(*args, **kwargs)
    with pytest.raises(ValueError, match=pattern):
        inspect.unwrap(fn)(*args, **kwargs)


SEQUENCE_FNS = {
    "parallel": X.parallel_stabilized_simple,
    "chunkwise": X.mlstm_chunkwise,
    "recurrent": X.mlstm_recurrent,
    "remat": mlstm_chunkwise_remat,
    "pallas": mlstm_chunkwise_pallas,
}
ARG_NAMES = ["queries", "keys", "values", "igate_preact", "fgate_preact"]
STEP_NAMES = ["q", "k", "v", "igate_preact", "fgate_preact"]


@pytest.mark.parametrize("chunk_size", [0, -3, 2.5, 4.0, True, "4", None], ids=repr)
def test_chunk_size_must_be_a_positive_integer(chunk_size):
    inputs = list(map(jnp.asarray, make_inputs(17, 1, 2, 10, 8, 4, (-5, 5), (-2, 8))))
    for fn in (X.mlstm_chunkwise, mlstm_chunkwise_pallas, mlstm_chunkwise_remat):
        _raises_both_ways(fn, inputs, {"chunk_size": chunk_size}, r"\bchunk_size\b")
    kwargs = {"chunks_per_step": chunk_size}
    _raises_both_ways(mlstm_chunkwise_remat, inputs, kwargs, r"\bchunks_per_step\b")


@pytest.mark.slow
def test_chunk_size_numpy_integer_accepted():
    """NumPy integers pass the checks and the annotations (the type checker is on in tests)."""
    inputs = list(map(jnp.asarray, make_inputs(17, 1, 2, 10, 8, 4, (-5, 5), (-2, 8))))
    ref, _ = X.mlstm_chunkwise(*inputs, chunk_size=4)
    for fn in (X.mlstm_chunkwise, mlstm_chunkwise_pallas, mlstm_chunkwise_remat):
        out, _ = fn(*inputs, chunk_size=np.int64(4))
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-6)
    out, _ = mlstm_chunkwise_remat(*inputs, chunk_size=np.int32(2), chunks_per_step=np.int64(2))
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-6)


def _step_args(inputs):
    return [X.mLSTMState.zeros(1, 2, 8, 4), *(jnp.asarray(x)[:, :, 0] for x in inputs)]


@pytest.mark.parametrize("form", [*SEQUENCE_FNS, "step"])
@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_, jnp.uint8])
def test_integer_inputs_are_rejected(form, dtype):
    """Issue 14: integer q/k/v were cast silently (int32 zeros out)."""
    inputs = make_inputs(18, 1, 2, 6, 8, 4, (-5, 5), (-2, 8))
    for index in range(5):
        if form == "step":
            fn, args, name = X.mlstm_recurrent_step, _step_args(inputs), STEP_NAMES[index]
            args[index + 1] = args[index + 1].astype(dtype)
        else:
            fn, args, name = SEQUENCE_FNS[form], list(map(jnp.asarray, inputs)), ARG_NAMES[index]
            args[index] = args[index].astype(dtype)
        _raises_both_ways(fn, args, {}, rf"\b{name}\b")


@pytest.mark.parametrize("form", [*SEQUENCE_FNS, "step"])
def test_wrong_rank_names_argument_and_shape(form):
    """One axis too few or too many in any argument: a ValueError naming it and its shape."""
    inputs = make_inputs(19, 1, 2, 6, 8, 4, (-5, 5), (-2, 8))
    expected = [
        "(B, NH, S, DHQK)",
        "(B, NH, S, DHQK)",
        "(B, NH, S, DHV)",
        "(B, NH, S)",
        "(B, NH, S)",
    ]
    if form == "step":
        expected = ["(B, NH, DHQK)", "(B, NH, DHQK)", "(B, NH, DHV)", "(B, NH)", "(B, NH)"]
    for index in range(5):
        for change in (lambda x: x[0], lambda x: x[None]):
            if form == "step":
                fn, args, name = X.mlstm_recurrent_step, _step_args(inputs), STEP_NAMES[index]
                args[index + 1] = change(args[index + 1])
            else:
                fn, args, name = (
                    SEQUENCE_FNS[form],
                    list(map(jnp.asarray, inputs)),
                    ARG_NAMES[index],
                )
                args[index] = change(args[index])
            pattern = rf"\b{name}\b"
            with pytest.raises((jaxtyping.TypeCheckError, ValueError), match=pattern):
                fn(*args)
            with pytest.raises(ValueError, match=pattern) as info:
                inspect.unwrap(fn)(*args)
            assert expected[index] in str(info.value), str(info.value)
            assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------------
# Dtypes: gates and cumulative sums in float32 whatever the compute dtype
# ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("form", ALL_FORMS)
def test_low_precision_inputs_compute_in_float32(form):
    """bfloat16/float16 q, k, v and gates, mixed: exactly the float32 computation on the same values,
    rounded to the queries' dtype (nothing — gates, cumulative sums, states — runs in 16 bits)."""
    inputs = make_inputs(21, 1, 2, 20, 8, 4, (-5, 5), (-2, 8))
    dtypes = (jnp.bfloat16, jnp.float32, jnp.float16, jnp.bfloat16, jnp.float16)
    low = [jnp.asarray(x).astype(d) for x, d in zip(inputs, dtypes, strict=True)]
    h, state = run_form(form, low)
    h_ref, state_ref = run_form(form, [x.astype(jnp.float32) for x in low])
    assert h.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(h), np.asarray(h_ref.astype(jnp.bfloat16)))
    for x, x_ref in zip(jax.tree.leaves(state), jax.tree.leaves(state_ref), strict=True):
        assert x.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(x), np.asarray(x_ref))
