"""`xlstm-eqx train` and `xlstm-eqx eval`."""

import argparse
import dataclasses
import json
import sys

from ..parallel.mesh import initialize_distributed
from ..training.config import TrainConfig
from ..training.evaluate import evaluate_run
from ..training.loop import TrainingDivergedError, train
from .common import add_dataclass_arguments, resolve_train_config


# train


def _train_arguments(p: argparse.ArgumentParser) -> None:

    p.add_argument(
        "--config", metavar="FILE", help="JSON/YAML file of TrainConfig fields (flags override it)"
    )
    add_dataclass_arguments(p, TrainConfig)


def _train_run(args: argparse.Namespace) -> int:

    initialize_distributed()  # multi-host runs (env vars / SLURM); nothing for one process

    cfg = resolve_train_config(args)
    try:
        train(cfg)
    except TrainingDivergedError as e:
        print(f"xlstm-eqx train: {e}", file=sys.stderr)
        return 1
    return 0


# eval


def _eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, metavar="DIR", help="the run directory to evaluate")
    p.add_argument(
        "--data",
        action="append",
        metavar="PATH_OR_GLOB",
        help="evaluate on all of this text instead of the run's held-out split (repeatable)",
    )
    p.add_argument("--checkpoint", metavar="PATH", help="a checkpoint directory (default: newest)")
    p.add_argument("--batch-size", type=int, help="sequences per batch (default: the run's)")
    p.add_argument("--eval-batches", type=int, help="batches to evaluate (default: the run's)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")


def _eval_run(args: argparse.Namespace) -> int:

    r = evaluate_run(
        args.out,
        data=args.data,
        batch_size=args.batch_size,
        max_batches=args.eval_batches,
        checkpoint=args.checkpoint,
    )
    if args.json:
        print(json.dumps(dataclasses.asdict(r)))
    else:
        print(
            f"step {r.step}: held-out loss {r.eval_loss:.4f} nats/token, "
            f"{r.bits_per_byte:.3f} bits/byte over {r.num_tokens:,} tokens "
            f"(unigram baseline {r.unigram_bits_per_byte:.3f} bits/byte)"
        )
    return 0
