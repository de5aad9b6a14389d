"""xLSTM language models as Equinox PyTrees."""

from ._cell import (
    mlstm_chunkwise as mlstm_chunkwise,
    mlstm_recurrent as mlstm_recurrent,
    mlstm_recurrent_step as mlstm_recurrent_step,
    mLSTMState as mLSTMState,
    parallel_stabilized_simple as parallel_stabilized_simple,
)


__version__ = "0.1.0"
