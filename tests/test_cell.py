"""The three mLSTM forms against each other and against a float64 NumPy reference of the equations."""

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


# ---------------------------------------------------------------------------------------------------
# Independent reference: the parallel-form equations, row by row, in float64 NumPy.
# ---------------------------------------------------------------------------------------------------


def np_log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def np_mlstm(q, k, v, igate, fgate, eps=1e-6):
    """h_s = Σ_t C[s,t] v_t / (max(|Σ_t C[s,t]|, exp(-m_s)) + eps), m_s = max_t log D[s,t]."""
    q, k, v, igate, fgate = (np.asarray(x, np.float64) for x in (q, k, v, igate, fgate))
    log_f = np_log_sigmoid(fgate)
    seq_len, dhqk = q.shape[2], q.shape[3]
    h = np.zeros(q.shape[:3] + (v.shape[-1],))
    for s in range(seq_len):
        # Σ_{t<u≤s} log f_u for t = 0..s: sum the forget gates from s backwards.
        tail = np.cumsum(log_f[..., s:0:-1], axis=-1)[..., ::-1]
        log_decay = np.concatenate([tail, np.zeros(log_f.shape[:2] + (1,))], axis=-1)
        log_d = log_decay + igate[..., : s + 1]
        m = log_d.max(axis=-1, keepdims=True)
        scores = np.einsum("bhd,bhtd->bht", q[:, :, s], k[:, :, : s + 1]) / np.sqrt(dhqk)
        c = scores * np.exp(log_d - m)
        den = np.maximum(np.abs(c.sum(-1, keepdims=True)), np.exp(-m)) + eps
        h[:, :, s] = np.einsum("bht,bhtv->bhv", c, v[:, :, : s + 1]) / den
    return h


def make_inputs(seed, batch, heads, seq_len, dhqk, dhv, i_range, f_range, dtype=np.float32):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, heads, seq_len, dhqk))
    k = rng.standard_normal((batch, heads, seq_len, dhqk))
    v = rng.standard_normal((batch, heads, seq_len, dhv))
    igate = rng.uniform(*i_range, size=(batch, heads, seq_len))
    fgate = rng.uniform(*f_range, size=(batch, heads, seq_len))
    return tuple(x.astype(dtype) for x in (q, k, v, igate, fgate))


FORMS = {
    "parallel": lambda q, k, v, i, f, chunk_size: X.parallel_stabilized_simple(q, k, v, i, f),
    "chunkwise": lambda q, k, v, i, f, chunk_size: X.mlstm_chunkwise(
        q, k, v, i, f, chunk_size=chunk_size
    ),
    "recurrent": lambda q, k, v, i, f, chunk_size: X.mlstm_recurrent(q, k, v, i, f),
}


@functools.cache
def jitted(form):
    return jax.jit(FORMS[form], static_argnames="chunk_size")


def rel_err(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return np.max(np.abs(x - ref)) / max(np.max(np.abs(ref)), 1e-30)


seq_lens = st.one_of(st.sampled_from([1, 2, 63, 64, 65, 130]), st.integers(1, 300))
shapes = st.tuples(
    st.integers(1, 2),  # B
    st.integers(1, 3),  # NH
    seq_lens,  # S
    st.sampled_from([4, 8, 16]),  # DHQK
    st.sampled_from([3, 8, 12]),  # DHV
    st.sampled_from([1, 4, 16, 64]),  # chunk size
)
gate_ranges = st.sampled_from(
    [
        # (input gate range, forget gate range, float32 tolerance relative to max |h|)
        ((-5.0, 5.0), (-2.0, 8.0), 1e-4),
        ((-30.0, 30.0), (-30.0, 30.0), 2e-3),
    ]
)


@hypothesis.given(shape=shapes, gates=gate_ranges, seed=st.integers(0, 2**16))
def test_forms_match_reference_float32(shape, gates, seed):
    batch, heads, seq_len, dhqk, dhv, chunk_size = shape
    i_range, f_range, tol = gates
    inputs = make_inputs(seed, batch, heads, seq_len, dhqk, dhv, i_range, f_range)
    ref = np_mlstm(*inputs)
    outs = {}
    for form in FORMS:
        out = jitted(form)(*map(jnp.asarray, inputs), chunk_size=chunk_size)
        assert out.shape == (batch, heads, seq_len, dhv)
        assert out.dtype == jnp.float32
        outs[form] = out
        assert rel_err(out, ref) <= tol, form
    assert rel_err(outs["chunkwise"], outs["recurrent"]) <= tol
    assert rel_err(outs["parallel"], outs["chunkwise"]) <= tol


@hypothesis.given(shape=shapes, seed=st.integers(0, 2**16))
def test_forms_match_reference_float64(shape, seed):
    batch, heads, seq_len, dhqk, dhv, chunk_size = shape
    inputs = make_inputs(
        seed, batch, heads, seq_len, dhqk, dhv, (-30.0, 30.0), (-30.0, 30.0), np.float64
    )
    ref = np_mlstm(*inputs)
    with jax.enable_x64(True):
        args = tuple(map(jnp.asarray, inputs))
        par = jitted("parallel")(*args, chunk_size=chunk_size)
        chunk = jitted("chunkwise")(*args, chunk_size=chunk_size)
        rec = jitted("recurrent")(*args, chunk_size=chunk_size)
        assert par.dtype == chunk.dtype == rec.dtype == jnp.float64
    # The parallel form is the reference's own definition of eps placement.
    assert rel_err(par, ref) <= 1e-10
    # m₀ = 0 in the chunkwise/recurrent forms moves eps by up to eps·exp(m)/|den|.
    assert rel_err(chunk, ref) <= 1e-6
    assert rel_err(rec, ref) <= 1e-6
    assert rel_err(chunk, rec) <= 1e-6


def test_gate_shapes_and_optional_arguments():
    q, k, v, i, f = map(jnp.asarray, make_inputs(0, 2, 2, 20, 8, 4, (-5, 5), (-2, 8)))
    base = X.parallel_stabilized_simple(q, k, v, i, f)
    with_trailing = X.parallel_stabilized_simple(q, k, v, i[..., None], f[..., None])
    assert jnp.array_equal(base, with_trailing)
    big_mask = jnp.tril(jnp.ones((32, 32), dtype=bool))
    masked = X.parallel_stabilized_simple(q, k, v, i, f, lower_triangular_matrix=big_mask)
    assert jnp.array_equal(base, masked)
    # A global stabiliser changes only where eps sits: same values up to float32 rounding.
    global_max = X.parallel_stabilized_simple(q, k, v, i, f, stabilize_rowwise=False)
    assert rel_err(global_max, base) < 1e-4
    cast = X.parallel_stabilized_simple(
        q, k, v, i, f, qkv_dtype=jnp.bfloat16, gate_dtype=jnp.float32
    )
    assert cast.dtype == jnp.bfloat16
    rounded = [x.astype(jnp.bfloat16).astype(jnp.float32) for x in (q, k, v)]
    assert rel_err(cast, X.parallel_stabilized_simple(*rounded, i, f)) < 1e-2


@pytest.mark.parametrize("form", list(FORMS))
def test_jit_vmap_grad(form):
    q, k, v, i, f = map(jnp.asarray, make_inputs(1, 2, 2, 16, 8, 8, (-5, 5), (-2, 8)))
    fn = functools.partial(FORMS[form], chunk_size=4)
    batched = jitted(form)(q, k, v, i, f, chunk_size=4)

    def one_example(*args):  # vmap over B, each call seeing a batch of one
        return fn(*(x[None] for x in args))[0]

    per_example = jax.jit(jax.vmap(one_example))(q, k, v, i, f)
    assert jnp.allclose(per_example, batched, atol=1e-6)
    grads = jax.jit(jax.grad(lambda *a: fn(*a).sum(), argnums=(0, 1, 2, 3, 4)))(q, k, v, i, f)
    assert all(bool(jnp.all(jnp.isfinite(g))) and bool(jnp.any(g != 0)) for g in grads)


# ---------------------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------------------


def _loss(form, chunk_size, weights):
    def loss(q, k, v, i, f):
        out = FORMS[form](q, k, v, i, f, chunk_size)
        return jnp.sum(out.astype(weights.dtype) * weights)

    return loss


@pytest.mark.parametrize(
    "i_range,f_range",
    [((-5.0, 5.0), (-2.0, 8.0)), ((-30.0, 50.0), (-50.0, 30.0)), ((20.0, 50.0), (-50.0, -20.0))],
    ids=["trained", "wide", "extreme"],
)
def test_gradients_match_float64_parallel(i_range, f_range):
    inputs = make_inputs(3, 1, 2, 96, 8, 6, i_range, f_range, np.float64)
    weights = np.random.default_rng(4).standard_normal((1, 2, 96, 6))
    with jax.enable_x64(True):
        loss = _loss("parallel", 16, jnp.asarray(weights))
        ref = jax.grad(loss, argnums=(0, 1, 2, 3, 4))(*map(jnp.asarray, inputs))
        ref = [np.asarray(g) for g in ref]
    inputs32 = [jnp.asarray(x, jnp.float32) for x in inputs]
    w32 = jnp.asarray(weights, jnp.float32)
    for form in FORMS:
        grads = jax.jit(jax.grad(_loss(form, 16, w32), argnums=(0, 1, 2, 3, 4)))(*inputs32)
        for name, g, g_ref in zip("qkvif", grads, ref, strict=True):
            assert rel_err(g, g_ref) <= 1e-3, (form, name)


# ---------------------------------------------------------------------------------------------------
# State carrying
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["chunkwise", "recurrent"])
@pytest.mark.parametrize("split", [1, 37, 64])
def test_two_halves_equal_whole(form, split):
    inputs = tuple(map(jnp.asarray, make_inputs(5, 2, 2, 100, 8, 4, (-5, 5), (-2, 8))))
    fn = {
        "chunkwise": functools.partial(X.mlstm_chunkwise, chunk_size=16),
        "recurrent": X.mlstm_recurrent,
    }[form]
    whole, whole_state = fn(*inputs, return_last_state=True)
    first, state = fn(*(x[:, :, :split] for x in inputs), return_last_state=True)
    second, last_state = fn(
        *(x[:, :, split:] for x in inputs), initial_state=state, return_last_state=True
    )
    both = jnp.concatenate([first, second], axis=2)
    assert rel_err(both, whole) <= 1e-5
    for a, b in zip(jax.tree.leaves(last_state), jax.tree.leaves(whole_state), strict=True):
        assert rel_err(a, b) <= 1e-5


def test_step_continues_chunkwise_prefill():
    q, k, v, i, f = map(jnp.asarray, make_inputs(6, 1, 2, 40, 8, 4, (-5, 5), (-2, 8)))
    whole = X.mlstm_recurrent(q, k, v, i, f)
    _, state = X.mlstm_chunkwise(
        q[:, :, :30], k[:, :, :30], v[:, :, :30], i[:, :, :30], f[:, :, :30],
        chunk_size=8, return_last_state=True,
    )  # fmt: skip
    for t in range(30, 40):
        h, state = X.mlstm_recurrent_step(
            state, q[:, :, t], k[:, :, t], v[:, :, t], i[:, :, t], f[:, :, t]
        )
        assert rel_err(h, whole[:, :, t]) <= 1e-5


# ---------------------------------------------------------------------------------------------------
# Stability at extreme gates, float32 and bfloat16
# ---------------------------------------------------------------------------------------------------


def _extreme_gates(seq_len, rng):
    """Batch rows: uniform in [-1e3, 1e3], all -1e3, all +1e3, alternating ±1e3 (i and f opposite)."""
    shape = (1, 2, seq_len)
    sign = np.broadcast_to(np.where(np.arange(seq_len) % 2 == 0, 1.0, -1.0), shape)
    igate = [rng.uniform(-1e3, 1e3, shape), np.full(shape, -1e3), np.full(shape, 1e3), 1e3 * sign]
    fgate = [rng.uniform(-1e3, 1e3, shape), np.full(shape, -1e3), np.full(shape, 1e3), -1e3 * sign]
    return np.concatenate(igate), np.concatenate(fgate)


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("seq_len", [7, 512])
def test_extreme_gates_finite(form, seq_len):
    rng = np.random.default_rng(7)
    q, k = rng.standard_normal((2, 4, 2, seq_len, 8))
    v = rng.standard_normal((4, 2, seq_len, 8))
    igate, fgate = _extreme_gates(seq_len, rng)
    weights = jnp.asarray(rng.standard_normal((4, 2, seq_len, 8)), jnp.float32)
    grad_fn = jax.jit(jax.grad(_loss(form, 64, weights), argnums=(0, 1, 2, 3, 4)))
    results = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        args = [jnp.asarray(x, dtype) for x in (q, k, v, igate, fgate)]
        out = jitted(form)(*args, chunk_size=64)
        assert out.dtype == dtype
        assert bool(jnp.all(jnp.isfinite(out))), dtype
        for g in grad_fn(*args):
            assert bool(jnp.all(jnp.isfinite(g))), dtype
        results[dtype] = (out, args)
    # bf16 against float32 computed on the same (bf16-rounded) input values, per pattern
    out16, args16 = results[jnp.bfloat16]
    out32 = jitted(form)(*(a.astype(jnp.float32) for a in args16), chunk_size=64)
    for pattern in range(4):
        assert rel_err(out16[pattern], out32[pattern]) <= 2e-2, pattern


# ---------------------------------------------------------------------------------------------------
# Memory and runtime type checking
# ---------------------------------------------------------------------------------------------------


def _temp_bytes(fn, seq_len):
    x = jnp.zeros((1, 2, seq_len, 16), jnp.float32)
    g = jnp.zeros((1, 2, seq_len), jnp.float32)
    grad = jax.grad(lambda q, k, v, i, f: fn(q, k, v, i, f).sum(), argnums=(0, 1, 2, 3, 4))
    analysis = jax.jit(grad).lower(x, x, x, g, g).compile().memory_analysis()
    return analysis.temp_size_in_bytes


def test_chunkwise_memory_linear_parallel_quadratic():
    chunk = functools.partial(X.mlstm_chunkwise, chunk_size=32)
    growth_chunk = _temp_bytes(chunk, 2048) / _temp_bytes(chunk, 512)
    growth_par = _temp_bytes(X.parallel_stabilized_simple, 2048) / _temp_bytes(
        X.parallel_stabilized_simple, 512
    )
    assert growth_chunk < 5.0  # 4× the tokens: linear
    assert growth_par > 12.0  # quadratic


def test_shape_mismatch_names_dimension():
    q, k, v, i, f = map(jnp.asarray, make_inputs(8, 1, 2, 10, 8, 4, (-5, 5), (-2, 8)))
    with pytest.raises(jaxtyping.TypeCheckError, match="DHQK"):
        X.parallel_stabilized_simple(q, k[..., :4], v, i, f)
    with pytest.raises(jaxtyping.TypeCheckError, match="S"):
        X.mlstm_chunkwise(q, k, v, i[..., :5], f)
    with pytest.raises((jaxtyping.TypeCheckError, ValueError), match="DHV"):
        X.mlstm_recurrent_step(
            X.mLSTMState.zeros(1, 2, 8, 4),
            q[:, :, 0],
            k[:, :, 0],
            v[:, :, 0, :3],
            i[:, :, 0],
            f[:, :, 0],
        )


def test_bad_input_errors_without_type_checker():
    # The library validates shapes itself too (the type checker is a development aid only).
    from xlstm_eqx import _cell

    q, k, v, i, f = map(jnp.asarray, make_inputs(9, 1, 2, 10, 8, 4, (-5, 5), (-2, 8)))
    with pytest.raises(ValueError, match="DHQK"):
        _cell._prepare(q, k[..., :4], v, i, f)
    with pytest.raises(ValueError, match="fgate_preact"):
        _cell._prepare(q, k, v, i, f[..., :5])
    with pytest.raises(ValueError, match="chunk_size"):
        X.mlstm_chunkwise(q, k, v, i, f, chunk_size=0)


# ---------------------------------------------------------------------------------------------------
# Edge cases (module docstring of `_cell`): invalid values, gate limits, empty inputs, arguments
# ---------------------------------------------------------------------------------------------------


@functools.cache
def _jitted_step():
    return jax.jit(X.mlstm_recurrent_step)


def _step_loop(q, k, v, i, f, chunk_size, initial_state=None, return_last_state=False):
    """`mlstm_recurrent_step` token by token: a fourth form."""
    batch, heads, seq_len, dhqk = q.shape
    state = initial_state
    if state is None:
        state = X.mLSTMState.zeros(batch, heads, dhqk, v.shape[-1])
    outs = []
    for t in range(seq_len):
        h, state = _jitted_step()(state, q[:, :, t], k[:, :, t], v[:, :, t], i[:, :, t], f[:, :, t])
        outs.append(h)
    h = jnp.stack(outs, axis=2)
    return (h, state) if return_last_state else h


STATE_FORMS = {
    "chunkwise": lambda *a, chunk_size, **kw: X.mlstm_chunkwise(*a, chunk_size=chunk_size, **kw),
    "recurrent": lambda *a, chunk_size, **kw: X.mlstm_recurrent(*a, **kw),
    "step": lambda *a, chunk_size, **kw: _step_loop(*a, chunk_size, **kw),
}


@functools.cache
def jitted_with_state(form):
    if form == "step":  # jitted per step
        return STATE_FORMS[form]
    fn = functools.partial(STATE_FORMS[form], return_last_state=True)
    return jax.jit(fn, static_argnames="chunk_size")


def run_form(form, inputs, chunk_size=4, initial_state=None):
    """(h, final state or None) of a form on float32 inputs."""
    if form == "parallel":
        return jitted(form)(*inputs, chunk_size=chunk_size), None
    fn = jitted_with_state(form)
    if form == "step":
        return fn(
            *inputs, chunk_size=chunk_size, initial_state=initial_state, return_last_state=True
        )
    return fn(*inputs, chunk_size=chunk_size, initial_state=initial_state)


ALL_FORMS = ["parallel", "chunkwise", "recurrent", "step"]
# Values that make a token invalid, per input (ĩ = -inf and f̃ = ±inf are valid limits).
INVALID = {
    "q": [np.nan, np.inf, -np.inf],
    "k": [np.nan, np.inf, -np.inf],
    "v": [np.nan, np.inf, -np.inf],
    "i": [np.nan, np.inf],
    "f": [np.nan],
}


def check_invalid_token(h, state, h_clean, state_clean, which, t):
    """The conventions for one invalid value at (batch 1, head 0, time t): earlier outputs and other
    (batch, head) pairs exactly as without it; NaN (all of DHV) where it reaches."""
    h, h_clean = np.asarray(h), np.asarray(h_clean)
    mask = np.zeros(h.shape[:3], bool)
    if which == "q":
        mask[1, 0, t] = True
    else:
        mask[1, 0, t:] = True
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
    form=st.sampled_from(ALL_FORMS),
    which=st.sampled_from("qkvif"),
    seq_len=st.sampled_from([1, 5, 16, 37]),
    chunk_size=st.sampled_from([4, 16]),
    data=st.data(),
)
def test_invalid_token_reaches_only_later_outputs(form, which, seq_len, chunk_size, data):
    value = data.draw(st.sampled_from(INVALID[which]), label="value")
    t = data.draw(st.integers(0, seq_len - 1), label="t")
    inputs = [jnp.asarray(x) for x in make_inputs(10, 2, 2, seq_len, 8, 4, (-5, 5), (-2, 8))]
    index = "qkvif".index(which)
    if which in "qkv":
        d = data.draw(st.integers(0, inputs[index].shape[-1] - 1), label="component")
        bad = inputs[index].at[1, 0, t, d].set(value)
    else:
        bad = inputs[index].at[1, 0, t].set(value)
    h_clean, state_clean = run_form(form, inputs, chunk_size)
    h, state = run_form(form, [*inputs[:index], bad, *inputs[index + 1 :]], chunk_size)
    check_invalid_token(h, state, h_clean, state_clean, which, t)


@pytest.mark.parametrize("form", ALL_FORMS)
@pytest.mark.parametrize("which", "qkvif")
def test_gradient_before_invalid_token(form, which):
    """A loss on the outputs before a NaN input has the gradient of the clean computation (finite)."""
    inputs = [jnp.asarray(x) for x in make_inputs(11, 1, 2, 9, 8, 4, (-5, 5), (-2, 8))]
    index = "qkvif".index(which)
    bad = list(inputs)
    bad[index] = inputs[index].at[0, 1, 3].set(jnp.nan)
    weights = jnp.asarray(np.random.default_rng(12).standard_normal((1, 2, 3, 4)), jnp.float32)

    def loss(*args):
        return jnp.sum(run_form(form, args, 4)[0][:, :, :3] * weights)

    grad = jax.grad(loss, argnums=(0, 1, 2, 3, 4))
    for name, g, g_clean in zip("qkvif", grad(*bad), grad(*inputs), strict=True):
        assert bool(jnp.all(jnp.isfinite(g))), name
        assert rel_err(g, g_clean) <= 1e-6, name


def test_invalid_initial_state_makes_everything_nan():
    inputs = [jnp.asarray(x) for x in make_inputs(13, 2, 2, 10, 8, 4, (-5, 5), (-2, 8))]
    rng = np.random.default_rng(13)
    good = X.mLSTMState(
        c=jnp.asarray(rng.standard_normal((2, 2, 8, 4)), jnp.float32),
        n=jnp.asarray(rng.standard_normal((2, 2, 8)), jnp.float32),
        m=jnp.asarray(rng.standard_normal((2, 2)), jnp.float32),
    )
    bad_states = [
        X.mLSTMState(c=good.c.at[1, 0, 3, 2].set(jnp.nan), n=good.n, m=good.m),
        X.mLSTMState(c=good.c, n=good.n.at[1, 0, 5].set(-jnp.inf), m=good.m),
        X.mLSTMState(c=good.c, n=good.n, m=good.m.at[1, 0].set(jnp.inf)),
    ]
    for form in ["chunkwise", "recurrent", "step"]:
        h_clean, state_clean = run_form(form, inputs, initial_state=good)
        for state in bad_states:
            h, final = run_form(form, inputs, initial_state=state)
            check_invalid_token(h, final, h_clean, state_clean, "k", 0)
    # m = -inf is the empty memory, a valid state: the same as zeros with m = -inf
    empty = X.mLSTMState(c=good.c, n=good.n, m=good.m.at[1, 0].set(-jnp.inf))
    outs = {
        form: run_form(form, inputs, initial_state=empty) for form in ["chunkwise", "recurrent"]
    }
    for h, final in outs.values():
        assert bool(jnp.all(jnp.isfinite(h)))
        assert all(bool(jnp.all(~jnp.isnan(x))) for x in jax.tree.leaves(final))
    assert rel_err(outs["chunkwise"][0], outs["recurrent"][0]) <= 1e-5


def np_limit_inputs(inputs):
    """The gates' ±inf as ±1e4 in float64: there exp(-1e4 - m) and 1/exp(1e4) are exactly 0, so the
    reference computes the limit."""
    q, k, v, i, f = (np.asarray(x, np.float64) for x in inputs)
    return q, k, v, np.clip(i, -1e4, 1e4), np.clip(f, -1e4, 1e4)


def gates_with_limits(inputs, seed, i_frac, f_frac, f_plus):
    q, k, v, i, f = (np.asarray(x) for x in inputs)
    rng = np.random.default_rng(seed)
    i = np.where(rng.random(i.shape) < i_frac, -np.inf, i).astype(np.float32)
    f = np.where(rng.random(f.shape) < f_frac, -np.inf, f)
    f = np.where(rng.random(f.shape) < f_plus, np.inf, f).astype(np.float32)
    return [q, k, v, i, f]


@hypothesis.given(
    seq_len=st.sampled_from([1, 7, 16, 37]),
    chunk_size=st.sampled_from([4, 16]),
    seed=st.integers(0, 2**16),
    i_frac=st.sampled_from([0.0, 0.3, 0.8, 1.0]),
    f_frac=st.sampled_from([0.0, 0.1, 0.4, 1.0]),
    f_plus=st.sampled_from([0.0, 0.3]),
)
def test_infinite_gates_are_the_limits(seq_len, chunk_size, seed, i_frac, f_frac, f_plus):
    """ĩ = -inf writes nothing, f̃ = -inf clears the memory first, f̃ = +inf forgets nothing: every
    form equals the float64 reference at ±1e4 (the limit) and the others, final states included."""
    inputs = make_inputs(seed, 2, 2, seq_len, 8, 4, (-5, 5), (-2, 8))
    inputs = gates_with_limits(inputs, seed, i_frac, f_frac, f_plus)
    with np.errstate(over="ignore"):  # exp(1e4) = inf: the normaliser of a row with nothing to read
        ref = np_mlstm(*np_limit_inputs(inputs))
    outs = {}
    for form in ALL_FORMS:
        h, state = run_form(form, [jnp.asarray(x) for x in inputs], chunk_size)
        assert bool(jnp.all(jnp.isfinite(h))), form
        assert rel_err(h, ref) <= 1e-4, form
        outs[form] = h, state
    for form in ["recurrent", "step"]:
        assert rel_err(outs[form][0], outs["chunkwise"][0]) <= 1e-5
        for name in ("c", "n", "m"):
            x, y = (np.asarray(getattr(outs[f][1], name)) for f in (form, "chunkwise"))
            np.testing.assert_array_equal(np.isneginf(x), np.isneginf(y))  # empty memories
            assert rel_err(np.where(np.isneginf(x), 0, x), np.where(np.isneginf(y), 0, y)) <= 1e-5


@pytest.mark.parametrize("form", ["parallel", "chunkwise", "recurrent"])
def test_infinite_gates_gradients_are_the_limits(form):
    """Gradients at ±inf gates: finite, and the float64 gradient at ±1e4."""
    inputs = make_inputs(14, 1, 2, 40, 8, 6, (-5.0, 5.0), (-2.0, 8.0))
    inputs = gates_with_limits(inputs, 14, 0.3, 0.1, 0.2)
    inputs[3][0, 1, :] = -np.inf  # one head that never writes: h = 0
    inputs[3][0, 1, 7] = 2.0  # but once, then cleared at t = 20
    inputs[4][0, 1, 20] = -np.inf
    weights = np.random.default_rng(15).standard_normal((1, 2, 40, 6))
    with jax.enable_x64(True):
        loss = _loss("parallel", 16, jnp.asarray(weights))
        ref = jax.grad(loss, argnums=(0, 1, 2, 3, 4))(*map(jnp.asarray, np_limit_inputs(inputs)))
        ref = [np.asarray(g) for g in ref]
    grads = jax.jit(
        jax.grad(_loss(form, 16, jnp.asarray(weights, jnp.float32)), argnums=(0, 1, 2, 3, 4))
    )(*map(jnp.asarray, inputs))
    for name, g, g_ref in zip("qkvif", grads, ref, strict=True):
        assert bool(jnp.all(jnp.isfinite(g))), name
        assert rel_err(g, g_ref) <= 1e-3, name


@pytest.mark.parametrize("form", ALL_FORMS)
@pytest.mark.parametrize(
    "shape",
    [(2, 3, 0, 8, 4), (0, 3, 5, 8, 4), (2, 0, 5, 8, 4), (2, 3, 5, 8, 0), (2, 3, 5, 0, 4)],
    ids=["S=0", "B=0", "NH=0", "DHV=0", "DHQK=0"],
)
def test_empty_dimensions(form, shape):
    """S = 0: empty h, the initial state unchanged; B, NH, DHV = 0: empty h; DHQK = 0: h = 0. The same
    in every form; the memory's n and m do not depend on DHV."""
    batch, heads, seq_len, dhqk, dhv = shape
    if form == "step" and seq_len == 0:
        pytest.skip("one token per call")
    rng = np.random.default_rng(16)
    inputs = [jnp.asarray(x) for x in make_inputs(16, *shape, (-5, 5), (-2, 8))]
    init = X.mLSTMState(
        c=jnp.asarray(rng.standard_normal((batch, heads, dhqk, dhv)), jnp.float32),
        n=jnp.asarray(rng.standard_normal((batch, heads, dhqk)), jnp.float32),
        m=jnp.asarray(rng.standard_normal((batch, heads)), jnp.float32),
    )
    if form == "parallel":
        h = X.parallel_stabilized_simple(*inputs)
        state = None
    else:
        h, state = STATE_FORMS[form](
            *inputs, chunk_size=4, initial_state=init, return_last_state=True
        )
    assert h.shape == (batch, heads, seq_len, dhv) and h.dtype == jnp.float32
    if dhqk == 0:
        np.testing.assert_array_equal(np.asarray(h), 0.0)
    if state is None:
        return
    if seq_len == 0:
        for x, x0 in zip(jax.tree.leaves(state), jax.tree.leaves(init), strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(x0))
    if dhv == 0:  # n and m as with values
        wide = [*inputs[:2], jnp.ones((batch, heads, seq_len, 3)), *inputs[3:]]
        wide_init = X.mLSTMState(c=jnp.zeros((batch, heads, dhqk, 3)), n=init.n, m=init.m)
        _, ref = STATE_FORMS[form](
            *wide, chunk_size=4, initial_state=wide_init, return_last_state=True
        )
        np.testing.assert_array_equal(np.asarray(state.n), np.asarray(ref.n))
        np.testing.assert_array_equal(np.asarray(state.m), np.asarray(ref.m))


def test_empty_sequence_without_initial_state():
    q = jnp.zeros((2, 3, 0, 8))
    g = jnp.zeros((2, 3, 0))
    for form in ["chunkwise", "recurrent"]:
        h, state = STATE_FORMS[form](q, q, q[..., :4], g, g, chunk_size=4, return_last_state=True)
        assert h.shape == (2, 3, 0, 4)
        zeros = X.mLSTMState.zeros(2, 3, 8, 4)
        for x, x0 in zip(jax.tree.leaves(state), jax.tree.leaves(zeros), strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(x0))


BAD_CHUNK_SIZES = [0, -3, 2.5, 4.0, True, False, "4", None]


@pytest.mark.parametrize("chunk_size", BAD_CHUNK_SIZES, ids=repr)
def test_chunk_size_must_be_a_positive_integer(chunk_size):
    q, k, v, i, f = map(jnp.asarray, make_inputs(17, 1, 2, 10, 8, 4, (-5, 5), (-2, 8)))
    # With the test run's type checker a wrong type may be caught first; both name the argument.
    with pytest.raises((jaxtyping.TypeCheckError, ValueError), match="chunk_size"):
        X.mlstm_chunkwise(q, k, v, i, f, chunk_size=chunk_size)
    with pytest.raises(ValueError, match="chunk_size"):  # the library's own check
        inspect.unwrap(X.mlstm_chunkwise)(q, k, v, i, f, chunk_size=chunk_size)


def test_chunk_size_numpy_integer_accepted():
    q, k, v, i, f = map(jnp.asarray, make_inputs(17, 1, 2, 10, 8, 4, (-5, 5), (-2, 8)))
    ref = X.mlstm_chunkwise(q, k, v, i, f, chunk_size=4)
    out = inspect.unwrap(X.mlstm_chunkwise)(q, k, v, i, f, chunk_size=np.int64(4))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))


@pytest.mark.parametrize("form", [*FORMS, "step"])
@pytest.mark.parametrize(
    "argument, dtype",
    [(0, jnp.int32), (1, jnp.bool_), (2, jnp.int8), (3, jnp.int32), (4, jnp.uint8)],
    ids=["queries-int32", "keys-bool", "values-int8", "igate-int32", "fgate-uint8"],
)
def test_integer_inputs_are_a_type_error(form, argument, dtype):
    inputs = list(map(jnp.asarray, make_inputs(18, 1, 2, 6, 8, 4, (-5, 5), (-2, 8))))
    if form == "step":
        fn = X.mlstm_recurrent_step
        names = ["q", "k", "v", "igate_preact", "fgate_preact"]
        args = [X.mLSTMState.zeros(1, 2, 8, 4), *(x[:, :, 0] for x in inputs)]
        args[argument + 1] = args[argument + 1].astype(dtype)
    else:
        fn = {
            "parallel": X.parallel_stabilized_simple,
            "chunkwise": X.mlstm_chunkwise,
            "recurrent": X.mlstm_recurrent,
        }[form]
        names = ["queries", "keys", "values", "igate_preact", "fgate_preact"]
        args = list(inputs)
        args[argument] = args[argument].astype(dtype)
    short = {"int32": "i32", "bool": "bool", "int8": "i8", "uint8": "u8"}[jnp.dtype(dtype).name]
    pattern = rf"(?s)\b{names[argument]}\b.*({jnp.dtype(dtype).name}|{short})"
    with pytest.raises(TypeError, match=pattern):  # the type checker's TypeCheckError is one
        fn(*args)
    with pytest.raises(TypeError, match=pattern):  # the library's own check
        inspect.unwrap(fn)(*args)


def test_mixed_qkv_dtypes():
    """q, k, v of different float dtypes: each cast to float32, h in the dtype of the queries."""
    inputs = list(map(jnp.asarray, make_inputs(19, 1, 2, 20, 8, 4, (-5, 5), (-2, 8))))
    q, k, v, i, f = inputs
    for dtypes in [
        (jnp.bfloat16, jnp.float32, jnp.float16),
        (jnp.float16, jnp.bfloat16, jnp.float32),
    ]:
        mixed = [x.astype(d) for x, d in zip((q, k, v), dtypes, strict=True)]
        wide = [x.astype(jnp.float32) for x in mixed]
        outs = []
        for form in ALL_FORMS:
            out = run_form(form, [*mixed, i, f], 4)[0]
            ref = run_form(form, [*wide, i, f], 4)[0]
            assert out.dtype == dtypes[0], form
            np.testing.assert_array_equal(np.asarray(out), np.asarray(ref.astype(dtypes[0])))
            outs.append(out.astype(jnp.float32))
        for out in outs[1:]:
            assert rel_err(out, outs[0]) <= 1e-2
