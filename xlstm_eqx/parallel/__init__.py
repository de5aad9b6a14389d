"""Level 4: sharding through `jax.sharding` — the mesh, partition rules, sharded init, FSDP
gather-at-use and the per-device memory report. Never imports training.
"""

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
    MODULE_NAME_MAP as MODULE_NAME_MAP,
    batch_spec as batch_spec,
    opt_state_specs as opt_state_specs,
    param_partition_specs as param_partition_specs,
)
