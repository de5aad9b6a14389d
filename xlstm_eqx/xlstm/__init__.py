"""Level 2: the xLSTM family — its configs, the mLSTM (`mlstm`, `mlstm_v1`) and sLSTM cells and
layers, residual blocks, the block stack and the language model `xLSTMLMModel`.

Layers take ``(B, S, ·)`` activations; the mLSTM cell functions of `xlstm_eqx.cell` take
``(B, NH, S, ·)`` and the layers transpose. Everything on the gate path is float32 by default
(``gate_dtype``). Layers, blocks, the stack and the model share a decode API for generation:

- ``init_state(batch_size)``: a zero state (cell memory, plus the conv window where there is one);
- ``prefill(x, ...) -> (y, state)``: the full sequence, also returning the state after it;
- ``step(state, x_t, ...) -> (y_t, state)``: one token, O(1) in the sequence length.

See docs/architecture.md, "Data flow", "mLSTM layers" and "sLSTM".
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
