"""Starting a run from trained weights: ``xlstm-eqx train --init-from PATH`` and
`load_init_model`.

PATH is one of the formats registered here (`register_init_format`): a run directory of ours
(its newest intact checkpoint) or one of its checkpoint directories (``DIR/checkpoints/step_N``),
and, registered by `xlstm_eqx.interop` (which the command line imports), a transformers
``xLSTMForCausalLM`` directory or an xlstm-jax checkpoint. Only the weights are taken: the
optimizer state, schedule, step counter and data start afresh. The architecture is the source's;
only `FREE_FIELDS` (context length, dropout, compute dtype, the mesh layout) may be changed.
Each tensor is placed into its sharding as it is read, so no array is ever whole on one device.

The run records where it began (`InitSource`: path, format, a SHA-256 of the weights files,
their sizes and modification times) in its ``config.json`` and every checkpoint; ``--resume``
continues from the run's own checkpoints and never reads the source again
(`source_changes` only reports a source changed since) — except for a LoRA run started from a
source: its checkpoints hold only the trainable leaves (`holds_trainable_only`) and point at the
base, which `adapted_base` reads again from the recorded path after checking its content hash.
"""

import dataclasses
import hashlib
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.random as jr
from jax.sharding import Mesh
from jaxtyping import PyTree

from ..core.parallel_config import ParallelConfig
from ..data.tokenizer import Tokenizer, load_tokenizer, tokenizer_from_dict
from ..models import MODEL_FAMILIES, ModelConfig
from ..parallel.placement import named_shardings
from ..parallel.rules import declared_module_names, param_partition_specs
from .checkpoint import CheckpointError
from .finetune import LoRASettings, add_lora, merge_lora, trainable_mask, with_finetuning
from .newest_intact import read_newest
from .orbax_checkpoint import list_checkpoints, load_metadata, restore_checkpoint


__all__ = [
    "FREE_FIELDS",
    "InitSource",
    "adapted_base",
    "holds_trainable_only",
    "restore_run_model",
    "OpenedSource",
    "SourceFormat",
    "apply_free_fields",
    "default_fsdp_modules",
    "describe_source",
    "load_init_model",
    "open_init_source",
    "parallel_for_mesh",
    "place_like",
    "register_init_format",
    "source_changes",
    "with_default_fsdp",
]


#: Model config fields a run started from weights may set differently from its source (the
#: architecture — every other field — is the source's). Llama's dropout is ``dropout_rate``.
FREE_FIELDS = ("context_length", "dropout", "dtype", "parallel")
_FIELD_NAMES = {"llama": {"dropout": "dropout_rate"}}

# Loads the weights into a skeleton of the (possibly changed) config: (config, skeleton,
# shardings tree or None) -> model.
WeightLoader = Callable[[ModelConfig, PyTree, PyTree | None], PyTree]


@dataclasses.dataclass(frozen=True)
class OpenedSource:
    """A source whose config (and shard headers, where it has them) is read, its weights not yet:
    ``family`` and ``config`` describe the model, ``checkpoint`` is what the weights come from
    (a run: its step directory), ``files`` every file they are read from (hashed into
    `InitSource.content_hash`), ``tokenizer`` the source's own (a `Tokenizer.to_dict` or a
    spec for `load_tokenizer`; None: it records none)."""

    kind: str
    path: str
    family: str
    config: ModelConfig
    checkpoint: str
    files: tuple[str, ...]
    load: WeightLoader
    tokenizer: dict[str, Any] | str | None = None
    step: int | None = None

    def source_tokenizer(self) -> Tokenizer | None:
        if self.tokenizer is None:
            return None
        if isinstance(self.tokenizer, dict):
            return tokenizer_from_dict(self.tokenizer)
        return load_tokenizer(self.tokenizer)


@dataclasses.dataclass(frozen=True)
class SourceFormat:
    """One kind of ``--init-from`` source: ``detect(path)`` says whether ``path`` is one (cheap:
    file names only), ``open(path, dtype)`` reads its config (`OpenedSource`)."""

    kind: str
    detect: Callable[[str], bool]
    open: Callable[[str, str | None], OpenedSource]


@dataclasses.dataclass(frozen=True)
class InitSource:
    """Where a run's weights came from, as its run files record it."""

    kind: str  # "run", "hf" or "xlstm-jax"
    path: str  # the --init-from path, absolute
    checkpoint: str  # the file or directory the weights were read from
    content_hash: str  # "sha256:<hex>" over the weights files' names and bytes
    tokenizer: dict[str, Any] | None  # the tokenizer the run uses (Tokenizer.to_dict())
    step: int | None  # a run's checkpoint step
    files: dict[str, list[int]]  # file -> [size, mtime_ns] when the run began

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_FORMATS: list[SourceFormat] = []


def register_init_format(fmt: SourceFormat) -> None:
    """Add (or replace, by ``kind``) a source format; earlier ones are tried first."""
    for i, known in enumerate(_FORMATS):
        if known.kind == fmt.kind:
            _FORMATS[i] = fmt
            return
    _FORMATS.append(fmt)


def open_init_source(path: str, *, dtype: str | None = None) -> OpenedSource:
    """The source at ``path`` with its config read (`OpenedSource`); a ValueError naming
    ``--init-from`` if it is none of the registered formats."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"--init-from {path!r}: no such file or directory")
    for fmt in _FORMATS:
        if fmt.detect(path):
            return fmt.open(os.path.abspath(path), dtype)
    kinds = ", ".join(f.kind for f in _FORMATS)
    hint = "" if len(_FORMATS) > 1 else " (import xlstm_eqx.interop to read transformers and "
    hint += "" if len(_FORMATS) > 1 else "xlstm-jax checkpoints)"
    raise ValueError(
        f"--init-from {path!r} is not a checkpoint of a known kind ({kinds}): expected a run "
        "directory or its checkpoints/step_N, a transformers xLSTMForCausalLM directory "
        "(config.json + safetensors) or an xlstm-jax checkpoint" + hint
    )


# the config


def apply_free_fields(family: str, config: ModelConfig, changes: Mapping[str, Any]) -> ModelConfig:
    """``config`` with ``changes`` of `FREE_FIELDS` applied (None values skipped); any other
    field would change the architecture and is refused with a ValueError naming it."""
    refused = sorted(k for k in changes if k not in FREE_FIELDS)
    if refused:
        raise ValueError(
            f"--init-from: {', '.join(refused)} would change the architecture, which comes from "
            f"the source; only {', '.join(FREE_FIELDS)} may differ"
        )
    names = _FIELD_NAMES.get(family, {})
    given = {names.get(k, k): v for k, v in changes.items() if v is not None}
    # ModelConfig is a Protocol (no dataclass type to the checker); every one is a dataclass.
    return dataclasses.replace(config, **given) if given else config  # type: ignore[type-var]


def default_fsdp_modules(skeleton: PyTree) -> list[str]:
    """FSDP over every big weight of a model whose config names no FSDP modules: the
    embedding, the head and each block (the presets' choice for large models)."""
    declared = declared_module_names(skeleton)
    blocks = [name for name in ("mLSTMBlock", "TransformerBlock") if name in declared]
    return ["Embed", "LMHead", *blocks]


def with_default_fsdp(
    parallel: ParallelConfig, skeleton: PyTree, mesh_shape: Mapping[str, int]
) -> ParallelConfig:
    """``parallel`` with `default_fsdp_modules` where it names none and the mesh's fsdp axis is
    larger than one (otherwise unchanged): a model loaded at size is sharded, not replicated."""
    if parallel.fsdp_modules or int(mesh_shape.get(parallel.fsdp_axis_name, 1)) <= 1:
        return parallel
    return dataclasses.replace(parallel, fsdp_modules=default_fsdp_modules(skeleton))


def parallel_for_mesh(mesh: Mesh, base: ParallelConfig | None, skeleton: PyTree) -> ParallelConfig:
    """The parallel config of ``mesh``: ``base``'s choices (FSDP modules, gather dtype, ...;
    default FSDP as `with_default_fsdp`) with the mesh's axis sizes; a ValueError names axes
    ``base`` expects and the mesh lacks."""
    template = with_default_fsdp(
        base if base is not None else ParallelConfig(), skeleton, mesh.shape
    )
    names = (
        ("data_axis_size", template.data_axis_name),
        ("fsdp_axis_size", template.fsdp_axis_name),
        ("pipeline_axis_size", template.pipeline_axis_name),
        ("model_axis_size", template.model_axis_name),
    )
    missing = [n for _, n in names if n not in mesh.shape]
    if missing:
        raise ValueError(
            f"mesh axes {tuple(mesh.shape)} lack {missing}; pass parallel= with its axis names"
        )
    return dataclasses.replace(template, **{f: int(mesh.shape[n]) for f, n in names})


# the record


def _expand(files: Sequence[str]) -> list[str]:
    """The files, directories replaced by every file under them, each once, sorted."""
    out: set[str] = set()
    for f in files:
        if os.path.isdir(f):
            for root, _, names in os.walk(f):
                out.update(os.path.join(root, n) for n in names)
        else:
            out.add(f)
    return sorted(out)


def _file_stats(files: Sequence[str]) -> dict[str, list[int]]:
    stats = {}
    for f in files:
        st = os.stat(f)
        stats[f] = [int(st.st_size), int(st.st_mtime_ns)]
    return stats


def _content_hash(files: Sequence[str], root: str) -> str:
    """SHA-256 over each file's name (relative to ``root``), size and bytes, in order."""
    digest = hashlib.sha256()
    for f in files:
        name = os.path.relpath(f, root)
        digest.update(f"{name}\0{os.path.getsize(f)}\0".encode())
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 24):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def _source_hash(opened: OpenedSource) -> str:
    root = opened.path if os.path.isdir(opened.path) else os.path.dirname(opened.path)
    return _content_hash(_expand(opened.files), root)


def describe_source(opened: OpenedSource, tokenizer: Tokenizer | None = None) -> InitSource:
    """The record of ``opened`` (its weights files hashed: one read of each); ``tokenizer`` the
    run's (default: the source's own)."""
    files = _expand(opened.files)
    tok = tokenizer if tokenizer is not None else opened.source_tokenizer()
    return InitSource(
        kind=opened.kind,
        path=opened.path,
        checkpoint=opened.checkpoint,
        content_hash=_source_hash(opened),
        tokenizer=None if tok is None else tok.to_dict(),
        step=opened.step,
        files=_file_stats(files),
    )


def source_changes(record: Mapping[str, Any]) -> list[str]:
    """The files of a recorded `InitSource` that are gone or differ in size or modification
    time since the run began (from ``stat`` alone: the source is never read again)."""
    changed = []
    for f, (size, mtime) in dict(record.get("files", {})).items():
        try:
            st = os.stat(f)
        except OSError:
            changed.append(f"{f} (gone)")
            continue
        if int(st.st_size) != size or int(st.st_mtime_ns) != mtime:
            changed.append(f)
    return changed


# the public entry point


def load_init_model(
    source: str,
    model_config_overrides: Mapping[str, Any] | None = None,
    *,
    mesh: Mesh | None = None,
    parallel: ParallelConfig | None = None,
    dtype: str | None = None,
) -> tuple[PyTree, ModelConfig, InitSource]:
    """``(model, model_config, InitSource)`` of a checkpoint (any `open_init_source` format).

    ``model_config_overrides``: `FREE_FIELDS` to change (others raise a ValueError naming them).
    ``mesh``: each tensor goes straight into its sharding as it is read, by the partition rules
    of ``parallel`` (default: the source config's with the mesh's sizes, FSDP over
    `default_fsdp_modules` on an fsdp axis > 1; the returned config carries it). ``dtype``: the
    compute dtype (default: the source's)."""
    opened = open_init_source(source, dtype=dtype)
    changes = dict(model_config_overrides or {})
    if dtype is not None:
        changes.setdefault("dtype", dtype)
    config = apply_free_fields(opened.family, opened.config, changes)
    family = MODEL_FAMILIES[opened.family]
    skeleton = eqx.filter_eval_shape(family.build, config, key=jr.key(0))
    shardings = None
    if mesh is not None:
        base = getattr(config, "parallel", None)
        pc = parallel if parallel is not None else parallel_for_mesh(mesh, base, skeleton)
        config = apply_free_fields(opened.family, config, {"parallel": pc})
        specs = param_partition_specs(skeleton, pc, num_devices=mesh.devices.size)
        shardings = named_shardings(specs, mesh)
    model = opened.load(config, skeleton, shardings)
    return model, config, describe_source(opened)


# LoRA runs whose checkpoints point at their base


def holds_trainable_only(run: Mapping[str, Any]) -> bool:
    """Whether a run's checkpoints hold only its trainable leaves (the LoRA adapters and any
    ``--trainable`` ones): a LoRA run started ``--init-from`` a source, which they point at (a
    LoRA run from random weights has no base to point at and saves the whole model)."""
    return LoRASettings.from_run_config(dict(run)) is not None and isinstance(
        run.get("init_from"), dict
    )


def adapted_base(
    record: Mapping[str, Any],
    kind: str,
    config: ModelConfig,
    settings: LoRASettings,
    base_shardings: PyTree | None = None,
) -> PyTree:
    """The model a trainable-only checkpoint completes: the base read again from the recorded
    ``--init-from`` source (``record``, an `InitSource` dict) with adapters added (their values
    come from the checkpoint); ``base_shardings``: the base's layout on a mesh. A source gone or whose content hash differs from the recorded one
    is a `CheckpointError` naming the path and both hashes: the adapter fits only its base."""
    path, want = str(record.get("path")), str(record.get("content_hash"))
    if not os.path.exists(path):
        raise CheckpointError(
            f"this LoRA run's checkpoints hold only the adapter; its base --init-from {path!r} "
            f"(content {want}) is gone: put it back at that path"
        )
    opened = open_init_source(path)
    got = _source_hash(opened)
    if got != want:
        raise CheckpointError(
            f"this LoRA run's base --init-from {path!r} changed since the run began: content "
            f"{got}, recorded {want}; the adapter only fits the base it was trained on"
        )
    skeleton = eqx.filter_eval_shape(MODEL_FAMILIES[kind].build, config, key=jr.key(0))
    return add_lora(opened.load(config, skeleton, base_shardings), settings, jr.key(0))


def restore_run_model(
    path: str, run: Mapping[str, Any], shardings: PyTree | None = None
) -> tuple[PyTree, ModelConfig]:
    """``(model, config)`` of a run's checkpoint ``path`` (``run``: its recorded run config):
    the model as trained (LoRA adapters included); a trainable-only checkpoint completed with
    its base (`adapted_base`)."""
    kind = str(run["model_kind"])
    family = MODEL_FAMILIES[kind]
    config = family.config_from_dict(run["model_config"])
    settings = LoRASettings.from_run_config(dict(run))
    skeleton = eqx.filter_eval_shape(with_finetuning(family.build, settings), config, key=jr.key(0))
    if settings is None or not holds_trainable_only(run):
        given = None if shardings is None else {"model": shardings}
        return restore_checkpoint(path, {"model": skeleton}, given)[0]["model"], config
    mask = trainable_mask(skeleton, run["train"].get("trainable") or None)
    given = None if shardings is None else {"model": eqx.filter(shardings, mask)}
    trees, _ = restore_checkpoint(path, {"model": eqx.filter(skeleton, mask)}, given)
    model = eqx.combine(trees["model"], adapted_base(run["init_from"], kind, config, settings))
    # The base is read whole, then placed (its layout is the base's, not the adapted tree's).
    return place_like(model, skeleton, shardings), config


def place_like(model: PyTree, skeleton: PyTree, shardings: PyTree | None) -> PyTree:
    """``model`` in ``skeleton``'s dtypes (a merged bf16 base trains in float32), put into
    ``shardings``."""
    as_skeleton = lambda w, x: x.astype(w.dtype) if eqx.is_array(x) else x  # noqa: E731
    model = jax.tree.map(as_skeleton, skeleton, model)
    if shardings is None:
        return model
    place = lambda s, x: x if s is None else jax.device_put(x, s)  # noqa: E731
    return jax.tree.map(place, shardings, model, is_leaf=lambda s: s is None)


# our own runs


def _is_step_dir(path: str) -> bool:
    parent = os.path.dirname(os.path.abspath(path))
    return os.path.basename(parent) == "checkpoints" and any(
        os.path.samefile(p, path) for _, p in list_checkpoints(parent)
    )


def _is_run(path: str) -> bool:
    """A directory with our ``checkpoints/step_N`` (an xlstm-jax trainer's ``checkpoints/``
    holds ``checkpoint_N``), or one such step directory."""
    return os.path.isdir(path) and (
        bool(list_checkpoints(os.path.join(path, "checkpoints"))) or _is_step_dir(path)
    )


def _open_run(path: str, dtype: str | None) -> OpenedSource:
    """A run directory (its newest intact checkpoint) or one of its step directories."""
    if _is_step_dir(path):
        chosen, meta = path, load_metadata(path)
    else:
        root = os.path.join(path, "checkpoints")
        meta, chosen, _ = read_newest(
            lambda: [p for _, p in list_checkpoints(root)], load_metadata, where=root
        )
    run = meta.get("metadata", {}).get("run_config")
    if not isinstance(run, dict) or run.get("model_kind") not in MODEL_FAMILIES:
        raise CheckpointError(f"--init-from: checkpoint {chosen!r} has no usable run configuration")
    kind = str(run["model_kind"])
    config = MODEL_FAMILIES[kind].config_from_dict(run["model_config"])
    if dtype is not None:
        config = apply_free_fields(kind, config, {"dtype": dtype})

    def load(cfg: ModelConfig, skeleton: PyTree, shardings: PyTree | None) -> PyTree:
        del cfg
        if LoRASettings.from_run_config(run) is not None:  # a LoRA run: its merged weights
            return place_like(merge_lora(restore_run_model(chosen, run)[0]), skeleton, shardings)
        given = None if shardings is None else {"model": shardings}
        trees, _ = restore_checkpoint(chosen, {"model": skeleton}, given)
        return trees["model"]

    tok = run.get("tokenizer")
    return OpenedSource(
        kind="run",
        path=os.path.abspath(path),
        family=kind,
        config=config,
        checkpoint=os.path.abspath(chosen),
        files=(os.path.abspath(chosen),),
        load=load,
        tokenizer=tok if isinstance(tok, dict) else None,
        step=int(meta.get("step", 0)),
    )


register_init_format(SourceFormat("run", _is_run, _open_run))
