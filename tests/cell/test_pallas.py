"""The Pallas chunkwise mLSTM against the pure-JAX chunkwise form, and the remat policies.

On CPU the kernels run in Pallas interpret mode (compiling them takes seconds: the shapes are tiny
and few). Their Triton (GPU) lowering is checked by exporting for CUDA without a GPU.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import jax.random as jr
import jaxtyping
import numpy as np
import pytest
from jax import export

import xlstm_eqx as X
from xlstm_eqx.cell import REMAT_POLICIES, mlstm_chunkwise_pallas, mlstm_chunkwise_remat


def rel_err(x, ref) -> float:
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(x - ref)) / max(np.max(np.abs(ref)), 1e-30))


def make_case(seed, batch, heads, seq_len, dhqk, dhv, i_range, f_range, init, dtype=np.float32):
    """Inputs (q, k, v, ĩ, f̃), an optional initial state, and random weights for a scalar loss."""
    rng = np.random.default_rng(seed)

    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape).astype(dtype))

    inputs = (
        normal(batch, heads, seq_len, dhqk),
        normal(batch, heads, seq_len, dhqk),
        normal(batch, heads, seq_len, dhv),
        jnp.asarray(rng.uniform(*i_range, (batch, heads, seq_len)).astype(dtype)),
        jnp.asarray(rng.uniform(*f_range, (batch, heads, seq_len)).astype(dtype)),
    )
    state = None
    if init:
        state = X.mLSTMState(
            c=normal(batch, heads, dhqk, dhv), n=normal(batch, heads, dhqk), m=normal(batch, heads)
        )
    weights = X.mLSTMState(
        c=normal(batch, heads, dhqk, dhv), n=normal(batch, heads, dhqk), m=normal(batch, heads)
    )
    return inputs, state, normal(batch, heads, seq_len, dhv), weights


@functools.cache  # one jitted function per setting: shapes seen before are not recompiled
def loss_fn(cell, **kwargs):
    """(inputs, state) -> Σ h·w_h + Σ final state · w (with h and the state as aux): one compile
    gives the forward values and every gradient, through h and through the final (c, n, m)."""

    def loss(inputs, state, w_h, w_state):
        h, final = cell(*inputs, initial_state=state, **kwargs)
        total = jnp.sum(h * w_h) + sum(
            jnp.sum(a * b)
            for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(w_state), strict=True)
        )
        return total, (h, final)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))


def assert_close(ours, ref, tol):
    (_, (h, final)), grads = ours
    (_, (h_ref, final_ref)), grads_ref = ref
    assert rel_err(h, h_ref) <= tol, f"h: {rel_err(h, h_ref):.2e}"
    for name in ("c", "n", "m"):
        err = rel_err(getattr(final, name), getattr(final_ref, name))
        assert err <= tol, f"final state {name}: {err:.2e}"
    leaves, leaves_ref = jax.tree.leaves(grads), jax.tree.leaves(grads_ref)
    names = ["dq", "dk", "dv", "d igate", "d fgate", "d c0", "d n0", "d m0"][: len(leaves_ref)]
    for name, g, g_ref in zip(names, leaves, leaves_ref, strict=True):
        assert g.dtype == g_ref.dtype, name
        assert rel_err(g, g_ref) <= tol, f"{name}: {rel_err(g, g_ref):.2e}"


# B, NH, S, DHQK, DHV, chunk_size, initial state, ĩ range, f̃ range, eps
CASES = {
    # S not a multiple of the chunk, DHQK ≠ DHV, both padded to 16 inside; stabiliser from the
    # row maximum, normaliser floor exp(-m) active on about half the rows.
    "padded": (1, 2, 37, 8, 12, 16, True, (-3.0, 3.0), (-2.0, 6.0), 1e-6),
    # several whole chunks, no padding; zero initial state; large eps so its paths matter.
    "whole_chunks": (2, 1, 48, 16, 32, 16, False, (-3.0, 3.0), (-2.0, 6.0), 1e-2),
    # one chunk shorter than chunk_size (rounded up to 16); tiny input gates: the stabiliser comes
    # from the carried state and the normaliser floor is active.
    "short": (1, 1, 5, 4, 3, 64, True, (-10.0, -5.0), (3.0, 8.0), 1e-6),
    # strong inputs, fast forgetting.
    "strong_inputs": (1, 2, 40, 8, 8, 32, True, (0.0, 8.0), (-6.0, 0.0), 1e-6),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_matches_chunkwise_float32(case):
    batch, heads, seq_len, dhqk, dhv, chunk, init, i_range, f_range, eps = CASES[case]
    inputs, state, w_h, w_state = make_case(
        0, batch, heads, seq_len, dhqk, dhv, i_range, f_range, init
    )
    ours = loss_fn(mlstm_chunkwise_pallas, chunk_size=chunk, eps=eps)(inputs, state, w_h, w_state)
    ref = loss_fn(X.mlstm_chunkwise, chunk_size=chunk, eps=eps)(inputs, state, w_h, w_state)
    assert ours[0][1][0].dtype == jnp.float32
    assert_close(ours, ref, 1e-4)


@pytest.mark.slow
def test_gradient_exact_in_float64():
    """In float64 the gradient matches autodiff of the pure-JAX form to ~1e-12: the derivative paths
    through the stabiliser and eps (relative size ~1e-6, invisible in float32) are all there."""
    with jax.enable_x64(True):
        inputs, state, w_h, w_state = make_case(
            1, 1, 2, 21, 8, 4, (-4.0, 2.0), (-1.0, 5.0), True, dtype=np.float64
        )
        ours = loss_fn(mlstm_chunkwise_pallas, chunk_size=16)(inputs, state, w_h, w_state)
        ref = loss_fn(X.mlstm_chunkwise, chunk_size=16)(inputs, state, w_h, w_state)
        assert ours[0][1][0].dtype == jnp.float64
        assert_close(ours, ref, 1e-10)


@pytest.mark.slow
def test_bfloat16_inputs_four_dim_gates_and_vmap():
    inputs, _, _, _ = make_case(2, 2, 2, 24, 16, 16, (-3.0, 3.0), (-2.0, 6.0), False)
    q, k, v, i, f = inputs
    q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
    i, f = i[..., None], f[..., None]

    def one(q, k, v, i, f):  # one batch element, as (1, NH, S, ·)
        h, _ = mlstm_chunkwise_pallas(q[None], k[None], v[None], i[None], f[None], chunk_size=16)
        return h[0]

    h = jax.jit(jax.vmap(one))(q, k, v, i, f)
    h_ref, _ = X.mlstm_chunkwise(q, k, v, i, f, chunk_size=16)
    assert h.dtype == jnp.bfloat16
    assert rel_err(h, h_ref) <= 1e-2  # both compute in float32 and round once to bfloat16


def test_bad_input_raises_before_any_kernel():
    inputs, _, _, _ = make_case(3, 1, 2, 8, 4, 4, (0.0, 1.0), (0.0, 1.0), False)
    q, k, v, i, f = inputs
    with pytest.raises(ValueError, match="chunk_size"):
        mlstm_chunkwise_pallas(q, k, v, i, f, chunk_size=0)
    # Shape mismatches: the type checker of the test run, or the function's own check, names them.
    with pytest.raises((jaxtyping.TypeCheckError, ValueError), match="DHQK"):
        mlstm_chunkwise_pallas(q, k[..., :3], v, i, f)
    with pytest.raises((jaxtyping.TypeCheckError, ValueError), match="S"):
        mlstm_chunkwise_pallas(q, k, v, i, f[:, :, :5])
    bad = X.mLSTMState.zeros(1, 2, 4, 5)
    with pytest.raises(ValueError, match="initial_state.c"):
        mlstm_chunkwise_pallas(q, k, v, i, f, initial_state=bad)


def test_triton_lowering_for_gpu():
    """Forward and backward lower through Pallas' Triton backend (export for CUDA, no GPU needed):
    all four kernels become Triton calls, nothing falls back to interpret mode."""
    shapes = [(1, 2, 100, 64), (1, 2, 100, 64), (1, 2, 100, 48), (1, 2, 100), (1, 2, 100)]
    specs = [jax.ShapeDtypeStruct(s, jnp.bfloat16 if len(s) == 4 else jnp.float32) for s in shapes]

    def loss(*inputs):
        h, final = mlstm_chunkwise_pallas(*inputs, chunk_size=64, interpret=False)
        return jnp.sum(h.astype(jnp.float32)) + jnp.sum(final.c)

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))
    exported = export.export(
        fn,
        platforms=["cuda"],
        disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
    )(*specs)
    module = exported.mlir_module()
    for name in (
        "mlstm_chunk_states_fwd",
        "mlstm_chunk_outputs_fwd",
        "mlstm_chunk_outputs_bwd",
        "mlstm_chunk_states_bwd",
    ):
        assert f'name = "{name}"' in module, name
    assert module.count("__gpu$xla.gpu.triton") == 4


# ---------------------------------------------------------------------------------------------------
# Remat policies
# ---------------------------------------------------------------------------------------------------


# policy, S, chunk_size, chunks_per_step, initial state
REMAT_CASES = [
    ("chunk_states", 50, 4, 3, True),  # 4 scan steps of 12 tokens + a remainder of 2
    ("chunk_states", 13, 8, 1, False),  # fewer than two steps: a single call
    ("full", 24, 8, 1, True),
    ("none", 24, 8, 1, True),
]


@pytest.mark.slow
@pytest.mark.parametrize("policy, seq_len, chunk_size, chunks_per_step, init", REMAT_CASES)
def test_remat_same_values_and_gradients(policy, seq_len, chunk_size, chunks_per_step, init):
    assert set(REMAT_POLICIES) == {case[0] for case in REMAT_CASES}
    inputs, state, w_h, w_state = make_case(
        seq_len, 1, 2, seq_len, 4, 6, (-3.0, 3.0), (-2.0, 6.0), init
    )
    ours = loss_fn(
        mlstm_chunkwise_remat,
        chunk_size=chunk_size,
        remat=policy,
        chunks_per_step=chunks_per_step,
    )(inputs, state, w_h, w_state)
    ref = loss_fn(X.mlstm_chunkwise, chunk_size=chunk_size)(inputs, state, w_h, w_state)
    assert_close(ours, ref, 1e-5)


def test_remat_chunk_states_lowers_planned_memory():
    """XLA's planned temporaries for forward+backward: the chunk-states policy keeps only the chunk
    states and rebuilds one chunk's matrices at a time, so its temporaries are smaller than even
    one L×L float32 matrix per chunk (S·L per head), of which plain autodiff keeps several."""
    heads, seq_len, chunk = 1, 2048, 64
    shape = (1, heads, seq_len, 32)
    specs = [jax.ShapeDtypeStruct(shape, jnp.float32)] * 3 + [
        jax.ShapeDtypeStruct(shape[:3], jnp.float32)
    ] * 2

    def temp_bytes(policy):
        def loss(*inputs):
            h, _ = mlstm_chunkwise_remat(*inputs, chunk_size=chunk, remat=policy)
            return jnp.sum(h)

        grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))
        return grad.lower(*specs).compile().memory_analysis().temp_size_in_bytes

    assert temp_bytes("chunk_states") < heads * seq_len * chunk * 4


def test_remat_bad_arguments():
    inputs, _, _, _ = make_case(4, 1, 1, 8, 4, 4, (0.0, 1.0), (0.0, 1.0), False)
    with pytest.raises(ValueError, match="remat must be one of"):
        mlstm_chunkwise_remat(*inputs, remat="everything")
    with pytest.raises(ValueError, match="chunks_per_step"):
        mlstm_chunkwise_remat(*inputs, chunks_per_step=0)
    with pytest.raises(ValueError, match="chunk_size"):
        mlstm_chunkwise_remat(*inputs, chunk_size=-1)


@pytest.mark.slow
def test_model_backend_chunkwise_pallas_matches_chunkwise():
    """`mLSTMCellConfig(backend="chunkwise_pallas")` selects the kernel; same key, same logits."""
    import dataclasses

    import jax.random as jr

    import xlstm_eqx as X

    def model_with(backend):
        cfg = X.get_preset("tiny_xlstm")
        cell = dataclasses.replace(cfg.mlstm_block.mlstm.mlstm_cell, backend=backend)
        layer = dataclasses.replace(cfg.mlstm_block.mlstm, mlstm_cell=cell)
        block = dataclasses.replace(cfg.mlstm_block, mlstm=layer)
        return X.xLSTMLMModel(dataclasses.replace(cfg, mlstm_block=block), key=jr.key(0))

    tokens = jr.randint(jr.key(1), (2, 21), 0, 64)
    ref = model_with({"name": "chunkwise", "kwargs": {"chunk_size": 16}})(tokens)
    out = model_with({"name": "chunkwise_pallas", "kwargs": {"chunk_size": 16}})(tokens)
    assert jnp.max(jnp.abs(out - ref)) <= 1e-4


# ---------------------------------------------------------------------------------------------------
# the "auto" backend


import xlstm_eqx.cell.autotune as pallas_module  # noqa: E402
from xlstm_eqx.cell import run_backend  # noqa: E402


@pytest.mark.slow
def test_auto_off_gpu_is_chunkwise_without_timing(monkeypatch):
    def no_timing(*args, **kwargs):
        raise AssertionError("timed off a GPU")

    monkeypatch.setattr(pallas_module, "time_chunkwise_backends", no_timing)
    monkeypatch.setattr(pallas_module, "_FASTEST", {})
    choice = pallas_module.fastest_chunkwise_backend((1, 2, 8, 4), (1, 2, 8, 4), jnp.float32)
    assert choice == "chunkwise"
    (q, k, v, i, f), _, _, _ = make_case(0, 1, 2, 20, 8, 8, (-3, 3), (-1, 5), False)
    out = run_backend("auto", (("chunk_size", 8),), q, k, v, i, f)
    ref, _ = X.mlstm_chunkwise(q, k, v, i, f, chunk_size=8)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))


def test_auto_on_gpu_takes_the_faster_and_times_once(monkeypatch):
    calls = []

    def fake_timing(q_shape, v_shape, dtype, *, chunk_size, eps):
        calls.append((q_shape, chunk_size))
        return (
            {"chunkwise": 2.0, "chunkwise_pallas": 1.0}
            if chunk_size == 16
            else {
                "chunkwise": 1.0,
                "chunkwise_pallas": 3.0,
            }
        )

    monkeypatch.setattr(pallas_module, "time_chunkwise_backends", fake_timing)
    monkeypatch.setattr(pallas_module, "_FASTEST", {})
    pick = functools.partial(pallas_module.fastest_chunkwise_backend, platform="gpu")
    assert pick((1, 2, 64, 8), (1, 2, 64, 8), jnp.float32, chunk_size=16) == "chunkwise_pallas"
    assert pick((1, 2, 64, 8), (1, 2, 64, 8), jnp.float32, chunk_size=16) == "chunkwise_pallas"
    assert len(calls) == 1
    assert pick((1, 2, 64, 8), (1, 2, 64, 8), jnp.float32, chunk_size=32) == "chunkwise"
    assert len(calls) == 2


def test_auto_falls_back_with_a_warning_when_the_kernels_fail(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no Triton here")

    monkeypatch.setattr(pallas_module, "time_chunkwise_backends", broken)
    monkeypatch.setattr(pallas_module, "_FASTEST", {})
    with pytest.warns(RuntimeWarning, match="no Triton here"):
        choice = pallas_module.fastest_chunkwise_backend(
            (1, 1, 8, 4), (1, 1, 8, 4), jnp.float32, platform="gpu"
        )
    assert choice == "chunkwise"


@pytest.mark.slow
def test_auto_times_for_real_while_jit_traces(monkeypatch):
    """The timing runs eagerly (its own thread) even when called from inside a jit trace."""
    monkeypatch.setattr(pallas_module, "_FASTEST", {})
    seen = []

    @jax.jit
    def traced(x):
        seen.append(
            pallas_module.fastest_chunkwise_backend(
                (1, 1, 24, 8), (1, 1, 24, 8), jnp.float32, chunk_size=16, platform="gpu"
            )
        )
        return x + 1

    traced(jnp.zeros(()))
    assert seen[0] in ("chunkwise", "chunkwise_pallas")
    assert list(pallas_module._FASTEST.values()) == seen
    times = pallas_module.time_chunkwise_backends(
        (1, 1, 24, 8), (1, 1, 24, 8), jnp.float32, chunk_size=16, repeats=1
    )
    assert set(times) == {"chunkwise", "chunkwise_pallas"} and all(t > 0 for t in times.values())
    with pytest.raises(ValueError, match="flash"):
        pallas_module.time_chunkwise_backends(
            (1, 1, 8, 4), (1, 1, 8, 4), jnp.float32, backends=("flash",)
        )


def test_tune_auto_backend_times_before_tracing_and_never_during(monkeypatch):
    """`tune_auto_backend` collects the cell shapes of a whole model by an abstract trace and
    times them eagerly; compiling the model afterwards reads the choices and times nothing."""
    calls = []

    def fake_timing(q_shape, v_shape, dtype, *, chunk_size, eps):
        calls.append(q_shape)
        return {"chunkwise": 2.0, "chunkwise_pallas": 1.0}

    monkeypatch.setattr(pallas_module, "time_chunkwise_backends", fake_timing)
    monkeypatch.setattr(pallas_module, "_FASTEST", {})
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    config = dataclasses.replace(
        X.get_preset("tiny_xlstm"),
        mlstm_block=X.mLSTMBlockConfig(
            mlstm=X.mLSTMLayerConfig(
                num_heads=2, mlstm_cell=X.mLSTMCellConfig(backend={"name": "auto"})
            )
        ),
    )
    model = X.xLSTMLMModel(config, key=jr.key(0))
    tokens = jnp.zeros((2, 24), jnp.int32)
    choices = pallas_module.tune_auto_backend(lambda m, t: m(t), model, tokens)
    assert set(choices.values()) == {"chunkwise_pallas"} and len(calls) == len(choices) >= 1

    def no_timing(*args, **kwargs):
        raise AssertionError("timed while tracing")

    monkeypatch.setattr(pallas_module, "time_chunkwise_backends", no_timing)
    picked = []
    real = pallas_module.fastest_chunkwise_backend

    def spy(*args, **kwargs):
        picked.append(real(*args, **kwargs))
        return picked[-1]

    monkeypatch.setattr(pallas_module, "fastest_chunkwise_backend", spy)
    jax.eval_shape(lambda m, t: m(t), model, tokens)
    assert picked and set(picked) == {"chunkwise_pallas"}
    assert pallas_module.tune_auto_backend(lambda m, t: m(t), model, tokens, platform="cpu") == {}
