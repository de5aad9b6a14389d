"""GPU check, part 3: the train step of the 165M presets at the largest batch whose compiled memory
plan fits the device; tokens/s and MFU against the datasheet peak and a timed bf16 matmul.
"""

import dataclasses
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Int

from ...cell import fastest_chunkwise_backend
from ...core import count_params, median_seconds
from ...core.timing import memory_analysis
from ...llama import LlamaConfig
from ...models import MODEL_FAMILIES, mlstm_dims, train_flops_per_token
from ...presets import get_preset
from ...training import TrainConfig, trainable_params
from ...training.step import optimizer_and_step
from ...xlstm import xLSTMLMModelConfig
from .report import Part, Report, gib, memory_limit, random_array
from .settings import CheckSettings, peak_bf16_flops


# Part 3: train step


GpuCheckConfig = xLSTMLMModelConfig | LlamaConfig
"""The model configs the GPU check trains."""


def family_name(config: GpuCheckConfig) -> str:
    return "llama" if type(config).__name__ == "LlamaConfig" else "xlstm"


def with_context(config: GpuCheckConfig, context: int) -> GpuCheckConfig:
    if config.context_length < context:
        config = dataclasses.replace(config, context_length=context)
    return config


def _bf16_matmul_flops(n: int, repeats: int = 10) -> float:
    """Measured FLOP/s of a bf16 ``(n, n) @ (n, n)`` (``2 n^3`` FLOPs), median after a warm-up."""
    a = random_array("normal", 1, (n, n), jnp.bfloat16)
    b = random_array("normal", 2, (n, n), jnp.bfloat16)
    dot = jax.jit(jnp.dot)
    return 2.0 * n**3 / median_seconds(lambda: dot(a, b), repeats, warmup=1)


def _plan_bytes(compiled: Any) -> tuple[int, int] | None:
    """(fixed, temporary) bytes of XLA's plan for a compiled program: fixed = arguments +
    outputs - aliased (donated) buffers, the part that does not grow with the batch; peak =
    fixed + temporary, as `peak_bytes` counts it. None where the backend has no analysis."""
    m = memory_analysis(compiled)
    if m is None:
        return None
    fixed = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
    return int(fixed), int(m.temp_size_in_bytes)


class TrainState:
    """A model, its optimizer state and the trainer's jitted step, for one preset; the state is
    carried from step to step (the step donates it). `plans` keeps every compiled plan's
    (tokens, fixed, temporary) bytes for the batch search."""

    def __init__(self, preset: str, context: int):
        self.config = with_context(get_preset(preset), context)
        self.family = MODEL_FAMILIES[family_name(self.config)]
        self.model = self.family.build(self.config, key=jr.key(0))
        cfg = TrainConfig(model=self.family.name, seq_len=context, batch_size=1, steps=1000)
        optimizer, self.step = optimizer_and_step(cfg, self.model, self.config, self.family)
        self.opt_state = optimizer.init(trainable_params(self.model))
        self.params = count_params(self.model)
        self.plans: list[tuple[int, int, int]] = []

    def inputs(self, batch: int, seq_len: int) -> tuple[Int[Array, "1 B S1"], Any]:
        shape = (1, batch, seq_len + 1)
        return random_array("integers", batch, shape, jnp.int32, 0, self.config.vocab_size), jr.key(
            2
        )

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


def search_batch(
    state: TrainState, seq_len: int, limit: float, max_tokens: int, headroom: float
) -> tuple[int, Any, list[list[Any]], str, float]:
    """The largest power-of-two batch whose compiled memory plan fits ``headroom * limit``, at
    most ``max_tokens // seq_len``, found from compiled plans without running anything (no OOM
    crashes): plan B = 1 if the model has no plan yet, predict the largest fitting power of two
    from the plans (`TrainState.predicted_peak`), compile it, halve while it does not fit, and
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
    probes = [[b, gib(p)] for b, (_, p) in sorted(plans.items())]
    bound = "token cap" if batch == cap else "memory"
    return batch, compiled, probes, bound, time.perf_counter() - t0


def _mlstm_backend_note(config: GpuCheckConfig, batch: int, seq_len: int) -> str | None:
    """The mLSTM backend of the xLSTM model; for "auto", what `fastest_chunkwise_backend` picks
    for the layer's shapes at this batch with q in the config's compute dtype."""
    if not isinstance(config, xLSTMLMModelConfig) or config.mlstm_block is None:
        return None
    backend = config.mlstm_block.mlstm.mlstm_cell.backend_config
    name = backend.name
    if name != "auto":
        return name
    nh, dhqk, dhv = mlstm_dims(config)
    chunk = int((backend.kwargs or {}).get("chunk_size", 64))
    choice = fastest_chunkwise_backend(
        (batch, nh, seq_len, dhqk),
        (batch, nh, seq_len, dhv),
        jnp.dtype(config.dtype),
        chunk_size=chunk,
    )
    return f"auto → {choice}"


def _train_case(
    state: TrainState,
    seq_len: int,
    settings: CheckSettings,
    limit: float,
    peaks: dict[str, float | None],
) -> dict[str, Any]:
    batch, compiled, probes, bound, compile_s = search_batch(
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


def run_train(part: Part, settings: CheckSettings, report: Report) -> None:
    limit, source = memory_limit(settings)
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
    states: dict[str, TrainState | Exception] = {}
    for seq_len in settings.train_seq_lens:
        for preset in settings.train_models:

            def run(preset: str = preset, seq_len: int = seq_len) -> dict[str, Any]:
                if preset not in states:
                    try:
                        states[preset] = TrainState(preset, context)
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
