"""`count_params`: the number of parameters of a model or of an `eqx.filter_eval_shape`
skeleton, leaving out the non-trainable buffers a module lists in ``_buffer_fields``.
"""

import math
from typing import Any

import equinox as eqx
import jax
import numpy as np
from jaxtyping import PyTree


# parameter counting


def _param_leaves(tree: Any) -> list[Any]:
    """Array leaves of ``tree`` that are parameters: every array (or ``ShapeDtypeStruct``) except
    the fields that a module names in its class attribute ``_buffer_fields`` (non-trainable
    buffers, e.g. a RoPE table)."""
    out: list[Any] = []

    def visit(node: Any) -> None:
        if isinstance(node, eqx.Module):
            skip = set(getattr(type(node), "_buffer_fields", ()))
            for name, value in vars(node).items():
                if name in skip:
                    continue
                visit(value)
            return
        if isinstance(node, jax.Array | np.ndarray | jax.ShapeDtypeStruct):
            out.append(node)
            return
        if node is None or isinstance(node, str | int | float | bool | complex):
            return
        if isinstance(node, list | tuple | dict) or _is_pytree_node(node):
            children = jax.tree_util.tree_leaves(
                node, is_leaf=lambda n: n is not node and isinstance(n, eqx.Module)
            )
            for child in children:
                visit(child)

    visit(tree)
    return out


def _is_pytree_node(node: Any) -> bool:
    leaves = jax.tree_util.tree_leaves(node)
    return not (len(leaves) == 1 and leaves[0] is node)


def count_params(model: PyTree) -> int:
    """Number of parameters (array elements) of a model, buffers excluded.

    Works on real models and on ``eqx.filter_eval_shape`` skeletons (``ShapeDtypeStruct``
    leaves). A module marks non-trainable arrays by listing their field names in a class
    attribute ``_buffer_fields: ClassVar[tuple[str, ...]]``.
    """
    return int(sum(math.prod(leaf.shape) for leaf in _param_leaves(model)))
