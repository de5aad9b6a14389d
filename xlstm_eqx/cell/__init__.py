"""Level 1: the mLSTM cell as pure functions on `(B, NH, S, DH)` arrays.

Three forms of the same math — parallel (O(S²) memory), chunkwise (O(S)) and recurrent (O(1) per
step) in `forms` — plus the Pallas chunkwise kernels (`pallas`), the remat variants (`remat`),
the backend names and their keyword arguments (`MLSTM_BACKENDS`, `mLSTMBackendNameAndKwargs`),
the table from a name to its function (`BACKENDS`, dispatched by `run_backend` without a state
and by `run_backend_with_state` with one) and the
``auto`` backend's tuning (`autotune`). See docs/architecture.md, "The mLSTM cell".
"""

from .autotune import (
    auto_backend_choice as auto_backend_choice,
    fastest_chunkwise_backend as fastest_chunkwise_backend,
    time_chunkwise_backends as time_chunkwise_backends,
    tune_auto_backend as tune_auto_backend,
)
from .backend_config import (
    MLSTM_BACKENDS as MLSTM_BACKENDS,
    mLSTMBackendNameAndKwargs as mLSTMBackendNameAndKwargs,
)
from .backends import (
    BACKENDS as BACKENDS,
    resolve_backend as resolve_backend,
    run_backend as run_backend,
    run_backend_with_state as run_backend_with_state,
)
from .forms import (
    mlstm_chunkwise as mlstm_chunkwise,
    mlstm_recurrent as mlstm_recurrent,
    mlstm_recurrent_step as mlstm_recurrent_step,
    mLSTMState as mLSTMState,
    parallel_stabilized_simple as parallel_stabilized_simple,
)
from .pallas import (
    mlstm_chunkwise_pallas as mlstm_chunkwise_pallas,
)
from .remat import (
    REMAT_POLICIES as REMAT_POLICIES,
    mlstm_chunkwise_remat as mlstm_chunkwise_remat,
)
