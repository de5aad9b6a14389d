"""The optimizer: global-norm clipping, then AdamW with linear warm-up and cosine decay, weight
decay on kernels only (by the model family's mask where it has one)."""

from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import optax
from jaxtyping import PyTree

from ..models import ModelFamily
from .config import TrainConfig


# optimizer


def _last_attr_name(path: Sequence[Any]) -> str:
    for entry in reversed(path):
        if isinstance(entry, jax.tree_util.GetAttrKey):
            return entry.name
    return ""


def default_decay_mask(params: PyTree, *, decay_embedding: bool = False) -> PyTree:
    """The reference trainer's rule (docs/architecture.md, "Train step"): decay every array whose field name ends
    in `kernel` (dense, headwise, conv, recurrent kernels, stacked or not); the embedding table
    only if `decay_embedding`; never norm scales, biases, skips."""

    def rule(path: Sequence[Any], leaf: Any) -> bool:
        name = _last_attr_name(path)
        if name.endswith("kernel"):
            return True
        if "embedding" in name:
            return decay_embedding
        return False

    return jax.tree_util.tree_map_with_path(rule, params)


def _is_inexact_array_like(x: Any) -> bool:
    if isinstance(x, jax.ShapeDtypeStruct):
        return bool(jax.numpy.issubdtype(x.dtype, jax.numpy.inexact))
    return eqx.is_inexact_array(x)


def trainable_params(model: PyTree) -> PyTree:
    """The floating-point arrays of ``model`` (``None`` elsewhere). Also works on
    ``eqx.filter_eval_shape`` skeletons, so an optimizer and its state's shapes can be made
    without allocating the model."""
    return eqx.filter(model, _is_inexact_array_like)


def learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warmup from 0 to `lr`, then cosine decay to `lr * min_lr_ratio` at `steps`."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.lr,
        warmup_steps=cfg.resolved_warmup(),
        decay_steps=cfg.steps,
        end_value=cfg.lr * cfg.min_lr_ratio,
    )


def make_optimizer(
    cfg: TrainConfig, model: PyTree, model_config: Any = None, family: ModelFamily | None = None
) -> optax.GradientTransformation:
    """Clip by global norm, then AdamW with the warmup+cosine schedule and the decay mask."""
    params = trainable_params(model)
    mask = None
    if family is not None and family.decay_mask is not None:
        full = family.decay_mask(model, model_config)
        if full is not None:
            # The family's mask covers the whole model: keep its entries at trainable leaves.
            spec = jax.tree.map(_is_inexact_array_like, model)
            mask = jax.tree.map(lambda m, s: bool(m) if s else None, full, spec)
    if mask is None:
        decay_embedding = bool(getattr(model_config, "weight_decay_on_embedding", False))
        mask = default_decay_mask(params, decay_embedding=decay_embedding)
    chain = []
    if cfg.grad_clip is not None:
        chain.append(optax.clip_by_global_norm(cfg.grad_clip))
    chain.append(
        optax.adamw(
            learning_rate_schedule(cfg),
            b1=cfg.beta1,
            b2=cfg.beta2,
            eps=cfg.adam_eps,
            weight_decay=cfg.weight_decay,
            mask=mask,
        )
    )
    return optax.chain(*chain)


def _lr_at(schedule: optax.Schedule, count: int) -> float:
    with jax.numpy_dtype_promotion("standard"):
        return float(schedule(count))
