"""Level 4: sharding through `jax.sharding` — the mesh, partition rules, sharded init, FSDP
gather-at-use and the per-device memory report. Never imports training.

The reference runs its models inside ``shard_map`` over a 4-axis mesh ``(dp, fsdp, pp, tp)`` and
writes its collectives by hand. Here the same layout is expressed as ``PartitionSpec``s on the
parameters of an Equinox model; the batch is split over ``(dp, fsdp)``; XLA's SPMD partitioner
(GSPMD) inserts the collectives. Nothing in the models is mesh-aware, so one model class serves one
device and a thousand. See docs/architecture.md, "Sharding".

Pieces, in the order a run uses them:

- `mesh`: ``make_mesh(parallel_config)``, the ``(dp, fsdp, pp, tp)`` mesh (a ``-1`` size takes the
  remaining devices); ``parse_mesh_spec("dp=2,fsdp=2,tp=2")`` makes the ``ParallelConfig`` from a
  CLI string; ``initialize_distributed()`` starts the multi-controller runtime
  (``jax.distributed.initialize``) from explicit arguments,
  ``JAX_COORDINATOR_ADDRESS``/``JAX_NUM_PROCESSES``/``JAX_PROCESS_ID``, or SLURM.
- `rules`: ``param_partition_specs(model, parallel_config)``, a ``PartitionSpec`` per array leaf
  from the logical axes each module declares where it creates the array (``xlstm_eqx.nn.axes``)
  and one mapping of logical axes to mesh axes (``LOGICAL_AXIS_RULES``); ``MODULE_NAME_MAP`` maps
  the reference's registered module names (``fsdp_modules``, ``remat``), which the modules declare
  themselves (``reference_name``, ``field_reference_names``; read by ``module_names``), onto this
  package's classes; plus the specs of optimizer states and token batches.
- `placement`: ``shard_model`` / ``shard_opt_state`` place a model / its optax state on a mesh;
  ``init_sharded(model_cls, config, key=..., mesh=...)`` makes a model born sharded (shapes from
  ``eqx.filter_eval_shape``, arrays from a ``jax.jit`` of the init with ``out_shardings``);
  ``gather_to_host`` / ``place_global`` move whole arrays between host and mesh.
- `context`: ``context_parallel(model, mesh, parallel_config)``: on a mesh with a ``cp`` axis the
  forward runs in a ``jax.shard_map`` manual over ``cp`` alone, each device its segment of the
  sequence; the layers' cp paths (set by ``with_context_parallel``) exchange what crosses segments.
- `fsdp`: ``gather_at_use``. FSDP follows the reference: weights are stored sharded and gathered
  *at use*, one layer at a time, inside the loss. Without that, XLA is free to all-gather the
  batch-sharded activations instead of the weights, and does so for small models.
- `memory`: ``memory_report(config, parallel_config)``, per-device parameter and optimizer bytes
  from ``eqx.filter_eval_shape`` (no allocation).

The layer above builds on these: `xlstm_eqx.training.make_train_step` (with a mesh) /
`shard_train_state` are the trainer's step (same signature, same math as `make_train_step`) with
the batch split over ``(dp, fsdp)``, FSDP weights gathered at use and the parameter and optimizer
layouts pinned with ``eqx.filter_shard`` on the way in and out; `save_sharded_checkpoint` /
`restore_sharded_checkpoint` store one global array per leaf (the format of
`xlstm_eqx.training.checkpoint`), so a run saved on one mesh restores onto any other.

Activation checkpointing is the models' own: ``parallel.remat`` of the *model* config names the
modules that are rematerialised (xLSTM: ``mLSTMBlock``, ``xLSTMResBlock``, ``FFNResBlock``; Llama:
``TransformerBlock``, ``AttnBlock``, ``FFNBlock``), each wrapped in ``eqx.filter_checkpoint``.
"""

from .context import (
    context_parallel as context_parallel,
    with_context_parallel as with_context_parallel,
)
from .fsdp import (
    gather_at_use as gather_at_use,
)
from .memory import (
    MemoryReport as MemoryReport,
    count_all_gathers as count_all_gathers,
    memory_report as memory_report,
)
from .mesh import (
    axis_sizes as axis_sizes,
    context_size as context_size,
    initialize_distributed as initialize_distributed,
    make_mesh as make_mesh,
    parse_mesh_spec as parse_mesh_spec,
)
from .placement import (
    batch_sharding as batch_sharding,
    gather_to_host as gather_to_host,
    init_sharded as init_sharded,
    named_shardings as named_shardings,
    place_global as place_global,
    shard_model as shard_model,
    shard_opt_state as shard_opt_state,
)
from .rules import (
    LOGICAL_AXIS_RULES as LOGICAL_AXIS_RULES,
    MODULE_NAME_MAP as MODULE_NAME_MAP,
    batch_spec as batch_spec,
    logical_axes as logical_axes,
    opt_state_specs as opt_state_specs,
    param_partition_specs as param_partition_specs,
    sequence_spec as sequence_spec,
)
