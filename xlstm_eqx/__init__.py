"""xLSTM language models (mLSTM, sLSTM) and a Llama baseline as Equinox PyTrees.

Data flows tokens → embedding → blocks → head; the public surface, by concept:
the mLSTM cell (`_cell`), configs (`_configs`, `_presets`), building blocks (`_nn`), layers
(`_mlstm`, `_slstm`), blocks (`_blocks`), models (`_model`, `_llama`).
"""

from ._blocks import (
    ResidualBlock as ResidualBlock,
    xLSTMBlock as xLSTMBlock,
    xLSTMBlockStack as xLSTMBlockStack,
)
from ._cell import (
    mlstm_chunkwise as mlstm_chunkwise,
    mlstm_recurrent as mlstm_recurrent,
    mlstm_recurrent_step as mlstm_recurrent_step,
    mLSTMState as mLSTMState,
    parallel_stabilized_simple as parallel_stabilized_simple,
)
from ._configs import (
    FeedForwardConfig as FeedForwardConfig,
    LlamaConfig as LlamaConfig,
    ParallelConfig as ParallelConfig,
    mLSTMBackendNameAndKwargs as mLSTMBackendNameAndKwargs,
    mLSTMBlockConfig as mLSTMBlockConfig,
    mLSTMCellConfig as mLSTMCellConfig,
    mLSTMLayerConfig as mLSTMLayerConfig,
    sLSTMBlockConfig as sLSTMBlockConfig,
    sLSTMCellConfig as sLSTMCellConfig,
    sLSTMLayerConfig as sLSTMLayerConfig,
    xLSTMBlockConfig as xLSTMBlockConfig,
    xLSTMBlockStackConfig as xLSTMBlockStackConfig,
    xLSTMLMModelConfig as xLSTMLMModelConfig,
)
from ._generate import (
    generate as generate,
    sample_logits as sample_logits,
    stream_generate as stream_generate,
    stream_text as stream_text,
)
from ._llama import (
    FFNBlock as FFNBlock,
    LlamaKVCache as LlamaKVCache,
    LlamaTransformer as LlamaTransformer,
    SelfAttentionBlock as SelfAttentionBlock,
    TransformerBlock as TransformerBlock,
    TransformerBlockStack as TransformerBlockStack,
)
from ._mlstm import (
    mLSTMCell as mLSTMCell,
    mLSTMInnerLayer as mLSTMInnerLayer,
    mLSTMLayer as mLSTMLayer,
    mLSTMLayerState as mLSTMLayerState,
    mLSTMLayerV1 as mLSTMLayerV1,
)
from ._model import (
    count_params as count_params,
    decay_mask as decay_mask,
    xLSTMLMModel as xLSTMLMModel,
)
from ._nn import (
    CausalConv1d as CausalConv1d,
    Dense as Dense,
    DenseGeneral as DenseGeneral,
    Embedding as Embedding,
    FeedForward as FeedForward,
    LayerNorm as LayerNorm,
    LinearHeadwiseExpand as LinearHeadwiseExpand,
    MultiHeadNorm as MultiHeadNorm,
    RMSNorm as RMSNorm,
    soft_cap as soft_cap,
)
from ._pallas import (
    REMAT_POLICIES as REMAT_POLICIES,
    fastest_chunkwise_backend as fastest_chunkwise_backend,
    mlstm_chunkwise_pallas as mlstm_chunkwise_pallas,
    mlstm_chunkwise_remat as mlstm_chunkwise_remat,
    time_chunkwise_backends as time_chunkwise_backends,
)
from ._presets import PRESETS as PRESETS, get_preset as get_preset
from ._profile import (
    StepProfile as StepProfile,
    print_profile as print_profile,
    profile_calls as profile_calls,
    profile_train_step as profile_train_step,
)
from ._slstm import (
    sLSTMCell as sLSTMCell,
    sLSTMLayer as sLSTMLayer,
    sLSTMLayerState as sLSTMLayerState,
    sLSTMState as sLSTMState,
)


__version__ = "0.1.0"
