"""Level 1: the building blocks — initialisers, dense/headwise/embedding, causal conv, norms, feed-forward.

Modules take batched inputs, `(B, S, D)` activations. Every parameter is created in float32. Each
layer carries a static ``dtype`` string (the *compute* dtype): inputs and kernels are cast to it
before the matmul, and outputs come back in it. Norm statistics are always computed in float32.
Kernels use the Flax layout ``(in, out)``, so converting a reference checkpoint is a plain copy.
See docs/architecture.md, "Building blocks" and "Initialisation".
"""

from .conv import (
    CausalConv1d as CausalConv1d,
)
from .feedforward import (
    FeedForward as FeedForward,
)
from .feedforward_config import (
    FeedForwardConfig as FeedForwardConfig,
)
from .functional import (
    ACTIVATIONS as ACTIVATIONS,
    dropout as dropout,
    get_activation as get_activation,
    matmul_rows as matmul_rows,
    sigmoid as sigmoid,
    silu as silu,
    soft_cap as soft_cap,
)
from .init import (
    InitDistribution as InitDistribution,
    Initializer as Initializer,
    OutputInitFn as OutputInitFn,
    bias_linspace_init as bias_linspace_init,
    init_array as init_array,
    make_initializer as make_initializer,
    output_initializer as output_initializer,
    small_init_std as small_init_std,
    small_initializer as small_initializer,
    wang_std as wang_std,
    zeros_init as zeros_init,
)
from .linear import (
    Dense as Dense,
    DenseGeneral as DenseGeneral,
    Embedding as Embedding,
    LinearHeadwiseExpand as LinearHeadwiseExpand,
)
from .norm import (
    LayerNorm as LayerNorm,
    MultiHeadNorm as MultiHeadNorm,
    RMSNorm as RMSNorm,
    make_norm as make_norm,
)
