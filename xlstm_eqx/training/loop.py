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
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.random as jr

from ..core.console import print_line
from ..data.loader import BatchLoader
from .config import TrainConfig
from .hooks import HostScalars, StepRecord, TrainingDivergedError
from .lm_eval import check_lm_eval_tasks
from .prepare import prepare_run, run_config_dict
from .run_ends import TrainResult, begin_run_files, finish_run, log_model
from .run_files import keep_source_tokenizer
from .run_hooks import Run, RunHooks
from .run_lock import hold_run_lock
from .train_state import TrainState, init_train_state


__all__ = ["TrainResult", "TrainingDivergedError", "run_config_dict", "steps", "train"]


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
    check_lm_eval_tasks(cfg)  # lm-eval installed and the tasks known, before any work
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
    prepared = keep_source_tokenizer(prepare_run(cfg), write=jax.process_index() == 0)
    # In a multi-process run every process runs this loop; process 0 alone writes the run's files
    # and logs; checkpoints are written by all processes together (each its own shards).
    writer = jax.process_index() == 0
    state = init_train_state(cfg, prepared)
    if state.resumed is not None:  # the checkpoint read, which may be older than the newest
        prepared = dataclasses.replace(prepared, resume_from=state.resumed)
    end_step = cfg.steps if stop_after_step is None else min(cfg.steps, stop_after_step)
    run_config = run_config_dict(prepared)
    run = Run(cfg, prepared, state, run_config, writer, log if writer else _no_log, end_step)
    begin_run_files(run)
    n_params = log_model(run)
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
        layout=run.ramp.layout if run.ramp.active else None,
    )
    with contextlib.ExitStack() as closing:  # the hooks close last to first, the loader first
        for hook in hooks.in_order():
            closing.callback(hook.close)
        closing.callback(loader.close)
        for record in steps(
            state,
            loader,
            hooks.scalars,
            tokens_per_step=run.tokens_per_step,
            before=hooks.before_step,
            tokens_through=run.tokens_through,
        ):
            for hook in hooks.in_order():
                hook(record)
            model = record.model
    return finish_run(run, hooks, model, n_params, time.perf_counter() - t_start)


def steps(
    state: TrainState,
    batches: Iterator[tuple[int, Any]] | Any,
    scalars: HostScalars,
    *,
    tokens_per_step: int,
    before: Callable[[int], None] = lambda step: None,
    tokens_through: Callable[[int], int] | None = None,
) -> Iterator[StepRecord]:
    """The step loop: one `StepRecord` per ``(step, batch)`` of ``batches``, after running
    ``state.step_fn`` on it with the key ``fold_in(loop_key, step)``. ``before(step)`` runs before
    each step is dispatched. The loss and gradient norm stay on the device (``scalars`` holds them
    until a hook reads them). The records' tokens so far are ``tokens_through(step)`` (default:
    ``step * tokens_per_step``; a batch-size ramp's differ)."""
    model, opt_state = state.model, state.opt_state
    count = tokens_through or (lambda step: step * tokens_per_step)
    for step, batch in batches:
        before(step)
        step_key = jr.fold_in(state.loop_key, step)
        start = time.perf_counter()
        model, opt_state, loss, grad_norm = state.step_fn((batch, step_key), model, opt_state)
        seconds = time.perf_counter() - start
        scalars.add(step, loss, grad_norm)
        yield StepRecord(step, model, opt_state, loss, grad_norm, count(step), seconds, scalars)
