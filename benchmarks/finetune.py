"""A LoRA train step against a full train step of the same model, on this machine.

    python benchmarks/finetune.py [--preset small_xlstm] [--batch 2] [--seq-len 512] [--rank 16]
                                  [--rounds 9]

Both steps are `make_train_step(optax.adamw)` with optimizer state for their trainable leaves only:
every parameter for the full step, the adapters alone for LoRA (`add_lora`, the default targets).
Prints XLA's cost analysis of each compiled step (FLOPs, bytes accessed, temporaries) and the
medians of `--rounds` alternated timings (full, LoRA, full, ...), so the two share the machine's
noise. The LoRA step skips the base weights' gradients and AdamW update but adds the adapters'
matmuls, so on a small model it is only modestly faster; its real gain is memory (`xlstm-eqx
info --lora-rank`).
"""

import argparse
import statistics
import time
from typing import Any

import equinox as eqx
import jax
import jax.random as jr
import optax

from xlstm_eqx.models import family_of
from xlstm_eqx.presets import get_preset
from xlstm_eqx.training.finetune import LoRASettings, add_lora, trainable_count, trainable_mask
from xlstm_eqx.training.step import make_train_step


def _costs(compiled: Any) -> str:
    compiled = getattr(compiled, "compiled", compiled)  # equinox's wrapper of jax's Compiled
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    memory = compiled.memory_analysis()
    temp = f", temporaries {memory.temp_size_in_bytes / 2**20:.1f} MiB" if memory else ""
    return f"{cost['flops'] / 1e9:.2f} GFLOP, {cost['bytes accessed'] / 1e9:.2f} GB accessed{temp}"


def main() -> None:
    p = argparse.ArgumentParser(description="A LoRA train step against a full train step.")
    p.add_argument("--preset", default="small_xlstm")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--rounds", type=int, default=9)
    args = p.parse_args()
    config = get_preset(args.preset)
    base = family_of(config).build(config, key=jr.key(0))
    adapted = add_lora(base, LoRASettings(args.rank, float(args.rank)), jr.key(1))
    optimizer = optax.adamw(1e-3)
    tokens = jr.randint(jr.key(2), (1, args.batch, args.seq_len + 1), 0, config.vocab_size)
    runs: dict[str, list[Any]] = {}
    for name, model in (("full", base), ("lora", adapted)):
        model = jax.tree.map(lambda x: x.copy() if eqx.is_array(x) else x, model)  # donated
        opt_state = optimizer.init(eqx.filter(model, trainable_mask(model)))
        step = make_train_step(optimizer)
        compiled = step.lower((tokens, jr.key(0)), model, opt_state).compile()
        print(f"{name}: {trainable_count(model):,} trainable; {_costs(compiled)}")
        model, opt_state, loss, _ = step((tokens, jr.key(0)), model, opt_state)
        jax.block_until_ready(loss)  # warm-up
        runs[name] = [step, model, opt_state]
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(args.rounds):
        for name, (step, model, opt_state) in runs.items():
            t0 = time.perf_counter()
            model, opt_state, loss, _ = step((tokens, jr.key(r)), model, opt_state)
            jax.block_until_ready(loss)
            seconds[name].append(time.perf_counter() - t0)
            runs[name] = [step, model, opt_state]
    tokens_per_step = args.batch * args.seq_len
    for name, times in seconds.items():
        median = statistics.median(times)
        print(f"{name}: median {1e3 * median:.1f} ms, {tokens_per_step / median:,.0f} tokens/s")
    ratio = statistics.median(seconds["full"]) / statistics.median(seconds["lora"])
    print(f"LoRA / full tokens/s: {ratio:.2f}x ({args.rounds} alternated rounds)")


if __name__ == "__main__":
    main()
