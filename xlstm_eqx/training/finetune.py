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
    "FinetuneMemory",
    "finetune_memory",
    "LoRASettings",
    "add_lora",
    "has_lora",
    "merge_lora",
    "param_path",
    "strip_lora",
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

    @classmethod
    def from_run_config(cls, run: dict[str, Any]) -> "LoRASettings | None":
        """The settings a run was trained with (its recorded ``train`` fields; None: no LoRA),
        so its checkpoints, which hold the adapted model, are read into the right skeleton."""
        train = run.get("train")
        if not isinstance(train, dict):
            return None
        rank = train.get("lora_rank") or 0
        if not isinstance(rank, int) or rank <= 0:
            return None
        alpha = train.get("lora_alpha")
        targets = tuple(train.get("lora_targets") or ()) or DEFAULT_LORA_TARGETS
        dtype = str(train.get("lora_base_dtype") or "float32")
        return cls(rank, float(rank if alpha is None else alpha), targets, dtype)


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


def strip_lora(model: PyTree) -> PyTree:
    """``model`` without its adapters: the base it was adapted from (base arrays as stored)."""
    return jax.tree.map(
        lambda x: x.without_adapter() if isinstance(x, _LORA_LAYERS) else x,
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


# memory of full vs LoRA fine-tuning (`xlstm-eqx info --lora-rank`)


@dataclasses.dataclass(frozen=True)
class FinetuneMemory:
    """Bytes per device of a train step's state, full fine-tuning vs LoRA (AdamW: two float32
    moments per trainable scalar; gradients float32 for the trainable leaves only). The base's
    parameters are sharded as the mesh shards them (``param_bytes_per_device``, float32); the
    adapters are replicated (`nn.lora`: their axes are REPLICATED); activations are the same
    for both (the backward still runs through every layer)."""

    rank: int
    base_dtype: str
    num_params: int
    num_adapter_params: int
    param_bytes_per_device: int
    activation_bytes: int = 0

    @property
    def full_bytes(self) -> int:
        """Parameters + gradients + two moments, all float32 and sharded."""
        return 4 * self.param_bytes_per_device + self.activation_bytes

    @property
    def lora_bytes(self) -> int:
        """The frozen base (in ``base_dtype``) + the adapters with their gradients and moments."""
        base = self.param_bytes_per_device * jnp.dtype(self.base_dtype).itemsize // 4
        return base + 4 * 4 * self.num_adapter_params + self.activation_bytes

    def lines(self, device_memory_gib: float | None = None) -> list[str]:
        share = self.num_adapter_params / max(1, self.num_params)
        act = " + activations" if self.activation_bytes else ""
        rows = [
            f"fine-tuning per device (params + grads + AdamW{act}):",
            f"  full:        {_gib(self.full_bytes)}",
            f"  LoRA r={self.rank}:  {_gib(self.lora_bytes)} (base {self.base_dtype}, frozen; "
            f"{self.num_adapter_params:,} adapter parameters = {share:.3%} of "
            f"{self.num_params:,}, replicated)",
        ]
        if device_memory_gib is not None:
            budget = device_memory_gib * 2**30
            for name, total in (("full", self.full_bytes), ("LoRA", self.lora_bytes)):
                verdict = "fits" if total <= budget else "does NOT fit"
                rows.append(f"  {name} {verdict} in {device_memory_gib:g} GiB")
        return rows


def _gib(n: int) -> str:
    return f"{n / 2**30:,.2f} GiB"


def finetune_memory(
    skeleton: PyTree,
    settings: LoRASettings,
    param_bytes_per_device: int,
    activation_bytes: int = 0,
) -> FinetuneMemory:
    """`FinetuneMemory` of a model skeleton (``eqx.filter_eval_shape`` of its build: nothing is
    allocated) with ``settings``' adapters."""
    adapted = eqx.filter_eval_shape(add_lora, skeleton, settings, jr.key(0))
    total = sum(int(x.size) for x in jax.tree.leaves(adapted) if _is_float_leaf(x))
    adapters = trainable_count(adapted)
    return FinetuneMemory(
        rank=settings.rank,
        base_dtype=settings.base_dtype,
        num_params=total - adapters,
        num_adapter_params=adapters,
        param_bytes_per_device=param_bytes_per_device,
        activation_bytes=activation_bytes,
    )
