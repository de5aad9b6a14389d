"""Memory without allocation: `memory_report` gives total and per-device parameter and
optimizer-state bytes of a config's model on a mesh from shape skeletons (what
``xlstm-eqx info --mesh`` prints); `count_all_gathers` lists the all-gathers of a compiled HLO text.
"""

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import optax
from jax.sharding import PartitionSpec as P
from jaxtyping import PyTree

from ..core.parallel_config import ParallelConfig
from ..models import ModelConfig, family_of
from .mesh import _AXES, axis_sizes
from .rules import _is_array_like, opt_state_specs, param_partition_specs


# memory report


@dataclasses.dataclass(frozen=True)
class MemoryReport:
    """Bytes of parameters and optimizer state, in total and on the busiest device."""

    mesh: dict[str, int]
    num_params: int
    param_bytes: int
    param_bytes_per_device: int
    opt_bytes: int
    opt_bytes_per_device: int

    @property
    def total_bytes_per_device(self) -> int:
        return self.param_bytes_per_device + self.opt_bytes_per_device

    def __str__(self) -> str:
        def gib(n: int) -> str:
            return f"{n / 2**30:,.2f} GiB"

        mesh = ", ".join(f"{k}={v}" for k, v in self.mesh.items())
        return (
            f"mesh {mesh}: {self.num_params:,} parameters\n"
            f"  parameters: {gib(self.param_bytes)} total, {gib(self.param_bytes_per_device)} per device\n"
            f"  optimizer:  {gib(self.opt_bytes)} total, {gib(self.opt_bytes_per_device)} per device\n"
            f"  per device: {gib(self.total_bytes_per_device)}"
        )


def _local_bytes(x: Any, spec: P | None, sizes: Mapping[str, int]) -> int:
    n = math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
    if spec is None:
        return n
    for d, entry in enumerate(spec):
        parts = entry if isinstance(entry, tuple) else (entry,)
        factor = math.prod(sizes[a] for a in parts if a is not None)
        if factor > 1:
            n = n // x.shape[d] * math.ceil(x.shape[d] / factor)
    return n


def _tree_bytes(tree: PyTree, specs: PyTree, sizes: Mapping[str, int]) -> tuple[int, int]:
    leaves = jax.tree.leaves(tree)
    spec_leaves = jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, P))
    total = sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in leaves)
    local = sum(_local_bytes(x, s, sizes) for x, s in zip(leaves, spec_leaves, strict=True))
    return int(total), int(local)


def memory_report(
    config: ModelConfig,
    parallel_config: ParallelConfig | None = None,
    *,
    num_devices: int | None = None,
    model_cls: Callable[..., Any] | None = None,
    optimizer: optax.GradientTransformation | None = None,
) -> MemoryReport:
    """Per-device parameter and optimizer-state bytes of ``config``'s model on a mesh, from
    ``eqx.filter_eval_shape`` skeletons (nothing is allocated, so the 7B config is instant).

    ``parallel_config`` defaults to ``config.parallel``; a ``-1`` axis size is filled from
    ``num_devices`` (default: size 1 — a mesh of just the fixed axes; no device is needed). ``model_cls`` defaults to
    the model class of the config's family; ``optimizer`` to AdamW (two float32 moments per
    parameter plus a step count).
    """
    if model_cls is None:
        model_cls = family_of(config).build
    pc = parallel_config if parallel_config is not None else getattr(config, "parallel", None)
    pc = ParallelConfig() if pc is None else pc
    if num_devices is None:  # a -1 axis gets size 1 (the data axis never shards parameters)
        num_devices = math.prod(
            s for s in (getattr(pc, f"{prefix}_axis_size") for prefix, _ in _AXES) if s != -1
        )
    sizes = axis_sizes(pc, num_devices)
    n_dev = math.prod(sizes.values())
    skeleton = eqx.filter_eval_shape(model_cls, config, key=jr.key(0))
    specs = param_partition_specs(skeleton, pc, num_devices=n_dev)
    arrays = eqx.filter(skeleton, _is_array_like)
    arr_specs = eqx.filter(specs, lambda s: isinstance(s, P), is_leaf=lambda s: isinstance(s, P))
    p_total, p_local = _tree_bytes(arrays, arr_specs, sizes)
    params = eqx.filter(
        skeleton, lambda x: _is_array_like(x) and jnp.issubdtype(x.dtype, jnp.inexact)
    )
    opt = optax.adamw(1e-3) if optimizer is None else optimizer
    with jax.numpy_dtype_promotion("standard"):
        opt_skel = jax.eval_shape(opt.init, params)
    ospecs = opt_state_specs(opt_skel, params, specs)
    o_total, o_local = _tree_bytes(opt_skel, ospecs, sizes)
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(arrays))
    return MemoryReport(
        mesh=dict(sizes),
        num_params=int(n_params),
        param_bytes=p_total,
        param_bytes_per_device=p_local,
        opt_bytes=o_total,
        opt_bytes_per_device=o_local,
    )


# HLO inspection


def count_all_gathers(hlo_text: str) -> list[tuple[str, tuple[int, ...]]]:
    """``(dtype, result shape)`` of every all-gather in an HLO module text (e.g.
    ``jit(f).lower(...).compile().as_text()``), to check which weights are gathered whole."""

    out = []
    pattern = re.compile(r"=\s*\(?([a-z0-9]+)\[([0-9,]*)\][^=]*?\ball-gather(?:-start)?\(")
    for line in hlo_text.splitlines():
        m = pattern.search(line)
        if m:
            dims = tuple(int(d) for d in m.group(2).split(",") if d)
            out.append((m.group(1), dims))
    return out
