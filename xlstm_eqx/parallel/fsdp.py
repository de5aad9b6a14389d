"""FSDP gather-at-use: `gather_at_use` wraps the modules named in ``fsdp_modules`` so their
sharded weights are all-gathered where they are called (per layer inside a block scan) and not kept
for the backward pass, with gradients reduce-scattered back onto the shards
(docs/architecture.md, "FSDP gather-at-use").
"""

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jaxtyping import Array, PyTree

from ..core.parallel_config import ParallelConfig
from .rules import child, module_names, stacked_axes


# the cast before the gather: forward in fsdp_gather_dtype, gradient via fsdp_grad_scatter_dtype


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def gather_cast(w: Array, gather_dtype: str, scatter_dtype: str) -> Array:
    """``w`` cast to ``gather_dtype``; its gradient goes through ``scatter_dtype`` and back to
    ``w``'s dtype."""
    return w.astype(gather_dtype)


def _gather_cast_fwd(w: Array, gather_dtype: str, scatter_dtype: str) -> tuple[Array, Any]:
    # The residual only carries the weight's dtype (a zero-size array).
    return w.astype(gather_dtype), jnp.zeros((0,), w.dtype)


def _gather_cast_bwd(gather_dtype: str, scatter_dtype: str, res: Any, g: Array) -> tuple[Array]:
    return (g.astype(scatter_dtype).astype(res.dtype),)


gather_cast.defvjp(_gather_cast_fwd, _gather_cast_bwd)


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
                        x = gather_cast(x, self.gather_dtype, scatter)
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


#: The module holding a node and the field it is held in (None, None at the root).
_Holder = tuple[eqx.Module | None, str | None]


def _fsdp_targets(model: Any, wanted: set[str]) -> list[tuple[tuple[Any, ...], int]]:
    """(path, stacked leading axes) of the outermost modules whose registered names are in
    ``wanted``."""
    targets: list[tuple[tuple[Any, ...], int]] = []

    def visit(node: Any, path: tuple[Any, ...], holder: _Holder, lead: int) -> None:
        if isinstance(node, eqx.Module):
            if module_names(node, *holder) & wanted:
                targets.append((path, lead))
                return
            for f in dataclasses.fields(node):
                if f.metadata.get("static", False):
                    continue
                value = getattr(node, f.name)
                extra = len(stacked_axes(node, f.name))
                visit(
                    value, (*path, jax.tree_util.GetAttrKey(f.name)), (node, f.name), lead + extra
                )
        elif isinstance(node, (list, tuple)):
            for i, c in enumerate(node):
                visit(c, (*path, jax.tree_util.SequenceKey(i)), holder, lead)

    visit(model, (), (None, None), 0)
    return targets


def _follow(node: Any, path: Sequence[Any]) -> Any:
    for entry in path:
        node = child(node, entry)
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
