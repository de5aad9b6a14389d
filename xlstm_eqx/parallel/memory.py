"""Bytes of a model and its optimizer state on a mesh, per device, per host, and in a checkpoint
(`memory_report`, what ``xlstm-eqx info --mesh`` prints): from ``eqx.filter_eval_shape``
skeletons and the partition rules, so a 7B config costs nothing. `count_all_gathers` lists the
all-gathers of a compiled HLO text.
"""

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from typing import Any, cast

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
from jax.sharding import PartitionSpec as P
from jaxtyping import PyTree

from ..core.config import Config
from ..core.parallel_config import ParallelConfig
from ..models import ModelConfig, family_of
from .mesh import MESH_AXES, axis_sizes
from .rules import is_array_like, opt_state_specs, param_partition_specs


# memory report


def gib(n: int | float) -> str:
    """``n`` bytes as GiB with two decimals."""
    return f"{n / 2**30:,.2f} GiB"


def size_text(n: int | float) -> str:
    """``n`` bytes in GiB, or in MiB below 1 GiB (small models)."""
    return gib(n) if n >= 2**30 else f"{n / 2**20:,.2f} MiB"


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


# activation memory


def _nbytes(tree: PyTree) -> int:
    return int(sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def _is_float_leaf(x: Any) -> bool:
    return is_array_like(x) and jnp.issubdtype(x.dtype, jnp.inexact)


def residual_bytes(
    config: ModelConfig,
    batch: int,
    seq_len: int,
    *,
    model_cls: Callable[..., Any] | None = None,
) -> int:
    """Bytes of every array the backward pass of the next-token loss of ``batch`` sequences of
    ``seq_len`` tokens keeps from its forward pass (``jax.vjp``'s residuals, traced with
    ``jax.eval_shape``: nothing is allocated or compiled, a 7B model at 128k tokens takes a
    second). The modules named in ``config.parallel.remat`` keep only their inputs, as in
    training. The parameters are among the residuals (a matrix product keeps its weight)."""
    build = family_of(config).build if model_cls is None else model_cls
    skeleton = eqx.filter_eval_shape(build, config, key=jr.key(0))
    params, static = eqx.partition(skeleton, _is_float_leaf)

    def pullback(p: PyTree, tokens: jax.Array) -> Any:
        def loss(q: PyTree) -> jax.Array:
            logits = eqx.combine(q, static)(tokens[:, :-1])
            labels = tokens[:, 1:]
            return optax.softmax_cross_entropy_with_integer_labels(
                logits.astype(jnp.float32), labels
            ).mean()

        return jax.vjp(loss, p)[1]

    tokens = jax.ShapeDtypeStruct((batch, seq_len + 1), jnp.int32)
    return _nbytes(jax.eval_shape(pullback, params, tokens))


@dataclasses.dataclass(frozen=True)
class ActivationModel:
    """Activation bytes of one device as a function of the tokens it holds, ``t``:
    ``saved(t) = linear * t + quadratic * t**2`` (the backward's residuals less the parameters;
    quadratic only for attention that keeps its score matrix) plus ``recompute(t)``, one
    rematerialised block's own residuals, rebuilt during the backward (0 without remat)."""

    batch: int
    linear: float
    quadratic: float
    recompute_linear: float
    recompute_quadratic: float
    remat: tuple[str, ...]

    def saved(self, tokens: int) -> int:
        return int(round(self.linear * tokens + self.quadratic * tokens**2))

    def recompute(self, tokens: int) -> int:
        return int(round(self.recompute_linear * tokens + self.recompute_quadratic * tokens**2))

    def total(self, tokens: int) -> int:
        return self.saved(tokens) + self.recompute(tokens)


def _fit_quadratic(r1: int, r2: int, r3: int, unit: int) -> tuple[float, float]:
    """(b, c) of ``r(S) = a + b S + c S^2`` through ``r(unit), r(2 unit), r(3 unit)``."""
    d1, d2 = r2 - r1, r3 - r2
    c = (d2 - d1) / (2 * unit**2)
    b = d1 / unit - 3 * c * unit
    return b, c


def activation_model(
    config: ModelConfig,
    *,
    batch: int = 1,
    unit: int = 1024,
    model_cls: Callable[..., Any] | None = None,
) -> ActivationModel:
    """Fits `ActivationModel` from `residual_bytes` at ``unit``, ``2 unit`` and ``3 unit`` tokens
    (a multiple of every chunk size, so the fit is exact for the chunkwise forms and the causal
    attention blocks), with the config's remat and without it (the recompute term: the difference
    per block, i.e. one block's residuals)."""

    def fit(cfg: ModelConfig) -> tuple[float, float]:
        r = [residual_bytes(cfg, batch, k * unit, model_cls=model_cls) for k in (1, 2, 3)]
        return _fit_quadratic(r[0], r[1], r[2], unit)

    pc = getattr(config, "parallel", None)
    remat = tuple(pc.remat) if isinstance(pc, ParallelConfig) else ()
    b, c = fit(config)
    rb, rc = 0.0, 0.0
    if remat and isinstance(pc, ParallelConfig) and isinstance(config, Config):
        plain = dataclasses.replace(pc, remat=[])
        b0, c0 = fit(cast(ModelConfig, dataclasses.replace(config, parallel=plain)))
        blocks = int(getattr(config, "num_blocks", 1))
        rb, rc = max(b0 - b, 0.0) / blocks, max(c0 - c, 0.0) / blocks
    return ActivationModel(batch, b, c, rb, rc, remat)


def decode_state_bytes(config: ModelConfig, batch: int = 1) -> int:
    """Bytes of an xLSTM model's recurrent state for ``batch`` sequences (every block's mLSTM
    ``C``/``n``/``m``, conv windows, sLSTM states): what a context-parallel segment hands on."""
    build = family_of(config).build
    skeleton = eqx.filter_eval_shape(build, config, key=jr.key(0))
    init_state = getattr(skeleton, "init_state", None)
    if init_state is None or getattr(skeleton, "has_kv_cache", False):
        return 0  # a KV cache: nothing recurrent to hand on
    return _nbytes(jax.eval_shape(lambda: init_state(batch)))


@dataclasses.dataclass(frozen=True)
class ActivationReport:
    """Activation bytes of one device in a train step on ``seq_len``-token sequences split over
    ``cp`` devices (``batch`` sequences per device, each holding ``ceil(seq_len / cp)`` tokens of
    them): what the backward keeps, one rematerialised block rebuilt, and the context-parallel
    state exchange (the all-gathered segment states and the states entering each segment, both
    kept for the backward: ``2 * cp`` recurrent states). Estimates: XLA's fusion keeps less."""

    seq_len: int
    cp: int
    batch: int
    tokens_per_device: int
    saved_bytes: int
    recompute_bytes: int
    exchange_bytes: int
    remat: tuple[str, ...]

    @property
    def total_bytes(self) -> int:
        return self.saved_bytes + self.recompute_bytes + self.exchange_bytes

    def __str__(self) -> str:
        remat = ", ".join(self.remat) if self.remat else "none"
        per_token = self.saved_bytes / max(self.batch * self.tokens_per_device, 1)
        return "\n".join(
            [
                f"activations at S={self.seq_len:,} (cp={self.cp}: {self.tokens_per_device:,} "
                f"tokens x {self.batch} sequence(s) per device; remat: {remat}):",
                f"  kept for the backward: {size_text(self.saved_bytes)} "
                f"({per_token / 1024:,.1f} KiB per token)",
                f"  one block rebuilt in the backward: {size_text(self.recompute_bytes)}",
                f"  cp state exchange: {size_text(self.exchange_bytes)}",
                f"  activations per device: {size_text(self.total_bytes)}",
            ]
        )


def exchange_bytes(state_bytes: int, cp: int) -> int:
    """Bytes a device keeps for the cp state exchange: ``2 * cp`` recurrent states (gathered and
    entering) of ``state_bytes`` each; none without cp."""
    return 0 if cp <= 1 else 2 * cp * state_bytes


def activation_report(
    model: ActivationModel, seq_len: int, cp: int = 1, *, state_bytes: int = 0
) -> ActivationReport:
    """`ActivationReport` of ``seq_len`` tokens over ``cp`` devices from a fitted `ActivationModel`
    (``state_bytes``: the recurrent state of ``model.batch`` sequences, `decode_state_bytes`)."""
    if seq_len < 1 or cp < 1:
        raise ValueError(f"seq_len ({seq_len}) and cp ({cp}) must be positive")
    tokens = -(-seq_len // cp)
    return ActivationReport(
        seq_len=seq_len,
        cp=cp,
        batch=model.batch,
        tokens_per_device=tokens,
        saved_bytes=model.saved(tokens),
        recompute_bytes=model.recompute(tokens),
        exchange_bytes=exchange_bytes(state_bytes, cp),
        remat=model.remat,
    )


def largest_seq_len(
    model: ActivationModel,
    cp: int,
    budget_bytes: int,
    *,
    fixed_bytes: int = 0,
    state_bytes: int = 0,
) -> int:
    """The largest S (a multiple of ``cp``) whose per-device bytes, ``fixed_bytes`` (parameters,
    gradients, optimizer state) plus `activation_report`'s total, stay within ``budget_bytes``;
    0 if not even ``cp`` tokens fit."""
    room = budget_bytes - fixed_bytes - exchange_bytes(state_bytes, cp)
    if model.total(1) > room:
        return 0
    lo, hi = 1, 2
    while model.total(hi) <= room:
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # total(lo) fits, total(hi) does not
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if model.total(mid) <= room else (lo, mid)
    return lo * cp


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
