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
import datetime
import importlib.metadata
import json
import math
import os
import platform
import re
import sys
import time
import types
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, Float, Int, PyTree

# ==============================================================================================
# Imports from the package. Everything this tool uses from xlstm_eqx is imported here and only
# here, so that moving modules means repointing this block.
# ==============================================================================================
from xlstm_eqx._bench import (
    _mlstm_dims,  # (NH, DHQK, DHV) of an xLSTM config's mLSTM layers
    _peak_bytes,  # XLA's planned peak bytes of a compiled program (or None)
    median_seconds,
    train_flops_per_token,
)
from xlstm_eqx._cell import mlstm_chunkwise
from xlstm_eqx._generate import _decode, _prefill
from xlstm_eqx._llama import multihead_attention
from xlstm_eqx._nn import count_params
from xlstm_eqx._pallas import fastest_chunkwise_backend, mlstm_chunkwise_pallas
from xlstm_eqx._presets import get_preset
from xlstm_eqx._train import MODEL_FAMILIES, TrainConfig, _optimizer_and_step, trainable_params


# ==============================================================================================

__all__ = [
    "PARTS",
    "PEAK_BF16_TFLOPS",
    "add_arguments",
    "chunkwise_flops",
    "estimate_durations",
    "main",
    "peak_bf16_flops",
    "run_gpu_check",
]

PARTS: tuple[str, ...] = ("correctness", "kernels", "train", "generate")
JSON_NAME = "gpu_check.json"
MD_NAME = "gpu_check.md"

#: Dense (no sparsity) bf16 tensor-core peak of known devices, TFLOP/s, from the vendors'
#: datasheets; matched against `jax.Device.device_kind` in this order (first match wins).
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    (r"\bB200\b", 2250.0),
    (r"\bGH200\b", 989.0),
    (r"\bH200\b", 989.0),
    (r"\bH100\b.*\bPCIe\b", 756.0),
    (r"\bH100\b.*\bNVL\b", 835.0),
    (r"\bH100\b", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    (r"\bH800\b", 989.0),
    (r"\bA100\b", 312.0),
    (r"\bA800\b", 312.0),
    (r"\bL40S\b", 362.0),
    (r"\bL4\b", 121.0),
    (r"\bA10G?\b", 125.0),
)


def peak_bf16_flops(device_kind: str) -> float | None:
    """Datasheet dense bf16 FLOP/s of a device kind (`PEAK_BF16_TFLOPS`), None when unknown: MFU
    against the datasheet is only reported for devices whose peak is known."""
    for pattern, tflops in PEAK_BF16_TFLOPS:
        if re.search(pattern, device_kind, flags=re.IGNORECASE):
            return tflops * 1e12
    return None


# ----------------------------------------------------------------------------------------------
# What each mode runs


class CellCase(NamedTuple):
    """A correctness case of the mLSTM kernels: shapes, chunk size, q/k/v dtype, gate range."""

    b: int
    nh: int
    s: int
    dhqk: int
    dhv: int
    chunk: int
    dtype: str
    gates: str  # a key of GATE_RANGES

    def label(self) -> str:
        return (
            f"mlstm B{self.b} NH{self.nh} S{self.s} DHQK{self.dhqk} DHV{self.dhv} "
            f"L{self.chunk} {self.dtype} {self.gates}"
        )


class AttentionCase(NamedTuple):
    """A correctness case of the Llama attention backends (bf16 inputs, causal)."""

    b: int
    s: int
    nh: int
    hd: int
    segments: int  # documents per row (1: no segment ids)

    def label(self) -> str:
        return f"attention B{self.b} S{self.s} NH{self.nh} hd{self.hd} segments{self.segments}"


#: Gate pre-activation ranges (uniform) of the correctness cases: (igate, fgate).
GATE_RANGES: dict[str, tuple[tuple[float, float], tuple[float, float]]] = {
    "trained": ((-5.0, 5.0), (-2.0, 8.0)),  # the input/forget gates of a trained model
    "wide": ((-30.0, 30.0), (-30.0, 30.0)),  # beyond the presets' gate soft cap of 15
}

#: Tolerances of the normalised max error max|x - ref| / max|ref|, by the case's q/k/v dtype:
#: (outputs, gradients). bfloat16 outputs and gradients are rounded to bf16 (2^-8 relative).
TOLERANCES: dict[str, tuple[float, float]] = {
    "float32": (1e-4, 1e-3),
    "bfloat16": (2e-2, 2e-2),
}
#: Attention backends in bf16 against the float32 XLA reference (bf16 probabilities and outputs).
ATTENTION_TOLERANCE = 3e-2


@dataclasses.dataclass(frozen=True)
class CheckSettings:
    """Everything the four parts run; `FULL` for a GPU, `QUICK` for the CPU smoke test."""

    budgets_s: Mapping[str, float]
    correctness_cases: tuple[CellCase | AttentionCase, ...]
    kernel_shapes: tuple[tuple[str, int], ...]  # (xLSTM preset for the head dims, S), in order
    kernel_tokens: int  # B = max(1, kernel_tokens // S)
    kernel_chunk: int
    kernel_passes: tuple[str, ...]  # "fwd", "fwd+bwd"
    kernel_repeats: int
    peer_max_chunks: int  # mlstm-kernels' JAX form: chunk raised until at most this many chunks
    peer_native_seq_lens: tuple[int, ...]  # ... timed at these S only (compiles are slow)
    train_models: tuple[str, ...]  # presets, in pairs of equal size
    train_seq_lens: tuple[int, ...]
    train_max_tokens: int  # cap of batch x S in the batch search
    train_repeats: int
    matmul_n: int
    gen_models: tuple[str, ...]
    gen_batches: tuple[int, ...]
    gen_contexts: tuple[int, ...]
    gen_new_tokens: int
    gen_repeats: int
    gen_prefill_chunk: int  # Llama prefill in chunks of this many tokens
    memory_limit_gb: float | None  # None: the device's own limit (`memory_stats`)
    memory_headroom: float = 0.9  # a plan fits when its peak is at most this x the limit


def _c(b, nh, s, dhqk, dhv, chunk, dtype, gates) -> CellCase:
    return CellCase(b, nh, s, dhqk, dhv, chunk, dtype, gates)


FULL = CheckSettings(
    # 400 s in all: with start-up and each part's last case running past its budget, the run
    # stays within 8 minutes on one H100/H200 (see `estimate_durations`).
    budgets_s={"correctness": 50.0, "kernels": 150.0, "train": 130.0, "generate": 70.0},
    correctness_cases=(
        _c(1, 4, 1000, 64, 128, 64, "float32", "wide"),  # S % L != 0, DHQK != DHV
        _c(2, 8, 2048, 128, 128, 128, "bfloat16", "trained"),
        AttentionCase(2, 2048, 6, 128, 1),  # llama165M's heads
        AttentionCase(2, 1024, 4, 64, 2),
        _c(1, 4, 4096, 96, 192, 64, "bfloat16", "wide"),  # mLSTMv1_165M's heads
        _c(1, 16, 8192, 64, 64, 64, "bfloat16", "trained"),
        _c(1, 4, 3001, 256, 128, 128, "float32", "trained"),
        _c(1, 4, 16384, 128, 256, 128, "bfloat16", "wide"),
        _c(1, 8, 2048, 256, 512, 64, "bfloat16", "trained"),  # mLSTMv1_7B's heads
    ),
    kernel_shapes=(
        ("mLSTMv1_165M", 8192),
        ("mLSTMv1_7B", 8192),
        ("mLSTMv1_165M", 2048),
        ("mLSTMv1_165M", 32768),
        ("mLSTMv1_7B", 32768),
        ("mLSTMv1_7B", 2048),
    ),
    kernel_tokens=65536,
    kernel_chunk=64,
    kernel_passes=("fwd", "fwd+bwd"),
    kernel_repeats=5,
    peer_max_chunks=32,
    peer_native_seq_lens=(2048,),
    train_models=("mLSTMv1_165M", "llama165M"),
    train_seq_lens=(8192, 2048),
    train_max_tokens=2**18,
    train_repeats=3,
    matmul_n=8192,
    gen_models=("mLSTMv1_165M", "llama165M"),
    gen_batches=(1, 16),
    gen_contexts=(1024, 8192, 32768),
    gen_new_tokens=32,
    gen_repeats=3,
    gen_prefill_chunk=1024,
    memory_limit_gb=None,
)

QUICK = CheckSettings(
    budgets_s={"correctness": 60.0, "kernels": 60.0, "train": 60.0, "generate": 60.0},
    correctness_cases=(
        _c(1, 2, 40, 16, 32, 16, "float32", "wide"),
        AttentionCase(1, 32, 2, 16, 2),
    ),
    kernel_shapes=(("tiny_xlstm", 128),),
    kernel_tokens=256,
    kernel_chunk=32,
    kernel_passes=("fwd+bwd",),  # the forward-only program differs only in not taking a grad
    kernel_repeats=2,
    peer_max_chunks=8,
    peer_native_seq_lens=(128,),
    train_models=("tiny_xlstm", "tiny_llama"),
    train_seq_lens=(64,),
    train_max_tokens=64,  # B = 1: one compile per model (the search still plans and predicts)
    train_repeats=2,
    matmul_n=256,
    gen_models=("tiny_xlstm", "tiny_llama"),
    gen_batches=(1,),
    gen_contexts=(32,),  # one context: 4 compiles (2 contexts would be 7)
    gen_new_tokens=4,
    gen_repeats=2,
    gen_prefill_chunk=16,
    memory_limit_gb=1.0,  # a pretend device memory: the search logic runs on a CPU too
)


# ----------------------------------------------------------------------------------------------
# FLOP counts


def chunkwise_flops(
    b: int, nh: int, s: int, dhqk: int, dhv: int, chunk: int, *, backward: bool = False
) -> float:
    """Model FLOPs of one chunkwise mLSTM call, counted analytically (what is computed, masked
    entries of the causal L x L blocks included, so forms with different L do different work).

    Per head and token, forward, with ``L = min(chunk, S)``:
    ``2 L (DHQK + DHV)`` (the L x L score block q kᵀ and its product with v)
    ``+ 4 DHQK DHV + 4 DHQK`` (the chunk's kᵀv and k sums into the state C, n, and the reads q C,
    q n), i.e. ``F = B NH S (2 L (DHQK + DHV) + 4 DHQK DHV + 4 DHQK)``. Forward+backward counts
    ``3 F`` (the backward's two matrix products per forward one); recomputation inside a backward
    is not counted. Gates' elementwise math and exponentials are not counted.
    """
    window = min(chunk, s)
    per_token = 2.0 * window * (dhqk + dhv) + 4.0 * dhqk * dhv + 4.0 * dhqk
    return (3.0 if backward else 1.0) * b * nh * s * per_token


def _pallas_chunk(chunk: int, s: int) -> int:
    """The chunk length the Pallas kernels use: a power of two >= max(16, min(chunk, S))."""
    return max(16, 1 << (min(chunk, s) - 1).bit_length())


def _attention_flops(b: int, s: int, nh: int, hd: int) -> float:
    """Forward FLOPs of full (S x S) attention: q kᵀ and p v, ``4 B NH S^2 hd``."""
    return 4.0 * b * nh * s * s * hd


# ----------------------------------------------------------------------------------------------
# Results: JSON and Markdown, rewritten after every case


_COLUMNS: dict[str, tuple[tuple[str, str], ...]] = {
    "correctness": (
        ("case", "case"),
        ("backend", "backend"),
        ("gates", "gates (i; f)"),
        ("tol", "tol (out / grad)"),
        ("out_err", "out err"),
        ("grad_err", "max grad err"),
        ("status", "status"),
        ("seconds", "s"),
        ("note", "note"),
    ),
    "kernels": (
        ("layer", "layer"),
        ("shape", "B×NH×S×DHQK/DHV"),
        ("form", "form"),
        ("pass", "pass"),
        ("chunk", "L"),
        ("ms", "ms"),
        ("tokens_per_s", "tok/s"),
        ("tflops", "TFLOP/s"),
        ("peak_gib", "peak GiB"),
        ("auto_choice", "auto picks"),
        ("status", "status"),
        ("seconds", "s"),
        ("note", "note"),
    ),
    "train": (
        ("model", "model"),
        ("seq_len", "S"),
        ("batch", "B"),
        ("batch_bound", "B limited by"),
        ("step_ms", "ms/step"),
        ("tokens_per_s", "tok/s"),
        ("mfu_datasheet", "MFU (datasheet)"),
        ("mfu_matmul", "MFU (matmul)"),
        ("peak_gib", "peak GiB"),
        ("mlstm_backend", "mLSTM backend"),
        ("status", "status"),
        ("seconds", "s"),
        ("note", "note"),
    ),
    "generate": (
        ("model", "model"),
        ("batch", "B"),
        ("context", "context"),
        ("ms_per_token", "ms/token"),
        ("tokens_per_s", "tok/s"),
        ("prefill_s", "prefill s (incl. compile)"),
        ("status", "status"),
        ("seconds", "s"),
        ("note", "note"),
    ),
}


def _clean(value: Any) -> Any:
    """JSON-safe: NaN/inf become None (strict JSON has neither); tuples become lists."""
    if isinstance(value, float | np.floating):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value == 0:
            return "0"
        if abs(value) >= 1e4:
            return f"{value:,.0f}"
        if abs(value) >= 100:
            return f"{value:.1f}"
        if abs(value) >= 0.01:
            return f"{value:.3g}"
        return f"{value:.2e}"
    if isinstance(value, list | tuple):
        return " / ".join(_fmt(v) for v in value)
    return str(value).replace("|", "\\|").replace("\n", " ")


class _Report:
    """The run's results; `write` rewrites gpu_check.json and gpu_check.md (atomically)."""

    def __init__(self, out_dir: Path, meta: dict[str, Any], budgets: Mapping[str, float]):
        self.out_dir = out_dir
        self.data: dict[str, Any] = {
            "meta": meta,
            "parts": {
                name: {"status": "pending", "budget_s": float(budgets[name]), "rows": []}
                for name in budgets
            },
        }

    def write(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for name, text in ((JSON_NAME, self._json()), (MD_NAME, self._markdown())):
            tmp = self.out_dir / (name + ".tmp")
            tmp.write_text(text)
            os.replace(tmp, self.out_dir / name)

    def _json(self) -> str:
        return json.dumps(_clean(self.data), indent=1) + "\n"

    def _markdown(self) -> str:
        meta = self.data["meta"]
        lines = [
            "# xlstm_eqx GPU check",
            "",
            f"- device: {meta.get('device_kind')} ({meta.get('platform')}), "
            f"{meta.get('device_count')} device(s); jax {meta.get('jax_version')}",
            f"- mode: {'quick (tiny shapes; not a measurement)' if meta.get('quick') else 'full'}"
            f"; started {meta.get('started')}; Pallas interpret mode: {meta.get('pallas_interpret')}",
            f"- datasheet bf16 peak: {_fmt(meta.get('peak_bf16_tflops_datasheet')) or 'unknown'} TFLOP/s; "
            f"bf16 matmul measured here: {_fmt(meta.get('matmul_bf16_tflops'))} TFLOP/s",
            f"- mlstm-kernels: {meta.get('mlstm_kernels') or 'not installed'}",
            f"- tolerances: normalised max error max|x − ref| / max|ref|; "
            f"{', '.join(f'{k}: {v[0]:g} / {v[1]:g}' for k, v in TOLERANCES.items())} "
            f"(out / grad); attention bf16 vs float32: {ATTENTION_TOLERANCE:g}",
            "",
        ]
        summary = self.data.get("summary")
        if summary:
            lines += [f"**Summary:** {summary.get('text', '')}", ""]
        for name, part in self.data["parts"].items():
            lines.append(
                f"## {name} — {part['status']} ({_fmt(part.get('elapsed_s'))} s of "
                f"{_fmt(part['budget_s'])} s budget)"
            )
            lines.append("")
            if part.get("note"):
                lines += [part["note"], ""]
            rows = part["rows"]
            if not rows:
                lines += ["(no cases yet)", ""]
                continue
            cols = [(k, h) for k, h in _COLUMNS[name] if any(r.get(k) is not None for r in rows)]
            lines.append("| " + " | ".join(h for _, h in cols) + " |")
            lines.append("|" + "|".join("---" for _ in cols) + "|")
            for row in rows:
                lines.append("| " + " | ".join(_fmt(row.get(k)) for k, _ in cols) + " |")
            lines.append("")
        return "\n".join(lines)


class _Part:
    """Runs one part's cases under its time budget (checked before each case, never by
    interrupting one); every case's row is written out as soon as it exists."""

    def __init__(self, report: _Report, name: str):
        self.report = report
        self.name = name
        self.entry = report.data["parts"][name]
        self.budget = float(self.entry["budget_s"])
        self.start = time.perf_counter()
        self.entry["status"] = "running"
        self.entry["started"] = _now()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def spent(self) -> bool:
        return self.elapsed() > self.budget

    def case(self, label: str, fn: Callable[[], dict[str, Any]], **fields: Any) -> dict[str, Any]:
        row: dict[str, Any] = {"case": label, **fields}
        if self.spent():
            row.update(
                status="timed_out",
                note=f"not run: the part's budget of {self.budget:.0f} s was spent",
            )
        else:
            t0 = time.perf_counter()
            try:
                row.update(fn())
                row.setdefault("status", "ok")
            except Exception as err:  # noqa: BLE001 - recorded, and the next case still runs
                row.update(status="error", note=f"{type(err).__name__}: {_short(str(err))}")
            row["seconds"] = time.perf_counter() - t0
            if self.spent():  # kept (it ran to the end), flagged; the part's next cases time out
                row["over_budget"] = True
                ended = f"ended {self.elapsed() - self.budget:.0f} s past the part's budget"
                row["note"] = f"{row['note']}; {ended}" if row.get("note") else ended
        self.add(row)
        return row

    def add(self, row: dict[str, Any]) -> None:
        self.entry["rows"].append(row)
        self.entry["elapsed_s"] = self.elapsed()
        _print_row(self.name, row)
        self.report.write()

    def finish(self, note: str | None = None) -> None:
        statuses = {r["status"] for r in self.entry["rows"]}
        for status in ("fail", "error", "timed_out"):
            if status in statuses:
                self.entry["status"] = status
                break
        else:
            self.entry["status"] = "ok"
        if note:
            self.entry["note"] = note
        self.entry["elapsed_s"] = self.elapsed()
        self.report.write()


def _short(text: str, limit: int = 400) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def _print_row(part: str, row: dict[str, Any]) -> None:
    keys = [k for k, _ in _COLUMNS[part] if k not in ("case", "status", "seconds", "note")]
    shown = ", ".join(f"{k}={_fmt(row[k])}" for k in keys if row.get(k) is not None)
    extra = f" — {row['note']}" if row.get("note") else ""
    secs = f" ({row['seconds']:.1f} s)" if row.get("seconds") is not None else ""
    print(f"[{part}] {row['case']}: {row['status']}{secs} {shown}{extra}", flush=True)


# ----------------------------------------------------------------------------------------------
# Shared helpers


def _memory_limit(settings: CheckSettings) -> tuple[float | None, str]:
    """Bytes a compiled plan may use, and where that number came from."""
    if settings.memory_limit_gb is not None:
        return settings.memory_limit_gb * 2**30, "set (--memory-limit-gb or quick mode)"
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return float(stats["bytes_limit"]), "device memory_stats()['bytes_limit']"
    return None, "unknown (no memory_stats on this platform)"


def _gib(nbytes: int | float | None) -> float | None:
    return None if nbytes is None else nbytes / 2**30


def _random(
    kind: str,
    seed: int,
    shape: tuple[int, ...],
    dtype: Any,
    low: float | int = 0.0,
    high: float | int = 1.0,
) -> Array:
    """Random inputs: "normal", "uniform" in [low, high) or "integers" in [low, high). Drawn
    with NumPy on a CPU (eager jax.random ops would each compile, which dominates a quick run
    there) and with jax.random elsewhere (fast on a GPU, where NumPy would take seconds for the
    largest inputs)."""
    dtype = jnp.dtype(dtype)
    if jax.default_backend() == "cpu":
        rng = np.random.default_rng(seed)
        if kind == "normal":
            x = rng.standard_normal(shape, dtype=np.float32)
        elif kind == "uniform":
            x = rng.uniform(low, high, shape)
        else:
            x = rng.integers(int(low), int(high), shape)
        return jnp.asarray(np.asarray(x, dtype=dtype))
    key = jr.key(seed)
    if kind == "normal":
        return jr.normal(key, shape, jnp.float32).astype(dtype)
    if kind == "uniform":
        return jr.uniform(key, shape, jnp.float32, low, high).astype(dtype)
    return jr.randint(key, shape, int(low), int(high), dtype)


def _mlstm_inputs(
    b: int, nh: int, s: int, dhqk: int, dhv: int, dtype: Any, gates: str, seed: int = 0
) -> tuple[Array, ...]:
    """q, k, v in `dtype`, gate pre-activations (float32, as the models' gate_dtype), and the
    float32 weights w of the scalar loss sum(h * w)."""
    (ilo, ihi), (flo, fhi) = GATE_RANGES[gates]
    seed = 10 * seed
    q = _random("normal", seed, (b, nh, s, dhqk), dtype)
    k = _random("normal", seed + 1, (b, nh, s, dhqk), dtype)
    v = _random("normal", seed + 2, (b, nh, s, dhv), dtype)
    i = _random("uniform", seed + 3, (b, nh, s), jnp.float32, ilo, ihi)
    f = _random("uniform", seed + 4, (b, nh, s), jnp.float32, flo, fhi)
    w = _random("normal", seed + 5, (b, nh, s, dhv), jnp.float32)
    return q, k, v, i, f, w


def _norm_err(x: Array, ref: Array) -> float:
    """max|x - ref| / max|ref| in float64 (inf if either has a non-finite entry)."""
    a = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
    r = np.asarray(jnp.asarray(ref, jnp.float32), np.float64)
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(r))):
        return math.inf
    scale = float(np.max(np.abs(r))) if r.size else 0.0
    return float(np.max(np.abs(a - r))) / max(scale, 1e-30)


# ----------------------------------------------------------------------------------------------
# Part 1: correctness


def _vjp_program(fn: Callable[..., Array], n_args: int) -> Callable[..., Any]:
    """jit of (args..., cotangent) -> (output, gradients of <output, cotangent> w.r.t. args)."""

    def run(*args_and_cot: Array) -> tuple[Array, tuple[Array, ...]]:
        args, cot = args_and_cot[:n_args], args_and_cot[n_args]
        out, pull = jax.vjp(fn, *args)
        return out, pull(cot.astype(out.dtype))

    return jax.jit(run)


def _check_cell(case: CellCase) -> dict[str, Any]:
    """Pallas kernels vs the pure-JAX chunkwise form: output and the five gradients."""
    dtype = jnp.dtype(case.dtype)
    q, k, v, i, f, w = _mlstm_inputs(
        case.b, case.nh, case.s, case.dhqk, case.dhv, dtype, case.gates
    )
    args = (q, k, v, i, f, w)
    results = {}
    # Both in full float32 matmul precision (the default on GPUs may be TF32 for the reference).
    with jax.default_matmul_precision("highest"):
        for name, cell in (("ref", mlstm_chunkwise), ("pallas", mlstm_chunkwise_pallas)):

            def fn(*a: Array, cell: Callable[..., Array] = cell) -> Array:
                return cell(*a, chunk_size=case.chunk)

            results[name] = jax.block_until_ready(_vjp_program(fn, 5)(*args))
    (h_ref, g_ref), (h, g) = results["ref"], results["pallas"]
    out_err = _norm_err(h, h_ref)
    grad_errs = [_norm_err(a, r) for a, r in zip(g, g_ref, strict=True)]
    tol_out, tol_grad = TOLERANCES[case.dtype]
    ok = out_err <= tol_out and max(grad_errs) <= tol_grad
    (ilo, ihi), (flo, fhi) = GATE_RANGES[case.gates]
    return {
        "status": "pass" if ok else "fail",
        "out_err": out_err,
        "grad_err": max(grad_errs),
        "grad_errs": dict(zip(("q", "k", "v", "igate", "fgate"), grad_errs, strict=True)),
        "tol": [tol_out, tol_grad],
        "gates": f"U({ilo:g},{ihi:g}); U({flo:g},{fhi:g})",
    }


def _attention_inputs(case: AttentionCase) -> tuple[Array, ...]:
    shape = (case.b, case.s, case.nh, case.hd)
    q, k, v, cot = (_random("normal", 20 + j, shape, jnp.float32) for j in range(4))
    return q / math.sqrt(case.hd), k, v, cot


def _check_attention(case: AttentionCase, part: _Part) -> None:
    """Each backend (bf16 inputs) against the XLA core on the same inputs in float32."""
    q, k, v, cot = _attention_inputs(case)
    seg = None
    if case.segments > 1:
        seg = jnp.broadcast_to(
            (jnp.arange(case.s) * case.segments // case.s).astype(jnp.int32), (case.b, case.s)
        )

    def attention(backend: str) -> Callable[..., Array]:
        def fn(q: Array, k: Array, v: Array) -> Array:
            return multihead_attention(q, k, v, causal=True, segment_ids=seg, backend=backend)

        return fn

    reference: list[Any] = []

    def ref() -> tuple[Array, tuple[Array, ...]]:
        if not reference:  # computed by the first backend's case (its errors are recorded there)
            with jax.default_matmul_precision("highest"):
                program = _vjp_program(attention("xla"), 3)
                reference.append(jax.block_until_ready(program(q, k, v, cot)))
        return reference[0]

    bf16 = tuple(x.astype(jnp.bfloat16) for x in (q, k, v))
    on_gpu = jax.default_backend() == "gpu"
    for backend in ("xla", "cudnn", "pallas_triton"):
        label = f"{case.label()} {backend}"
        if backend != "xla" and not on_gpu:
            part.add({"case": label, "backend": backend, "status": "skipped", "note": "needs GPU"})
            continue

        def run(backend: str = backend) -> dict[str, Any]:
            ref_out, ref_grads = ref()
            out, grads = jax.block_until_ready(
                _vjp_program(attention(backend), 3)(*bf16, cot.astype(jnp.bfloat16))
            )
            out_err = _norm_err(out, ref_out)
            grad_err = max(_norm_err(a, r) for a, r in zip(grads, ref_grads, strict=True))
            ok = max(out_err, grad_err) <= ATTENTION_TOLERANCE
            return {
                "status": "pass" if ok else "fail",
                "out_err": out_err,
                "grad_err": grad_err,
                "tol": [ATTENTION_TOLERANCE, ATTENTION_TOLERANCE],
            }

        part.case(label, run, backend=backend)


def _run_correctness(part: _Part, settings: CheckSettings) -> None:
    for case in settings.correctness_cases:
        if isinstance(case, AttentionCase):
            if part.spent():
                part.case(case.label(), dict, backend="all")  # recorded as timed out
                continue
            _check_attention(case, part)
        else:
            part.case(case.label(), lambda case=case: _check_cell(case), backend="pallas")
    part.finish(
        "mLSTM: `mlstm_chunkwise_pallas` vs `mlstm_chunkwise` (both in float32 matmul precision "
        "'highest'), output and gradients of sum(h·w) w.r.t. q, k, v, igate, fgate; gates float32."
        " Attention: each backend in bf16 vs the XLA core in float32, causal."
    )


# ----------------------------------------------------------------------------------------------
# Part 2: kernel speed


def _peer_forms() -> tuple[dict[str, Callable[..., Callable[..., Array]]], str | None, str]:
    """mlstm-kernels' chunkwise forms by name -> (chunk size -> fn), a note, and its version.
    The Triton forms need `jax_triton` and `triton`; the JAX form imports Triton glue at import
    time, which is stubbed when `jax_triton` is missing (as in benchmarks/cell.py)."""
    version = _version("mlstm-kernels")
    if version is None:
        return {}, "mlstm-kernels not installed (pip install -e '.[bench]')", ""
    forms: dict[str, Callable[..., Callable[..., Array]]] = {}
    notes = []
    try:
        from mlstm_kernels.jax.chunkwise.triton_xl_chunk import mlstm_chunkwise__xl_chunk

        def xl(chunk: int) -> Callable[..., Array]:
            def fn(q, k, v, i, f):
                return mlstm_chunkwise__xl_chunk(
                    q, k, v, i, f, chunk_size=chunk, autocast_kernel_dtype=q.dtype
                )

            return fn

        forms["mk triton_xl_chunk"] = xl
    except Exception as err:  # noqa: BLE001 - Triton forms unavailable
        notes.append(f"mlstm-kernels Triton forms unavailable ({type(err).__name__}: {err})")
        try:
            import jax_triton  # noqa: F401
        except Exception:  # noqa: BLE001
            sys.modules.setdefault("jax_triton", types.ModuleType("jax_triton"))
    try:
        from mlstm_kernels.jax.chunkwise.native import mlstm_chunkwise__native_autograd

        def native(chunk: int) -> Callable[..., Array]:
            def fn(q, k, v, i, f):
                return mlstm_chunkwise__native_autograd(q, k, v, i, f, chunk_size=chunk)

            return fn

        forms["mk native (JAX)"] = native
    except Exception as err:  # noqa: BLE001 - JAX form unavailable
        notes.append(f"mlstm-kernels JAX form unavailable ({type(err).__name__}: {err})")
    return forms, ("; ".join(notes) or None), version


def _peer_chunk(name: str, s: int, chunk: int, max_chunks: int) -> int:
    """The chunk each peer form runs with: triton_xl_chunk (the kernel xlstm-jax trains with) its
    default 128; the JAX form `chunk` doubled until at most `max_chunks` chunks (its chunk loop
    is unrolled: compile time grows with the chunk count)."""
    if name == "mk triton_xl_chunk":
        return 128
    size = chunk
    while -(-s // size) > max_chunks:
        size *= 2
    return size


def _layer_shape(preset: str) -> tuple[int, int, int]:
    return _mlstm_dims(get_preset(preset))


def _compile_cell(
    fn: Callable[..., Array], backward: bool, args: tuple[Array, ...], w: Array
) -> Any:
    if backward:

        def loss(*a: Array) -> Array:
            return jnp.sum(fn(*a).astype(jnp.float32) * w)

        target = jax.grad(loss, argnums=(0, 1, 2, 3, 4))
    else:
        target = fn
    return jax.jit(target).lower(*args).compile()


def _time_form(
    fn: Callable[..., Array],
    backward: bool,
    args: tuple[Array, ...],
    w: Array,
    shape: tuple[int, int, int, int, int],
    chunk: int,
    repeats: int,
    limit: float | None,
) -> dict[str, Any]:
    b, nh, s, dhqk, dhv = shape
    t0 = time.perf_counter()
    compiled = _compile_cell(fn, backward, args, w)
    row: dict[str, Any] = {"compile_s": time.perf_counter() - t0}
    peak = _peak_bytes(compiled)
    row["peak_gib"] = _gib(peak)
    if peak is not None and limit is not None and peak > limit:
        row.update(status="skipped", note=f"plan needs {peak / 2**30:.1f} GiB > the limit")
        return row
    seconds = median_seconds(lambda: compiled(*args), repeats, warmup=1)
    flops = chunkwise_flops(b, nh, s, dhqk, dhv, chunk, backward=backward)
    row.update(
        ms=1e3 * seconds,
        tokens_per_s=b * s / seconds,
        tflops=flops / seconds / 1e12,
        flops=flops,
    )
    return row


def _run_kernels(part: _Part, settings: CheckSettings) -> None:
    limit, _ = _memory_limit(settings)
    peers, peer_note, _ = _peer_forms()
    chunk = settings.kernel_chunk
    for layer, s in settings.kernel_shapes:
        nh, dhqk, dhv = _layer_shape(layer)
        b = max(1, settings.kernel_tokens // s)
        shape = (b, nh, s, dhqk, dhv)
        q, k, v, i, f, w = _mlstm_inputs(b, nh, s, dhqk, dhv, jnp.bfloat16, "trained")
        args = (q, k, v, i, f)
        forms: dict[str, tuple[Callable[..., Array], int]] = {
            "chunkwise": (
                lambda *a: mlstm_chunkwise(*a, chunk_size=chunk),
                min(chunk, s),
            ),
            "chunkwise_pallas": (
                lambda *a: mlstm_chunkwise_pallas(*a, chunk_size=chunk),
                _pallas_chunk(chunk, s),
            ),
        }
        for name, make in peers.items():
            if "native" in name and s not in settings.peer_native_seq_lens:
                continue
            size = _peer_chunk(name, s, chunk, settings.peer_max_chunks)
            forms[name] = (make(size), size)
        common = {"layer": layer, "shape": f"{b}×{nh}×{s}×{dhqk}/{dhv}", "seq_len": s}
        fwd_bwd_ms: dict[str, float] = {}
        for name, (fn, size) in forms.items():
            for pass_name in settings.kernel_passes:
                backward = pass_name == "fwd+bwd"

                def run(
                    fn=fn, size=size, backward=backward, args=args, w=w, shape=shape
                ) -> dict[str, Any]:
                    return _time_form(
                        fn, backward, args, w, shape, size, settings.kernel_repeats, limit
                    )

                row = part.case(
                    f"{layer} S{s} {name} {pass_name}",
                    run,
                    form=name,
                    chunk=size,
                    **common,
                    **{"pass": pass_name},
                )
                if backward and row.get("ms") is not None:
                    fwd_bwd_ms[name] = row["ms"]

        def auto(q_shape=q.shape, v_shape=v.shape, fwd_bwd_ms=fwd_bwd_ms) -> dict[str, Any]:
            choice = fastest_chunkwise_backend(q_shape, v_shape, jnp.bfloat16, chunk_size=chunk)
            ours = {n: fwd_bwd_ms[n] for n in ("chunkwise", "chunkwise_pallas") if n in fwd_bwd_ms}
            faster = min(ours, key=ours.__getitem__) if len(ours) == 2 else None
            note = "" if faster is None else f"faster in the rows above: {faster}"
            return {"auto_choice": choice, "note": note}

        part.case(f"{layer} S{s} auto", auto, form="auto", **common)
    note = (
        "bf16 q/k/v, float32 gates (trained range), loss sum(h·w) for fwd+bwd; median of "
        f"{settings.kernel_repeats} after a warm-up; TFLOP/s from `chunkwise_flops` with each "
        "form's own L; peak = XLA's compiled memory plan."
    )
    part.finish(note + (f" {peer_note}" if peer_note else ""))


# ----------------------------------------------------------------------------------------------
# Part 3: train step


def _family_name(config: Any) -> str:
    return "llama" if type(config).__name__ == "LlamaConfig" else "xlstm"


def _with_context(config: Any, context: int) -> Any:
    if config.context_length < context:
        config = dataclasses.replace(config, context_length=context)
    return config


def _bf16_matmul_flops(n: int, repeats: int = 10) -> float:
    """Measured FLOP/s of a bf16 ``(n, n) @ (n, n)`` (``2 n^3`` FLOPs), median after a warm-up."""
    a = _random("normal", 1, (n, n), jnp.bfloat16)
    b = _random("normal", 2, (n, n), jnp.bfloat16)
    dot = jax.jit(jnp.dot)
    return 2.0 * n**3 / median_seconds(lambda: dot(a, b), repeats, warmup=1)


def _plan_bytes(compiled: Any) -> tuple[int, int] | None:
    """(fixed, temporary) bytes of XLA's plan for a compiled program: fixed = arguments +
    outputs - aliased (donated) buffers, the part that does not grow with the batch; peak =
    fixed + temporary, as `_peak_bytes` counts it. None where the backend has no analysis."""
    compiled = getattr(compiled, "compiled", compiled)  # eqx.filter_jit wraps jax's Compiled
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return None
    if m is None:
        return None
    fixed = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
    return int(fixed), int(m.temp_size_in_bytes)


class _TrainState:
    """A model, its optimizer state and the trainer's jitted step, for one preset; the state is
    carried from step to step (the step donates it). `plans` keeps every compiled plan's
    (tokens, fixed, temporary) bytes for the batch search."""

    def __init__(self, preset: str, context: int):
        self.config = _with_context(get_preset(preset), context)
        self.family = MODEL_FAMILIES[_family_name(self.config)]
        self.model = self.family.build(self.config, key=jr.key(0))
        cfg = TrainConfig(model=self.family.name, seq_len=context, batch_size=1, steps=1000)
        optimizer, self.step = _optimizer_and_step(cfg, self.model, self.config, self.family)
        self.opt_state = optimizer.init(trainable_params(self.model))
        self.params = count_params(self.model)
        self.plans: list[tuple[int, int, int]] = []

    def inputs(self, batch: int, seq_len: int) -> tuple[Int[Array, "1 B S1"], Any]:
        shape = (1, batch, seq_len + 1)
        return _random("integers", batch, shape, jnp.int32, 0, self.config.vocab_size), jr.key(2)

    def compile(self, batch: int, seq_len: int) -> tuple[Any, int]:
        """The compiled step for this batch and its planned peak bytes."""
        compiled = self.step.lower(self.inputs(batch, seq_len), self.model, self.opt_state)
        compiled = compiled.compile()
        parts = _plan_bytes(compiled)
        if parts is None:
            raise RuntimeError("no compiled memory analysis on this backend: cannot size the batch")
        self.plans.append((batch * seq_len, *parts))
        return compiled, parts[0] + parts[1]

    def predicted_peak(self, tokens: int) -> float:
        """Peak bytes at `tokens` per step from the plans so far: the line through the two plans
        with the most tokens, or with one plan fixed + temporary x (tokens / its tokens) (an
        over-estimate: part of the temporaries does not grow with the batch)."""
        points = sorted({t: f + tmp for t, f, tmp in self.plans}.items())
        if len(points) >= 2:
            (t1, p1), (t2, p2) = points[-2], points[-1]
            slope = max((p2 - p1) / (t2 - t1), 0.0)
            return p2 + slope * (tokens - t2)
        t1, fixed, temp = self.plans[-1]
        return fixed + temp * tokens / t1


def _search_batch(
    state: _TrainState, seq_len: int, limit: float, max_tokens: int, headroom: float
) -> tuple[int, Any, list[list[Any]], str, float]:
    """The largest power-of-two batch whose compiled memory plan fits ``headroom * limit``, at
    most ``max_tokens // seq_len``, found from compiled plans without running anything (no OOM
    crashes): plan B = 1 if the model has no plan yet, predict the largest fitting power of two
    from the plans (`_TrainState.predicted_peak`), compile it, halve while it does not fit, and
    double while the refined prediction says the next one fits. Returns (batch, its compiled
    step, the plans made here [B, peak GiB], what bounded the batch, seconds spent compiling)."""
    allowed = headroom * limit
    cap = 1 << max(0, (max_tokens // seq_len).bit_length() - 1)
    plans: dict[int, tuple[Any, int]] = {}
    t0 = time.perf_counter()

    def plan(batch: int) -> tuple[Any, int]:
        if batch not in plans:
            plans[batch] = state.compile(batch, seq_len)
        return plans[batch]

    def largest_predicted() -> int:
        batch = 1
        while batch * 2 <= cap and state.predicted_peak(batch * 2 * seq_len) <= allowed:
            batch *= 2
        return batch

    if not state.plans:
        plan(1)
    batch = largest_predicted()
    for _ in range(12):  # a handful of compiles at most; the bound only guards the loop
        _, peak = plan(batch)
        if peak > allowed:
            if batch == 1:
                raise RuntimeError(f"B=1 needs {peak / 2**30:.2f} GiB > {allowed / 2**30:.2f} GiB")
            batch //= 2
            continue
        bigger = batch * 2
        if bigger > cap or bigger in plans or state.predicted_peak(bigger * seq_len) > allowed:
            break
        batch = bigger
    compiled, _ = plan(batch)
    probes = [[b, _gib(p)] for b, (_, p) in sorted(plans.items())]
    bound = "token cap" if batch == cap else "memory"
    return batch, compiled, probes, bound, time.perf_counter() - t0


def _mlstm_backend_note(config: Any, batch: int, seq_len: int) -> str | None:
    """The mLSTM backend of the xLSTM model; for "auto", what `fastest_chunkwise_backend` picks
    for the layer's shapes at this batch with q in the config's compute dtype."""
    if _family_name(config) != "xlstm":
        return None
    backend = config.mlstm_block.mlstm.mlstm_cell.backend
    name = getattr(backend, "name", str(backend))
    if name != "auto":
        return name
    nh, dhqk, dhv = _mlstm_dims(config)
    chunk = int(backend.kwargs.get("chunk_size", 64))
    choice = fastest_chunkwise_backend(
        (batch, nh, seq_len, dhqk),
        (batch, nh, seq_len, dhv),
        jnp.dtype(config.dtype),
        chunk_size=chunk,
    )
    return f"auto → {choice}"


def _train_case(
    state: _TrainState,
    seq_len: int,
    settings: CheckSettings,
    limit: float,
    peaks: dict[str, float | None],
) -> dict[str, Any]:
    batch, compiled, probes, bound, compile_s = _search_batch(
        state, seq_len, limit, settings.train_max_tokens, settings.memory_headroom
    )
    inputs = state.inputs(batch, seq_len)
    losses: list[Array] = []

    def one_step() -> Array:
        state.model, state.opt_state, loss, _ = compiled(inputs, state.model, state.opt_state)
        losses.append(loss)
        return loss

    seconds = median_seconds(one_step, settings.train_repeats, warmup=1)
    loss = float(losses[-1])
    tokens_per_s = batch * seq_len / seconds
    flops_tok = train_flops_per_token(state.config, seq_len)
    achieved = flops_tok * tokens_per_s
    datasheet, matmul = peaks["datasheet"], peaks["matmul"]
    return {
        "status": "ok" if math.isfinite(loss) else "error",
        "batch": batch,
        "batch_bound": bound,
        "batch_plans_gib": probes,
        "compile_s": compile_s,
        "params": state.params,
        "step_ms": 1e3 * seconds,
        "tokens_per_s": tokens_per_s,
        "flops_per_token": flops_tok,
        "model_tflops": achieved / 1e12,
        "mfu_datasheet": None if datasheet is None else achieved / datasheet,
        "mfu_matmul": None if matmul is None else achieved / matmul,
        "peak_gib": probes[[p[0] for p in probes].index(batch)][1],
        "loss": loss,
        "mlstm_backend": _mlstm_backend_note(state.config, batch, seq_len),
        "note": "" if math.isfinite(loss) else "non-finite loss",
    }


def _run_train(part: _Part, settings: CheckSettings, report: _Report) -> None:
    limit, source = _memory_limit(settings)
    if limit is None:
        limit, source = 16.0 * 2**30, "assumed 16 GiB (no memory_stats on this platform)"
    meta = report.data["meta"]
    peaks: dict[str, float | None] = {"datasheet": peak_bf16_flops(meta["device_kind"])}
    try:
        peaks["matmul"] = _bf16_matmul_flops(settings.matmul_n)
    except Exception as err:  # noqa: BLE001 - then MFU vs the matmul is not reported
        peaks["matmul"] = None
        part.add({"case": "bf16 matmul", "status": "error", "note": f"{type(err).__name__}: {err}"})
    meta["matmul_bf16_tflops"] = None if peaks["matmul"] is None else peaks["matmul"] / 1e12
    meta["matmul_n"] = settings.matmul_n
    context = max(settings.train_seq_lens)
    states: dict[str, _TrainState | Exception] = {}
    for seq_len in settings.train_seq_lens:
        for preset in settings.train_models:

            def run(preset: str = preset, seq_len: int = seq_len) -> dict[str, Any]:
                if preset not in states:
                    try:
                        states[preset] = _TrainState(preset, context)
                    except Exception as err:  # noqa: BLE001 - remembered: not rebuilt per S
                        states[preset] = err
                st = states[preset]
                if isinstance(st, Exception):
                    raise st
                return _train_case(st, seq_len, settings, limit, peaks)

            part.case(f"{preset} S{seq_len}", run, model=preset, seq_len=seq_len)
    part.finish(
        f"The trainer's jitted step (fwd + bwd + clip + AdamW), the presets' dtypes (bf16 compute "
        f"in the full run). Batch: largest power of two whose compiled memory plan fits "
        f"{settings.memory_headroom:g} x {limit / 2**30:.1f} GiB ({source}), at most "
        f"{settings.train_max_tokens} tokens per step. MFU: `train_flops_per_token` x tokens/s "
        "over the datasheet bf16 peak and over the bf16 matmul measured in this run. Median of "
        f"{settings.train_repeats} steps after a warm-up step."
    )


# ----------------------------------------------------------------------------------------------
# Part 4: generation


@eqx.filter_jit
def _prefill_jit(
    model: Any, prompt: Int[Array, "B P"], cache_size: int
) -> tuple[Float[Array, "B V"], PyTree]:
    return _prefill(model, prompt, cache_size)


@eqx.filter_jit
def _llama_chunk_jit(
    model: Any, tokens: Int[Array, "B T"], cache: PyTree
) -> tuple[Float[Array, "B V"], PyTree]:
    logits, cache = model.decode(tokens, cache)
    return logits[:, -1], cache


@eqx.filter_jit
def _decode_jit(
    model: Any, state: PyTree, logits: Float[Array, "B V"], num_tokens: int
) -> Int[Array, "B N"]:
    one = jnp.ones((), jnp.float32)
    return _decode(model, state, logits, None, num_tokens, one, None, None)


def _prefill_state(
    model: Any, prompt: Int[Array, "B P"], cache_size: int, chunk: int
) -> tuple[Float[Array, "B V"], PyTree]:
    """The library's prefill; a KV-cache model's prompt goes through `decode` in chunks of
    `chunk` tokens (one pass over a long prompt would build the S x S attention matrix)."""
    if hasattr(model, "init_cache") and prompt.shape[1] > chunk:
        cache = model.init_cache(prompt.shape[0], cache_size)
        logits = None
        for start in range(0, prompt.shape[1], chunk):
            logits, cache = _llama_chunk_jit(model, prompt[:, start : start + chunk], cache)
        return logits, cache
    return _prefill_jit(model, prompt, cache_size)


def _run_generate(part: _Part, settings: CheckSettings) -> None:
    n_new = settings.gen_new_tokens
    top = max(settings.gen_contexts) + n_new
    models: dict[str, Any] = {}
    for batch in settings.gen_batches:
        for context in settings.gen_contexts:
            for preset in settings.gen_models:

                def run(preset: str = preset, batch: int = batch, context: int = context):
                    if preset not in models:
                        config = _with_context(get_preset(preset), top)
                        family = MODEL_FAMILIES[_family_name(config)]
                        models[preset] = family.build(config, key=jr.key(0))
                    model = models[preset]
                    vocab = int(model.vocab_size)
                    shape = (batch, context)
                    prompt = _random("integers", context, shape, jnp.int32, 0, vocab)
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
        f"(`_generate._prefill`; KV-cache models in chunks of {settings.gen_prefill_chunk}); "
        f"then the greedy decode scan of `generate` (`_generate._decode`) for {n_new} tokens, "
        f"median of {settings.gen_repeats} after a warm-up. The KV cache holds context + {n_new}."
    )


# ----------------------------------------------------------------------------------------------
# Duration estimate (no measurement)

#: Assumptions of `estimate_durations` for an H100/H200-class GPU. Not measurements: the run's
#: own numbers replace them. Throughputs in TFLOP/s (bandwidth in GB/s), compiles in seconds.
ASSUMED: dict[str, float] = {
    "reference_f32_tflops": 20.0,  # correctness: float32 at precision 'highest' (no TF32)
    "kernel_tflops": 100.0,  # chunkwise forms, bf16 in, f32 math: far below the matmul peak
    "train_tflops": 300.0,  # ~30% of a 989 TFLOP/s bf16 peak
    "prefill_tflops": 200.0,
    "decode_gbps": 2000.0,  # decode is bandwidth-bound: weights + state/KV cache per token
    "compile_cell_s": 2.0,  # one jit of the pure-JAX chunkwise form (fwd or fwd+bwd)
    "compile_pallas_s": 3.0,  # the Pallas/Triton kernels (2 kernels fwd, 4 fwd+bwd)
    "compile_peer_triton_s": 4.0,  # mlstm-kernels' Triton kernels through jax_triton
    "compile_peer_native_s": 12.0,  # mlstm-kernels' JAX form (unrolled chunk loop)
    "compile_attention_s": 1.5,
    "compile_auto_s": 6.0,  # `fastest_chunkwise_backend`: two fwd+bwd compiles + timing
    "compile_train_s": 20.0,  # one train step of a 165M model (blocks scanned)
    "compile_prefill_s": 6.0,
    "compile_decode_s": 4.0,
    "startup_s": 20.0,  # imports, device start, the bf16 matmul
}


def _estimate_correctness(settings: CheckSettings) -> list[dict[str, Any]]:
    out = []
    for case in settings.correctness_cases:
        if isinstance(case, AttentionCase):
            flops = 3.0 * _attention_flops(case.b, case.s, case.nh, case.hd) * 4  # ref + 3
            compiles = 4
            compile_s = compiles * ASSUMED["compile_attention_s"]
        else:
            fwd = chunkwise_flops(case.b, case.nh, case.s, case.dhqk, case.dhv, case.chunk)
            flops = 2 * 3.0 * fwd  # reference and kernels, forward+backward once each
            compiles = 2
            compile_s = ASSUMED["compile_cell_s"] + ASSUMED["compile_pallas_s"]
        compute_s = flops / (ASSUMED["reference_f32_tflops"] * 1e12)
        out.append(
            {
                "case": case.label(),
                "compiles": compiles,
                "flops": flops,
                "compute_s": compute_s,
                "compile_s": compile_s,
            }
        )
    return out


_COMPILE_KEY = {
    "chunkwise": "compile_cell_s",
    "chunkwise_pallas": "compile_pallas_s",
    "mk triton_xl_chunk": "compile_peer_triton_s",
    "mk native (JAX)": "compile_peer_native_s",
}


def _estimate_kernels(settings: CheckSettings) -> list[dict[str, Any]]:
    out = []
    runs = settings.kernel_repeats + 1
    for layer, s in settings.kernel_shapes:
        nh, dhqk, dhv = _layer_shape(layer)
        b = max(1, settings.kernel_tokens // s)
        forms = {
            "chunkwise": min(settings.kernel_chunk, s),
            "chunkwise_pallas": _pallas_chunk(settings.kernel_chunk, s),
        }
        for name in ("mk triton_xl_chunk", "mk native (JAX)"):
            if "native" in name and s not in settings.peer_native_seq_lens:
                continue
            forms[name] = _peer_chunk(name, s, settings.kernel_chunk, settings.peer_max_chunks)
        passes = settings.kernel_passes
        for name, chunk in forms.items():
            flops = runs * sum(
                chunkwise_flops(b, nh, s, dhqk, dhv, chunk, backward=p == "fwd+bwd") for p in passes
            )
            out.append(
                {
                    "case": f"{layer} S{s} {name} {', '.join(passes)}",
                    "compiles": len(passes),
                    "flops": flops,
                    "compute_s": flops / (ASSUMED["kernel_tflops"] * 1e12),
                    "compile_s": len(passes) * ASSUMED[_COMPILE_KEY[name]],
                }
            )
        out.append(
            {
                "case": f"{layer} S{s} auto",
                "compiles": 2,
                "flops": 0.0,
                "compute_s": 0.0,
                "compile_s": ASSUMED["compile_auto_s"],
            }
        )
    return out


def _estimate_train(settings: CheckSettings) -> list[dict[str, Any]]:
    out = []
    context = max(settings.train_seq_lens)
    probed: set[str] = set()
    for s in settings.train_seq_lens:
        for preset in settings.train_models:
            config = _with_context(get_preset(preset), context)
            tokens = settings.train_max_tokens  # upper bound: the batch search may stop lower
            flops = (settings.train_repeats + 2) * tokens * train_flops_per_token(config, s)
            # a plan at B=1 for the model's first S, then the predicted batch (more compiles if
            # the prediction was off)
            compiles = 1 if preset in probed else 2
            probed.add(preset)
            compile_s = compiles * ASSUMED["compile_train_s"]
            if _family_name(config) == "xlstm":
                compile_s += ASSUMED["compile_auto_s"]
            out.append(
                {
                    "case": f"{preset} S{s}",
                    "compiles": compiles,
                    "flops": flops,
                    "compute_s": flops / (ASSUMED["train_tflops"] * 1e12),
                    "compile_s": compile_s,
                }
            )
    return out


def _estimate_generate(settings: CheckSettings) -> list[dict[str, Any]]:
    out = []
    n_new = settings.gen_new_tokens
    top = max(settings.gen_contexts) + n_new
    decoded: set[tuple[str, int]] = set()
    for batch in settings.gen_batches:
        for context in settings.gen_contexts:
            for preset in settings.gen_models:
                config = _with_context(get_preset(preset), top)
                llama = _family_name(config) == "llama"
                model = eqx.filter_eval_shape(
                    MODEL_FAMILIES[_family_name(config)].build, config, key=jr.key(0)
                )
                n_params = count_params(model)
                d, layers = config.embedding_dim, config.num_blocks
                flops = 2.0 * n_params * batch * context
                state_bytes = 0.0
                if llama:  # chunks attend to the whole cache; the cache is read per new token
                    flops += 4.0 * batch * context * (context + n_new) * d * layers
                    state_bytes = 2 * 2.0 * layers * batch * (context + n_new) * d
                per_token = (4.0 * n_params + state_bytes) / (ASSUMED["decode_gbps"] * 1e9)
                compute_s = flops / (ASSUMED["prefill_tflops"] * 1e12)
                compute_s += (settings.gen_repeats + 1) * n_new * per_token
                compiles = 1
                compile_s = ASSUMED["compile_prefill_s"]
                if llama or (preset, batch) not in decoded:
                    compiles += 1
                    compile_s += ASSUMED["compile_decode_s"]
                    decoded.add((preset, batch))
                out.append(
                    {
                        "case": f"{preset} B{batch} C{context}",
                        "compiles": compiles,
                        "flops": flops,
                        "compute_s": compute_s,
                        "compile_s": compile_s,
                    }
                )
    return out


def estimate_durations(settings: CheckSettings | None = None) -> dict[str, Any]:
    """Expected seconds of each part of a run (default: the full GPU run), from analytic FLOPs at
    the throughputs in `ASSUMED` plus (number of compiles) x (assumed seconds per compile); and
    which cases would fall past the part's budget. Runs nothing on the device (model sizes come
    from `eqx.filter_eval_shape`)."""
    settings = settings or FULL
    makers = {
        "correctness": _estimate_correctness,
        "kernels": _estimate_kernels,
        "train": _estimate_train,
        "generate": _estimate_generate,
    }
    parts = {}
    for name, make in makers.items():
        cases = make(settings)
        elapsed = 0.0  # as the run would go: a case starts only while the budget is not spent
        past = []
        for case in cases:
            case["total_s"] = case["compute_s"] + case["compile_s"]
            if elapsed > settings.budgets_s[name]:
                past.append(case["case"])
            else:
                elapsed += case["total_s"]
        parts[name] = {
            "cases": len(cases),
            "compiles": sum(c["compiles"] for c in cases),
            "compute_s": sum(c["compute_s"] for c in cases),
            "compile_s": sum(c["compile_s"] for c in cases),
            "all_cases_s": sum(c["total_s"] for c in cases),
            "expected_s": elapsed,
            "budget_s": settings.budgets_s[name],
            "expected_timed_out": past,
            "rows": cases,
        }
    return {
        "mode": "quick" if settings is QUICK else "full" if settings is FULL else "custom",
        "assumed": dict(ASSUMED),
        "parts": parts,
        "all_cases_s": ASSUMED["startup_s"] + sum(p["all_cases_s"] for p in parts.values()),
        "expected_s": ASSUMED["startup_s"] + sum(p["expected_s"] for p in parts.values()),
    }


def format_estimate(est: dict[str, Any]) -> str:
    """`estimate_durations` as the text `--estimate` prints."""
    lines = [
        f"# Estimated duration of the {est['mode']} run on an H100/H200-class GPU "
        "(assumptions, not measurements):",
        "# " + ", ".join(f"{k}={v:g}" for k, v in est["assumed"].items()),
        f"{'part':<12} {'cases':>5} {'compiles':>8} {'compute s':>9} {'compile s':>9} "
        f"{'all cases s':>11} {'budget s':>8} {'expected s':>10}",
    ]
    for name, p in est["parts"].items():
        lines.append(
            f"{name:<12} {p['cases']:>5} {p['compiles']:>8} {p['compute_s']:>9.1f} "
            f"{p['compile_s']:>9.1f} {p['all_cases_s']:>11.1f} {p['budget_s']:>8.0f} "
            f"{p['expected_s']:>10.1f}"
        )
    lines.append(
        f"expected wall time {est['expected_s']:.0f} s (all cases: {est['all_cases_s']:.0f} s), "
        f"incl. {est['assumed']['startup_s']:g} s start-up; a part starts no case once its budget "
        "is spent"
    )
    for name, p in est["parts"].items():
        for case in p["rows"]:
            mark = "  (expected to time out)" if case["case"] in p["expected_timed_out"] else ""
            lines.append(
                f"  {name:<11} {case['case']:<58} {case['compiles']:>2} compiles "
                f"{case['total_s']:>6.1f} s{mark}"
            )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Entry points


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's flags (also used by `xlstm-eqx bench gpu`)."""
    parser.add_argument("--out", default=None, help="output folder (gpu_check.json, .md)")
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
