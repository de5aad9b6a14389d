"""What lets the train loop run ahead of the host: step results kept on the device until a step
that logs, evaluates or checkpoints reads them all at once, and the profiling window.

Steps are dispatched asynchronously; reading a loss (`float(loss)`) waits for its step. The loop
therefore reads the losses and gradient norms of the steps since the last read in one transfer,
only at steps where it needs them, and checks them all for NaN/inf there (before any checkpoint is
written, so a checkpoint never holds the state after a non-finite step).
"""

import os
from typing import Any

import jax
import numpy as np


class PendingScalars:
    """Per-step device scalars (loss, gradient norm) not yet read by the host."""

    def __init__(self) -> None:
        self._steps: list[int] = []
        self._values: list[tuple[Any, ...]] = []

    def add(self, step: int, *values: Any) -> None:
        self._steps.append(step)
        self._values.append(values)

    def __len__(self) -> int:
        return len(self._steps)

    def read(self) -> list[tuple[int, tuple[float, ...]]]:
        """`(step, (value, …))` of every pending step, oldest first, in one device-to-host copy."""
        if not self._steps:
            return []
        host = jax.device_get(self._values)
        out = [
            (s, tuple(float(np.asarray(v)) for v in vals))
            for s, vals in zip(self._steps, host, strict=True)
        ]
        self._steps, self._values = [], []
        return out


def parse_profile_steps(spec: str) -> tuple[int, int] | None:
    """`"A:B"` → (A, B), the first and last step traced (1-based, inclusive); "" → None."""
    if not spec:
        return None
    try:
        a, b = (int(x) for x in spec.split(":"))
    except ValueError:
        raise ValueError(f"TrainConfig.profile_steps must be 'A:B' (steps), got {spec!r}") from None
    if not 1 <= a <= b:
        raise ValueError(f"TrainConfig.profile_steps {spec!r}: need 1 <= A <= B")
    return a, b


class ProfileWindow:
    """A `jax.profiler` trace of steps A…B into `directory` (TensorBoard's profile plugin and
    Perfetto read it): started before step A is dispatched, stopped once step B has finished."""

    def __init__(self, spec: str, directory: str):
        self.window = parse_profile_steps(spec)
        self.directory = directory
        self.active = False

    def before(self, step: int) -> None:
        if self.window is not None and step == self.window[0] and not self.active:
            os.makedirs(self.directory, exist_ok=True)
            jax.profiler.start_trace(self.directory)
            self.active = True

    def after(self, step: int, outputs: Any) -> None:
        if self.active and self.window is not None and step >= self.window[1]:
            jax.block_until_ready(outputs)
            self.stop()

    def stop(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
