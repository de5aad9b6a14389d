"""`TrainConfig`, every option of a training run (each one an `xlstm-eqx train` flag), and how a run
resolves its model config from a family preset or a config file."""

import dataclasses
import math
import os
import typing
from typing import Any

from ..core.files import read_mapping_file
from ..data.tokenizer import Tokenizer, padded_vocab_size
from ..models import MODEL_FAMILIES


# Fields with a fixed set of values: `choices` in their metadata (the flag's argparse choices, and
# what `validate` checks). Typed `str`, not Literal, so that a bad value from a config file or
# Python is the ValueError of `validate` naming the field, not a type-checker error.
_COMPUTE_DTYPES = ("float32", "bfloat16")
OPTIMIZERS = ("adamw", "lion", "adafactor")
SCHEDULES = ("cosine", "wsd", "linear", "constant")
TRACKERS = ("tensorboard", "wandb", "trackio")
SEQ_LEN = 128  # the default sequence length (the command line's: at most the context length)


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
        metadata={
            "help": "text/JSONL/parquet/arrow file, glob, or saved HF dataset directory, "
            "repeatable; none: embedded stdlib corpus"
        },
    )
    text_field: str = dataclasses.field(
        default="text", metadata={"help": "JSONL field / dataset column holding the text"}
    )
    data_split: str = dataclasses.field(
        default="train", metadata={"help": "split of a saved HF DatasetDict"}
    )
    eod_token: str = dataclasses.field(
        default="",
        metadata={
            "help": "end-of-document token between documents: '' = the tokenizer's own (byte 0 "
            "for bytes), a token of the tokenizer, an id, or 'none'"
        },
    )
    data_cache: str = dataclasses.field(
        default="",
        metadata={
            "help": "token-store cache directory (default: $XLSTM_EQX_DATA_CACHE_DIR, else "
            "~/.cache/xlstm_eqx/token_stores)"
        },
    )
    prefetch: int = dataclasses.field(
        default=2, metadata={"help": "batches prepared ahead of the train step"}
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
    seq_len: int = dataclasses.field(
        default=SEQ_LEN,
        metadata={
            "help": "tokens per sequence (default: the command line's is min(128, the "
            "model's context_length); TrainConfig's is 128)"
        },
    )
    batch_size: int = dataclasses.field(default=16, metadata={"help": "sequences per micro-batch"})
    grad_accum: int = dataclasses.field(
        default=1, metadata={"help": "micro-batches accumulated per optimizer step"}
    )
    steps: int = dataclasses.field(default=300, metadata={"help": "optimizer steps"})
    # optimizer
    optimizer: str = dataclasses.field(
        default="adamw", metadata={"help": "optimizer (optax)", "choices": OPTIMIZERS}
    )
    schedule: str = dataclasses.field(
        default="cosine",
        metadata={"help": "learning-rate schedule after warmup", "choices": SCHEDULES},
    )
    decay_fraction: float = dataclasses.field(
        default=0.2, metadata={"help": "wsd: share of the steps in the final decay"}
    )
    lr: float = dataclasses.field(default=3e-3, metadata={"help": "peak learning rate"})
    warmup_steps: int | None = dataclasses.field(
        default=None, metadata={"help": "linear warmup steps (default: min(100, steps // 10))"}
    )
    min_lr_ratio: float = dataclasses.field(
        default=0.1,
        metadata={"help": "final learning rate (cosine, linear, wsd), as a fraction of lr"},
    )
    weight_decay: float = dataclasses.field(
        default=0.1, metadata={"help": "decoupled weight decay (kernels only)"}
    )
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float | None = dataclasses.field(
        default=1.0, metadata={"help": "global gradient-norm clip (none: off)"}
    )
    dtype: str = dataclasses.field(
        default="float32",
        metadata={"help": "compute dtype (parameters stay float32)", "choices": _COMPUTE_DTYPES},
    )
    # run
    seed: int = 0
    out: str = dataclasses.field(
        default="", metadata={"help": "output directory (default: runs/<model>)"}
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
    tracker: str = dataclasses.field(
        default="",
        metadata={"help": "experiment trackers, comma-separated: tensorboard, wandb, trackio"},
    )
    tracker_project: str = dataclasses.field(
        default="xlstm-eqx", metadata={"help": "project name for wandb / trackio"}
    )
    profile_steps: str = dataclasses.field(
        default="", metadata={"help": "'A:B': write a jax.profiler trace of steps A to B"}
    )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s): {', '.join(unknown)}")
        return cls(**{k: _checked_value(k, v) for k, v in d.items()})

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
        """Raise a ValueError naming the flag (and field) of the first invalid value, before
        anything is read or written."""
        for f in dataclasses.fields(self):
            _checked_value(f.name, getattr(self, f.name))
        if not 0 <= self.seed < 2**32:
            raise _invalid("seed", "in [0, 2**32)", self.seed)
        if self.max_data_bytes is not None and self.max_data_bytes < 1:
            raise _invalid("max_data_bytes", "a positive integer or none", self.max_data_bytes)
        positive = ["seq_len", "batch_size", "grad_accum", "steps", "log_every", "eval_every"]
        positive += ["eval_batches", "checkpoint_every", "keep_checkpoints", "prefetch"]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise _invalid(name, "a positive integer", value)
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices is not None and getattr(self, f.name) not in choices:
                raise _invalid(f.name, f"one of {', '.join(choices)}", getattr(self, f.name))
        _check_batch_memory(self)
        # Floats: finite and in range (NaN fails every comparison, so `not (lo <= x)` catches it).
        finite_ranges = [
            ("lr", "> 0", lambda x: x > 0),
            ("weight_decay", ">= 0", lambda x: x >= 0),
            ("adam_eps", "> 0", lambda x: x > 0),
            ("sample_temperature", ">= 0", lambda x: x >= 0),
            ("min_lr_ratio", "in [0, 1]", lambda x: 0 <= x <= 1),
            ("beta1", "in [0, 1)", lambda x: 0 <= x < 1),
            ("beta2", "in [0, 1)", lambda x: 0 <= x < 1),
            ("eval_fraction", "in (0, 1)", lambda x: 0 < x < 1),
            ("decay_fraction", "in (0, 1]", lambda x: 0 < x <= 1),
        ]
        if self.grad_clip is not None:
            finite_ranges.append(("grad_clip", "> 0 (or none)", lambda x: x > 0))
        for name, what, ok in finite_ranges:
            value = getattr(self, name)
            if not (math.isfinite(value) and ok(value)):
                raise _invalid(name, f"a finite number {what}", value)
        w = self.resolved_warmup()
        if not 0 <= w < self.steps:
            raise _invalid("warmup_steps", f"in [0, steps={self.steps})", w)
        for name in self.trackers():
            if name not in TRACKERS:
                raise ValueError(
                    f"{_flag('tracker')}: unknown tracker {name!r} (expected {', '.join(TRACKERS)})"
                )
        if self.mesh:
            parts = self.mesh.split(",")
            if any(not p.strip() for p in parts):
                raise _invalid("mesh", "AXIS=SIZE entries separated by single commas", self.mesh)
        if self.profile_steps:
            parts = self.profile_steps.split(":")
            if len(parts) != 2 or not all(p.isdigit() for p in parts):
                raise _invalid("profile_steps", "'A:B' (steps)", self.profile_steps)
            a, b = int(parts[0]), int(parts[1])
            if not 1 <= a <= b:
                raise _invalid("profile_steps", "'A:B' with 1 <= A <= B", self.profile_steps)
            if b > self.steps:
                raise _invalid(
                    "profile_steps", f"'A:B' with B <= --steps {self.steps}", self.profile_steps
                )
        if self.sample_tokens < 0:
            raise _invalid("sample_tokens", ">= 0", self.sample_tokens)


def _flag(name: str) -> str:
    """How a field is named in errors: its flag, then the field (for config files and Python)."""
    return f"--{name.replace('_', '-')} (TrainConfig.{name})"


def _invalid(name: str, what: str, value: Any) -> ValueError:
    text = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
    return ValueError(f"{_flag(name)} must be {what}, got {text}")


def _host_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _check_batch_memory(cfg: "TrainConfig") -> None:
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


def _checked_value(name: str, value: Any) -> Any:
    """`value` for field `name` if it has the field's type (a single string is accepted for a
    list field, an int for a float field), else a ValueError naming the field and the value."""
    tp = {f.name: f.type for f in dataclasses.fields(TrainConfig)}[name]
    text = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
    optional = False
    if getattr(tp, "__args__", None) and type(None) in tp.__args__:
        optional = True
        tp = next(a for a in tp.__args__ if a is not type(None))
    if value is None and optional:
        return None
    if typing.get_origin(tp) is list:
        if isinstance(value, str):
            return [value]
        if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
            return list(value)
        raise ValueError(f"TrainConfig.{name} must be a list of strings, got {text}")
    ok = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, int | float) and not isinstance(v, bool),
        str: lambda v: isinstance(v, str),
    }[tp](value)
    if not ok:
        what = tp.__name__ + (" or null" if optional else "")
        raise ValueError(f"TrainConfig.{name} must be {what}, got {type(value).__name__} {text}")
    return float(value) if tp is float else value


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
    }
)


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
