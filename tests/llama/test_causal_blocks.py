"""The XLA attention core (causal: query blocks against key prefixes only; a written-out
backward pass) against an independent full-mask attention, in value and gradients: across block
borders and a partial last block, with and without documents, causal or not."""

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from xlstm_eqx.llama import multihead_attention, segment_mask
from xlstm_eqx.llama.attention import CAUSAL_QUERY_BLOCK


@pytest.mark.parametrize("causal, with_segments", [(True, False), (True, True), (False, True)])
def test_xla_core_matches_full_mask_attention(causal, with_segments):
    B, S, NH, hd = 1, 2 * CAUSAL_QUERY_BLOCK + 37, 2, 8
    q, k, v = (jr.normal(key, (B, S, NH, hd)) for key in jr.split(jr.key(0), 3))
    rng = np.random.default_rng(1)
    seg = None
    if with_segments:  # documents that straddle the block borders
        seg = jnp.asarray(np.cumsum(rng.random((B, S)) < 0.01, axis=1), jnp.int32)

    def ours(q, k, v):
        return multihead_attention(q, k, v, causal=causal, segment_ids=seg, backend="xla")

    def full(q, k, v):
        mask = None if seg is None else segment_mask(seg)
        return jax.nn.dot_product_attention(
            q, k, v, mask=mask, scale=1.0, is_causal=causal, implementation="xla"
        )

    weights = jr.normal(jr.key(2), (B, S, NH, hd))
    out, expected = jax.jit(ours)(q, k, v), jax.jit(full)(q, k, v)
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), rtol=1e-5, atol=1e-5)
    grads = jax.jit(jax.grad(lambda *a: jnp.sum(ours(*a) * weights), argnums=(0, 1, 2)))(q, k, v)
    grads_full = jax.jit(jax.grad(lambda *a: jnp.sum(full(*a) * weights), argnums=(0, 1, 2)))(
        q, k, v
    )
    for got, want in zip(grads, grads_full, strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)
