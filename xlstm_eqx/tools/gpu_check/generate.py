"""GPU check, part 4: decode ms/token of xLSTM (recurrent state) and Llama (KV cache) at batch 1
and 16, contexts 1k/8k/32k.
"""

import time
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, Int, PyTree

from ...core import count_params, median_seconds
from ...generation import decode, has_kv_cache, prefill
from ...models import MODEL_FAMILIES
from ...presets import get_preset
from .report import Part, random_array
from .settings import CheckSettings
from .train import family_name, with_context


# Part 4: generation


@eqx.filter_jit
def _prefill_jit(
    model: Any, prompt: Int[Array, "B P"], cache_size: int
) -> tuple[Float[Array, "B V"], PyTree]:
    return prefill(model, prompt, cache_size)


@eqx.filter_jit
def _llama_chunk_jit(
    model: Any, tokens: Int[Array, "B T"], cache: PyTree
) -> tuple[Float[Array, "B V"], PyTree]:
    logits, cache = model.call_with_state(tokens, cache)
    return logits[:, -1], cache


@eqx.filter_jit
def _decode_jit(
    model: Any, state: PyTree, logits: Float[Array, "B V"], num_tokens: int
) -> Int[Array, "B N"]:
    one = jnp.ones((), jnp.float32)
    return decode(model, state, logits, None, num_tokens, one, None, None)


def _prefill_state(
    model: Any, prompt: Int[Array, "B P"], cache_size: int, chunk: int
) -> tuple[Float[Array, "B V"], PyTree]:
    """The library's prefill; a KV-cache model's prompt goes through `call_with_state` in chunks of
    `chunk` tokens (one pass over a long prompt would build the S x S attention matrix)."""
    if has_kv_cache(model) and prompt.shape[1] > chunk:
        cache = model.init_state(prompt.shape[0], cache_size)
        logits = None
        for start in range(0, prompt.shape[1], chunk):
            logits, cache = _llama_chunk_jit(model, prompt[:, start : start + chunk], cache)
        assert logits is not None  # the prompt is longer than one chunk
        return logits, cache
    return _prefill_jit(model, prompt, cache_size)


def run_generate(part: Part, settings: CheckSettings) -> None:
    n_new = settings.gen_new_tokens
    top = max(settings.gen_contexts) + n_new
    models: dict[str, Any] = {}
    for batch in settings.gen_batches:
        for context in settings.gen_contexts:
            for preset in settings.gen_models:

                def run(preset: str = preset, batch: int = batch, context: int = context):
                    if preset not in models:
                        config = with_context(get_preset(preset), top)
                        family = MODEL_FAMILIES[family_name(config)]
                        models[preset] = family.build(config, key=jr.key(0))
                    model = models[preset]
                    vocab = int(model.vocab_size)
                    shape = (batch, context)
                    prompt = random_array("integers", context, shape, jnp.int32, 0, vocab)
                    t0 = time.perf_counter()
                    logits, state = jax.block_until_ready(
                        _prefill_state(model, prompt, context + n_new, settings.gen_prefill_chunk)
                    )
                    prefill_s = time.perf_counter() - t0
                    seconds = median_seconds(
                        lambda: _decode_jit(model, state, logits, n_new),
                        settings.gen_repeats,
                        warmup=1,
                    )
                    return {
                        "ms_per_token": 1e3 * seconds / n_new,
                        "tokens_per_s": batch * n_new / seconds,
                        "prefill_s": prefill_s,
                        "params": count_params(model),
                    }

                part.case(
                    f"{preset} B{batch} C{context}", run, model=preset, batch=batch, context=context
                )
    part.finish(
        f"Random-weight models, random prompts of `context` tokens; prefill by the library "
        f"(`generation.prefill`; KV-cache models in chunks of {settings.gen_prefill_chunk}); "
        f"then the greedy decode scan of `generate` (`generation.decode`) for {n_new} tokens, "
        f"median of {settings.gen_repeats} after a warm-up. The KV cache holds context + {n_new}."
    )
