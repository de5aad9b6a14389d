"""Hugging Face transformers `xLSTMForCausalLM` checkpoints (the released xLSTM-7B format).

A checkpoint directory holds ``config.json`` and either ``model.safetensors`` or shards listed in
``model.safetensors.index.json``. The transformers model is the xLSTM-7B architecture, i.e. our
`xLSTMLMModel` with ``mlstm_v1`` layers and a SwiGLU feed-forward in every block:

| transformers (torch ``Linear.weight`` is ``(out, in)``)   | here (kernels ``(in, out)``)                      |
|-----------------------------------------------------------|---------------------------------------------------|
| ``backbone.embeddings.weight (V, D)``                     | ``token_embedding.embedding``                     |
| ``backbone.blocks.{i}.norm_mlstm.weight``                 | ``blocks[i].xlstm_res_block.norm.scale``          |
| ``…mlstm_layer.{q,k,v,ogate_preact}.weight``              | ``…layer.{dense_q,dense_k,dense_v,dense_o}.kernel``ᵀ |
| ``…mlstm_layer.{igate,fgate}_preact.{weight,bias}``       | ``…layer.{igate,fgate}.{kernel}ᵀ,{bias}``          |
| ``…mlstm_layer.multihead_norm.weight (NH·DHV,)``          | ``…layer.outnorm.scale (NH, DHV)``                |
| ``…mlstm_layer.out_proj.weight``                          | ``…layer.proj_down.kernel``ᵀ                      |
| ``…norm_ffn.weight``, ``…ffn.{proj_up_gate,proj_up,proj_down}.weight`` | ``…ffn_res_block.norm.scale``, ``…layer.{…}.kernel``ᵀ |
| ``backbone.out_norm.weight``, ``lm_head.weight (V, D)``   | ``out_norm.scale``, ``lm_head.kernel``ᵀ           |

Tied embeddings: transformers' ``xLSTMForCausalLM`` never ties its head — with
``tie_word_embeddings=True`` it still loads a stored ``lm_head.weight`` (and initialises a random
one when there is none). So a stored head is always used (the model comes back tied only if the
head equals the embedding, as `to_hf` writes tied models), and a checkpoint without one is read
as tied, the flag's intent.

``weight_mode="fused"`` checkpoints (``qkv_opreact`` = [q|k|v|o], ``ifgate_preact`` = [i|f],
``proj_up_gate_z`` = [gate|up]) are split on load; `to_hf` always writes ``"single"``.

Config mapping: ``hidden_size``/``embedding_dim`` → D, ``num_hidden_layers``/``num_blocks`` → L,
``num_heads``, ``qk_dim_factor``, ``v_dim_factor``, ``norm_eps`` (every norm), ``eps`` (cell),
``chunk_size`` (our chunkwise backend), ``gate_soft_cap``, ``output_logit_soft_cap``,
``ffn_proj_factor``/``ffn_round_up_to_multiple_of``, ``tie_word_embeddings``. Fixed by the
architecture: RMS block and output norms, a LayerNorm per-head out-norm, σ output gate, SiLU FFN.
Kernel selection fields (``mode``, ``*_kernel``, ``autocast_kernel_dtype``, ``inference_state_dtype``,
``return_last_states``, ``max_inference_chunksize``) only choose how transformers runs and are
ignored. ``use_bias=True`` (biases on the norms, which our model does not have) and
``add_out_norm=False`` (transformers' own implementation ignores it and applies the norm anyway,
the ``xlstm`` package does not) are refused.

Loading streams: every shard header is read and checked against the model first (missing and
unexpected keys, shapes), then shard after shard, tensor after tensor, each tensor is copied into
its (float32) leaf, and a leaf is handed to JAX once complete; peak host memory stays near one
float32 copy of the weights plus one tensor.
"""

import dataclasses
import json
import os
import shutil
from collections.abc import Mapping
from typing import Any

import equinox as eqx
import jax.random as jr
import numpy as np
from jax.sharding import Mesh

from ..cell.backend_config import mLSTMBackendNameAndKwargs
from ..core.parallel_config import ParallelConfig
from ..nn.feedforward_config import FeedForwardConfig
from ..xlstm.config import xLSTMLMModelConfig
from ..xlstm.mlstm_config import mLSTMBlockConfig, mLSTMCellConfig, mLSTMLayerConfig
from ..xlstm.model import xLSTMLMModel
from .common import (
    SAME,
    TRANSPOSE,
    Entry,
    InteropError,
    Layout,
    ModelFiller,
    Path,
    _fmt_shape,
    _leaf_paths,
    check_matches_config,
    export_arrays,
    get_path,
    mesh_shardings,
)
from .safetensors_files import SafetensorsError, SafetensorsFile, TensorInfo, read_index, save_file


CONFIG_NAME = "config.json"


SINGLE_FILE = "model.safetensors"


INDEX_FILE = "model.safetensors.index.json"


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


_FLAT = Layout(ext_shape_fn=lambda s: (int(np.prod(s)),))


_DTYPES = ("float32", "bfloat16", "float16")


# Our name -> transformers name, per mLSTM layer.
_LAYER_DENSES = (
    ("dense_q", "q"),
    ("dense_k", "k"),
    ("dense_v", "v"),
    ("dense_o", "ogate_preact"),
    ("igate", "igate_preact"),
    ("fgate", "fgate_preact"),
    ("proj_down", "out_proj"),
)


_FFN_DENSES = (("proj_up_gate", "proj_up_gate"), ("proj_up", "proj_up"), ("proj_down", "proj_down"))


# config


def _get(hf: Mapping[str, Any], *names: str, default: Any = None) -> Any:
    for n in names:
        if hf.get(n) is not None:
            return hf[n]
    return default


def _unsupported(field: str, value: Any, why: str) -> InteropError:
    return InteropError(f"unsupported transformers xLSTM config value {field}={value!r}: {why}")


def _positive_int(hf: Mapping[str, Any], *names: str, default: Any = None) -> int:
    value = _get(hf, *names, default=default)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InteropError(f"config.json: {names[0]} must be a positive int, got {value!r}")
    return value


def _number(hf: Mapping[str, Any], name: str, default: Any, *, allow_none: bool = False) -> Any:
    value = hf.get(name, default)
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise InteropError(f"config.json: {name} must be a number > 0, got {value!r}")
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
    if not isinstance(hf, Mapping):
        raise InteropError(f"config.json must hold a JSON object, got {type(hf).__name__}")
    model_type = hf.get("model_type", "xlstm")
    if model_type != "xlstm":
        raise _unsupported("model_type", model_type, "only 'xlstm' (xLSTMForCausalLM) is handled")
    archs = hf.get("architectures")
    if archs and "xLSTMForCausalLM" not in archs:
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
    if dtype is None:
        dtype = _get(hf, "dtype", "torch_dtype", default="float32")
        if dtype not in _DTYPES:
            dtype = "float32"
    elif dtype not in _DTYPES:
        raise InteropError(f"dtype must be one of {_DTYPES}, got {dtype!r}")

    D = _positive_int(hf, "hidden_size", "embedding_dim")
    if hf.get("embedding_dim") not in (None, D):
        raise _unsupported("embedding_dim", hf["embedding_dim"], f"differs from hidden_size={D}")
    L = _positive_int(hf, "num_hidden_layers", "num_blocks")
    if hf.get("num_blocks") not in (None, L):
        raise _unsupported("num_blocks", hf["num_blocks"], f"differs from num_hidden_layers={L}")
    V = _positive_int(hf, "vocab_size")
    NH = _positive_int(hf, "num_heads", default=8)
    norm_eps = _number(hf, "norm_eps", 1e-6)
    cell_eps = _number(hf, "eps", 1e-6)
    chunk_size = _positive_int(hf, "chunk_size", default=64)
    backend_kwargs: dict[str, Any] = {"chunk_size": chunk_size}
    if cell_eps != 1e-6:  # the cell default; left out so that equal configs compare equal
        backend_kwargs["eps"] = cell_eps
    context_length = hf.get("context_length", -1)  # ours, written by to_hf; transformers keeps it
    if (
        isinstance(context_length, bool)
        or not isinstance(context_length, int)
        or context_length <= 0
    ):
        context_length = -1
    tie = hf.get("tie_word_embeddings", False)
    if not isinstance(tie, bool):
        raise InteropError(f"config.json: tie_word_embeddings must be a bool, got {tie!r}")
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
                    qk_dim_factor=_number(hf, "qk_dim_factor", 0.5),
                    v_dim_factor=_number(hf, "v_dim_factor", 1.0),
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
                    proj_factor=_number(hf, "ffn_proj_factor", 2.667),
                    act_fn="swish",
                    ff_type="ffn_gated",
                    bias=False,
                    round_proj_up_dim_up=True,
                    round_proj_up_to_multiple_of=_positive_int(
                        hf, "ffn_round_up_to_multiple_of", default=64
                    ),
                ),
            ),
        )
    except ValueError as e:
        if isinstance(e, InteropError):
            raise
        raise InteropError(f"config.json describes no valid xLSTM model: {e}") from None


def _require(ok: bool, field: str, value: Any, why: str) -> None:
    if not ok:
        raise InteropError(
            f"cannot express the model in the transformers xLSTM format: {field}={value!r} ({why})"
        )


def eqx_config_to_hf(config: xLSTMLMModelConfig) -> dict[str, Any]:
    """The transformers ``config.json`` dict of an `xLSTMLMModelConfig`; raises `InteropError`
    naming the first field the transformers architecture cannot express."""
    if not isinstance(config, xLSTMLMModelConfig):
        raise InteropError(f"expected an xLSTMLMModelConfig, got {type(config).__name__}")
    config.validate()
    _require(not config.slstm_at, "slstm_at", config.slstm_at, "transformers has no sLSTM blocks")
    block = config.mlstm_block
    _require(block is not None, "mlstm_block", None, "an mLSTM block config is required")
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
    kwargs = dict(cell.backend.kwargs)
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


# tensor names


def hf_entries(model: Any) -> list[Entry]:
    """The transformers tensors of an `xLSTMLMModel` (or its skeleton) with mLSTM v1 blocks."""
    stack = model.xlstm_block_stack
    scanned = not isinstance(stack.blocks, tuple)
    entries = [Entry("backbone.embeddings.weight", ("token_embedding", "embedding"), None)]
    for i in range(stack.num_blocks):
        base: Path = ("xlstm_block_stack", "blocks") + (() if scanned else (i,))
        idx = i if scanned else None
        block = get_path(model, base)
        pre = f"backbone.blocks.{i}."

        def add(name: str, sub: Path, layout: Layout = SAME) -> None:
            entries.append(Entry(pre + name, base + sub, idx, layout))  # noqa: B023

        res = block.xlstm_res_block
        add("norm_mlstm.weight", ("xlstm_res_block", "norm", "scale"))
        for ours, theirs in _LAYER_DENSES:
            sub = ("xlstm_res_block", "layer", ours)
            add(f"mlstm_layer.{theirs}.weight", sub + ("kernel",), TRANSPOSE)
            if getattr(res.layer, ours).bias is not None:
                add(f"mlstm_layer.{theirs}.bias", sub + ("bias",))
        add(
            "mlstm_layer.multihead_norm.weight",
            ("xlstm_res_block", "layer", "outnorm", "scale"),
            _FLAT,
        )
        add("norm_ffn.weight", ("ffn_res_block", "norm", "scale"))
        for ours, theirs in _FFN_DENSES:
            add(f"ffn.{theirs}.weight", ("ffn_res_block", "layer", ours, "kernel"), TRANSPOSE)
    entries.append(Entry("backbone.out_norm.weight", ("out_norm", "scale"), None))
    if model.lm_head is not None:
        entries.append(Entry("lm_head.weight", ("lm_head", "kernel"), None, TRANSPOSE))
    return entries


def _fused_groups(num_blocks: int) -> list[tuple[str, list[str]]]:
    """(fused name, its parts in order) of a ``weight_mode="fused"`` checkpoint."""
    groups = []
    for i in range(num_blocks):
        p = f"backbone.blocks.{i}."
        m = p + "mlstm_layer."
        qkvo = [m + n + ".weight" for n in ("q", "k", "v", "ogate_preact")]
        groups.append((m + "qkv_opreact.weight", qkvo))
        groups.append(
            (m + "ifgate_preact.weight", [m + "igate_preact.weight", m + "fgate_preact.weight"])
        )
        groups.append(
            (m + "ifgate_preact.bias", [m + "igate_preact.bias", m + "fgate_preact.bias"])
        )
        groups.append(
            (
                p + "ffn.proj_up_gate_z.weight",
                [p + "ffn.proj_up_gate.weight", p + "ffn.proj_up.weight"],
            )
        )
    return groups


# loading


def _shard_files(path: str) -> tuple[list[str], dict[str, str] | None]:
    index = os.path.join(path, INDEX_FILE)
    single = os.path.join(path, SINGLE_FILE)
    if os.path.isfile(index):
        weight_map = read_index(index)
        files = sorted(set(weight_map.values()))
        for f in files:
            if not os.path.isfile(os.path.join(path, f)):
                raise InteropError(f"{index!r} lists shard {f!r}, which does not exist")
        return [os.path.join(path, f) for f in files], weight_map
    if os.path.isfile(single):
        return [single], None
    raise InteropError(
        f"{path!r} holds neither {SINGLE_FILE!r} nor {INDEX_FILE!r} (only safetensors weights "
        "are read; pickled .bin files never are)"
    )


def read_hf_config(path: str | os.PathLike) -> dict[str, Any]:
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise InteropError(f"{path!r} is not a directory")
    cfg_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(cfg_path):
        raise InteropError(f"{path!r} has no {CONFIG_NAME}")
    try:
        with open(cfg_path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise InteropError(f"{cfg_path!r} is not valid JSON: {e}") from None


def from_hf_pretrained(
    path: str | os.PathLike,
    *,
    dtype: str | None = None,
    scan_blocks: bool = True,
    mesh: Mesh | None = None,
    parallel: ParallelConfig | None = None,
) -> tuple[xLSTMLMModel, xLSTMLMModelConfig]:
    """Load a local transformers ``xLSTMForCausalLM`` directory as ``(model, config)``.

    ``dtype``: compute dtype (default: the checkpoint's dtype, float32 if unknown); parameters
    are float32. ``scan_blocks``: stack the blocks for ``lax.scan`` (default) or keep a tuple.
    ``mesh``: place each parameter straight into its sharding on this mesh as soon as it is read
    (partition rules of ``parallel``, default the config's own with the mesh's axis sizes), so
    the model is never whole on one device; every process reads the files and keeps only its
    devices' slices. Raises `InteropError` naming missing/unexpected keys, shape mismatches (key
    and both shapes) and unsupported config values, before reading any tensor data.
    """
    path = os.fspath(path)
    hf = read_hf_config(path)
    hf_config_to_eqx(hf, dtype=dtype, scan_blocks=scan_blocks)  # config errors first
    files, weight_map = _shard_files(path)

    headers: dict[str, tuple[str, TensorInfo]] = {}
    try:
        for file in files:
            with SafetensorsFile(file) as st:
                for name, info in st.tensors.items():
                    if name in headers:
                        raise InteropError(
                            f"tensor {name!r} is stored twice ({headers[name][0]!r}, {file!r})"
                        )
                    headers[name] = (file, info)
    except SafetensorsError as e:
        raise InteropError(str(e)) from None
    if weight_map is not None:
        listed_missing = sorted(n for n in weight_map if n not in headers)
        if listed_missing:
            raise InteropError(
                f"{INDEX_FILE} lists tensors that no shard holds: {listed_missing[:20]}"
            )

    # transformers' xLSTMForCausalLM does not tie its head: with tie_word_embeddings=True it
    # still reads a stored lm_head.weight (and initialises a random one if there is none). So
    # a stored head is used; without one the head is tied to the embedding, the flag's intent.
    flag = bool(hf.get("tie_word_embeddings", False))
    has_head = "lm_head.weight" in headers
    config = hf_config_to_eqx(
        hf, dtype=dtype, scan_blocks=scan_blocks, tie_weights=flag and not has_head
    )
    skeleton = eqx.filter_eval_shape(xLSTMLMModel, config, key=jr.key(0))
    shardings = None
    if mesh is not None:
        shardings = mesh_shardings(skeleton, mesh, parallel, base=config.parallel)
    filler = ModelFiller(
        skeleton, hf_entries(skeleton), source=f"checkpoint {path!r}", shardings=shardings
    )
    # virtual name -> (stored name, row range or None)
    sources: dict[str, tuple[str, tuple[int, int] | None]] = {}
    consumed: set[str] = set()
    extra_missing: list[str] = []
    extra_mismatched: list[str] = []
    if hf.get("weight_mode", "single") == "fused":
        for fused, parts in _fused_groups(config.num_blocks):
            part_shapes = [filler.expected_shape(p) for p in parts if p in filler.entries]
            if not part_shapes:
                continue
            want = (sum(s[0] for s in part_shapes), *part_shapes[0][1:])
            if fused not in headers:
                extra_missing.append(fused)
            elif headers[fused][1].shape != want:
                consumed.add(fused)
                extra_mismatched.append(
                    f"{fused}: checkpoint has shape {_fmt_shape(headers[fused][1].shape)}, the "
                    f"model expects {_fmt_shape(want)}"
                )
            else:
                consumed.add(fused)
                start = 0
                for p, s in zip(parts, part_shapes, strict=True):
                    sources[p] = (fused, (start, start + s[0]))
                    start += s[0]
                continue
            for p in parts:  # reported under the fused name; keep the parts quiet
                sources[p] = ("", None)
    for name in headers:
        if name not in consumed:
            sources[name] = (name, None)

    def shape_of(name: str) -> tuple[int, ...]:
        stored, rows = sources[name]
        if not stored:
            return filler.expected_shape(name)
        shape = headers[stored][1].shape
        return shape if rows is None else (rows[1] - rows[0], *shape[1:])

    filler.check(
        {n: shape_of(n) for n in sources},
        {n: headers[s][1].dtype for n, (s, _) in sources.items() if s},
        extra_missing=extra_missing,
        extra_mismatched=extra_mismatched,
    )

    # Stream: shard by shard, tensors in file order; each stored tensor is read once.
    by_stored: dict[str, list[tuple[str, tuple[int, int] | None]]] = {}
    for name, (stored, rows) in sources.items():
        by_stored.setdefault(stored, []).append((name, rows))
    for file in files:
        with SafetensorsFile(file) as st:
            for stored in sorted(st.tensors, key=lambda n: st.tensors[n].start):
                if stored not in by_stored:
                    continue
                array = st.read(stored)
                for name, rows in by_stored[stored]:
                    filler.put(name, array if rows is None else array[rows[0] : rows[1]])
                del array
    model = filler.finish()
    if (
        flag
        and has_head
        and model.lm_head.kernel.is_fully_addressable
        and np.array_equal(
            np.asarray(model.lm_head.kernel).T, np.asarray(model.token_embedding.embedding)
        )
    ):  # a tied model written out with an explicit head (as to_hf does): tie it again
        config = dataclasses.replace(config, tie_weights=True)
        model = _retie(model, config)
    return model, config


def _retie(model: xLSTMLMModel, config: xLSTMLMModelConfig) -> xLSTMLMModel:
    """The same weights in a tied model (no ``lm_head``)."""
    skeleton = eqx.filter_eval_shape(xLSTMLMModel, config, key=jr.key(0))
    paths = list(_leaf_paths(skeleton))
    return eqx.tree_at(
        lambda m: [get_path(m, p) for p in paths],
        skeleton,
        [get_path(model, p) for p in paths],
    )


# writing


def to_hf(
    model: xLSTMLMModel,
    config: xLSTMLMModelConfig,
    path: str | os.PathLike,
    *,
    max_shard_bytes: int | None = 5 * 10**9,
    tokenizer_dir: str | os.PathLike | None = None,
) -> str:
    """Write ``model`` as a transformers ``xLSTMForCausalLM`` directory (``config.json`` and
    float32 safetensors): like ``save_pretrained``, shards of at most ``max_shard_bytes`` (5 GB)
    with ``model.safetensors.index.json`` when more than one is needed (``None``: one file).
    ``tokenizer_dir``: copy its ``tokenizer.json`` (and tokenizer/special-token configs) along.
    Returns ``path``."""
    hf = eqx_config_to_hf(config)
    if not isinstance(model, xLSTMLMModel):
        raise InteropError(f"expected an xLSTMLMModel, got {type(model).__name__}")
    entries = hf_entries(model)
    check_matches_config(model, eqx.filter_eval_shape(xLSTMLMModel, config, key=jr.key(0)))
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    tensors = list(export_arrays(model, entries))
    if model.lm_head is None:  # transformers does not tie: store the head explicitly
        emb = model.token_embedding.embedding
        tensors.append(
            ("lm_head.weight", (tuple(emb.shape), np.dtype(emb.dtype), lambda: np.asarray(emb)))
        )
    shards: list[list[tuple[str, Any]]] = [[]]
    size = 0
    for name, value in tensors:
        nbytes = int(np.prod(value[0])) * value[1].itemsize
        if max_shard_bytes is not None and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, value))
        size += nbytes
    for stale in (SINGLE_FILE, INDEX_FILE):
        if os.path.exists(os.path.join(path, stale)):
            os.remove(os.path.join(path, stale))
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], os.path.join(path, SINGLE_FILE), meta)
    else:
        weight_map, total = {}, 0
        for k, shard in enumerate(shards, start=1):
            fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
            total += save_file(shard, os.path.join(path, fname), meta)
            weight_map.update({name: fname for name, _ in shard})
        with open(os.path.join(path, INDEX_FILE), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump(hf, f, indent=2)
    if tokenizer_dir is not None:
        for fname in TOKENIZER_FILES:
            src = os.path.join(os.fspath(tokenizer_dir), fname)
            if os.path.isfile(src):
                shutil.copyfile(src, os.path.join(path, fname))
    return path
