"""Level 6: checkpoint interop — Hugging Face transformers `xLSTMForCausalLM` directories (the
released xLSTM-7B format) and xlstm-jax (Flax) parameter trees, both ways; no pickle anywhere
(safetensors, JSON, NumPy ``.npz``).

- `from_hf_pretrained(path, *, dtype=None) -> (model, config)`, `to_hf(model, config, path)`;
- `from_xlstm_jax(params, config) -> model`, `to_xlstm_jax(model) -> params`;
- `save_eqx` / `load_eqx`: this library's run layout as a conversion format. The command-line
  front ends are `xlstm_eqx.cli.convert_main` / `generate_main`.
"""

from . import init_sources as init_sources  # registers the --init-from formats
from .common import InteropError as InteropError
from .hf import from_hf_pretrained as from_hf_pretrained, to_hf as to_hf
from .hf_config import (
    eqx_config_to_hf as eqx_config_to_hf,
    hf_config_to_eqx as hf_config_to_eqx,
    read_hf_config as read_hf_config,
)
from .runs import (
    load_eqx as load_eqx,
    load_hf_for_generation as load_hf_for_generation,
    read_model_config as read_model_config,
    save_eqx as save_eqx,
)
from .xlstm_jax import (
    from_xlstm_jax as from_xlstm_jax,
    to_xlstm_jax as to_xlstm_jax,
    xlstm_jax_config as xlstm_jax_config,
)
from .xlstm_jax_files import (
    load_xlstm_jax_params as load_xlstm_jax_params,
    save_xlstm_jax_params as save_xlstm_jax_params,
)
