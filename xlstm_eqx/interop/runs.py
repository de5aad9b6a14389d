"""This library's own run layout as a conversion format, and loading a transformers directory
for generation.

A run directory holds ``config.json`` (``model_kind``, ``model_config``, the tokenizer when known)
and ``checkpoints/step_00000000/`` (an orbax checkpoint, `save_checkpoint`); ``xlstm-eqx
eval/generate --out DIR`` and `load_run` read it.
"""

import json
import os
import shutil
from typing import Any

from ..core.files import copy_file_atomic, write_atomic
from ..data.tokenizer import BYTES_SPECS, load_tokenizer
from ..llama.config import LlamaConfig
from ..models import MODEL_FAMILIES, ModelConfig, family_of
from ..training.evaluate import load_run
from ..training.orbax_checkpoint import save_checkpoint
from ..xlstm.config import xLSTMLMModelConfig
from .common import MAX_BLOCKS, InteropError, load_json, printable
from .hf import TOKENIZER_MARKER, from_hf_pretrained


def family_name_of(config: ModelConfig) -> str:
    try:
        return family_of(config).name
    except TypeError as e:
        raise InteropError(str(e)) from None


def read_model_config(path: str) -> xLSTMLMModelConfig | LlamaConfig:
    """A model config from JSON: ``{"model_kind", "model_config"}`` (a run's config.json or a
    fixture's) or a bare config dict (Llama if it has ``head_dim`` and no ``mlstm_block``)."""

    if not os.path.isfile(path):
        raise InteropError(f"model config {path!r} does not exist")
    d = load_json(path, max_bytes=16 * 1024 * 1024)
    if not isinstance(d, dict):
        raise InteropError(f"model config {path!r} must hold a JSON object")
    if "model_kind" in d and "model_config" in d:
        kind, d = d["model_kind"], d["model_config"]
    else:
        kind = "llama" if "head_dim" in d and "mlstm_block" not in d else "xlstm"
    classes = {"xlstm": xLSTMLMModelConfig, "llama": LlamaConfig}
    if not isinstance(kind, str) or kind not in classes:
        raise InteropError(
            f"model config {path!r}: unknown model_kind {printable(repr(kind))[:60]}"
        )
    if not isinstance(d, dict):
        raise InteropError(f"model config {path!r}: model_config must be a JSON object")
    blocks = d.get("num_blocks")
    if isinstance(blocks, int) and blocks > MAX_BLOCKS:  # before a per-block list is made
        raise InteropError(f"model config {path!r}: num_blocks={blocks} is more than {MAX_BLOCKS}")
    try:
        return classes[kind].from_dict(d)
    except ValueError as e:
        raise InteropError(f"model config {path!r}: {printable(str(e))}") from None


def save_eqx(
    model: Any,
    config: ModelConfig,
    out: str,
    *,
    tokenizer_file: str | None = None,
    source: dict[str, Any] | None = None,
) -> str:
    """Write ``model`` as our run layout under ``out`` (see the module docstring).
    ``tokenizer_file``: ``"bytes"`` or a tokenizer.json (copied into ``out``)."""

    os.makedirs(out, exist_ok=True)
    ckpt_root = os.path.join(out, "checkpoints")
    if os.path.isdir(os.path.join(ckpt_root, "step_00000000")):  # converting again: replace it
        shutil.rmtree(os.path.join(ckpt_root, "step_00000000"))
    run: dict[str, Any] = {"model_kind": family_name_of(config), "model_config": config.to_dict()}
    if tokenizer_file in BYTES_SPECS:
        run["tokenizer"] = {"kind": "bytes"}
    elif tokenizer_file is not None:
        dst = os.path.join(out, "tokenizer.json")
        if os.path.abspath(tokenizer_file) != os.path.abspath(dst):
            copy_file_atomic(tokenizer_file, dst)
        run["tokenizer"] = {"kind": "tokenizers", "path": os.path.abspath(dst)}
    if source:
        run["converted_from"] = source
    save_checkpoint(
        ckpt_root,
        0,
        {"model": model},
        {"step": 0, "run_config": run},
        keep=None,
    )
    text = json.dumps(run, indent=2) + "\n"
    write_atomic(os.path.join(out, "config.json"), lambda f: f.write(text.encode("utf-8")))
    return out


def load_eqx(path: str) -> tuple[Any, Any, str | None]:
    """``(model, config, tokenizer)`` from our run layout: the tokenizer as ``"bytes"``, a
    tokenizer.json path, or None where the run records none."""

    model, config, tok, _ = read_eqx(path)
    return model, config, tok


def read_eqx(path: str) -> tuple[Any, Any, str | None, int]:
    """`load_eqx` and the step of the checkpoint read: a damaged newest one is skipped (with a
    warning naming it), so the caller can say which step it got."""

    model, run, step = load_run(path)
    config = MODEL_FAMILIES[run["model_kind"]].config_from_dict(run["model_config"])
    tok = run.get("tokenizer") or {}
    if tok.get("kind") == "bytes":
        return model, config, "bytes", step
    tok_file = tok.get("path") if tok.get("kind") == "tokenizers" else None
    return model, config, tok_file, step


def hf_directory_tokenizer(path: str) -> str | None:
    """The tokenizer of a transformers directory: its tokenizer.json, ``"bytes"`` where an export
    of a byte-tokenizer model recorded that (`TOKENIZER_MARKER`), else None."""
    f = os.path.join(path, "tokenizer.json")
    if os.path.isfile(f):
        return f
    marker = os.path.join(path, TOKENIZER_MARKER)
    if os.path.isfile(marker):
        d = load_json(marker, max_bytes=4096)
        if not (isinstance(d, dict) and d.get("kind") == "bytes"):
            raise InteropError(f'{marker!r} must hold {{"kind": "bytes"}}')
        return "bytes"
    return None


# generate --hf


def load_hf_for_generation(
    path: str, *, dtype: str | None = None, tokenizer: str | None = None
) -> tuple[Any, Any, Any]:
    """``(model, config, tokenizer or None)`` of a transformers directory; the tokenizer is
    ``tokenizer`` (``"bytes"`` or a tokenizer.json path) or the directory's own (`hf_directory_tokenizer`)."""

    model, config = from_hf_pretrained(path, dtype=dtype)
    spec = tokenizer or hf_directory_tokenizer(path)
    return model, config, None if spec is None else load_tokenizer(spec)
