"""The model registry: which model class, presets, weight-decay rule and FLOP count belong to a
config, looked up by the config's class.

`MODEL_FAMILIES` maps a family name ("xlstm", "llama", or one a user registers) to its
`ModelFamily`; `family_of(config)` finds the family of a config object by its class (subclasses
included). Training, sharding, the CLI and the benchmarks go through this table instead of
asking which class a config is.
"""

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import equinox as eqx
import jax
import jax.random as jr
import numpy as np
from jaxtyping import PRNGKeyArray, PyTree

from .llama.config import LlamaConfig
from .llama.model import LlamaTransformer
from .presets import PRESETS, preset_aliases, small_llama, small_xlstm
from .xlstm.config import xLSTMLMModelConfig
from .xlstm.mlstm_layer import mlstm_layer_dims
from .xlstm.mlstm_layer_v1 import mlstm_v1_dims
from .xlstm.model import decay_mask as xlstm_decay_mask, xLSTMLMModel


@runtime_checkable
class ModelConfig(Protocol):
    """What every registered family's config provides: its vocabulary, width, context length and
    compute dtype, and a dict round trip (run files and checkpoints store `to_dict()`; `ModelFamily.config_from_dict` reads it back). Functions that
    take any family's config take this; the family itself is looked up by the config's class
    (`family_of`). `xLSTMLMModelConfig` and `LlamaConfig` are the two families built in."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def embedding_dim(self) -> int: ...

    @property
    def context_length(self) -> int: ...

    @property
    def dtype(self) -> str: ...

    def to_dict(self) -> dict[str, Any]: ...

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Any: ...


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    """One model family: its config class, how to build a model from a config, its presets, and
    optionally its own weight-decay mask (``decay_mask(model, config) -> bool PyTree``)."""

    name: str
    config_cls: type
    build: Callable[..., Any]
    presets: Callable[[], dict[str, Callable[[], Any]]]
    decay_mask: Callable[[Any, Any], Any] | None = None

    def config_from_dict(self, d: dict[str, Any]) -> ModelConfig:
        return self.config_cls.from_dict(d)


MODEL_FAMILIES: dict[str, ModelFamily] = {}


def register_model_family(family: ModelFamily) -> None:
    """Make a family available by name (`TrainConfig.model`) and by config class (`family_of`)."""
    MODEL_FAMILIES[family.name] = family


def family_of(config: ModelConfig) -> ModelFamily:
    """The registered family whose config class `config` is an instance of (the most derived
    match wins), or a `TypeError` naming the config's type."""
    for cls in type(config).__mro__:
        for family in MODEL_FAMILIES.values():
            if family.config_cls is cls:
                return family
    known = sorted(f.config_cls.__name__ for f in MODEL_FAMILIES.values())
    raise TypeError(f"no model family for a config of type {type(config).__name__}; known: {known}")


def build_model(config: ModelConfig, *, key: PRNGKeyArray) -> PyTree:
    """The model of ``config``'s family, initialised with ``key``."""
    return family_of(config).build(config, key=key)


_MAIN_JOB_PRESETS = {"xlstm": small_xlstm, "llama": small_llama}


def _family_presets(kind: str) -> dict[str, Callable[[], Any]]:
    """Every library preset of this family under its own name, plus its short names
    (`presets.preset_aliases`: `small`, the main job's size, `tiny`…); `get_preset(name, kind)`
    knows the same names."""
    config_cls = MODEL_FAMILIES[kind].config_cls
    out: dict[str, Callable[[], Any]] = {"small": _MAIN_JOB_PRESETS[kind]}
    for name, fn in PRESETS.items():
        if isinstance(fn(), config_cls):
            out[name] = fn
    for alias, name in preset_aliases(kind).items():
        out.setdefault(alias, PRESETS[name])
    return out


def _build_xlstm(config: xLSTMLMModelConfig, *, key: PRNGKeyArray) -> xLSTMLMModel:
    return xLSTMLMModel(config, key=key)


def _build_llama(config: LlamaConfig, *, key: PRNGKeyArray) -> LlamaTransformer:
    return LlamaTransformer(config, key=key)


def _xlstm_decay_mask(model: xLSTMLMModel, config: xLSTMLMModelConfig) -> PyTree:
    return xlstm_decay_mask(model)


register_model_family(
    ModelFamily(
        "xlstm",
        xLSTMLMModelConfig,
        _build_xlstm,
        lambda: _family_presets("xlstm"),
        _xlstm_decay_mask,
    )
)
register_model_family(
    ModelFamily("llama", LlamaConfig, _build_llama, lambda: _family_presets("llama"))
)


# FLOP counting


def matmul_param_count(config: ModelConfig) -> int:
    """Parameters that take part in a matrix product per token: every array whose field name ends
    in `kernel` (dense, headwise, gate, conv and LM-head kernels, stacked or not), plus the
    embedding table when it doubles as the LM head (`tie_weights`). The embedding lookup itself
    is a gather and is not counted. Counted on `eqx.filter_eval_shape` (no memory, no compute)."""

    model = eqx.filter_eval_shape(family_of(config).build, config, key=jr.key(0))
    total = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(model)[0]:
        if not hasattr(leaf, "shape") or len(leaf.shape) < 2:
            continue
        names = [p.name for p in path if isinstance(p, jax.tree_util.GetAttrKey)]
        if names and names[-1].endswith("kernel"):
            total += int(np.prod(leaf.shape))
    if getattr(config, "tie_weights", False):  # the embedding table is the LM head's kernel
        total += getattr(config, "vocab_size", 0) * getattr(config, "embedding_dim", 0)
    return total


def mlstm_dims(config: xLSTMLMModelConfig) -> tuple[int, int, int]:
    """(NH, DHQK, DHV) of the xLSTM model's mLSTM layers."""
    if config.mlstm_block is None:
        raise ValueError("the model has no mLSTM blocks (mlstm_block is None)")
    layer = config.mlstm_block.mlstm
    if layer.layer_type == "mlstm_v1":
        qk_dim, v_dim = mlstm_v1_dims(layer)
    else:
        _, qk_dim, v_dim, _ = mlstm_layer_dims(layer)
    nh = layer.num_heads
    return nh, qk_dim // nh, v_dim // nh


def train_flops_per_token(config: xLSTMLMModelConfig | LlamaConfig, seq_len: int) -> float:
    """Model FLOPs of one training token (forward + backward = 3x forward), counted analytically.

    Dense part (both families): ``6 * N`` with ``N = matmul_param_count(config)`` (2 FLOPs per
    multiply-add, x3 for forward + backward).

    Sequence mixing, per mixing layer (x3 for training), counting what is computed (masked
    entries of causal matrices included, since they are computed):
    - Llama (dense XLA attention, full S x S scores): ``12 * S * NH * head_dim`` per token
      (QK^T ``2 S D_att`` + AV ``2 S D_att``, forward).
    - mLSTM (NH heads, DHQK, DHV per head), per head per token, forward:
      ``2 * L * (DHQK + DHV)`` for the L x L within-chunk (or S x S) score and value products,
      plus ``4 * DHQK * DHV + 4 * DHQK`` for the state (chunk k^T v and k sums into C, n;
      q C and q n reads). ``L = min(chunk_size, S)`` for "chunkwise"/"chunkwise_pallas"/"auto";
      ``L = S`` and no state term for "parallel_stabilized"; ``L = 0`` for "recurrent".
      Times 3 * NH * (number of mLSTM blocks).
    sLSTM blocks count only through their kernels (the dense part). Norms, gates' elementwise
    math, softmax and the loss are not counted (the usual MFU convention).
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be a positive integer, got {seq_len}")
    dense = 6.0 * matmul_param_count(config)
    if isinstance(config, LlamaConfig):
        nh = config.embedding_dim // config.head_dim
        mix = config.num_blocks * 12.0 * seq_len * nh * config.head_dim
        return dense + mix
    nh, dqk, dv = mlstm_dims(config)
    assert config.mlstm_block is not None  # mlstm_dims raised otherwise
    backend = config.mlstm_block.mlstm.mlstm_cell.backend_config
    name = backend.name
    if name in ("chunkwise", "chunkwise_pallas", "auto"):
        window = min(int((backend.kwargs or {}).get("chunk_size", 64)), seq_len)
        state = 4.0 * dqk * dv + 4.0 * dqk
    elif name == "parallel_stabilized":
        window, state = seq_len, 0.0
    elif name == "recurrent":
        window, state = 0, 4.0 * dqk * dv + 4.0 * dqk
    else:
        raise ValueError(f"train_flops_per_token: unknown mLSTM backend {name!r}")
    num_mlstm = config.num_blocks - len(config.slstm_at or [])
    mix = num_mlstm * 3.0 * nh * (2.0 * window * (dqk + dv) + state)
    return dense + mix
