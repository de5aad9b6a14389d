"""The run loop: `train(TrainConfig(...))`, what `xlstm-eqx train` runs.

1. Everything is validated before anything is written: config fields, the model config (sequence
   length ≤ `context_length`), the data (paths, emptiness, token ids < vocab), and on `--resume`
   the checkpoint (readable, made by a compatible config, every array the right shape).
2. A model from a preset or a config file, AdamW (optax) with linear warmup + cosine decay,
   weight decay on kernels only (the embedding too if `weight_decay_on_embedding`), global-norm
   gradient clipping, gradient accumulation over micro-batches inside one jitted step, which
   donates the model and optimizer buffers.
3. Every step's loss is checked: a NaN/inf stops the run naming the step, and no checkpoint is
   written after it, so the last good one stays the newest.
4. `DIR/config.json` (resolved config), `DIR/metrics.jsonl` (one row per logged step: `step`,
   `loss`, `lr`, `grad_norm`, `tokens_per_s`…; eval steps add `eval_loss`, `bits_per_byte`),
   `DIR/loss.png`, `DIR/checkpoints/step_*` (the last `keep_checkpoints`; orbax checkpoints that
   every process writes its shards of, in the background), `DIR/summary.json`.
5. With `--mesh`, the parameters and optimizer state are born sharded (or read straight into
   their shardings on `--resume`, whatever mesh saved them). SIGTERM/Ctrl-C on any process stops
   every process after the same step, with a checkpoint of it.

Resume is exact: the data order depends only on the seed and the batch index, the step's RNG key
is `fold_in(key, step)`, and checkpoints hold the arrays bit for bit, so a run stopped at step k
and resumed logs the same losses as one that never stopped.
"""

import contextlib
import dataclasses
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
from jaxtyping import PRNGKeyArray, PyTree
from tqdm.auto import tqdm

from ..cell.autotune import tune_auto_backend
from ..core.console import print_line
from ..core.files import open_append, write_json_atomic
from ..data.loader import BatchLoader
from ..data.tokenizer import Tokenizer
from ..generation import generate
from ..models import MODEL_FAMILIES, ModelConfig, ModelFamily
from ..parallel.placement import init_sharded
from .config import TrainConfig
from .evaluate import has_decode_api, sample_tokens
from .extend import DECAY_START_DIR, is_decay_start, supersede_after
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
    MetricsHook,
    ProfileHook,
    ProgressHook,
    StepRecord,
    TrackerHook,
    TrainingDivergedError,
)
from .host_sync import ProfileWindow
from .loss import bits_per_byte, evaluate_loss
from .optim import learning_rate_schedule, lr_at, make_optimizer, trainable_params, wsd_decay_start
from .orbax_checkpoint import (
    CheckpointStore,
    latest_checkpoint,
    restore_newest_intact,
    save_checkpoint,
)
from .prepare import PreparedRun, prepare_run, run_config_dict
from .run_files import InterruptFlag, plot_metrics, truncate_metrics, write_partial_run_files
from .run_lock import hold_run_lock
from .step import (
    TrainStep,
    init_sharded_opt_state,
    make_train_step,
    mesh_layout,
    optimizer_and_step,
)
from .trackers import open_trackers


__all__ = ["TrainResult", "TrainingDivergedError", "run_config_dict", "steps", "train"]


@dataclasses.dataclass
class TrainResult:
    """What `train` returns: the final model and numbers, and where the run's files are."""

    model: Any
    model_config: ModelConfig
    tokenizer: Tokenizer
    step: int
    out_dir: str
    losses: dict[int, float]
    eval_loss: float | None
    bits_per_byte: float | None
    unigram_bits_per_byte: float | None
    sample: str | None
    seconds: float


@dataclasses.dataclass(frozen=True)
class TrainState:
    """Where the steps start: the model and optimizer state (built, or read on ``--resume``), the
    step that runs them, the step count so far and the loop's key; ``resumed`` is the checkpoint
    read (None: a new run) and ``damaged`` whether a newer damaged one was skipped."""

    model: PyTree
    opt_state: PyTree
    step_fn: TrainStep
    start_step: int
    loop_key: PRNGKeyArray
    resumed: str | None = None
    damaged: bool = False


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


# the run


def _no_log(message: str) -> None:
    del message


def train(
    cfg: TrainConfig,
    *,
    stop_after_step: int | None = None,
    log: Callable[[str], None] = print_line,
) -> TrainResult:
    """Run (or resume) training as configured; see the module docstring for what is written.
    The default `log` prints, and stops printing (the run goes on) when stdout is closed.

    `stop_after_step` ends the run early after that step (with a checkpoint), as an interruption
    would — used to test resuming. Process 0 holds `DIR/.lock` for the whole run: a second run
    into the same directory is refused at once, naming the holder (`run_lock.py`).
    """
    cfg.validate()  # before the lock creates the directory
    if not cfg.out:  # config.json records where the run really is
        cfg = dataclasses.replace(cfg, out=cfg.out_dir())
    lock = hold_run_lock(cfg.out_dir()) if jax.process_index() == 0 else contextlib.nullcontext()
    with lock:
        return _train(cfg, stop_after_step=stop_after_step, log=log)


def _train(
    cfg: TrainConfig, *, stop_after_step: int | None, log: Callable[[str], None]
) -> TrainResult:
    """Prepare, build the hooks, run the steps through them, end the run."""
    t_start = time.perf_counter()
    prepared = prepare_run(cfg)
    # In a multi-process run every process runs this loop; process 0 alone writes the run's files
    # and logs; checkpoints are written by all processes together (each its own shards).
    writer = jax.process_index() == 0
    state = init_train_state(cfg, prepared)
    if state.resumed is not None:  # the checkpoint read, which may be older than the newest
        prepared = dataclasses.replace(prepared, resume_from=state.resumed)
    end_step = cfg.steps if stop_after_step is None else min(cfg.steps, stop_after_step)
    run_config = run_config_dict(prepared)
    run = Run(cfg, prepared, state, run_config, writer, log if writer else _no_log, end_step)
    _begin_run_files(run)
    n_params = _log_model(run)
    hooks = RunHooks.build(run)
    model = state.model
    # Batches are read (this process's rows only) and placed on a background thread; the step
    # results stay on the device until a hook that needs them reads them.
    loader = BatchLoader(
        prepared.sampler,
        grad_accum=cfg.grad_accum,
        start_step=state.start_step,
        end_step=end_step,
        sharding=state.step_fn.batch_sharding,
        prefetch=cfg.prefetch,
    )
    with contextlib.ExitStack() as closing:  # the hooks close last to first, the loader first
        for hook in hooks.in_order():
            closing.callback(hook.close)
        closing.callback(loader.close)
        for record in steps(
            state,
            loader,
            hooks.scalars,
            tokens_per_step=_tokens_per_step(cfg),
            before=hooks.before_step,
        ):
            for hook in hooks.in_order():
                hook(record)
            model = record.model
    return _finish(run, hooks, model, n_params, time.perf_counter() - t_start)


def steps(
    state: TrainState,
    batches: Iterator[tuple[int, Any]] | Any,
    scalars: HostScalars,
    *,
    tokens_per_step: int,
    before: Callable[[int], None] = lambda step: None,
) -> Iterator[StepRecord]:
    """The step loop: one `StepRecord` per ``(step, batch)`` of ``batches``, after running
    ``state.step_fn`` on it with the key ``fold_in(loop_key, step)``. ``before(step)`` runs before
    each step is dispatched. The loss and gradient norm stay on the device (``scalars`` holds them
    until a hook reads them)."""
    model, opt_state = state.model, state.opt_state
    for step, batch in batches:
        before(step)
        step_key = jr.fold_in(state.loop_key, step)
        start = time.perf_counter()
        model, opt_state, loss, grad_norm = state.step_fn((batch, step_key), model, opt_state)
        seconds = time.perf_counter() - start
        scalars.add(step, loss, grad_norm)
        yield StepRecord(
            step, model, opt_state, loss, grad_norm, step * tokens_per_step, seconds, scalars
        )


def _tokens_per_step(cfg: TrainConfig) -> int:
    return cfg.grad_accum * cfg.batch_size * cfg.seq_len


# the state the steps start from


def init_train_state(cfg: TrainConfig, prepared: PreparedRun) -> TrainState:
    """The model, optimizer state and step of the run: built, or read from the checkpoint on
    ``--resume``; with ``--mesh`` born sharded (or read straight into their shardings, whatever
    mesh saved them): no array is ever whole on one device."""
    family = MODEL_FAMILIES[prepared.kind]
    init_key, loop_key = jr.split(jr.key(cfg.seed))
    # Shapes only (nothing allocated): the optimizer, the layout on a mesh and the templates a
    # checkpoint is checked against and read into are all made from this skeleton.
    skeleton = eqx.filter_eval_shape(family.build, prepared.model_config, key=init_key)
    restored = None
    if cfg.mesh:
        model, opt_state, step_fn, restored = _state_on_mesh(
            cfg, prepared, family, skeleton, init_key
        )
    elif prepared.resume_from is not None:
        optimizer, step_fn = optimizer_and_step(cfg, skeleton, prepared.model_config, family)
        templates = {"model": skeleton, "opt_state": _opt_skeleton(optimizer, skeleton)}
        restored = restore_newest_intact(prepared.resume_from, templates)
        model, opt_state = restored[0]["model"], restored[0]["opt_state"]
    else:
        model = family.build(prepared.model_config, key=init_key)
        optimizer, step_fn = optimizer_and_step(cfg, model, prepared.model_config, family)
        with jax.numpy_dtype_promotion("standard"):
            opt_state = optimizer.init(trainable_params(model))
    # The "auto" mLSTM backend times its candidates now, not while the step compiles (GPU only).
    tokens = jax.ShapeDtypeStruct((cfg.batch_size, cfg.seq_len), jnp.int32)
    tune_auto_backend(lambda m, t: m(t), model, tokens)
    if restored is None:
        return TrainState(model, opt_state, step_fn, 0, loop_key)
    _, meta, resumed, damaged = restored
    # A damaged newest checkpoint was skipped (with a warning): the run goes on from the one
    # read; the newer ones are moved aside, as the run will save those steps again.
    loop_key = jr.wrap_key_data(jnp.asarray(meta["rng_key"], jnp.uint32))
    damaged = bool(damaged or prepared.damaged)
    return TrainState(model, opt_state, step_fn, int(meta["step"]), loop_key, resumed, damaged)


def _state_on_mesh(
    cfg: TrainConfig,
    prepared: PreparedRun,
    family: ModelFamily,
    skeleton: PyTree,
    init_key: PRNGKeyArray,
) -> tuple[PyTree, PyTree, TrainStep, Any]:
    """`init_train_state` with ``--mesh``: ``(model, opt_state, step, restored or None)``."""
    optimizer = make_optimizer(cfg, skeleton, prepared.model_config, family)
    base = getattr(prepared.model_config, "parallel", None)
    layout = mesh_layout(cfg.mesh, skeleton, optimizer, base=base)
    restored = None
    if prepared.resume_from is not None:
        restored = restore_newest_intact(
            prepared.resume_from,
            {"model": skeleton, "opt_state": _opt_skeleton(optimizer, skeleton)},
            {"model": layout.model_shardings, "opt_state": layout.opt_shardings},
        )
        model, opt_state = restored[0]["model"], restored[0]["opt_state"]
    else:
        model = init_sharded(
            family.build,
            prepared.model_config,
            key=init_key,
            mesh=layout.mesh,
            parallel_config=layout.parallel_config,
        )
        opt_state = init_sharded_opt_state(optimizer, model, layout)
    step_fn = make_train_step(
        optimizer,
        mesh=layout.mesh,
        parallel_config=layout.parallel_config,
        model_specs=layout.model_specs,
        opt_specs=layout.opt_specs,
    )
    return model, opt_state, step_fn, restored


def _opt_skeleton(optimizer: optax.GradientTransformation, skeleton: PyTree) -> PyTree:
    with jax.numpy_dtype_promotion("standard"):
        return jax.eval_shape(optimizer.init, trainable_params(skeleton))


# the hooks


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

    def in_order(self) -> list[Hook]:
        hooks: list[Any] = [self.compile_notice, self.profile, self.evals, self.metrics]
        hooks += [self.trackers, self.progress, self.checkpoints, self.decay_save, self.interrupt]
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
        evals = EvalHook(Cadence.of(cfg.eval_every, [cfg.steps]), _evaluator(p))
        metrics = MetricsHook(
            Cadence.of(cfg.log_every, [1, cfg.steps]),
            evals,
            metrics_file,
            console,
            _schedule_fields(cfg, p),
            p.unigram_bpb,
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
        )


def _evaluator(p: PreparedRun) -> Callable[[PyTree], tuple[float, float]]:
    def evaluate(model: PyTree) -> tuple[float, float]:
        loss = evaluate_loss(model, p.eval_batches)
        return loss, bits_per_byte(loss, p.corpus.heldout_tokens_per_byte)

    return evaluate


def _schedule_fields(cfg: TrainConfig, p: PreparedRun) -> Callable[[int], tuple[float, float]]:
    """step -> (its learning rate, the epoch at its end), for the metrics rows."""
    schedule = learning_rate_schedule(cfg)

    def fields(step: int) -> tuple[float, float]:
        return lr_at(schedule, step - 1), round(p.sampler.epoch_of(step * cfg.grad_accum), 4)

    return fields


def _run_meta(run: Run) -> Callable[[int], dict[str, Any]]:
    """What a checkpoint of a step records beside the arrays (resume reads it back)."""
    rng_key = np.asarray(jax.random.key_data(run.state.loop_key)).tolist()

    def meta(step: int) -> dict[str, Any]:
        return {
            "step": step,
            "data_position": step * run.cfg.grad_accum,
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


def _begin_run_files(run: Run) -> None:
    """Everything is validated: only now is anything written (`config.json`, the metrics cut
    back to the resumed step, newer checkpoints moved aside)."""
    p, out, start_step = run.prepared, run.out, run.state.start_step
    if run.writer:
        os.makedirs(out, exist_ok=True)
        write_json_atomic(os.path.join(out, "config.json"), run.run_config)
        if p.resume_from is None:
            if os.path.exists(run.metrics_path):
                os.remove(run.metrics_path)
        else:
            truncate_metrics(run.metrics_path, start_step)
            if is_decay_start(p.resume_from, out):
                for path in supersede_after(run.checkpoint_root, start_step, out):
                    run.log(f"extending the wsd run: moved {path} (the old decay) aside")
            elif run.state.damaged:
                for path in supersede_after(run.checkpoint_root, start_step, out):
                    run.log(f"moved {path} aside (newer than step {start_step}, which resumes)")
    if p.resume_from is not None:
        run.log(f"resumed from {run.as_given(p.resume_from)} at step {start_step}")


def _log_model(run: Run) -> int:
    """The run's first line: the model, the data, the tokens per step. Returns the number of
    trainable parameters."""
    p = run.prepared
    n_params = sum(x.size for x in jax.tree.leaves(trainable_params(run.state.model)))
    run.log(
        f"model {p.kind} ({n_params / 1e6:.2f}M parameters), "
        f"data: {len(p.corpus.sources)} file(s), {len(p.corpus.train):,} train / "
        f"{len(p.corpus.heldout):,} held-out tokens, {_tokens_per_step(run.cfg):,} tokens per step"
    )
    return int(n_params)


def _finish(run: Run, hooks: RunHooks, model: PyTree, n_params: int, seconds: float) -> TrainResult:
    """The end of a run: the plot, the held-out numbers, the sample, `summary.json`, the last
    lines of the log."""
    cfg, p, out, writer = run.cfg, run.prepared, run.out, run.writer
    final_step = max(run.state.start_step, run.end_step)
    png = plot_metrics(run.metrics_path, os.path.join(out, "loss.png")) if writer else None
    held_out = hooks.evals.latest
    eval_loss, bpb = (held_out.loss, held_out.bits_per_byte) if held_out else (None, None)
    if held_out is None and p.resume_from is not None and final_step == run.state.start_step:
        eval_loss, bpb = _evaluator(p)(model)
    sample = None
    if final_step == cfg.steps and cfg.sample_tokens > 0:
        sample = _sample(model, p, cfg)
    last = hooks.checkpoints.last.path
    summary = {
        "step": final_step,
        "steps": cfg.steps,
        "eval_loss": eval_loss,
        "bits_per_byte": bpb,
        "unigram_bits_per_byte": p.unigram_bpb,
        "parameters": n_params,
        "seconds": round(seconds, 1),
        "checkpoint": last,
        "checkpoints_saved": len(hooks.checkpoints.blocked),
        "checkpoint_seconds_blocked": round(sum(hooks.checkpoints.blocked), 3),
    }
    if writer:
        write_json_atomic(os.path.join(out, "summary.json"), summary)
    _log_end(run, final_step, eval_loss, bpb, sample, png, last)
    return TrainResult(
        model=model,
        model_config=p.model_config,
        tokenizer=p.tokenizer,
        step=final_step,
        out_dir=out,
        losses=hooks.scalars.losses,
        eval_loss=eval_loss,
        bits_per_byte=bpb,
        unigram_bits_per_byte=p.unigram_bpb,
        sample=sample,
        seconds=seconds,
    )


def _log_end(
    run: Run,
    final_step: int,
    eval_loss: float | None,
    bpb: float | None,
    sample: str | None,
    png: str | None,
    checkpoint: str | None,
) -> None:
    cfg, unigram = run.cfg, run.prepared.unigram_bpb
    if eval_loss is not None and bpb is not None:
        run.log(
            f"held-out after step {final_step}: loss {eval_loss:.4f} nats/token, "
            f"{bpb:.3f} bits/byte (unigram baseline {unigram:.3f} bits/byte)"
        )
    if sample is not None:  # before the files written: that line is the run's last
        run.log(f"sample (temperature {cfg.sample_temperature}):\n{cfg.sample_prompt}{sample}")
    if run.writer:
        if png is None:
            run.log("(pip install matplotlib for loss.png)")
        run.log("wrote " + ", ".join(_written_files(run, png, checkpoint)))


def _written_files(run: Run, png: str | None, checkpoint: str | None) -> list[str]:
    """The run's files, each as a path under `out` as the user gave it (a checkpoint path may
    have been made absolute for orbax)."""
    out = run.out
    files = [run.metrics_path]
    files += [png] if png else []
    files.append(os.path.join(out, "summary.json"))
    if checkpoint:
        files.append(run.as_given(checkpoint))
    files += [os.path.join(out, t) for t in run.cfg.trackers() if t in ("tensorboard", "wandb")]
    return files


def _sample(model: PyTree, p: PreparedRun, cfg: TrainConfig) -> str:
    """The end-of-run sample: `generate` (prefill + recurrent/KV-cache steps) for models with a
    decode API, else the full-forward loop of `sample_tokens`."""

    prompt = [int(t) for t in p.tokenizer.encode(cfg.sample_prompt)]
    key = jr.fold_in(jr.key(cfg.seed), 2**20)
    if prompt and has_decode_api(model):
        out = generate(
            model,
            jnp.asarray(prompt, jnp.int32)[None, :],
            cfg.sample_tokens,
            temperature=cfg.sample_temperature,
            key=key,
        )
        ids = np.asarray(out)[0, len(prompt) :]
    else:
        ids = sample_tokens(
            model,
            prompt,
            cfg.sample_tokens,
            window=cfg.seq_len,
            temperature=cfg.sample_temperature,
            key=key,
        )
    return p.tokenizer.decode(np.asarray(ids, np.int32))
