"""The optimizer: global-norm clipping, then AdamW, Lion or Adafactor from optax, with weight decay
on kernels only (by the model family's mask where it has one); and the learning-rate schedule.

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

from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import PyTree

from ..models import ModelConfig, ModelFamily
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


def make_optimizer(
    cfg: TrainConfig,
    model: PyTree,
    model_config: ModelConfig | None = None,
    family: ModelFamily | None = None,
) -> optax.GradientTransformation:
    """Clip by global norm, then `cfg.optimizer` (AdamW, Lion or Adafactor) with the schedule and
    the decay mask (decoupled weight decay, scaled by the learning rate, for all three)."""
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
    schedule = learning_rate_schedule(cfg)
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
    else:
        raise ValueError(f"TrainConfig.optimizer: unknown optimizer {cfg.optimizer!r}")
    chain.append(opt)
    return optax.chain(*chain)


def lr_at(schedule: optax.Schedule, count: int) -> float:
    with jax.numpy_dtype_promotion("standard"):
        return float(jnp.asarray(schedule(count)))
