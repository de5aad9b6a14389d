"""Hugging Face transformers `xLSTMForCausalLM` checkpoints (the released xLSTM-7B format).

A checkpoint directory holds ``config.json`` and either ``model.safetensors`` or shards listed in
``model.safetensors.index.json``. The transformers model is the xLSTM-7B architecture, i.e. our
`xLSTMLMModel` with ``mlstm_v1`` layers and a SwiGLU feed-forward in every block:

| transformers (torch ``Linear.weight`` is ``(out, in)``)   | here (kernels ``(in, out)``)                      |
|-----------------------------------------------------------|---------------------------------------------------|
| ``backbone.embeddings.weight (V, D)``                     | ``token_embedding.embedding``                     |
| ``backbone.blocks.{i}.norm_mlstm.weight``                 | ``blocks[i].xlstm_res_block.norm.scale``          |
| ``…mlstm_layer.{q,k,v,ogate_preact}.weight``              | ``…layer.{dense_q,dense_k,dense_v,dense_o}.kernel``ᵀ |
| ``…mlstm_layer.{igate,fgate}_preact.{weight,bias}``       | ``…layer.cell.{igate,fgate}.{kernel}ᵀ,{bias}``     |
| ``…mlstm_layer.multihead_norm.weight (NH·DHV,)``          | ``…layer.cell.outnorm.scale (NH, DHV)``           |
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
unexpected keys, shapes), then shard after shard, tensor after tensor, each tensor is checked for
NaN/inf and copied into its (float32) leaf, and a leaf is handed to JAX once complete; peak host
memory stays near one float32 copy of the weights plus one tensor.

Checkpoint directories are untrusted input: ``config.json`` values are bounded (`MAX_INT`,
`_MAX_FACTOR`; far above the 7B's) and the block count is compared with the blocks the shard
headers hold before a model of the config's size is described, so a config cannot make the
loader build or allocate more than the weights on disk justify.
"""

import dataclasses
import functools
import json
import os
import re
from collections.abc import Mapping
from typing import Any

import equinox as eqx
import jax
import jax.random as jr
import numpy as np
from jax.sharding import Mesh

from ..core.files import copy_file_atomic, write_atomic
from ..core.parallel_config import ParallelConfig
from ..data.tokenizer import BYTES_SPECS
from ..xlstm.config import xLSTMLMModelConfig
from ..xlstm.model import xLSTMLMModel
from .common import (
    SAME,
    TRANSPOSE,
    Entry,
    InteropError,
    Layout,
    ModelFiller,
    Path,
    check_block_count,
    check_finite,
    check_matches_config,
    export_arrays,
    format_shape,
    get_path,
    leaf_paths,
    mesh_shardings,
)
from .hf_config import (
    CONFIG_NAME,
    MAX_INT,
    eqx_config_to_hf,
    hf_config_to_eqx,
    positive_int,
    read_hf_config,
)
from .safetensors_files import SafetensorsError, SafetensorsFile, TensorInfo, read_index, save_file


SINGLE_FILE = "model.safetensors"


INDEX_FILE = "model.safetensors.index.json"


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


# An export of a byte-tokenizer model has no tokenizer.json (transformers has no byte tokenizer):
# this file records the tokenizer instead, so `generate --hf` / `eval --hf` find it.
TOKENIZER_MARKER = "xlstm_eqx_tokenizer.json"


_FLAT = Layout(ext_shape_fn=lambda s: (int(np.prod(s)),))


# Our name -> transformers name, per mLSTM layer.
# (path in the mlstm_v1 layer, transformers name); the gates live in the layer's cell
_LAYER_DENSES: tuple[tuple[tuple[str, ...], str], ...] = (
    (("dense_q",), "q"),
    (("dense_k",), "k"),
    (("dense_v",), "v"),
    (("dense_o",), "ogate_preact"),
    (("cell", "igate"), "igate_preact"),
    (("cell", "fgate"), "fgate_preact"),
    (("proj_down",), "out_proj"),
)


_FFN_DENSES = (("proj_up_gate", "proj_up_gate"), ("proj_up", "proj_up"), ("proj_down", "proj_down"))


_BLOCK_INDEX = re.compile(r"backbone\.blocks\.(\d{1,9})\.")


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
            sub = ("xlstm_res_block", "layer", *ours)
            add(f"mlstm_layer.{theirs}.weight", sub + ("kernel",), TRANSPOSE)
            if functools.reduce(getattr, ours, res.layer).bias is not None:
                add(f"mlstm_layer.{theirs}.bias", sub + ("bias",))
        add(
            "mlstm_layer.multihead_norm.weight",
            ("xlstm_res_block", "layer", "cell", "outnorm", "scale"),
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
        try:
            weight_map = read_index(index)
        except SafetensorsError as e:
            raise InteropError(str(e)) from None
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


# virtual name -> (stored name, row range or None); a stored name "" marks a part reported under
# its fused name
_Sources = dict[str, tuple[str, tuple[int, int] | None]]
_Headers = dict[str, tuple[str, TensorInfo]]


@dataclasses.dataclass(frozen=True)
class HFCheckpoint:
    """A transformers directory whose config and shard headers have been read and checked (no
    tensor data yet): ``config`` is the model it describes (an untied head wherever one is
    stored, as transformers runs it), ``files`` the safetensors shards in reading order."""

    path: str
    config: xLSTMLMModelConfig
    files: tuple[str, ...]
    headers: _Headers
    fused: bool
    tie_flag: bool  # config.json's tie_word_embeddings

    @property
    def has_head(self) -> bool:
        return "lm_head.weight" in self.headers

    def weight_files(self) -> list[str]:
        """Every file that defines the weights: config.json, the index (if any), the shards."""
        index = os.path.join(self.path, INDEX_FILE)
        extra = [index] if os.path.isfile(index) else []
        return [os.path.join(self.path, CONFIG_NAME), *extra, *self.files]


def read_hf_checkpoint(
    path: str | os.PathLike, *, dtype: str | None = None, scan_blocks: bool = True
) -> HFCheckpoint:
    """Read and check a transformers directory's config.json and shard headers (no tensor data):
    raises `InteropError` naming unsupported config values before anything else."""
    path = os.fspath(path)
    hf = read_hf_config(path)
    hf_config_to_eqx(hf, dtype=dtype, scan_blocks=scan_blocks)  # config errors first
    files, weight_map = _shard_files(path)
    headers = _read_headers(files, weight_map)
    # The config's block count against the blocks on disk, before per-block work of its size.
    check_block_count(
        f"checkpoint {path!r}: config.json",
        "num_hidden_layers",
        positive_int(hf, "num_hidden_layers", "num_blocks"),
        {int(m.group(1)) for m in map(_BLOCK_INDEX.match, headers) if m},
        limit=MAX_INT["num_hidden_layers"],
    )
    # transformers' xLSTMForCausalLM does not tie its head: with tie_word_embeddings=True it
    # still reads a stored lm_head.weight (and initialises a random one if there is none). So
    # a stored head is used; without one the head is tied to the embedding, the flag's intent.
    flag = bool(hf.get("tie_word_embeddings", False))
    has_head = "lm_head.weight" in headers
    config = hf_config_to_eqx(
        hf, dtype=dtype, scan_blocks=scan_blocks, tie_weights=flag and not has_head
    )
    fused = hf.get("weight_mode", "single") == "fused"
    return HFCheckpoint(path, config, tuple(files), headers, fused, flag)


def load_hf_weights(
    checkpoint: HFCheckpoint,
    skeleton: xLSTMLMModel,
    shardings: Mapping[Path, jax.sharding.Sharding] | None = None,
) -> xLSTMLMModel:
    """The weights of ``checkpoint`` in ``skeleton`` (an ``eqx.filter_eval_shape`` of a model
    of its config, whose compute dtype, context length or dropout may differ), each leaf placed
    into ``shardings[leaf path]`` as soon as it is read (default: one device)."""
    filler = ModelFiller(
        skeleton,
        hf_entries(skeleton),
        source=f"checkpoint {checkpoint.path!r}",
        shardings=shardings,
    )
    sources = _check_against_model(
        filler,
        checkpoint.headers,
        fused=checkpoint.fused,
        num_blocks=skeleton.xlstm_block_stack.num_blocks,
    )
    _stream_tensors(checkpoint.path, list(checkpoint.files), sources, filler)
    return filler.finish()


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
    (partition rules of ``parallel``; default: the config's own with the mesh's axis sizes and,
    on a mesh with an fsdp axis > 1, FSDP over the embedding, the head and every block
    (`default_fsdp_modules`), as the config of a transformers directory names none), so
    the model is never whole on one device; every process reads the files and keeps only its
    devices' slices. Raises `InteropError` naming missing/unexpected keys, shape mismatches (key
    and both shapes) and unsupported config values, before reading any tensor data.
    """
    checkpoint = read_hf_checkpoint(path, dtype=dtype, scan_blocks=scan_blocks)
    config = checkpoint.config
    skeleton = eqx.filter_eval_shape(xLSTMLMModel, config, key=jr.key(0))
    shardings = None
    if mesh is not None:
        shardings = mesh_shardings(skeleton, mesh, parallel, base=config.parallel)
    model = load_hf_weights(checkpoint, skeleton, shardings)
    if checkpoint.tie_flag and checkpoint.has_head:
        return _retie_if_head_is_embedding(model, config)
    return model, config


def _retie_if_head_is_embedding(
    model: xLSTMLMModel, config: xLSTMLMModelConfig
) -> tuple[xLSTMLMModel, xLSTMLMModelConfig]:
    """A tied model written out with an explicit head (as `to_hf` does) comes back tied."""
    head = model.lm_head  # set (a stored head was loaded); the check below narrows the type
    if (
        head is not None
        and head.kernel.is_fully_addressable
        and np.array_equal(np.asarray(head.kernel).T, np.asarray(model.token_embedding.embedding))
    ):
        config = dataclasses.replace(config, tie_weights=True)
        model = _retie(model, config)
    return model, config


def _read_headers(files: list[str], weight_map: dict[str, str] | None) -> _Headers:
    """Tensor name -> (its shard file, its header entry); every tensor the index lists is held."""
    headers: _Headers = {}
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
    return headers


def _check_against_model(
    filler: ModelFiller, headers: _Headers, *, fused: bool, num_blocks: int
) -> _Sources:
    """Where each model tensor comes from, after checking names and shapes against the model.

    Fused tensors (``weight_mode="fused"``) are split into row ranges of their parts; a missing
    or misshapen fused tensor is reported under its own name, its parts kept quiet.
    """
    sources: _Sources = {}
    consumed: set[str] = set()
    extra_missing: list[str] = []
    extra_mismatched: list[str] = []
    if fused:
        for fused_name, parts in _fused_groups(num_blocks):
            part_shapes = [filler.expected_shape(p) for p in parts if p in filler.entries]
            if not part_shapes:
                continue
            want = (sum(s[0] for s in part_shapes), *part_shapes[0][1:])
            if fused_name not in headers:
                extra_missing.append(fused_name)
            elif headers[fused_name][1].shape != want:
                consumed.add(fused_name)
                extra_mismatched.append(
                    f"{fused_name}: checkpoint has shape "
                    f"{format_shape(headers[fused_name][1].shape)}, the model expects "
                    f"{format_shape(want)}"
                )
            else:
                consumed.add(fused_name)
                start = 0
                for part, shape in zip(parts, part_shapes, strict=True):
                    sources[part] = (fused_name, (start, start + shape[0]))
                    start += shape[0]
                continue
            for part in parts:  # reported under the fused name; keep the parts quiet
                sources[part] = ("", None)
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
    return sources


def _stream_tensors(path: str, files: list[str], sources: _Sources, filler: ModelFiller) -> None:
    """Shard by shard, tensors in file order: read each stored tensor once, check it, fill it."""
    by_stored: dict[str, list[tuple[str, tuple[int, int] | None]]] = {}
    for name, (stored, rows) in sources.items():
        by_stored.setdefault(stored, []).append((name, rows))
    try:
        for file in files:
            with SafetensorsFile(file) as st:
                for stored in sorted(st.tensors, key=lambda n: st.tensors[n].start):
                    if stored not in by_stored:
                        continue
                    array = st.read(stored)
                    check_finite(array, f"checkpoint {path!r}: tensor {stored!r}")
                    for name, rows in by_stored[stored]:
                        filler.put(name, array if rows is None else array[rows[0] : rows[1]])
                    del array
    except SafetensorsError as e:  # e.g. a shard changed since its header was read
        raise InteropError(str(e)) from None


def _retie(model: xLSTMLMModel, config: xLSTMLMModelConfig) -> xLSTMLMModel:
    """The same weights in a tied model (no ``lm_head``)."""
    skeleton = eqx.filter_eval_shape(xLSTMLMModel, config, key=jr.key(0))
    paths = list(leaf_paths(skeleton))
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
    tokenizer: str | None = None,
) -> str:
    """Write ``model`` as a transformers ``xLSTMForCausalLM`` directory (``config.json`` and
    float32 safetensors): like ``save_pretrained``, shards of at most ``max_shard_bytes`` (5 GB)
    with ``model.safetensors.index.json`` when more than one is needed (``None``: one file).
    ``tokenizer_dir``: copy its ``tokenizer.json`` (and tokenizer/special-token configs) along.
    ``tokenizer``: ``"bytes"`` (recorded in `TOKENIZER_MARKER`) or a tokenizer.json file, copied
    as ``tokenizer.json`` (with the configs beside it). Returns ``path``."""
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
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        _write_text(os.path.join(path, INDEX_FILE), json.dumps(index, indent=2))
    _write_text(os.path.join(path, CONFIG_NAME), json.dumps(hf, indent=2))
    if tokenizer is not None:
        _export_tokenizer(tokenizer, path)
    elif tokenizer_dir is not None:
        for fname in TOKENIZER_FILES:
            src = os.path.join(os.fspath(tokenizer_dir), fname)
            if os.path.isfile(src):
                copy_file_atomic(src, os.path.join(path, fname))
    return path


def _write_text(path: str, text: str) -> None:
    write_atomic(path, lambda f: f.write(text.encode("utf-8")))


def _export_tokenizer(tokenizer: str, path: str) -> None:
    """Record `tokenizer` ("bytes" or a tokenizer.json file) in the export `path`; a tokenizer
    file of the other kind left by an earlier export is removed."""
    if tokenizer in BYTES_SPECS:
        _write_text(os.path.join(path, TOKENIZER_MARKER), json.dumps({"kind": "bytes"}) + "\n")
        stale = TOKENIZER_FILES
    else:
        copy_file_atomic(tokenizer, os.path.join(path, "tokenizer.json"))
        for fname in TOKENIZER_FILES[1:]:
            src = os.path.join(os.path.dirname(os.path.abspath(tokenizer)), fname)
            if os.path.isfile(src):
                copy_file_atomic(src, os.path.join(path, fname))
        stale = (TOKENIZER_MARKER,)
    for fname in stale:
        if os.path.lexists(os.path.join(path, fname)):
            os.remove(os.path.join(path, fname))
