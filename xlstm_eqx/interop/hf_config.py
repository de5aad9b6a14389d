"""Translating configs between the transformers `xLSTMConfig` (`config.json`) and our
`xLSTMLMModelConfig`, with every value bounded and checked before anything of its size is built."""

import os
from collections.abc import Mapping
from typing import Any

from ..cell.backend_config import mLSTMBackendNameAndKwargs
from ..core.config import DType
from ..nn.feedforward_config import FeedForwardConfig
from ..xlstm.config import xLSTMLMModelConfig
from ..xlstm.mlstm_config import mLSTMBlockConfig, mLSTMCellConfig, mLSTMLayerConfig
from .common import MAX_BLOCKS, InteropError, load_json, printable


CONFIG_NAME = "config.json"


_DTYPES: tuple[DType, ...] = ("float32", "bfloat16", "float16")


# Upper bounds on config.json values, far above any xLSTM (the 7B: D=4096, L=32, V=50304, NH=8),
# so that absurd values are refused before anything of their size is built.
MAX_INT = {
    "hidden_size": 1 << 17,
    "embedding_dim": 1 << 17,
    "num_hidden_layers": MAX_BLOCKS,
    "num_blocks": MAX_BLOCKS,
    "vocab_size": 1 << 22,
    "num_heads": 4096,
    "chunk_size": 1 << 16,
    "ffn_round_up_to_multiple_of": 1 << 16,
}


_MAX_FACTOR = 64.0  # qk_dim_factor, v_dim_factor, ffn_proj_factor


_MAX_FLOAT = 1e30  # eps and soft caps: finite in float32 with room to spare


_MAX_CONTEXT = 1 << 31


# config


def _get(hf: Mapping[str, Any], *names: str, default: Any = None) -> Any:
    for n in names:
        if hf.get(n) is not None:
            return hf[n]
    return default


def _show(value: Any, limit: int = 60) -> str:
    """A short repr of a config value (values come from an untrusted file)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _unsupported(field: str, value: Any, why: str) -> InteropError:
    return InteropError(
        f"unsupported transformers xLSTM config value {field}={_show(value)}: {why}"
    )


def positive_int(hf: Mapping[str, Any], *names: str, default: Any = None) -> int:
    value = _get(hf, *names, default=default)
    limit = MAX_INT[names[0]]
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= limit:
        raise InteropError(
            f"config.json: {names[0]} must be a positive int of at most {limit}, got {_show(value)}"
        )
    return value


def _number(
    hf: Mapping[str, Any],
    name: str,
    default: Any,
    *,
    allow_none: bool = False,
    limit: float = _MAX_FLOAT,
) -> Any:
    value = hf.get(name, default)
    if value is None and allow_none:
        return None
    # Compared before float(): a huge int would overflow it; NaN fails every comparison.
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= limit:
        raise InteropError(
            f"config.json: {name} must be a number in (0, {limit:g}], got {_show(value)}"
        )
    return float(value)


def hf_config_to_eqx(
    hf: Mapping[str, Any],
    *,
    dtype: str | None = None,
    scan_blocks: bool = True,
    tie_weights: bool | None = None,
) -> xLSTMLMModelConfig:
    """Our `xLSTMLMModelConfig` for a transformers ``xLSTMConfig`` dict (``config.json``).

    ``dtype`` is the compute dtype (also of the LM head); by default the checkpoint's own
    ``dtype``/``torch_dtype`` (float32 if absent). Parameters are float32 either way.
    """
    _check_hf_architecture(hf)
    dtype = _hf_compute_dtype(hf, dtype)

    D = positive_int(hf, "hidden_size", "embedding_dim")
    if hf.get("embedding_dim") not in (None, D):
        raise _unsupported("embedding_dim", hf["embedding_dim"], f"differs from hidden_size={D}")
    L = positive_int(hf, "num_hidden_layers", "num_blocks")
    if hf.get("num_blocks") not in (None, L):
        raise _unsupported("num_blocks", hf["num_blocks"], f"differs from num_hidden_layers={L}")
    V = positive_int(hf, "vocab_size")
    NH = positive_int(hf, "num_heads", default=8)
    norm_eps = _number(hf, "norm_eps", 1e-6)
    cell_eps = _number(hf, "eps", 1e-6)
    chunk_size = positive_int(hf, "chunk_size", default=64)
    backend_kwargs: dict[str, Any] = {"chunk_size": chunk_size}
    if cell_eps != 1e-6:  # the cell default; left out so that equal configs compare equal
        backend_kwargs["eps"] = cell_eps
    context_length = _hf_context_length(hf)
    tie = hf.get("tie_word_embeddings", False)
    if not isinstance(tie, bool):
        raise InteropError(f"config.json: tie_word_embeddings must be a bool, got {_show(tie)}")
    if tie_weights is not None:  # what the stored tensors say (see from_hf_pretrained)
        tie = tie_weights
    try:
        return xLSTMLMModelConfig(
            vocab_size=V,
            embedding_dim=D,
            num_blocks=L,
            context_length=context_length,
            tie_weights=tie,
            add_post_blocks_norm=True,
            norm_eps=norm_eps,
            norm_type="rmsnorm",
            logits_soft_cap=_number(hf, "output_logit_soft_cap", 30.0, allow_none=True),
            lm_head_dtype=dtype,
            dtype=dtype,
            bias=False,
            dropout=0.0,
            scan_blocks=scan_blocks,
            mlstm_block=mLSTMBlockConfig(
                mlstm=mLSTMLayerConfig(
                    layer_type="mlstm_v1",
                    num_heads=NH,
                    qk_dim_factor=_number(hf, "qk_dim_factor", 0.5, limit=_MAX_FACTOR),
                    v_dim_factor=_number(hf, "v_dim_factor", 1.0, limit=_MAX_FACTOR),
                    mlstm_cell=mLSTMCellConfig(
                        backend=mLSTMBackendNameAndKwargs(name="chunkwise", kwargs=backend_kwargs),
                        norm_eps=norm_eps,
                        norm_type_v1="layernorm",
                        gate_dtype="float32",
                        gate_soft_cap=_number(hf, "gate_soft_cap", 15.0, allow_none=True),
                        igate_bias_init_range=-10.0,
                        fgate_bias_init_range=(3.0, 6.0),
                    ),
                ),
                feedforward=FeedForwardConfig(
                    proj_factor=_number(hf, "ffn_proj_factor", 2.667, limit=_MAX_FACTOR),
                    act_fn="swish",
                    ff_type="ffn_gated",
                    bias=False,
                    round_proj_up_dim_up=True,
                    round_proj_up_to_multiple_of=positive_int(
                        hf, "ffn_round_up_to_multiple_of", default=64
                    ),
                ),
            ),
        )
    except ValueError as e:
        if isinstance(e, InteropError):
            raise
        raise InteropError(
            f"config.json describes no valid xLSTM model: {printable(str(e))[:300]}"
        ) from None


def _require(ok: bool, field: str, value: Any, why: str) -> None:
    if not ok:
        raise InteropError(
            f"cannot express the model in the transformers xLSTM format: {field}={value!r} ({why})"
        )


def _check_hf_architecture(hf: Mapping[str, Any]) -> None:
    """Refuse a ``config.json`` of a model this port does not build: an `InteropError` naming the
    first key that says so."""
    if not isinstance(hf, Mapping):
        raise InteropError(f"config.json must hold a JSON object, got {type(hf).__name__}")
    model_type = hf.get("model_type", "xlstm")
    if model_type != "xlstm":
        raise _unsupported("model_type", model_type, "only 'xlstm' (xLSTMForCausalLM) is handled")
    archs = hf.get("architectures")
    if archs not in (None, []) and not (isinstance(archs, list) and "xLSTMForCausalLM" in archs):
        raise _unsupported("architectures", archs, "only xLSTMForCausalLM checkpoints are handled")
    if hf.get("use_bias", False):
        raise _unsupported(
            "use_bias", hf["use_bias"], "biases on the block and head norms are not supported"
        )
    if not hf.get("add_out_norm", True):
        raise _unsupported(
            "add_out_norm",
            hf["add_out_norm"],
            "transformers' xLSTM applies the output norm regardless, the xlstm package does not; "
            "the intended model is ambiguous",
        )
    for name in ("add_qk_norm", "add_post_norm"):
        if hf.get(name, False):
            raise _unsupported(name, hf[name], "not part of the transformers xLSTM architecture")
    weight_mode = hf.get("weight_mode", "single")
    if weight_mode not in ("single", "fused"):
        raise _unsupported("weight_mode", weight_mode, "expected 'single' or 'fused'")


def _hf_compute_dtype(hf: Mapping[str, Any], dtype: str | None) -> DType:
    """The compute dtype asked for, else the checkpoint's own (float32 if absent or unknown)."""
    if dtype is None:
        stored = str(_get(hf, "dtype", "torch_dtype", default="float32"))
        return stored if stored in _DTYPES else "float32"
    if dtype not in _DTYPES:
        raise InteropError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
    return dtype


def _hf_context_length(hf: Mapping[str, Any]) -> int:
    """Our ``context_length`` (written by the export; transformers keeps it), else -1 (unset)."""
    context_length = hf.get("context_length", -1)
    if (
        isinstance(context_length, bool)
        or not isinstance(context_length, int)
        or not 0 < context_length <= _MAX_CONTEXT
    ):
        return -1
    return context_length


def _hf_expressible_parts(
    config: xLSTMLMModelConfig,
) -> tuple[mLSTMLayerConfig, mLSTMCellConfig, FeedForwardConfig]:
    """The layer, cell and FFN configs of `config`'s mLSTM blocks, once every field is checked to
    be one the transformers xLSTM can express (an `InteropError` naming the first that is not)."""
    _require(not config.slstm_at, "slstm_at", config.slstm_at, "transformers has no sLSTM blocks")
    block = config.mlstm_block
    _require(block is not None, "mlstm_block", None, "an mLSTM block config is required")
    assert block is not None  # for the type checker: `_require` raised otherwise
    layer, cell, ffn = block.mlstm, block.mlstm.mlstm_cell, block.feedforward
    _require(
        layer.layer_type == "mlstm_v1",
        "mlstm_block.mlstm.layer_type",
        layer.layer_type,
        "only the xLSTM-7B layer 'mlstm_v1' exists in transformers",
    )
    _require(config.norm_type == "rmsnorm", "norm_type", config.norm_type, "must be 'rmsnorm'")
    _require(
        cell.norm_type_v1 == "layernorm",
        "mlstm_block.mlstm.mlstm_cell.norm_type_v1",
        cell.norm_type_v1,
        "the per-head norm is a LayerNorm in transformers",
    )
    _require(not config.bias, "bias", config.bias, "transformers' use_bias also adds norm biases")
    _require(not cell.add_qk_norm, "mlstm_block.mlstm.mlstm_cell.add_qk_norm", True, "no q/k norms")
    _require(not block.add_post_norm, "mlstm_block.add_post_norm", True, "no post-norms")
    _require(
        config.add_post_blocks_norm, "add_post_blocks_norm", False, "the output norm is always on"
    )
    _require(
        config.norm_eps == cell.norm_eps,
        "norm_eps",
        config.norm_eps,
        f"transformers has one norm_eps; mlstm_cell.norm_eps is {cell.norm_eps}",
    )
    _require(
        config.logits_soft_cap is not None,
        "logits_soft_cap",
        None,
        "transformers' output_logit_soft_cap is a float",
    )
    _require(
        cell.gate_soft_cap is not None,
        "mlstm_block.mlstm.mlstm_cell.gate_soft_cap",
        None,
        "transformers' gate_soft_cap is a float",
    )
    _require(ffn is not None, "mlstm_block.feedforward", None, "every block has a SwiGLU FFN")
    assert ffn is not None
    _require(ffn.ff_type == "ffn_gated", "feedforward.ff_type", ffn.ff_type, "must be gated")
    _require(ffn.act_fn == "swish", "feedforward.act_fn", ffn.act_fn, "must be 'swish' (SiLU)")
    _require(not ffn.bias, "feedforward.bias", ffn.bias, "no FFN biases")
    _require(
        ffn.round_proj_up_dim_up,
        "feedforward.round_proj_up_dim_up",
        False,
        "transformers rounds the FFN size up",
    )
    return layer, cell, ffn


def eqx_config_to_hf(config: xLSTMLMModelConfig) -> dict[str, Any]:
    """The transformers ``config.json`` dict of an `xLSTMLMModelConfig`; raises `InteropError`
    naming the first field the transformers architecture cannot express."""
    if not isinstance(config, xLSTMLMModelConfig):
        raise InteropError(f"expected an xLSTMLMModelConfig, got {type(config).__name__}")
    config.validate()
    layer, cell, ffn = _hf_expressible_parts(config)
    assert config.logits_soft_cap is not None and cell.gate_soft_cap is not None  # checked
    kwargs = dict(cell.backend_config.kwargs or {})
    dtype = config.dtype
    return {
        "architectures": ["xLSTMForCausalLM"],
        "model_type": "xlstm",
        "vocab_size": config.vocab_size,
        "hidden_size": config.embedding_dim,
        "embedding_dim": config.embedding_dim,
        "num_hidden_layers": config.num_blocks,
        "num_blocks": config.num_blocks,
        "num_heads": layer.num_heads,
        "use_bias": False,
        "norm_reduction_force_float32": True,
        "tie_word_embeddings": bool(config.tie_weights),
        "add_out_norm": True,
        "norm_eps": float(config.norm_eps),
        "qk_dim_factor": float(layer.qk_dim_factor),
        "v_dim_factor": float(layer.v_dim_factor),
        "chunkwise_kernel": "chunkwise--native_autograd",
        "sequence_kernel": "native_sequence__native",
        "step_kernel": "native",
        "mode": "inference",
        "chunk_size": int(kwargs.get("chunk_size", 64)),
        "return_last_states": True,
        "autocast_kernel_dtype": dtype,
        "eps": float(kwargs.get("eps", 1e-6)),
        "inference_state_dtype": "float32",
        "ffn_proj_factor": float(ffn.proj_factor),
        "ffn_round_up_to_multiple_of": int(ffn.round_proj_up_to_multiple_of),
        "gate_soft_cap": float(cell.gate_soft_cap),
        "output_logit_soft_cap": float(config.logits_soft_cap),
        "weight_mode": "single",
        "use_cache": True,
        "dtype": "float32",
        "context_length": int(config.context_length),
    }


def read_hf_config(path: str | os.PathLike) -> dict[str, Any]:
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise InteropError(f"{path!r} is not a directory")
    cfg_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(cfg_path):
        raise InteropError(f"{path!r} has no {CONFIG_NAME}")
    hf = load_json(cfg_path, max_bytes=16 * 1024 * 1024)
    if not isinstance(hf, dict):
        raise InteropError(f"{cfg_path!r} must hold a JSON object, got {type(hf).__name__}")
    return hf
