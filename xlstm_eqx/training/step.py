"""The train step — one function for one device and for a mesh — and the set-up that places a
model and its optimizer state on a mesh for it."""

import dataclasses
import functools
import json
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jaxtyping import Array, Float, PRNGKeyArray, PyTree

from ..core.parallel_config import ParallelConfig
from ..data.batch import TokenBatch, batch_tokens, map_batch
from ..models import ModelConfig, ModelFamily
from ..parallel.context import check_sequence_split, context_parallel
from ..parallel.fsdp import gather_at_use
from ..parallel.mesh import context_size, make_mesh, parse_mesh_spec
from ..parallel.placement import (
    batch_sharding,
    named_shardings,
    place,
    place_global,
    shard_model,
    shard_opt_state,
)
from ..parallel.rules import opt_state_specs, param_partition_specs
from .config import TrainConfig
from .finetune import trainable_mask
from .loss import next_token_loss
from .optim import make_optimizer, trainable_params


def _loss_and_grads(
    loss_and_grad: Callable[..., Any], model: PyTree, batch: Any, key: PRNGKeyArray
) -> tuple[Float[Array, ""], PyTree]:
    """Mean loss and gradients over the ``A`` micro-batches of ``batch`` ``(A, B, S+1)`` (an
    array, or a `TokenBatch` of such arrays): one ``lax.scan`` that sums them, so memory stays
    that of one micro-batch."""
    A = batch_tokens(batch).shape[0]
    keys = jr.split(key, A)
    if A == 1:
        return loss_and_grad(model, map_batch(lambda x: x[0], batch), keys[0])
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def micro(carry: Any, xs: Any) -> Any:
        gsum, lsum = carry
        mb, k = xs
        loss_i, g = loss_and_grad(eqx.combine(params, static), mb, k)
        g = eqx.filter(g, eqx.is_inexact_array)
        return (jax.tree.map(jnp.add, gsum, g), lsum + loss_i), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    (gsum, lsum), _ = jax.lax.scan(micro, (zeros, jnp.zeros((), jnp.float32)), (batch, keys))
    return lsum / A, jax.tree.map(lambda g: g / A, gsum)


@dataclasses.dataclass(frozen=True)
class TrainStep:
    """``step((batch, key), model, opt_state) -> (model, opt_state, loss, grad_norm)``, made by
    `make_train_step`: the jitted ``core`` and, on a mesh, where its inputs go.

    ``core`` is the jitted function (donates the model and optimizer state; ``core.lower(...)``
    compiles it ahead). Without a mesh every sharding is ``None`` and the step is ``core`` itself.
    With one, ``place_inputs`` puts the host batch onto ``batch_sharding`` (split over
    ``(dp, fsdp)``; every process passes the same global batch), the key replicated, and the model
    and optimizer state onto their shardings (a no-op when already there); the batch loader places
    batches onto ``batch_sharding`` ahead of the step.
    """

    core: Callable[..., Any]
    mesh: Mesh | None = None
    parallel_config: ParallelConfig | None = None
    model_shardings: PyTree = None
    opt_shardings: PyTree = None
    batch_sharding: NamedSharding | None = None

    def place_inputs(self, inputs: Any, model: PyTree, opt_state: PyTree) -> tuple[Any, Any, Any]:
        """The step's arguments placed on the mesh (as they are without one)."""
        mesh, batch_sh = self.mesh, self.batch_sharding
        if mesh is None or self.parallel_config is None or batch_sh is None:
            return inputs, model, opt_state
        batch, key = inputs
        _check_batch(batch, mesh, self.parallel_config)
        key_data = place_global(np.asarray(jax.random.key_data(key)), NamedSharding(mesh, P()))
        inputs = (map_batch(lambda x: place_global(x, batch_sh), batch), key_data)
        return inputs, place(model, self.model_shardings), place(opt_state, self.opt_shardings)

    def __call__(self, inputs: Any, model: PyTree, opt_state: PyTree) -> Any:
        return self.core(*self.place_inputs(inputs, model, opt_state))

    def lower(self, inputs: Any, model: PyTree, opt_state: PyTree) -> Any:
        """``core.lower`` of the placed arguments (``.compile()`` it to measure the step)."""
        return self.core.lower(*self.place_inputs(inputs, model, opt_state))


def _check_batch(batch: Any, mesh: Mesh, pc: ParallelConfig) -> None:
    if isinstance(batch, TokenBatch) and len({np.shape(x) for x in batch}) != 1:
        shapes = {name: np.shape(x) for name, x in zip(batch._fields, batch, strict=True)}
        raise ValueError(f"a TokenBatch's fields must have one shape, got {shapes}")
    batch = batch_tokens(batch)
    if np.ndim(batch) != 3:
        raise ValueError(
            f"batch must be (A, B, S+1) micro-batches of tokens, got shape {np.shape(batch)}"
        )
    data = mesh.shape[pc.data_axis_name] * mesh.shape[pc.fsdp_axis_name]
    if np.shape(batch)[1] % data != 0:
        raise ValueError(
            f"batch size {np.shape(batch)[1]} is not divisible by the data-parallel size "
            f"{pc.data_axis_name}×{pc.fsdp_axis_name} = {data} of the mesh {dict(mesh.shape)}"
        )
    seq_plus_one = np.shape(batch)[2]
    what = f"sequence length S (the batch's S+1 = {seq_plus_one} tokens minus one)"
    check_sequence_split(seq_plus_one - 1, context_size(mesh, pc), pc.context_axis_name, name=what)


def make_train_step(
    optimizer: optax.GradientTransformation,
    *,
    mesh: Mesh | None = None,
    parallel_config: ParallelConfig | None = None,
    model_specs: PyTree = None,
    opt_specs: PyTree = None,
    return_grads: bool = False,
    trainable: str | None = None,
    loss_chunk_size: int | None = None,
) -> TrainStep:
    """The one train step (a `TrainStep`), on one device or (with ``mesh``) on a mesh.

    ``batch`` is ``(A, B, S+1)``: A micro-batches whose gradients are averaged. The step takes the
    mean next-token loss, the global gradient norm and the optax update (under standard dtype
    promotion: optax mixes Python floats with int32 step counts). The jitted core donates the model
    and optimizer state; ``return_grads=True`` also returns the averaged gradients.
    Gradients are taken only for the trainable leaves (`trainable_mask`: all floating-point
    arrays, or LoRA adapters, or ``trainable``'s matches), whose optimizer state it updates; the
    frozen leaves pass through unchanged (the optimizer state has none for them).
    ``loss_chunk_size`` (`TrainConfig.loss_chunk_size`): when the LM head and cross-entropy run
    in chunks of the sequence (`loss_chunk_tokens`; None: for large vocabularies).

    With a ``mesh`` (and the ``parallel_config``, ``model_specs`` and ``opt_specs`` it was laid
    out with) the step places its inputs itself (`TrainStep.place_inputs`). Inside, the layouts
    are pinned with ``eqx.filter_shard`` so they are the same after every step, and under FSDP the
    weights are gathered at use, per layer (``gather_at_use``).
    """
    loss = functools.partial(next_token_loss, chunk_size=loss_chunk_size)
    if mesh is None:
        layout = TrainStep(core=_no_step)
        return TrainStep(_jitted_step(optimizer, loss, layout, return_grads, trainable))
    if parallel_config is None or model_specs is None or opt_specs is None:
        raise ValueError("make_train_step: a mesh needs parallel_config, model_specs, opt_specs")
    pc = parallel_config
    layout = TrainStep(
        core=_no_step,
        mesh=mesh,
        parallel_config=pc,
        model_shardings=named_shardings(model_specs, mesh),
        opt_shardings=named_shardings(opt_specs, mesh),
        batch_sharding=batch_sharding(mesh, pc, leading=1),
    )

    def loss_fn(model: Any, tokens: Any, key: PRNGKeyArray) -> Float[Array, ""]:
        # FSDP weights gathered at use; on a cp mesh the forward runs split over the sequence
        gathered = gather_at_use(model, model_specs, mesh, pc)
        return loss(context_parallel(gathered, mesh, pc), tokens, key)

    core = _jitted_step(optimizer, loss_fn, layout, return_grads, trainable)
    return dataclasses.replace(layout, core=core)


def _no_step(*args: Any) -> Any:
    raise NotImplementedError("a layout only")


def _jitted_step(
    optimizer: optax.GradientTransformation,
    loss_fn: Callable[..., Any],
    layout: TrainStep,
    return_grads: bool,
    trainable: str | None = None,
) -> Callable[..., Any]:
    """The jitted update of `make_train_step`, its layouts pinned to ``layout``'s shardings
    (none without a mesh); differentiated and updated are the trainable leaves only."""

    def loss_of_params(params: Any, tokens: Any, key: PRNGKeyArray, frozen: Any) -> Any:
        return loss_fn(eqx.combine(params, frozen), tokens, key)

    loss_and_grad_params = eqx.filter_value_and_grad(loss_of_params)
    model_sh, opt_sh, batch_sh = layout.model_shardings, layout.opt_shardings, layout.batch_sharding

    def pin(tree: PyTree, shardings: PyTree) -> PyTree:
        return tree if shardings is None else eqx.filter_shard(tree, shardings)

    @eqx.filter_jit(donate="all-except-first")
    def core(inputs: Any, model: Any, opt_state: Any) -> Any:
        batch, key = inputs
        if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
            key = jr.wrap_key_data(key)  # placed on a mesh as raw key data
        if batch_sh is not None:
            batch = jax.lax.with_sharding_constraint(batch, batch_sh)
        model, opt_state = pin(model, model_sh), pin(opt_state, opt_sh)
        mask = trainable_mask(model, trainable)
        params, frozen = eqx.partition(model, mask)
        loss_and_grad = functools.partial(_with_frozen, loss_and_grad_params, frozen=frozen)
        loss, grads = _loss_and_grads(loss_and_grad, params, batch, key)
        grads = pin(grads, None if model_sh is None else eqx.filter(model_sh, mask))
        grad_norm = optax.tree.norm(grads)
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = optimizer.update(grads, opt_state, params)
        model = eqx.combine(eqx.apply_updates(params, updates), frozen)
        model, opt_state = pin(model, model_sh), pin(opt_state, opt_sh)
        if return_grads:
            return model, opt_state, loss, grad_norm, grads
        return model, opt_state, loss, grad_norm

    return core


def _with_frozen(
    loss_and_grad: Callable[..., Any], params: Any, tokens: Any, key: PRNGKeyArray, frozen: Any
) -> Any:
    # tokens: a (B, S+1) int array or a TokenBatch of them
    return loss_and_grad(params, tokens, key, frozen)


@dataclasses.dataclass(frozen=True)
class MeshLayout:
    """Where a model and its optimizer state live on a mesh: the parallel config, the mesh, and
    the ``PartitionSpec`` trees of the model (same structure, ``None`` at non-arrays) and of the
    optimizer state."""

    parallel_config: ParallelConfig
    mesh: Mesh
    model_specs: PyTree
    opt_specs: PyTree
    trainable: str | None = None

    @property
    def model_shardings(self) -> PyTree:
        return named_shardings(self.model_specs, self.mesh)

    @property
    def opt_shardings(self) -> PyTree:
        return named_shardings(self.opt_specs, self.mesh)


def _parallel_config(
    mesh_spec: str | ParallelConfig, base: ParallelConfig | None
) -> ParallelConfig:
    if isinstance(mesh_spec, str):
        return parse_mesh_spec(mesh_spec, base)
    if isinstance(mesh_spec, ParallelConfig):
        return mesh_spec
    raise TypeError(f"mesh_spec must be a str or ParallelConfig, got {type(mesh_spec).__name__}")


def mesh_layout(
    mesh_spec: str | ParallelConfig,
    model: PyTree,
    optimizer: optax.GradientTransformation,
    *,
    base: ParallelConfig | None = None,
    devices: Sequence[Any] | None = None,
    trainable: str | None = None,
) -> MeshLayout:
    """The mesh and the partition specs of ``model`` (a real model or an
    ``eqx.filter_eval_shape`` skeleton) and of ``optimizer``'s state, from shapes alone: nothing
    is allocated. ``mesh_spec`` as for `shard_train_state`; the optimizer state is that of the
    trainable leaves (``trainable`` as for `make_train_step`)."""
    pc = _parallel_config(mesh_spec, base)
    mesh = make_mesh(pc, devices)
    specs = param_partition_specs(model, pc, num_devices=mesh.devices.size)
    params = trainable_params(model, trainable)
    with jax.numpy_dtype_promotion("standard"):
        opt_shapes = jax.eval_shape(optimizer.init, params)
    ospecs = opt_state_specs(opt_shapes, params, specs)
    return MeshLayout(pc, mesh, specs, ospecs, trainable)


def make_train_step_for(
    layout: MeshLayout,
    optimizer: optax.GradientTransformation,
    *,
    return_grads: bool = False,
    loss_chunk_size: int | None = None,
) -> TrainStep:
    """`make_train_step` on ``layout``'s mesh: its parallel config, the model's and optimizer
    state's partition specs and its trainable leaves (``optimizer`` the one the layout was made
    for)."""
    return make_train_step(
        optimizer,
        mesh=layout.mesh,
        parallel_config=layout.parallel_config,
        model_specs=layout.model_specs,
        opt_specs=layout.opt_specs,
        return_grads=return_grads,
        trainable=layout.trainable,
        loss_chunk_size=loss_chunk_size,
    )


def init_sharded_opt_state(
    optimizer: optax.GradientTransformation, model: PyTree, layout: MeshLayout
) -> PyTree:
    """``optimizer.init`` of ``model``'s trainable parameters, born in the layout's optimizer
    shardings (one ``jit`` with ``out_shardings``): no moment exists whole on one device."""

    @functools.partial(jax.jit, out_shardings=layout.opt_shardings)
    def init(params: PyTree) -> PyTree:
        with jax.numpy_dtype_promotion("standard"):
            return optimizer.init(params)

    return init(trainable_params(model, layout.trainable))


def shard_train_state(
    mesh_spec: str | ParallelConfig,
    model: PyTree,
    opt_state: PyTree,
    optimizer: optax.GradientTransformation,
    *,
    base: ParallelConfig | None = None,
    devices: Sequence[Any] | None = None,
    trainable: str | None = None,
) -> tuple[PyTree, PyTree, TrainStep, Mesh]:
    """Everything a training loop needs to run on a mesh, in one call:
    ``(model, opt_state, step, mesh)`` with the model and optimizer state placed on the mesh and
    ``step`` from ``make_train_step`` on the mesh (same signature as the trainer's step; it places
    the host batch itself).

    ``mesh_spec``: a ``ParallelConfig`` or a string for ``parse_mesh_spec`` whose other fields come
    from ``base`` (e.g. the model config's ``parallel``: FSDP modules, gather dtype).
    """
    pc = _parallel_config(mesh_spec, base)
    mesh = make_mesh(pc, devices)
    specs = param_partition_specs(model, pc, num_devices=mesh.devices.size)

    ospecs = opt_state_specs(opt_state, trainable_params(model, trainable), specs)
    model = shard_model(model, mesh, specs)
    opt_state = shard_opt_state(opt_state, mesh, ospecs)
    step = make_train_step_for(MeshLayout(pc, mesh, specs, ospecs, trainable), optimizer)
    return model, opt_state, step, mesh


_STEP_CACHE: dict[str, tuple[optax.GradientTransformation, TrainStep]] = {}


_OPTIMIZER_FIELDS = (
    "optimizer",
    "schedule",
    "decay_fraction",
    "steps",
    "lr",
    "warmup_steps",
    "min_lr_ratio",
    "weight_decay",
    "beta1",
    "beta2",
    "adam_eps",
    "grad_clip",
    "trainable",
    "lora_rank",
    "lora_alpha",
    "lora_targets",
    "lora_base_dtype",
    "loss_chunk_size",
)


def optimizer_and_step(
    cfg: TrainConfig, model: PyTree, model_config: ModelConfig, family: ModelFamily
) -> tuple[optax.GradientTransformation, TrainStep]:
    """The optimizer and its jitted step, shared by runs of the same model and optimizer
    settings in one process (a resumed or repeated run then reuses the compiled step)."""
    key = json.dumps(
        [family.name, model_config.to_dict(), [getattr(cfg, f) for f in _OPTIMIZER_FIELDS]],
        sort_keys=True,
        default=repr,
    )
    if key not in _STEP_CACHE:
        if len(_STEP_CACHE) >= 8:
            _STEP_CACHE.pop(next(iter(_STEP_CACHE)))
        optimizer = make_optimizer(cfg, model, model_config, family)
        step = make_train_step(
            optimizer, trainable=cfg.trainable or None, loss_chunk_size=cfg.loss_chunk_size
        )
        _STEP_CACHE[key] = (optimizer, step)
    return _STEP_CACHE[key]
