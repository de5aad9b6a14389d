"""transformers' side of the generation comparison in `xlstm-eqx bench generate`.

Our xLSTM is written to a transformers checkpoint with `xlstm_eqx.interop.hf.to_hf` (same
architecture, same weights; the config it writes holds the CPU kernel settings: native chunkwise,
sequence and step kernels, float32 autocast and state), loaded as `xLSTMForCausalLM`, and decoded
greedily token by token with its recurrent cache, in `torch.inference_mode`. Needs the peers'
virtualenv (benchmarks/peers/README.md); loaded lazily by `xlstm_eqx.tools.peers`.
"""

import copy
import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np


def import_peer() -> Any:
    """Import transformers' xLSTM (raises when torch or transformers is not installed)."""
    import torch
    from transformers import xLSTMForCausalLM  # noqa: F401

    return torch


def hf_model_from_ours(model: Any, config: Any) -> tuple[Any, int]:
    """``(xLSTMForCausalLM holding our weights, its parameter count)``, float32, eval mode."""
    import torch
    from transformers import xLSTMForCausalLM

    from xlstm_eqx.interop.hf import to_hf

    with tempfile.TemporaryDirectory() as path:
        to_hf(model, config, path, max_shard_bytes=None)
        hf = xLSTMForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return hf, sum(p.numel() for p in hf.parameters())


def greedy_decoder(hf: Any, prompt: np.ndarray, new_tokens: int) -> Callable[[], Any]:
    """Prefill `prompt` ``(B, C)`` once (untimed), then return ``decode()``: `new_tokens` greedy
    tokens from a copy of the prefill's cache (the copy is a few small state tensors per block),
    one forward call of one token each, as transformers' own `generate` steps its cache."""
    import torch

    ids = torch.as_tensor(np.asarray(prompt, dtype=np.int64))
    with torch.inference_mode():
        out = hf(ids, use_cache=True)
    cache, first_logits = out.cache_params, out.logits[:, -1]

    def decode() -> Any:
        with torch.inference_mode():
            state = copy.deepcopy(cache)
            token = first_logits.argmax(-1, keepdim=True)
            tokens = [token]
            for _ in range(new_tokens - 1):
                step = hf(token, cache_params=state, use_cache=True)
                state = step.cache_params
                token = step.logits[:, -1].argmax(-1, keepdim=True)
                tokens.append(token)
            return torch.cat(tokens, dim=1).numpy()

    return decode
