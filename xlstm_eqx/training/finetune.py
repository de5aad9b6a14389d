"""Fine-tuning: which parameters train (``--trainable REGEX``, LoRA adapters), adding LoRA
adapters to a model (``--lora-rank/--lora-alpha/--lora-targets/--lora-base-dtype``), merging
them back, and the memory of full vs LoRA fine-tuning for ``info``.

Parameter paths are the checkpoints' names: the attribute path joined by dots, e.g.
``xlstm_block_stack.blocks.xlstm_res_block.layer.dense_v.kernel``. A LoRA model keeps the base's
paths and adds ``...dense_v.lora_a`` / ``...dense_v.lora_b`` (`xlstm_eqx.nn.lora`).
"""

import dataclasses
import re
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import PRNGKeyArray, PyTree

from ..models import ModelConfig
from ..nn.linear import Dense, DenseGeneral, LinearHeadwiseExpand
from ..nn.lora import LoRADense, LoRADenseGeneral, LoRAHeadwise, lora_adapted
from ..xlstm.slstm import sLSTMLayer


__all__ = [
    "DEFAULT_LORA_TARGETS",
    "LoRASettings",
    "add_lora",
    "has_lora",
    "merge_lora",
    "param_path",
    "trainable_mask",
    "trainable_count",
    "with_finetuning",
]

#: The projection layers LoRA adapts by default, by field name: mlstm_v1 (q/k/v, output gate,
#: input/forget gates, down projection), mlstm (up projections, headwise q/k/v, gates, down
#: projection), the FFNs (up, gate, down) and Llama attention (q/k/v/out). sLSTM layers are
#: never adapted; an embedding or LM head never either.
DEFAULT_LORA_TARGETS: tuple[str, ...] = (
    "dense_q",
    "dense_k",
    "dense_v",
    "dense_o",
    "igate",
    "fgate",
    "q_proj",
    "k_proj",
    "qk_proj",
    "v_proj",
    "proj_up_mlstm",
    "proj_up_z",
    "proj_up",
    "proj_up_gate",
    "proj_down",
    "dense_out",
)

_BASE_LAYERS = (Dense, DenseGeneral, LinearHeadwiseExpand)
_LORA_LAYERS = (LoRADense, LoRADenseGeneral, LoRAHeadwise)


@dataclasses.dataclass(frozen=True)
class LoRASettings:
    """Rank, alpha (scale = alpha / rank), the target field names and the stored dtype of the
    frozen base's arrays."""

    rank: int
    alpha: float
    targets: tuple[str, ...] = DEFAULT_LORA_TARGETS
    base_dtype: str = "float32"

    @classmethod
    def from_train_config(cls, cfg: Any) -> "LoRASettings | None":
        """The settings of ``cfg`` (a `TrainConfig`), None without ``--lora-rank``."""
        if not cfg.lora_rank:
            return None
        alpha = float(cfg.lora_rank if cfg.lora_alpha is None else cfg.lora_alpha)
        targets = tuple(cfg.lora_targets) or DEFAULT_LORA_TARGETS
        return cls(int(cfg.lora_rank), alpha, targets, cfg.lora_base_dtype)


def param_path(path: Sequence[Any]) -> str:
    """A parameter's checkpoint name: its key path joined by dots."""
    return jax.tree_util.keystr(tuple(path), simple=True, separator=".")


def _field_name(path: Sequence[Any]) -> str:
    if path and isinstance(path[-1], jax.tree_util.GetAttrKey):
        return str(path[-1].name)
    return ""


def add_lora(model: PyTree, settings: LoRASettings, key: PRNGKeyArray) -> PyTree:
    """``model`` with a LoRA adapter on every projection layer whose field name is in
    ``settings.targets`` (outside sLSTM layers); the frozen base's arrays stored in
    ``settings.base_dtype``. Each adapter's key is folded from its path, so the same model and
    key give the same adapters. A target that names no layer is an error naming it."""
    found: set[str] = set()

    def adapt(path: Sequence[Any], node: Any) -> Any:
        name = _field_name(path)
        if isinstance(node, _BASE_LAYERS) and name in settings.targets:
            found.add(name)
            layer_key = jr.fold_in(key, zlib.crc32(param_path(path).encode()))
            return lora_adapted(node, rank=settings.rank, alpha=settings.alpha, key=layer_key)
        return node

    def stop(x: Any) -> bool:
        return isinstance(x, _BASE_LAYERS + (sLSTMLayer,))

    adapted = jax.tree_util.tree_map_with_path(adapt, model, is_leaf=stop)
    missing = [t for t in settings.targets if t not in found]
    if missing and settings.targets != DEFAULT_LORA_TARGETS:
        raise ValueError(
            f"--lora-targets: {missing} name no projection layer of the model; layers found: "
            f"{sorted(found) or 'none'} (choices: {', '.join(DEFAULT_LORA_TARGETS)})"
        )
    if not found:
        raise ValueError("--lora-rank: the model has no projection layer LoRA can adapt")
    if settings.base_dtype == "float32":
        return adapted
    base_dtype = jnp.dtype(settings.base_dtype)
    mask = trainable_mask(adapted)

    def cast(x: Any, train: bool) -> Any:
        if not train and eqx.is_inexact_array(x):
            return x.astype(base_dtype)
        return x

    return jax.tree.map(cast, adapted, mask)


def has_lora(model: PyTree) -> bool:
    """Whether ``model`` holds a LoRA adapter."""
    leaves = jax.tree.leaves(model, is_leaf=lambda x: isinstance(x, _LORA_LAYERS))
    return any(isinstance(x, _LORA_LAYERS) for x in leaves)


def merge_lora(model: PyTree) -> PyTree:
    """``model`` with every adapter folded into its kernel (``W + alpha/r · A B``): the plain
    base architecture, whose paths and shapes a base checkpoint has."""
    return jax.tree.map(
        lambda x: x.merged() if isinstance(x, _LORA_LAYERS) else x,
        model,
        is_leaf=lambda x: isinstance(x, _LORA_LAYERS),
    )


def _is_float_leaf(x: Any) -> bool:
    if isinstance(x, jax.ShapeDtypeStruct):
        return bool(jnp.issubdtype(x.dtype, jnp.inexact))
    return eqx.is_inexact_array(x)


def trainable_mask(model: PyTree, pattern: str | None = None) -> PyTree:
    """A bool per leaf of ``model`` (real or an ``eqx.filter_eval_shape`` skeleton): which
    floating-point arrays train. Without LoRA and ``pattern``: all of them. With LoRA: the
    adapters. ``pattern`` (``--trainable``, a regex searched in each `param_path`) adds those
    it matches (without LoRA: only those); one that matches no parameter is an error naming it."""
    lora = has_lora(model)
    regex = None
    if pattern:
        try:
            regex = re.compile(pattern)
        except re.error as e:
            raise ValueError(f"--trainable: {pattern!r} is not a regular expression: {e}") from e

    def rule(path: Sequence[Any], x: Any) -> bool:
        if not _is_float_leaf(x):
            return False
        if regex is not None and regex.search(param_path(path)):
            return True
        if lora:
            return _field_name(path) in ("lora_a", "lora_b")
        return regex is None

    mask = jax.tree_util.tree_map_with_path(rule, model)
    if regex is not None:
        names = [param_path(p) for p, x in jax.tree_util.tree_leaves_with_path(model)]
        if not any(regex.search(n) for n in names if n):
            example = names[0] if names else "none"
            raise ValueError(
                f"--trainable: {pattern!r} matches no parameter path (paths look like {example!r})"
            )
    return mask


def trainable_count(model: PyTree, pattern: str | None = None) -> int:
    """The number of trainable scalars of ``model`` (`trainable_mask`)."""
    mask = trainable_mask(model, pattern)
    sizes = jax.tree.map(lambda x, m: int(x.size) if m else 0, model, mask)
    return int(sum(jax.tree.leaves(sizes)))


def with_finetuning(build: Callable[..., Any], settings: LoRASettings | None) -> Callable[..., Any]:
    """``build(config, key=...)`` followed by `add_lora` (the identity without settings); the
    adapters' key is split off the build key. Works under ``eqx.filter_eval_shape`` and sharded
    init, so a LoRA model is built like any other."""
    if settings is None:
        return build

    def build_with_lora(config: ModelConfig, *, key: PRNGKeyArray) -> Any:
        model_key, lora_key = jr.split(key)
        return add_lora(build(config, key=model_key), settings, lora_key)

    return build_with_lora
