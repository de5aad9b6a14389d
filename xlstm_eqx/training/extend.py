"""Extending a finished warmup-stable-decay run (`--resume --steps N`, N larger) without the
learning rate jumping back up: the run restarts from the checkpoint saved where its decay began
(`DIR/wsd_decay_start/`), keeps the learning rate stable until the new decay start, and decays
over the new run's last `decay_fraction`. The checkpoints of the abandoned decay are moved to
`DIR/superseded/` (kept, but no longer resumed from); the metrics rows after the decay start are
recomputed (the usual truncation on resume).
"""

import os
import shutil
from typing import Any

from .checkpoint import CheckpointError
from .config import TrainConfig
from .optim import wsd_decay_start
from .orbax_checkpoint import latest_checkpoint, list_checkpoints


DECAY_START_DIR = "wsd_decay_start"
SUPERSEDED_DIR = "superseded"


def resume_point(
    cfg: TrainConfig, saved_train: dict[str, Any], latest: str, latest_step: int, out: str
) -> str:
    """The checkpoint a `--resume` starts from: `latest`, unless `cfg` extends a wsd run whose
    decay had begun by then; then the checkpoint at that decay's start."""
    if cfg.schedule != "wsd" or saved_train.get("schedule") != "wsd":
        return latest
    old = TrainConfig.from_dict(saved_train)
    old_start = wsd_decay_start(old)
    if cfg.steps <= old.steps or latest_step <= old_start:
        return latest  # not longer, or still in the stable phase: nothing to undo
    root = os.path.join(out, DECAY_START_DIR)
    path = latest_checkpoint(root)
    steps = [s for s, _ in list_checkpoints(root)]
    if path is None or steps[-1] != old_start:
        raise CheckpointError(
            f"--resume --steps {cfg.steps}: extending the wsd run in {out!r} restarts from its "
            f"decay start (step {old_start}), but {root!r} holds no checkpoint of that step"
        )
    return path


def is_decay_start(path: str, out: str) -> bool:
    return os.path.dirname(os.path.abspath(path)) == os.path.abspath(
        os.path.join(out, DECAY_START_DIR)
    )


def supersede_after(ckpt_root: str, step: int, out: str) -> list[str]:
    """Move the checkpoints of `ckpt_root` after `step` into `DIR/superseded/`."""
    moved = []
    dest_root = os.path.join(out, SUPERSEDED_DIR)
    for s, path in list_checkpoints(ckpt_root):
        if s > step:
            os.makedirs(dest_root, exist_ok=True)
            dest = os.path.join(dest_root, os.path.basename(path))
            if os.path.exists(dest):
                shutil.rmtree(dest)
            os.replace(path, dest)
            moved.append(dest)
    return moved
