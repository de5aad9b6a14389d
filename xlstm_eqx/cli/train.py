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


def add_train_arguments(p: argparse.ArgumentParser) -> None:

    p.add_argument(
        "--config", metavar="FILE", help="JSON/YAML file of TrainConfig fields (flags override it)"
    )
    add_dataclass_arguments(p, TrainConfig)


def run_train_command(args: argparse.Namespace) -> int:

    initialize_distributed()  # multi-host runs (env vars / SLURM); nothing for one process

    cfg = resolve_train_config(args)
    try:
        train(cfg)
    except TrainingDivergedError as e:
        print(f"xlstm-eqx train: {e}", file=sys.stderr)
        return 1
    return 0


# eval


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="the run directory to evaluate (with --hf: where lm-eval's results go)",
    )
    p.add_argument(
        "--data",
        action="append",
        metavar="PATH_OR_GLOB",
        help="evaluate on all of this text instead of the run's held-out split (repeatable)",
    )
    p.add_argument("--checkpoint", metavar="PATH", help="a checkpoint directory (default: newest)")
    p.add_argument("--batch-size", type=int, help="sequences per batch (default: the run's; 8)")
    p.add_argument("--eval-batches", type=int, help="batches to evaluate (default: the run's)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    lm = p.add_argument_group("lm-eval harness (pip install 'xlstm_eqx[eval]')")
    lm.add_argument(
        "--tasks", metavar="T1,T2", help="lm-eval tasks (or groups) to run instead of held-out loss"
    )
    lm.add_argument("--include-path", metavar="DIR", help="a directory of task YAML files")
    lm.add_argument("--limit", type=float, help="documents per task (a fraction if < 1)")
    lm.add_argument("--num-fewshot", type=int, help="few-shot examples (default: the task's)")
    lm.add_argument(
        "--hf", metavar="DIR", help="evaluate a transformers xLSTMForCausalLM directory"
    )
    lm.add_argument(
        "--tokenizer",
        metavar="FILE|bytes",
        help="'bytes' or a tokenizer.json (default: the model's own)",
    )
    lm.add_argument(
        "--max-length", type=int, help="tokens per scoring window (default: context_length)"
    )
    lm.add_argument(
        "--eod-token",
        metavar="TOKEN",
        help="the end-of-document token scoring starts from (default: the run's, or the "
        "tokenizer's own)",
    )


def _lm_eval_run(args: argparse.Namespace) -> int:
    from ..data.tokenizer import load_tokenizer, tokenizer_from_dict
    from ..interop.runs import load_hf_for_generation
    from ..training.evaluate import load_run
    from ..training.lm_eval import LMEvalAdapter, run_lm_eval

    eod_token = ""
    if args.hf:
        model, config, tokenizer = load_hf_for_generation(args.hf, tokenizer=args.tokenizer)
        if tokenizer is None:
            raise ValueError(
                f"--hf {args.hf!r} records no tokenizer; pass --tokenizer FILE (a tokenizer.json) "
                "or --tokenizer bytes"
            )
        context = getattr(config, "context_length", None)
    else:
        model, run, _ = load_run(args.out, args.checkpoint)
        if args.tokenizer:
            tokenizer = load_tokenizer(args.tokenizer)
        else:
            tokenizer = tokenizer_from_dict(run["tokenizer"])
            eod_token = run.get("train", {}).get("eod_token", "")
        context = run["model_config"].get("context_length")
    if args.eod_token is not None:
        eod_token = args.eod_token
    max_length = args.max_length or context
    if not isinstance(max_length, int) or max_length < 1:
        raise ValueError("the model has no context_length; pass --max-length")
    adapter = LMEvalAdapter(
        model,
        tokenizer,
        max_length=max_length,
        batch_size=args.batch_size or 8,
        eod_token=eod_token,
    )
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
    results, path = run_lm_eval(
        adapter,
        tasks,
        args.out,
        include_path=args.include_path,
        limit=limit,
        num_fewshot=args.num_fewshot,
    )
    if args.json:
        print(json.dumps(results["results"]))
    else:
        from lm_eval.utils import make_table

        print(make_table(results))
        print(f"wrote {path}")
    return 0


def run_eval_command(args: argparse.Namespace) -> int:
    if args.tasks:
        return _lm_eval_run(args)
    if args.hf:
        raise ValueError("--hf evaluates with lm-eval: pass --tasks")
    r = evaluate_run(
        args.out,
        data=args.data,
        batch_size=args.batch_size,
        max_batches=args.eval_batches,
        checkpoint=args.checkpoint,
        tokenizer=args.tokenizer,
    )
    if args.json:
        print(json.dumps(dataclasses.asdict(r)))
    else:
        of = "tokens read of --data" if args.data else "held-out tokens"
        unigram = r.unigram_bits_per_byte
        base = "" if unigram is None else f" (unigram baseline {unigram:.3f} bits/byte)"
        print(
            f"step {r.step}: held-out loss {r.eval_loss:.4f} nats/token, "
            f"{r.bits_per_byte:.3f} bits/byte over {r.num_tokens:,} of {r.available_tokens:,} "
            f"{of} ({r.num_batches} batches × {r.batch_size} × {r.seq_len}; more with "
            f"--eval-batches, --batch-size){base}"
        )
    return 0
