"""Level 5: training — `TrainConfig`, loss, optimizer and schedule, the train step (with or without
a mesh), checkpoints, run files, experiment trackers, the run loop, evaluation and the lm-eval
adapter.

Checkpoints are orbax ones (`orbax_checkpoint`: sharded, asynchronous, restorable onto any mesh);
`checkpoint` holds the older ``.npz`` format, still read by `load_run` / ``xlstm-eqx eval``.
"""

from .checkpoint import (
    CheckpointError as CheckpointError,
)
from .config import (
    OPTIMIZERS as OPTIMIZERS,
    RESUMABLE_FIELDS as RESUMABLE_FIELDS,
    SCHEDULES as SCHEDULES,
    TRACKERS as TRACKERS,
    TrainConfig as TrainConfig,
    check_sequence_length as check_sequence_length,
    resolve_model_config as resolve_model_config,
)
from .evaluate import (
    EvalResult as EvalResult,
    evaluate_run as evaluate_run,
    has_decode_api as has_decode_api,
    load_run as load_run,
    sample_tokens as sample_tokens,
)
from .extend import (
    resume_point as resume_point,
)
from .host_sync import (
    PendingScalars as PendingScalars,
    ProfileWindow as ProfileWindow,
)
from .lm_eval import (
    LMEvalAdapter as LMEvalAdapter,
    run_lm_eval as run_lm_eval,
    score_windows as score_windows,
)
from .loop import (
    TrainingDivergedError as TrainingDivergedError,
    TrainResult as TrainResult,
    run_config_dict as run_config_dict,
    train as train,
)
from .loss import (
    bits_per_byte as bits_per_byte,
    evaluate_loss as evaluate_loss,
    next_token_loss as next_token_loss,
)
from .optim import (
    default_decay_mask as default_decay_mask,
    learning_rate_schedule as learning_rate_schedule,
    make_optimizer as make_optimizer,
    trainable_params as trainable_params,
    wsd_decay_start as wsd_decay_start,
)
from .orbax_checkpoint import (
    FORMAT as FORMAT,
    VERSION as VERSION,
    CheckpointStore as CheckpointStore,
    latest_checkpoint as latest_checkpoint,
    list_checkpoints as list_checkpoints,
    load_metadata as load_metadata,
    npz_checkpoints as npz_checkpoints,
    restore_checkpoint as restore_checkpoint,
    save_checkpoint as save_checkpoint,
    step_dir_name as step_dir_name,
)
from .run_files import (
    plot_metrics as plot_metrics,
    read_metrics as read_metrics,
)
from .step import (
    MeshLayout as MeshLayout,
    TrainStep as TrainStep,
    init_sharded_opt_state as init_sharded_opt_state,
    make_train_step as make_train_step,
    make_train_step_for as make_train_step_for,
    mesh_layout as mesh_layout,
    shard_train_state as shard_train_state,
)
from .trackers import (
    Trackers as Trackers,
    open_trackers as open_trackers,
)
