"""Context parallelism: the sequence split over the ``cp`` mesh axis (docs/architecture.md,
"Context parallelism").

`context_parallel(model, mesh, parallel_config)` wraps a model so that its forward pass runs in a
`jax.shard_map` that is manual over ``cp`` only: each device gets its segment of the sequence
``(B, S / cp)`` of the inputs (tokens and the per-token arguments: document borders, positions)
and the model's sequence-mixing layers exchange what crosses segments over the axis themselves
(the mLSTM's small states, the conv's halo, attention's keys and values). The other axes stay
``Auto``: the parameters keep their FSDP and tensor-parallel layouts and GSPMD their collectives.
The weights enter replicated over ``cp``, so their gradients are summed over it (the transpose of
an unmapped input). The logits leave split over ``cp`` along the sequence; the loss outside is
the usual global mean (GSPMD reduces over every axis).

The layers learn the axis from `with_context_parallel`: every module with a static field named
``context_axis`` (`CONTEXT_AXIS_FIELD`) gets the axis name there, and runs its cp path when it is
set (it is only ever set inside the shard_map).
"""

import copy
import dataclasses
from typing import Any

import equinox as eqx
import jax
import jax.random as jr
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jaxtyping import Array, Float, Int, PRNGKeyArray

from ..core.parallel_config import ParallelConfig
from .mesh import context_size


#: The static field a sequence-mixing module declares to receive the cp axis name (None: off).
CONTEXT_AXIS_FIELD = "context_axis"


def check_sequence_split(
    seq_len: int, cp: int, axis_name: str = "cp", *, name: str = "sequence length S"
) -> None:
    """Raise a ``ValueError`` naming ``name`` unless the model's sequence length ``seq_len``
    splits into ``cp`` equal segments (one per device of the context-parallel axis)."""
    if cp > 1 and seq_len % cp != 0:
        example = seq_len // cp * cp or cp
        raise ValueError(
            f"{name} = {seq_len} is not divisible by the context-parallel size {axis_name}={cp} "
            f"(each device holds S / {cp} tokens); use a multiple of {cp}, e.g. {example}"
        )


def _replace_fields(module: eqx.Module, changes: dict[str, Any]) -> eqx.Module:
    """``module`` with the fields ``changes`` replaced (the same leaves otherwise), built as
    Equinox's ``tree_unflatten`` builds a module (a new object, each field set with
    ``object.__setattr__``), then put through what Equinox does after ``__init__``: a changed
    field's converter, and every ``__check_init__`` of the module's classes.

    Neither ``eqx.tree_at`` (a static field is not a pytree node; it runs no ``__init__`` or
    ``__check_init__`` either) nor ``dataclasses.replace`` (the modules' ``__init__(config, *,
    key)`` would build new weights) can set a static field of a built module."""
    out = copy.copy(module)
    fields = {f.name: f for f in dataclasses.fields(module)}
    for name, value in changes.items():
        converter = fields[name].metadata.get("converter")
        object.__setattr__(out, name, value if converter is None else converter(value))
    for cls in type(out).__mro__:
        check = cls.__dict__.get("__check_init__")
        if check is not None:
            check(out)
    return out


def _with_axis(node: Any, axis_name: str | None, found: list[str]) -> Any:
    if isinstance(node, eqx.Module):
        changes: dict[str, Any] = {}
        for f in dataclasses.fields(node):
            value = getattr(node, f.name)
            if f.name == CONTEXT_AXIS_FIELD:
                found.append(type(node).__name__)
                if value != axis_name:
                    changes[f.name] = axis_name
            elif not f.metadata.get("static", False):
                new = _with_axis(value, axis_name, found)
                if new is not value:
                    changes[f.name] = new
        return _replace_fields(node, changes) if changes else node
    if isinstance(node, (list, tuple)) and not hasattr(node, "_fields"):
        items = [_with_axis(x, axis_name, found) for x in node]
        if all(a is b for a, b in zip(items, node, strict=True)):
            return node
        return type(node)(items)
    return node


def with_context_parallel(model: Any, axis_name: str | None) -> Any:
    """``model`` with ``context_axis = axis_name`` on every module that declares that static
    field (the same arrays: pytree leaves and paths unchanged); ``None`` turns the cp paths off.
    Raises a ``ValueError`` when ``axis_name`` is set and no module of the model declares the
    field (a model without a context-parallel path would compute each segment on its own)."""
    found: list[str] = []
    out = _with_axis(model, axis_name, found)
    if axis_name is not None and not found:
        raise ValueError(
            f"{type(model).__name__} has no context-parallel path (no module declares a "
            f"'{CONTEXT_AXIS_FIELD}' field), so it cannot run on a mesh with a '{axis_name}' "
            "axis; use the data, fsdp or tp axes instead"
        )
    return out


class ContextParallel(eqx.Module):
    """A model run with its sequence split over the ``axis_name`` mesh axis (`context_parallel`).

    ``wrapper(tokens (B, S), *, key=None, **per_token) -> logits (B, S, V)`` with the same call
    as the model; ``per_token`` arguments of shape ``(B, S)`` (``document_borders``,
    ``positions``) are split like the tokens, None ones are left out. Used transiently inside a
    loss (like FSDP's gather-at-use); never stored."""

    model: Any
    mesh: Mesh = eqx.field(static=True)
    axis_name: str = eqx.field(static=True)
    batch_axes: tuple[str, ...] = eqx.field(static=True)

    def __call__(
        self, tokens: Int[Array, "B S"], *, key: PRNGKeyArray | None = None, **per_token: Any
    ) -> Float[Array, "B S V"]:
        axis = self.axis_name
        check_sequence_split(tokens.shape[1], int(self.mesh.shape[axis]), axis)
        split = NamedSharding(self.mesh, P(self.batch_axes, axis))
        per_token = {k: v for k, v in per_token.items() if v is not None}
        tokens, per_token = jax.lax.with_sharding_constraint((tokens, per_token), split)
        params, static = eqx.partition(with_context_parallel(self.model, axis), eqx.is_array)

        def segment(params: Any, tokens: Array, per_token: dict[str, Array], *key: Any) -> Array:
            model = eqx.combine(params, static)
            # each segment its own dropout masks
            seg_key = jr.fold_in(key[0], jax.lax.axis_index(axis)) if key else None
            return model(tokens, key=seg_key, **per_token)

        seq = P(None, axis)
        keys = () if key is None else (key,)
        run = jax.shard_map(
            segment,
            mesh=self.mesh,
            in_specs=(P(), seq, seq, *(P() for _ in keys)),
            out_specs=seq,
            axis_names={axis},
            # The cell forms' and norms' custom VJPs return cotangents of the replicated weights
            # that vary over cp, which the varying-manual-axes check rejects; without it, the
            # transpose of the replicated weights still sums their cotangents over cp.
            check_vma=False,
        )
        return run(params, tokens, per_token, *keys)


def context_parallel(model: Any, mesh: Mesh, parallel_config: ParallelConfig) -> Any:
    """``model`` wrapped to run with its sequence split over the mesh's context-parallel axis
    (`ContextParallel`); ``model`` itself when the mesh has no such axis or it has size 1."""
    pc = parallel_config
    if context_size(mesh, pc) <= 1:
        return model
    return ContextParallel(
        model, mesh, pc.context_axis_name, (pc.data_axis_name, pc.fsdp_axis_name)
    )
