"""Check and measure xlstm_eqx on a GPU in one command, within 8 minutes on one H100/H200.

    python -m xlstm_eqx.tools.gpu_check --out DIR [--quick] [--parts a,b] [--estimate]

Four parts, each with its own time budget (checked between cases; a part whose budget is spent
records its remaining cases as `timed_out` and the next part still runs):

1. `correctness` — `mlstm_chunkwise_pallas` against the pure-JAX `mlstm_chunkwise` (outputs, and the
   gradients of a weighted sum w.r.t. q, k, v, igate, fgate) on the device, float32 and bfloat16,
   gates in a trained range and in [-30, 30]; and the Llama attention backends (`xla`, `cudnn`,
   `pallas_triton`) against a float32 reference. Any failure makes the exit code 1.
2. `kernels` — forward and forward+backward time of the chunkwise forms (ours, and mlstm-kernels'
   Triton and JAX forms if installed) at the 165M and 7B layers' head shapes, bf16: tokens/s,
   achieved TFLOP/s (`chunkwise_flops`), XLA's planned peak memory, and the `auto` backend's choice.
3. `train` — the trainer's step of mLSTMv1_165M and llama165M at the largest power-of-two batch
   whose compiled memory plan fits the device (`_search_batch`): tokens/s, MFU against the
   datasheet bf16 peak (`PEAK_BF16_TFLOPS`) and against a bf16 matmul timed in the same run.
4. `generate` — decode ms/token (the library's prefill and decode scan) at batch 1 and 16,
   contexts 1k/8k/32k, xLSTM against Llama of the same size.

`DIR/gpu_check.json` and `DIR/gpu_check.md` are rewritten after every case, so a run cut short
still leaves what it measured. `--quick` runs the same code on tiny shapes (a CPU smoke test; the
Pallas kernels then run in interpret mode). `--estimate` prints the expected duration of each
full-mode part (`estimate_durations`) without running anything.
"""

import argparse
import dataclasses
import os
import platform
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax

from .gpu_correctness import _run_correctness
from .gpu_estimate import estimate_durations, format_estimate
from .gpu_generate import _run_generate
from .gpu_kernels import _run_kernels
from .gpu_report import _clean, _now, _Part, _Report, _short
from .gpu_settings import (
    FULL,
    JSON_NAME as JSON_NAME,
    MD_NAME as MD_NAME,
    PARTS as PARTS,
    PEAK_BF16_TFLOPS as PEAK_BF16_TFLOPS,
    QUICK,
    AttentionCase as AttentionCase,
    CellCase as CellCase,
    CheckSettings as CheckSettings,
    _version,
    chunkwise_flops as chunkwise_flops,
    peak_bf16_flops as peak_bf16_flops,
)
from .gpu_train import _run_train


def _meta(quick: bool, settings: CheckSettings) -> dict[str, Any]:
    device = jax.devices()[0]
    peak = peak_bf16_flops(device.device_kind)
    mk = _version("mlstm-kernels")
    return {
        "device_kind": device.device_kind,
        "platform": jax.default_backend(),
        "device_count": jax.device_count(),
        "jax_version": jax.__version__,
        "jaxlib_version": _version("jaxlib"),
        "python": platform.python_version(),
        "quick": quick,
        "started": _now(),
        "pallas_interpret": jax.default_backend() != "gpu",
        "peak_bf16_tflops_datasheet": None if peak is None else peak / 1e12,
        "mlstm_kernels": mk,
        "budgets_s": dict(settings.budgets_s),
    }


def run_gpu_check(
    out_dir: str | os.PathLike,
    *,
    quick: bool,
    parts: Sequence[str] | None = None,
    budgets: Mapping[str, float] | None = None,
    memory_limit_gb: float | None = None,
) -> dict[str, Any]:
    """Run the parts (default: all four, in order) and return the results written to
    ``out_dir/gpu_check.json``; ``summary.exit_code`` is 1 when a correctness check failed or
    errored, else 0. `budgets` overrides per-part seconds; `memory_limit_gb` the device memory
    the batch search and the kernel rows plan against."""
    settings = QUICK if quick else FULL
    parts = tuple(PARTS if parts is None else parts)
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise ValueError(f"unknown parts {unknown}; choose from {', '.join(PARTS)}")
    all_budgets = dict(settings.budgets_s)
    all_budgets.update(budgets or {})
    if memory_limit_gb is not None:
        settings = dataclasses.replace(settings, memory_limit_gb=float(memory_limit_gb))
    settings = dataclasses.replace(settings, budgets_s=all_budgets)
    meta = _meta(quick, settings)
    meta["parts"] = list(parts)
    report = _Report(Path(out_dir), meta, {p: all_budgets[p] for p in parts})
    print(
        f"# gpu_check ({'quick' if quick else 'full'}): {meta['device_kind']} "
        f"({meta['platform']}), jax {meta['jax_version']} -> {Path(out_dir) / JSON_NAME}",
        flush=True,
    )
    report.write()
    runners: dict[str, Callable[[_Part], None]] = {
        "correctness": lambda p: _run_correctness(p, settings),
        "kernels": lambda p: _run_kernels(p, settings),
        "train": lambda p: _run_train(p, settings, report),
        "generate": lambda p: _run_generate(p, settings),
    }
    for name in parts:
        print(f"## {name} (budget {all_budgets[name]:.0f} s)", flush=True)
        part = _Part(report, name)
        try:
            runners[name](part)
        except Exception as err:  # noqa: BLE001 - a part that breaks is recorded; others run
            part.add(
                {
                    "case": f"{name} (part)",
                    "status": "error",
                    "note": f"{type(err).__name__}: {_short(str(err))}",
                }
            )
            part.finish()
    rows = report.data["parts"].get("correctness", {}).get("rows", [])
    failed = [r["case"] for r in rows if r["status"] in ("fail", "error")]
    counts = {
        name: {s: sum(r["status"] == s for r in p["rows"]) for s in ("error", "timed_out")}
        for name, p in report.data["parts"].items()
    }
    exit_code = 1 if failed else 0
    problems = [
        f"{n}: {c['error']} errors, {c['timed_out']} timed out"
        for n, c in counts.items()
        if c["error"] or c["timed_out"]
    ]
    text = ("correctness FAILED: " + "; ".join(failed)) if failed else "correctness passed"
    if problems:
        text += " | " + "; ".join(problems)
    report.data["summary"] = {
        "correctness_passed": not failed,
        "correctness_failed_cases": failed,
        "counts": counts,
        "exit_code": exit_code,
        "finished": _now(),
        "text": text,
    }
    report.write()
    print(f"# {text}; exit code {exit_code}", flush=True)
    return _clean(report.data)


def add_arguments(
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
        "--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}"
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
        if name not in PARTS or not value:
            raise ValueError(f"--budget {item!r}: expected PART=SECONDS with PART in {PARTS}")
        budgets[name] = float(value)
    return budgets


def run_command(args: argparse.Namespace) -> int:
    """Run from parsed `add_arguments` flags; the exit code."""
    if args.estimate:
        print(format_estimate(estimate_durations(QUICK if args.quick else FULL)))
        return 0
    if not args.out:
        raise SystemExit("gpu_check: --out DIR is required (or --estimate)")
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    results = run_gpu_check(
        args.out,
        quick=args.quick,
        parts=parts,
        budgets=_parse_budgets(args.budget),
        memory_limit_gb=args.memory_limit_gb,
    )
    return int(results["summary"]["exit_code"])


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m xlstm_eqx.tools.gpu_check --out DIR [--quick] [--parts a,b] [--estimate]`."""
    parser = argparse.ArgumentParser(prog="gpu_check", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run_command(parser.parse_args(None if argv is None else list(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
