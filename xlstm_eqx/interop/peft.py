"""LoRA adapters in PEFT's format, both ways: ``adapter_config.json`` + ``adapter_model.safetensors``
with the module names of transformers' ``xLSTMForCausalLM`` (``base_model.model.backbone.blocks.
{i}.mlstm_layer.q.lora_A.weight``), so ``peft.PeftModel.from_pretrained(xLSTMForCausalLM, dir)``
runs an adapter trained here, and one trained with PEFT loads onto our model.

PEFT stores ``lora_A`` ``(r, in)`` and ``lora_B`` ``(out, r)`` (torch layout) with scale
``lora_alpha / r``; ours are ``lora_a`` ``(in, r)`` and ``lora_b`` ``(r, out)``: the transposes.
The tensor names come from the same table as the base weights (`hf_entries`): an adapter sits
beside each adapted kernel.
"""

import os
from collections import defaultdict
from typing import Any

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
import numpy as np

from ..core.files import write_json_atomic
from ..nn.lora import LoRADense, LoRADenseGeneral, LoRAHeadwise, lora_adapted
from ..xlstm.config import xLSTMLMModelConfig
from ..xlstm.model import xLSTMLMModel
from .common import TRANSPOSE, Entry, InteropError, Path, get_path, load_json
from .hf import from_hf_pretrained, hf_entries
from .safetensors_files import SafetensorsFile, save_file


__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "from_peft_pretrained",
    "read_peft_adapter",
    "write_peft_adapter",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_LORA = (LoRADense, LoRADenseGeneral, LoRAHeadwise)


def _kernel_entries(model: Any) -> list[Entry]:
    """The transformers entries of the model's 2-D projection kernels (``...weight`` of an
    ``nn.Linear``), each adapter-capable."""
    return [
        e
        for e in hf_entries(model)
        if e.leaf[-1] == "kernel"
        and e.layout == TRANSPOSE
        and e.name.startswith("backbone.blocks.")
    ]


def _adapter_names(entry: Entry) -> tuple[str, str]:
    module = _PREFIX + entry.name.removesuffix(".weight")
    return module + ".lora_A.weight", module + ".lora_B.weight"


def write_peft_adapter(model: xLSTMLMModel, path: str | os.PathLike, *, base: str = "") -> str:
    """Write ``model``'s LoRA adapters (mLSTM v1 blocks) as a PEFT adapter directory: one
    rank/alpha (``adapter_config.json``), float32 tensors under transformers' module names.
    ``base``: recorded as ``base_model_name_or_path``. Returns ``path``."""
    entries = [e for e in _kernel_entries(model) if isinstance(_module(model, e), _LORA)]
    if not entries:
        raise InteropError("write_peft_adapter: the model has no LoRA adapter")
    layers = [_module(model, e) for e in entries]
    ranks = {(layer.rank, layer.alpha) for layer in layers}
    if len(ranks) != 1:
        raise InteropError(f"PEFT's format has one rank and alpha per adapter, got {sorted(ranks)}")
    ((rank, alpha),) = ranks
    tensors = []
    for e, layer in zip(entries, layers, strict=True):
        name_a, name_b = _adapter_names(e)
        for name, leaf in ((name_a, layer.lora_a), (name_b, layer.lora_b)):
            x = np.asarray(leaf if e.index is None else leaf[e.index], np.float32)
            tensors.append((name, np.ascontiguousarray(x.T)))
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, ADAPTER_WEIGHTS), {"format": "pt"})
    targets = sorted({e.name.removesuffix(".weight").rsplit(".", 1)[1] for e in entries})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "base_model_name_or_path": base,
        "auto_mapping": {
            "base_model_class": "xLSTMForCausalLM",
            "parent_library": "transformers.models.xlstm.modeling_xlstm",
        },
    }
    write_json_atomic(os.path.join(path, ADAPTER_CONFIG), config)
    return path


def _module(model: Any, entry: Entry) -> Any:
    return get_path(model, entry.leaf[:-1])


def _read_config(path: str) -> tuple[int, float]:
    config = load_json(os.path.join(path, ADAPTER_CONFIG))
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise InteropError(f"{path}/{ADAPTER_CONFIG}: not a LoRA adapter (peft_type must be LORA)")
    for key, ok in (("use_rslora", False), ("use_dora", False), ("fan_in_fan_out", False)):
        if config.get(key, ok) != ok:
            raise InteropError(f"{path}/{ADAPTER_CONFIG}: {key}={config[key]!r} is not supported")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise InteropError(f"{path}/{ADAPTER_CONFIG}: a per-module {key} is not supported")
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(rank, int) or rank <= 0 or not isinstance(alpha, (int, float)):
        raise InteropError(f"{path}/{ADAPTER_CONFIG}: r={rank!r}, lora_alpha={alpha!r} invalid")
    return rank, float(alpha)


def read_peft_adapter(model: xLSTMLMModel, path: str | os.PathLike) -> xLSTMLMModel:
    """``model`` (a base without adapters) with the PEFT adapter in ``path`` added: every
    adapted module becomes a LoRA layer (a stacked module whose other blocks have no adapter
    gets zeros there: no change). Tensor names, shapes and finiteness are checked; a tensor that
    names no projection of the model is an error naming it."""
    path = os.fspath(path)
    rank, alpha = _read_config(path)
    by_name = {}
    for e in _kernel_entries(model):
        name_a, name_b = _adapter_names(e)
        by_name[name_a], by_name[name_b] = (e, "lora_a"), (e, "lora_b")
    slots: dict[Path, list[tuple[Entry, str, np.ndarray]]] = defaultdict(list)
    with SafetensorsFile(os.path.join(path, ADAPTER_WEIGHTS)) as f:
        unknown = [k for k in f.keys() if k not in by_name]
        if unknown:
            raise InteropError(f"{path}/{ADAPTER_WEIGHTS}: tensors not in the model: {unknown[:8]}")
        for name in f.keys():
            entry, field = by_name[name]
            x = np.asarray(f.read(name), np.float32)
            if not np.all(np.isfinite(x)):
                raise InteropError(f"{path}/{ADAPTER_WEIGHTS}: {name} has non-finite values")
            slots[entry.leaf[:-1]].append((entry, field, x.T))
    for i, (module_path, items) in enumerate(sorted(slots.items(), key=lambda kv: str(kv[0]))):
        layer = lora_adapted(get_path(model, module_path), rank=rank, alpha=alpha, key=jr.key(i))
        values = {
            "lora_a": np.zeros(layer.lora_a.shape, np.float32),
            "lora_b": np.zeros(layer.lora_b.shape, np.float32),
        }
        for entry, field, x in items:
            want = values[field].shape if entry.index is None else values[field].shape[1:]
            if x.shape != want:
                raise InteropError(
                    f"{path}/{ADAPTER_WEIGHTS}: {_adapter_names(entry)[field == 'lora_b']} "
                    f"has shape {x.T.shape}, the model needs {tuple(reversed(want))}"
                )
            if entry.index is None:
                values[field] = x
            else:
                values[field][entry.index] = x
        layer = eqx.tree_at(
            lambda m: (m.lora_a, m.lora_b),
            layer,
            (jnp.asarray(values["lora_a"]), jnp.asarray(values["lora_b"])),
        )
        model = eqx.tree_at(lambda m, p=module_path: get_path(m, p), model, layer)
    return model


def from_peft_pretrained(
    base: str | os.PathLike, adapter: str | os.PathLike, **kwargs: Any
) -> tuple[xLSTMLMModel, xLSTMLMModelConfig]:
    """`from_hf_pretrained` of the transformers directory ``base`` (``kwargs`` passed on) with
    the PEFT adapter in ``adapter`` (`read_peft_adapter`): ``(model, config)``."""
    model, config = from_hf_pretrained(base, **kwargs)
    return read_peft_adapter(model, adapter), config
