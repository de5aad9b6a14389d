"""`TrainConfig`, every option of a training run (each one an `xlstm-eqx train` flag), and how a run
resolves its model config from a family preset or a config file."""

import dataclasses
import os
from typing import Any, Literal, NoReturn, get_args

from ..core.config import NON_NEGATIVE, POSITIVE, RATE, Check, Config, configclass, field
from ..core.files import read_mapping_file
from ..data.tokenizer import Tokenizer, padded_vocab_size
from ..models import MODEL_FAMILIES, ModelConfig


ComputeDType = Literal["float32", "bfloat16"]
Optimizer = Literal["adamw", "lion", "adafactor", "ademamix"]
Schedule = Literal["cosine", "wsd", "linear", "constant"]
OPTIMIZERS: tuple[str, ...] = get_args(Optimizer)
SCHEDULES: tuple[str, ...] = get_args(Schedule)
TRACKERS = ("tensorboard", "wandb", "trackio")
SEQ_LEN = 128  # the default sequence length (the command line's: at most the context length)

SEED = Check(lambda v: 0 <= v < 2**32, "{a} in [0, 2**32)")
RATIO = Check(lambda v: 0 <= v <= 1, "{a} in [0, 1]")
OPEN_FRACTION = Check(lambda v: 0 < v < 1, "{a} in (0, 1)")
FRACTION = Check(lambda v: 0 < v <= 1, "{a} in (0, 1]")


# configuration


@configclass
class TrainConfig(Config):
    """Everything a training run needs. Every field is a `xlstm-eqx train` flag (`seq_len` →
    `--seq-len`, a `Literal` field's values are the flag's choices), can come from a JSON/YAML
    file (`--config`), and is saved in `DIR/config.json`. Every field is checked against its
    annotation and constraint when the config is made; errors name the flag and the field."""

    # model
    model: str = field(default="xlstm", help="'xlstm', 'llama', or a model-config JSON/YAML file")
    preset: str = field(default="small", help="size preset of the model family (see `info`)")
    # data
    data: list[str] = field(
        default_factory=list,
        help="text/JSONL/parquet/arrow file, glob, or saved HF dataset directory, repeatable; "
        "none: embedded stdlib corpus",
    )
    text_field: str = field(default="text", help="JSONL field / dataset column holding the text")
    data_format: Literal["text", "sft"] = field(
        default="text",
        help="'sft': --data is JSONL of prompt/completion or messages records, packed with "
        "document borders, loss on completions only",
    )
    data_split: str = field(default="train", help="split of a saved HF DatasetDict")
    eod_token: str = field(
        default="",
        help="end-of-document token between documents: '' = the tokenizer's own (byte 0 for "
        "bytes), a token of the tokenizer, an id, or 'none'",
    )
    data_cache: str = field(
        default="",
        help="token-store cache directory (default: $XLSTM_EQX_DATA_CACHE_DIR, else "
        "~/.cache/xlstm_eqx/token_stores)",
    )
    prefetch: int = field(
        default=2, check=POSITIVE, help="batches prepared ahead of the train step"
    )
    tokenizer: str = field(default="bytes", help="'bytes' or the path of a local tokenizer.json")
    eval_fraction: float = field(
        default=0.05,
        check=OPEN_FRACTION,
        help="share of documents (or text) held out for evaluation",
    )
    max_data_bytes: int | None = field(
        default=None, check=POSITIVE, help="stop reading data after this many bytes"
    )
    # batch shape and length
    seq_len: int = field(
        default=SEQ_LEN,
        check=POSITIVE,
        help="tokens per sequence (default: the command line's is min(128, the model's "
        "context_length); TrainConfig's is 128)",
    )
    batch_size: int = field(default=16, check=POSITIVE, help="sequences per micro-batch")
    grad_accum: int = field(
        default=1, check=POSITIVE, help="micro-batches accumulated per optimizer step"
    )
    batch_rampup_steps: int = field(
        default=0,
        check=NON_NEGATIVE,
        help="steps over which the batch grows from --batch-rampup-start to --batch-size "
        "(0: no ramp)",
    )
    batch_rampup_start: int = field(
        default=1, check=POSITIVE, help="sequences per micro-batch at the ramp's first step"
    )
    batch_rampup_increment: int = field(
        default=1,
        check=POSITIVE,
        help="the ramp grows in multiples of this (of the mesh's data-parallel size)",
    )
    steps: int = field(default=300, check=POSITIVE, help="optimizer steps")
    # optimizer
    optimizer: Optimizer = field(default="adamw", help="optimizer (optax)")
    schedule: Schedule = field(default="cosine", help="learning-rate schedule after warmup")
    decay_fraction: float = field(
        default=0.2, check=FRACTION, help="wsd: share of the steps in the final decay"
    )
    lr: float = field(default=3e-3, check=POSITIVE, help="peak learning rate")
    warmup_steps: int | None = field(
        default=None, help="linear warmup steps (default: min(100, steps // 10))"
    )
    min_lr_ratio: float = field(
        default=0.1,
        check=RATIO,
        help="final learning rate (cosine, linear, wsd), as a fraction of lr",
    )
    weight_decay: float = field(
        default=0.1, check=NON_NEGATIVE, help="decoupled weight decay (kernels only)"
    )
    beta1: float = field(default=0.9, check=RATE)
    beta2: float = field(default=0.95, check=RATE)
    adam_eps: float = field(default=1e-8, check=POSITIVE)
    beta3: float = field(default=0.9999, check=RATE, help="ademamix: the slow EMA's decay")
    alpha: float = field(
        default=8.0, check=NON_NEGATIVE, help="ademamix: weight of the slow EMA in the update"
    )
    ademamix_warmup_steps: int | None = field(
        default=None,
        check=NON_NEGATIVE,
        help="ademamix: steps over which alpha rises from 0 and beta3 from beta1 (default: steps)",
    )
    grad_clip: float | None = field(
        default=1.0, check=POSITIVE, help="global gradient-norm clip (none: off)"
    )
    dtype: ComputeDType = field(default="float32", help="compute dtype (parameters stay float32)")
    loss_chunk_size: int | None = field(
        default=None,
        check=NON_NEGATIVE,
        help="sequence positions per chunk of the LM head + cross-entropy (none: chunked only "
        "when batch x seq x vocab exceeds 2**24 logits; 0: never chunked)",
    )
    # starting from trained weights (training/init_from.py)
    init_from: str = field(
        default="",
        help="start from these weights (fresh optimizer, schedule and data): a run directory "
        "(its newest checkpoint) or DIR/checkpoints/step_N, a transformers xLSTMForCausalLM "
        "directory, or an xlstm-jax checkpoint; the architecture and (unless --tokenizer) the "
        "tokenizer are the source's",
    )
    context_length: int | None = field(
        default=None,
        check=POSITIVE,
        help="with --init-from: the model's context length (default: the source's)",
    )
    dropout: float | None = field(
        default=None,
        check=RATE,
        help="with --init-from: the model's dropout (default: the source's)",
    )
    # fine-tuning: what trains (training/finetune.py)
    trainable: str = field(
        default="",
        help="regex over parameter paths (e.g. 'dense_v'): only matches train, the rest is "
        "frozen; with LoRA: trained besides the adapters",
    )
    lora_rank: int = field(default=0, check=NON_NEGATIVE, help="LoRA adapter rank (0: no LoRA)")
    lora_alpha: float | None = field(
        default=None, check=POSITIVE, help="LoRA alpha; scale = alpha/rank (default: the rank)"
    )
    lora_targets: list[str] = field(
        default_factory=list,
        help="projection layers LoRA adapts, by field name (default: all mLSTM/FFN/Llama ones)",
    )
    lora_base_dtype: ComputeDType = field(
        default="float32", help="stored dtype of the frozen base's arrays under LoRA"
    )
    # run
    seed: int = field(default=0, check=SEED)
    out: str = field(default="", help="output directory (default: runs/<model>)")
    resume: bool = field(default=False, help="continue the run in --out from its last checkpoint")
    log_every: int = field(default=10, check=POSITIVE, help="steps between metric rows")
    eval_every: int = field(default=100, check=POSITIVE, help="steps between held-out evaluations")
    eval_batches: int = field(default=8, check=POSITIVE, help="held-out batches per evaluation")
    checkpoint_every: int = field(default=100, check=POSITIVE, help="steps between checkpoints")
    keep_checkpoints: int = field(default=3, check=POSITIVE, help="checkpoints kept (the newest)")
    progress: bool = field(default=True, help="show a progress bar")
    sample_tokens: int = field(
        default=300, check=NON_NEGATIVE, help="tokens sampled and printed at the end (0: none)"
    )
    sample_prompt: str = "def "
    sample_temperature: float = field(default=0.8, check=NON_NEGATIVE)
    mesh: str = field(default="", help="device mesh, e.g. 'dp=2,fsdp=2,tp=2' (default: one device)")
    tracker: str = field(
        default="", help="experiment trackers, comma-separated: tensorboard, wandb, trackio"
    )
    tracker_project: str = field(default="xlstm-eqx", help="project name for wandb / trackio")
    profile_steps: str = field(default="", help="'A:B': write a jax.profiler trace of steps A to B")
    # lm-eval tasks during training (training/lm_eval.py)
    lm_eval_tasks: str = field(
        default="",
        help="lm-eval tasks (or groups), comma-separated, evaluated during training (needs the "
        "'eval' extra); scores go to the trackers and DIR/lm_eval/step_*.json",
    )
    lm_eval_every: int = field(
        default=0, check=NON_NEGATIVE, help="steps between lm-eval evaluations (0: at the end)"
    )
    lm_eval_limit: int | None = field(
        default=None, check=POSITIVE, help="documents per lm-eval task (default: all)"
    )
    lm_eval_include_path: str = field(
        default="", help="directory of your own lm-eval task YAML files"
    )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        """A config from `to_dict()` output or a config file (a single string for `data` is
        one file)."""
        if isinstance(d, dict) and isinstance(d.get("data"), str):
            d = {**d, "data": [d["data"]]}
        return super().from_dict(d)

    def out_dir(self) -> str:
        if self.out:
            return self.out
        name = self.model if self.model in MODEL_FAMILIES else "custom"
        return os.path.join("runs", name)

    def trackers(self) -> list[str]:
        """The tracker names of `tracker`, in order."""
        return [t.strip() for t in self.tracker.split(",") if t.strip()]

    def resolved_warmup(self) -> int:
        if self.warmup_steps is None:
            return min(100, self.steps // 10)
        return self.warmup_steps

    def validate(self) -> None:
        """A run's check before anything is read or written: every field again (one may have
        been assigned since) and the loader's host memory; raises a ValueError naming the flag
        (and field)."""
        self._validate(type(self).__name__, "")
        _check_batch_memory(self)

    @classmethod
    def _invalid_field(
        cls, root: str, path: str, message: str, value: Any = dataclasses.MISSING
    ) -> NoReturn:
        text = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
        raise ValueError(f"{_flag(path)} {message}, got {text}")

    def _cross_check(self, root: str, prefix: str) -> None:
        warmup = self.resolved_warmup()
        if not 0 <= warmup < self.steps:
            self._invalid_field(root, "warmup_steps", f"must be in [0, steps={self.steps})", warmup)
        for name in self.trackers():
            if name not in TRACKERS:
                raise ValueError(
                    f"{_flag('tracker')}: unknown tracker {name!r} (expected {', '.join(TRACKERS)})"
                )
        if self.mesh and any(not part.strip() for part in self.mesh.split(",")):
            self._invalid_field(
                root, "mesh", "must be AXIS=SIZE entries separated by single commas", self.mesh
            )
        if self.profile_steps:
            self._check_profile_steps(root)
        if self.batch_rampup_steps and self.batch_rampup_start > self.batch_size:
            self._invalid_field(
                root,
                "batch_rampup_start",
                f"must be at most --batch-size {self.batch_size}",
                self.batch_rampup_start,
            )
        self._check_init_from(root)

    def _check_init_from(self, root: str) -> None:
        """With --init-from the architecture is the source's: a flag choosing one is refused."""
        if not self.init_from:
            for name in ("context_length", "dropout"):
                if getattr(self, name) is not None:
                    self._invalid_field(
                        root,
                        name,
                        "needs --init-from (a preset or --model FILE sets it)",
                        getattr(self, name),
                    )
            return
        default = TrainConfig.__dataclass_fields__
        for name in ("model", "preset"):
            if getattr(self, name) != default[name].default:
                self._invalid_field(
                    root,
                    name,
                    "would change the architecture, which --init-from takes from its source "
                    "(only --context-length, --dropout, --dtype and --mesh may differ)",
                    getattr(self, name),
                )

    def _check_profile_steps(self, root: str) -> None:
        parts = self.profile_steps.split(":")
        if len(parts) != 2 or not all(part.isdigit() for part in parts):
            self._invalid_field(root, "profile_steps", "must be 'A:B' (steps)", self.profile_steps)
        first, last = int(parts[0]), int(parts[1])
        if not 1 <= first <= last:
            self._invalid_field(
                root, "profile_steps", "must be 'A:B' with 1 <= A <= B", self.profile_steps
            )
        if last > self.steps:
            self._invalid_field(
                root,
                "profile_steps",
                f"must be 'A:B' with B <= --steps {self.steps}",
                self.profile_steps,
            )


def _flag(name: str) -> str:
    """How a field is named in errors: its flag, then the field (for config files and Python)."""
    return f"--{name.replace('_', '-')} (TrainConfig.{name})"


def _host_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _check_batch_memory(cfg: TrainConfig) -> None:
    """The loader keeps `prefetch + 2` steps' batches (int32 tokens) in host memory: a batch that
    cannot fit this machine's memory is refused here, naming the flags, not by an allocation
    error on the loader thread after the data is read."""
    tokens = cfg.grad_accum * cfg.batch_size * (cfg.seq_len + 1)
    need = tokens * 4 * (cfg.prefetch + 2)
    have = _host_memory_bytes()
    if have is not None and need > have:
        raise ValueError(
            f"--batch-size {cfg.batch_size} × --seq-len {cfg.seq_len} × --grad-accum "
            f"{cfg.grad_accum}: the loader's {cfg.prefetch + 2} batches of {tokens:,} tokens "
            f"need {need / 2**30:,.1f} GiB, more than this machine's {have / 2**30:,.1f} GiB"
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
        "data_cache",  # the store is found by its contents' key, wherever it is
        "prefetch",
        "tracker",
        "tracker_project",
        "profile_steps",
        "lm_eval_tasks",  # evaluations only read the model
        "lm_eval_every",
        "lm_eval_limit",
        "lm_eval_include_path",
    }
)


def _read_config_file(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"model {path!r}: not a model family ({', '.join(sorted(MODEL_FAMILIES))}) "
            "and no such config file"
        )
    return read_mapping_file(path, "model config")


def resolve_model_config(cfg: TrainConfig, tokenizer: Tokenizer) -> tuple[str, ModelConfig]:
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


def check_sequence_length(seq_len: int, model_config: ModelConfig) -> None:
    """Refuse a `seq_len` beyond the model's `context_length` (where it has a positive one)."""
    ctx = getattr(model_config, "context_length", None)
    if isinstance(ctx, int) and ctx > 0 and seq_len > ctx:
        raise ValueError(
            f"seq_len={seq_len} exceeds the model's context_length={ctx}; "
            f"lower --seq-len or use a model with a longer context_length"
        )
