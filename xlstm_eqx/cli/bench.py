"""`xlstm-eqx bench`: the flags of the benchmarks (`xlstm_eqx.tools.bench`) and of the GPU check
(`xlstm_eqx.tools.gpu_check`, `bench gpu`; also `python benchmarks/gpu_check.py`)."""

import argparse
from collections.abc import Sequence

from ..tools import bench, cost_check, gpu_check


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `xlstm-eqx bench`, with the GPU check's (`bench gpu`) in a group."""
    parser.add_argument(
        "which",
        nargs="?",
        default="all",
        choices=bench.BENCHMARKS,
        help="benchmark to run: cell, train, generate, profile, all (the four), or gpu (check "
        "and time everything on one GPU; its options below)",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    parser.add_argument(
        "--seq-len", type=int, default=None, help="train/cell/profile sequence length override"
    )
    parser.add_argument(
        "--model",
        default="xlstm",
        choices=("xlstm", "llama"),
        help="the model whose train step `profile` traces",
    )
    parser.add_argument(
        "--size",
        default="small",
        choices=("tiny", "small"),
        help="presets for train/profile: {size}_xlstm and {size}_llama",
    )
    check = parser.add_argument_group(
        "bench --check (the cost regression guard: XLA's FLOPs and bytes, compiled, never run)"
    )
    check.add_argument(
        "--check",
        action="store_true",
        help="compare the compiled costs of fixed small programs with the committed ones "
        "(benchmarks/results/costs.json); exit 1 if one grew by more than 3%%, 3 if none "
        "are committed for this backend; WHICH is ignored",
    )
    check.add_argument(
        "--update",
        action="store_true",
        help="with --check: record the measured costs instead (commit them saying why)",
    )
    check.add_argument(
        "--baseline",
        metavar="PATH",
        default=None,
        help="with --check: the costs file to compare with (or --update) instead",
    )
    gpu = parser.add_argument_group("bench gpu (validate and time everything on one GPU)")
    add_gpu_check_arguments(gpu, quick=False)


def run_bench_command(args: argparse.Namespace) -> int:
    """Run `xlstm-eqx bench WHICH` from its parsed flags; the exit code."""
    if args.check or args.update or args.baseline is not None:
        if not args.check:
            raise ValueError("bench: --update and --baseline go with --check")
        return cost_check.run_cost_check(args.baseline, update=args.update)
    if args.which == "gpu":
        return run_gpu_check_command(args)
    return bench.run_bench(
        args.which, args.quick, seq_len=args.seq_len, model=args.model, size=args.size
    )


# the GPU check (`bench gpu`, benchmarks/gpu_check.py)


def add_gpu_check_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup, *, quick: bool = True
) -> None:
    """The command's flags; `xlstm-eqx bench gpu` adds them with ``quick=False`` (it has its own
    ``--quick``)."""
    parser.add_argument("--out", default=None, help="output folder (gpu_check.json, .md)")
    if quick:
        parser.add_argument(
            "--quick", action="store_true", help="tiny shapes: a CPU smoke test of the same code"
        )
    parser.add_argument(
        "--parts",
        default=",".join(gpu_check.PARTS),
        help=f"comma-separated subset of {','.join(gpu_check.PARTS)}",
    )
    parser.add_argument(
        "--budget",
        action="append",
        default=[],
        metavar="PART=SECONDS",
        help="override one part's time budget (repeatable)",
    )
    parser.add_argument(
        "--memory-limit-gb",
        type=float,
        default=None,
        help="device memory the batch search plans against (default: the device's own)",
    )
    parser.add_argument(
        "--estimate",
        action="store_true",
        help="print each full-mode part's expected duration and exit (runs nothing)",
    )


def _parse_budgets(items: Sequence[str]) -> dict[str, float]:
    budgets = {}
    for item in items:
        name, _, value = item.partition("=")
        if name not in gpu_check.PARTS or not value:
            raise ValueError(
                f"--budget {item!r}: expected PART=SECONDS with PART in {gpu_check.PARTS}"
            )
        budgets[name] = float(value)
    return budgets


def run_gpu_check_command(args: argparse.Namespace) -> int:
    """Run the GPU check from parsed `add_gpu_check_arguments` flags; the exit code."""
    if args.estimate:
        settings = gpu_check.QUICK if args.quick else gpu_check.FULL
        print(gpu_check.format_estimate(gpu_check.estimate_durations(settings)))
        return 0
    if not args.out:
        raise SystemExit("gpu_check: --out DIR is required (or --estimate)")
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    results = gpu_check.run_gpu_check(
        args.out,
        quick=args.quick,
        parts=parts,
        budgets=_parse_budgets(args.budget),
        memory_limit_gb=args.memory_limit_gb,
    )
    return int(results["summary"]["exit_code"])


def gpu_check_main(argv: Sequence[str] | None = None) -> int:
    """`python benchmarks/gpu_check.py --out DIR [--quick] [--parts a,b] [--estimate]`."""
    description = (gpu_check.__doc__ or "").splitlines()[0]
    parser = argparse.ArgumentParser(prog="gpu_check", description=description)
    add_gpu_check_arguments(parser)
    return run_gpu_check_command(parser.parse_args(None if argv is None else list(argv)))
