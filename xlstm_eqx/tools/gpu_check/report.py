"""The GPU check's results: `gpu_check.json` and `gpu_check.md` rewritten after every case, per-part
time budgets, and the random inputs and error measures the parts share.
"""

import datetime
import json
import math
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array

from .settings import (
    ATTENTION_TOLERANCE,
    GATE_RANGES,
    JSON_NAME,
    MD_NAME,
    TOLERANCES,
    CheckSettings,
)


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
    "context": (
        ("case", "case"),
        ("rel_err", "rel. error"),
        ("ms_one_device", "ms 1 device"),
        ("ms_cp", "ms cp"),
        ("temp_mib_one_device", "temp MiB 1 device"),
        ("temp_mib_per_device_cp", "temp MiB/device cp"),
        ("status", "status"),
        ("seconds", "s"),
        ("note", "note"),
    ),
}


def json_safe(value: Any) -> Any:
    """JSON-safe: NaN/inf become None (strict JSON has neither); tuples become lists."""
    if isinstance(value, float | np.floating):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
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


class Report:
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
        return json.dumps(json_safe(self.data), indent=1) + "\n"

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


class Part:
    """Runs one part's cases under its time budget (checked before each case, never by
    interrupting one); every case's row is written out as soon as it exists."""

    def __init__(self, report: Report, name: str):
        self.report = report
        self.name = name
        self.entry = report.data["parts"][name]
        self.budget = float(self.entry["budget_s"])
        self.start = time.perf_counter()
        self.entry["status"] = "running"
        self.entry["started"] = now_iso()

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
                row.update(status="error", note=f"{type(err).__name__}: {shorten(str(err))}")
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


def shorten(text: str, limit: int = 400) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def _print_row(part: str, row: dict[str, Any]) -> None:
    keys = [k for k, _ in _COLUMNS[part] if k not in ("case", "status", "seconds", "note")]
    shown = ", ".join(f"{k}={_fmt(row[k])}" for k in keys if row.get(k) is not None)
    extra = f" — {row['note']}" if row.get("note") else ""
    secs = f" ({row['seconds']:.1f} s)" if row.get("seconds") is not None else ""
    print(f"[{part}] {row['case']}: {row['status']}{secs} {shown}{extra}", flush=True)


# Shared helpers


def memory_limit(settings: CheckSettings) -> tuple[float | None, str]:
    """Bytes a compiled plan may use, and where that number came from."""
    if settings.memory_limit_gb is not None:
        return settings.memory_limit_gb * 2**30, "set (--memory-limit-gb or quick mode)"
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return float(stats["bytes_limit"]), "device memory_stats()['bytes_limit']"
    return None, "unknown (no memory_stats on this platform)"


def gib(nbytes: int | float | None) -> float | None:
    return None if nbytes is None else nbytes / 2**30


def random_array(
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


def mlstm_inputs(
    b: int, nh: int, s: int, dhqk: int, dhv: int, dtype: Any, gates: str, seed: int = 0
) -> tuple[Array, ...]:
    """q, k, v in `dtype`, gate pre-activations (float32, as the models' gate_dtype), and the
    float32 weights w of the scalar loss sum(h * w)."""
    (ilo, ihi), (flo, fhi) = GATE_RANGES[gates]
    seed = 10 * seed
    q = random_array("normal", seed, (b, nh, s, dhqk), dtype)
    k = random_array("normal", seed + 1, (b, nh, s, dhqk), dtype)
    v = random_array("normal", seed + 2, (b, nh, s, dhv), dtype)
    i = random_array("uniform", seed + 3, (b, nh, s), jnp.float32, ilo, ihi)
    f = random_array("uniform", seed + 4, (b, nh, s), jnp.float32, flo, fhi)
    w = random_array("normal", seed + 5, (b, nh, s, dhv), jnp.float32)
    return q, k, v, i, f, w


def norm_err(x: Array, ref: Array) -> float:
    """max|x - ref| / max|ref| in float64 (inf if either has a non-finite entry)."""
    a = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
    r = np.asarray(jnp.asarray(ref, jnp.float32), np.float64)
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(r))):
        return math.inf
    scale = float(np.max(np.abs(r))) if r.size else 0.0
    return float(np.max(np.abs(a - r))) / max(scale, 1e-30)
