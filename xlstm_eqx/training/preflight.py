"""Checks of a run's setting that must fail at once, before the data is read or anything is
written: a `--resume` that would do nothing, an `--out` full of unrelated files, a `--mesh` that
cannot be built or does not fit the model's heads."""

import math
import os
from typing import Any

import jax

from ..core.parallel_config import ParallelConfig
from ..models import ModelConfig
from ..parallel.context import check_sequence_split
from ..parallel.mesh import axis_sizes, parse_mesh_spec


__all__ = ["RUN_FILES", "check_mesh", "check_out_dir", "check_resume_steps"]

# What a run writes into its --out (and the lock): anything else there is not ours.
RUN_FILES = frozenset(
    {"config.json", "metrics.jsonl", "loss.png", "summary.json", "checkpoints", ".lock"}
    # wsd extension (extend.py), trackers (trackers.py), --profile-steps, --lm-eval-tasks
    | {"wsd_decay_start", "superseded", "trackers.json", "tensorboard", "wandb", "profile"}
    | {"lm_eval"}
)


def check_resume_steps(steps: int, checkpoint_step: int, out: str) -> None:
    if steps <= checkpoint_step:
        raise ValueError(
            f"--resume: the run in {out!r} is already at step {checkpoint_step}, and --steps "
            f"{steps} asks for no more; pass --steps greater than {checkpoint_step} to continue it"
        )


def check_out_dir(out: str) -> None:
    """A fresh run goes into a new or empty directory, or over a run's own files."""
    if not os.path.isdir(out):
        return
    foreign = sorted(
        n for n in os.listdir(out) if n not in RUN_FILES and ".tmp" not in n and n != "loss.png"
    )
    if foreign:
        shown = ", ".join(foreign[:5]) + (
            f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
        )
        raise FileExistsError(
            f"--out {out!r} holds files that are not a run's ({shown}); "
            "choose a new or empty directory"
        )


def _head_counts(d: Any) -> set[int]:
    found: set[int] = set()
    if isinstance(d, dict):
        for k, v in d.items():
            if k == "num_heads" and isinstance(v, int) and v > 0:
                found.add(v)
            else:
                found |= _head_counts(v)
    return found


def check_mesh(
    spec: str, model_config: ModelConfig, *, what_if: bool = False, seq_len: int | None = None
) -> ParallelConfig:
    """The mesh of `spec` for this model: its axes multiply to the device count (`what_if`: a
    mesh of the devices it names, a -1 axis of size 1), the tensor-parallel size divides
    every head count and the context-parallel size `seq_len` (if given: `--seq-len`). Returns
    the `ParallelConfig`."""
    pc = parse_mesh_spec(spec, getattr(model_config, "parallel", None))
    if what_if:
        axes = ("data", "fsdp", "pipeline", "context", "model")
        named = [getattr(pc, f"{a}_axis_size", 1) for a in axes]
        num_devices = math.prod(s for s in named if s != -1)
    else:
        num_devices = jax.device_count()
    sizes = axis_sizes(pc, num_devices)
    tp = sizes[pc.model_axis_name]
    bad = sorted(h for h in _head_counts(model_config.to_dict()) if h % tp)
    if bad:
        raise ValueError(
            f"mesh {spec!r}: the tensor-parallel size {tp} does not divide the model's "
            f"num_heads {bad[0]}"
        )
    if seq_len is not None:
        cp = sizes.get(pc.context_axis_name, 1)
        name = "--seq-len (TrainConfig.seq_len)"
        check_sequence_split(seq_len, cp, pc.context_axis_name, name=name)
    return pc
