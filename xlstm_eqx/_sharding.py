"""Sharding: data, FSDP and tensor parallelism through ``jax.sharding`` on Equinox PyTrees.

The reference runs its models inside ``shard_map`` over a 4-axis mesh ``(dp, fsdp, pp, tp)`` and writes
its collectives by hand. Here the same layout (ARCHITECTURE §8) is expressed as ``PartitionSpec``s on the
parameters of an Equinox model; the batch is split over ``(dp, fsdp)``; XLA's SPMD partitioner (GSPMD)
inserts the collectives. Nothing in the models is mesh-aware, so one model class serves one device and a
thousand.

Pieces, in the order a run uses them:

- ``make_mesh(parallel_config)``: the ``(dp, fsdp, pp, tp)`` mesh (a ``-1`` size takes the remaining
  devices); ``parse_mesh_spec("dp=2,fsdp=2,tp=2")`` makes the ``ParallelConfig`` from a CLI string.
- ``param_partition_specs(model, parallel_config)``: a ``PartitionSpec`` per array leaf, by rule on the
  module path (``MODULE_NAME_MAP`` maps the reference's registered module names onto this package's
  classes); ``shard_model`` / ``shard_opt_state`` place a model / its optax state on a mesh.
- ``init_sharded(model_cls, config, key=..., mesh=...)``: a model born sharded (shapes from
  ``eqx.filter_eval_shape``, arrays from a ``jax.jit`` of the init with ``out_shardings``).
- ``make_sharded_train_step`` / ``shard_train_state``: the trainer's step (same signature, same math as
  ``_train.make_train_step``) with the batch split over ``(dp, fsdp)``, FSDP weights gathered at use,
  and the parameter and optimizer layouts pinned with ``eqx.filter_shard`` on the way in and out.
- ``save_sharded_checkpoint`` / ``restore_sharded_checkpoint``: checkpoints are stored gathered (one
  global array per leaf, the ``_checkpoint`` format), so a run saved on one mesh restores onto any other.
- ``initialize_distributed()``: the multi-controller runtime (``jax.distributed.initialize``) from
  explicit arguments, ``JAX_COORDINATOR_ADDRESS``/``JAX_NUM_PROCESSES``/``JAX_PROCESS_ID``, or SLURM.
- ``memory_report(config, parallel_config)``: per-device parameter and optimizer bytes from
  ``eqx.filter_eval_shape`` (no allocation).

FSDP follows the reference: weights are stored sharded and gathered *at use*, one layer at a time
(``gather_at_use``, applied inside the loss). Without that, XLA is free to all-gather the batch-sharded
activations instead of the weights, and does so for small models.

Activation checkpointing is the models' own: ``parallel.remat`` of the *model* config names the modules
that are rematerialised (xLSTM: ``xLSTMResBlock``, ``FFNResBlock``, and ``mLSTMBlock`` once the block
stack applies it; Llama: ``TransformerBlock``, ``AttnBlock``, ``FFNBlock``), each wrapped in
``eqx.filter_checkpoint``.

Tensor parallelism for the Llama baseline is not in the reference; the rules here give it the usual
Megatron layout (q/k/v and FFN up/gate column-parallel, attention out and FFN down row-parallel).
"""

import dataclasses
import functools
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
from jaxtyping import Array, Float, PRNGKeyArray, PyTree

from ._configs import ParallelConfig


__all__ = [
    "MODULE_NAME_MAP",
    "MemoryReport",
    "axis_sizes",
    "batch_sharding",
    "batch_spec",
    "count_all_gathers",
    "gather_at_use",
    "gather_to_host",
    "init_sharded",
    "initialize_distributed",
    "make_mesh",
    "make_sharded_train_step",
    "memory_report",
    "named_shardings",
    "opt_state_specs",
    "param_partition_specs",
    "parse_mesh_spec",
    "place_global",
    "restore_sharded_checkpoint",
    "save_sharded_checkpoint",
    "shard_model",
    "shard_opt_state",
    "shard_train_state",
]

# ----------------------------------------------------------------------------------------------
# the mesh

# (ParallelConfig prefix, default axis name) in mesh order.
_AXES: tuple[tuple[str, str], ...] = (
    ("data", "dp"),
    ("fsdp", "fsdp"),
    ("pipeline", "pp"),
    ("model", "tp"),
)
# Names accepted for the axes in a mesh string, besides the config's own axis names.
_AXIS_ALIASES: dict[str, str] = {
    "dp": "data",
    "data": "data",
    "fsdp": "fsdp",
    "pp": "pipeline",
    "pipe": "pipeline",
    "pipeline": "pipeline",
    "tp": "model",
    "mp": "model",
    "model": "model",
}


def _axis_names(pc: ParallelConfig) -> tuple[str, str, str, str]:
    return (pc.data_axis_name, pc.fsdp_axis_name, pc.pipeline_axis_name, pc.model_axis_name)


def axis_sizes(parallel_config: ParallelConfig, num_devices: int | None = None) -> dict[str, int]:
    """``{axis name: size}`` in mesh order ``(dp, fsdp, pp, tp)``, with a ``-1`` size filled so that
    the sizes multiply to ``num_devices`` (default: every device, ``jax.device_count()``).

    Raises a ``ValueError`` naming the sizes when they cannot give ``num_devices``."""
    pc = parallel_config
    sizes = [getattr(pc, f"{prefix}_axis_size") for prefix, _ in _AXES]
    names = _axis_names(pc)
    shown = ", ".join(f"{n}={s}" for n, s in zip(names, sizes, strict=True))
    if num_devices is None:
        if -1 not in sizes:
            return dict(zip(names, sizes, strict=True))
        num_devices = jax.device_count()
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known != 0:
            raise ValueError(
                f"mesh axis sizes {shown}: the fixed sizes multiply to {known}, which does not "
                f"divide the device count {num_devices}, so the -1 axis cannot be inferred"
            )
        sizes = [num_devices // known if s == -1 else s for s in sizes]
    elif known != num_devices:
        raise ValueError(
            f"mesh axis sizes {shown} multiply to {known}, but there are {num_devices} devices; "
            "make them multiply to the device count or set one axis to -1"
        )
    return dict(zip(names, sizes, strict=True))


def make_mesh(parallel_config: ParallelConfig, devices: Sequence[Any] | None = None) -> Mesh:
    """The 4-axis mesh ``(dp, fsdp, pp, tp)`` (axis names from the config) over ``devices``
    (default: all devices, laid out by ``jax.experimental.mesh_utils`` for fast collectives).

    Axes are ``AxisType.Auto``: the SPMD partitioner propagates the parameter and batch shardings.
    """
    from jax.experimental import mesh_utils

    devs = list(jax.devices() if devices is None else devices)
    sizes = axis_sizes(parallel_config, len(devs))
    shape = tuple(sizes.values())
    if devices is None:
        grid = mesh_utils.create_device_mesh(shape, devs)
    else:
        grid = np.asarray(devs, dtype=object).reshape(shape)
    return Mesh(grid, tuple(sizes), axis_types=(AxisType.Auto,) * len(shape))


def parse_mesh_spec(spec: str, base: ParallelConfig | None = None) -> ParallelConfig:
    """A ``ParallelConfig`` from a mesh string such as ``"dp=2,fsdp=2,tp=2"``.

    Axis keys: the config's axis names or ``dp``/``data``, ``fsdp``, ``pp``/``pipeline``,
    ``tp``/``model``. Sizes are positive ints or ``-1`` (fill). Axes not named get size 1, except the
    data axis, which fills the remaining devices (``-1``) unless named or another axis is ``-1``.
    The other fields (FSDP modules, remat, …) come from ``base``.
    """
    base = ParallelConfig() if base is None else base
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(
            f"mesh spec must be a non-empty string like 'dp=2,fsdp=2,tp=2', got {spec!r}"
        )
    own = {name: prefix for (prefix, _), name in zip(_AXES, _axis_names(base), strict=True)}
    sizes: dict[str, int] = {}
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        key, sep, value = part.partition("=")
        key = key.strip()
        prefix = own.get(key) or _AXIS_ALIASES.get(key)
        if not sep or prefix is None:
            allowed = sorted(set(own) | set(_AXIS_ALIASES))
            raise ValueError(
                f"mesh spec {spec!r}: cannot read {part!r}; expected AXIS=SIZE with AXIS one of "
                f"{allowed}"
            )
        if prefix in sizes:
            raise ValueError(f"mesh spec {spec!r}: axis {key!r} is given twice")
        try:
            size = int(value)
        except ValueError:
            raise ValueError(
                f"mesh spec {spec!r}: size of axis {key!r} must be an int, got {value.strip()!r}"
            ) from None
        if size == 0 or size < -1:
            raise ValueError(
                f"mesh spec {spec!r}: size of axis {key!r} must be positive or -1, got {size}"
            )
        sizes[prefix] = size
    if not sizes:
        raise ValueError(f"mesh spec {spec!r} names no axis")
    fill_data = "data" not in sizes and -1 not in sizes.values()
    kwargs = {
        f"{prefix}_axis_size": sizes.get(prefix, -1 if (prefix == "data" and fill_data) else 1)
        for prefix, _ in _AXES
    }
    return dataclasses.replace(base, **kwargs)


# ----------------------------------------------------------------------------------------------
# which module is which: the reference's registered names on this package's classes

#: Reference module names (as used in ``fsdp_modules`` and ``remat``) → what they are here.
MODULE_NAME_MAP: dict[str, str] = {
    "Embed": "xLSTMLMModel.token_embedding / LlamaTransformer.token_embedding (Embedding)",
    "LMHead": "xLSTMLMModel.out_norm + .lm_head / LlamaTransformer.out_norm + .lm_head",
    "BlockStack": "xLSTMBlockStack / TransformerBlockStack",
    "mLSTMBlock": "xLSTMBlock (every block of an xLSTM stack)",
    "xLSTMResBlock": "xLSTMBlock.xlstm_res_block (ResidualBlock around the mLSTM/sLSTM layer)",
    "FFNResBlock": "xLSTMBlock.ffn_res_block (ResidualBlock around the FeedForward)",
    "mLSTMInnerLayer": "mLSTMInnerLayer",
    "mLSTMCell": "mLSTMCell",
    "TransformerBlock": "TransformerBlock",
    "AttnBlock": "SelfAttentionBlock",
    "FFNBlock": "FFNBlock",
}

_CLASS_ALIASES: dict[str, str] = {
    "xLSTMBlockStack": "BlockStack",
    "TransformerBlockStack": "BlockStack",
    "xLSTMBlock": "mLSTMBlock",
    "SelfAttentionBlock": "AttnBlock",
}
_MODELS = ("xLSTMLMModel", "LlamaTransformer")
_FIELD_ALIASES: dict[tuple[str, str], str] = {
    **{(m, "token_embedding"): "Embed" for m in _MODELS},
    **{(m, "out_norm"): "LMHead" for m in _MODELS},
    **{(m, "lm_head"): "LMHead" for m in _MODELS},
    ("xLSTMBlock", "xlstm_res_block"): "xLSTMResBlock",
    ("xLSTMBlock", "ffn_res_block"): "FFNResBlock",
}
# (module class, field) whose value, when it is a single module, carries stacked leading axes.
_STACKED: frozenset[tuple[str, str]] = frozenset(
    {
        ("xLSTMBlockStack", "blocks"),
        ("TransformerBlockStack", "blocks"),
        ("mLSTMInnerLayer", "qk_proj"),
    }
)

# Tensor-parallel rules: (parent module, field holding the layer) → which axis of the layer's
# kernel / bias is split over tp. Column-parallel layers split their output features, row-parallel
# ones their input features (their bias, added after the reduction, stays replicated).
_COLUMN_PARALLEL: frozenset[tuple[str, str]] = frozenset(
    {
        ("mLSTMLayer", "proj_up_mlstm"),
        ("mLSTMLayer", "proj_up_z"),
        ("mLSTMLayerV1", "dense_q"),
        ("mLSTMLayerV1", "dense_k"),
        ("mLSTMLayerV1", "dense_v"),
        ("mLSTMLayerV1", "dense_o"),
        ("mLSTMLayerV1", "igate"),
        ("mLSTMLayerV1", "fgate"),
        ("mLSTMCell", "igate"),
        ("mLSTMCell", "fgate"),
        ("FeedForward", "proj_up"),
        ("FeedForward", "proj_up_gate"),
        ("FFNBlock", "proj_up"),
        ("FFNBlock", "proj_up_gate"),
        ("SelfAttentionBlock", "dense_q"),
        ("SelfAttentionBlock", "dense_k"),
        ("SelfAttentionBlock", "dense_v"),
    }
)
_ROW_PARALLEL: frozenset[tuple[str, str]] = frozenset(
    {
        ("mLSTMLayer", "proj_down"),
        ("mLSTMLayerV1", "proj_down"),
        ("FeedForward", "proj_down"),
        ("FFNBlock", "proj_down"),
        ("SelfAttentionBlock", "dense_out"),
    }
)


@dataclasses.dataclass(frozen=True)
class _Leaf:
    """Where an array sits: the chain of (module class, field) from the root, the registered names
    of its enclosing modules, and how many stacked leading axes (scan layers, vmapped q/k) it has."""

    chain: tuple[tuple[str, str], ...]
    names: frozenset[str]
    lead: int


def _child(node: Any, entry: Any) -> Any:
    if isinstance(entry, jax.tree_util.GetAttrKey):
        return getattr(node, entry.name)
    if isinstance(entry, jax.tree_util.SequenceKey):
        return node[entry.idx]
    if isinstance(entry, jax.tree_util.DictKey):
        return node[entry.key]
    raise TypeError(f"unsupported PyTree key {entry!r}")


def _locate(root: Any, path: Sequence[Any]) -> _Leaf:
    chain: list[tuple[str, str]] = []
    names: set[str] = set()
    lead = 0
    node = root
    for entry in path:
        if isinstance(node, eqx.Module) and isinstance(entry, jax.tree_util.GetAttrKey):
            cls = type(node).__name__
            names.add(cls)
            if cls in _CLASS_ALIASES:
                names.add(_CLASS_ALIASES[cls])
            if chain and (chain[-1][0], chain[-1][1]) in _FIELD_ALIASES:
                names.add(_FIELD_ALIASES[chain[-1]])
            chain.append((cls, entry.name))
            child = _child(node, entry)
            if (cls, entry.name) in _STACKED and isinstance(child, eqx.Module):
                lead += 1
            node = child
        else:
            node = _child(node, entry)
    if chain and chain[-1] in _FIELD_ALIASES:
        names.add(_FIELD_ALIASES[chain[-1]])
    return _Leaf(tuple(chain), frozenset(names), lead)


def _tp_axis(leaf: _Leaf, ndim: int) -> int | str | None:
    """The per-layer axis of this parameter that tensor parallelism splits, ``"lmhead"`` for the
    LM head rule (largest divisible axis if large enough), or None (replicated)."""
    if not leaf.chain:
        return None
    owner, field = leaf.chain[-1]
    parent = leaf.chain[-2] if len(leaf.chain) >= 2 else ("", "")
    if "LMHead" in leaf.names:
        return "lmhead"
    if owner == "Embedding" and field == "embedding":
        return 1  # (V, D): features, so a lookup gives feature-sharded activations
    if owner in ("Dense", "DenseGeneral"):
        if parent in _COLUMN_PARALLEL:
            if field == "kernel":
                # Dense (in, out) → out; DenseGeneral (D, NH, hd) → NH.
                return 1
            return 0  # bias (out,) or (NH, hd)
        if parent in _ROW_PARALLEL and field == "kernel":
            return 0  # (in, out) → in; DenseGeneral (NH, hd, D) → NH
        return None
    if owner == "LinearHeadwiseExpand":
        return 0  # kernel (P, o, i) and bias (out,): contiguous head blocks
    if owner == "CausalConv1d":
        return 1 if field == "kernel" else 0  # kernel (K, C), bias (C,)
    if owner == "MultiHeadNorm":
        return 0  # (NH, DH)
    if owner == "mLSTMInnerLayer" and field == "learnable_skip":
        return 0
    if owner == "sLSTMCell":
        return 0  # recurrent kernel (NH, DH, 4, DH), bias (NH, 4, DH)
    if owner == "sLSTMLayer" and field == "group_norm_weight":
        return 0
    if owner in ("LayerNorm", "RMSNorm") and parent[0] == "ResidualBlock":
        return 0  # residual-stream norms of xLSTM blocks, sharded like the stream
    return None


def _largest_free_axis(shape: Sequence[int], spec: list[Any], size: int) -> int | None:
    """The reference's FSDP choice: the largest axis divisible by ``size`` and not yet sharded,
    ties to the later axis (reversed stable argsort)."""
    for d in reversed(np.argsort(np.asarray(shape), kind="stable").tolist()):
        if spec[d] is None and shape[d] % size == 0:
            return int(d)
    return None


def _known_names(model: Any) -> set[str]:
    """The reference names plus every module class name in ``model``."""
    found = set(MODULE_NAME_MAP)
    stack = [model]
    while stack:
        node = stack.pop()
        if isinstance(node, eqx.Module):
            found.add(type(node).__name__)
            stack.extend(vars(node).values())
        elif isinstance(node, (list, tuple)):
            stack.extend(node)
        elif isinstance(node, dict):
            stack.extend(node.values())
    return found


def _check_module_names(model: Any, pc: ParallelConfig) -> None:
    known = None
    for field in ("fsdp_modules", "remat"):
        for name in getattr(pc, field):
            if name not in MODULE_NAME_MAP:
                known = _known_names(model) if known is None else known
                if name not in known:
                    raise ValueError(
                        f"ParallelConfig.{field}: unknown module name {name!r}; known names are "
                        f"{sorted(known)}"
                    )


def _is_array_like(x: Any) -> bool:
    return eqx.is_array(x) or isinstance(x, jax.ShapeDtypeStruct)


def param_partition_specs(
    model: PyTree, parallel_config: ParallelConfig, *, num_devices: int | None = None
) -> PyTree:
    """A ``PartitionSpec`` for every array leaf of ``model`` (same structure; non-arrays → None).

    Rules (ARCHITECTURE §8.2–8.3), applied per layer — stacked leading axes (scanned layers, the
    vmapped q/k pair) are never sharded:

    - tensor parallel over ``tp`` (only when its size is > 1 and the axis divides): the embedding
      ``(V, D)`` over D; column-parallel up-projections (mLSTM ``proj_up_*``, v1 ``dense_q/k/v/o``
      and gates, FFN ``proj_up``/``proj_up_gate``, Llama q/k/v) over their output features/heads;
      row-parallel down/out projections over their input features; headwise kernels, conv,
      multi-head norms, ``learnable_skip``, sLSTM heads and the blocks' residual norms over
      heads/features; the LM head (``out_norm``, ``lm_head``) over its largest divisible axis if it
      has more than ``fsdp_min_weight_size`` elements; q/k norms and the rest replicated.
    - FSDP over ``fsdp`` (size > 1), for arrays inside a module named in ``fsdp_modules``
      (``MODULE_NAME_MAP``) with more than ``fsdp_min_weight_size`` elements per tp shard: the
      largest axis divisible by the fsdp size and not already sharded.
    - ``dp`` and ``pp`` never shard parameters.

    Works on real models and on ``eqx.filter_eval_shape`` skeletons. ``-1`` axis sizes are resolved
    with ``num_devices`` (default: the device count).
    """
    if not isinstance(parallel_config, ParallelConfig):
        raise TypeError(f"parallel_config must be a ParallelConfig, got {type(parallel_config)}")
    pc = parallel_config
    _check_module_names(model, pc)
    sizes = axis_sizes(pc, num_devices)
    tp_name, fsdp_name = pc.model_axis_name, pc.fsdp_axis_name
    tp, fsdp = sizes[tp_name], sizes[fsdp_name]
    fsdp_modules = set(pc.fsdp_modules)
    min_size = pc.fsdp_min_weight_size

    def rule(path: Sequence[Any], x: Any) -> P | None:
        if not _is_array_like(x):
            return None
        leaf = _locate(model, path)
        shape = tuple(x.shape)
        lead = min(leaf.lead, len(shape))
        layer_shape = shape[lead:]
        spec: list[Any] = [None] * len(layer_shape)
        tp_factor = 1
        if tp > 1 and layer_shape:
            axis = _tp_axis(leaf, len(layer_shape))
            if axis == "lmhead":
                if math.prod(layer_shape) > min_size:
                    axis = _largest_free_axis(layer_shape, spec, tp)
                else:
                    axis = None
            if isinstance(axis, int) and axis < len(layer_shape) and layer_shape[axis] % tp == 0:
                spec[axis] = tp_name
                tp_factor = tp
        if fsdp > 1 and layer_shape and fsdp_modules & leaf.names:
            if math.prod(layer_shape) // tp_factor > min_size:
                axis = _largest_free_axis(layer_shape, spec, fsdp)
                if axis is not None:
                    spec[axis] = fsdp_name
        while spec and spec[-1] is None:
            spec.pop()
        return P(*([None] * lead if spec else []), *spec)

    return jax.tree_util.tree_map_with_path(rule, model)


def named_shardings(specs: PyTree, mesh: Mesh) -> PyTree:
    """``NamedSharding(mesh, spec)`` for every ``PartitionSpec`` leaf (None stays None)."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda s: isinstance(s, P))


def _place(tree: PyTree, shardings: PyTree) -> PyTree:
    """``eqx.filter_shard`` inside jit; outside jit a plain ``jax.device_put`` of the array part
    (no per-leaf compilation; each device receives only its shard)."""
    arrays, static = eqx.partition(tree, eqx.is_array)
    if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(arrays)):
        return eqx.filter_shard(tree, shardings)
    placed = jax.tree.map(
        place_global, arrays, shardings, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding)
    )
    return eqx.combine(placed, static)


def shard_model(model: PyTree, mesh: Mesh, specs: PyTree) -> PyTree:
    """``model`` with every array placed (outside jit) or constrained (inside jit) to
    ``NamedSharding(mesh, spec)``."""
    return _place(model, named_shardings(specs, mesh))


def opt_state_specs(opt_state: PyTree, params: PyTree, param_specs: PyTree) -> PyTree:
    """Specs for an optax state: every sub-tree shaped like the parameters (Adam's ``mu``/``nu``,
    …) gets the parameters' specs; every other array (step counts, …) is replicated.

    ``params`` is the tree the optimizer was initialised with (e.g. ``eqx.filter(model,
    eqx.is_inexact_array)``) and ``param_specs`` the model's specs (same structure as ``model``)."""
    treedef = jax.tree.structure(params)
    flat_specs = _specs_at_params(params, param_specs)

    def is_params_like(node: Any) -> bool:
        if _is_array_like(node) or node is None:
            return False
        try:
            return jax.tree.structure(node) == treedef
        except Exception:  # noqa: BLE001 - exotic nodes: not params-like
            return False

    def rule(node: Any) -> Any:
        if is_params_like(node):
            leaves = jax.tree.leaves(node)
            if len(leaves) == len(flat_specs) and all(
                tuple(a.shape) == s_shape
                for a, (_, s_shape) in zip(leaves, flat_specs, strict=True)
            ):
                return jax.tree.unflatten(treedef, [s for s, _ in flat_specs])
            return jax.tree.map(lambda a: P(), node)
        if _is_array_like(node):
            return P()
        return None

    return jax.tree.map(rule, opt_state, is_leaf=lambda n: is_params_like(n) or _is_array_like(n))


def _specs_at_params(params: PyTree, param_specs: PyTree) -> list[tuple[P, tuple[int, ...]]]:
    """(spec, shape) for each array leaf of ``params``, read from ``param_specs`` (which may cover
    more leaves: the whole model)."""
    by_path = {
        jax.tree_util.keystr(p): s
        for p, s in jax.tree_util.tree_flatten_with_path(
            param_specs, is_leaf=lambda s: isinstance(s, P)
        )[0]
    }
    out = []
    for p, a in jax.tree_util.tree_flatten_with_path(params)[0]:
        out.append((by_path.get(jax.tree_util.keystr(p), P()), tuple(a.shape)))
    return out


def shard_opt_state(opt_state: PyTree, mesh: Mesh, specs: PyTree) -> PyTree:
    """``opt_state`` placed/constrained to ``NamedSharding(mesh, spec)`` (specs from
    ``opt_state_specs``)."""
    return _place(opt_state, named_shardings(specs, mesh))


def batch_spec(parallel_config: ParallelConfig) -> P:
    """Tokens ``(B, S)``: the batch split over ``(dp, fsdp)``, replicated over ``pp``/``tp``."""
    return P((parallel_config.data_axis_name, parallel_config.fsdp_axis_name), None)


def batch_sharding(
    mesh: Mesh, parallel_config: ParallelConfig, *, leading: int = 0
) -> NamedSharding:
    """``NamedSharding`` of a token batch with ``leading`` extra unsharded axes in front (the
    trainer's micro-batch axis: ``leading=1`` for ``(A, B, S+1)``)."""
    return NamedSharding(mesh, P(*([None] * leading), *batch_spec(parallel_config)))


def place_global(x: Any, sharding: jax.sharding.Sharding) -> Array:
    """A global array with ``sharding`` from host data that every process holds in full (the data
    order is the same on every process). Each device gets only its slice: nothing is gathered on
    one device first."""
    if isinstance(x, jax.Array) and x.sharding == sharding:
        return x
    if isinstance(x, jax.Array) and x.is_fully_addressable and jax.process_count() == 1:
        return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


# ----------------------------------------------------------------------------------------------
# born sharded


def init_sharded(
    model_cls: Callable[..., Any],
    config: Any,
    *,
    key: PRNGKeyArray,
    mesh: Mesh,
    parallel_config: ParallelConfig | None = None,
) -> PyTree:
    """``model_cls(config, key=key)`` created directly in its sharded layout on ``mesh``.

    Shapes come from ``eqx.filter_eval_shape`` (no allocation); the arrays are made by one
    ``jax.jit`` of the init over the array part with ``out_shardings`` = the parameter shardings, so
    each device computes only its own shards and no array exists whole on one device. With the
    default partitionable threefry PRNG the values equal those of the plain (unsharded) init.
    ``parallel_config`` defaults to ``config.parallel``.
    """
    pc = parallel_config if parallel_config is not None else getattr(config, "parallel", None)
    if pc is None:
        pc = ParallelConfig()
    skeleton = eqx.filter_eval_shape(model_cls, config, key=key)
    specs = param_partition_specs(skeleton, pc, num_devices=mesh.devices.size)
    _, static = eqx.partition(skeleton, _is_array_like)
    shardings = named_shardings(specs, mesh)  # None at the non-array leaves, as eqx.filter gives

    @functools.partial(jax.jit, out_shardings=shardings)
    def make(k: PRNGKeyArray) -> PyTree:
        return eqx.filter(model_cls(config, key=k), eqx.is_array)

    return eqx.combine(make(key), static)


# ----------------------------------------------------------------------------------------------
# the sharded train step


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _gather_cast(w: Array, gather_dtype: str, scatter_dtype: str) -> Array:
    return w.astype(gather_dtype)


def _gather_cast_fwd(w: Array, gather_dtype: str, scatter_dtype: str) -> tuple[Array, Any]:
    # The residual only carries the weight's dtype (a zero-size array).
    return w.astype(gather_dtype), jnp.zeros((0,), w.dtype)


def _gather_cast_bwd(gather_dtype: str, scatter_dtype: str, res: Any, g: Array) -> tuple[Array]:
    return (g.astype(scatter_dtype).astype(res.dtype),)


_gather_cast.defvjp(_gather_cast_fwd, _gather_cast_bwd)


def _drop_axis(spec: P, lead: int, axis: str) -> P | None:
    """The per-layer spec (``lead`` stacked axes dropped) without ``axis``; None if ``axis`` was
    not in it (nothing to gather)."""
    entries = tuple(spec)[lead:]
    found = False
    out = []
    for entry in entries:
        parts = entry if isinstance(entry, tuple) else (entry,)
        if axis in parts:
            found = True
            rest = tuple(a for a in parts if a != axis and a is not None)
            out.append(rest[0] if len(rest) == 1 else (rest or None))
        else:
            out.append(entry)
    return P(*out) if found else None


class _GatherAtUse(eqx.Module):
    """Wraps a module named in ``fsdp_modules``: when called, its FSDP-sharded weights are cast to
    the gather dtype and constrained to their layout without the ``fsdp`` axis, so XLA all-gathers
    them right there — inside the layer scan, one layer at a time — and reduces their gradients
    back onto the shards (a reduce-scatter; XLA:CPU emits all-reduce + slice). The gathered copies
    are not kept for the backward pass: a checkpoint policy (``_not_gathered``) saves everything
    but them, so they are gathered again there, as in the reference. Used transiently inside the
    loss; never stored."""

    module: Any
    shardings: tuple[NamedSharding | None, ...] = eqx.field(static=True)
    stored: tuple[NamedSharding | None, ...] = eqx.field(static=True)
    gather_dtype: str | None = eqx.field(static=True)
    scatter_dtype: str | None = eqx.field(static=True)
    in_scan: bool = eqx.field(static=True)

    def gathered(self) -> Any:
        arrays, static = eqx.partition(self.module, eqx.is_array)
        leaves, treedef = jax.tree.flatten(arrays)
        if len(leaves) != len(self.shardings):
            raise ValueError(
                f"internal error: {len(leaves)} arrays but {len(self.shardings)} shardings"
            )
        out = []
        for x, sh, local in zip(leaves, self.shardings, self.stored, strict=True):
            if sh is not None:
                # Only the stored (sharded) weight is kept for the backward pass; the cast and
                # the gather are recomputed there (see _not_gathered).
                x = jax.lax.with_sharding_constraint(x, local)
                if self.gather_dtype is not None and jnp.issubdtype(x.dtype, jnp.floating):
                    scatter = self.scatter_dtype or self.gather_dtype
                    if jnp.dtype(scatter) == jnp.dtype(self.gather_dtype):
                        x = x.astype(self.gather_dtype)  # its transpose casts the cotangent back
                    else:
                        x = _gather_cast(x, self.gather_dtype, scatter)
                    x = jax.lax.with_sharding_constraint(x, local)
                x = jax.lax.with_sharding_constraint(x, sh)
                x = checkpoint_name(x, _GATHERED)
            out.append(x)
        return eqx.combine(jax.tree.unflatten(treedef, out), static)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # The gathered weights are not saved for the backward pass (they are gathered again
        # there); every other residual is saved as usual.
        run = _run_gathered_in_scan if self.in_scan else _run_gathered
        return run(self, args, kwargs)

    def __getattr__(self, name: str) -> Any:
        # Other methods of the wrapped module (e.g. ``Embedding.attend``) see gathered weights.
        if name.startswith("_") or name in _GATHER_FIELDS:
            raise AttributeError(name)
        return getattr(self.gathered(), name)


_GATHERED = "fsdp_gathered_weight"
_GATHER_FIELDS = ("module", "shardings", "stored", "gather_dtype", "scatter_dtype", "in_scan")


# Primitives whose outputs are not saved for the backward pass inside a gathered module: the
# layout changes and casts that turn the stored weight shard into the gathered weight, and the
# cheap reshapes/transposes/casts that layers apply to it before a matmul (saving any of them
# would keep a whole gathered weight alive). Their inputs are saved or recomputed instead.
_RECOMPUTED = frozenset(
    {
        "sharding_constraint",
        "convert_element_type",
        "transpose",
        "reshape",
        "squeeze",
        "custom_vjp_call",
        "custom_vjp_call_jaxpr",
    }
)


def _not_gathered(prim: Any, *_: Any, **params: Any) -> bool:
    """Remat policy of a gathered module: save every residual except the gathered weights (named
    _GATHERED) and the outputs of ``_RECOMPUTED`` primitives."""
    if prim.name == "name":
        return params.get("name") != _GATHERED
    return prim.name not in _RECOMPUTED


def _call_gathered(wrapper: _GatherAtUse, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return wrapper.gathered()(*args, **kwargs)


# Inside a layer scan CSE cannot merge the forward and backward gathers, so prevent_cse=False is
# safe there (and cheaper); outside one, XLA would merge them and keep the gathered weight alive.
_run_gathered_in_scan = eqx.filter_checkpoint(
    _call_gathered, policy=_not_gathered, prevent_cse=False
)
_run_gathered = eqx.filter_checkpoint(_call_gathered, policy=_not_gathered, prevent_cse=True)


def _fsdp_targets(model: Any, wanted: set[str]) -> list[tuple[tuple[Any, ...], int]]:
    """(path, stacked leading axes) of the outermost modules whose registered names are in
    ``wanted``."""
    targets: list[tuple[tuple[Any, ...], int]] = []

    def visit(node: Any, path: tuple[Any, ...], parent: tuple[str, str] | None, lead: int) -> None:
        if isinstance(node, eqx.Module):
            cls = type(node).__name__
            names = {cls, _CLASS_ALIASES.get(cls, cls)}
            if parent is not None and parent in _FIELD_ALIASES:
                names.add(_FIELD_ALIASES[parent])
            if names & wanted:
                targets.append((path, lead))
                return
            for f in dataclasses.fields(node):
                if f.metadata.get("static", False):
                    continue
                child = getattr(node, f.name)
                extra = 1 if (cls, f.name) in _STACKED and isinstance(child, eqx.Module) else 0
                visit(child, (*path, jax.tree_util.GetAttrKey(f.name)), (cls, f.name), lead + extra)
        elif isinstance(node, (list, tuple)):
            for i, c in enumerate(node):
                visit(c, (*path, jax.tree_util.SequenceKey(i)), parent, lead)

    visit(model, (), None, 0)
    return targets


def _follow(node: Any, path: Sequence[Any]) -> Any:
    for entry in path:
        node = _child(node, entry)
    return node


def gather_at_use(
    model: PyTree, specs: PyTree, mesh: Mesh, parallel_config: ParallelConfig
) -> PyTree:
    """``model`` with every module named in ``fsdp_modules`` wrapped so that its FSDP-sharded
    weights are all-gathered where the module is called (per layer inside the block scan), in
    ``fsdp_gather_dtype`` if set, with gradients reduce-scattered in ``fsdp_grad_scatter_dtype``.

    Without it XLA may instead all-gather the (batch-sharded) activations; with it the layout is
    the reference's FSDP. Apply it inside the loss function (it is a pure restructuring of the same
    arrays, so gradients keep the model's structure). A no-op when the fsdp axis has size 1.
    """
    pc = parallel_config
    fsdp = pc.fsdp_axis_name
    if mesh.shape.get(fsdp, 1) <= 1 or not pc.fsdp_modules:
        return model
    targets = _fsdp_targets(model, set(pc.fsdp_modules))
    if not targets:
        return model
    wrapped = []
    for path, lead in targets:
        module = _follow(model, path)
        sub_specs = _follow(specs, path)
        spec_leaves = jax.tree.leaves(sub_specs, is_leaf=lambda s: isinstance(s, P))
        shardings = tuple(
            None if (ps := _drop_axis(s, lead, fsdp)) is None else NamedSharding(mesh, ps)
            for s in spec_leaves
        )
        stored = tuple(NamedSharding(mesh, P(*tuple(s)[lead:])) for s in spec_leaves)
        wrapped.append(
            _GatherAtUse(
                module,
                shardings,
                stored,
                pc.fsdp_gather_dtype,
                pc.fsdp_grad_scatter_dtype,
                lead > 0,
            )
        )
    paths = [p for p, _ in targets]
    return eqx.tree_at(lambda m: tuple(_follow(m, p) for p in paths), model, tuple(wrapped))


def make_sharded_train_step(
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    parallel_config: ParallelConfig,
    model_specs: PyTree,
    opt_specs: PyTree,
    *,
    return_grads: bool = False,
) -> Callable[..., Any]:
    """``step((batch, key), model, opt_state) -> (model, opt_state, loss, grad_norm)``: the trainer's
    step (``_train.make_train_step``: mean next-token loss, micro-batches ``(A, B, S+1)`` averaged
    in a ``lax.scan``, global grad norm, optax update under standard dtype promotion) on a mesh.

    ``step`` places its inputs itself: the host batch split over ``(dp, fsdp)`` (``place_global``:
    every process passes the same global batch), the key replicated, and the model / optimizer
    state onto their shardings (a no-op when they are already there, e.g. the previous step's
    outputs). Inside, the layouts are pinned with ``eqx.filter_shard`` so they are the same after
    every step, and under FSDP the weights are gathered at use, per layer (``gather_at_use``), in
    ``fsdp_gather_dtype`` if set. The jitted core (``step.core``, for ``.lower(...)``) donates the
    model and optimizer buffers. ``return_grads=True`` also returns the averaged gradients.
    """
    from ._train import next_token_loss, trainable_params

    pc = parallel_config
    model_sh = named_shardings(model_specs, mesh)
    opt_sh = named_shardings(opt_specs, mesh)
    batch_sh = batch_sharding(mesh, pc, leading=1)
    replicated = NamedSharding(mesh, P())

    def loss_fn(model: Any, tokens: Array, key: PRNGKeyArray) -> Float[Array, ""]:
        return next_token_loss(gather_at_use(model, model_specs, mesh, pc), tokens, key)

    loss_and_grad = eqx.filter_value_and_grad(loss_fn)

    @eqx.filter_jit(donate="all-except-first")
    def core(inputs: Any, model: Any, opt_state: Any) -> Any:
        batch, key_data = inputs
        key = jr.wrap_key_data(key_data)
        batch = jax.lax.with_sharding_constraint(batch, batch_sh)
        model = eqx.filter_shard(model, model_sh)
        opt_state = eqx.filter_shard(opt_state, opt_sh)
        A = batch.shape[0]
        keys = jr.split(key, A)
        if A == 1:
            loss, grads = loss_and_grad(model, batch[0], keys[0])
        else:
            params, static = eqx.partition(model, eqx.is_inexact_array)

            def micro(carry: Any, xs: Any) -> Any:
                gsum, lsum = carry
                mb, k = xs
                loss_i, g = loss_and_grad(eqx.combine(params, static), mb, k)
                g = eqx.filter(g, eqx.is_inexact_array)
                return (jax.tree.map(jnp.add, gsum, g), lsum + loss_i), None

            zeros = jax.tree.map(jnp.zeros_like, params)
            (gsum, lsum), _ = jax.lax.scan(
                micro, (zeros, jnp.zeros((), jnp.float32)), (batch, keys)
            )
            grads = jax.tree.map(lambda g: g / A, gsum)
            loss = lsum / A
        grads = eqx.filter_shard(grads, model_sh)
        grad_norm = optax.tree.norm(grads)
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = optimizer.update(grads, opt_state, trainable_params(model))
        model = eqx.apply_updates(model, updates)
        model = eqx.filter_shard(model, model_sh)
        opt_state = eqx.filter_shard(opt_state, opt_sh)
        if return_grads:
            return model, opt_state, loss, grad_norm, grads
        return model, opt_state, loss, grad_norm

    def place_inputs(inputs: Any, model: Any, opt_state: Any) -> tuple[Any, Any, Any]:
        batch, key = inputs
        if np.ndim(batch) != 3:
            raise ValueError(
                f"batch must be (A, B, S+1) micro-batches of tokens, got shape {np.shape(batch)}"
            )
        data = mesh.shape[pc.data_axis_name] * mesh.shape[pc.fsdp_axis_name]
        if np.shape(batch)[1] % data != 0:
            raise ValueError(
                f"batch size {np.shape(batch)[1]} is not divisible by the data-parallel size "
                f"{pc.data_axis_name}×{pc.fsdp_axis_name} = {data} of the mesh {dict(mesh.shape)}"
            )
        key_data = place_global(np.asarray(jax.random.key_data(key)), replicated)
        inputs = (place_global(batch, batch_sh), key_data)
        return inputs, _place(model, model_sh), _place(opt_state, opt_sh)

    def step(inputs: Any, model: Any, opt_state: Any) -> Any:
        return core(*place_inputs(inputs, model, opt_state))

    step.core = core  # type: ignore[attr-defined]
    step.place_inputs = place_inputs  # type: ignore[attr-defined]
    step.mesh = mesh  # type: ignore[attr-defined]
    return step


def shard_train_state(
    mesh_spec: str | ParallelConfig,
    model: PyTree,
    opt_state: PyTree,
    optimizer: optax.GradientTransformation,
    *,
    base: ParallelConfig | None = None,
    devices: Sequence[Any] | None = None,
) -> tuple[PyTree, PyTree, Callable[..., Any], Mesh]:
    """Everything a training loop needs to run on a mesh, in one call:
    ``(model, opt_state, step, mesh)`` with the model and optimizer state placed on the mesh and
    ``step`` from ``make_sharded_train_step`` (same signature as the trainer's step; it places the
    host batch itself).

    ``mesh_spec``: a ``ParallelConfig`` or a string for ``parse_mesh_spec`` whose other fields come
    from ``base`` (e.g. the model config's ``parallel``: FSDP modules, gather dtype).
    """
    if isinstance(mesh_spec, str):
        pc = parse_mesh_spec(mesh_spec, base)
    elif isinstance(mesh_spec, ParallelConfig):
        pc = mesh_spec
    else:
        raise TypeError(
            f"mesh_spec must be a str or ParallelConfig, got {type(mesh_spec).__name__}"
        )
    mesh = make_mesh(pc, devices)
    specs = param_partition_specs(model, pc, num_devices=mesh.devices.size)
    from ._train import trainable_params

    ospecs = opt_state_specs(opt_state, trainable_params(model), specs)
    model = shard_model(model, mesh, specs)
    opt_state = shard_opt_state(opt_state, mesh, ospecs)
    return model, opt_state, make_sharded_train_step(optimizer, mesh, pc, specs, ospecs), mesh


# ----------------------------------------------------------------------------------------------
# checkpoints across meshes


def gather_to_host(tree: PyTree) -> PyTree:
    """Every array of ``tree`` as one global NumPy array on the host (non-arrays unchanged).
    Arrays spread over several processes are all-gathered (``process_allgather``), so every
    process gets the full value."""
    from jax.experimental import multihost_utils

    def get(x: Any) -> Any:
        if not isinstance(x, jax.Array):
            return x
        if x.is_fully_addressable:
            return np.asarray(jax.device_get(x))
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(get, tree)


def save_sharded_checkpoint(
    root: str | os.PathLike,
    step: int,
    trees: Mapping[str, PyTree],
    metadata: Mapping[str, Any] | None = None,
    *,
    keep: int | None = 3,
) -> str | None:
    """``_checkpoint.save_checkpoint`` for sharded trees: arrays are gathered to global host
    arrays (the stored format has no mesh in it), and only process 0 writes. Returns the path on
    process 0, None elsewhere. Every process must call it (the gather is collective)."""
    from ._checkpoint import save_checkpoint

    host = {name: gather_to_host(tree) for name, tree in trees.items()}
    if jax.process_index() != 0:
        return None
    return save_checkpoint(root, step, host, metadata, keep=keep)


def restore_sharded_checkpoint(
    path: str | os.PathLike,
    templates: Mapping[str, PyTree],
    shardings: Mapping[str, PyTree],
) -> tuple[dict[str, PyTree], dict[str, Any]]:
    """Load the named trees (templates may be ``eqx.filter_eval_shape`` skeletons) and place each
    array with its sharding from ``shardings[name]`` (a tree of ``Sharding``s, e.g.
    ``named_shardings(param_partition_specs(...), mesh)``) — whatever mesh the checkpoint was
    written from. The file is read on the host CPU; each device receives only its slice."""
    from ._checkpoint import restore_checkpoint

    cpu = jax.local_devices(backend="cpu")[0]
    with jax.default_device(cpu):
        trees, meta = restore_checkpoint(path, templates)
    out = {}
    for name, tree in trees.items():
        sh = shardings.get(name)
        if sh is None:
            out[name] = tree
            continue
        arrays, static = eqx.partition(tree, eqx.is_array)
        placed = jax.tree.map(
            lambda a, s: place_global(np.asarray(a), s),
            arrays,
            sh,
            is_leaf=lambda s: isinstance(s, jax.sharding.Sharding),
        )
        out[name] = eqx.combine(placed, static)
    return out, meta


# ----------------------------------------------------------------------------------------------
# multi-host


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_ids: Sequence[int] | None = None,
    cpu_collectives: str | None = "gloo",
    force: bool = False,
    environ: Mapping[str, str] | None = None,
) -> bool:
    """Start JAX's multi-controller runtime (``jax.distributed.initialize``), one process per host.

    Where the settings come from, first match wins:

    1. the arguments;
    2. the environment: ``JAX_COORDINATOR_ADDRESS`` (``host:port`` of process 0),
       ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID`` (and ``JAX_LOCAL_DEVICE_IDS``, comma-separated);
    3. a SLURM allocation with more than one task (``SLURM_NTASKS``): JAX reads SLURM's variables;
    4. ``force=True`` (or ``XLSTM_EQX_DISTRIBUTED=1``): JAX detects the cluster itself (TPU pods,
       Open MPI / mpi4py, Kubernetes).

    Otherwise this is a single-process run and nothing happens (returns False). Returns True
    once the runtime is up (also when it already was). Must be called before any JAX computation.
    ``cpu_collectives`` sets the CPU backend's cross-process collectives ("gloo" or "mpi").
    """
    env = os.environ if environ is None else environ
    if jax.distributed.is_initialized():
        return True
    coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS") or None
    if num_processes is None and env.get("JAX_NUM_PROCESSES"):
        num_processes = int(env["JAX_NUM_PROCESSES"])
    if process_id is None and env.get("JAX_PROCESS_ID"):
        process_id = int(env["JAX_PROCESS_ID"])
    if local_device_ids is None and env.get("JAX_LOCAL_DEVICE_IDS"):
        local_device_ids = [int(i) for i in env["JAX_LOCAL_DEVICE_IDS"].split(",")]
    slurm = int(env.get("SLURM_NTASKS", "1") or "1") > 1
    force = force or env.get("XLSTM_EQX_DISTRIBUTED", "") not in ("", "0")
    if coordinator_address is None and not slurm and not force:
        if num_processes not in (None, 1):
            raise ValueError(
                f"num_processes={num_processes} needs a coordinator address "
                "(argument or JAX_COORDINATOR_ADDRESS=host:port)"
            )
        return False
    if coordinator_address is not None and (num_processes is None or process_id is None):
        raise ValueError(
            f"coordinator_address={coordinator_address!r} also needs num_processes and process_id "
            "(arguments or JAX_NUM_PROCESSES / JAX_PROCESS_ID)"
        )
    if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"process_id={process_id} must be in [0, num_processes={num_processes})")
    if cpu_collectives is not None:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=local_device_ids,
    )
    return True


# ----------------------------------------------------------------------------------------------
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
    config: Any,
    parallel_config: ParallelConfig | None = None,
    *,
    num_devices: int | None = None,
    model_cls: Callable[..., Any] | None = None,
    optimizer: optax.GradientTransformation | None = None,
) -> MemoryReport:
    """Per-device parameter and optimizer-state bytes of ``config``'s model on a mesh, from
    ``eqx.filter_eval_shape`` skeletons (nothing is allocated, so the 7B config is instant).

    ``parallel_config`` defaults to ``config.parallel``; a ``-1`` axis size is filled from
    ``num_devices`` (default: size 1 — a mesh of just the fixed axes; no device is needed). ``model_cls`` defaults to ``xLSTMLMModel`` or
    ``LlamaTransformer`` by config type; ``optimizer`` to AdamW (two float32 moments per
    parameter plus a step count).
    """
    if model_cls is None:
        if type(config).__name__ == "LlamaConfig":
            from ._llama import LlamaTransformer as model_cls
        else:
            from ._model import xLSTMLMModel as model_cls
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


# ----------------------------------------------------------------------------------------------
# HLO inspection


def count_all_gathers(hlo_text: str) -> list[tuple[str, tuple[int, ...]]]:
    """``(dtype, result shape)`` of every all-gather in an HLO module text (e.g.
    ``jit(f).lower(...).compile().as_text()``), to check which weights are gathered whole."""
    import re

    out = []
    pattern = re.compile(r"=\s*\(?([a-z0-9]+)\[([0-9,]*)\][^=]*?\ball-gather(?:-start)?\(")
    for line in hlo_text.splitlines():
        m = pattern.search(line)
        if m:
            dims = tuple(int(d) for d in m.group(2).split(",") if d)
            out.append((m.group(1), dims))
    return out
