"""The run's start and finish: the files written once everything is validated (`config.json`,
the metrics cut back on resume), the first log line, and the end (the plot, the held-out
numbers, the sample, `summary.json`, the last log lines, the `TrainResult`)."""

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import PyTree

from ..core.files import write_json_atomic
from ..data.tokenizer import Tokenizer
from ..generation import generate
from ..models import ModelConfig
from .config import TrainConfig
from .evaluate import has_decode_api, sample_tokens
from .extend import is_decay_start, supersede_after
from .optim import trainable_params
from .prepare import PreparedRun
from .run_files import plot_metrics, truncate_metrics
from .run_hooks import Run, RunHooks, held_out_evaluator


__all__ = ["TrainResult", "begin_run_files", "finish_run", "log_model"]


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


def begin_run_files(run: Run) -> None:
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


def log_model(run: Run) -> int:
    """The run's first line: the model, the data, the tokens per step. Returns the number of
    trainable parameters."""
    p = run.prepared
    n_params = sum(x.size for x in jax.tree.leaves(trainable_params(run.state.model)))
    run.log(
        f"model {p.kind} ({n_params / 1e6:.2f}M parameters), "
        f"data: {len(p.corpus.sources)} file(s), {len(p.corpus.train):,} train / "
        f"{len(p.corpus.heldout):,} held-out tokens, {run.tokens_per_step:,} tokens per step"
    )
    return int(n_params)


def finish_run(
    run: Run, hooks: RunHooks, model: PyTree, n_params: int, seconds: float
) -> TrainResult:
    """The end of a run: the plot, the held-out numbers, the sample, `summary.json`, the last
    lines of the log."""
    cfg, p, out, writer = run.cfg, run.prepared, run.out, run.writer
    final_step = max(run.state.start_step, run.end_step)
    png = plot_metrics(run.metrics_path, os.path.join(out, "loss.png")) if writer else None
    held_out = hooks.evals.latest
    eval_loss, bpb = (held_out.loss, held_out.bits_per_byte) if held_out else (None, None)
    if held_out is None and p.resume_from is not None and final_step == run.state.start_step:
        eval_loss, bpb = held_out_evaluator(p)(model)
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
