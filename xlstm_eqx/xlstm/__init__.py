"""Level 2: the xLSTM family — its configs, the mLSTM (`mlstm`, `mlstm_v1`) and sLSTM cells and
layers, residual blocks, the block stack and the language model `xLSTMLMModel`.
"""

from .blocks import (
    ResidualBlock as ResidualBlock,
    make_mlstm_layer as make_mlstm_layer,
    xLSTMBlock as xLSTMBlock,
    xLSTMBlockStack as xLSTMBlockStack,
)
from .config import (
    xLSTMBlockConfig as xLSTMBlockConfig,
    xLSTMBlockStackConfig as xLSTMBlockStackConfig,
    xLSTMLMModelConfig as xLSTMLMModelConfig,
)
from .mlstm_cell import (
    mLSTMCell as mLSTMCell,
)
from .mlstm_config import (
    mLSTMBlockConfig as mLSTMBlockConfig,
    mLSTMCellConfig as mLSTMCellConfig,
    mLSTMLayerConfig as mLSTMLayerConfig,
)
from .mlstm_layer import (
    mLSTMInnerLayer as mLSTMInnerLayer,
    mLSTMLayer as mLSTMLayer,
    mLSTMLayerState as mLSTMLayerState,
)
from .mlstm_layer_v1 import (
    mLSTMLayerV1 as mLSTMLayerV1,
)
from .model import (
    decay_mask as decay_mask,
    xLSTMLMModel as xLSTMLMModel,
)
from .slstm import (
    slstm_bias_init as slstm_bias_init,
    sLSTMCell as sLSTMCell,
    sLSTMLayer as sLSTMLayer,
    sLSTMLayerState as sLSTMLayerState,
    sLSTMState as sLSTMState,
)
from .slstm_config import (
    sLSTMBlockConfig as sLSTMBlockConfig,
    sLSTMCellConfig as sLSTMCellConfig,
    sLSTMLayerConfig as sLSTMLayerConfig,
)
