"""Batch-size ramp-up (`--batch-rampup-steps N`): the micro-batch grows from
`--batch-rampup-start` sequences at step 1 to `--batch-size` at step N+1, linearly, in whole
multiples of `--batch-rampup-increment` (so that on a mesh every size splits over the data-parallel
devices), then stays there. The reference trainer ramps its batch too (`batch_rampup_factors`, a
stepwise factor per boundary); a start, a length and a granularity say the same in three flags.

The steps read the training data as one stream of windows (sequences): step s reads the
`grad_accum × size(s)` windows after those of steps 1…s-1, so the tokens seen, the epoch and the
data position of any step follow from the config alone, and `--resume` mid-ramp continues with
the same windows and the same batch size. Each distinct size compiles the train step once.
"""

import numpy as np

from ..core.parallel_config import ParallelConfig
from ..parallel.mesh import axis_sizes
from .config import TrainConfig


__all__ = ["BatchRamp", "check_rampup_on_mesh"]


class BatchRamp:
    """The micro-batch size of every step and where each step's windows start in the stream.
    Without a ramp (`steps == 0`) every step has `batch_size` rows, as before."""

    def __init__(self, *, batch_size: int, grad_accum: int, start: int, increment: int, steps: int):
        self.batch_size = batch_size
        self.grad_accum = grad_accum
        self.start = start
        self.increment = increment
        self.steps = steps
        ramp = np.arange(1, steps + 1)
        grown = (batch_size - start) * (ramp - 1) // max(steps, 1)
        self._sizes = start + grown // increment * increment  # (steps,) sizes of steps 1…steps
        # windows read before step s, for s = 1 … steps + 1
        self._before = np.concatenate([[0], np.cumsum(self._sizes)]) * grad_accum

    @classmethod
    def of(cls, cfg: TrainConfig) -> "BatchRamp":
        return cls(
            batch_size=cfg.batch_size,
            grad_accum=cfg.grad_accum,
            start=cfg.batch_rampup_start,
            increment=cfg.batch_rampup_increment,
            steps=cfg.batch_rampup_steps,
        )

    @property
    def active(self) -> bool:
        return self.steps > 0

    def size(self, step: int) -> int:
        """Sequences per micro-batch at `step` (1-based)."""
        if step > self.steps:
            return self.batch_size
        return int(self._sizes[step - 1])

    def windows_before(self, step: int) -> int:
        """Windows (sequences) the steps before `step` read: the first window of `step`."""
        if step <= self.steps + 1:
            return int(self._before[step - 1])
        after = (step - 1 - self.steps) * self.grad_accum * self.batch_size
        return int(self._before[-1]) + after

    def layout(self, step: int) -> tuple[int, int]:
        """`(rows per micro-batch, first window)` of `step`: what the batch loader reads."""
        return self.size(step), self.windows_before(step)

    def tokens_through(self, step: int, seq_len: int) -> int:
        """Tokens trained on in steps 1…`step` (predicted positions: `seq_len` a sequence)."""
        return self.windows_before(step + 1) * seq_len

    def distinct_sizes(self) -> list[int]:
        return sorted({*self._sizes.tolist(), self.batch_size})


def check_rampup_on_mesh(cfg: TrainConfig, mesh_config: ParallelConfig) -> None:
    """On the mesh of `mesh_config`, every size of the ramp must split over the devices of its
    batch axes (data × fsdp): the start and the increment are multiples of their count (the
    final `--batch-size` is checked by the loader), else a ValueError naming the flag."""
    sizes = axis_sizes(mesh_config)
    data_size = sizes[mesh_config.data_axis_name] * sizes[mesh_config.fsdp_axis_name]
    if cfg.batch_rampup_steps == 0 or data_size <= 1:
        return
    for name in ("batch_rampup_start", "batch_rampup_increment"):
        value = getattr(cfg, name)
        if value % data_size:
            raise ValueError(
                f"--{name.replace('_', '-')} (TrainConfig.{name}) must be a multiple of the "
                f"mesh's data-parallel size {data_size} (--mesh {cfg.mesh!r}), got {value}"
            )
