"""xLSTM language models (mLSTM, sLSTM) and a Llama baseline as Equinox PyTrees.

The root holds the model API; the layers of the package, each importing only from lower ones:

- `core` (0): the config base, dtype/key helpers, timing, parameter counts;
- `nn` and `cell` (1): building blocks, and the mLSTM cell as pure functions;
- `xlstm` and `llama` (2): one package per model family, its configs next to its modules;
- `presets`, `data`, `models`, `generation` (3): size presets, tokenizers and corpora, the model
  registry keyed by config class, decoding;
- `parallel` (4): meshes, partition rules, sharded init, FSDP;
- `training` (5), `interop` (6): the trainer; checkpoint conversion to and from transformers
  and xlstm-jax;
- `tools` (7): benchmarks and the profiler; `cli` (8): the `xlstm-eqx` command.

`docs/architecture.md` describes the data flow and the cell math.
"""

import importlib
import warnings
from typing import Any

from .cell import (
    REMAT_POLICIES as REMAT_POLICIES,
    fastest_chunkwise_backend as fastest_chunkwise_backend,
    mlstm_chunkwise as mlstm_chunkwise,
    mlstm_chunkwise_pallas as mlstm_chunkwise_pallas,
    mlstm_chunkwise_remat as mlstm_chunkwise_remat,
    mlstm_recurrent as mlstm_recurrent,
    mlstm_recurrent_step as mlstm_recurrent_step,
    mLSTMBackendNameAndKwargs as mLSTMBackendNameAndKwargs,
    mLSTMState as mLSTMState,
    parallel_stabilized_simple as parallel_stabilized_simple,
    time_chunkwise_backends as time_chunkwise_backends,
)
from .core import ParallelConfig as ParallelConfig, count_params as count_params
from .generation import (
    generate as generate,
    sample_logits as sample_logits,
    stream_generate as stream_generate,
    stream_text as stream_text,
)
from .llama import (
    FFNBlock as FFNBlock,
    LlamaConfig as LlamaConfig,
    LlamaKVCache as LlamaKVCache,
    LlamaTransformer as LlamaTransformer,
    SelfAttentionBlock as SelfAttentionBlock,
    TransformerBlock as TransformerBlock,
    TransformerBlockStack as TransformerBlockStack,
)
from .models import (
    MODEL_FAMILIES as MODEL_FAMILIES,
    ModelConfig as ModelConfig,
    ModelFamily as ModelFamily,
    build_model as build_model,
    family_of as family_of,
    register_model_family as register_model_family,
)
from .nn import (
    CausalConv1d as CausalConv1d,
    Dense as Dense,
    DenseGeneral as DenseGeneral,
    Embedding as Embedding,
    FeedForward as FeedForward,
    FeedForwardConfig as FeedForwardConfig,
    LayerNorm as LayerNorm,
    LinearHeadwiseExpand as LinearHeadwiseExpand,
    MultiHeadNorm as MultiHeadNorm,
    RMSNorm as RMSNorm,
    soft_cap as soft_cap,
)
from .presets import PRESETS as PRESETS, get_preset as get_preset
from .xlstm import (
    ResidualBlock as ResidualBlock,
    decay_mask as decay_mask,
    mLSTMBlockConfig as mLSTMBlockConfig,
    mLSTMCell as mLSTMCell,
    mLSTMCellConfig as mLSTMCellConfig,
    mLSTMInnerLayer as mLSTMInnerLayer,
    mLSTMLayer as mLSTMLayer,
    mLSTMLayerConfig as mLSTMLayerConfig,
    mLSTMLayerState as mLSTMLayerState,
    mLSTMLayerV1 as mLSTMLayerV1,
    sLSTMBlockConfig as sLSTMBlockConfig,
    sLSTMCell as sLSTMCell,
    sLSTMCellConfig as sLSTMCellConfig,
    sLSTMLayer as sLSTMLayer,
    sLSTMLayerConfig as sLSTMLayerConfig,
    sLSTMLayerState as sLSTMLayerState,
    sLSTMState as sLSTMState,
    xLSTMBlock as xLSTMBlock,
    xLSTMBlockConfig as xLSTMBlockConfig,
    xLSTMBlockStack as xLSTMBlockStack,
    xLSTMBlockStackConfig as xLSTMBlockStackConfig,
    xLSTMLMModel as xLSTMLMModel,
    xLSTMLMModelConfig as xLSTMLMModelConfig,
)


__version__ = "0.1.0"

# Names the root exported before the profiler moved to the `tools` sub-namespace.
_MOVED_TO_TOOLS = ("StepProfile", "print_profile", "profile_calls", "profile_train_step")


def __getattr__(name: str) -> Any:
    if name in _MOVED_TO_TOOLS:
        warnings.warn(
            f"xlstm_eqx.{name} moved to xlstm_eqx.tools.{name}", DeprecationWarning, stacklevel=2
        )
        return getattr(importlib.import_module("xlstm_eqx.tools"), name)
    raise AttributeError(f"module 'xlstm_eqx' has no attribute {name!r}")
