"""`run_gpu_check`: check and measure xlstm_eqx on a GPU in one command, within 8 minutes on one H100/H200.

    xlstm-eqx bench gpu --out DIR [--quick] [--parts a,b] [--estimate]
    python benchmarks/gpu_check.py --out DIR [--quick] [--parts a,b] [--estimate]

Five parts, each with its own time budget (checked between cases; a part whose budget is spent
records its remaining cases as `timed_out` and the next part still runs):

1. `correctness` — `mlstm_chunkwise_pallas` against the pure-JAX `mlstm_chunkwise` (outputs, and the
   gradients of a weighted sum w.r.t. q, k, v, igate, fgate) on the device, float32 and bfloat16,
   gates in a trained range and in [-30, 30]; and the Llama attention backends (`xla`, `cudnn`,
   `pallas_triton`) against a float32 reference. Any failure makes the exit code 1.
2. `kernels` — forward and forward+backward time of the chunkwise forms (ours, and mlstm-kernels'
   Triton and JAX forms if installed) at the 165M and 7B layers' head shapes, bf16: tokens/s,
   achieved TFLOP/s (`chunkwise_flops`), XLA's planned peak memory, and the `auto` backend's choice.
3. `train` — the trainer's step of mLSTMv1_165M and llama165M at the largest power-of-two batch
   whose compiled memory plan fits the device (`search_batch`): tokens/s, MFU against the
   datasheet bf16 peak (`PEAK_BF16_TFLOPS`) and against a bf16 matmul timed in the same run.
4. `generate` — decode ms/token (the library's prefill and decode scan) at batch 1 and 16,
   contexts 1k/8k/32k, xLSTM against Llama of the same size.
5. `context` — context parallelism (`context.py`): with 2+ GPUs, loss and gradients of a small
   xLSTM on a ``cp`` mesh against one GPU, and both timed; skipped with a note on one GPU.

`DIR/gpu_check.json` and `DIR/gpu_check.md` are rewritten after every case, so a run cut short
still leaves what it measured. `--quick` runs the same code on tiny shapes (a CPU smoke test; the
Pallas kernels then run in interpret mode). `--estimate` prints the expected duration of each
full-mode part (`estimate_durations`) without running anything.
"""

import dataclasses
import os
import platform
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax

from .context import run_context
from .correctness import run_correctness
from .generate import run_generate
from .kernels import run_kernels
from .report import Part, Report, json_safe, now_iso, shorten
from .settings import (
    FULL,
    JSON_NAME,
    PARTS,
    QUICK,
    CheckSettings,
    package_version,
    peak_bf16_flops,
)
from .train import run_train


def _meta(quick: bool, settings: CheckSettings) -> dict[str, Any]:
    device = jax.devices()[0]
    peak = peak_bf16_flops(device.device_kind)
    mk = package_version("mlstm-kernels")
    return {
        "device_kind": device.device_kind,
        "platform": jax.default_backend(),
        "device_count": jax.device_count(),
        "jax_version": jax.__version__,
        "jaxlib_version": package_version("jaxlib"),
        "python": platform.python_version(),
        "quick": quick,
        "started": now_iso(),
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
    """Run the parts (default: all five, in order) and return the results written to
    ``out_dir/gpu_check.json``; ``summary.exit_code`` is 1 when a correctness check failed or
    errored, else 0. `budgets` overrides per-part seconds; `memory_limit_gb` the device memory
    the batch search and the kernel rows plan against."""
    settings, parts = _check_settings(quick, parts, budgets, memory_limit_gb)
    meta = _meta(quick, settings)
    meta["parts"] = list(parts)
    report = Report(Path(out_dir), meta, {p: settings.budgets_s[p] for p in parts})
    print(
        f"# gpu_check ({'quick' if quick else 'full'}): {meta['device_kind']} "
        f"({meta['platform']}), jax {meta['jax_version']} -> {Path(out_dir) / JSON_NAME}",
        flush=True,
    )
    report.write()
    _run_parts(report, settings, parts)
    summary = _summary(report)
    report.data["summary"] = summary
    report.write()
    print(f"# {summary['text']}; exit code {summary['exit_code']}", flush=True)
    return json_safe(report.data)


def _check_settings(
    quick: bool,
    parts: Sequence[str] | None,
    budgets: Mapping[str, float] | None,
    memory_limit_gb: float | None,
) -> tuple[CheckSettings, tuple[str, ...]]:
    """The quick or full settings with the overrides applied, and the parts to run (checked)."""
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
    return settings, parts


def _run_parts(report: Report, settings: CheckSettings, parts: Sequence[str]) -> None:
    """Run each part in order; a part that raises is recorded as an error row, the rest run."""
    runners: dict[str, Callable[[Part], None]] = {
        "correctness": lambda p: run_correctness(p, settings),
        "kernels": lambda p: run_kernels(p, settings),
        "train": lambda p: run_train(p, settings, report),
        "generate": lambda p: run_generate(p, settings),
        "context": lambda p: run_context(p, bool(report.data["meta"]["quick"])),
    }
    for name in parts:
        print(f"## {name} (budget {settings.budgets_s[name]:.0f} s)", flush=True)
        part = Part(report, name)
        try:
            runners[name](part)
        except Exception as err:  # noqa: BLE001 - a part that breaks is recorded; others run
            part.add(
                {
                    "case": f"{name} (part)",
                    "status": "error",
                    "note": f"{type(err).__name__}: {shorten(str(err))}",
                }
            )
            part.finish()


def _summary(report: Report) -> dict[str, Any]:
    """The report's summary: failed correctness cases, error and timeout counts per part, the
    exit code and a one-line text."""
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
    return {
        "correctness_passed": not failed,
        "correctness_failed_cases": failed,
        "counts": counts,
        "exit_code": exit_code,
        "finished": now_iso(),
        "text": text,
    }
