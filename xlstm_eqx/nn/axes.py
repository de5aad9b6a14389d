"""Logical axis names of parameters: where a module creates an array, it declares what each of
the array's axes is (``("embed", "mlp")`` for an up-projection kernel, ``("vocab", "embed")`` for
the embedding table, …) or that the array is `REPLICATED` over tensor parallelism. The parallel
layer turns these names into ``PartitionSpec``s through one mapping (``parallel.rules``,
``LOGICAL_AXIS_RULES``); the modules themselves know nothing about meshes.

The declaration of an array field ``name`` is the static field (or class attribute)
``name_axes`` of the module that owns it. On a sub-module field it names the stacked leading axes
that the sub-module's arrays carry when it was created vmapped (``("layers",)`` for scanned
blocks). Declarations are static, so the pytree leaves and their paths do not change.
See docs/architecture.md, "Logical axes".
"""

from typing import Literal


#: The whole array is replicated over tensor parallelism (FSDP may still split it, by size).
REPLICATED: Literal["replicated"] = "replicated"


#: One name per axis of the array (per layer: without stacked leading axes), or `REPLICATED`.
LogicalAxes = tuple[str, ...] | Literal["replicated"]


#: The LM head kernel ``(D, V)``; its first axis also names the final norm's ``(D,)``.
LM_HEAD_AXES: tuple[str, str] = ("lm_head_embed", "lm_head_vocab")


def axes_field_name(field: str) -> str:
    """The name of the static field that declares the logical axes of ``field``."""
    return f"{field}_axes"
