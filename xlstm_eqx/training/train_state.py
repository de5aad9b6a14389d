"""The state the steps start from: the model, the optimizer state, the jitted step, the step
count and the loop's key, built for a new run or read from a checkpoint on ``--resume``; with
``--mesh`` born sharded (or read straight into their shardings, whatever mesh saved them)."""

import dataclasses
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import optax
from jaxtyping import PRNGKeyArray, PyTree

from ..cell.autotune import tune_auto_backend
from ..models import MODEL_FAMILIES, ModelFamily
from ..parallel.placement import init_sharded, named_shardings
from ..parallel.rules import param_partition_specs
from .config import TrainConfig
from .finetune import LoRASettings, trainable_mask, with_finetuning
from .init_from import adapted_base, place_like
from .optim import make_optimizer, trainable_params
from .orbax_checkpoint import restore_newest_intact
from .prepare import PreparedRun
from .step import (
    MeshLayout,
    TrainStep,
    init_sharded_opt_state,
    make_train_step_for,
    mesh_layout,
    optimizer_and_step,
)


__all__ = ["TrainState", "init_train_state"]


@dataclasses.dataclass(frozen=True)
class TrainState:
    """Where the steps start: the model and optimizer state (built, or read on ``--resume``), the
    step that runs them, the step count so far and the loop's key; ``resumed`` is the checkpoint
    read (None: a new run) and ``damaged`` whether a newer damaged one was skipped.
    ``checkpoint_view`` is what of the model a checkpoint holds (None: all of it; a LoRA run
    from ``--init-from``: its trainable leaves, the rest ``None``)."""

    model: PyTree
    opt_state: PyTree
    step_fn: TrainStep
    start_step: int
    loop_key: PRNGKeyArray
    resumed: str | None = None
    damaged: bool = False
    checkpoint_view: Callable[[PyTree], PyTree] | None = None


def init_train_state(cfg: TrainConfig, prepared: PreparedRun) -> TrainState:
    """The model, optimizer state and step of the run: built, or read from the checkpoint on
    ``--resume``; with ``--mesh`` born sharded (or read straight into their shardings, whatever
    mesh saved them): no array is ever whole on one device."""
    family = MODEL_FAMILIES[prepared.kind]
    init_key, loop_key = jr.split(jr.key(cfg.seed))
    # Shapes only (nothing allocated): the optimizer, the layout on a mesh and the templates a
    # checkpoint is checked against and read into are all made from this skeleton.
    build = with_finetuning(family.build, LoRASettings.from_train_config(cfg))
    skeleton = eqx.filter_eval_shape(build, prepared.model_config, key=init_key)
    restored = None
    if cfg.mesh:
        model, opt_state, step_fn, restored = _state_on_mesh(
            cfg, prepared, family, skeleton, init_key
        )
    elif prepared.resume_from is not None:
        optimizer, step_fn = optimizer_and_step(cfg, skeleton, prepared.model_config, family)
        base = _base_for_resume(cfg, prepared)  # first: a moved or changed base fails early
        model_template = (
            skeleton if base is None else trainable_params(skeleton, cfg.trainable or None)
        )
        templates = {"model": model_template, "opt_state": _opt_skeleton(optimizer, skeleton, cfg)}
        restored = restore_newest_intact(prepared.resume_from, templates)
        model, opt_state = restored[0]["model"], restored[0]["opt_state"]
        model = model if base is None else eqx.combine(model, base)
    else:
        model = (
            build(prepared.model_config, key=init_key)
            if prepared.init is None
            else _from_init_source(cfg, prepared, family, init_key, None)
        )
        optimizer, step_fn = optimizer_and_step(cfg, model, prepared.model_config, family)
        with jax.numpy_dtype_promotion("standard"):
            opt_state = optimizer.init(trainable_params(model, cfg.trainable or None))
    # The "auto" mLSTM backend times its candidates now, not while the step compiles (GPU only).
    tokens = jax.ShapeDtypeStruct((cfg.batch_size, cfg.seq_len), jnp.int32)
    tune_auto_backend(lambda m, t: m(t), model, tokens)
    view = _checkpoint_view(cfg, prepared)
    if restored is None:
        return TrainState(model, opt_state, step_fn, 0, loop_key, checkpoint_view=view)
    _, meta, resumed, damaged = restored
    # A damaged newest checkpoint was skipped (with a warning): the run goes on from the one
    # read; the newer ones are moved aside, as the run will save those steps again.
    loop_key = jr.wrap_key_data(jnp.asarray(meta["rng_key"], jnp.uint32))
    damaged = bool(damaged or prepared.damaged)
    step = int(meta["step"])
    return TrainState(model, opt_state, step_fn, step, loop_key, resumed, damaged, view)


def _checkpoint_view(cfg: TrainConfig, prepared: PreparedRun) -> Callable[[PyTree], PyTree] | None:
    """A LoRA run from ``--init-from`` checkpoints its trainable leaves only and points at its
    base (the run's recorded source: `init_from.holds_trainable_only`); others the whole model."""
    if LoRASettings.from_train_config(cfg) is None or prepared.init_record is None:
        return None
    return lambda model: trainable_params(model, cfg.trainable or None)


def _base_for_resume(
    cfg: TrainConfig, prepared: PreparedRun, layout: MeshLayout | None = None
) -> PyTree | None:
    """``--resume`` of a run whose checkpoints hold only trainable leaves: the adapted base read
    again from its recorded source (`init_from.adapted_base`; on a mesh into its layout); None
    for the others."""
    settings = LoRASettings.from_train_config(cfg)
    if settings is None or prepared.init_record is None:
        return None
    config = prepared.model_config
    family = MODEL_FAMILIES[prepared.kind]
    base_shardings = _base_shardings(
        eqx.filter_eval_shape(family.build, config, key=jr.key(0)), layout
    )
    model = adapted_base(prepared.init_record, prepared.kind, config, settings, base_shardings)
    return model if layout is None else place_like(model, model, layout.model_shardings)


def _state_on_mesh(
    cfg: TrainConfig,
    prepared: PreparedRun,
    family: ModelFamily,
    skeleton: PyTree,
    init_key: PRNGKeyArray,
) -> tuple[PyTree, PyTree, TrainStep, Any]:
    """`init_train_state` with ``--mesh``: ``(model, opt_state, step, restored or None)``."""
    optimizer = make_optimizer(cfg, skeleton, prepared.model_config, family)
    base = getattr(prepared.model_config, "parallel", None)
    layout = mesh_layout(cfg.mesh, skeleton, optimizer, base=base, trainable=cfg.trainable or None)
    restored = None
    if prepared.resume_from is not None:
        base = _base_for_resume(cfg, prepared, layout)  # first: a moved base fails early
        saved, where = skeleton, layout.model_shardings
        if base is not None:  # only the trainable leaves were saved
            mask = trainable_mask(skeleton, cfg.trainable or None)
            saved, where = eqx.filter(skeleton, mask), eqx.filter(where, mask)
        restored = restore_newest_intact(
            prepared.resume_from,
            {"model": saved, "opt_state": _opt_skeleton(optimizer, skeleton, cfg)},
            {"model": where, "opt_state": layout.opt_shardings},
        )
        model, opt_state = restored[0]["model"], restored[0]["opt_state"]
        model = model if base is None else eqx.combine(model, base)
    elif prepared.init is not None:
        model = _from_init_source(cfg, prepared, family, init_key, layout)
        opt_state = init_sharded_opt_state(optimizer, model, layout)
    else:
        model = init_sharded(
            with_finetuning(family.build, LoRASettings.from_train_config(cfg)),
            prepared.model_config,
            key=init_key,
            mesh=layout.mesh,
            parallel_config=layout.parallel_config,
        )
        opt_state = init_sharded_opt_state(optimizer, model, layout)
    return (
        model,
        opt_state,
        make_train_step_for(layout, optimizer, loss_chunk_size=cfg.loss_chunk_size),
        restored,
    )


def _from_init_source(
    cfg: TrainConfig,
    prepared: PreparedRun,
    family: ModelFamily,
    key: PRNGKeyArray,
    layout: MeshLayout | None,
) -> PyTree:
    """``--init-from``: the source's weights (training/init_from.py), each leaf read straight
    into its sharding on a mesh; LoRA adapters, if any, added as to a new model (on a mesh: the
    base read into the base's layout, the adapters then placed by the adapted model's)."""
    assert prepared.init is not None
    base = eqx.filter_eval_shape(family.build, prepared.model_config, key=key)
    settings = LoRASettings.from_train_config(cfg)
    if settings is None:
        shardings = None if layout is None else layout.model_shardings
        return prepared.init.load(prepared.model_config, base, shardings)
    weights = prepared.init.load(prepared.model_config, base, _base_shardings(base, layout))
    model = with_finetuning(lambda config, *, key: weights, settings)(
        prepared.model_config, key=key
    )
    return model if layout is None else place_like(model, model, layout.model_shardings)


def _base_shardings(base: PyTree, layout: MeshLayout | None) -> PyTree | None:
    """The shardings of the base (not adapted) model ``base`` under ``layout``'s rules."""
    if layout is None:
        return None
    specs = param_partition_specs(
        base, layout.parallel_config, num_devices=layout.mesh.devices.size
    )
    return named_shardings(specs, layout.mesh)


def _opt_skeleton(
    optimizer: optax.GradientTransformation, skeleton: PyTree, cfg: TrainConfig
) -> PyTree:
    with jax.numpy_dtype_promotion("standard"):
        return jax.eval_shape(optimizer.init, trainable_params(skeleton, cfg.trainable or None))


# the hooks
