"""Experiment trackers (`--tracker tensorboard,wandb,trackio`): every row of `metrics.jsonl` (loss,
lr, grad_norm, tokens/s, eval_loss, bits_per_byte, …) as scalars at its step, and the resolved
run configuration. Written by process 0 only; `metrics.jsonl` stays the run's own record.

- `tensorboard` (package `tensorboard`, no TensorFlow needed): event files in `DIR/tensorboard/`,
  the configuration as a text summary `config`. View: `tensorboard --logdir DIR/tensorboard`.
- `wandb`: a W&B run in `DIR/wandb/` (project `--tracker-project`, name = the run directory's
  name, id kept in `DIR/trackers.json` so a resumed run continues the same W&B run). Offline
  (`WANDB_MODE=offline`, or no API key configured) it needs no network; `wandb sync DIR/wandb/…`
  uploads later. Steps recomputed after a resume are not logged twice (W&B keeps the first).
- `trackio`: the local-first tracker (project `--tracker-project`), stored where trackio keeps its
  data (`$TRACKIO_DIR`, default `~/.cache/huggingface/trackio`); `trackio show` opens it.

The packages are optional extras (`pip install 'xlstm_eqx[trackers]'`), imported only when asked
for; a missing one is an error before training starts.
"""

import json
import os
import uuid
from typing import Any, Protocol, runtime_checkable

from ..core.files import read_mapping_file, refuse_symlink, write_json_atomic


@runtime_checkable
class Tracker(Protocol):
    def log(self, row: dict[str, Any], step: int) -> None: ...

    def close(self) -> None: ...


def _scalars(row: dict[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in row.items()
        if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)
    }


def _import(name: str, extra: str = "trackers") -> Any:
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise ImportError(
            f"--tracker {name.split('.')[0]} needs the optional package `{name.split('.')[0]}` "
            f"(pip install 'xlstm_eqx[{extra}]')"
        ) from e


class TensorBoardTracker:
    """Event files written with the `tensorboard` package's own writer and protos."""

    def __init__(self, directory: str, config: dict[str, Any]):
        _import("tensorboard")
        from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self._event, self._summary = event_pb2, summary_pb2
        os.makedirs(directory, exist_ok=True)
        self.directory = directory
        self._writer = EventFileWriter(directory)
        text = "```json\n" + json.dumps(config, indent=2, default=str) + "\n```"
        # protobuf makes these modules' message classes at import time: no checker can see them
        tensors: Any = tensor_pb2
        shapes: Any = tensor_shape_pb2
        summaries: Any = summary_pb2
        tensor = tensors.TensorProto(
            dtype=7,  # DT_STRING
            string_val=[text.encode()],
            tensor_shape=shapes.TensorShapeProto(dim=[shapes.TensorShapeProto.Dim(size=1)]),
        )
        meta = summaries.SummaryMetadata(
            plugin_data=summaries.SummaryMetadata.PluginData(plugin_name="text")
        )
        value = summaries.Summary.Value(tag="config", metadata=meta, tensor=tensor)
        self._add(summaries.Summary(value=[value]), 0)

    def _add(self, summary: Any, step: int) -> None:
        import time

        self._writer.add_event(self._event.Event(wall_time=time.time(), step=step, summary=summary))

    def log(self, row: dict[str, Any], step: int) -> None:
        values = [
            self._summary.Summary.Value(tag=k, simple_value=v) for k, v in _scalars(row).items()
        ]
        self._add(self._summary.Summary(value=values), step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def _wandb_mode() -> str:
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = os.path.join(os.path.expanduser("~"), ".netrc")
    if os.path.isfile(netrc):
        with open(netrc) as f:
            if "api.wandb.ai" in f.read():
                return "online"
    return "offline"


class WandbTracker:
    def __init__(self, out: str, project: str, run_id: str, config: dict[str, Any]):
        wandb = _import("wandb")
        self._wandb = wandb
        self.run = wandb.init(
            project=project,
            name=os.path.basename(os.path.abspath(out)),
            id=run_id,
            resume="allow",
            dir=out,
            config=config,
            mode=_wandb_mode(),
            # quiet: no end-of-run summary after the run's last lines (its header, where the
            # offline run is saved, still comes at the start)
            settings=wandb.Settings(quiet=True),
        )
        self._last_step = -1

    def log(self, row: dict[str, Any], step: int) -> None:
        if step <= self._last_step:
            return
        self.run.log(_scalars(row), step=step)
        self._last_step = step

    def close(self) -> None:
        self.run.finish()


class TrackioTracker:
    def __init__(self, out: str, project: str, config: dict[str, Any]):
        self._trackio = _import("trackio")
        self._trackio.init(
            project=project,
            name=os.path.basename(os.path.abspath(out)),
            config=config,
            resume="allow",
            embed=False,
            auto_log_cpu=False,
            auto_log_gpu=False,
        )

    def log(self, row: dict[str, Any], step: int) -> None:
        self._trackio.log(_scalars(row), step=step)

    def close(self) -> None:
        self._trackio.finish()


class Trackers:
    """The run's trackers (none: every call is a no-op)."""

    def __init__(self, trackers: list[Tracker]):
        self.trackers = trackers

    def log(self, row: dict[str, Any]) -> None:
        for t in self.trackers:
            t.log(row, int(row["step"]))

    def close(self) -> None:
        for t in self.trackers:
            t.close()
        self.trackers = []


def open_trackers(names: list[str], out: str, project: str, config: dict[str, Any]) -> Trackers:
    """Start the named trackers for the run in `out` (the W&B run id is kept in
    `DIR/trackers.json` so that a resumed run continues it)."""
    state_path = os.path.join(out, "trackers.json")
    state: dict[str, Any] = {}
    refuse_symlink(state_path)
    if os.path.isfile(state_path):
        state = read_mapping_file(state_path, "tracker state")
        wandb_id = state.get("wandb_id")
        if wandb_id is not None and not (
            isinstance(wandb_id, str) and wandb_id.isascii() and wandb_id.isalnum()
        ):
            raise ValueError(
                f"tracker state {state_path!r}: wandb_id must be a string of letters and "
                f"digits, got {str(wandb_id)[:40]!r}"
            )
    started: list[Tracker] = []
    try:
        for name in names:
            if name == "tensorboard":
                started.append(TensorBoardTracker(os.path.join(out, "tensorboard"), config))
            elif name == "wandb":
                state.setdefault("wandb_id", uuid.uuid4().hex[:12])
                started.append(WandbTracker(out, project, state["wandb_id"], config))
            elif name == "trackio":
                started.append(TrackioTracker(out, project, config))
            else:
                raise ValueError(f"TrainConfig.tracker: unknown tracker {name!r}")
    except BaseException:
        Trackers(started).close()
        raise
    if state:
        write_json_atomic(state_path, state)
    return Trackers(started)


def check_trackers_available(names: list[str]) -> None:
    """Raise ImportError naming the first tracker whose package is not installed."""
    import importlib.util

    for name in names:
        if importlib.util.find_spec(name) is None:
            raise ImportError(
                f"--tracker {name} needs the optional package `{name}` "
                "(pip install 'xlstm_eqx[trackers]')"
            )
