"""Training: configuration, optimizer, the jitted train step, evaluation, and the run loop.

`train(TrainConfig(...))` is what `xlstm-eqx train` runs:

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

import dataclasses
import json
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
from jaxtyping import Array, Float, Int, PRNGKeyArray, PyTree

from ._checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_metadata,
    restore_checkpoint,
    save_checkpoint,
)
from ._data import (
    BatchSampler,
    Corpus,
    check_token_ids,
    eval_windows,
    load_corpus,
    unigram_bits_per_byte,
)
from ._presets import small_llama, small_xlstm
from ._tokenizer import Tokenizer, load_tokenizer, padded_vocab_size, tokenizer_from_dict


_COMPUTE_DTYPES = ("float32", "bfloat16")


# ----------------------------------------------------------------------------------------------
# configuration


@dataclasses.dataclass
class TrainConfig:
    """Everything a training run needs. Every field is a `xlstm-eqx train` flag (`seq_len` →
    `--seq-len`), can come from a JSON/YAML file (`--config`), and is saved in `DIR/config.json`."""

    # model
    model: str = dataclasses.field(
        default="xlstm", metadata={"help": "'xlstm', 'llama', or a model-config JSON/YAML file"}
    )
    preset: str = dataclasses.field(
        default="small", metadata={"help": "size preset of the model family (see `info`)"}
    )
    # data
    data: list[str] = dataclasses.field(
        default_factory=list,
        metadata={"help": "text/JSONL file or glob, repeatable; none: embedded stdlib corpus"},
    )
    text_field: str = dataclasses.field(
        default="text", metadata={"help": "JSONL field holding the text"}
    )
    tokenizer: str = dataclasses.field(
        default="bytes", metadata={"help": "'bytes' or the path of a local tokenizer.json"}
    )
    eval_fraction: float = dataclasses.field(
        default=0.05, metadata={"help": "share of documents (or text) held out for evaluation"}
    )
    max_data_bytes: int | None = dataclasses.field(
        default=None, metadata={"help": "stop reading data after this many bytes"}
    )
    # batch shape and length
    seq_len: int = dataclasses.field(default=128, metadata={"help": "tokens per sequence"})
    batch_size: int = dataclasses.field(default=16, metadata={"help": "sequences per micro-batch"})
    grad_accum: int = dataclasses.field(
        default=1, metadata={"help": "micro-batches accumulated per optimizer step"}
    )
    steps: int = dataclasses.field(default=300, metadata={"help": "optimizer steps"})
    # optimizer
    lr: float = dataclasses.field(default=3e-3, metadata={"help": "peak learning rate"})
    warmup_steps: int | None = dataclasses.field(
        default=None, metadata={"help": "linear warmup steps (default min(100, steps // 10))"}
    )
    min_lr_ratio: float = dataclasses.field(
        default=0.1, metadata={"help": "final learning rate of the cosine, as a fraction of lr"}
    )
    weight_decay: float = dataclasses.field(
        default=0.1, metadata={"help": "AdamW decoupled weight decay (kernels only)"}
    )
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float | None = dataclasses.field(
        default=1.0, metadata={"help": "global gradient-norm clip (none: off)"}
    )
    dtype: str = dataclasses.field(
        default="float32", metadata={"help": "compute dtype: float32 or bfloat16"}
    )
    # run
    seed: int = 0
    out: str = dataclasses.field(
        default="", metadata={"help": "output directory (default runs/<model>)"}
    )
    resume: bool = dataclasses.field(
        default=False, metadata={"help": "continue the run in --out from its last checkpoint"}
    )
    log_every: int = dataclasses.field(default=10, metadata={"help": "steps between metric rows"})
    eval_every: int = dataclasses.field(
        default=100, metadata={"help": "steps between held-out evaluations"}
    )
    eval_batches: int = dataclasses.field(
        default=8, metadata={"help": "held-out batches per evaluation"}
    )
    checkpoint_every: int = dataclasses.field(
        default=100, metadata={"help": "steps between checkpoints"}
    )
    keep_checkpoints: int = dataclasses.field(
        default=3, metadata={"help": "checkpoints kept (the newest)"}
    )
    progress: bool = dataclasses.field(default=True, metadata={"help": "show a progress bar"})
    sample_tokens: int = dataclasses.field(
        default=300, metadata={"help": "tokens sampled and printed at the end (0: none)"}
    )
    sample_prompt: str = "def "
    sample_temperature: float = 0.8
    mesh: str = dataclasses.field(
        default="",
        metadata={"help": "device mesh, e.g. 'dp=2,fsdp=2,tp=2' (default: one device)"},
    )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s): {', '.join(unknown)}")
        return cls(**d)

    def out_dir(self) -> str:
        if self.out:
            return self.out
        name = self.model if self.model in MODEL_FAMILIES else "custom"
        return os.path.join("runs", name)

    def resolved_warmup(self) -> int:
        if self.warmup_steps is None:
            return min(100, self.steps // 10)
        return self.warmup_steps

    def validate(self) -> None:
        """Raise a ValueError naming the first field with an invalid value."""
        positive = ["seq_len", "batch_size", "grad_accum", "steps", "log_every", "eval_every"]
        positive += ["eval_batches", "checkpoint_every", "keep_checkpoints"]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"TrainConfig.{name} must be a positive integer, got {value!r}")
        if self.dtype not in _COMPUTE_DTYPES:
            raise ValueError(
                f"TrainConfig.dtype must be one of {_COMPUTE_DTYPES}, got {self.dtype!r}"
            )
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr}")
        w = self.resolved_warmup()
        if not 0 <= w < self.steps:
            raise ValueError(
                f"TrainConfig.warmup_steps must be in [0, steps={self.steps}), got {w}"
            )
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"TrainConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.weight_decay < 0:
            raise ValueError(f"TrainConfig.weight_decay must be >= 0, got {self.weight_decay}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"TrainConfig.grad_clip must be > 0 or None, got {self.grad_clip}")
        if not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(
                f"TrainConfig.eval_fraction must be in (0, 1), got {self.eval_fraction}"
            )
        if self.sample_tokens < 0:
            raise ValueError(f"TrainConfig.sample_tokens must be >= 0, got {self.sample_tokens}")
        if not self.sample_temperature >= 0:
            raise ValueError(
                f"TrainConfig.sample_temperature must be >= 0, got {self.sample_temperature}"
            )


# Fields that may differ between a run and its --resume (they do not change what is computed,
# except `steps`, which extends or shortens the schedule on purpose).
RESUMABLE_FIELDS = frozenset(
    {
        "steps",
        "out",
        "resume",
        "log_every",
        "eval_every",
        "eval_batches",
        "checkpoint_every",
        "keep_checkpoints",
        "progress",
        "sample_tokens",
        "sample_prompt",
        "sample_temperature",
        "mesh",  # the data order does not depend on the mesh
    }
)


# ----------------------------------------------------------------------------------------------
# model families


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    """How to make the models of one family: its config class and module, its presets, and
    optionally its own weight-decay mask rule."""

    name: str
    config_from_dict: Callable[[dict[str, Any]], Any]
    build: Callable[..., Any]
    presets: Callable[[], dict[str, Callable[[], Any]]]
    decay_mask: Callable[[Any, Any], Any] | None = None


MODEL_FAMILIES: dict[str, ModelFamily] = {}


def register_model_family(family: ModelFamily) -> None:
    """Make a model family available to `TrainConfig.model` (used for the built-ins and tests)."""
    MODEL_FAMILIES[family.name] = family


_MAIN_JOB_PRESETS = {"xlstm": small_xlstm, "llama": small_llama}


def _family_presets(kind: str) -> dict[str, Callable[[], Any]]:
    """`small` (the main job's size) plus every library preset of this family, under its own
    name and, for names like `tiny_xlstm`, without the family part (`tiny`)."""
    from ._presets import PRESETS

    out: dict[str, Callable[[], Any]] = {"small": _MAIN_JOB_PRESETS[kind]}
    for name, fn in PRESETS.items():
        if _config_kind(fn()) != kind:
            continue
        out[name] = fn
        parts = name.split("_")
        if kind in parts and len(parts) > 1:
            out.setdefault("_".join(p for p in parts if p != kind), fn)
    return out


def _config_kind(cfg: Any) -> str:
    return "llama" if type(cfg).__name__ == "LlamaConfig" else "xlstm"


def _xlstm_from_dict(d: dict[str, Any]) -> Any:
    from ._configs import xLSTMLMModelConfig

    return xLSTMLMModelConfig.from_dict(d)


def _llama_from_dict(d: dict[str, Any]) -> Any:
    from ._configs import LlamaConfig

    return LlamaConfig.from_dict(d)


def _build_xlstm(config: Any, *, key: PRNGKeyArray) -> Any:
    from ._model import xLSTMLMModel

    return xLSTMLMModel(config, key=key)


def _build_llama(config: Any, *, key: PRNGKeyArray) -> Any:
    from ._llama import LlamaTransformer

    return LlamaTransformer(config, key=key)


def _xlstm_decay_mask(model: Any, config: Any) -> Any:
    from . import _model

    fn = getattr(_model, "decay_mask", None)
    if fn is None:
        return None
    return fn(model)


register_model_family(
    ModelFamily(
        "xlstm",
        _xlstm_from_dict,
        _build_xlstm,
        lambda: _family_presets("xlstm"),
        _xlstm_decay_mask,
    )
)
register_model_family(
    ModelFamily("llama", _llama_from_dict, _build_llama, lambda: _family_presets("llama"))
)


def read_mapping_file(path: str, what: str) -> dict[str, Any]:
    """The mapping in a JSON or YAML (`.yaml`/`.yml`) file; errors name `what` and the path."""
    with open(path) as f:
        text = f.read()
    if path.endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError as e:
            raise ImportError(f"reading {path!r} needs PyYAML (pip install pyyaml)") from e
        d = yaml.safe_load(text)
    else:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{what} {path!r} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise ValueError(f"{what} {path!r} must hold a mapping, got {type(d).__name__}")
    return d


def _read_config_file(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"model {path!r}: not a model family ({', '.join(sorted(MODEL_FAMILIES))}) "
            "and no such config file"
        )
    return read_mapping_file(path, "model config")


def resolve_model_config(cfg: TrainConfig, tokenizer: Tokenizer) -> tuple[str, Any]:
    """`(family name, model config)` for a new run: the preset or file, with the compute dtype
    and (for presets, or a file without one) the tokenizer's vocabulary rounded up to 64."""
    if cfg.model in MODEL_FAMILIES:
        kind = cfg.model
        family = MODEL_FAMILIES[kind]
        presets = family.presets()
        if cfg.preset not in presets:
            raise ValueError(
                f"unknown preset {cfg.preset!r} for model {kind!r}; "
                f"available: {', '.join(sorted(presets))}"
            )
        # The stack pushes `dtype` down into every layer, cell and FFN config.
        config = dataclasses.replace(
            presets[cfg.preset](),
            vocab_size=padded_vocab_size(tokenizer.vocab_size),
            dtype=cfg.dtype,
        )
        return kind, config
    d = _read_config_file(cfg.model)
    if "model_kind" in d and "model_config" in d:  # a run's saved config.json
        kind, d = d["model_kind"], dict(d["model_config"])
    else:
        guess = "llama" if "head_dim" in d and "mlstm_block" not in d else "xlstm"
        kind = str(d.pop("kind", guess))
    if kind not in MODEL_FAMILIES:
        raise ValueError(f"model config {cfg.model!r}: unknown model kind {kind!r}")
    if d.get("vocab_size", -1) in (-1, None):
        d["vocab_size"] = padded_vocab_size(tokenizer.vocab_size)
    d["dtype"] = cfg.dtype
    return kind, MODEL_FAMILIES[kind].config_from_dict(d)


def check_sequence_length(seq_len: int, model_config: Any) -> None:
    ctx = getattr(model_config, "context_length", None)
    if isinstance(ctx, int) and ctx > 0 and seq_len > ctx:
        raise ValueError(
            f"seq_len={seq_len} exceeds the model's context_length={ctx}; "
            f"lower --seq-len or use a model with a longer context_length"
        )


# ----------------------------------------------------------------------------------------------
# optimizer


def _last_attr_name(path: Sequence[Any]) -> str:
    for entry in reversed(path):
        if isinstance(entry, jax.tree_util.GetAttrKey):
            return entry.name
    return ""


def default_decay_mask(params: PyTree, *, decay_embedding: bool = False) -> PyTree:
    """The reference trainer's rule (ARCHITECTURE §1.4): decay every array whose field name ends
    in `kernel` (dense, headwise, conv, recurrent kernels, stacked or not); the embedding table
    only if `decay_embedding`; never norm scales, biases, skips."""

    def rule(path: Sequence[Any], leaf: Any) -> bool:
        name = _last_attr_name(path)
        if name.endswith("kernel"):
            return True
        if "embedding" in name:
            return decay_embedding
        return False

    return jax.tree_util.tree_map_with_path(rule, params)


def trainable_params(model: PyTree) -> PyTree:
    return eqx.filter(model, eqx.is_inexact_array)


def learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warmup from 0 to `lr`, then cosine decay to `lr * min_lr_ratio` at `steps`."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.lr,
        warmup_steps=cfg.resolved_warmup(),
        decay_steps=cfg.steps,
        end_value=cfg.lr * cfg.min_lr_ratio,
    )


def make_optimizer(
    cfg: TrainConfig, model: PyTree, model_config: Any = None, family: ModelFamily | None = None
) -> optax.GradientTransformation:
    """Clip by global norm, then AdamW with the warmup+cosine schedule and the decay mask."""
    params = trainable_params(model)
    mask = None
    if family is not None and family.decay_mask is not None:
        full = family.decay_mask(model, model_config)
        if full is not None:
            # The family's mask covers the whole model: keep its entries at trainable leaves.
            spec = jax.tree.map(eqx.is_inexact_array, model)
            mask = jax.tree.map(lambda m, s: bool(m) if s else None, full, spec)
    if mask is None:
        decay_embedding = bool(getattr(model_config, "weight_decay_on_embedding", False))
        mask = default_decay_mask(params, decay_embedding=decay_embedding)
    chain = []
    if cfg.grad_clip is not None:
        chain.append(optax.clip_by_global_norm(cfg.grad_clip))
    chain.append(
        optax.adamw(
            learning_rate_schedule(cfg),
            b1=cfg.beta1,
            b2=cfg.beta2,
            eps=cfg.adam_eps,
            weight_decay=cfg.weight_decay,
            mask=mask,
        )
    )
    return optax.chain(*chain)


# ----------------------------------------------------------------------------------------------
# steps


@jax.named_scope("loss")
def next_token_loss(
    model: Callable[..., Float[Array, "B S V"]],
    tokens: Int[Array, "B S1"],
    key: PRNGKeyArray | None = None,
) -> Float[Array, ""]:
    """Mean cross-entropy (nats) of predicting `tokens[:, 1:]` from `tokens[:, :-1]`, float32."""
    logits = model(tokens[:, :-1], key=key)
    losses = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), tokens[:, 1:]
    )
    return jnp.mean(losses)


def make_train_step(optimizer: optax.GradientTransformation) -> Callable[..., Any]:
    """`step((batch, key), model, opt_state) -> (model, opt_state, loss, grad_norm)`.

    `batch` is `(A, B, S+1)`: A micro-batches whose gradients are averaged (a `lax.scan`, so
    memory stays that of one micro-batch). Jitted with the model and optimizer state donated.
    """

    def loss_and_grad(model, tokens, key):
        return eqx.filter_value_and_grad(next_token_loss)(model, tokens, key)

    @eqx.filter_jit(donate="all-except-first")
    def step(inputs, model, opt_state):
        batch, key = inputs
        A = batch.shape[0]
        keys = jr.split(key, A)
        if A == 1:
            loss, grads = loss_and_grad(model, batch[0], keys[0])
        else:
            params, static = eqx.partition(model, eqx.is_inexact_array)

            def micro(carry, xs):
                gsum, lsum = carry
                mb, k = xs
                loss_i, g = loss_and_grad(eqx.combine(params, static), mb, k)
                g = eqx.filter(g, eqx.is_inexact_array)
                return (jax.tree.map(jnp.add, gsum, g), lsum + loss_i), None

            zeros = jax.tree.map(jnp.zeros_like, params)
            (gsum, lsum), _ = jax.lax.scan(
                micro, (zeros, jnp.zeros((), jnp.float32)), (batch, keys)
            )
            grads = jax.tree.map(lambda g: g / A, gsum)
            loss = lsum / A
        grad_norm = optax.tree.norm(grads)
        # optax mixes Python floats with int32 step counts; allow that under strict promotion.
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = optimizer.update(grads, opt_state, trainable_params(model))
        model = eqx.apply_updates(model, updates)
        return model, opt_state, loss, grad_norm

    return step


_STEP_CACHE: dict[str, tuple[optax.GradientTransformation, Callable[..., Any]]] = {}
_OPTIMIZER_FIELDS = ("steps", "lr", "warmup_steps", "min_lr_ratio", "weight_decay", "beta1")
_OPTIMIZER_FIELDS += ("beta2", "adam_eps", "grad_clip")


def _optimizer_and_step(
    cfg: TrainConfig, model: Any, model_config: Any, family: ModelFamily
) -> tuple[optax.GradientTransformation, Callable[..., Any]]:
    """The optimizer and its jitted step, shared by runs of the same model and optimizer
    settings in one process (a resumed or repeated run then reuses the compiled step)."""
    key = json.dumps(
        [family.name, model_config.to_dict(), [getattr(cfg, f) for f in _OPTIMIZER_FIELDS]],
        sort_keys=True,
        default=repr,
    )
    if key not in _STEP_CACHE:
        if len(_STEP_CACHE) >= 8:
            _STEP_CACHE.pop(next(iter(_STEP_CACHE)))
        optimizer = make_optimizer(cfg, model, model_config, family)
        _STEP_CACHE[key] = (optimizer, make_train_step(optimizer))
    return _STEP_CACHE[key]


@eqx.filter_jit
def _eval_batch_loss(model: Any, tokens: Int[Array, "B S1"]) -> Float[Array, ""]:
    return next_token_loss(model, tokens, None)


def evaluate_loss(model: Any, batches: Sequence[np.ndarray]) -> float:
    """Mean held-out next-token loss (nats) over equally sized batches, deterministic (no key)."""
    losses = [float(_eval_batch_loss(model, jnp.asarray(b))) for b in batches]
    return float(np.mean(losses))


def _lr_at(schedule: optax.Schedule, count: int) -> float:
    with jax.numpy_dtype_promotion("standard"):
        return float(schedule(count))


def bits_per_byte(loss_nats_per_token: float, tokens_per_byte: float) -> float:
    return loss_nats_per_token * tokens_per_byte / math.log(2.0)


# ----------------------------------------------------------------------------------------------
# sampling for the end-of-run printout


def sample_tokens(
    model: Any,
    prompt: Sequence[int],
    num_tokens: int,
    *,
    window: int,
    temperature: float,
    key: PRNGKeyArray,
) -> list[int]:
    """Sample by recomputing a full forward pass per token (no recurrent state, no KV cache): the
    end-of-run printout's fallback for models without a decode API; see `_generate` otherwise.

    The sequence is right-padded to a fixed `window` so one compiled forward serves every step;
    with a causal model, the logits at the last real position ignore the padding.
    """
    tokens = list(prompt) or [0]

    @eqx.filter_jit
    def next_logits(model, buf, pos):
        logits = model(buf[None, :])[0]
        return jax.lax.dynamic_index_in_dim(logits, pos, axis=0, keepdims=False)

    for i in range(num_tokens):
        ctx = tokens[-window:]
        buf = np.zeros((window,), np.int32)
        buf[: len(ctx)] = ctx
        logits = next_logits(model, jnp.asarray(buf), jnp.asarray(len(ctx) - 1, jnp.int32))
        if temperature == 0:
            nxt = int(jnp.argmax(logits))
        else:
            nxt = int(jr.categorical(jr.fold_in(key, i), logits / temperature))
        tokens.append(nxt)
    return tokens[len(prompt) :] if prompt else tokens[1:]


def has_decode_api(model: Any) -> bool:
    """Whether `_generate.generate` can run this model (recurrent state or KV cache)."""
    from ._generate import _is_kv_model, _is_recurrent_model

    return _is_kv_model(model) or _is_recurrent_model(model)


# ----------------------------------------------------------------------------------------------
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


def _write_json_atomic(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, allow_nan=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_metrics(path: str) -> list[dict[str, Any]]:
    """Rows of a `metrics.jsonl`."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _truncate_metrics(path: str, last_step: int) -> None:
    # On resume, drop rows of steps after the checkpoint: they are recomputed identically.
    rows = [r for r in read_metrics(path) if r.get("step", 0) <= last_step]
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


def plot_metrics(metrics_path: str, png_path: str) -> str | None:
    """Loss curves (train, held-out) from `metrics.jsonl` as a PNG; None if matplotlib is absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    held = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", lw=1)
    if held:
        ax.plot(*zip(*held, strict=True), "o-", label="held-out loss", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = png_path + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, png_path)
    return png_path


class _InterruptFlag:
    """While training, the first Ctrl-C (or SIGTERM) only sets a flag: the current step ends, a
    checkpoint is written, then KeyboardInterrupt. A second Ctrl-C aborts at once."""

    def __init__(self, log: Callable[[str], None]):
        self.set = False
        self._log = log
        self._old: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.set:
            raise KeyboardInterrupt
        self.set = True
        self._log("\nstopping after this step and saving a checkpoint (Ctrl-C again to abort)")

    def restore(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old = {}


# ----------------------------------------------------------------------------------------------
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
    diffs = [
        f"{k}: checkpoint has {saved.get(k)!r}, given {given[k]!r}"
        for k in given
        if k not in RESUMABLE_FIELDS and saved.get(k) != given[k]
    ]
    if diffs:
        raise ValueError(
            f"--resume: the run in {path!r} was made with a different config:\n  "
            + "\n  ".join(diffs)
        )


def _prepare(cfg: TrainConfig) -> _Prepared:
    cfg.validate()
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
    elif list_checkpoints(ckpt_root):
        raise FileExistsError(
            f"{out!r} already holds a run with checkpoints; pass --resume to continue it "
            "or choose another --out"
        )

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
    vocab = int(model_config.vocab_size)

    corpus = load_corpus(
        cfg.data,
        tokenizer,
        text_field=cfg.text_field,
        eval_fraction=cfg.eval_fraction,
        max_bytes=cfg.max_data_bytes,
    )
    check_token_ids(corpus.train, vocab, what="training data")
    check_token_ids(corpus.heldout, vocab, what="held-out data")
    sampler = BatchSampler(
        corpus.train, seq_len=cfg.seq_len, batch_size=cfg.batch_size, seed=cfg.seed
    )
    batches = eval_windows(
        corpus.heldout, seq_len=cfg.seq_len, batch_size=cfg.batch_size, max_batches=cfg.eval_batches
    )
    # The baseline: every held-out token under the training text's token frequencies.
    unigram = unigram_bits_per_byte(
        corpus.train, corpus.heldout, vocab, corpus.heldout_tokens_per_byte
    )
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
    would — used to test resuming.
    """
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
        from ._sharding import shard_train_state

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

    def checkpoint(step: int) -> str | None:
        meta = {
            "step": step,
            "data_position": step * cfg.grad_accum,
            "rng_key": np.asarray(jax.random.key_data(loop_key)).tolist(),
            "run_config": run_config,
        }
        save = save_checkpoint
        if cfg.mesh:  # gathered from every process (a collective: all call it), written by 0
            from ._sharding import save_sharded_checkpoint as save
        trees = {"model": model, "opt_state": opt_state}
        return save(ckpt_root, step, trees, meta, keep=cfg.keep_checkpoints)

    end_step = cfg.steps if stop_after_step is None else min(cfg.steps, stop_after_step)
    bar = None
    if cfg.progress and writer:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=cfg.steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True
        )
    interval_start = time.perf_counter()
    interval_steps = 0
    interrupt = _InterruptFlag(log)
    metrics_file = open(metrics_path if writer else os.devnull, "a")  # noqa: SIM115 - closed in finally
    try:
        for step in range(start_step + 1, end_step + 1):
            pos = (step - 1) * cfg.grad_accum
            batch = np.stack([p.sampler.batch(pos + a) for a in range(cfg.grad_accum)])
            step_key = jr.fold_in(loop_key, step)
            model, opt_state, loss, grad_norm = step_fn(
                (jnp.asarray(batch), step_key), model, opt_state
            )
            loss_f, gnorm_f = float(loss), float(grad_norm)
            if not (math.isfinite(loss_f) and math.isfinite(gnorm_f)):
                what = f"loss {loss_f}" if not math.isfinite(loss_f) else f"gradient norm {gnorm_f}"
                where = (
                    f"last good checkpoint: {last_ckpt} (step {last_ckpt_step})"
                    if last_ckpt
                    else "no checkpoint was written"
                )
                raise TrainingDivergedError(
                    f"training stopped at step {step}: {what} is not finite; nothing was saved "
                    f"after step {last_ckpt_step}; {where}. Try a lower --lr or --grad-clip.",
                    step,
                    last_ckpt,
                )
            losses[step] = loss_f
            interval_steps += 1
            if bar is not None:
                bar.update(1)
            do_log = step % cfg.log_every == 0 or step == 1 or step == cfg.steps
            do_eval = step % cfg.eval_every == 0 or step == cfg.steps
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
                if bar is not None:
                    post = {"loss": f"{loss_f:.3f}", "tok/s": f"{tok_s:,.0f}"}
                    if bpb is not None:
                        post["bpb"] = f"{bpb:.3f}"
                    bar.set_postfix(post, refresh=False)
                elif do_eval:
                    log(f"step {step}: loss {loss_f:.4f}, held-out {eval_loss:.4f} ({bpb:.3f} bpb)")
                interval_start, interval_steps = time.perf_counter(), 0
            if step % cfg.checkpoint_every == 0 or step == end_step or interrupt.set:
                last_ckpt, last_ckpt_step = checkpoint(step), step
            if interrupt.set:
                log(f"\ninterrupted after step {step}; saved {last_ckpt}; continue with --resume")
                raise KeyboardInterrupt
    finally:
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
    from ._generate import generate

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


# ----------------------------------------------------------------------------------------------
# evaluation of a saved run


@dataclasses.dataclass
class EvalResult:
    step: int
    eval_loss: float
    bits_per_byte: float
    unigram_bits_per_byte: float | None
    num_tokens: int


def load_run(out_dir: str, checkpoint: str | None = None) -> tuple[Any, dict[str, Any], int]:
    """`(model, run_config, step)` from a run directory's newest (or the given) checkpoint."""
    path = checkpoint or latest_checkpoint(os.path.join(out_dir, "checkpoints"))
    if path is None:
        raise FileNotFoundError(f"no checkpoint found in {os.path.join(out_dir, 'checkpoints')!r}")
    meta = load_metadata(path)
    run = meta.get("metadata", {}).get("run_config")
    if not isinstance(run, dict) or run.get("model_kind") not in MODEL_FAMILIES:
        raise CheckpointError(f"checkpoint {path!r} has no usable run configuration")
    family = MODEL_FAMILIES[run["model_kind"]]
    model_config = family.config_from_dict(run["model_config"])
    skeleton = eqx.filter_eval_shape(family.build, model_config, key=jr.key(0))
    trees, meta2 = restore_checkpoint(path, {"model": skeleton})
    return trees["model"], run, int(meta2["step"])


def evaluate_run(
    out_dir: str,
    *,
    data: Sequence[str] | None = None,
    batch_size: int | None = None,
    max_batches: int | None = None,
    checkpoint: str | None = None,
) -> EvalResult:
    """Held-out loss and bits per byte of a saved run: on its own held-out split, or on all
    of `data` if given (then the unigram baseline still uses the run's training text)."""
    model, run, step = load_run(out_dir, checkpoint)
    tcfg = TrainConfig.from_dict(run["train"])
    tokenizer = tokenizer_from_dict(run["tokenizer"])
    vocab = int(run["model_config"]["vocab_size"])
    bs = batch_size or tcfg.batch_size
    nb = max_batches or tcfg.eval_batches
    corpus = load_corpus(
        tcfg.data,
        tokenizer,
        text_field=tcfg.text_field,
        eval_fraction=tcfg.eval_fraction,
        max_bytes=tcfg.max_data_bytes,
    )
    if data:
        from ._data import read_documents, resolve_paths

        text = "\n\n".join(read_documents(resolve_paths(data), text_field=tcfg.text_field))
        tokens = tokenizer.encode(text)
        tokens_per_byte = len(tokens) / max(1, len(text.encode("utf-8")))
        check_token_ids(tokens, vocab, what="evaluation data")
    else:
        tokens, tokens_per_byte = corpus.heldout, corpus.heldout_tokens_per_byte
    batches = eval_windows(tokens, seq_len=tcfg.seq_len, batch_size=bs, max_batches=nb)
    loss = evaluate_loss(model, batches)
    unigram = unigram_bits_per_byte(corpus.train, tokens, vocab, tokens_per_byte)
    num_tokens = sum(b[:, 1:].size for b in batches)
    return EvalResult(
        step=step,
        eval_loss=loss,
        bits_per_byte=bits_per_byte(loss, tokens_per_byte),
        unigram_bits_per_byte=unigram,
        num_tokens=int(num_tokens),
    )
