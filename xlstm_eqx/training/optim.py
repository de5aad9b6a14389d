"""The optimizer: global-norm clipping, then AdamW, Lion, Adafactor or AdEMAMix from optax, with
weight decay on kernels only (by the model family's mask where it has one); and the learning-rate
schedule.

AdEMAMix (`optax.contrib.ademamix`, Pagliardini et al. 2024) adds a slow EMA of the gradients
(decay `beta3`) mixed into Adam's update with weight `alpha`. As in the reference trainer, `alpha`
rises linearly from 0 and `beta3` from `beta1` (linearly in the EMA's half-life) to their
configured values over `ademamix_warmup_steps` (default: the whole run); the slow EMA would
otherwise dominate the first steps' updates.

Schedules (`--schedule`), all after a linear warmup from 0 to `lr` over `warmup_steps`:

- `cosine` (default): cosine decay to `lr * min_lr_ratio` at `steps`.
- `linear`: linear decay to `lr * min_lr_ratio` at `steps`.
- `constant`: `lr` until the end.
- `wsd` (warmup-stable-decay): `lr` until the last `decay_fraction` of the steps, then linear decay
  to `lr * min_lr_ratio` at `steps`. The run saves a checkpoint where the decay starts
  (`DIR/wsd_decay_start/`).

Extending a run (`--resume --steps N` with N larger than before): `constant` continues at `lr`;
`cosine` and `linear` are stretched to the new length, so the learning rate at the resumed step is
the longer schedule's (higher than where a finished run ended: it jumps up); `wsd` restarts from
the checkpoint at the old decay start, where the learning rate was still `lr`, keeps it stable
until the new decay start and decays over the new run's last `decay_fraction`: no jump. The old
decay's metrics rows are replaced, its checkpoints moved to `DIR/superseded/`.
"""

import math
from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import PyTree

from ..models import ModelConfig, ModelFamily
from .config import TrainConfig
from .finetune import trainable_mask


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


def trainable_params(model: PyTree, pattern: str | None = None) -> PyTree:
    """The trainable arrays of ``model`` (``None`` elsewhere): every floating-point array, or
    the LoRA adapters of a LoRA model, or what ``pattern`` (``--trainable``) selects
    (`finetune.trainable_mask`). Also works on ``eqx.filter_eval_shape`` skeletons, so an
    optimizer and its state's shapes can be made without allocating the model."""
    return eqx.filter(model, trainable_mask(model, pattern))


def wsd_decay_start(cfg: TrainConfig) -> int:
    """The step after which a `wsd` schedule decays (the last stable step)."""
    decay = max(1, round(cfg.decay_fraction * cfg.steps))
    return max(cfg.resolved_warmup(), cfg.steps - decay)


def learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warmup from 0 to `lr`, then `cfg.schedule` (see the module docstring)."""
    warmup, peak, end = cfg.resolved_warmup(), cfg.lr, cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=peak,
            warmup_steps=warmup,
            decay_steps=cfg.steps,
            end_value=end,
        )
    ramp = optax.linear_schedule(0.0, peak, max(1, warmup))
    if cfg.schedule == "constant":
        return optax.join_schedules([ramp, optax.constant_schedule(peak)], [warmup])
    if cfg.schedule == "linear":
        decay = optax.linear_schedule(peak, end, max(1, cfg.steps - warmup))
        return optax.join_schedules([ramp, decay], [warmup])
    if cfg.schedule == "wsd":
        start = wsd_decay_start(cfg)
        decay = optax.linear_schedule(peak, end, max(1, cfg.steps - start))
        return optax.join_schedules([ramp, optax.constant_schedule(peak), decay], [warmup, start])
    raise ValueError(f"TrainConfig.schedule: unknown schedule {cfg.schedule!r}")


def ademamix_alpha_schedule(alpha: float, warmup: int) -> optax.Schedule:
    """`alpha` reached linearly from 0 over `warmup` steps (constant when `warmup` is 0)."""
    if warmup <= 0:
        return optax.constant_schedule(alpha)
    return optax.linear_schedule(0.0, alpha, warmup)


def ademamix_beta3_schedule(beta3: float, beta1: float, warmup: int) -> optax.Schedule:
    """`beta3` reached from `beta1` over `warmup` steps, linearly in the EMA's half-life
    `log(0.5) / log(beta) - 1` (as the AdEMAMix paper): the slow EMA's memory grows steadily."""
    if warmup <= 0 or beta3 <= beta1:
        return optax.constant_schedule(beta3)
    log_half = math.log(0.5)
    start, end = log_half / math.log(beta1) - 1.0, log_half / math.log(beta3) - 1.0

    def schedule(count: Any) -> Any:
        frac = jnp.minimum(jnp.asarray(count, jnp.float32) / warmup, 1.0)
        half_life = (1.0 - frac) * start + frac * end
        return jnp.power(0.5, 1.0 / (half_life + 1.0))

    return schedule


def make_optimizer(
    cfg: TrainConfig,
    model: PyTree,
    model_config: ModelConfig | None = None,
    family: ModelFamily | None = None,
) -> optax.GradientTransformation:
    """Clip by global norm, then `cfg.optimizer` (AdamW, Lion, Adafactor or AdEMAMix) with the
    schedule and the decay mask (decoupled weight decay, scaled by the learning rate, for all)."""
    params = trainable_params(model, cfg.trainable)
    mask = None
    if family is not None and family.decay_mask is not None:
        full = family.decay_mask(model, model_config)
        if full is not None:
            # The family's mask covers the whole model: keep its entries at trainable leaves.
            spec = trainable_mask(model, cfg.trainable)
            mask = jax.tree.map(lambda m, s: bool(m) if s else None, full, spec)
    if mask is None:
        decay_embedding = bool(getattr(model_config, "weight_decay_on_embedding", False))
        mask = default_decay_mask(params, decay_embedding=decay_embedding)
    chain = []
    if cfg.grad_clip is not None:
        chain.append(optax.clip_by_global_norm(cfg.grad_clip))
    chain.append(_optimizer(cfg, learning_rate_schedule(cfg), mask))
    return optax.chain(*chain)


def _optimizer(
    cfg: TrainConfig, schedule: optax.Schedule, mask: PyTree
) -> optax.GradientTransformation:
    """`cfg.optimizer` with the learning-rate schedule and the weight-decay mask."""
    if cfg.optimizer == "adamw":
        opt = optax.adamw(
            schedule,
            b1=cfg.beta1,
            b2=cfg.beta2,
            eps=cfg.adam_eps,
            weight_decay=cfg.weight_decay,
            mask=mask,
        )
    elif cfg.optimizer == "lion":
        opt = optax.lion(
            schedule, b1=cfg.beta1, b2=cfg.beta2, weight_decay=cfg.weight_decay, mask=mask
        )
    elif cfg.optimizer == "adafactor":
        # optax.adafactor's defaults (factored second moments, block-RMS clipping at 1, updates
        # relative to the parameter scale), with the weight decay scaled by the learning rate as
        # for the other two (optax.adafactor's own `weight_decay_rate` is not).
        opt = optax.chain(
            optax.scale_by_factored_rms(),
            optax.clip_by_block_rms(1.0),
            optax.scale_by_param_block_rms(),
            optax.add_decayed_weights(cfg.weight_decay, mask),
            optax.scale_by_learning_rate(schedule),
        )
    elif cfg.optimizer == "ademamix":
        warmup = cfg.steps if cfg.ademamix_warmup_steps is None else cfg.ademamix_warmup_steps
        opt = optax.contrib.ademamix(
            schedule,
            b1=cfg.beta1,
            b2=cfg.beta2,
            b3=ademamix_beta3_schedule(cfg.beta3, cfg.beta1, warmup),
            alpha=ademamix_alpha_schedule(cfg.alpha, warmup),
            eps=cfg.adam_eps,
            weight_decay=cfg.weight_decay,
            mask=mask,
        )
    else:
        raise ValueError(f"TrainConfig.optimizer: unknown optimizer {cfg.optimizer!r}")
    return opt


def lr_at(schedule: optax.Schedule, count: int) -> float:
    with jax.numpy_dtype_promotion("standard"):
        return float(jnp.asarray(schedule(count)))
