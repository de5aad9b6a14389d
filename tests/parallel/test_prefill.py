"""Prefill on a context-parallel mesh, then decoding (`parallel/prefill.py`)."""

import jax
import jax.random as jr
import pytest

from xlstm_eqx.core import ParallelConfig
from xlstm_eqx.llama import LlamaTransformer
from xlstm_eqx.parallel.mesh import make_mesh
from xlstm_eqx.parallel.prefill import generate_context_parallel, prefill_context_parallel
from xlstm_eqx.presets import tiny_llama


def test_prefill_refuses_a_kv_cache_model_and_bad_counts():
    mesh = make_mesh(ParallelConfig(data_axis_size=1), jax.devices()[:1])
    llama = LlamaTransformer(tiny_llama(), key=jr.key(0))
    prompt = jr.randint(jr.key(1), (1, 8), 0, 64)
    with pytest.raises(ValueError, match="KV cache"):
        prefill_context_parallel(llama, prompt, mesh, ParallelConfig())
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_context_parallel(llama, prompt, 0, mesh, ParallelConfig())
