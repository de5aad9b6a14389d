"""Level 2: the Llama baseline — `LlamaConfig`, attention (RoPE, three backends), blocks and
`LlamaTransformer` with a KV cache for generation.
"""

from .attention import (
    ATTENTION_BACKENDS as ATTENTION_BACKENDS,
    AttentionBackend as AttentionBackend,
    LlamaKVCache as LlamaKVCache,
    SelfAttentionBlock as SelfAttentionBlock,
    apply_rope as apply_rope,
    multihead_attention as multihead_attention,
    rope_sin_cos as rope_sin_cos,
    segment_mask as segment_mask,
)
from .config import (
    LlamaConfig as LlamaConfig,
)
from .model import (
    FFNBlock as FFNBlock,
    LlamaTransformer as LlamaTransformer,
    TransformerBlock as TransformerBlock,
    TransformerBlockStack as TransformerBlockStack,
)
