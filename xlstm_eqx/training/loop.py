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
   `DIR/loss.png`, `DIR/checkpoints/step_*` (the last `keep_checkpoints`), `DIR/summary.json`.

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

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from tqdm.auto import tqdm

from ..cell.autotune import tune_auto_backend
from ..core.files import _write_json_atomic
from ..data.corpus import BatchSampler, Corpus, eval_windows
from ..data.loader import BatchLoader, load_corpus_all_processes
from ..data.tokenizer import Tokenizer, load_tokenizer, tokenizer_from_dict
from ..generation import generate
from ..models import MODEL_FAMILIES
from .checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_metadata,
    restore_checkpoint,
    save_checkpoint,
    save_sharded_checkpoint,
)
from .config import RESUMABLE_FIELDS, TrainConfig, check_sequence_length, resolve_model_config
from .evaluate import has_decode_api, sample_tokens
from .extend import DECAY_START_DIR, is_decay_start, resume_point, supersede_after
from .host_sync import PendingScalars, ProfileWindow
from .loss import bits_per_byte, evaluate_loss
from .optim import _lr_at, learning_rate_schedule, trainable_params, wsd_decay_start
from .preflight import check_mesh, check_out_dir, check_resume_steps
from .run_files import (
    _InterruptFlag,
    _truncate_metrics,
    _write_partial_run_files,
    plot_metrics,
)
from .run_lock import hold_run_lock
from .step import _optimizer_and_step, shard_train_state
from .trackers import check_trackers_available, open_trackers


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


@dataclasses.dataclass
class _Prepared:
    cfg: TrainConfig
    kind: str
    model_config: Any
    tokenizer: Tokenizer
    corpus: Corpus
    sampler: BatchSampler
    eval_batches: list[np.ndarray]
    unigram_bpb: float
    resume_from: str | None
    resume_meta: dict[str, Any] | None


def _compatible(saved: dict[str, Any], cfg: TrainConfig, path: str) -> None:
    given = cfg.to_dict()
    default = TrainConfig().to_dict()  # a field the run predates had its default value
    diffs = [
        f"{k}: checkpoint has {saved.get(k, default[k])!r}, given {given[k]!r}"
        for k in given
        if k not in RESUMABLE_FIELDS and saved.get(k, default[k]) != given[k]
    ]
    if diffs:
        raise ValueError(
            f"--resume: the run in {path!r} was made with a different config:\n  "
            + "\n  ".join(diffs)
        )


def _prepare(cfg: TrainConfig) -> _Prepared:
    cfg.validate()
    if jax.process_index() == 0:
        check_trackers_available(cfg.trackers())
    out = cfg.out_dir()
    ckpt_root = os.path.join(out, "checkpoints")
    resume_from = resume_meta = None
    saved_run: dict[str, Any] | None = None
    if cfg.resume:
        resume_from = latest_checkpoint(ckpt_root)
        if resume_from is None:
            raise FileNotFoundError(f"--resume: no checkpoint found in {ckpt_root!r}")
        resume_meta = load_metadata(resume_from)
        saved_run = resume_meta.get("metadata", {}).get("run_config")
        if not isinstance(saved_run, dict) or "train" not in saved_run:
            raise CheckpointError(f"checkpoint {resume_from!r} has no run configuration")
        _compatible(saved_run["train"], cfg, out)
        check_resume_steps(cfg.steps, int(resume_meta.get("step", 0)), out)
        # A wsd run extended past the decay it began restarts from that decay's start.
        chosen = resume_point(cfg, saved_run["train"], resume_from, int(resume_meta["step"]), out)
        if chosen != resume_from:
            resume_from, resume_meta = chosen, load_metadata(chosen)
    elif list_checkpoints(ckpt_root):
        raise FileExistsError(
            f"{out!r} already holds a run with checkpoints; pass --resume to continue it "
            "or choose another --out"
        )
    else:
        check_out_dir(out)

    if saved_run is not None:
        tokenizer = tokenizer_from_dict(saved_run["tokenizer"])
        kind = saved_run["model_kind"]
        if kind not in MODEL_FAMILIES:
            raise CheckpointError(f"checkpoint {resume_from!r}: unknown model kind {kind!r}")
        model_config = MODEL_FAMILIES[kind].config_from_dict(saved_run["model_config"])
    else:
        tokenizer = load_tokenizer(cfg.tokenizer)
        kind, model_config = resolve_model_config(cfg, tokenizer)
    check_sequence_length(cfg.seq_len, model_config)
    if cfg.mesh:  # before the data is read
        check_mesh(cfg.mesh, model_config)
    vocab = int(model_config.vocab_size)

    corpus = load_corpus_all_processes(
        cfg.data,
        tokenizer,
        text_field=cfg.text_field,
        eval_fraction=cfg.eval_fraction,
        max_bytes=cfg.max_data_bytes,
        split=cfg.data_split,
        eod_token=cfg.eod_token,
        cache_dir=cfg.data_cache or None,
        # On --resume: the data must be what the run was trained on.
        expected=(saved_run or {}).get("data", {}).get("identity"),
        where=f"--resume {out!r}",
    )
    corpus.check_vocab(vocab)
    sampler = BatchSampler(
        corpus.train_reader, seq_len=cfg.seq_len, batch_size=cfg.batch_size, seed=cfg.seed
    )
    batches = eval_windows(
        corpus.heldout_reader,
        seq_len=cfg.seq_len,
        batch_size=cfg.batch_size,
        max_batches=cfg.eval_batches,
    )
    # The baseline: every held-out token under the training text's token frequencies.
    unigram = corpus.unigram_bits_per_byte(vocab)
    return _Prepared(
        cfg,
        kind,
        model_config,
        tokenizer,
        corpus,
        sampler,
        batches,
        unigram,
        resume_from,
        resume_meta,
    )


def run_config_dict(p: _Prepared) -> dict[str, Any]:
    return {
        "train": p.cfg.to_dict(),
        "model_kind": p.kind,
        "model_config": p.model_config.to_dict(),
        "tokenizer": p.tokenizer.to_dict(),
        "data": {
            "sources": list(p.corpus.sources)[:50],
            "num_sources": len(p.corpus.sources),
            "num_documents": p.corpus.num_documents,
            "train_tokens": int(len(p.corpus.train)),
            "heldout_tokens": int(len(p.corpus.heldout)),
            "heldout_bytes": p.corpus.heldout_bytes,
            "eod_id": p.corpus.eod_id,
            "store": p.corpus.store_dir,
            "identity": p.corpus.identity,
        },
    }


def _no_log(message: str) -> None:
    del message


def train(
    cfg: TrainConfig,
    *,
    stop_after_step: int | None = None,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Run (or resume) training as configured; see the module docstring for what is written.

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
    # and logs (checkpoints are gathered from all processes first).
    writer = jax.process_index() == 0
    if not writer:
        log = _no_log
    out = cfg.out_dir()
    ckpt_root = os.path.join(out, "checkpoints")
    metrics_path = os.path.join(out, "metrics.jsonl")
    family = MODEL_FAMILIES[p.kind]

    key = jr.key(cfg.seed)
    init_key, loop_key = jr.split(key)
    # On resume these fresh arrays are the templates the checkpoint is checked against and
    # loaded into (a shape-only skeleton would do for the model, but the optimizer state and
    # the decay mask are derived from real leaves; the models trained here are small).
    model = family.build(p.model_config, key=init_key)
    # The "auto" mLSTM backend times its candidates now, not while the step compiles (GPU only).
    tokens = jax.ShapeDtypeStruct((cfg.batch_size, cfg.seq_len), jnp.int32)
    tune_auto_backend(lambda m, t: m(t), model, tokens)
    optimizer, step_fn = _optimizer_and_step(cfg, model, p.model_config, family)
    with jax.numpy_dtype_promotion("standard"):
        opt_state = optimizer.init(trainable_params(model))
    start_step = 0
    if p.resume_from is not None:
        trees, meta = restore_checkpoint(p.resume_from, {"model": model, "opt_state": opt_state})
        model, opt_state = trees["model"], trees["opt_state"]
        start_step = int(meta["step"])
        loop_key = jr.wrap_key_data(jnp.asarray(meta["rng_key"], jnp.uint32))
    if cfg.mesh:  # place model and optimizer state on the mesh; the step shards each batch
        model, opt_state, step_fn, _ = shard_train_state(
            cfg.mesh, model, opt_state, optimizer, base=getattr(p.model_config, "parallel", None)
        )

    # Everything is validated: only now is anything written.
    run_config = run_config_dict(p)
    if writer:
        os.makedirs(out, exist_ok=True)
        _write_json_atomic(os.path.join(out, "config.json"), run_config)
        if p.resume_from is None:
            if os.path.exists(metrics_path):
                os.remove(metrics_path)
        else:
            _truncate_metrics(metrics_path, start_step)
            if is_decay_start(p.resume_from, out):
                for path in supersede_after(ckpt_root, start_step, out):
                    log(f"extending the wsd run: moved {path} (the old decay) aside")
    if p.resume_from is not None:
        log(f"resumed from {p.resume_from} at step {start_step}")

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

    def checkpoint(
        step: int, root: str = ckpt_root, keep: int | None = cfg.keep_checkpoints
    ) -> str | None:
        meta = {
            "step": step,
            "data_position": step * cfg.grad_accum,
            "rng_key": np.asarray(jax.random.key_data(loop_key)).tolist(),
            "run_config": run_config,
        }
        save = save_checkpoint
        if cfg.mesh:  # gathered from every process (a collective: all call it), written by 0
            save = save_sharded_checkpoint
        trees = {"model": model, "opt_state": opt_state}
        return save(root, step, trees, meta, keep=keep)

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
    metrics_file = open(metrics_path if writer else os.devnull, "a")  # noqa: SIM115 - closed in finally
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
    try:
        for step, batch in loader:
            step_key = jr.fold_in(loop_key, step)
            profile.before(step)
            model, opt_state, loss, grad_norm = step_fn((batch, step_key), model, opt_state)
            profile.after(step, loss)
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
                    line = (
                        f"step {step}: loss {loss_f:.4f}, held-out {eval_loss:.4f} nats/token, "
                        f"{bpb:.3f} bits/byte (unigram baseline {p.unigram_bpb:.3f})"
                    )
                    if bar is not None and log is print:
                        bar.write(line)
                    else:
                        log(line)
                interval_start, interval_steps = time.perf_counter(), 0
            if do_ckpt or interrupt.set:
                drain()  # (an interrupt may come at any time)
                last_ckpt, last_ckpt_step = checkpoint(step), step
            if cfg.schedule == "wsd" and step == wsd_decay_start(cfg):
                drain()  # where an extension of this run restarts (see training/extend.py)
                checkpoint(step, os.path.join(out, DECAY_START_DIR), 1)
            if interrupt.set:
                if writer:  # the plot and summary of the steps done, as a finished run has
                    metrics_file.flush()
                    _write_partial_run_files(out, metrics_path, step, cfg.steps, last_ckpt)
                log(f"\ninterrupted after step {step}; saved {last_ckpt}; continue with --resume")
                raise KeyboardInterrupt
    finally:
        profile.stop()
        loader.close()
        trackers.close()
        interrupt.restore()
        metrics_file.close()
        if bar is not None:
            bar.close()

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
    }
    if writer:
        _write_json_atomic(os.path.join(out, "summary.json"), summary)
    if bpb is not None:
        log(
            f"held-out after step {final_step}: loss {eval_loss:.4f} nats/token, "
            f"{bpb:.3f} bits/byte (unigram baseline {p.unigram_bpb:.3f} bits/byte)"
        )
    log(
        f"wrote {metrics_path}"
        + (f", {png}" if png else " (pip install matplotlib for loss.png)")
        + f", checkpoint {last_ckpt}"
    )
    if sample is not None:
        log(f"sample (temperature {cfg.sample_temperature}):\n{cfg.sample_prompt}{sample}")
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
