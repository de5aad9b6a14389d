"""Level 0: what every other part uses — the config base, dtype and key helpers, timing, parameter counts, mapping files."""

from .files import (
    read_mapping_file as read_mapping_file,
)
from .parallel_config import (
    ParallelConfig as ParallelConfig,
)
from .params import (
    count_params as count_params,
)
from .timing import (
    median_seconds as median_seconds,
)
from .utils import (
    split_optional_key as split_optional_key,
    to_dtype as to_dtype,
)
