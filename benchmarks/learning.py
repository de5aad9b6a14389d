"""xLSTM vs Llama at equal parameter count and equal tokens on the default (stdlib) corpus.

    python benchmarks/learning.py [--steps 300] [--out runs/learning]

Both runs use the same `TrainConfig` (data, seed, batch, schedule) apart from `model`, so they see
the same batches in the same order. Prints each run's held-out loss curve (every `--eval-every`
steps) and the final held-out loss and bits per byte next to the unigram baseline.
"""

import argparse
import dataclasses
import json
import os

from xlstm_eqx.training import TrainConfig, read_metrics, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--out", default="runs/learning")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    base = TrainConfig(
        steps=args.steps,
        eval_every=args.eval_every,
        seed=args.seed,
        progress=False,
        sample_tokens=0,
    )
    results = {}
    for family in ("xlstm", "llama"):
        cfg = dataclasses.replace(base, model=family, out=os.path.join(args.out, family))
        result = train(cfg, log=lambda _: None)
        curve = [
            (row["step"], row["eval_loss"])
            for row in read_metrics(os.path.join(result.out_dir, "metrics.jsonl"))
            if "eval_loss" in row
        ]
        with open(os.path.join(result.out_dir, "summary.json")) as f:
            params = json.load(f).get("parameters")
        results[family] = (result, curve, params)

    print(
        f"{'model':<8} {'params':>10} {'tokens':>10} {'eval loss':>10} {'bits/byte':>10} {'unigram':>8}"
    )
    tokens = base.steps * base.batch_size * base.seq_len * base.grad_accum
    for family, (result, _, params) in results.items():
        print(
            f"{family:<8} {params or 0:>10,} {tokens:>10,} {result.eval_loss:>10.4f} "
            f"{result.bits_per_byte:>10.4f} {result.unigram_bits_per_byte:>8.3f}"
        )
    print("\nheld-out loss (nats/token) by step:")
    steps = [s for s, _ in results["xlstm"][1]]
    print(f"{'step':>6} " + " ".join(f"{f:>8}" for f in results))
    for i, step in enumerate(steps):
        print(f"{step:>6} " + " ".join(f"{results[f][1][i][1]:>8.4f}" for f in results))


if __name__ == "__main__":
    main()
