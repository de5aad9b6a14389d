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
    )[0],
    "recurrent": lambda q, k, v, i, f, chunk_size: X.mlstm_recurrent(q, k, v, i, f)[0],
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


def weighted_loss(form, chunk_size, weights):
    def loss(q, k, v, i, f):
        out = FORMS[form](q, k, v, i, f, chunk_size)
        return jnp.sum(out.astype(weights.dtype) * weights)

    return loss


@pytest.mark.slow
@pytest.mark.parametrize(
    "i_range,f_range",
    [((-5.0, 5.0), (-2.0, 8.0)), ((-30.0, 50.0), (-50.0, 30.0)), ((20.0, 50.0), (-50.0, -20.0))],
    ids=["trained", "wide", "extreme"],
)
def test_gradients_match_float64_parallel(i_range, f_range):
    inputs = make_inputs(3, 1, 2, 96, 8, 6, i_range, f_range, np.float64)
    weights = np.random.default_rng(4).standard_normal((1, 2, 96, 6))
    with jax.enable_x64(True):
        loss = weighted_loss("parallel", 16, jnp.asarray(weights))
        ref = jax.grad(loss, argnums=(0, 1, 2, 3, 4))(*map(jnp.asarray, inputs))
        ref = [np.asarray(g) for g in ref]
    inputs32 = [jnp.asarray(x, jnp.float32) for x in inputs]
    w32 = jnp.asarray(weights, jnp.float32)
    for form in FORMS:
        grads = jax.jit(jax.grad(weighted_loss(form, 16, w32), argnums=(0, 1, 2, 3, 4)))(*inputs32)
        for name, g, g_ref in zip("qkvif", grads, ref, strict=True):
            assert rel_err(g, g_ref) <= 1e-3, (form, name)


# ---------------------------------------------------------------------------------------------------
# State carrying
# ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("form", ["chunkwise", "recurrent"])
@pytest.mark.parametrize("split", [1, 37, 64])
def test_two_halves_equal_whole(form, split):
    inputs = tuple(map(jnp.asarray, make_inputs(5, 2, 2, 100, 8, 4, (-5, 5), (-2, 8))))
    fn = {
        "chunkwise": functools.partial(X.mlstm_chunkwise, chunk_size=16),
        "recurrent": X.mlstm_recurrent,
    }[form]
    fn = jax.jit(fn)  # eager dispatch costs about a minute
    whole, whole_state = fn(*inputs)
    first, state = fn(*(x[:, :, :split] for x in inputs))
    second, last_state = fn(*(x[:, :, split:] for x in inputs), initial_state=state)
    both = jnp.concatenate([first, second], axis=2)
    assert rel_err(both, whole) <= 1e-5
    for a, b in zip(jax.tree.leaves(last_state), jax.tree.leaves(whole_state), strict=True):
        assert rel_err(a, b) <= 1e-5


def test_step_continues_chunkwise_prefill():
    q, k, v, i, f = map(jnp.asarray, make_inputs(6, 1, 2, 40, 8, 4, (-5, 5), (-2, 8)))
    whole, _ = X.mlstm_recurrent(q, k, v, i, f)
    _, state = X.mlstm_chunkwise(
        q[:, :, :30], k[:, :, :30], v[:, :, :30], i[:, :, :30], f[:, :, :30], chunk_size=8
    )
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


@pytest.mark.slow
@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("seq_len", [7, 512])
def test_extreme_gates_finite(form, seq_len):
    rng = np.random.default_rng(7)
    q, k = rng.standard_normal((2, 4, 2, seq_len, 8))
    v = rng.standard_normal((4, 2, seq_len, 8))
    igate, fgate = _extreme_gates(seq_len, rng)
    weights = jnp.asarray(rng.standard_normal((4, 2, seq_len, 8)), jnp.float32)
    grad_fn = jax.jit(jax.grad(weighted_loss(form, 64, weights), argnums=(0, 1, 2, 3, 4)))
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


@pytest.mark.slow
def test_chunkwise_memory_linear_parallel_quadratic():
    def chunk(*inputs):
        return X.mlstm_chunkwise(*inputs, chunk_size=32)[0]

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
    from xlstm_eqx.cell.forms import validate_and_cast_inputs

    validate = inspect.unwrap(validate_and_cast_inputs)  # without the jaxtyping wrapper
    q, k, v, i, f = map(jnp.asarray, make_inputs(9, 1, 2, 10, 8, 4, (-5, 5), (-2, 8)))
    with pytest.raises(ValueError, match="DHQK"):
        validate(q, k[..., :4], v, i, f)
    with pytest.raises(ValueError, match="fgate_preact"):
        validate(q, k, v, i, f[..., :5])
    with pytest.raises(ValueError, match="chunk_size"):
        X.mlstm_chunkwise(q, k, v, i, f, chunk_size=0)


def test_backend_dispatch_stateless_and_stateful():
    """`run_backend` gives h (the parallel form for "parallel_stabilized": the training path);
    `run_backend_with_state` gives (h, state), with the chunkwise form for the parallel backend."""
    from xlstm_eqx.cell import run_backend, run_backend_with_state

    inputs = tuple(map(jnp.asarray, make_inputs(31, 1, 2, 12, 8, 4, (-5, 5), (-2, 8))))
    options = (("chunk_size", 4),)
    h = run_backend("parallel_stabilized", options, *inputs)
    np.testing.assert_array_equal(h, X.parallel_stabilized_simple(*inputs))
    h, state = run_backend_with_state("parallel_stabilized", options, None, *inputs)
    h_ref, state_ref = X.mlstm_chunkwise(*inputs, chunk_size=4)
    np.testing.assert_array_equal(h, h_ref)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(state_ref), strict=True):
        np.testing.assert_array_equal(a, b)
    h2, _ = run_backend_with_state("recurrent", (), state, *inputs)  # continues from a state
    np.testing.assert_array_equal(h2, X.mlstm_recurrent(*inputs, initial_state=state)[0])
    for run in (run_backend, lambda *a: run_backend_with_state(a[0], a[1], None, *a[2:])):
        with pytest.raises(ValueError, match="unknown backend 'nope'"):
            run("nope", (), *inputs)
