"""Export for CUDA on the CPU machine: the GPU kernels lower without a GPU.

`jax.export.export(jax.jit(f), platforms=("cuda",))` lowers `f` for CUDA on any host. The choices
that depend on the platform (compiled or interpreted Pallas kernels, cuDNN or Triton attention or
an error) are made when the program is lowered (`jax.lax.platform_dependent`), so the exported
module must hold the kernels themselves, and nothing of the CPU program (the interpreted kernel
bodies, the XLA attention core). A GPU-only lowering error therefore fails here, on a CPU.

The only host query on the way is cuDNN's version (`jax.nn.dot_product_attention` asks jaxlib's
CUDA plugin while tracing, to pick the kernel variants the installed cuDNN supports; a CPU-only
jaxlib has no plugin). The cuDNN tests state the target's version instead (`_CUDNN_VERSION`).
"""

import re

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
import pytest
from jax.export import DisabledSafetyCheck
from jaxtyping import Array, Int

import xlstm_eqx as X
from xlstm_eqx.cell import mlstm_chunkwise_pallas
from xlstm_eqx.llama import LlamaConfig, LlamaTransformer


# Custom-call targets of the GPU kernels: Pallas' Triton lowering and XLA's cuDNN attention.
TRITON = "__gpu$xla.gpu.triton"
CUDNN_ATTENTION = (
    "__cudnn$fmhaSoftmax",
    "__cudnn$fmhaScaleBiasSoftmax",
    "__cudnn$fmhaSoftmaxBackward",
    "__cudnn$fmhaScaleBiasSoftmaxBackward",
)
# Kernels without a stability guarantee: an export must name each one it may contain.
_GPU_TARGETS = [DisabledSafetyCheck.custom_call(name) for name in (TRITON, *CUDNN_ATTENTION)]

# The mLSTM's Pallas kernels (the `name` of each `pallas_call`) and the functions of their bodies,
# which appear in a module's locations only when a kernel was inlined as interpreted XLA ops.
MLSTM_KERNELS = ("mlstm_chunk_states_fwd", "mlstm_chunk_states_bwd", "mlstm_chunk_outputs_bwd")
MLSTM_KERNEL_BODIES = ("_states_kernel", "_outputs_kernel", "_chunk_update", "_chunk_outputs")

_CUDNN_VERSION = 90100  # cuDNN 9.1, what the exported program is built for (module docstring)


def _export_for_cuda(fn, *args) -> str:
    """The StableHLO text of ``jit(fn)`` lowered for CUDA on this host."""
    specs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), args)
    exported = jax.export.export(jax.jit(fn), platforms=("cuda",), disabled_checks=_GPU_TARGETS)(
        *specs
    )
    assert exported.platforms == ("cuda",)
    return exported.mlir_module()


def _custom_calls(module: str) -> list[str]:
    return re.findall(r"stablehlo\.custom_call @([\w$.]+)", module)


def _triton_kernel_names(module: str) -> set[str]:
    """The names of the Triton kernels (each custom call's ``name`` attribute)."""
    return set(re.findall(r'name = "([\w.]+)", num_stages', module))


def _location_names(module: str) -> set[str]:
    """Function and op names in the module's locations (outside the kernels' serialized IR)."""
    return set(re.findall(r'^#loc\d+ = loc\("([^"/:]+)"', module, flags=re.MULTILINE))


def _assert_no_interpreted_mlstm(module: str) -> None:
    inlined = _location_names(module) & set(MLSTM_KERNEL_BODIES)
    assert not inlined, f"interpreted Pallas kernels in the CUDA program: {sorted(inlined)}"


@pytest.fixture
def cudnn_version(monkeypatch):
    """The target's cuDNN version, for the one query a CPU-only jaxlib cannot answer."""
    from jax._src.cudnn import fused_attention_stablehlo

    monkeypatch.setattr(fused_attention_stablehlo, "check_cudnn_version", lambda: _CUDNN_VERSION)


# The mLSTM's Pallas kernels


def _cell_inputs(dtype) -> tuple[Array, ...]:
    batch, heads, seq_len, dhqk, dhv = 1, 2, 48, 16, 32
    keys = jax.random.split(jax.random.key(0), 5)
    q, k = (jax.random.normal(key, (batch, heads, seq_len, dhqk), dtype) for key in keys[:2])
    v = jax.random.normal(keys[2], (batch, heads, seq_len, dhv), dtype)
    i, f = (jax.random.normal(key, (batch, heads, seq_len), dtype) for key in keys[3:])
    return q, k, v, i, f


def _cell_output(q, k, v, i, f) -> Array:
    return mlstm_chunkwise_pallas(q, k, v, i, f, chunk_size=16)[0]


def _cell_gradients(q, k, v, i, f) -> tuple[Array, ...]:
    def loss(*inputs):
        return _cell_output(*inputs).astype(jnp.float32).sum()

    return jax.grad(loss, argnums=(0, 1, 2, 3, 4))(q, k, v, i, f)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_pallas_mlstm_forward_exports_triton_kernels(dtype):
    module = _export_for_cuda(_cell_output, *_cell_inputs(dtype))
    assert set(_custom_calls(module)) == {TRITON}
    assert _triton_kernel_names(module) == {"mlstm_chunk_states_fwd", "mlstm_chunk_outputs_fwd"}
    _assert_no_interpreted_mlstm(module)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_pallas_mlstm_gradient_exports_triton_kernels(dtype):
    module = _export_for_cuda(_cell_gradients, *_cell_inputs(dtype))
    assert set(_custom_calls(module)) == {TRITON}
    assert _triton_kernel_names(module) == set(MLSTM_KERNELS)
    _assert_no_interpreted_mlstm(module)


def test_pallas_mlstm_on_cpu_still_runs_interpreted():
    """The same function lowered for this CPU: the interpreted kernels, no custom call."""
    module = jax.jit(_cell_output).lower(*_cell_inputs(jnp.float32)).as_text(debug_info=True)
    assert TRITON not in module and "_states_kernel" in _location_names(module)


# Whole bf16 train steps


def _train_step_program(model: eqx.Module):
    """``(params, opt_state, tokens) -> (params, opt_state, loss)``: next-token cross entropy,
    its gradient and an AdamW update, the model's static part closed over."""
    params, static = eqx.partition(model, eqx.is_inexact_array)
    optimizer = optax.adamw(1e-3)

    def step(params, opt_state, tokens: Int[Array, "B S"]):
        def loss_fn(params):
            logits = eqx.combine(params, static)(tokens[:, :-1]).astype(jnp.float32)
            losses = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
            return losses.mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        with jax.numpy_dtype_promotion("standard"):  # optax mixes Python floats and int32 counts
            updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step, params, optimizer.init(params)


def _tiny_xlstm_pallas() -> X.xLSTMLMModel:
    config = X.get_preset("tiny_xlstm")
    config.dtype = "bfloat16"
    config.mlstm_block.mlstm.mlstm_cell.backend = "chunkwise_pallas"
    return X.xLSTMLMModel(config, key=jax.random.key(0))


@pytest.mark.slow
def test_xlstm_bf16_train_step_on_chunkwise_pallas_exports_triton_kernels():
    model = _tiny_xlstm_pallas()
    step, params, opt_state = _train_step_program(model)
    tokens = jnp.zeros((2, 33), jnp.int32)
    module = _export_for_cuda(step, params, opt_state, tokens)
    assert set(_custom_calls(module)) == {TRITON}
    assert _triton_kernel_names(module) == {*MLSTM_KERNELS, "mlstm_chunk_outputs_fwd"}
    _assert_no_interpreted_mlstm(module)


def _tiny_llama(backend: str) -> LlamaTransformer:
    config = LlamaConfig(
        vocab_size=64,
        embedding_dim=128,
        num_blocks=2,
        head_dim=64,
        context_length=128,
        dtype="bfloat16",
        attention_backend=backend,
    )
    return LlamaTransformer(config, key=jax.random.key(0))


@pytest.mark.slow
@pytest.mark.usefixtures("cudnn_version")
@pytest.mark.parametrize(
    ("backend", "kernels"),
    [
        ("cudnn", {"__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward"}),
        ("pallas_triton", {TRITON}),
    ],
)
def test_llama_bf16_train_step_exports_gpu_attention(backend, kernels):
    step, params, opt_state = _train_step_program(_tiny_llama(backend))
    tokens = jnp.zeros((2, 129), jnp.int32)
    module = _export_for_cuda(step, params, opt_state, tokens)
    assert set(_custom_calls(module)) == kernels
    assert "_xla_attention" not in _location_names(module)  # the XLA core did not get in
    if backend == "pallas_triton":
        assert _triton_kernel_names(module) == {
            "mha_forward",
            "mha_preprocess_backward",
            "mha_backward",
        }


def test_llama_gpu_attention_on_cpu_raises_when_lowered():
    """Lowering the same model for this CPU names the backend and the platform (as before)."""
    model = _tiny_llama("pallas_triton")
    tokens = jnp.zeros((1, 128), jnp.int32)
    jax.eval_shape(model, tokens)  # tracing is fine: the choice is made when lowering
    with pytest.raises(RuntimeError, match="pallas_triton.*NVIDIA GPU.*'cpu'"):
        eqx.filter_jit(lambda model, tokens: model(tokens)).lower(model, tokens)
