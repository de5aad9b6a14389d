"""Per-token generation cost against context length: xLSTM (recurrent state) vs Llama (KV cache).

    python benchmarks/generate.py [--contexts 128 512 2048 8192] [--batches 1 16] [--new-tokens 32]
        [--repeats 5]

Two byte-level models (vocab 256) of about equal size, built from random weights: an xLSTM of 8
"mlstm" blocks (D=256, 4 heads, chunkwise prefill with chunk 64) and a Llama of 4 blocks (D=256,
head_dim 64). For each batch size B and context length C: a random prompt ``(B, C)`` is prefilled
(not timed; Llama's in chunks of 1024 to bound the attention matrix), then the greedy decode of
``--new-tokens`` tokens — the same ``lax.scan`` that ``xlstm_eqx.generate`` runs — is timed:
median of ``--repeats`` runs after a warm-up call, ``block_until_ready``. Llama's KV cache holds
``C + new_tokens`` positions, as ``generate`` sizes it.

Expected: the xLSTM per-token time does not depend on C (the state has a fixed size); Llama's
grows with C (each token attends to the whole cache). "ms / token" is the time of one decode step
of the whole batch; "tokens / s" counts the tokens of every sequence (B per step).
"""

import argparse
import json
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr

import xlstm_eqx as X
from xlstm_eqx.core import median_seconds
from xlstm_eqx.generation import decode, prefill as library_prefill


VOCAB = 256


def xlstm_config(context: int) -> X.xLSTMLMModelConfig:
    cell = X.mLSTMCellConfig(
        backend=X.mLSTMBackendNameAndKwargs(name="chunkwise", kwargs={"chunk_size": 64})
    )
    layer = X.mLSTMLayerConfig(layer_type="mlstm", num_heads=4, mlstm_cell=cell)
    return X.xLSTMLMModelConfig(
        vocab_size=VOCAB,
        embedding_dim=256,
        num_blocks=8,
        context_length=context,
        dtype="float32",
        lm_head_dtype="float32",
        scan_blocks=True,
        mlstm_block=X.mLSTMBlockConfig(mlstm=layer),
    )


def llama_config(context: int) -> X.LlamaConfig:
    return X.LlamaConfig(
        vocab_size=VOCAB,
        embedding_dim=256,
        num_blocks=4,
        head_dim=64,
        dtype="float32",
        attention_backend="xla",
        context_length=context,
    )


@eqx.filter_jit
def _prefill_jit(model: Any, prompt: jax.Array, cache_size: int) -> tuple[jax.Array, Any]:
    return library_prefill(model, prompt, cache_size)


@eqx.filter_jit
def _llama_prefill_chunk(model: Any, tokens: jax.Array, cache: Any) -> tuple[jax.Array, Any]:
    logits, cache = model.call_with_state(tokens, cache)
    return logits[:, -1], cache


def prefill(model: Any, prompt: jax.Array, cache_size: int, chunk: int = 1024) -> tuple[Any, Any]:
    """Last-token logits and decode state after the prompt."""
    if isinstance(model, X.LlamaTransformer) and prompt.shape[1] > chunk:
        cache = model.init_state(prompt.shape[0], cache_size)
        for s in range(0, prompt.shape[1], chunk):
            logits, cache = _llama_prefill_chunk(model, prompt[:, s : s + chunk], cache)
        return logits, cache
    return _prefill_jit(model, prompt, cache_size)


@eqx.filter_jit
def _decode_jit(model: Any, state: Any, logits: jax.Array, num_tokens: int) -> jax.Array:
    one = jnp.ones((), jnp.float32)
    return decode(model, state, logits, None, num_tokens, one, None, None)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=(__doc__ or "").partition("\n")[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[128, 512, 2048, 8192])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--json", type=str, default=None, help="also write the rows to this file")
    args = ap.parse_args(argv)

    top = max(args.contexts) + args.new_tokens
    models = {
        "xLSTM": X.xLSTMLMModel(xlstm_config(top), key=jr.key(0)),
        "Llama": X.LlamaTransformer(llama_config(top), key=jr.key(0)),
    }
    print(f"# device: {jax.devices()[0].device_kind} ({jax.default_backend()})")
    for name, m in models.items():
        print(f"# {name}: {X.count_params(m):,} parameters")
    print(f"# greedy decode of {args.new_tokens} tokens after the prompt; median of {args.repeats}")
    print()
    print("| model | batch | context | ms / token | tokens / s |")
    print("|---|---:|---:|---:|---:|")
    rows = []
    for B in args.batches:
        for C in args.contexts:
            prompt = jr.randint(jr.key(C), (B, C), 0, VOCAB, dtype=jnp.int32)
            for name, model in models.items():
                logits, state = prefill(model, prompt, C + args.new_tokens)
                jax.block_until_ready((logits, state))
                decode_args = (model, state, logits, args.new_tokens)
                t = median_seconds(lambda a=decode_args: _decode_jit(*a), args.repeats, warmup=1)
                ms = 1e3 * t / args.new_tokens
                tps = B * args.new_tokens / t
                rows.append(dict(model=name, batch=B, context=C, ms_per_token=ms, tokens_per_s=tps))
                print(f"| {name} | {B} | {C} | {ms:.3f} | {tps:.0f} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(rows=rows, args=vars(args)), f, indent=1)
    return rows


if __name__ == "__main__":
    main()
