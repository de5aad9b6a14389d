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
- checkpoints (``training.orbax_checkpoint``): every process writes the shards it holds; a run saved
  on one mesh restores onto any other, each array read straight into its new sharding.
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
import math
from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import numpy as np
from jax.sharding import PartitionSpec as P
from jaxtyping import PyTree

from ..core.parallel_config import ParallelConfig
from .mesh import axis_sizes


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


def batch_spec(parallel_config: ParallelConfig) -> P:
    """Tokens ``(B, S)``: the batch split over ``(dp, fsdp)``, replicated over ``pp``/``tp``."""
    return P((parallel_config.data_axis_name, parallel_config.fsdp_axis_name), None)
