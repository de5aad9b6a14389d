"""Partition rules: a ``PartitionSpec`` for every array of a model (`param_partition_specs`),
derived from the logical axes each module declares where it creates the array (``nn.axes``,
checked by `logical_axes`) through one mapping, `LOGICAL_AXIS_RULES`; specs for an optax state
(`opt_state_specs`) and for token batches (`batch_spec`); `module_names`, the names (the reference's
module names, as used in ``fsdp_modules`` and ``remat``, declared on the modules: ``reference_name``,
``field_reference_names``) a module answers to, documented in `MODULE_NAME_MAP`. The rules are
listed in docs/architecture.md, "Partition rules".

Tensor parallelism for the Llama baseline is not in the reference; the rules here give it the usual
Megatron layout (q/k/v and FFN up/gate column-parallel, attention out and FFN down row-parallel).
"""

import dataclasses
import math
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import equinox as eqx
import jax
import numpy as np
from jax.sharding import PartitionSpec as P
from jaxtyping import PyTree

from ..core.parallel_config import ParallelConfig
from ..nn.axes import REPLICATED, LogicalAxes, axes_field_name
from .mesh import axis_sizes


# which module is which: the reference's registered names, declared on the modules themselves

#: Reference module names (as used in ``fsdp_modules`` and ``remat``) → what they are here. Each is
#: declared by the module it names (`module_names`); tests/parallel/test_module_names.py checks
#: that this map and the declarations of the presets' modules agree.
MODULE_NAME_MAP: dict[str, str] = {
    "Embed": "xLSTMLMModel.token_embedding / LlamaTransformer.token_embedding (Embedding)",
    "LMHead": "xLSTMLMModel.out_norm + .lm_head / LlamaTransformer.out_norm + .lm_head",
    "BlockStack": "xLSTMBlockStack / TransformerBlockStack",
    "mLSTMBlock": "xLSTMBlock (every block of an xLSTM stack)",
    "xLSTMResBlock": "xLSTMBlock.xlstm_res_block (ResidualBlock around the mLSTM/sLSTM layer)",
    "FFNResBlock": "xLSTMBlock.ffn_res_block (ResidualBlock around the FeedForward)",
    "mLSTMInnerLayer": "mLSTMInnerLayer",
    "mLSTMCell": "mLSTMInnerLayer.mlstm_cell (mLSTMCell; not mLSTMLayerV1.cell: the reference's "
    "v1 layer holds its gates and norms itself)",
    "TransformerBlock": "TransformerBlock",
    "AttnBlock": "SelfAttentionBlock",
    "FFNBlock": "FFNBlock",
}


#: On a module class: the reference's registered name of the class (``ClassVar[str]``).
REFERENCE_NAME = "reference_name"


#: On a module class: the reference's names of what some of its fields hold
#: (``ClassVar[Mapping[str, str | None]]``, field → name); None: the reference has no module
#: there (the owner holds those weights itself), so the sub-module answers to no name of its own.
FIELD_REFERENCE_NAMES = "field_reference_names"


def field_reference_name(owner: eqx.Module, field: str) -> str | None:
    """The reference's name that ``owner`` declares for its field ``field`` (None: none)."""
    return getattr(type(owner), FIELD_REFERENCE_NAMES, {}).get(field)


def module_names(module: eqx.Module, owner: eqx.Module | None, field: str | None) -> set[str]:
    """The names ``fsdp_modules`` and ``remat`` may use for ``module``, held in ``owner.field``
    (None for the root): its class name and the reference's name that the class declares, plus
    the reference's name that the owner declares for the field; none at all where the owner
    declares that the reference has no module there."""
    declared_by_owner = {} if owner is None else getattr(type(owner), FIELD_REFERENCE_NAMES, {})
    if field in declared_by_owner and declared_by_owner[field] is None:
        return set()
    names = {type(module).__name__}
    class_name = getattr(type(module), REFERENCE_NAME, None)
    if class_name is not None:
        names.add(class_name)
    if field is not None and declared_by_owner.get(field) is not None:
        names.add(declared_by_owner[field])
    return names


def modules_in(tree: Any) -> Iterator[eqx.Module]:
    """Every module in ``tree`` (its fields, lists, tuples and dicts searched), depth first."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, eqx.Module):
            yield node
            stack.extend(vars(node).values())
        elif isinstance(node, (list, tuple)):
            stack.extend(node)
        elif isinstance(node, dict):
            stack.extend(node.values())


def declared_module_names(model: Any) -> set[str]:
    """Every reference name declared by a module class or a field of a module in ``model``."""
    found: set[str] = set()
    for module in modules_in(model):
        cls = type(module)
        if getattr(cls, REFERENCE_NAME, None) is not None:
            found.add(getattr(cls, REFERENCE_NAME))
        found.update(name for name in getattr(cls, FIELD_REFERENCE_NAMES, {}).values() if name)
    return found


# The one mapping from logical axes (declared where each weight is created: nn.axes) to the mesh.

#: How the mesh splits an array axis of this logical name: ``"tp"``, over the tensor-parallel axis
#: (when its size divides the axis); ``"tp_largest"``, the LM head's rule: its largest axis that
#: the tp size divides, only if the array has more than ``fsdp_min_weight_size`` elements; None,
#: never over tp. An array splits one axis over tp at most: of its ``"tp"`` axes, the one whose
#: name comes first here (heads, then mlp, then embed), so a column-parallel kernel
#: ``("embed", "mlp")`` splits its outputs and a row-parallel ``("mlp", "embed")`` its inputs.
#: FSDP does not look at names (the reference's choice: the largest free axis that the fsdp size
#: divides, in the modules named in ``fsdp_modules``); neither splits stacked leading axes
#: (``"layers"`` of scanned blocks, the ``"qk"`` pair), and ``dp``/``pp`` never split parameters.
LOGICAL_AXIS_RULES: dict[str, Literal["tp", "tp_largest"] | None] = {
    "heads": "tp",  # attention / mLSTM / sLSTM heads, headwise blocks
    "mlp": "tp",  # up-projected width: FFN hidden, mLSTM inner and v dims
    "embed": "tp",  # model width D: the xLSTM residual stream is feature-sharded over tp
    "lm_head_embed": "tp_largest",
    "lm_head_vocab": "tp_largest",
    "vocab": None,
    "head_dim": None,
    "gates": None,  # the sLSTM's four gates
    "gate_features": None,  # the concatenated input of a dense mLSTM gate
    "conv_window": None,
    "layers": None,  # stacked: scanned blocks
    "qk": None,  # stacked: the vmapped q/k pair
}


_TP_PRIORITY: dict[str, int] = {name: i for i, name in enumerate(LOGICAL_AXIS_RULES)}


@dataclasses.dataclass(frozen=True)
class _Leaf:
    """Where an array sits: the registered names of its enclosing modules, the logical names of
    its stacked leading axes (scanned layers, the vmapped q/k pair) and the logical axes its owner
    declares for it (None: undeclared)."""

    names: frozenset[str]
    stacked: tuple[str, ...]
    axes: LogicalAxes | None
    owner: str


def child(node: Any, entry: Any) -> Any:
    """The child of a PyTree node at one path entry (attribute, index or dict key)."""
    if isinstance(entry, jax.tree_util.GetAttrKey):
        return getattr(node, entry.name)
    if isinstance(entry, jax.tree_util.SequenceKey):
        return node[entry.idx]
    if isinstance(entry, jax.tree_util.DictKey):
        return node[entry.key]
    raise TypeError(f"unsupported PyTree key {entry!r}")


def stacked_axes(module: eqx.Module, field: str) -> tuple[str, ...]:
    """The logical names of the stacked leading axes that the arrays under ``module.field`` carry:
    declared by ``module`` (``<field>_axes``, nn.axes) for a field holding one vmapped module; none
    for anything else (a tuple of blocks carries none)."""
    declared = getattr(module, axes_field_name(field), None)
    if declared is None or declared == REPLICATED:
        return ()
    return tuple(declared) if isinstance(getattr(module, field), eqx.Module) else ()


def _locate(root: Any, path: Sequence[Any]) -> _Leaf:
    chain: list[tuple[str, str]] = []
    names: set[str] = set()
    stacked: list[str] = []
    axes: LogicalAxes | None = None
    node = root
    holder: tuple[eqx.Module | None, str | None] = (None, None)
    for entry in path:
        if isinstance(node, eqx.Module) and isinstance(entry, jax.tree_util.GetAttrKey):
            names.update(module_names(node, *holder))
            holder = (node, entry.name)
            chain.append((type(node).__name__, entry.name))
            stacked.extend(stacked_axes(node, entry.name))
            value = getattr(node, entry.name)
            axes = (
                None
                if isinstance(value, eqx.Module)
                else getattr(node, axes_field_name(entry.name), None)
            )
            node = value
        else:
            node = child(node, entry)
    owner, field = holder
    if owner is not None and field is not None and (name := field_reference_name(owner, field)):
        names.add(name)  # an array held directly in a named field
    owner = ".".join(chain[-1]) if chain else "<root>"
    return _Leaf(frozenset(names), tuple(stacked), axes, owner)


def _checked_axes(leaf: _Leaf, path: Sequence[Any], ndim: int) -> LogicalAxes:
    """The leaf's declared logical axes, checked: declared, known names, the right rank."""
    where = f"{jax.tree_util.keystr(tuple(path))} ({leaf.owner})"
    if leaf.axes is None:
        raise ValueError(
            f"{where}: no logical axes declared for this array, so its sharding is undecided; "
            f"declare them where it is created (a static '{leaf.owner.split('.')[-1]}_axes', "
            "xlstm_eqx.nn.axes)"
        )
    for name in leaf.stacked + (() if leaf.axes == REPLICATED else tuple(leaf.axes)):
        if name not in LOGICAL_AXIS_RULES:
            raise ValueError(
                f"{where}: unknown logical axis {name!r}; known: {sorted(LOGICAL_AXIS_RULES)}"
            )
    if any(LOGICAL_AXIS_RULES[name] is not None for name in leaf.stacked):
        raise ValueError(f"{where}: stacked axes {leaf.stacked} must not be sharded")
    rank = ndim - len(leaf.stacked)
    if leaf.axes != REPLICATED and len(leaf.axes) != rank:
        raise ValueError(
            f"{where}: {len(leaf.axes)} logical axes {leaf.axes} declared for an array of "
            f"rank {rank} (after {len(leaf.stacked)} stacked axes)"
        )
    return leaf.axes


def logical_axes(model: PyTree) -> PyTree:
    """The checked logical axes of every array leaf of ``model`` (same structure; non-arrays →
    None): the stacked names followed by the declared per-layer names, or the stacked names and
    `REPLICATED`. Raises a ``ValueError`` naming the path of an array without a declaration, with
    an unknown name or with a rank that does not match (real models and shape skeletons)."""

    def rule(path: Sequence[Any], x: Any) -> tuple[str, ...] | None:
        if not is_array_like(x):
            return None
        leaf = _locate(model, path)
        axes = _checked_axes(leaf, path, len(x.shape))
        return leaf.stacked + ((REPLICATED,) if axes == REPLICATED else tuple(axes))

    return jax.tree_util.tree_map_with_path(rule, model)


def _tp_axis(axes: LogicalAxes, layer_shape: Sequence[int], tp: int, min_size: int) -> int | None:
    """The per-layer axis that tensor parallelism splits (``LOGICAL_AXIS_RULES``), or None."""
    if axes == REPLICATED:
        return None
    rules = [LOGICAL_AXIS_RULES[name] for name in axes]
    if "tp_largest" in rules:
        if math.prod(layer_shape) <= min_size:
            return None
        taken = [None if rule == "tp_largest" else "other" for rule in rules]
        return _largest_free_axis(layer_shape, taken, tp)
    split = [i for i, rule in enumerate(rules) if rule == "tp"]
    if not split:
        return None
    axis = min(split, key=lambda i: _TP_PRIORITY[axes[i]])
    return axis if layer_shape[axis] % tp == 0 else None


def _largest_free_axis(shape: Sequence[int], spec: list[Any], size: int) -> int | None:
    """The reference's FSDP choice: the largest axis divisible by ``size`` and not yet sharded,
    ties to the later axis (reversed stable argsort)."""
    for d in reversed(np.argsort(np.asarray(shape), kind="stable").tolist()):
        if spec[d] is None and shape[d] % size == 0:
            return int(d)
    return None


def _known_names(model: Any) -> set[str]:
    """The reference names plus every module class name in ``model``."""
    return set(MODULE_NAME_MAP) | {type(module).__name__ for module in modules_in(model)}


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


def is_array_like(x: Any) -> bool:
    """A JAX array or a ``ShapeDtypeStruct`` (the leaves of an ``eqx.filter_eval_shape`` skeleton)."""
    return eqx.is_array(x) or isinstance(x, jax.ShapeDtypeStruct)


def param_partition_specs(
    model: PyTree, parallel_config: ParallelConfig, *, num_devices: int | None = None
) -> PyTree:
    """A ``PartitionSpec`` for every array leaf of ``model`` (same structure; non-arrays → None).

    Rules (docs/architecture.md, "Partition rules"), applied per layer — stacked leading axes
    (scanned layers, the vmapped q/k pair) are never sharded:

    - tensor parallel over ``tp`` (only when its size is > 1 and the axis divides): the embedding
      ``(V, D)`` over D; column-parallel up-projections (mLSTM ``proj_up_*``, v1 ``dense_q/k/v/o``
      and gates, FFN ``proj_up``/``proj_up_gate``, Llama q/k/v) over their output features/heads;
      row-parallel down/out projections over their input features; headwise kernels, conv,
      multi-head norms, ``learnable_skip``, sLSTM heads and the blocks' residual norms over
      heads/features; the LM head (``out_norm``, ``lm_head``) over its largest divisible axis if it
      has more than ``fsdp_min_weight_size`` elements; q/k norms and the rest replicated. With tp
      > 1 every array must declare its logical axes (a ``ValueError`` names one that does not).
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
        if not is_array_like(x):
            return None
        leaf = _locate(model, path)
        shape = tuple(x.shape)
        lead = len(leaf.stacked)
        layer_shape = shape[lead:]
        spec: list[Any] = [None] * len(layer_shape)
        tp_factor = 1
        if tp > 1 and layer_shape:
            # only tensor parallelism reads the names: a module of the user's own without
            # declarations still shards by fsdp and dp
            axes = _checked_axes(leaf, path, len(shape))
            axis = _tp_axis(axes, layer_shape, tp, min_size)
            if axis is not None:
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
        if is_array_like(node) or node is None:
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
        if is_array_like(node):
            return P()
        return None

    return jax.tree.map(rule, opt_state, is_leaf=lambda n: is_params_like(n) or is_array_like(n))


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
    """Tokens ``(B, S+1)`` as loaded: the batch split over ``(dp, fsdp)``, replicated over
    ``pp``/``cp``/``tp`` (``S+1`` is not divisible by cp; the step splits inputs and targets and
    shards those over cp: `sequence_spec`)."""
    return P((parallel_config.data_axis_name, parallel_config.fsdp_axis_name), None)


def sequence_spec(parallel_config: ParallelConfig) -> P:
    """Inputs, targets, document borders and activations ``(B, S, ...)`` inside the step: the
    batch split over ``(dp, fsdp)``, the sequence over ``cp`` when the mesh has that axis
    (``context_axis_size`` not 1), otherwise as `batch_spec`."""
    pc = parallel_config
    seq = pc.context_axis_name if pc.context_axis_size != 1 else None
    return P((pc.data_axis_name, pc.fsdp_axis_name), seq)
