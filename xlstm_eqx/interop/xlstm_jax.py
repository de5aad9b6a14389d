"""xlstm-jax (Flax) parameter trees ⇄ `xLSTMLMModel` / `LlamaTransformer`.

A tree is the nested ``params`` dict of a reference checkpoint (a top-level ``{"params": ...}``
wrapper, ``FrozenDict``s and ``nn.Partitioned``-style boxes with a ``.value`` are accepted).
Names follow the reference at tensor-parallel size 1 (ARCHITECTURE §1.7, §7, §8):

- ``token_embedding/sharded/embedding (1, V, D)``, ``lm_head/out_norm/scale``,
  ``lm_head/out_dense/kernel (D, V)``;
- xLSTM blocks ``xlstm_block_stack/blocks/<i>/…`` (scanned: ``blocks/block/…`` with a leading
  ``L`` axis): ``xlstm_res_block/{xlstm_norm,xlstm_post_norm}/sharded/scale``, the layer under
  ``xlstm_res_block/xlstm/`` (``mlstm``: ``proj_up_mlstm``, ``proj_up_z``, ``proj_down`` as
  ``…/Dense_0/{kernel,bias}`` and everything else under ``inner_layer/sharded/``; ``mlstm_v1``:
  ``{dense_q,dense_k,dense_v,dense_o,igate,fgate,proj_down}/Dense_0/{kernel,bias}``,
  ``outnorm/sharded/scale``, ``{q_norm,k_norm}/scale``), and
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

Reference quirks that change outputs (ARCHITECTURE §9) and how converted models keep the
reference's logits: the Flax xLSTM ignores ``tie_weights`` (separate ``out_dense`` always) and
``add_post_blocks_norm`` (``out_norm`` always applied), so `xlstm_jax_config` sets
``tie_weights=False`` and ``add_post_blocks_norm=True``; the Llama scales queries by NH^-1/2, so
it sets ``query_scale_quirk=True``. `to_xlstm_jax` goes the other way: a tied model exports its
embedding as ``out_dense`` and a Llama with the clean head_dim^-1/2 scale has the ratio folded
into its query projection (or its q-norm scale), so the reference reproduces its logits.
"""

import dataclasses
import math
import os
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
from .common import SAME, Entry, InteropError, Layout, ModelFiller, Path, export_arrays, get_path
from .safetensors_files import SafetensorsError, SafetensorsFile, save_file


_TP = Layout(ext_shape_fn=lambda s: (1, *s))  # leading tensor-parallel axis of size 1


_CONV = Layout(ext_shape_fn=lambda s: (1, s[0], 1, s[1]))  # (K, C) <-> (tp, K, 1, C)


_XLSTM_BLOCKS = "xlstm_block_stack/blocks/"


_LLAMA_BLOCKS = "block_stack/"


# configs


def xlstm_jax_config(config: Any) -> Any:
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
    for name in ("dense_q", "dense_k", "dense_v", "dense_o", "igate", "fgate", "proj_down"):
        _dense(entries, f"{ref}/{name}/Dense_0", base + (name,), getattr(layer, name), idx)
    _norm(entries, f"{ref}/outnorm/sharded", base + ("outnorm",), layer.outnorm, idx, _TP)
    for name in ("q_norm", "k_norm"):
        if getattr(layer, name) is not None:
            _norm(entries, f"{ref}/{name}", base + (name,), getattr(layer, name), idx)


def _xlstm_entries(model: xLSTMLMModel) -> list[Entry]:

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
        res = block.xlstm_res_block
        rb = base + ("xlstm_res_block",)
        _norm(
            entries, f"{ref}/xlstm_res_block/xlstm_norm/sharded", rb + ("norm",), res.norm, idx, _TP
        )
        if res.post_norm is not None:
            _norm(
                entries,
                f"{ref}/xlstm_res_block/xlstm_post_norm/sharded",
                rb + ("post_norm",),
                res.post_norm,
                idx,
                _TP,
            )
        if isinstance(res.layer, mLSTMLayerV1):
            _mlstm_v1_entries(
                entries, f"{ref}/xlstm_res_block/xlstm", rb + ("layer",), res.layer, idx
            )
        elif isinstance(res.layer, mLSTMLayer):
            _mlstm_layer_entries(
                entries, f"{ref}/xlstm_res_block/xlstm", rb + ("layer",), res.layer, idx
            )
        else:
            raise InteropError(
                f"block {i}: {type(res.layer).__name__} has no xlstm-jax (Flax) counterpart"
            )
        ffn = block.ffn_res_block
        if ffn is not None:
            fb = base + ("ffn_res_block",)
            _norm(
                entries, f"{ref}/ffn_res_block/ffn_norm/sharded", fb + ("norm",), ffn.norm, idx, _TP
            )
            if ffn.post_norm is not None:
                _norm(
                    entries,
                    f"{ref}/ffn_res_block/ffn_post_norm/sharded",
                    fb + ("post_norm",),
                    ffn.post_norm,
                    idx,
                    _TP,
                )
            for name in ("proj_up", "proj_up_gate", "proj_down"):
                dense = getattr(ffn.layer, name)
                if dense is not None:
                    _dense(
                        entries,
                        f"{ref}/ffn_res_block/ffn/{name}/Dense_0",
                        fb + ("layer", name),
                        dense,
                        idx,
                    )
    if model.out_norm is not None:
        _norm(entries, "lm_head/out_norm", ("out_norm",), model.out_norm, None)
    if model.lm_head is not None:
        entries.append(Entry("lm_head/out_dense/kernel", ("lm_head", "kernel"), None))
    return entries


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
    tree: dict[str, Any] = {}
    for name, value in flat.items():
        node = tree
        *parents, leaf = name.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
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
    first = per.format(i=0)
    for name, value in flat.items():
        if name.startswith(first):
            rest = name[len(first) :]
            out[stacked + rest] = np.stack(
                [flat[per.format(i=i) + rest] for i in range(num_blocks)]
            )
        elif not any(name.startswith(per.format(i=i)) for i in range(1, num_blocks)):
            out[name] = value
    return out


# conversions


def from_xlstm_jax(params: Any, config: Any) -> xLSTMLMModel | LlamaTransformer:
    """An `xLSTMLMModel` (``mlstm`` and ``mlstm_v1`` blocks) or `LlamaTransformer` from an
    xlstm-jax parameter tree and the config it was trained with (our config class; the block
    layout — scanned or not — of ``config.scan_blocks`` is used whatever the tree's).

    The model is built from `xlstm_jax_config(config)`, which keeps the reference's
    output-changing quirks. Raises `InteropError` naming missing/unexpected keys and shape
    mismatches (key and both shapes) before converting anything.
    """
    config = xlstm_jax_config(config)
    cls = xLSTMLMModel if isinstance(config, xLSTMLMModelConfig) else LlamaTransformer
    try:
        skeleton = eqx.filter_eval_shape(cls, config, key=jr.key(0))
    except ValueError as e:
        raise InteropError(f"invalid model config: {e}") from None
    flat = _unscan(flatten_params(params), config.num_blocks)
    for name, value in flat.items():
        shape = np.shape(value)
        if "/sharded/" in name and shape and shape[0] > 1:
            raise InteropError(
                f"{name}: leading tensor-parallel axis of size {shape[0]} (shape {tuple(shape)}); "
                "only checkpoints saved with model_axis_size=1 are supported"
            )
    filler = ModelFiller(skeleton, xlstm_jax_entries(skeleton), source="xlstm-jax parameters")
    filler.check(
        {k: tuple(np.shape(v)) for k, v in flat.items()},
        {k: v.dtype if hasattr(v, "dtype") else np.asarray(v).dtype for k, v in flat.items()},
    )
    for name in filler.entries:
        filler.put(name, np.asarray(flat[name]))
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


# files


_ORBAX_STEP = re.compile(r"^(?:checkpoint_)?(\d+)$")


def _orbax_params_item(path: str) -> str:
    """The orbax item directory holding the parameters: ``path`` itself, its ``params/``, or the
    newest ``checkpoint_<step>/params`` under it (or under its ``checkpoints/``)."""
    if os.path.isfile(os.path.join(path, "_METADATA")):
        return path
    if os.path.isdir(os.path.join(path, "params")):
        return _orbax_params_item(os.path.join(path, "params"))
    for root in (path, os.path.join(path, "checkpoints")):
        if not os.path.isdir(root):
            continue
        steps = sorted(
            (int(m.group(1)), name)
            for name in os.listdir(root)
            if (m := _ORBAX_STEP.match(name)) and os.path.isdir(os.path.join(root, name, "params"))
        )
        if steps:
            return os.path.join(root, steps[-1][1], "params")
    raise InteropError(
        f"{path!r} has no params.safetensors / params.npz and is not an orbax checkpoint "
        "(no _METADATA, params/ or checkpoint_<step>/params)"
    )


def _read_orbax_params(path: str) -> Any:
    """An orbax parameter tree as host arrays, whatever devices wrote it: each array is read
    into one local CPU device (the saved shardings name devices this process may not have)."""
    import orbax.checkpoint as ocp

    item = os.path.abspath(_orbax_params_item(path))
    checkpointer = ocp.Checkpointer(ocp.StandardCheckpointHandler())
    try:
        meta = checkpointer.metadata(item)
        tree = getattr(meta, "item_metadata", meta)
        tree = getattr(tree, "tree", tree)
        cpu = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])

        def target(m: Any) -> Any:
            if not hasattr(m, "shape") or not hasattr(m, "dtype"):
                raise InteropError(f"{item!r}: a non-array leaf ({type(m).__name__}) among params")
            return jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=cpu)

        abstract = jax.tree.map(target, tree, is_leaf=lambda m: hasattr(m, "shape"))
        restored = checkpointer.restore(item, args=ocp.args.StandardRestore(abstract))
    except InteropError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InteropError(f"{item!r}: cannot read the orbax checkpoint ({first})") from None
    return jax.tree.map(np.asarray, restored)


def load_xlstm_jax_params(path: str | os.PathLike) -> dict[str, Any]:
    """A reference parameter tree from disk, without pickle.

    ``path``: a ``.safetensors`` or ``.npz`` file of flat ``a/b/c`` names (as
    `save_xlstm_jax_params` writes), a directory holding ``params.safetensors`` or
    ``params.npz``, or an orbax checkpoint of the reference trainer: its ``checkpoints/``
    directory (the newest ``checkpoint_<step>``), one step directory, or its ``params/`` item.
    An orbax checkpoint saved on more devices (or hosts) than this process has is read all the
    same: every array goes to one local CPU device.
    """

    path = os.fspath(path)
    if os.path.isdir(path):
        for name in ("params.safetensors", "params.npz"):
            if os.path.isfile(os.path.join(path, name)):
                return load_xlstm_jax_params(os.path.join(path, name))
        return unflatten_params(flatten_params(_read_orbax_params(path)))
    if path.endswith(".safetensors"):
        try:
            with SafetensorsFile(path) as st:
                return unflatten_params({k: st.read(k) for k in st.keys()})
        except SafetensorsError as e:
            raise InteropError(str(e)) from None
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as data:
            return unflatten_params({k: data[k] for k in data.files})
    raise InteropError(f"{path!r}: expected a .safetensors or .npz file, or a checkpoint directory")


def save_xlstm_jax_params(params: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Write a parameter tree as flat ``a/b/c`` names to a ``.safetensors`` file."""

    flat = {k: np.asarray(v) for k, v in flatten_params(params).items()}
    save_file(flat, path, metadata={"format": "flax"})
