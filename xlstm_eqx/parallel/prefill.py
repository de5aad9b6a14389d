"""Prefill of a long prompt on a context-parallel mesh, then ordinary decoding.

`prefill_context_parallel` runs the prompt with its sequence split over the mesh's ``cp`` axis
(each device one segment, in `jax.shard_map` with the layers' cp paths on, as in training) and
gathers the recurrent state after it: the mLSTM memories (C, n, m), the conv windows and the
sLSTM states are small, so the state of the last segment's device, which the cp paths made the
state after the whole prompt, is all decoding needs. `generate_context_parallel` then decodes
with `generation.decode`, the one-device loop. (`generation` sits below `parallel` in the
package's layers, so the cp prefill lives here.)
"""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jaxtyping import Array, Float, Int, PRNGKeyArray, PyTree

from ..core.parallel_config import ParallelConfig
from ..generation import decode, decode_step, has_kv_cache
from .context import with_context_parallel
from .mesh import context_size


def _split_state(model: Any, tokens: Int[Array, "B S"], mesh: Mesh, axis: str) -> PyTree:
    """The decode state after ``tokens`` (S a multiple of the axis size), run split over
    ``axis``: each device's state after its segment, and the last device's kept."""
    split_model = with_context_parallel(model, axis)
    params, static = eqx.partition(split_model, eqx.is_array)
    start = model.init_state(tokens.shape[0])

    def segment(params: Any, tokens: Array, state: PyTree) -> PyTree:
        _, state = eqx.combine(params, static).call_with_state(tokens, state)
        return jax.tree.map(lambda x: x[None], state)  # stacked over the axis outside

    run = jax.shard_map(
        segment,
        mesh=mesh,
        in_specs=(P(), P(None, axis), P()),
        out_specs=P(axis),
        axis_names={axis},
        check_vma=False,  # as `context_parallel`: the cell's custom VJPs vary over the axis
    )
    return jax.tree.map(lambda x: x[-1], run(params, tokens, start))


def prefill_context_parallel(
    model: Any, prompt: Int[Array, "B P"], mesh: Mesh, parallel_config: ParallelConfig
) -> tuple[Float[Array, "B V"], PyTree]:
    """What `generation.prefill` returns (the logits after the last prompt token and the decode
    state after it), with the prompt split over the mesh's context-parallel axis: its longest
    prefix that leaves the last token out and splits into equal segments runs on the ``cp``
    devices; the few tokens after it (fewer than cp) and the last token run as on one device.
    Call under ``jax.jit`` with the model and prompt on the mesh (replicated)."""
    if has_kv_cache(model):
        raise ValueError(
            f"prefill_context_parallel: {type(model).__name__} decodes from a KV cache, not a "
            "small recurrent state; prefill it on one device (generation.generate)"
        )
    cp = context_size(mesh, parallel_config)
    length = (prompt.shape[1] - 1) // cp * cp
    if cp > 1 and length > 0:
        state = _split_state(model, prompt[:, :length], mesh, parallel_config.context_axis_name)
    else:
        state, length = model.init_state(prompt.shape[0]), 0
    if prompt.shape[1] - 1 > length:
        _, state = model.call_with_state(prompt[:, length:-1], state)
    return decode_step(model, state, prompt[:, -1])


def generate_context_parallel(
    model: Any,
    prompt: Int[Array, "B P"],
    max_new_tokens: int,
    mesh: Mesh,
    parallel_config: ParallelConfig,
    *,
    temperature: float = 1.0,
    key: PRNGKeyArray | None = None,
) -> Int[Array, "B T"]:
    """`generation.generate` with the prompt prefilled on the mesh's cp axis
    (`prefill_context_parallel`), then decoded as on one device: the prompt followed by
    ``max_new_tokens`` tokens, int32 ``(B, P + N)``. Greedy when ``key`` is None or
    ``temperature == 0``, else sampled at ``temperature``."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if prompt.ndim != 2 or prompt.shape[1] < 1:
        raise ValueError(f"prompt must be (B, P) tokens with P >= 1, got shape {prompt.shape}")
    greedy = key is None or temperature == 0
    keys = None if greedy or key is None else jr.split(key, max_new_tokens)
    replicated = NamedSharding(mesh, P())
    model, prompt = jax.device_put((model, prompt.astype(jnp.int32)), replicated)
    heat = jnp.asarray(1.0 if greedy else temperature, jnp.float32)
    new = _generate(model, prompt, keys, max_new_tokens, mesh, parallel_config, heat)
    return jnp.concatenate([prompt, new], axis=1)


@eqx.filter_jit
def _generate(
    model: Any,
    prompt: Int[Array, "B P"],
    keys: Any,
    num_tokens: int,
    mesh: Mesh,
    parallel_config: ParallelConfig,
    temperature: Float[Array, ""],
) -> Int[Array, "B N"]:
    logits, state = prefill_context_parallel(model, prompt, mesh, parallel_config)
    return decode(model, state, logits, keys, num_tokens, temperature, None, None)
