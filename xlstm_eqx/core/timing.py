"""Timing helpers used by the benchmarks, the profiler and the ``auto`` backend: the median wall
time of a JAX call (waiting for its result), and XLA's planned peak memory and cost analysis
(FLOPs, bytes accessed) of a compiled call.
"""

import statistics
import time
from collections.abc import Callable
from typing import Any

import jax


# timing


def median_seconds(fn: Callable[[], Any], repeats: int, *, warmup: int = 0) -> float:
    """Median wall seconds of `repeats` calls of ``fn()``, each timed until its result is ready
    (`jax.block_until_ready`), after `warmup` untimed calls (compilation)."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def memory_analysis(compiled: Any) -> Any | None:
    """XLA's memory plan of a compiled program (``jax.stages.Compiled`` or what
    ``eqx.filter_jit(...).lower(...).compile()`` returns), or None where the backend has none."""
    compiled = getattr(compiled, "compiled", compiled)  # eqx.filter_jit wraps jax's Compiled
    try:
        return compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return None


def cost_analysis(compiled: Any) -> dict[str, float]:
    """XLA's cost analysis of a compiled program (``jax.stages.Compiled`` or eqx's wrapper):
    ``{"flops": ..., "bytes accessed": ..., ...}``, empty where the backend has none."""
    compiled = getattr(compiled, "compiled", compiled)  # eqx.filter_jit wraps jax's Compiled
    try:
        cost = compiled.cost_analysis() or {}
    except Exception:  # noqa: BLE001 - not every backend implements it
        return {}
    if isinstance(cost, list):  # older jax returned one dict per program
        cost = cost[0] if cost else {}
    return {str(k): float(v) for k, v in cost.items()}


def peak_bytes(compiled: Any) -> int | None:
    m = memory_analysis(compiled)
    if m is None:
        return None
    return (
        m.temp_size_in_bytes
        + m.argument_size_in_bytes
        + m.output_size_in_bytes
        - m.alias_size_in_bytes
    )
