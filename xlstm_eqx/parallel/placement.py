"""Putting arrays on a mesh: `NamedSharding`s from specs, placing a model, an optimizer state or
a token batch, `init_sharded` (a model created directly in its sharded layout), and moving whole
arrays between host and mesh for checkpoints (`gather_to_host`, `place_global`).
"""

import functools
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import numpy as np
from jax.core import Tracer
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jaxtyping import Array, PRNGKeyArray, PyTree

from ..core.parallel_config import ParallelConfig
from ..models import ModelConfig
from .rules import batch_spec, is_array_like, param_partition_specs


def named_shardings(specs: PyTree, mesh: Mesh) -> PyTree:
    """``NamedSharding(mesh, spec)`` for every ``PartitionSpec`` leaf (None stays None)."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda s: isinstance(s, P))


def place(tree: PyTree, shardings: PyTree) -> PyTree:
    """``eqx.filter_shard`` inside jit; outside jit a plain ``jax.device_put`` of the array part
    (no per-leaf compilation; each device receives only its shard)."""
    arrays, static = eqx.partition(tree, eqx.is_array)
    if any(isinstance(x, Tracer) for x in jax.tree.leaves(arrays)):
        return eqx.filter_shard(tree, shardings)
    placed = jax.tree.map(
        place_global, arrays, shardings, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding)
    )
    return eqx.combine(placed, static)


def shard_model(model: PyTree, mesh: Mesh, specs: PyTree) -> PyTree:
    """``model`` with every array placed (outside jit) or constrained (inside jit) to
    ``NamedSharding(mesh, spec)``."""
    return place(model, named_shardings(specs, mesh))


def shard_opt_state(opt_state: PyTree, mesh: Mesh, specs: PyTree) -> PyTree:
    """``opt_state`` placed/constrained to ``NamedSharding(mesh, spec)`` (specs from
    ``opt_state_specs``)."""
    return place(opt_state, named_shardings(specs, mesh))


def batch_sharding(
    mesh: Mesh, parallel_config: ParallelConfig, *, leading: int = 0
) -> NamedSharding:
    """``NamedSharding`` of a token batch with ``leading`` extra unsharded axes in front (the
    trainer's micro-batch axis: ``leading=1`` for ``(A, B, S+1)``)."""
    return NamedSharding(mesh, P(*([None] * leading), *batch_spec(parallel_config)))


def place_global(x: Any, sharding: jax.sharding.Sharding) -> Array:
    """A global array with ``sharding`` from host data that every process holds in full (the data
    order is the same on every process). Each device gets only its slice: nothing is gathered on
    one device first."""
    if isinstance(x, jax.Array) and x.sharding == sharding:
        return x
    if isinstance(x, jax.Array) and x.is_fully_addressable and jax.process_count() == 1:
        return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


# born sharded


def init_sharded(
    model_cls: Callable[..., Any],
    config: ModelConfig,
    *,
    key: PRNGKeyArray,
    mesh: Mesh,
    parallel_config: ParallelConfig | None = None,
) -> PyTree:
    """``model_cls(config, key=key)`` created directly in its sharded layout on ``mesh``.

    Shapes come from ``eqx.filter_eval_shape`` (no allocation); the arrays are made by one
    ``jax.jit`` of the init over the array part with ``out_shardings`` = the parameter shardings, so
    each device computes only its own shards and no array exists whole on one device. With the
    default partitionable threefry PRNG the values equal those of the plain (unsharded) init.
    ``parallel_config`` defaults to ``config.parallel``.
    """
    pc = parallel_config if parallel_config is not None else getattr(config, "parallel", None)
    if pc is None:
        pc = ParallelConfig()
    skeleton = eqx.filter_eval_shape(model_cls, config, key=key)
    specs = param_partition_specs(skeleton, pc, num_devices=mesh.devices.size)
    _, static = eqx.partition(skeleton, is_array_like)
    shardings = named_shardings(specs, mesh)  # None at the non-array leaves, as eqx.filter gives

    @functools.partial(jax.jit, out_shardings=shardings)
    def make(k: PRNGKeyArray) -> PyTree:
        return eqx.filter(model_cls(config, key=k), eqx.is_array)

    return eqx.combine(make(key), static)


# checkpoints across meshes


def gather_to_host(tree: PyTree) -> PyTree:
    """Every array of ``tree`` as one global NumPy array on the host (non-arrays unchanged).
    Arrays spread over several processes are all-gathered (``process_allgather``), so every
    process gets the full value."""

    def get(x: Any) -> Any:
        if not isinstance(x, jax.Array):
            return x
        if x.is_fully_addressable:
            return np.asarray(jax.device_get(x))
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(get, tree)
