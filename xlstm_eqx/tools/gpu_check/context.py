"""The GPU check's `context` part: context parallelism across the machine's GPUs.

With two or more GPUs, for cp = 2 and cp = the largest power of two of GPUs (at most 8): the loss
and gradients of a small "mlstm" xLSTM on one sequence split over a ``cp=N`` mesh
(`parallel.context_parallel`) against the same model on one GPU (float32; pass within
`CONTEXT_TOLERANCE` relative), the time of one forward+backward each way and XLA's planned
temporaries per device. With fewer GPUs the part records one ``skipped`` row saying so.
"""

import time
from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from ...cell.backend_config import mLSTMBackendNameAndKwargs
from ...core.parallel_config import ParallelConfig
from ...core.timing import median_seconds
from ...parallel.context import context_parallel
from ...parallel.mesh import make_mesh
from ...training.loss import next_token_loss
from ...xlstm.config import xLSTMLMModelConfig
from ...xlstm.mlstm_config import mLSTMBlockConfig, mLSTMCellConfig, mLSTMLayerConfig
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
    """``num_blocks`` unrolled "mlstm" blocks (causal conv and cell: both cp paths; unrolled, so
    each block's collectives stand in the compiled HLO), 4 heads, the chunkwise form (chunk 64), float32, a
    256-token vocabulary (also `benchmarks/context_parallel.py`'s model)."""
    return xLSTMLMModelConfig(
        vocab_size=256,
        embedding_dim=embedding_dim,
        num_blocks=num_blocks,
        context_length=seq_len,
        dtype="float32",
        lm_head_dtype="float32",
        scan_blocks=False,
        mlstm_block=mLSTMBlockConfig(
            mlstm=mLSTMLayerConfig(
                layer_type="mlstm",
                num_heads=4,
                mlstm_cell=mLSTMCellConfig(
                    backend=mLSTMBackendNameAndKwargs(name="chunkwise", kwargs={"chunk_size": 64})
                ),
            )
        ),
    )


def _relative_error(got: Any, want: Any) -> float:
    worst = 0.0
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        scale = max(float(np.max(np.abs(b))), 1e-30)
        worst = max(worst, float(np.max(np.abs(a - b))) / scale)
    return worst


def check_context_parallel(
    devices: Sequence[Any], cp: int, seq_len: int, repeats: int = 3
) -> dict[str, Any]:
    """One row: loss and gradients on a ``cp``-device mesh over ``devices[:cp]`` against one
    device (``devices[0]``), both timed; ``status`` pass or fail against `CONTEXT_TOLERANCE`."""
    config = context_config(seq_len)
    model = xLSTMLMModel(config, key=jr.key(0))
    tokens = random_array("integers", 7, (1, seq_len + 1), jnp.int32, 0, config.vocab_size)
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def loss(p: Any, t: jax.Array, wrap: Any) -> jax.Array:
        return next_token_loss(wrap(eqx.combine(p, static)), t)

    one = jax.jit(jax.value_and_grad(lambda p, t: loss(p, t, lambda m: m)))
    on_one = jax.device_put((params, tokens), devices[0])
    pc = ParallelConfig(data_axis_size=1, context_axis_size=cp)
    mesh = make_mesh(pc, list(devices[:cp]))
    split = jax.jit(
        jax.value_and_grad(lambda p, t: loss(p, t, lambda m: context_parallel(m, mesh, pc)))
    )
    on_mesh = jax.device_put((params, tokens), NamedSharding(mesh, P()))
    want, got = one(*on_one), split(*on_mesh)
    error = _relative_error(got, want)
    one_s = median_seconds(lambda: jax.block_until_ready(one(*on_one)), repeats, warmup=1)
    cp_s = median_seconds(lambda: jax.block_until_ready(split(*on_mesh)), repeats, warmup=1)
    temp = split.lower(*on_mesh).compile().memory_analysis()
    temp_one = one.lower(*on_one).compile().memory_analysis()
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
