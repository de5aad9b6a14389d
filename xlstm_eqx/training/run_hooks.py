"""The run and its hooks: `Run` (the config, the prepared data, the starting state, who writes)
and `RunHooks`, every hook of a run (`hooks.py`) with its cadence from the config, in the order
each step reaches them."""

import dataclasses
import functools
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jaxtyping import PyTree
from tqdm.auto import tqdm

from ..core.files import open_append
from .batch_ramp import BatchRamp
from .config import TrainConfig
from .extend import DECAY_START_DIR
from .hooks import (
    Cadence,
    CheckpointHook,
    CompileNotice,
    Console,
    DecaySaveHook,
    EvalHook,
    Hook,
    HostScalars,
    InterruptHook,
    LastCheckpoint,
    LMEvalHook,
    MetricsHook,
    ProfileHook,
    ProgressHook,
    TrackerHook,
)
from .host_sync import ProfileWindow
from .lm_eval import TrainingLMEval
from .loss import bits_per_byte, evaluate_loss
from .optim import learning_rate_schedule, lr_at, wsd_decay_start
from .orbax_checkpoint import CheckpointStore, latest_checkpoint, save_checkpoint
from .prepare import PreparedRun
from .run_files import InterruptFlag, write_partial_run_files
from .trackers import Trackers, open_trackers
from .train_state import TrainState


__all__ = ["Run", "RunHooks", "held_out_evaluator"]


@dataclasses.dataclass(frozen=True)
class Run:
    """What the hooks and the end of a run are made from."""

    cfg: TrainConfig
    prepared: PreparedRun
    state: TrainState
    run_config: dict[str, Any]
    writer: bool  # process 0: the one that writes the run's files and logs
    log: Callable[[str], None]
    end_step: int

    @property
    def out(self) -> str:
        return self.cfg.out_dir()

    @property
    def tokens_per_step(self) -> int:
        """Tokens of a full step (a batch-size ramp's first steps have fewer)."""
        return self.cfg.grad_accum * self.cfg.batch_size * self.cfg.seq_len

    @functools.cached_property
    def ramp(self) -> BatchRamp:
        return BatchRamp.of(self.cfg)

    def tokens_through(self, step: int) -> int:
        """Tokens trained on in steps 1…``step``."""
        return self.ramp.tokens_through(step, self.cfg.seq_len)

    @property
    def metrics_path(self) -> str:
        return os.path.join(self.out, "metrics.jsonl")

    @property
    def checkpoint_root(self) -> str:
        return os.path.join(self.out, "checkpoints")

    def as_given(self, path: str) -> str:
        """A path under the run directory as the user gave ``--out`` (relative stays relative),
        though orbax's checkpoint paths are absolute; a path elsewhere as it is."""
        rel = os.path.relpath(os.path.abspath(path), os.path.abspath(self.out))
        return path if rel.startswith("..") else os.path.join(self.out, rel)


@dataclasses.dataclass(frozen=True)
class RunHooks:
    """The run's hooks, in the order each step reaches them (`in_order`)."""

    scalars: HostScalars
    compile_notice: CompileNotice
    profile: ProfileHook
    evals: EvalHook
    metrics: MetricsHook
    trackers: TrackerHook
    progress: ProgressHook | None
    checkpoints: CheckpointHook
    decay_save: DecaySaveHook
    interrupt: InterruptHook
    lm_eval: LMEvalHook | None = None

    def in_order(self) -> list[Hook]:
        hooks: list[Any] = [self.compile_notice, self.profile, self.evals, self.metrics]
        hooks += [self.trackers, self.lm_eval, self.progress, self.checkpoints]
        hooks += [self.decay_save, self.interrupt]
        return [hook for hook in hooks if hook is not None]

    def before_step(self, step: int) -> None:
        for hook in self.in_order():
            hook.before_step(step)

    @classmethod
    def build(cls, run: Run) -> "RunHooks":
        """Every hook of ``run``, each with its cadence from the config."""
        cfg, p, start_step = run.cfg, run.prepared, run.state.start_step
        last = LastCheckpoint(latest_checkpoint(run.checkpoint_root), start_step)
        if p.resume_from is None:
            last.step = 0
        bar = None
        if cfg.progress and run.writer:
            bar = tqdm(
                total=cfg.steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True
            )
        console = Console(run.log, bar)
        trackers = open_trackers(
            cfg.trackers() if run.writer else [], run.out, cfg.tracker_project, run.run_config
        )
        flag = InterruptFlag(run.log)
        metrics_file = open_append(run.metrics_path if run.writer else os.devnull)
        evals = EvalHook(Cadence.of(cfg.eval_every, [cfg.steps]), held_out_evaluator(p))
        metrics = MetricsHook(
            Cadence.of(cfg.log_every, [1, cfg.steps]),
            evals,
            metrics_file,
            console,
            _schedule_fields(cfg, p),
            p.unigram_bpb,
            run.tokens_through,
        )
        profile = ProfileWindow(cfg.profile_steps, os.path.join(run.out, "profile"))
        # Every process saves (each writes its own shards); saves are asynchronous: `save`
        # returns once the arrays are off the devices and the next steps run while the files are
        # written.
        store = CheckpointStore(run.checkpoint_root, keep=cfg.keep_checkpoints)
        interrupt = InterruptHook(flag, store, last, _partial_writer(run), run.log, run.as_given)
        checkpoints = CheckpointHook(
            store,
            Cadence.of(cfg.checkpoint_every, [run.end_step]),
            _run_meta(run),
            last,
            interrupt.agreed,
            run.state.checkpoint_view,
        )
        decay_at = [wsd_decay_start(cfg)] if cfg.schedule == "wsd" else []
        return cls(
            scalars=HostScalars(last),
            compile_notice=CompileNotice(start_step + 1, console),
            profile=ProfileHook(profile, cfg.profile_steps, console),
            evals=evals,
            metrics=metrics,
            trackers=TrackerHook(trackers, metrics),
            progress=ProgressHook(bar, metrics, evals) if bar is not None else None,
            checkpoints=checkpoints,
            decay_save=DecaySaveHook(Cadence.of(at=decay_at), _decay_saver(run)),
            interrupt=interrupt,
            lm_eval=_lm_eval_hook(run, trackers, metrics, console),
        )


def _lm_eval_hook(
    run: Run, trackers: Trackers, metrics: MetricsHook, console: Console
) -> LMEvalHook | None:
    """`--lm-eval-tasks` every `--lm-eval-every` steps and at the last one (None: no tasks)."""
    cfg, p = run.cfg, run.prepared
    if not cfg.lm_eval_tasks.strip():
        return None
    max_length = getattr(p.model_config, "context_length", None) or cfg.seq_len
    evaluate = TrainingLMEval(cfg, p.tokenizer, int(max_length), run.out, run.writer)
    cadence = Cadence.of(cfg.lm_eval_every, [cfg.steps])
    return LMEvalHook(cadence, evaluate, trackers, metrics, console)


def held_out_evaluator(p: PreparedRun) -> Callable[[PyTree], tuple[float, float]]:
    """model -> (its held-out loss in nats/token, in bits/byte)."""

    def evaluate(model: PyTree) -> tuple[float, float]:
        loss = evaluate_loss(model, p.eval_batches)
        return loss, bits_per_byte(loss, p.corpus.heldout_tokens_per_byte)

    return evaluate


def _schedule_fields(cfg: TrainConfig, p: PreparedRun) -> Callable[[int], tuple[float, float]]:
    """step -> (its learning rate, the epoch at its end), for the metrics rows."""
    schedule = learning_rate_schedule(cfg)
    ramp = BatchRamp.of(cfg)

    def fields(step: int) -> tuple[float, float]:
        epoch = ramp.windows_before(step + 1) / p.sampler.num_windows
        return lr_at(schedule, step - 1), round(epoch, 4)

    return fields


def _run_meta(run: Run) -> Callable[[int], dict[str, Any]]:
    """What a checkpoint of a step records beside the arrays (resume reads it back)."""
    rng_key = np.asarray(jax.random.key_data(run.state.loop_key)).tolist()

    def meta(step: int) -> dict[str, Any]:
        return {
            "step": step,
            "data_position": step * run.cfg.grad_accum,
            "data_windows": run.ramp.windows_before(step + 1),  # sequences read so far
            "rng_key": rng_key,
            "run_config": run.run_config,
        }

    return meta


def _decay_saver(run: Run) -> Callable[[int, dict[str, PyTree]], None]:
    """Where an extension of a wsd run restarts (training/extend.py): one synchronous save, once
    per run, into its own directory."""
    meta = _run_meta(run)

    def save(step: int, trees: dict[str, PyTree]) -> None:
        save_checkpoint(os.path.join(run.out, DECAY_START_DIR), step, trees, meta(step), keep=1)

    return save


def _partial_writer(run: Run) -> Callable[[int, str | None], None]:
    """The plot and summary of the steps done, as a finished run has (process 0 only)."""

    def write(step: int, checkpoint: str | None) -> None:
        if run.writer:
            write_partial_run_files(run.out, run.metrics_path, step, run.cfg.steps, checkpoint)

    return write


# the run's files
