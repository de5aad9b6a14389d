"""What a run knows before it computes anything: `prepare_run` validates the config, the model
config, the mesh, the output directory and (on ``--resume``) the checkpoint and the data's
identity, then opens the corpus; `run_config_dict` is what ``config.json`` and every checkpoint
record of the run. Nothing here writes."""

import dataclasses
import os
from typing import Any

import equinox as eqx
import jax
import jax.random as jr
import numpy as np

from ..data.batch import TokenBatch
from ..data.corpus import BatchSampler, Corpus, eval_windows
from ..data.loader import load_corpus_all_processes
from ..data.sources import absolute_patterns
from ..data.tokenizer import BYTES_SPECS, Tokenizer, load_tokenizer, tokenizer_from_dict
from ..models import MODEL_FAMILIES, ModelConfig
from ..parallel.mesh import axis_sizes, parse_mesh_spec
from .batch_ramp import check_rampup_on_mesh
from .checkpoint import CheckpointError
from .config import RESUMABLE_FIELDS, TrainConfig, check_sequence_length, resolve_model_config
from .extend import resume_point
from .init_from import (
    OpenedSource,
    apply_free_fields,
    describe_source,
    open_init_source,
    source_changes,
    with_default_fsdp,
)
from .newest_intact import read_newest, warn
from .orbax_checkpoint import list_checkpoints, load_metadata, refuse_npz_checkpoints
from .packing import isolate_documents
from .preflight import check_mesh, check_out_dir, check_resume_steps
from .trackers import check_trackers_available


@dataclasses.dataclass
class PreparedRun:
    cfg: TrainConfig
    kind: str
    model_config: ModelConfig
    tokenizer: Tokenizer
    corpus: Corpus
    sampler: BatchSampler
    eval_batches: "list[np.ndarray] | list[TokenBatch]"
    unigram_bpb: float
    resume_from: str | None
    resume_meta: dict[str, Any] | None
    data_paths: tuple[str, ...] = ()  # `--data` made absolute when the run began
    damaged: tuple[str, ...] = ()  # newer checkpoints skipped on --resume (unreadable metadata)
    init: OpenedSource | None = None  # --init-from of a new run: the weights to read
    init_record: dict[str, Any] | None = None  # where the run's weights began (InitSource)


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


def prepare_run(cfg: TrainConfig) -> PreparedRun:
    """Validate the run and open its data; on ``--resume``, the checkpoint to continue from."""
    cfg.validate()
    if jax.process_index() == 0:
        check_trackers_available(cfg.trackers())
    out = cfg.out_dir()
    resume_from, resume_meta, saved_run, damaged = _resume_source(cfg, out)
    init, init_record = None, _recorded_init(saved_run)
    if saved_run is not None:
        tokenizer = tokenizer_from_dict(saved_run["tokenizer"])
        kind = saved_run["model_kind"]
        if kind not in MODEL_FAMILIES:
            raise CheckpointError(f"checkpoint {resume_from!r}: unknown model kind {kind!r}")
        model_config = MODEL_FAMILIES[kind].config_from_dict(saved_run["model_config"])
    elif cfg.init_from:
        tokenizer, kind, model_config, init = _init_source_model(cfg)
    else:
        tokenizer = load_tokenizer(cfg.tokenizer)
        kind, model_config = resolve_model_config(cfg, tokenizer)
    if cfg.data_format == "sft":  # packed examples must not see each other
        model_config = isolate_documents(model_config)
    check_sequence_length(cfg.seq_len, model_config)
    if cfg.mesh:  # before the data is read
        check_rampup_on_mesh(cfg, check_mesh(cfg.mesh, model_config, seq_len=cfg.seq_len))
    vocab = int(model_config.vocab_size)
    corpus, paths = _open_corpus(cfg, tokenizer, saved_run, out)
    corpus.check_vocab(vocab)
    sampler = BatchSampler(
        corpus.train_reader,
        seq_len=cfg.seq_len,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        flags=corpus.train_flags,
    )
    batches = eval_windows(
        corpus.heldout_reader,
        seq_len=cfg.seq_len,
        batch_size=cfg.batch_size,
        max_batches=cfg.eval_batches,
        flags=corpus.heldout_flags,
    )
    # The baseline: every held-out token under the training text's token frequencies.
    unigram = corpus.unigram_bits_per_byte(vocab)
    return PreparedRun(
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
        tuple(paths),
        tuple(damaged),
        init=init,
        # The record (its hash reads the weights files once) once the data checks passed.
        init_record=init_record if init is None else describe_source(init, tokenizer).to_dict(),
    )


def _init_source_model(cfg: TrainConfig) -> tuple[Tokenizer, str, ModelConfig, OpenedSource]:
    """``--init-from``: the tokenizer (``--tokenizer``, else the source's own, else bytes), the
    family and the model config of the source (its headers only: no weights are read), with
    the free fields of the flags and, on an ``--mesh`` with fsdp > 1 where the source names no
    FSDP modules, FSDP over every big weight."""
    source = open_init_source(cfg.init_from, dtype=cfg.dtype)
    own = source.source_tokenizer()
    explicit = cfg.tokenizer not in BYTES_SPECS  # "bytes" is the default: the source's wins
    tokenizer = own if own is not None and not explicit else load_tokenizer(cfg.tokenizer)
    changes = {"context_length": cfg.context_length, "dropout": cfg.dropout}
    config = apply_free_fields(source.family, source.config, changes)
    if cfg.mesh:
        family = MODEL_FAMILIES[source.family]
        base = getattr(config, "parallel", None) or parse_mesh_spec(cfg.mesh)
        sizes = axis_sizes(parse_mesh_spec(cfg.mesh, base))
        skeleton = eqx.filter_eval_shape(family.build, config, key=jr.key(0))
        layout = with_default_fsdp(base, skeleton, sizes)
        if layout is not base:
            config = apply_free_fields(source.family, config, {"parallel": layout})
    return tokenizer, source.family, config, source


def _recorded_init(saved_run: dict[str, Any] | None) -> dict[str, Any] | None:
    """The `InitSource` a resumed run records; a source changed since is reported (the run goes
    on from its own checkpoints: the source is not read again)."""
    record = (saved_run or {}).get("init_from")
    if not isinstance(record, dict):
        return None
    changed = source_changes(record)
    if changed:
        warn(
            f"note: --init-from {record.get('path')!r} changed since this run began "
            f"({', '.join(changed[:3])}{', ...' if len(changed) > 3 else ''}); the run resumes "
            "from its own checkpoint, which does not read it"
        )
    return record


def _resume_source(
    cfg: TrainConfig, out: str
) -> tuple[str | None, dict[str, Any] | None, dict[str, Any] | None, list[str]]:
    """``(checkpoint, its metadata, the run config it records, damaged newer ones)`` on
    ``--resume`` (all None/empty for a new run, whose directory is checked instead)."""
    ckpt_root = os.path.join(out, "checkpoints")
    refuse_npz_checkpoints(ckpt_root)
    if not cfg.resume:
        if list_checkpoints(ckpt_root):
            raise FileExistsError(
                f"{out!r} already holds a run with checkpoints; pass --resume to continue it "
                "or choose another --out"
            )
        check_out_dir(out)
        return None, None, None, []
    if not list_checkpoints(ckpt_root):
        raise FileNotFoundError(f"--resume: no checkpoint found in {ckpt_root!r}")
    # A newest checkpoint whose metadata is damaged (or an empty step directory) is skipped
    # with a warning, as its arrays are later (`restore_newest_intact`).
    resume_meta, resume_from, damaged = read_newest(
        lambda: [path for _, path in list_checkpoints(ckpt_root)],
        load_metadata,
        where=ckpt_root,
    )
    saved_run = resume_meta.get("metadata", {}).get("run_config")
    if not isinstance(saved_run, dict) or "train" not in saved_run:
        raise CheckpointError(f"checkpoint {resume_from!r} has no run configuration")
    _compatible(saved_run["train"], cfg, out)
    check_resume_steps(cfg.steps, int(resume_meta.get("step", 0)), out)
    # A wsd run extended past the decay it began restarts from that decay's start.
    chosen = resume_point(cfg, saved_run["train"], resume_from, int(resume_meta["step"]), out)
    if chosen != resume_from:
        resume_from, resume_meta = chosen, load_metadata(chosen)
    return resume_from, resume_meta, saved_run, damaged


def _open_corpus(
    cfg: TrainConfig, tokenizer: Tokenizer, saved_run: dict[str, Any] | None, out: str
) -> tuple[Corpus, list[str]]:
    """The corpus and the ``--data`` paths to record. A new run reads ``--data`` as typed and
    records it made absolute; ``--resume`` reads that record (from any directory; runs made
    before it was recorded: as typed)."""
    paths = absolute_patterns(cfg.data)
    data = cfg.data
    if saved_run is not None and "paths" in saved_run.get("data", {}):
        data = paths = saved_run["data"]["paths"]
    corpus = load_corpus_all_processes(
        data,
        tokenizer,
        text_field=cfg.text_field,
        eval_fraction=cfg.eval_fraction,
        max_bytes=cfg.max_data_bytes,
        split=cfg.data_split,
        eod_token=cfg.eod_token,
        cache_dir=cfg.data_cache or None,
        packed_row=cfg.seq_len + 1 if cfg.data_format == "sft" else None,
        # On --resume: the data must be what the run was trained on.
        expected=(saved_run or {}).get("data", {}).get("identity"),
        where=f"--resume {out!r}",
    )
    return corpus, list(paths)


def run_config_dict(p: PreparedRun) -> dict[str, Any]:
    return {
        "train": p.cfg.to_dict(),
        "model_kind": p.kind,
        "model_config": p.model_config.to_dict(),
        "tokenizer": p.tokenizer.to_dict(),
        **({"init_from": p.init_record} if p.init_record is not None else {}),
        "data": {
            # --data made absolute: `eval` and `--resume` read these files from any directory.
            "paths": list(p.data_paths),
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
