"""Prefill on a context-parallel mesh, then decoding (`parallel/prefill.py`): the tokens equal
one-device generation; on 4 simulated CPU devices in a subprocess."""

import jax
import jax.random as jr
import pytest

from tests.multiprocess import run_script
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


_WORKER = """
import json, jax, jax.numpy as jnp, jax.random as jr, numpy as np
from xlstm_eqx.core import ParallelConfig
from xlstm_eqx.generation import generate, prefill
from xlstm_eqx.parallel.mesh import make_mesh
from xlstm_eqx.parallel.prefill import generate_context_parallel, prefill_context_parallel
from xlstm_eqx.presets import tiny_xlstm
from xlstm_eqx.xlstm import xLSTMLMModel

model = xLSTMLMModel(tiny_xlstm(), key=jr.key(1))
out = {}
for cp, length in ((4, 33), (4, 35), (2, 35)):  # 32 tokens split (+ the last); 32 + 2 + 1
    prompt = jr.randint(jr.key(length), (2, length), 0, tiny_xlstm().vocab_size)
    pc = ParallelConfig(data_axis_size=1, context_axis_size=cp)
    mesh = make_mesh(pc, jax.devices()[:cp])
    got = generate_context_parallel(model, prompt, 6, mesh, pc)
    want = generate(model, prompt, 6)
    logits, state = jax.jit(lambda m, p: prefill_context_parallel(m, p, mesh, pc))(model, prompt)
    logits1, state1 = prefill(model, prompt, length)
    err = max(
        float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
        for a, b in zip(jax.tree.leaves((logits, state)), jax.tree.leaves((logits1, state1)))
    )
    out[f"{cp}/{length}"] = {"same_tokens": bool(np.array_equal(got, want)), "rel_err": err}
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow  # a subprocess with 4 simulated CPU devices
def test_cp_prefill_then_decode_equals_one_device_generation(tmp_path):
    result = run_script("cp prefill", _WORKER, 4, tmp_path, 900)
    assert set(result) == {"4/33", "4/35", "2/35"}
    for case, row in result.items():
        assert row["same_tokens"], case  # greedy
        assert row["rel_err"] <= 1e-5, (case, row)  # logits and every state leaf
