"""The GPU check's `context` part: context parallelism across the machine's GPUs.

With two or more GPUs, for cp = 2 and cp = the largest power of two of GPUs (at most 8): the loss
and gradients of the trainer's step (`training.step.make_train_step_for`) for a small "mlstm"
xLSTM on one sequence split over a ``cp=N`` mesh against the same step on one GPU (float32; pass
within `CONTEXT_TOLERANCE` relative), the time of one step each way and XLA's planned temporaries
per device. With fewer GPUs the part records one ``skipped`` row saying so.
"""

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax

from ...cell.backend_config import mLSTMBackendNameAndKwargs
from ...core.timing import median_seconds, memory_analysis
from ...presets import tiny_xlstm_slstm
from ...training.step import init_sharded_opt_state, make_train_step_for, mesh_layout
from ...xlstm.config import xLSTMLMModelConfig
from ...xlstm.model import xLSTMLMModel
from .report import Part, random_array


#: Largest relative difference (max |a - b| / max |b| over the loss and each gradient) that
#: passes: float32 with the segments combined in another order than one device's chunk loop.
CONTEXT_TOLERANCE = 1e-4

#: Tokens per sequence (quick, full): a multiple of 8 x 64 so every cp splits it into chunks.
CONTEXT_SEQ_LEN = (1024, 16384)


def context_devices() -> list[Any]:
    """The GPUs this check can split a sequence over (none off GPU)."""
    return list(jax.devices()) if jax.default_backend() == "gpu" else []


def context_sizes(num_devices: int) -> tuple[int, ...]:
    """cp sizes to check: 2 and the largest power of two of the devices (at most 8); none with
    fewer than 2 devices."""
    if num_devices < 2:
        return ()
    top = min(8, 1 << (num_devices.bit_length() - 1))
    return (2,) if top == 2 else (2, top)


def context_config(
    seq_len: int, embedding_dim: int = 256, num_blocks: int = 2
) -> xLSTMLMModelConfig:
    """The `tiny_xlstm_slstm` preset's float32, unscanned "mlstm" blocks (causal conv and cell:
    both cp paths; unrolled, so each block's collectives stand in the compiled HLO) without its
    sLSTM block (cp refuses sLSTM), at ``num_blocks`` blocks of width ``embedding_dim``, 4 heads,
    the chunkwise form (chunk 64) and a 256-token vocabulary (also
    `benchmarks/context_parallel.py`'s model)."""
    base = tiny_xlstm_slstm()
    block = base.mlstm_block
    assert block is not None  # the preset has mLSTM blocks
    layer = block.mlstm
    chunkwise = mLSTMBackendNameAndKwargs(name="chunkwise", kwargs={"chunk_size": 64})
    layer = dataclasses.replace(
        layer, mlstm_cell=dataclasses.replace(layer.mlstm_cell, backend=chunkwise)
    )
    return dataclasses.replace(
        base,
        vocab_size=256,
        embedding_dim=embedding_dim,
        num_blocks=num_blocks,
        context_length=seq_len,
        slstm_at=[],
        slstm_block=None,
        mlstm_block=dataclasses.replace(block, mlstm=layer),
    )


def _relative_error(got: Any, want: Any) -> float:
    worst = 0.0
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        scale = max(float(np.max(np.abs(b))), 1e-30)
        worst = max(worst, float(np.max(np.abs(a - b))) / scale)
    return worst


def _train_step_on(devices: Sequence[Any], cp: int, config: xLSTMLMModelConfig) -> Any:
    """The trainer's step (`make_train_step_for`, gradients returned; a zero-rate SGD, so the
    weights stay) on a ``cp=N`` mesh over ``devices[:cp]`` (cp=1: one device), as
    ``run(inputs) -> (loss, grads)`` holding its model and optimizer state (the step donates
    them), and the step itself."""
    optimizer = optax.sgd(0.0)
    model = xLSTMLMModel(config, key=jr.key(0))
    spec = f"dp=1,cp={cp}" if cp > 1 else "dp=1"
    layout = mesh_layout(spec, model, optimizer, devices=list(devices[:cp]))
    step = make_train_step_for(layout, optimizer, return_grads=True)
    state = [model, init_sharded_opt_state(optimizer, model, layout)]

    def run(inputs: Any) -> tuple[jax.Array, Any]:
        model, opt_state, loss, _, grads = step(inputs, *state)
        state[:] = [model, opt_state]
        return loss, grads

    return run, step, state


def check_context_parallel(
    devices: Sequence[Any], cp: int, seq_len: int, repeats: int = 3
) -> dict[str, Any]:
    """One row: the train step's loss and gradients on a ``cp``-device mesh over
    ``devices[:cp]`` against one device (``devices[0]``), both timed; ``status`` pass or fail
    against `CONTEXT_TOLERANCE`."""
    config = context_config(seq_len)
    tokens = random_array("integers", 7, (1, 1, seq_len + 1), jnp.int32, 0, config.vocab_size)
    inputs = (tokens, jr.key(0))  # (A, B, S+1): one micro-batch of one sequence
    one, one_step, one_state = _train_step_on(devices, 1, config)
    split, split_step, split_state = _train_step_on(devices, cp, config)
    temp_one = memory_analysis(one_step.lower(inputs, *one_state).compile())
    temp = memory_analysis(split_step.lower(inputs, *split_state).compile())
    want, got = one(inputs), split(inputs)
    error = _relative_error(got, want)
    one_s = median_seconds(lambda: jax.block_until_ready(one(inputs)), repeats, warmup=1)
    cp_s = median_seconds(lambda: jax.block_until_ready(split(inputs)), repeats, warmup=1)
    return {
        "status": "pass" if error <= CONTEXT_TOLERANCE else "fail",
        "rel_err": error,
        "tol": CONTEXT_TOLERANCE,
        "loss": float(got[0]),
        "ms_one_device": 1e3 * one_s,
        "ms_cp": 1e3 * cp_s,
        "temp_mib_one_device": None if temp_one is None else temp_one.temp_size_in_bytes / 2**20,
        "temp_mib_per_device_cp": None if temp is None else temp.temp_size_in_bytes / 2**20,
    }


def run_context(part: Part, quick: bool, devices: Sequence[Any] | None = None) -> None:
    """The part: a ``skipped`` row with fewer than 2 GPUs, else `check_context_parallel` per cp
    of `context_sizes`."""
    devices = context_devices() if devices is None else list(devices)
    sizes = context_sizes(len(devices))
    if not sizes:
        part.add(
            {
                "case": "context parallel",
                "status": "skipped",
                "note": f"needs 2 or more GPUs; {len(devices)} found (platform "
                f"{jax.default_backend()})",
            }
        )
        part.finish()
        return
    seq_len = CONTEXT_SEQ_LEN[0 if quick else 1]
    started = time.perf_counter()
    for cp in sizes:
        part.case(
            f"context parallel cp={cp} S={seq_len}",
            lambda cp=cp: check_context_parallel(devices, cp, seq_len),
            cp=cp,
            seq_len=seq_len,
        )
    part.finish(note=f"{len(sizes)} mesh(es) in {time.perf_counter() - started:.0f} s")
