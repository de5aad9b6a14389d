"""Bytes of a model and its optimizer state on a mesh, per device, per host, and in a checkpoint
(`memory_report`, what ``xlstm-eqx info --mesh`` prints): from ``eqx.filter_eval_shape``
skeletons and the partition rules, so a 7B config costs nothing. `count_all_gathers` lists the
all-gathers of a compiled HLO text.
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
import numpy as np
import optax
from jax.sharding import PartitionSpec as P
from jaxtyping import PyTree

from ..core.parallel_config import ParallelConfig
from ..models import ModelConfig, family_of
from .mesh import MESH_AXES, axis_sizes
from .rules import is_array_like, opt_state_specs, param_partition_specs


# memory report


@dataclasses.dataclass(frozen=True)
class MemoryReport:
    """Bytes of parameters and optimizer state, in total and on the busiest device; with
    ``hosts``, also on the busiest host (its devices together) and what an orbax checkpoint of
    both costs each host: the bytes it writes (its own shards; a shard held by several hosts is
    split between them, as orbax does) and the bytes it reads back on restore (the shards its
    devices hold). Hosts hold contiguous blocks of devices, numbered row-major over the mesh."""

    mesh: dict[str, int]
    num_params: int
    param_bytes: int
    param_bytes_per_device: int
    opt_bytes: int
    opt_bytes_per_device: int
    hosts: int = 1
    param_bytes_per_host: int = 0
    opt_bytes_per_host: int = 0
    checkpoint_bytes_written_per_host: int = 0
    checkpoint_bytes_read_per_host: int = 0

    @property
    def total_bytes_per_device(self) -> int:
        return self.param_bytes_per_device + self.opt_bytes_per_device

    @property
    def checkpoint_bytes(self) -> int:
        return self.param_bytes + self.opt_bytes

    def __str__(self) -> str:
        def gib(n: int) -> str:
            return f"{n / 2**30:,.2f} GiB"

        mesh = ", ".join(f"{k}={v}" for k, v in self.mesh.items())
        devices = math.prod(self.mesh.values())
        lines = [
            f"mesh {mesh}: {self.num_params:,} parameters",
            f"  parameters: {gib(self.param_bytes)} total, {gib(self.param_bytes_per_device)} per "
            f"device, {gib(self.param_bytes_per_host)} per host",
            f"  optimizer:  {gib(self.opt_bytes)} total, {gib(self.opt_bytes_per_device)} per "
            f"device, {gib(self.opt_bytes_per_host)} per host",
            f"  per device: {gib(self.total_bytes_per_device)}",
            f"  per host ({self.hosts} host(s) x {devices // self.hosts} devices): "
            f"{gib(self.param_bytes_per_host + self.opt_bytes_per_host)}",
            f"  checkpoint: {gib(self.checkpoint_bytes)}; each host writes "
            f"{gib(self.checkpoint_bytes_written_per_host)} and reads back "
            f"{gib(self.checkpoint_bytes_read_per_host)}",
        ]
        return "\n".join(lines)


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


def _host_bytes(
    x: Any, spec: P | None, sizes: Mapping[str, int], hosts: int
) -> tuple[list[float], list[int]]:
    """``(written, held)`` bytes of one array for each host: ``held`` counts each distinct shard a
    host's devices hold once; ``written`` splits a shard held by several hosts between them."""
    names = list(sizes)
    dims = [sizes[a] for a in names]
    n_dev = math.prod(dims)
    per_host = n_dev // hosts
    split_axes = []
    for entry in spec or ():
        for a in entry if isinstance(entry, tuple) else (entry,):
            if a is not None and sizes.get(a, 1) > 1:
                split_axes.append(names.index(a))
    shard = _local_bytes(x, spec, sizes)
    holders: dict[tuple[int, ...], set[int]] = {}
    for i in range(n_dev):
        coords = np.unravel_index(i, dims)
        holders.setdefault(tuple(int(coords[a]) for a in split_axes), set()).add(i // per_host)
    written = [0.0] * hosts
    held = [0] * hosts
    for owners in holders.values():
        for h in owners:
            written[h] += shard / len(owners)
            held[h] += shard
    return written, held


def _tree_host_bytes(
    tree: PyTree, specs: PyTree, sizes: Mapping[str, int], hosts: int
) -> tuple[int, int]:
    """(max over hosts of bytes written, max over hosts of bytes read back) for a checkpoint."""
    leaves = jax.tree.leaves(tree)
    spec_leaves = jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, P))
    written = np.zeros(hosts)
    held = np.zeros(hosts)
    for x, s in zip(leaves, spec_leaves, strict=True):
        w, h = _host_bytes(x, s, sizes, hosts)
        written += w
        held += h
    return int(round(written.max())), int(held.max())


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
    hosts: int = 1,
) -> MemoryReport:
    """Per-device parameter and optimizer-state bytes of ``config``'s model on a mesh, from
    ``eqx.filter_eval_shape`` skeletons (nothing is allocated, so the 7B config is instant).

    ``parallel_config`` defaults to ``config.parallel``; a ``-1`` axis size is filled from
    ``num_devices`` (default: size 1 — a mesh of just the fixed axes; no device is needed). ``model_cls`` defaults to
    the model class of the config's family; ``optimizer`` to AdamW (two float32 moments per
    parameter plus a step count). ``hosts`` (processes, each with an equal share of the devices)
    adds the per-host numbers.
    """
    if model_cls is None:
        model_cls = family_of(config).build
    pc = parallel_config if parallel_config is not None else getattr(config, "parallel", None)
    pc = ParallelConfig() if pc is None else pc
    if num_devices is None:  # a -1 axis gets size 1 (the data axis never shards parameters)
        num_devices = math.prod(
            s for s in (getattr(pc, f"{prefix}_axis_size") for prefix, _ in MESH_AXES) if s != -1
        )
    sizes = axis_sizes(pc, num_devices)
    n_dev = math.prod(sizes.values())
    if hosts < 1 or n_dev % hosts != 0:
        raise ValueError(f"hosts={hosts} must be >= 1 and divide the {n_dev} devices of the mesh")
    skeleton = eqx.filter_eval_shape(model_cls, config, key=jr.key(0))
    specs = param_partition_specs(skeleton, pc, num_devices=n_dev)
    arrays = eqx.filter(skeleton, is_array_like)
    arr_specs = eqx.filter(specs, lambda s: isinstance(s, P), is_leaf=lambda s: isinstance(s, P))
    p_total, p_local = _tree_bytes(arrays, arr_specs, sizes)
    params = eqx.filter(
        skeleton, lambda x: is_array_like(x) and jnp.issubdtype(x.dtype, jnp.inexact)
    )
    opt = optax.adamw(1e-3) if optimizer is None else optimizer
    with jax.numpy_dtype_promotion("standard"):
        opt_skel = jax.eval_shape(opt.init, params)
    ospecs = opt_state_specs(opt_skel, params, specs)
    o_total, o_local = _tree_bytes(opt_skel, ospecs, sizes)
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(arrays))
    pw, pr = _tree_host_bytes(arrays, arr_specs, sizes, hosts)
    ow, orr = _tree_host_bytes(opt_skel, ospecs, sizes, hosts)
    per_host = n_dev // hosts
    return MemoryReport(
        mesh=dict(sizes),
        num_params=int(n_params),
        param_bytes=p_total,
        param_bytes_per_device=p_local,
        opt_bytes=o_total,
        opt_bytes_per_device=o_local,
        hosts=hosts,
        param_bytes_per_host=p_local * per_host,
        opt_bytes_per_host=o_local * per_host,
        checkpoint_bytes_written_per_host=pw + ow,
        checkpoint_bytes_read_per_host=pr + orr,
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
