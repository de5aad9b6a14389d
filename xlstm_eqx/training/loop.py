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
import json
import math
import os
import time
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from tqdm.auto import tqdm

from ..cell.autotune import tune_auto_backend
from ..core.console import print_line, silence_stdout
from ..core.files import open_append, write_json_atomic
from ..data.loader import BatchLoader
from ..data.tokenizer import Tokenizer
from ..generation import generate
from ..models import MODEL_FAMILIES
from ..parallel.placement import init_sharded
from .config import TrainConfig
from .evaluate import has_decode_api, sample_tokens
from .extend import DECAY_START_DIR, is_decay_start, supersede_after
from .host_sync import PendingScalars, ProfileWindow
from .loss import bits_per_byte, evaluate_loss
from .optim import _lr_at, learning_rate_schedule, make_optimizer, trainable_params, wsd_decay_start
from .orbax_checkpoint import (
    CheckpointStore,
    latest_checkpoint,
    restore_newest_intact,
    save_checkpoint,
)
from .prepare import _prepare, _Prepared, run_config_dict
from .run_files import (
    _InterruptFlag,
    _truncate_metrics,
    _write_partial_run_files,
    plot_metrics,
)
from .run_lock import hold_run_lock
from .step import (
    _optimizer_and_step,
    init_sharded_opt_state,
    make_sharded_train_step,
    mesh_layout,
)
from .trackers import open_trackers


# run bookkeeping


class TrainingDivergedError(FloatingPointError):
    """The loss became NaN or infinite; the run stopped before writing anything after it."""

    def __init__(self, message: str, step: int, last_checkpoint: str | None):
        super().__init__(message)
        self.step = step
        self.last_checkpoint = last_checkpoint


@dataclasses.dataclass
class TrainResult:
    """What `train` returns: the final model and numbers, and where the run's files are."""

    model: Any
    model_config: Any
    tokenizer: Tokenizer
    step: int
    out_dir: str
    losses: dict[int, float]
    eval_loss: float | None
    bits_per_byte: float | None
    unigram_bits_per_byte: float | None
    sample: str | None
    seconds: float


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
    cfg: TrainConfig,
    *,
    stop_after_step: int | None,
    log: Callable[[str], None],
) -> TrainResult:
    t_start = time.perf_counter()
    p = _prepare(cfg)
    # In a multi-process run every process runs this loop; process 0 alone writes the run's files
    # and logs; checkpoints are written by all processes together (each its own shards).
    writer = jax.process_index() == 0
    if not writer:
        log = _no_log
    out = cfg.out_dir()
    ckpt_root = os.path.join(out, "checkpoints")
    metrics_path = os.path.join(out, "metrics.jsonl")
    family = MODEL_FAMILIES[p.kind]

    key = jr.key(cfg.seed)
    init_key, loop_key = jr.split(key)
    # Shapes only (nothing allocated): the optimizer, the layout on a mesh and the templates a
    # checkpoint is checked against and read into are all made from this skeleton.
    skeleton = eqx.filter_eval_shape(family.build, p.model_config, key=init_key)
    start_step = 0
    if cfg.mesh:
        # Born sharded: parameters and optimizer state are created (or read from the
        # checkpoint) directly in their shardings; no array is ever whole on one device.
        optimizer = make_optimizer(cfg, skeleton, p.model_config, family)
        layout = mesh_layout(
            cfg.mesh, skeleton, optimizer, base=getattr(p.model_config, "parallel", None)
        )
        if p.resume_from is not None:
            opt_skeleton = _opt_skeleton(optimizer, skeleton)
            trees, meta, resumed, damaged = restore_newest_intact(
                p.resume_from,
                {"model": skeleton, "opt_state": opt_skeleton},
                {"model": layout.model_shardings, "opt_state": layout.opt_shardings},
            )
            model, opt_state = trees["model"], trees["opt_state"]
        else:
            model = init_sharded(
                family.build,
                p.model_config,
                key=init_key,
                mesh=layout.mesh,
                parallel_config=layout.parallel_config,
            )
            opt_state = init_sharded_opt_state(optimizer, model, layout)
        step_fn = make_sharded_train_step(
            optimizer, layout.mesh, layout.parallel_config, layout.model_specs, layout.opt_specs
        )
    elif p.resume_from is not None:
        optimizer, step_fn = _optimizer_and_step(cfg, skeleton, p.model_config, family)
        trees, meta, resumed, damaged = restore_newest_intact(
            p.resume_from, {"model": skeleton, "opt_state": _opt_skeleton(optimizer, skeleton)}
        )
        model, opt_state = trees["model"], trees["opt_state"]
    else:
        model = family.build(p.model_config, key=init_key)
        optimizer, step_fn = _optimizer_and_step(cfg, model, p.model_config, family)
        with jax.numpy_dtype_promotion("standard"):
            opt_state = optimizer.init(trainable_params(model))
    # The "auto" mLSTM backend times its candidates now, not while the step compiles (GPU only).
    tokens = jax.ShapeDtypeStruct((cfg.batch_size, cfg.seq_len), jnp.int32)
    tune_auto_backend(lambda m, t: m(t), model, tokens)
    if p.resume_from is not None:
        # A damaged newest checkpoint was skipped (with a warning): the run goes on from the one
        # read; the newer ones are moved aside, as the run will save those steps again.
        p = dataclasses.replace(p, resume_from=resumed)
        start_step = int(meta["step"])
        loop_key = jr.wrap_key_data(jnp.asarray(meta["rng_key"], jnp.uint32))

    # Everything is validated: only now is anything written.
    run_config = run_config_dict(p)
    if writer:
        os.makedirs(out, exist_ok=True)
        write_json_atomic(os.path.join(out, "config.json"), run_config)
        if p.resume_from is None:
            if os.path.exists(metrics_path):
                os.remove(metrics_path)
        else:
            _truncate_metrics(metrics_path, start_step)
            if is_decay_start(p.resume_from, out):
                for path in supersede_after(ckpt_root, start_step, out):
                    log(f"extending the wsd run: moved {path} (the old decay) aside")
            elif damaged or p.damaged:
                for path in supersede_after(ckpt_root, start_step, out):
                    log(f"moved {path} aside (newer than step {start_step}, which resumes)")
    if p.resume_from is not None:
        log(f"resumed from {_as_given(p.resume_from, out)} at step {start_step}")

    n_params = sum(x.size for x in jax.tree.leaves(trainable_params(model)))
    tokens_per_step = cfg.grad_accum * cfg.batch_size * cfg.seq_len
    log(
        f"model {p.kind} ({n_params / 1e6:.2f}M parameters), "
        f"data: {len(p.corpus.sources)} file(s), {len(p.corpus.train):,} train / "
        f"{len(p.corpus.heldout):,} held-out tokens, {tokens_per_step:,} tokens per step"
    )
    schedule = learning_rate_schedule(cfg)
    losses: dict[int, float] = {}
    eval_loss = bpb = None
    last_ckpt = latest_checkpoint(ckpt_root)
    last_ckpt_step = start_step if p.resume_from else 0
    blocked: list[float] = []  # seconds each save held the loop up

    def run_meta(step: int) -> dict[str, Any]:
        """What a checkpoint of `step` records beside the arrays (resume reads it back)."""
        return {
            "step": step,
            "data_position": step * cfg.grad_accum,
            "rng_key": np.asarray(jax.random.key_data(loop_key)).tolist(),
            "run_config": run_config,
        }

    def checkpoint(step: int) -> str:
        t0 = time.perf_counter()
        path = store.save(step, {"model": model, "opt_state": opt_state}, run_meta(step))
        blocked.append(time.perf_counter() - t0)
        return path

    def save_decay_start(step: int) -> None:
        """Where an extension of a wsd run restarts (training/extend.py): one synchronous save,
        once per run, into its own directory."""
        trees = {"model": model, "opt_state": opt_state}
        save_checkpoint(os.path.join(out, DECAY_START_DIR), step, trees, run_meta(step), keep=1)

    end_step = cfg.steps if stop_after_step is None else min(cfg.steps, stop_after_step)
    bar = None
    if cfg.progress and writer:
        bar = tqdm(
            total=cfg.steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True
        )
    interval_start = time.perf_counter()
    interval_steps = 0
    trackers = open_trackers(cfg.trackers() if writer else [], out, cfg.tracker_project, run_config)
    interrupt = _InterruptFlag(log)
    metrics_file = open_append(metrics_path if writer else os.devnull)  # closed in finally
    # Batches are read (this process's rows only) and placed on a background thread; the step
    # results stay on the device until a step that logs, evaluates or checkpoints reads them.
    loader = BatchLoader(
        p.sampler,
        grad_accum=cfg.grad_accum,
        start_step=start_step,
        end_step=end_step,
        sharding=getattr(step_fn, "batch_sharding", None),
        prefetch=cfg.prefetch,
    )
    pending = PendingScalars()

    def say(line: str) -> None:
        """A line of the run's log, above the progress bar when there is one."""
        if bar is not None and log is print_line:
            try:
                bar.write(line)
            except BrokenPipeError:
                silence_stdout()
        else:
            log(line)

    def drain() -> tuple[float, float]:
        """Read the pending steps' loss and gradient norm; stop at the first non-finite one.
        Returns the newest step's."""
        last = (math.nan, math.nan)
        for s, (loss_s, gnorm_s) in pending.read():
            if not (math.isfinite(loss_s) and math.isfinite(gnorm_s)):
                what = f"loss {loss_s}" if not math.isfinite(loss_s) else f"gradient norm {gnorm_s}"
                where = (
                    f"last good checkpoint: {last_ckpt} (step {last_ckpt_step})"
                    if last_ckpt
                    else "no checkpoint was written"
                )
                raise TrainingDivergedError(
                    f"training stopped at step {s}: {what} is not finite; nothing was saved "
                    f"after step {last_ckpt_step}; {where}. Try a lower --lr or --grad-clip.",
                    s,
                    last_ckpt,
                )
            losses[s] = loss_s
            last = (loss_s, gnorm_s)
        return last

    profile = ProfileWindow(cfg.profile_steps, os.path.join(out, "profile"))
    # Every process saves (each writes its own shards); saves are asynchronous: `save` returns
    # once the arrays are off the devices and the next steps run while the files are written.
    store = CheckpointStore(ckpt_root, keep=cfg.keep_checkpoints)
    try:
        for step, batch in loader:
            step_key = jr.fold_in(loop_key, step)
            profile.before(step)
            profiling = profile.active
            if compiling := step == start_step + 1:  # the first call traces and compiles
                say("compiling the train step…")
                t_compile = time.perf_counter()
            model, opt_state, loss, grad_norm = step_fn((batch, step_key), model, opt_state)
            if compiling:
                say(f"compiled in {time.perf_counter() - t_compile:.1f} s")
            profile.after(step, loss)
            if profiling and not profile.active:
                say(f"wrote the profile trace of steps {cfg.profile_steps} to {profile.directory}")
            pending.add(step, loss, grad_norm)
            interval_steps += 1
            if bar is not None:
                bar.update(1)
            do_log = step % cfg.log_every == 0 or step == 1 or step == cfg.steps
            do_eval = step % cfg.eval_every == 0 or step == cfg.steps
            do_ckpt = step % cfg.checkpoint_every == 0 or step == end_step
            if do_log or do_eval or do_ckpt:
                loss_f, gnorm_f = drain()
            if do_log or do_eval:
                now = time.perf_counter()
                tok_s = interval_steps * tokens_per_step / max(now - interval_start, 1e-9)
                row = {
                    "step": step,
                    "loss": loss_f,
                    "lr": _lr_at(schedule, step - 1),
                    "grad_norm": gnorm_f,
                    "tokens": step * tokens_per_step,
                    "epoch": round(p.sampler.epoch_of(step * cfg.grad_accum), 4),
                    "tokens_per_s": round(tok_s, 1),
                }
                if do_eval:
                    eval_loss = evaluate_loss(model, p.eval_batches)
                    bpb = bits_per_byte(eval_loss, p.corpus.heldout_tokens_per_byte)
                    row["eval_loss"] = eval_loss
                    row["bits_per_byte"] = bpb
                    row["unigram_bits_per_byte"] = p.unigram_bpb
                metrics_file.write(json.dumps(row) + "\n")
                metrics_file.flush()
                trackers.log(row)
                if bar is not None:
                    post = {"loss": f"{loss_f:.3f}", "tok/s": f"{tok_s:,.0f}"}
                    if bpb is not None:
                        post["bpb"] = f"{bpb:.3f}"
                    bar.set_postfix(post, refresh=False)
                if do_eval:  # every evaluation gets a line, beside the unigram baseline
                    say(
                        f"step {step}: loss {loss_f:.4f}, held-out {eval_loss:.4f} nats/token, "
                        f"{bpb:.3f} bits/byte (unigram baseline {p.unigram_bpb:.3f})"
                    )
                interval_start, interval_steps = time.perf_counter(), 0
            # All processes stop at the same step, whichever of them got the signal.
            stop = interrupt.agreed()
            if do_ckpt or stop:
                drain()  # never a checkpoint after a non-finite loss
                last_ckpt, last_ckpt_step = checkpoint(step), step
            if cfg.schedule == "wsd" and step == wsd_decay_start(cfg):
                drain()  # where an extension of this run restarts (see training/extend.py)
                save_decay_start(step)
            if stop:
                store.wait()
                if writer:  # the plot and summary of the steps done, as a finished run has
                    metrics_file.flush()
                    _write_partial_run_files(out, metrics_path, step, cfg.steps, last_ckpt)
                who = "" if interrupt.set else " (another process was interrupted)"
                log(
                    f"\ninterrupted after step {step}{who}; saved {_as_given(last_ckpt, out)}; "
                    "continue with --resume"
                )
                raise KeyboardInterrupt
    finally:
        profile.stop()
        loader.close()
        trackers.close()
        interrupt.restore()
        metrics_file.close()
        if bar is not None:
            bar.close()
        store.close()  # waits for the last write: a run ends with its checkpoints committed

    final_step = max(start_step, end_step)
    png = plot_metrics(metrics_path, os.path.join(out, "loss.png")) if writer else None
    if eval_loss is None and p.resume_from is not None and final_step == start_step:
        eval_loss = evaluate_loss(model, p.eval_batches)
        bpb = bits_per_byte(eval_loss, p.corpus.heldout_tokens_per_byte)
    sample = None
    if final_step == cfg.steps and cfg.sample_tokens > 0:
        sample = _sample(model, p, cfg)
    seconds = time.perf_counter() - t_start
    summary = {
        "step": final_step,
        "steps": cfg.steps,
        "eval_loss": eval_loss,
        "bits_per_byte": bpb,
        "unigram_bits_per_byte": p.unigram_bpb,
        "parameters": int(n_params),
        "seconds": round(seconds, 1),
        "checkpoint": last_ckpt,
        "checkpoints_saved": len(blocked),
        "checkpoint_seconds_blocked": round(sum(blocked), 3),
    }
    if writer:
        write_json_atomic(os.path.join(out, "summary.json"), summary)
    if bpb is not None:
        log(
            f"held-out after step {final_step}: loss {eval_loss:.4f} nats/token, "
            f"{bpb:.3f} bits/byte (unigram baseline {p.unigram_bpb:.3f} bits/byte)"
        )
    if sample is not None:  # before the files written: that line is the run's last
        log(f"sample (temperature {cfg.sample_temperature}):\n{cfg.sample_prompt}{sample}")
    if writer:
        if png is None:
            log("(pip install matplotlib for loss.png)")
        log("wrote " + ", ".join(_written_files(out, png, last_ckpt, cfg)))
    return TrainResult(
        model=model,
        model_config=p.model_config,
        tokenizer=p.tokenizer,
        step=final_step,
        out_dir=out,
        losses=losses,
        eval_loss=eval_loss,
        bits_per_byte=bpb,
        unigram_bits_per_byte=p.unigram_bpb,
        sample=sample,
        seconds=seconds,
    )


def _written_files(
    out: str, png: str | None, checkpoint: str | None, cfg: TrainConfig
) -> list[str]:
    """The run's files, each as a path under `out` as the user gave it (a checkpoint path may
    have been made absolute for orbax)."""
    files = [os.path.join(out, "metrics.jsonl")]
    files += [png] if png else []
    files.append(os.path.join(out, "summary.json"))
    if checkpoint:
        files.append(_as_given(checkpoint, out))
    files += [os.path.join(out, t) for t in cfg.trackers() if t in ("tensorboard", "wandb")]
    return files


def _as_given(path: str, out: str) -> str:
    """A path under `out` as the user gave `out` (relative stays relative), though orbax's
    checkpoint paths are absolute; a path elsewhere as it is."""
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(out))
    return path if rel.startswith("..") else os.path.join(out, rel)


def _opt_skeleton(optimizer: Any, skeleton: Any) -> Any:
    with jax.numpy_dtype_promotion("standard"):
        return jax.eval_shape(optimizer.init, trainable_params(skeleton))


def _sample(model: Any, p: _Prepared, cfg: TrainConfig) -> str:
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
