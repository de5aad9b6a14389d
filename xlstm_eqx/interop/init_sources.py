"""The ``--init-from`` source formats that live in this layer (`training.init_from` holds the
run-directory one and the registry): a transformers ``xLSTMForCausalLM`` directory and an
xlstm-jax checkpoint, registered when `xlstm_eqx.interop` is imported.

A transformers directory's tensors stream shard by shard into their shardings (`load_hf_weights`).
A head stored equal to the embedding stays a separate head (transformers never ties it), so the
run trains the model transformers runs. An xlstm-jax checkpoint (the formats
`load_xlstm_jax_params` reads) is read on the host, then each leaf is placed into its sharding.
"""

import os

from jaxtyping import PyTree

from ..llama.config import LlamaConfig
from ..models import ModelConfig
from ..training.init_from import (
    OpenedSource,
    SourceFormat,
    apply_free_fields,
    register_init_format,
)
from ..xlstm.config import xLSTMLMModelConfig
from ..xlstm.model import xLSTMLMModel
from .common import InteropError, shardings_by_path
from .hf import INDEX_FILE, SINGLE_FILE, load_hf_weights, read_hf_checkpoint
from .hf_config import CONFIG_NAME
from .runs import family_name_of, hf_directory_tokenizer, read_model_config
from .xlstm_jax import from_xlstm_jax, xlstm_jax_config
from .xlstm_jax_files import load_xlstm_jax_params, orbax_params_item


def _is_hf(path: str) -> bool:
    has_weights = any(os.path.isfile(os.path.join(path, f)) for f in (SINGLE_FILE, INDEX_FILE))
    return os.path.isdir(path) and has_weights and os.path.isfile(os.path.join(path, CONFIG_NAME))


def _open_hf(path: str, dtype: str | None) -> OpenedSource:
    checkpoint = read_hf_checkpoint(path, dtype=dtype)

    def load(config: ModelConfig, skeleton: PyTree, shardings: PyTree | None) -> PyTree:
        del config
        if not isinstance(skeleton, xLSTMLMModel):
            raise InteropError(f"{path!r}: expected an xLSTMLMModel skeleton")
        by_path = None if shardings is None else shardings_by_path(shardings)
        return load_hf_weights(checkpoint, skeleton, by_path)

    return OpenedSource(
        kind="hf",
        path=path,
        family="xlstm",
        config=checkpoint.config,
        checkpoint=path,
        files=tuple(checkpoint.weight_files()),
        load=load,
        tokenizer=hf_directory_tokenizer(path),
    )


def _xlstm_jax_files(path: str) -> tuple[str, str, list[str]]:
    """``(weights path, config.json, files to hash)`` of an xlstm-jax checkpoint path."""
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    config = os.path.join(folder, "config.json")
    if not os.path.isdir(path):
        return path, config, [config, path]
    for name in ("params.safetensors", "params.npz"):
        if os.path.isfile(os.path.join(path, name)):
            return path, config, [config, os.path.join(path, name)]
    return path, config, [config, orbax_params_item(path)]


def _is_xlstm_jax(path: str) -> bool:
    if os.path.isfile(path):
        return path.endswith((".safetensors", ".npz"))
    try:
        _, config, _ = _xlstm_jax_files(path)
    except InteropError:
        return False
    return os.path.isfile(config)


def _open_xlstm_jax(path: str, dtype: str | None) -> OpenedSource:
    weights, config_file, files = _xlstm_jax_files(path)
    if not os.path.isfile(config_file):
        raise InteropError(f"--init-from {path!r}: no model config {config_file!r} beside it")
    config: ModelConfig = xlstm_jax_config(read_model_config(config_file))
    if dtype is not None:
        config = apply_free_fields(family_name_of(config), config, {"dtype": dtype})

    def load(cfg: ModelConfig, skeleton: PyTree, shardings: PyTree | None) -> PyTree:
        del skeleton
        if not isinstance(cfg, (xLSTMLMModelConfig, LlamaConfig)):
            raise InteropError(f"{path!r}: expected an xLSTM or Llama config")
        by_path = None if shardings is None else shardings_by_path(shardings)
        return from_xlstm_jax(load_xlstm_jax_params(weights), cfg, shardings=by_path)

    return OpenedSource(
        kind="xlstm-jax",
        path=path,
        family=family_name_of(config),
        config=config,
        checkpoint=os.path.abspath(weights),
        files=tuple(os.path.abspath(f) for f in files),
        load=load,
    )


register_init_format(SourceFormat("hf", _is_hf, _open_hf))
register_init_format(SourceFormat("xlstm-jax", _is_xlstm_jax, _open_xlstm_jax))
