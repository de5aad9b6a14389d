"""Train-step throughput of the xLSTM LM against Llama at equal parameter count, with MFU.

    python benchmarks/train.py [--seq-len 2048] [--batch-size 1] [--steps 5] [--size small]
                               [--no-peer] [--rounds 3]

Times the trainer's own jitted step (forward + backward + AdamW) of the presets `small_xlstm` and
`small_llama` (3.35M parameters each, float32): median of `--steps` steps after a warm-up step,
`block_until_ready`. MFU = analytic model FLOPs per token (`train_flops_per_token`) x tokens/s over
the FLOP/s of a float32 2048x2048 matmul timed in the same process.

Then, where xlstm-jax is installed (benchmarks/peers/README.md), the same step beside xlstm-jax's
own trainer on the same architecture, alternated (`xlstm_eqx.tools.peers.compare_train`); without
it, a one-line note.
"""

import argparse
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from xlstm_eqx.tools import bench_train, print_train_table
from xlstm_eqx.tools.peers import compare_train, load_peer, print_train_comparison


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--size", default="small", help="preset size prefix: small or tiny")
    ap.add_argument("--models", nargs="+", default=["xlstm", "llama"])
    ap.add_argument("--no-memory", action="store_true", help="skip the XLA memory plan")
    ap.add_argument("--no-peer", action="store_true", help="skip the xlstm-jax comparison")
    ap.add_argument("--rounds", type=int, default=3, help="alternated rounds against the peer")
    args = ap.parse_args(argv)
    rows = bench_train(
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        steps=args.steps,
        models=tuple(args.models),
        size=args.size,
        memory=not args.no_memory,
        verbose=True,
    )
    print_train_table(rows)
    if not args.no_peer:
        peer, note = load_peer("xlstm_jax_train", "xlstm-jax")
        compared = compare_train(
            peer,
            seq_len=args.seq_len,
            batch_size=args.batch_size,
            size=args.size,
            models=tuple(args.models),
            peak_flops=rows[0]["peak_tflops"] * 1e12,
            rounds=args.rounds,
        )
        print_train_comparison(compared, note)
    return rows


if __name__ == "__main__":
    main()
