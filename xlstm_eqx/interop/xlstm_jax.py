"""xlstm-jax (Flax) parameter trees ⇄ `xLSTMLMModel` / `LlamaTransformer`.

A tree is the nested ``params`` dict of a reference checkpoint (a top-level ``{"params": ...}``
wrapper, ``FrozenDict``s and ``nn.Partitioned``-style boxes with a ``.value`` are accepted).
Names follow the reference at tensor-parallel size 1 (docs/architecture.md, "Interop"):

- ``token_embedding/sharded/embedding (1, V, D)``, ``lm_head/out_norm/scale``,
  ``lm_head/out_dense/kernel (D, V)``;
- xLSTM blocks ``xlstm_block_stack/blocks/<i>/…`` (scanned: ``blocks/block/…`` with a leading
  ``L`` axis): ``xlstm_res_block/{xlstm_norm,xlstm_post_norm}/sharded/scale``, the layer under
  ``xlstm_res_block/xlstm/`` (``mlstm``: ``proj_up_mlstm``, ``proj_up_z``, ``proj_down`` as
  ``…/Dense_0/{kernel,bias}`` and everything else under ``inner_layer/sharded/``; ``mlstm_v1``:
  ``{dense_q,dense_k,dense_v,dense_o,igate,fgate,proj_down}/Dense_0/{kernel,bias}``,
  ``outnorm/sharded/scale``, ``{q_norm,k_norm}/scale``; here the gates and norms are under the
  layer's ``cell``), and
  ``ffn_res_block/{ffn_norm,ffn_post_norm}/sharded/scale``,
  ``ffn_res_block/ffn/{proj_up,proj_up_gate,proj_down}/Dense_0/{kernel,bias}``;
- Llama blocks ``block_stack/block_<i>/…`` (scanned: ``block_stack/block/…``):
  ``attn/pre_norm/scale``, ``attn/attn/{dense_q,dense_k,dense_v,dense_out}/{kernel,bias}``,
  ``attn/attn/{q_norm,k_norm}/scale``, ``ffn/pre_norm/scale``,
  ``ffn/ffn/{proj_up,proj_up_gate,proj_down}/{kernel,bias}``.

Every array under a ``…/sharded/…`` module carries a leading tensor-parallel axis, of size 1 here
(tp > 1 checkpoints are refused with the key named). Kernels are Flax ``(in, out)`` like ours; the
conv kernel ``(1, K, 1, C)`` is ours ``(K, C)``. The sLSTM has no Flax implementation in the
reference, so stacks with sLSTM blocks are refused.

Reference quirks that change outputs (docs/architecture.md, "Reference quirks kept") and how
converted models keep the reference's logits: the Flax xLSTM ignores ``tie_weights`` (separate
``out_dense`` always) and ``add_post_blocks_norm`` (``out_norm`` always applied), so
`xlstm_jax_config` sets ``tie_weights=False`` and ``add_post_blocks_norm=True``; the Llama scales
queries by NH^-1/2, so it sets ``query_scale_quirk=True``. `to_xlstm_jax` goes the other way: a
tied model exports its embedding as ``out_dense`` and a Llama with the clean head_dim^-1/2 scale
has the ratio folded into its query projection (or its q-norm scale), so the reference reproduces
its logits.
"""

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

import equinox as eqx
import jax
import jax.random as jr
import numpy as np

from ..llama.config import LlamaConfig
from ..llama.model import LlamaTransformer
from ..xlstm.config import xLSTMLMModelConfig
from ..xlstm.mlstm_layer import mLSTMLayer
from ..xlstm.mlstm_layer_v1 import mLSTMLayerV1
from ..xlstm.model import xLSTMLMModel
from .common import (
    MAX_BLOCKS,
    SAME,
    Entry,
    InteropError,
    Layout,
    ModelFiller,
    Path,
    check_block_count,
    check_finite,
    export_arrays,
    get_path,
)


_TP = Layout(ext_shape_fn=lambda s: (1, *s))  # leading tensor-parallel axis of size 1


_CONV = Layout(ext_shape_fn=lambda s: (1, s[0], 1, s[1]))  # (K, C) <-> (tp, K, 1, C)


_XLSTM_BLOCKS = "xlstm_block_stack/blocks/"


_LLAMA_BLOCKS = "block_stack/"
# A per-block name (after `_unscan`): its block index.
_BLOCK_INDEX = re.compile(r"(?:xlstm_block_stack/blocks/|block_stack/block_)(\d{1,9})/")
_MAX_NAME_DEPTH = 64


# configs


def xlstm_jax_config(
    config: xLSTMLMModelConfig | LlamaConfig,
) -> xLSTMLMModelConfig | LlamaConfig:
    """The config a reference checkpoint really runs with: a copy of ``config`` with the
    reference's output-changing quirks switched on (see the module docstring)."""
    if isinstance(config, xLSTMLMModelConfig):
        if config.slstm_at:
            raise InteropError(
                f"xlstm-jax has no Flax sLSTM: a stack with sLSTM blocks (slstm_at="
                f"{config.slstm_at}) cannot come from or go to an xlstm-jax checkpoint"
            )
        return dataclasses.replace(config, tie_weights=False, add_post_blocks_norm=True)
    if isinstance(config, LlamaConfig):
        return dataclasses.replace(config, query_scale_quirk=True)
    raise InteropError(
        f"expected an xLSTMLMModelConfig or a LlamaConfig, got {type(config).__name__}"
    )


# names


def _dense(
    entries: list[Entry], ref: str, base: Path, dense: Any, idx: int | None, layout: Layout = SAME
) -> None:
    entries.append(Entry(ref + "/kernel", base + ("kernel",), idx, layout))
    if dense.bias is not None:
        entries.append(Entry(ref + "/bias", base + ("bias",), idx, layout))


def _norm(
    entries: list[Entry], ref: str, base: Path, norm: Any, idx: int | None, layout: Layout = SAME
) -> None:
    entries.append(Entry(ref + "/scale", base + ("scale",), idx, layout))
    if norm.bias is not None:
        entries.append(Entry(ref + "/bias", base + ("bias",), idx, layout))


def _mlstm_layer_entries(
    entries: list[Entry], ref: str, base: Path, layer: Any, idx: int | None
) -> None:
    """``layer_type="mlstm"``: ref is ``…/xlstm``, base the path of our ``mLSTMLayer``."""
    for name in ("proj_up_mlstm", "proj_up_z", "proj_down"):
        _dense(entries, f"{ref}/{name}/Dense_0", base + (name,), getattr(layer, name), idx)
    inner = layer.inner_layer
    if inner is None:
        return
    r, b = f"{ref}/inner_layer/sharded", base + ("inner_layer",)
    if inner.conv1d.kernel is not None:
        entries.append(Entry(f"{r}/conv1d/conv/kernel", b + ("conv1d", "kernel"), idx, _CONV))
        if inner.conv1d.bias is not None:
            entries.append(Entry(f"{r}/conv1d/conv/bias", b + ("conv1d", "bias"), idx, _TP))
    for name in ("q_proj", "k_proj", "qk_proj", "v_proj", "x_mlstm_conv_scaling"):
        if getattr(inner, name) is not None:
            _dense(entries, f"{r}/{name}", b + (name,), getattr(inner, name), idx, _TP)
    entries.append(Entry(f"{r}/learnable_skip", b + ("learnable_skip",), idx, _TP))
    cell, c = inner.mlstm_cell, b + ("mlstm_cell",)
    for name in ("igate", "fgate"):
        _dense(entries, f"{r}/mlstm_cell/{name}", c + (name,), getattr(cell, name), idx, _TP)
    _norm(entries, f"{r}/mlstm_cell/outnorm", c + ("outnorm",), cell.outnorm, idx, _TP)
    for name in ("q_norm", "k_norm"):
        if getattr(cell, name) is not None:
            _norm(entries, f"{r}/mlstm_cell/{name}", c + (name,), getattr(cell, name), idx, _TP)


def _mlstm_v1_entries(
    entries: list[Entry], ref: str, base: Path, layer: Any, idx: int | None
) -> None:
    # The gates and norms live in the layer's cell here, directly in the Flax layer there.
    cell, c = layer.cell, base + ("cell",)
    for name in ("dense_q", "dense_k", "dense_v", "dense_o", "igate", "fgate", "proj_down"):
        path = c + (name,) if name in ("igate", "fgate") else base + (name,)
        _dense(entries, f"{ref}/{name}/Dense_0", path, get_path(layer, path[len(base) :]), idx)
    _norm(entries, f"{ref}/outnorm/sharded", c + ("outnorm",), cell.outnorm, idx, _TP)
    for name in ("q_norm", "k_norm"):
        if getattr(cell, name) is not None:
            _norm(entries, f"{ref}/{name}", c + (name,), getattr(cell, name), idx)


def _xlstm_entries(model: xLSTMLMModel) -> list[Entry]:
    """Every leaf of an xLSTM model: the embedding, each block in order, the output norm and head."""
    entries = [
        Entry("token_embedding/sharded/embedding", ("token_embedding", "embedding"), None, _TP)
    ]
    stack = model.xlstm_block_stack
    scanned = not isinstance(stack.blocks, tuple)
    for i in range(stack.num_blocks):
        base: Path = ("xlstm_block_stack", "blocks") + (() if scanned else (i,))
        idx = i if scanned else None
        block = get_path(model, base)
        ref = f"{_XLSTM_BLOCKS}{i}"
        _xlstm_res_block_entries(entries, ref, base, block.xlstm_res_block, idx, i)
        if block.ffn_res_block is not None:
            _ffn_res_block_entries(entries, ref, base, block.ffn_res_block, idx)
    if model.out_norm is not None:
        _norm(entries, "lm_head/out_norm", ("out_norm",), model.out_norm, None)
    if model.lm_head is not None:
        entries.append(Entry("lm_head/out_dense/kernel", ("lm_head", "kernel"), None))
    return entries


def _xlstm_res_block_entries(
    entries: list[Entry], ref: str, base: Path, res: Any, idx: int | None, block_index: int
) -> None:
    """The mLSTM residual block of block ``ref`` (norms, then the layer); an sLSTM layer raises."""
    rb = base + ("xlstm_res_block",)
    _residual_norms(entries, f"{ref}/xlstm_res_block/xlstm", rb, res, idx)
    if isinstance(res.layer, mLSTMLayerV1):
        _mlstm_v1_entries(entries, f"{ref}/xlstm_res_block/xlstm", rb + ("layer",), res.layer, idx)
    elif isinstance(res.layer, mLSTMLayer):
        _mlstm_layer_entries(
            entries, f"{ref}/xlstm_res_block/xlstm", rb + ("layer",), res.layer, idx
        )
    else:
        raise InteropError(
            f"block {block_index}: {type(res.layer).__name__} has no xlstm-jax (Flax) counterpart"
        )


def _ffn_res_block_entries(
    entries: list[Entry], ref: str, base: Path, ffn: Any, idx: int | None
) -> None:
    """The feed-forward residual block of block ``ref``: norms, then the dense layers."""
    fb = base + ("ffn_res_block",)
    _residual_norms(entries, f"{ref}/ffn_res_block/ffn", fb, ffn, idx)
    for name in ("proj_up", "proj_up_gate", "proj_down"):
        dense = getattr(ffn.layer, name)
        if dense is not None:
            _dense(
                entries, f"{ref}/ffn_res_block/ffn/{name}/Dense_0", fb + ("layer", name), dense, idx
            )


def _residual_norms(
    entries: list[Entry], ref_prefix: str, base: Path, res: Any, idx: int | None
) -> None:
    """A residual block's norm and optional post-norm: ``{ref_prefix}_norm`` and
    ``{ref_prefix}_post_norm`` there, ``norm`` and ``post_norm`` under ``base`` here."""
    _norm(entries, f"{ref_prefix}_norm/sharded", base + ("norm",), res.norm, idx, _TP)
    if res.post_norm is not None:
        _norm(
            entries,
            f"{ref_prefix}_post_norm/sharded",
            base + ("post_norm",),
            res.post_norm,
            idx,
            _TP,
        )


def _llama_entries(model: LlamaTransformer) -> list[Entry]:
    entries = [
        Entry("token_embedding/sharded/embedding", ("token_embedding", "embedding"), None, _TP)
    ]
    stack = model.blocks
    scanned = not isinstance(stack.blocks, tuple)
    for i in range(stack.num_blocks):
        base: Path = ("blocks", "blocks") + (() if scanned else (i,))
        idx = i if scanned else None
        block = get_path(model, base)
        ref = f"{_LLAMA_BLOCKS}block_{i}"
        a, ab = block.attn, base + ("attn",)
        _norm(entries, f"{ref}/attn/pre_norm", ab + ("pre_norm",), a.pre_norm, idx)
        for name in ("dense_q", "dense_k", "dense_v", "dense_out"):
            _dense(entries, f"{ref}/attn/attn/{name}", ab + (name,), getattr(a, name), idx)
        for name in ("q_norm", "k_norm"):
            if getattr(a, name) is not None:
                _norm(entries, f"{ref}/attn/attn/{name}", ab + (name,), getattr(a, name), idx)
        f, fb = block.ffn, base + ("ffn",)
        _norm(entries, f"{ref}/ffn/pre_norm", fb + ("pre_norm",), f.pre_norm, idx)
        for name in ("proj_up", "proj_up_gate", "proj_down"):
            _dense(entries, f"{ref}/ffn/ffn/{name}", fb + (name,), getattr(f, name), idx)
    _norm(entries, "lm_head/out_norm", ("out_norm",), model.out_norm, None)
    entries.append(Entry("lm_head/out_dense/kernel", ("lm_head", "kernel"), None))
    return entries


def xlstm_jax_entries(model: Any) -> list[Entry]:
    """The reference tensors (per-block names, unscanned) of a model or skeleton."""
    if isinstance(model, xLSTMLMModel):
        return _xlstm_entries(model)
    if isinstance(model, LlamaTransformer):
        return _llama_entries(model)
    raise InteropError(
        f"expected an xLSTMLMModel or a LlamaTransformer, got {type(model).__name__}"
    )


# trees


def _unbox(x: Any) -> Any:
    if (
        hasattr(x, "value")
        and not isinstance(x, (np.ndarray, jax.Array))
        and not isinstance(x, Mapping)
    ):
        return x.value
    if isinstance(x, Mapping) and set(x) == {"value"} and not isinstance(x["value"], Mapping):
        return x["value"]  # an nn.Partitioned box as orbax stores it (no target given)
    return x


def flatten_params(params: Any) -> dict[str, Any]:
    """``{"a/b/c": array}`` of a nested (Frozen)dict, boxes unwrapped."""
    if isinstance(params, Mapping) and set(params) == {"params"}:
        params = params["params"]
    if not isinstance(params, Mapping):
        raise InteropError(f"expected a nested dict of parameters, got {type(params).__name__}")
    out: dict[str, Any] = {}

    def visit(node: Any, prefix: str) -> None:
        for key, value in node.items():
            name = f"{prefix}{key}"
            value = _unbox(value)
            if isinstance(value, Mapping):
                visit(value, name + "/")
            else:
                out[name] = value

    visit(params, "")
    return out


def unflatten_params(flat: Mapping[str, Any]) -> dict[str, Any]:
    """The nested dict of ``{"a/b/c": array}``; names must form a tree (a name that is also the
    prefix of another would silently lose one of them)."""
    tree: dict[str, Any] = {}
    for name, value in flat.items():
        parts = name.split("/")
        if len(parts) > _MAX_NAME_DEPTH:
            raise InteropError(
                f"parameter name {name[:60]!r}... has more than {_MAX_NAME_DEPTH} levels"
            )
        node = tree
        for i, p in enumerate(parts):
            child = node.get(p)
            last = i == len(parts) - 1
            if child is not None and (last or not isinstance(child, dict)):
                prefix = "/".join(parts[: i + 1])
                raise InteropError(
                    f"parameter name {prefix[:100]!r} clashes with {name[:100]!r}: one is an "
                    "array and a prefix of the other, or a name is repeated"
                )
            if last:
                node[p] = value
            else:
                node = node.setdefault(p, {})
    return tree


def _scanned_prefix(flat: Mapping[str, Any]) -> tuple[str, str] | None:
    """(stacked prefix, per-block prefix with ``{i}``) if the tree has scanned blocks."""
    for stacked, per in (
        (_XLSTM_BLOCKS + "block/", _XLSTM_BLOCKS + "{i}/"),
        (_LLAMA_BLOCKS + "block/", _LLAMA_BLOCKS + "block_{i}/"),
    ):
        if any(k.startswith(stacked) for k in flat):
            return stacked, per
    return None


def _unscan(flat: Mapping[str, Any], num_blocks: int) -> dict[str, Any]:
    """Split ``…/blocks/block/…`` arrays with a leading L axis into per-block names (views)."""
    found = _scanned_prefix(flat)
    if found is None:
        return dict(flat)
    stacked, per = found
    out: dict[str, Any] = {}
    for name, value in flat.items():
        if not name.startswith(stacked):
            out[name] = value
            continue
        rest = name[len(stacked) :]
        shape = np.shape(value)
        if not shape or shape[0] != num_blocks:
            raise InteropError(
                f"{name}: a scanned block parameter needs a leading axis of num_blocks="
                f"{num_blocks}, got shape {tuple(shape)}"
            )
        for i in range(num_blocks):
            out[per.format(i=i) + rest] = value[i]
    return out


def _scan(flat: Mapping[str, Any], num_blocks: int, per: str, stacked: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    # One match per name (testing every block prefix per name made this quadratic in blocks).
    block = re.compile(re.escape(per.split("{i}")[0]) + r"(\d{1,9})/")
    for name, value in flat.items():
        m = block.match(name)
        idx = int(m.group(1)) if m else None
        if m is not None and idx == 0:
            rest = name[m.end() :]
            out[stacked + rest] = np.stack(
                [flat[per.format(i=i) + rest] for i in range(num_blocks)]
            )
        elif idx is None or idx >= num_blocks:
            out[name] = value
    return out


# conversions


def from_xlstm_jax(
    params: Any,
    config: xLSTMLMModelConfig | LlamaConfig,
    *,
    shardings: Mapping[Path, jax.sharding.Sharding] | None = None,
) -> xLSTMLMModel | LlamaTransformer:
    """An `xLSTMLMModel` (``mlstm`` and ``mlstm_v1`` blocks) or `LlamaTransformer` from an
    xlstm-jax parameter tree and the config it was trained with (our config class; the block
    layout — scanned or not — of ``config.scan_blocks`` is used whatever the tree's).

    The model is built from `xlstm_jax_config(config)`, which keeps the reference's
    output-changing quirks. Raises `InteropError` naming missing/unexpected keys and shape
    mismatches (key and both shapes) before converting anything. ``shardings`` (leaf path →
    sharding, e.g. from `mesh_shardings`): each leaf goes straight into its sharding once filled.
    """
    config = xlstm_jax_config(config)
    cls = xLSTMLMModel if isinstance(config, xLSTMLMModelConfig) else LlamaTransformer
    flat = _unscan(flatten_params(params), config.num_blocks)
    # The config's block count against the blocks the tree holds, before per-block work.
    check_block_count(
        "xlstm-jax parameters",
        "num_blocks",
        config.num_blocks,
        {int(m.group(1)) for m in map(_BLOCK_INDEX.match, flat) if m},
        limit=MAX_BLOCKS,
    )
    try:
        skeleton = eqx.filter_eval_shape(cls, config, key=jr.key(0))
    except ValueError as e:
        raise InteropError(f"invalid model config: {e}") from None
    for name, value in flat.items():
        shape = np.shape(value)
        if "/sharded/" in name and shape and shape[0] > 1:
            raise InteropError(
                f"{name}: leading tensor-parallel axis of size {shape[0]} (shape {tuple(shape)}); "
                "only checkpoints saved with model_axis_size=1 are supported"
            )
    filler = ModelFiller(
        skeleton,
        xlstm_jax_entries(skeleton),
        source="xlstm-jax parameters",
        shardings=shardings,
    )
    filler.check(
        {k: tuple(np.shape(v)) for k, v in flat.items()},
        {k: v.dtype if hasattr(v, "dtype") else np.asarray(v).dtype for k, v in flat.items()},
    )
    for name in filler.entries:
        array = np.asarray(flat[name])
        check_finite(array, f"xlstm-jax parameters: {name}")
        filler.put(name, array)
    return filler.finish()


def _fold_llama_query_scale(model: LlamaTransformer) -> LlamaTransformer:
    """Fold a clean head_dim^-1/2 query scale into the query projection (or into the q-norm
    scale, since the norm would undo a scaled projection), so that the reference's NH^-1/2
    gives the same queries. Models with the quirk scale are returned unchanged."""
    blocks = model.blocks.blocks
    attn = blocks[0].attn if isinstance(blocks, tuple) else blocks.attn
    quirk = model.num_heads**-0.5
    if math.isclose(attn.query_scale, quirk, rel_tol=1e-12):
        return model
    ratio = attn.query_scale / quirk

    def where(m: LlamaTransformer) -> list[Any]:
        out = []
        bs = m.blocks.blocks
        for block in bs if isinstance(bs, tuple) else (bs,):
            a = block.attn
            if a.q_norm is not None:
                out.append(a.q_norm.scale)
            else:
                out.append(a.dense_q.kernel)
                if a.dense_q.bias is not None:
                    out.append(a.dense_q.bias)
        return out

    return eqx.tree_at(where, model, [x * ratio for x in where(model)])


def to_xlstm_jax(
    model: xLSTMLMModel | LlamaTransformer, *, scan_blocks: bool | None = None
) -> dict[str, Any]:
    """The xlstm-jax ``params`` tree (nested dict of NumPy float32 arrays) of a model, laid out
    as the reference stores it at tensor-parallel size 1; blocks scanned (stacked) if
    ``scan_blocks`` (default: as in the model). The reference reproduces the model's logits
    (see the module docstring for the quirks handled)."""
    if isinstance(model, xLSTMLMModel):
        if model.out_norm is None:
            raise InteropError(
                "to_xlstm_jax: add_post_blocks_norm=False cannot be expressed, the reference "
                "always applies lm_head/out_norm"
            )
        if any(b.is_slstm for b in model.xlstm_block_stack.block_list()):
            raise InteropError("to_xlstm_jax: xlstm-jax has no Flax sLSTM blocks")
        scanned = not isinstance(model.xlstm_block_stack.blocks, tuple)
        num_blocks = model.xlstm_block_stack.num_blocks
        per, stacked = _XLSTM_BLOCKS + "{i}/", _XLSTM_BLOCKS + "block/"
    elif isinstance(model, LlamaTransformer):
        model = _fold_llama_query_scale(model)
        scanned = not isinstance(model.blocks.blocks, tuple)
        num_blocks = model.blocks.num_blocks
        per, stacked = _LLAMA_BLOCKS + "block_{i}/", _LLAMA_BLOCKS + "block/"
    else:
        raise InteropError(
            f"expected an xLSTMLMModel or a LlamaTransformer, got {type(model).__name__}"
        )
    flat = {
        name: produce() for name, (_, _, produce) in export_arrays(model, xlstm_jax_entries(model))
    }
    if isinstance(model, xLSTMLMModel) and model.lm_head is None:  # tied: the reference has a head
        flat["lm_head/out_dense/kernel"] = np.ascontiguousarray(
            np.asarray(model.token_embedding.embedding).T
        )
    if scanned if scan_blocks is None else scan_blocks:
        flat = _scan(flat, num_blocks, per, stacked)
    return unflatten_params(flat)
