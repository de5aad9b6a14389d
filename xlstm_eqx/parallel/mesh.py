"""The device mesh: `make_mesh` builds the ``(dp, fsdp, pp, tp)`` mesh of a `ParallelConfig`,
with a context-parallel ``cp`` axis before ``tp`` when its size is not 1 (a ``-1`` size takes the
remaining devices), `parse_mesh_spec` reads the CLI's ``"dp=2,fsdp=2,cp=2"`` form, and
`initialize_distributed` starts JAX's multi-process runtime.
"""

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from ..core.parallel_config import ParallelConfig


# (ParallelConfig prefix, default axis name) in mesh order. The context axis sits next to the
# tensor-parallel one (neighbouring devices: its state exchange is small but on the critical path);
# it is in a mesh only when its size is not 1 (`mesh_axes`), so meshes without cp keep 4 axes.
MESH_AXES: tuple[tuple[str, str], ...] = (
    ("data", "dp"),
    ("fsdp", "fsdp"),
    ("pipeline", "pp"),
    ("context", "cp"),
    ("model", "tp"),
)


# Names accepted for the axes in a mesh string, besides the config's own axis names.
_AXIS_ALIASES: dict[str, str] = {
    "dp": "data",
    "data": "data",
    "fsdp": "fsdp",
    "pp": "pipeline",
    "pipe": "pipeline",
    "pipeline": "pipeline",
    "tp": "model",
    "mp": "model",
    "model": "model",
    "cp": "context",
    "context": "context",
}


def mesh_axes(parallel_config: ParallelConfig) -> tuple[str, ...]:
    """The `MESH_AXES` prefixes this config's mesh has: all but ``context`` when its size is 1."""
    return tuple(
        prefix
        for prefix, _ in MESH_AXES
        if prefix != "context" or parallel_config.context_axis_size != 1
    )


def _axis_names(pc: ParallelConfig) -> tuple[str, ...]:
    return tuple(getattr(pc, f"{prefix}_axis_name") for prefix in mesh_axes(pc))


def context_size(mesh: Mesh, parallel_config: ParallelConfig) -> int:
    """The size of the context-parallel axis of ``mesh`` (1 when the mesh has none)."""
    return int(dict(mesh.shape).get(parallel_config.context_axis_name, 1))


def axis_sizes(parallel_config: ParallelConfig, num_devices: int | None = None) -> dict[str, int]:
    """``{axis name: size}`` in mesh order ``(dp, fsdp, pp[, cp], tp)``, with a ``-1`` size filled so that
    the sizes multiply to ``num_devices`` (default: every device, ``jax.device_count()``).

    Raises a ``ValueError`` naming the sizes when they cannot give ``num_devices``."""
    pc = parallel_config
    sizes = [getattr(pc, f"{prefix}_axis_size") for prefix in mesh_axes(pc)]
    names = _axis_names(pc)
    shown = ", ".join(f"{n}={s}" for n, s in zip(names, sizes, strict=True))
    if num_devices is None:
        if -1 not in sizes:
            return dict(zip(names, sizes, strict=True))
        num_devices = jax.device_count()
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known != 0:
            raise ValueError(
                f"mesh axis sizes {shown}: the fixed sizes multiply to {known}, which does not "
                f"divide the device count {num_devices}, so the -1 axis cannot be inferred"
            )
        sizes = [num_devices // known if s == -1 else s for s in sizes]
    elif known != num_devices:
        raise ValueError(
            f"mesh axis sizes {shown} multiply to {known}, but there are {num_devices} devices; "
            "make them multiply to the device count or set one axis to -1"
        )
    return dict(zip(names, sizes, strict=True))


def make_mesh(parallel_config: ParallelConfig, devices: Sequence[Any] | None = None) -> Mesh:
    """The mesh ``(dp, fsdp, pp, tp)``, or ``(dp, fsdp, pp, cp, tp)`` when the config's context
    axis size is not 1 (axis names from the config), over ``devices``
    (default: all devices, laid out by ``jax.experimental.mesh_utils`` for fast collectives).

    Axes are ``AxisType.Auto``: the SPMD partitioner propagates the parameter and batch shardings.
    """

    devs = list(jax.devices() if devices is None else devices)
    sizes = axis_sizes(parallel_config, len(devs))
    shape = tuple(sizes.values())
    if devices is None:
        grid = mesh_utils.create_device_mesh(shape, devs)
    else:
        grid = np.asarray(devs, dtype=object).reshape(shape)
    return Mesh(grid, tuple(sizes), axis_types=(AxisType.Auto,) * len(shape))


def parse_mesh_spec(spec: str, base: ParallelConfig | None = None) -> ParallelConfig:
    """A ``ParallelConfig`` from a mesh string such as ``"dp=2,fsdp=2,tp=2"`` or ``"cp=8"``.

    Axis keys: the config's axis names or ``dp``/``data``, ``fsdp``, ``pp``/``pipeline``,
    ``tp``/``model``, ``cp``/``context``. Sizes are positive ints or ``-1`` (fill). Axes not named get size 1, except the
    data axis, which fills the remaining devices (``-1``) unless named or another axis is ``-1``.
    The other fields (FSDP modules, remat, …) come from ``base``.
    """
    config = ParallelConfig() if base is None else base
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(
            f"mesh spec must be a non-empty string like 'dp=2,fsdp=2,tp=2', got {spec!r}"
        )
    own = {getattr(config, f"{prefix}_axis_name"): prefix for prefix, _ in MESH_AXES}
    sizes: dict[str, int] = {}
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        key, sep, value = part.partition("=")
        key = key.strip()
        prefix = own.get(key) or _AXIS_ALIASES.get(key)
        if not sep or prefix is None:
            allowed = sorted(set(own) | set(_AXIS_ALIASES))
            raise ValueError(
                f"mesh spec {spec!r}: cannot read {part!r}; expected AXIS=SIZE with AXIS one of "
                f"{allowed}"
            )
        if prefix in sizes:
            raise ValueError(f"mesh spec {spec!r}: axis {key!r} is given twice")
        try:
            size = int(value)
        except ValueError:
            raise ValueError(
                f"mesh spec {spec!r}: size of axis {key!r} must be an int, got {value.strip()!r}"
            ) from None
        if size == 0 or size < -1:
            raise ValueError(
                f"mesh spec {spec!r}: size of axis {key!r} must be positive or -1, got {size}"
            )
        sizes[prefix] = size
    if not sizes:
        raise ValueError(f"mesh spec {spec!r} names no axis")
    fill_data = "data" not in sizes and -1 not in sizes.values()
    kwargs = {
        f"{prefix}_axis_size": sizes.get(prefix, -1 if (prefix == "data" and fill_data) else 1)
        for prefix, _ in MESH_AXES
    }
    return dataclasses.replace(config, **kwargs)


# multi-host


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_ids: Sequence[int] | None = None,
    cpu_collectives: str | None = "gloo",
    force: bool = False,
    environ: Mapping[str, str] | None = None,
) -> bool:
    """Start JAX's multi-controller runtime (``jax.distributed.initialize``), one process per host.

    Where the settings come from, first match wins:

    1. the arguments;
    2. the environment: ``JAX_COORDINATOR_ADDRESS`` (``host:port`` of process 0),
       ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID`` (and ``JAX_LOCAL_DEVICE_IDS``, comma-separated);
    3. a SLURM allocation with more than one task (``SLURM_NTASKS``): JAX reads SLURM's variables;
    4. ``force=True`` (or ``XLSTM_EQX_DISTRIBUTED=1``): JAX detects the cluster itself (TPU pods,
       Open MPI / mpi4py, Kubernetes).

    Otherwise this is a single-process run and nothing happens (returns False). Returns True
    once the runtime is up (also when it already was). Must be called before any JAX computation.
    ``cpu_collectives`` sets the CPU backend's cross-process collectives ("gloo" or "mpi").
    """
    env = os.environ if environ is None else environ
    if jax.distributed.is_initialized():
        return True
    coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS") or None
    if num_processes is None and env.get("JAX_NUM_PROCESSES"):
        num_processes = int(env["JAX_NUM_PROCESSES"])
    if process_id is None and env.get("JAX_PROCESS_ID"):
        process_id = int(env["JAX_PROCESS_ID"])
    if local_device_ids is None and env.get("JAX_LOCAL_DEVICE_IDS"):
        local_device_ids = [int(i) for i in env["JAX_LOCAL_DEVICE_IDS"].split(",")]
    slurm = int(env.get("SLURM_NTASKS", "1") or "1") > 1
    force = force or env.get("XLSTM_EQX_DISTRIBUTED", "") not in ("", "0")
    if coordinator_address is None and not slurm and not force:
        if num_processes not in (None, 1):
            raise ValueError(
                f"num_processes={num_processes} needs a coordinator address "
                "(argument or JAX_COORDINATOR_ADDRESS=host:port)"
            )
        return False
    if coordinator_address is not None and (num_processes is None or process_id is None):
        raise ValueError(
            f"coordinator_address={coordinator_address!r} also needs num_processes and process_id "
            "(arguments or JAX_NUM_PROCESSES / JAX_PROCESS_ID)"
        )
    if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"process_id={process_id} must be in [0, num_processes={num_processes})")
    if cpu_collectives is not None:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=local_device_ids,
    )
    return True
