"""Configuration dataclasses: derived fields, push-downs, JSON round trip, validation messages."""

import ast
import copy
import dataclasses
import functools
import inspect
import json
import math
import os
import pathlib
import re
import subprocess
import sys
import types
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import equinox as eqx
import hypothesis
import hypothesis.strategies as st
import jax.numpy as jnp
import pytest
import yaml
from beartype import BeartypeConf
from beartype.door import is_bearable

import xlstm_eqx
import xlstm_eqx.interop
import xlstm_eqx.models
import xlstm_eqx.parallel
from xlstm_eqx import PRESETS, get_preset
from xlstm_eqx.cell import MLSTM_BACKENDS, mLSTMBackendNameAndKwargs
from xlstm_eqx.cell.backend_config import BackendName
from xlstm_eqx.core import ParallelConfig
from xlstm_eqx.core.config import (
    NON_EMPTY,
    NON_NEGATIVE,
    POSITIVE,
    POSITIVE_OR_UNSET,
    RATE,
    ActFn,
    Config,
    DType,
    configclass,
    field,
)
from xlstm_eqx.llama import LlamaConfig
from xlstm_eqx.models import ModelConfig
from xlstm_eqx.nn import ACTIVATIONS, FeedForwardConfig
from xlstm_eqx.training import TrainConfig
from xlstm_eqx.xlstm import (
    mLSTMBlockConfig,
    mLSTMCellConfig,
    mLSTMLayerConfig,
    sLSTMBlockConfig,
    sLSTMCellConfig,
    sLSTMLayerConfig,
    xLSTMBlockConfig,
    xLSTMBlockStackConfig,
    xLSTMLMModelConfig,
)


def _json_round_trip(cfg):
    return type(cfg).from_dict(json.loads(json.dumps(cfg.to_dict())))


def _lm(**kw):
    """A small LM config; keyword arguments override the model-level fields."""
    base = dict(
        vocab_size=64,
        embedding_dim=32,
        num_blocks=2,
        mlstm_block=mLSTMBlockConfig(mlstm=mLSTMLayerConfig(num_heads=4)),
    )
    base.update(kw)
    return xLSTMLMModelConfig(**base)


# --------------------------------------------------------------------------------------------------
# derived fields


@pytest.mark.parametrize(
    "factor,dim,round_up,multiple,expected",
    [
        (2.0, 768, True, 64, 1536),
        (2.667, 768, True, 64, 2112),  # 2048.26 -> 33 * 64
        (2.667, 4096, True, 64, 10944),  # 10924.03 -> 171 * 64
        (1.3, 768, True, 64, 1024),  # 998.4 -> 16 * 64
        (2.667, 2048, True, 64, 5504),
        (2.667, 2560, True, 64, 6848),
        (2.667, 768, False, 64, 2048),  # floor
        (1.3, 768, True, 128, 1024),  # 7.8 -> 8 * 128
        (1.3, 768, False, 128, 896),
    ],
)
def test_proj_up_dim_rounding(factor, dim, round_up, multiple, expected):
    ffn = FeedForwardConfig(
        proj_factor=factor,
        embedding_dim=dim,
        round_proj_up_dim_up=round_up,
        round_proj_up_to_multiple_of=multiple,
    )
    assert ffn._proj_up_dim == expected
    layer = mLSTMLayerConfig(
        proj_factor=factor,
        embedding_dim=dim,
        round_proj_up_dim_up=round_up,
        round_proj_up_to_multiple_of=multiple,
        num_heads=1,
        qkv_proj_blocksize=1,
    )
    assert layer._proj_up_dim == expected
    assert layer._inner_embedding_dim == expected
    assert layer.mlstm_cell.embedding_dim == expected


def test_unset_embedding_dim_leaves_derived_fields_unset():
    layer = mLSTMLayerConfig()
    assert layer.embedding_dim == -1 and layer._proj_up_dim is None
    assert layer._inner_embedding_dim is None
    assert FeedForwardConfig()._proj_up_dim is None


def test_mlstm_dims_165m_and_v1():
    cfg = PRESETS["mLSTM165M"]()
    layer = cfg.mlstm_block.mlstm
    assert (layer._inner_embedding_dim, layer.qk_dim, layer.v_dim) == (1536, 1536, 1536)
    assert layer.mlstm_cell.embedding_dim == 1536 and layer.mlstm_cell.num_heads == 4
    assert cfg.mlstm_block.feedforward is None
    v1 = PRESETS["mLSTMv1_7B"]()
    layer = v1.mlstm_block.mlstm
    # v1: q/k dim = int(0.5 * 4096), v dim = 4096; 8 heads -> DHQK 256, DHV 512
    assert (layer.qk_dim // layer.num_heads, layer.v_dim // layer.num_heads) == (256, 512)
    assert v1.mlstm_block.feedforward._proj_up_dim == 10944


@pytest.mark.parametrize(
    "dim,multiplier,multiple_of,expected",
    [(768, 1.0, 64, 2048), (2048, 1.0, 64, 5504), (4096, 1.0, 64, 10944), (768, 1.3, 64, 2688)],
)
def test_llama_derived(dim, multiplier, multiple_of, expected):
    cfg = LlamaConfig(
        vocab_size=10,
        embedding_dim=dim,
        num_blocks=1,
        ffn_dim_multiplier=multiplier,
        ffn_multiple_of=multiple_of,
    )
    assert cfg.ffn_hidden_dim == expected
    assert cfg.num_heads == dim // 128
    assert cfg.parallel == ParallelConfig()


def test_slstm_head_dim_and_hidden_size():
    layer = sLSTMLayerConfig(embedding_dim=48, num_heads=3)
    assert layer.hidden_size == 48 and layer.head_dim == 16
    assert sLSTMLayerConfig(embedding_dim=48, function="lstm").num_states == 2


# --------------------------------------------------------------------------------------------------
# push-downs


def test_stack_pushes_into_mlstm_layer_and_cell():
    cfg = xLSTMLMModelConfig(
        vocab_size=64,
        embedding_dim=64,
        num_blocks=3,
        context_length=128,
        bias=True,
        dropout=0.1,
        dtype="float32",
        norm_type="rmsnorm",
        parallel=ParallelConfig(data_axis_size=2),
        mlstm_block=mLSTMBlockConfig(
            mlstm=mLSTMLayerConfig(
                num_heads=2,
                norm_type="layernorm",
                mlstm_cell=mLSTMCellConfig(norm_type="layernorm", norm_eps=1e-5),
            ),
            feedforward=FeedForwardConfig(proj_factor=1.3),
        ),
    )
    layer = cfg.mlstm_block.mlstm
    assert layer.embedding_dim == 64 and layer.bias is True and layer.dropout == 0.1
    assert layer.context_length == 128 and layer.dtype == "float32"
    assert layer.norm_type == "rmsnorm"  # the model norm_type overwrites the layer's...
    assert layer._num_blocks == 3 and layer.parallel == ParallelConfig(data_axis_size=2)
    cell = layer.mlstm_cell
    assert cell.norm_type == "rmsnorm"  # ...and the cell's (reference behaviour)
    assert cell.norm_eps == 1e-5 and cell.norm_type_v1 == "layernorm"
    assert (cell.context_length, cell.embedding_dim, cell.num_heads) == (128, 128, 2)
    assert cell.dtype == "float32"
    ffn = cfg.mlstm_block.feedforward
    assert ffn.embedding_dim == 64 and ffn._proj_up_dim == 128 and ffn._num_blocks == 3
    assert ffn.dtype == "float32" and ffn.dropout == 0.0  # dtype pushed, dropout not


def test_block_configs_are_per_block_deep_copies():
    cfg = xLSTMLMModelConfig(
        vocab_size=64,
        embedding_dim=32,
        num_blocks=4,
        dtype="float32",
        norm_type="rmsnorm",
        norm_eps=1e-5,
        slstm_at=[1, 3],
        mlstm_block=mLSTMBlockConfig(
            mlstm=mLSTMLayerConfig(num_heads=4, mlstm_cell=mLSTMCellConfig(norm_eps=1e-4)),
            feedforward=FeedForwardConfig(),
            add_post_norm=True,
        ),
        slstm_block=sLSTMBlockConfig(slstm=sLSTMLayerConfig(num_heads=2)),
    )
    assert cfg.block_map == [0, 1, 0, 1] and cfg._block_map == "0,1,0,1"
    blocks = cfg.block_configs()
    assert [b._block_idx for b in blocks] == [0, 1, 2, 3]
    assert all(isinstance(b, xLSTMBlockConfig) and b._num_blocks == 4 for b in blocks)
    m0, s1, m2 = blocks[0], blocks[1], blocks[2]
    assert m0.mlstm is not None and m0.slstm is None and s1.slstm is not None and s1.mlstm is None
    assert m0.norm_eps == 1e-4 and m0.norm_type == "rmsnorm" and m0.dtype == "float32"
    assert m0.add_post_norm is True and m0.mlstm._block_idx == 0 and m2.mlstm._block_idx == 2
    assert m0.feedforward._proj_up_dim == 64 and m0.feedforward._num_blocks == 4
    # sLSTM blocks: layer gets the block index (forget-bias init), model norms, the default FFN
    assert s1.slstm._block_idx == 1 and s1.slstm._num_blocks == 4
    assert s1.slstm.embedding_dim == 32 and s1.slstm.hidden_size == 32 and s1.slstm.head_dim == 16
    assert s1.slstm.dtype == "float32" and s1.norm_type == "rmsnorm" and s1.norm_eps == 1e-5
    assert s1.feedforward.act_fn == "gelu" and s1.feedforward._proj_up_dim == 64
    assert blocks[3].slstm._block_idx == 3
    # deep copies: editing one block's config touches neither the others nor the template
    m0.mlstm.mlstm_cell.norm_eps = 0.5
    assert m2.mlstm.mlstm_cell.norm_eps == 1e-4
    assert cfg.mlstm_block.mlstm.mlstm_cell.norm_eps == 1e-4
    assert cfg.block_config(0) == cfg.block_configs()[0]
    with pytest.raises(ValueError, match="block index"):
        cfg.block_config(4)


def test_slstm_pushes_dropout_and_sizes():
    cfg = xLSTMBlockStackConfig(
        embedding_dim=24, num_blocks=2, dropout=0.2, slstm_block=sLSTMBlockConfig()
    )
    assert cfg.slstm_at == [0, 1] and cfg.block_map == [1, 1]  # mlstm_block None -> "all"
    layer = cfg.slstm_block.slstm
    assert (layer.dropout, layer.embedding_dim, layer._num_blocks) == (0.2, 24, 2)
    assert cfg.slstm_block.feedforward.embedding_dim == 24
    assert xLSTMBlockStackConfig(
        embedding_dim=24, num_blocks=3, slstm_at="all", mlstm_block=mLSTMBlockConfig(),
        slstm_block=sLSTMBlockConfig(),
    ).block_map == [1, 1, 1]  # fmt: skip


def test_callers_objects_are_not_mutated_and_replace_is_safe():
    block = mLSTMBlockConfig(mlstm=mLSTMLayerConfig(num_heads=4))
    before = copy.deepcopy(block)
    cfg = _lm(mlstm_block=block, embedding_dim=64)
    assert block == before and block.mlstm.embedding_dim == -1
    cfg2 = dataclasses.replace(cfg, embedding_dim=128)
    assert cfg2.mlstm_block.mlstm.embedding_dim == 128
    assert cfg.mlstm_block.mlstm.embedding_dim == 64
    assert cfg2.mlstm_block.mlstm._inner_embedding_dim == 256


def test_block_config_pushes_into_layer_and_ffn():
    blk = xLSTMBlockConfig(
        mlstm=mLSTMLayerConfig(embedding_dim=32, num_heads=4),
        feedforward=FeedForwardConfig(proj_factor=2.0),
        dtype="float16",
        norm_type="rmsnorm",
        _num_blocks=5,
        _block_idx=2,
    )
    assert blk.mlstm._num_blocks == 5 and blk.mlstm._block_idx == 2
    assert blk.mlstm.norm_type == "rmsnorm" and blk.mlstm.mlstm_cell.norm_type == "rmsnorm"
    assert blk.feedforward.embedding_dim == 32 and blk.feedforward._proj_up_dim == 64
    assert blk.feedforward.dtype == "float16" and blk.feedforward._num_blocks == 5


def test_dtype_properties():
    cfg = _lm(dtype="bfloat16", lm_head_dtype="float16")
    assert cfg._dtype == jnp.bfloat16 and cfg._lm_head_dtype == jnp.float16
    assert cfg.mlstm_block.mlstm.mlstm_cell._gate_dtype == jnp.float32


# --------------------------------------------------------------------------------------------------
# backend names


@pytest.mark.parametrize(
    "backend,name,kwargs",
    [
        ("parallel_stabilized", "parallel_stabilized", {}),
        ("chunkwise", "chunkwise", {"chunk_size": 64}),
        ("recurrent", "recurrent", {}),
        (mLSTMBackendNameAndKwargs("chunkwise", {"chunk_size": 16}), "chunkwise", {"chunk_size": 16}),
        ({"name": "recurrent", "kwargs": {"eps": 1e-5}}, "recurrent", {"eps": 1e-5}),
        (
            mLSTMBackendNameAndKwargs(
                "triton_kernels", {"backend_name": "chunkwise--triton_xl_chunk", "autocast_dtype": None}
            ),
            "auto",
            {"chunk_size": 64},
        ),
        (mLSTMBackendNameAndKwargs("triton_kernels", {"chunk_size": 128}), "auto", {"chunk_size": 128}),
        ("auto", "auto", {"chunk_size": 64}),
        (mLSTMBackendNameAndKwargs("fwbw_stabilized", {"keep_G": True}), "chunkwise", {"chunk_size": 512}),
        ("recurrent_triton", "recurrent", {}),
        (mLSTMBackendNameAndKwargs("recurrent", {"use_scan": True, "context_length": 9}), "recurrent", {}),
        (mLSTMBackendNameAndKwargs("parallel_stabilized", {"context_length": 9}), "parallel_stabilized", {}),
    ],
)  # fmt: skip
def test_backend_forms(backend, name, kwargs):
    cell = mLSTMCellConfig(backend=backend)
    assert cell.backend == mLSTMBackendNameAndKwargs(name=name, kwargs=kwargs)
    assert _json_round_trip(cell) == cell


def test_backend_default_is_parallel():
    assert mLSTMCellConfig().backend.name == "parallel_stabilized"


# --------------------------------------------------------------------------------------------------
# JSON round trip, equality, hashing


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip(name):
    cfg = PRESETS[name]()
    again = _json_round_trip(cfg)
    assert again == cfg and hash(again) == hash(cfg)
    assert again.to_dict() == cfg.to_dict()


def test_preset_values():
    v1 = get_preset("mLSTMv1_165M")
    assert (v1.embedding_dim, v1.num_blocks, v1.vocab_size, v1.context_length) == (
        768,
        12,
        50304,
        2048,
    )
    layer = v1.mlstm_block.mlstm
    assert layer.layer_type == "mlstm_v1" and layer.num_heads == 4 and layer.qk_dim_factor == 0.5
    cell = layer.mlstm_cell
    assert cell.igate_bias_init_range == -10.0 and cell.gate_soft_cap == 15.0
    assert cell.fgate_bias_init_range == (3.0, 6.0) and cell.norm_type_v1 == "layernorm"
    assert v1.logits_soft_cap == 30.0 and v1.lm_head_dtype == "bfloat16" and v1.scan_blocks
    m = get_preset("mLSTM120M")
    assert m.scan_blocks is False and m.mlstm_block.mlstm.mlstm_cell.igate_bias_init_range == 0.0
    assert get_preset("mLSTM1_3B") == get_preset("mLSTM1.3B")
    ll = get_preset("llama165M")
    assert (ll.num_heads, ll.ffn_hidden_dim, ll.theta, ll.dtype) == (6, 2048, 10000.0, "bfloat16")
    with pytest.raises(ValueError, match="known presets"):
        get_preset("mLSTM9B")


_dims = st.sampled_from([16, 32, 48, 64])
_BACKENDS = [
    "parallel_stabilized",
    "recurrent",
    mLSTMBackendNameAndKwargs("chunkwise", {"chunk_size": 8}),
    mLSTMBackendNameAndKwargs("triton_kernels", {"backend_name": "x"}),
]
_PARALLELS = [None, ParallelConfig(remat=["mLSTMBlock"])]
_FFNS = [None, FeedForwardConfig(act_fn="swish")]


@st.composite
def _lm_configs(draw):
    """A builder of a random LM config. Configs are built outside the strategy (the test calls
    the builder; the sampled ones above at import): under the jaxtyping import hook their
    constructors are beartype-checked, and beartype samples list and dict items with `random`,
    which Hypothesis forbids inside a strategy."""
    num_blocks = draw(st.integers(1, 4))
    D = draw(_dims)
    slstm_at = draw(st.lists(st.integers(0, num_blocks - 1), unique=True, max_size=num_blocks))
    backend = draw(st.sampled_from(_BACKENDS))
    bias_range = draw(st.sampled_from([None, 0.0, -10.0, (3.0, 6.0), (-1.5, 2.5)]))
    layer_type = draw(st.sampled_from(["mlstm", "mlstm_v1"]))
    return functools.partial(
        _lm_config,
        vocab_size=draw(st.integers(1, 1000)),
        embedding_dim=D,
        num_blocks=num_blocks,
        context_length=draw(st.sampled_from([-1, 16, 2048])),
        dtype=draw(st.sampled_from(["float32", "bfloat16", "float16"])),
        norm_type=draw(st.sampled_from(["layernorm", "rmsnorm"])),
        logits_soft_cap=draw(st.sampled_from([None, 30.0])),
        slstm_at=slstm_at,
        parallel=draw(st.sampled_from(_PARALLELS)),
        layer_type=layer_type,
        num_heads=draw(st.sampled_from([1, 2, 4])),
        backend=backend,
        bias_range=bias_range,
        feedforward=draw(st.sampled_from(_FFNS)),
    )


def _lm_config(*, layer_type, num_heads, backend, bias_range, feedforward, slstm_at, **kw):
    return xLSTMLMModelConfig(
        slstm_at=slstm_at,
        mlstm_block=mLSTMBlockConfig(
            mlstm=mLSTMLayerConfig(
                layer_type=layer_type,
                num_heads=num_heads,
                mlstm_cell=mLSTMCellConfig(backend=backend, igate_bias_init_range=bias_range),
            ),
            feedforward=feedforward,
        ),
        slstm_block=sLSTMBlockConfig(slstm=sLSTMLayerConfig(num_heads=2)) if slstm_at else None,
        **kw,
    )


@hypothesis.given(build=_lm_configs())
def test_json_round_trip_hypothesis(build):
    cfg = build()
    again = _json_round_trip(cfg)
    assert again == cfg
    assert hash(again) == hash(cfg)
    assert again.block_configs() == cfg.block_configs()


def test_round_trip_other_configs():
    for cfg in (
        ParallelConfig(
            fsdp_axis_size=2, data_axis_size=-1, remat=["a"], fsdp_gather_dtype="bfloat16"
        ),
        sLSTMLayerConfig(embedding_dim=16, bias_init="small_init", forward_clipval=3.0),
        xLSTMBlockConfig(slstm=sLSTMLayerConfig(embedding_dim=16), feedforward=FeedForwardConfig()),
        _lm().block_configs()[1],
        get_preset("tiny_xlstm_slstm"),
        get_preset("tiny_llama"),
    ):
        assert _json_round_trip(cfg) == cfg


def test_from_dict_rejects_unknown_keys():
    d = _lm().to_dict()
    d["mlstm_block"]["mlstm"]["num_head"] = 4
    with pytest.raises(ValueError, match="num_head"):
        xLSTMLMModelConfig.from_dict(d)


def test_configs_are_hashable_static_fields():
    """A module holding a config as a static field works under eqx.filter_jit (needs a hash)."""

    class Holder(eqx.Module):
        w: jnp.ndarray
        config: xLSTMLMModelConfig = eqx.field(static=True)

    cfg = _lm()
    f = eqx.filter_jit(lambda h: h.w * h.config.embedding_dim)
    assert float(f(Holder(jnp.ones(()), cfg))) == 32.0
    assert float(f(Holder(jnp.ones(()), _json_round_trip(cfg)))) == 32.0
    assert len({cfg, _json_round_trip(cfg), _lm(embedding_dim=64)}) == 2


# --------------------------------------------------------------------------------------------------
# validation: one case per rule, checking the message names the field (and the allowed values)


def _ml(**layer_kw):
    return mLSTMBlockConfig(mlstm=mLSTMLayerConfig(**layer_kw))


def _cell(**cell_kw):
    return _ml(num_heads=4, mlstm_cell=mLSTMCellConfig(**cell_kw))


INVALID = {
    # divisibility
    "num_heads_qk_dim": (lambda: _lm(mlstm_block=_ml(num_heads=5)), r"mlstm_block\.mlstm\.num_heads.*q/k dim"),
    "num_heads_v_dim": (
        lambda: _lm(mlstm_block=_ml(layer_type="mlstm_v1", num_heads=4, qk_dim_factor=0.25, v_dim_factor=0.3125)),
        r"mlstm_block\.mlstm\.num_heads.*v dim=10",
    ),
    "num_heads_v1_qk": (
        lambda: _lm(mlstm_block=_ml(layer_type="mlstm_v1", num_heads=3)),
        r"mlstm_block\.mlstm\.num_heads.*q/k dim=32",
    ),
    "blocksize_inner_dim": (
        lambda: _lm(mlstm_block=_ml(num_heads=4, qkv_proj_blocksize=5)),
        r"mlstm_block\.mlstm\.qkv_proj_blocksize.*inner dim=64",
    ),
    "qk_dim_headwise_blocks": (
        lambda: _lm(mlstm_block=_ml(num_heads=1, qk_dim_factor=0.3)),
        r"mlstm_block\.mlstm\.qk_dim_factor",
    ),
    "llama_head_dim": (lambda: LlamaConfig(vocab_size=8, embedding_dim=96, num_blocks=1, head_dim=64), r"head_dim.*embedding_dim=96"),
    "llama_head_dim_odd": (lambda: LlamaConfig(vocab_size=8, embedding_dim=9, num_blocks=1, head_dim=3), r"head_dim.*even"),
    "slstm_num_heads": (
        lambda: _lm(slstm_at=[0], slstm_block=sLSTMBlockConfig(slstm=sLSTMLayerConfig(num_heads=3))),
        r"slstm_block\.slstm\.num_heads.*hidden_size=32",
    ),
    "slstm_cell_num_heads": (lambda: sLSTMCellConfig(hidden_size=10, num_heads=4), r"num_heads.*hidden_size=10"),
    # unknown names
    "norm_type": (lambda: _lm(norm_type="batchnorm"), r"'norm_type'.*'layernorm', 'rmsnorm'"),
    "layer_norm_type": (lambda: _ml(norm_type="groupnorm"), r"mLSTMLayerConfig: invalid field 'norm_type'.*layernorm"),
    "cell_norm_type_v1": (lambda: _lm(mlstm_block=_cell(norm_type_v1="x")), r"mLSTMCellConfig: invalid field 'norm_type_v1'.*rmsnorm"),
    "block_norm_type": (lambda: xLSTMBlockConfig(mlstm=mLSTMLayerConfig(), norm_type="x"), r"xLSTMBlockConfig: invalid field 'norm_type'"),
    "layer_type": (lambda: _lm(mlstm_block=_ml(layer_type="mamba")), r"'layer_type'.*'mlstm_v1'"),
    "gate_input": (lambda: _ml(gate_input="q"), r"'gate_input'.*x_mlstm_conv_act"),
    "backend_name": (lambda: _lm(mlstm_block=_cell(backend="flash")), r"mLSTMCellConfig: invalid field 'backend'.*chunkwise"),
    "backend_attention": (lambda: mLSTMCellConfig(backend="attention"), r"'backend'.*parallel_stabilized"),
    "backend_config_name": (lambda: mLSTMBackendNameAndKwargs("attention"), r"mLSTMBackendNameAndKwargs: invalid field 'name'.*chunkwise"),
    "backend_kwargs": (lambda: mLSTMCellConfig(backend=mLSTMBackendNameAndKwargs("chunkwise", {"chunk": 8})), r"'kwargs'.*chunk_size"),
    "backend_ref_kwargs": (lambda: mLSTMCellConfig(backend=mLSTMBackendNameAndKwargs("triton_kernels", {"blah": 1})), r"'kwargs'.*blah"),
    "act_fn": (lambda: _lm(mlstm_block=mLSTMBlockConfig(feedforward=FeedForwardConfig(act_fn="tanh"))), r"'act_fn'.*swish"),
    "ff_type": (lambda: FeedForwardConfig(ff_type="moe"), r"ff_type.*ffn_gated"),
    "init_distribution": (lambda: _ml(init_distribution="xavier"), r"'init_distribution'.*truncated_normal"),
    "ffn_init_distribution": (lambda: FeedForwardConfig(init_distribution="x"), r"init_distribution"),
    "init_distribution_embed": (lambda: _lm(init_distribution_embed="x"), r"init_distribution_embed.*uniform"),
    "init_distribution_out": (lambda: _lm(init_distribution_out="x"), r"init_distribution_out"),
    "output_init_fn": (lambda: _ml(output_init_fn="kaiming"), r"output_init_fn.*wang2"),
    "ffn_output_init_fn": (lambda: FeedForwardConfig(output_init_fn="x"), r"output_init_fn"),
    "dtype": (lambda: _lm(dtype="float64"), r"'dtype'.*'float32', 'bfloat16', 'float16'"),
    "lm_head_dtype": (lambda: _lm(lm_head_dtype="int8"), r"lm_head_dtype"),
    "gate_dtype": (lambda: _lm(mlstm_block=_cell(gate_dtype="fp32")), r"'gate_dtype'"),
    "ffn_dtype": (lambda: FeedForwardConfig(dtype="half"), r"dtype"),
    "llama_dtype": (lambda: LlamaConfig(vocab_size=8, embedding_dim=128, num_blocks=1, dtype="f32"), r"'dtype'"),
    "slstm_dtype": (lambda: sLSTMLayerConfig(dtype="x"), r"dtype"),
    "fsdp_gather_dtype": (lambda: ParallelConfig(fsdp_gather_dtype="fp8"), r"fsdp_gather_dtype"),
    "fsdp_grad_scatter_dtype": (lambda: ParallelConfig(fsdp_grad_scatter_dtype="x"), r"fsdp_grad_scatter_dtype"),
    "attention_backend": (lambda: LlamaConfig(vocab_size=8, embedding_dim=128, num_blocks=1, attention_backend="flash"), r"attention_backend.*pallas_triton"),
    "slstm_backend": (lambda: sLSTMLayerConfig(backend="triton"), r"backend.*vanilla"),
    "slstm_function": (lambda: sLSTMLayerConfig(function="gru"), r"function.*lstm"),
    "slstm_bias_init": (lambda: sLSTMLayerConfig(bias_init="ones"), r"bias_init.*powerlaw_blockdependent"),
    "slstm_recurrent_init": (lambda: sLSTMLayerConfig(recurrent_weight_init="ortho"), r"recurrent_weight_init"),
    "slstm_clipval": (lambda: sLSTMLayerConfig(gradient_recurrent_clipval=1.0), r"gradient_recurrent_clipval"),
    "slstm_block_idx": (lambda: sLSTMCellConfig(_block_idx=2, _num_blocks=2), r"_block_idx"),
    # slstm_at / block placement
    "slstm_at_range": (lambda: _lm(slstm_at=[2], slstm_block=sLSTMBlockConfig()), r"slstm_at.*\[0, num_blocks=2\)"),
    "slstm_at_negative": (lambda: _lm(slstm_at=[-1], slstm_block=sLSTMBlockConfig()), r"slstm_at"),
    "slstm_at_duplicates": (lambda: _lm(slstm_at=[1, 1], slstm_block=sLSTMBlockConfig()), r"slstm_at.*repeat"),
    "slstm_at_type": (lambda: _lm(slstm_at=["1"], slstm_block=sLSTMBlockConfig()), r"slstm_at"),
    "slstm_block_missing": (lambda: _lm(slstm_at=[0]), r"slstm_block.*must be set"),
    "no_blocks_at_all": (lambda: xLSTMBlockStackConfig(), r"slstm_block.*mlstm_block is None"),
    "scan_with_slstm": (lambda: _lm(scan_blocks=True, slstm_at=[1], slstm_block=sLSTMBlockConfig()), r"scan_blocks.*sLSTM"),
    "block_both_layers": (lambda: xLSTMBlockConfig(mlstm=mLSTMLayerConfig(), slstm=sLSTMLayerConfig()), r"exactly one of 'mlstm' and 'slstm'"),
    "block_no_layer": (lambda: xLSTMBlockConfig(), r"exactly one"),
    # sizes
    "vocab_size_zero": (lambda: _lm(vocab_size=0), r"vocab_size.*positive"),
    "vocab_size_negative": (lambda: _lm(vocab_size=-3), r"vocab_size"),
    "vocab_size_unset_for_model": (lambda: _lm(vocab_size=-1).validate(), r"vocab_size.*before a model is built"),
    "embedding_dim": (lambda: _lm(embedding_dim=0), r"'embedding_dim'.*positive"),
    "num_blocks": (lambda: _lm(num_blocks=0), r"num_blocks.*positive"),
    "context_length": (lambda: _lm(context_length=0), r"context_length.*-1"),
    "context_length_neg": (lambda: _lm(context_length=-2), r"context_length"),
    "num_heads_zero": (lambda: _ml(num_heads=0), r"'num_heads'.*positive"),
    "chunk_size": (lambda: _lm(mlstm_block=_cell(backend=mLSTMBackendNameAndKwargs("chunkwise", {"chunk_size": 0}))), r"'kwargs\.chunk_size'"),
    "conv_kernel": (lambda: _ml(conv1d_kernel_size=-1), r"conv1d_kernel_size"),
    "blocksize_zero": (lambda: _ml(qkv_proj_blocksize=0), r"qkv_proj_blocksize"),
    "proj_factor": (lambda: _ml(proj_factor=0.0), r"proj_factor"),
    "proj_factor_rounds_to_zero": (lambda: _lm(mlstm_block=_ml(proj_factor=0.5, round_proj_up_dim_up=False)), r"proj_factor.*positive"),
    "ffn_proj_factor": (lambda: FeedForwardConfig(proj_factor=-1.0), r"proj_factor"),
    "round_multiple": (lambda: FeedForwardConfig(round_proj_up_to_multiple_of=0), r"round_proj_up_to_multiple_of"),
    "slstm_num_heads_zero": (lambda: sLSTMLayerConfig(num_heads=0), r"num_heads"),
    "slstm_conv": (lambda: sLSTMLayerConfig(conv1d_kernel_size=-2), r"conv1d_kernel_size"),
    "llama_vocab": (lambda: LlamaConfig(vocab_size=0, embedding_dim=128, num_blocks=1), r"vocab_size"),
    "llama_blocks": (lambda: LlamaConfig(vocab_size=8, embedding_dim=128, num_blocks=0), r"num_blocks"),
    "llama_head_dim_zero": (lambda: LlamaConfig(vocab_size=8, embedding_dim=128, num_blocks=1, head_dim=0), r"head_dim"),
    "llama_ffn_multiple_of": (lambda: LlamaConfig(vocab_size=8, embedding_dim=128, num_blocks=1, ffn_multiple_of=0), r"ffn_multiple_of"),
    "llama_theta": (lambda: LlamaConfig(vocab_size=8, embedding_dim=128, num_blocks=1, theta=0.0), r"theta"),
    # rates, caps, misc values
    "dropout": (lambda: _lm(dropout=1.0), r"'dropout'.*\[0, 1\)"),
    "ffn_dropout": (lambda: FeedForwardConfig(dropout=-0.1), r"dropout"),
    "llama_dropout": (lambda: LlamaConfig(vocab_size=8, embedding_dim=128, num_blocks=1, dropout_rate=2.0), r"dropout_rate"),
    "logits_soft_cap": (lambda: _lm(logits_soft_cap=0.0), r"logits_soft_cap"),
    "gate_soft_cap": (lambda: mLSTMCellConfig(gate_soft_cap=-15.0), r"gate_soft_cap"),
    "norm_eps": (lambda: _lm(norm_eps=0.0), r"norm_eps"),
    "bias_init_range": (lambda: mLSTMCellConfig(igate_bias_init_range=(1.0, 2.0, 3.0)), r"igate_bias_init_range"),
    "bool_field": (lambda: _lm(tie_weights="yes"), r"tie_weights.*bool"),
    # parallel
    "axis_size_zero": (lambda: ParallelConfig(fsdp_axis_size=0), r"fsdp_axis_size.*-1"),
    "axis_size_negative": (lambda: ParallelConfig(model_axis_size=-2), r"model_axis_size"),
    "two_fill_axes": (lambda: ParallelConfig(data_axis_size=-1, fsdp_axis_size=-1), r"fsdp_axis_size.*at most one"),
    "axis_names": (lambda: ParallelConfig(fsdp_axis_name="dp"), r"fsdp_axis_name"),
    "tp_dense_gates": (
        lambda: _lm(parallel=ParallelConfig(model_axis_size=2)),
        r"mlstm_block\.mlstm\.mlstm_cell\.gate_linear_headwise",
    ),
    "tp_num_heads": (
        lambda: _lm(parallel=ParallelConfig(model_axis_size=8), mlstm_block=_cell(gate_linear_headwise=True)),
        r"parallel\.model_axis_size.*num_heads=4",
    ),
    "llama_tp": (lambda: LlamaConfig(vocab_size=8, embedding_dim=128, num_blocks=1, parallel=ParallelConfig(model_axis_size=2)), r"parallel\.model_axis_size.*tensor"),
}  # fmt: skip


@pytest.mark.parametrize("rule", sorted(INVALID))
def test_invalid_config_names_field(rule):
    build, pattern = INVALID[rule]
    with pytest.raises(ValueError, match=pattern):
        build()


def test_nested_errors_carry_the_dotted_path():
    """Children validate themselves when built; a parent re-validates them under their path (here a
    child edited after construction)."""
    parallel = ParallelConfig()
    parallel.pipeline_axis_size = 0
    with pytest.raises(ValueError, match=r"xLSTMLMModelConfig: invalid field 'parallel\.pipeline"):
        _lm(parallel=parallel)
    block = _ml(num_heads=4)
    block.mlstm.mlstm_cell.gate_soft_cap = -1.0
    with pytest.raises(ValueError, match=r"'mlstm_block\.mlstm\.mlstm_cell\.gate_soft_cap'"):
        _lm(mlstm_block=block)
    slstm = sLSTMBlockConfig()
    slstm.feedforward.act_fn = "tanh"
    with pytest.raises(ValueError, match=r"'slstm_block\.feedforward\.act_fn'.*gelu"):
        _lm(slstm_at=[0], slstm_block=slstm)


def test_valid_edge_values_pass():
    """The reference defaults that mean "unset" are accepted where the reference accepts them."""
    cfg = xLSTMLMModelConfig(mlstm_block=mLSTMBlockConfig())  # vocab -1, context -1
    assert cfg.vocab_size == -1 and cfg.context_length == -1
    _lm().validate()
    mLSTMLayerConfig()
    sLSTMLayerConfig()
    FeedForwardConfig()
    ParallelConfig(data_axis_size=4, fsdp_axis_size=-1)
    _lm(parallel=ParallelConfig(model_axis_size=2), mlstm_block=_cell(gate_linear_headwise=True))


# --------------------------------------------------------------------------------------------------
# the annotation-driven checker, and the import hook


CONFIG_CLASSES = (
    ParallelConfig,
    mLSTMBackendNameAndKwargs,
    FeedForwardConfig,
    mLSTMCellConfig,
    mLSTMLayerConfig,
    mLSTMBlockConfig,
    sLSTMCellConfig,
    sLSTMLayerConfig,
    sLSTMBlockConfig,
    xLSTMBlockConfig,
    xLSTMBlockStackConfig,
    xLSTMLMModelConfig,
    LlamaConfig,
)
ALL_CONFIG_CLASSES = (*CONFIG_CLASSES, TrainConfig)
"""With `TrainConfig`, whose errors name the command-line flag (`_error_start`)."""
_REQUIRED = {LlamaConfig: dict(vocab_size=8, embedding_dim=128, num_blocks=1)}
PACKAGE_DIR = pathlib.Path(xlstm_eqx.__file__).parent


def _package_config_classes():
    todo, out = [Config], []
    while todo:
        for sub in todo.pop().__subclasses__():
            todo.append(sub)
            if sub.__module__.startswith("xlstm_eqx."):
                out.append(sub)
    return out


def test_every_config_class_is_covered():
    assert set(_package_config_classes()) == set(ALL_CONFIG_CLASSES)


def _error_start(cls, name):
    """The start of the error for invalid field `name` of `cls`, as a regex."""
    if cls is TrainConfig:
        return rf"^--{name.replace('_', '-')} \(TrainConfig\.{name}\) "
    return rf"^{cls.__name__}: invalid field '{name}': "


@configclass
class _Kinds(Config):
    """One field of each annotation kind the checker knows."""

    choice: Literal["a", "b"] = "a"
    count: int = field(1, check=POSITIVE)
    size: int = field(-1, check=POSITIVE_OR_UNSET)
    offset: int = field(0, check=NON_NEGATIVE)
    rate: float = field(0.0, check=RATE)
    value: float = 0.0
    flag: bool = False
    name: str = field("x", check=NON_EMPTY)
    cap: float | None = field(None, check=POSITIVE)
    dtype: DType | None = None
    pair: tuple[float, float] = (0.0, 1.0)
    ints: tuple[int, ...] = ()
    names: list[str] = field(default_factory=list)
    table: dict[str, int] = field(default_factory=dict)
    either: list[int] | Literal["all"] = "all"
    child: ParallelConfig | None = None


_KIND_ERRORS = [
    ("choice", "c", r"must be one of \('a', 'b'\)"),
    ("choice", 1, r"must be one of \('a', 'b'\)"),
    ("count", True, r"must be a positive int"),  # a bool is not an int
    ("count", 2.0, r"must be a positive int"),
    ("count", 0, r"must be a positive int"),
    ("size", -2, r"must be a positive int, or -1 for unset"),
    ("size", 0, r"must be a positive int, or -1 for unset"),
    ("offset", -1, r"must be an int >= 0"),
    ("rate", 1.0, r"must be a finite number in \[0, 1\)"),
    ("rate", -0.5, r"must be a finite number in \[0, 1\)"),
    ("rate", "0", r"must be a finite number in \[0, 1\)"),
    ("value", math.nan, r"must be a finite number"),
    ("value", math.inf, r"must be a finite number"),
    ("value", False, r"must be a finite number"),
    ("flag", 1, r"must be a bool"),
    ("flag", None, r"must be a bool"),
    ("name", "", r"must be a non-empty string"),
    ("name", b"x", r"must be a non-empty string"),
    ("cap", 0.0, r"must be a positive finite number or None"),
    ("cap", -math.inf, r"must be a positive finite number or None"),
    ("dtype", "float64", r"must be one of \('float32', 'bfloat16', 'float16', None\)"),
    ("pair", (1.0,), r"must be a pair of finite numbers"),
    ("pair", (1.0, "2"), r"must be a pair of finite numbers"),
    ("pair", 1.0, r"must be a pair of finite numbers"),
    ("ints", (1, True), r"must be a tuple of ints"),
    ("names", ["a", 1], r"must be a list of strings"),
    ("names", "ab", r"must be a list of strings"),
    ("table", {"a": 1.5}, r"must be a dict with string keys and int values"),
    ("table", {1: 1}, r"must be a dict with string keys and int values"),
    ("either", "none", r"must be a list of ints or 'all'"),
    ("either", [1, "2"], r"must be a list of ints or 'all'"),
    ("child", FeedForwardConfig(), r"must be a ParallelConfig or None"),
]


@pytest.mark.parametrize("name,value,message", _KIND_ERRORS)
def test_checker_per_annotation_kind(name, value, message):
    with pytest.raises(ValueError, match=rf"^_Kinds: invalid field '{name}': {message}, got "):
        _Kinds(**{name: value})
    # the same check on a value set after construction, when a parent validates its child
    kinds = _Kinds()
    setattr(kinds, name, value)
    with pytest.raises(ValueError, match=rf"^_Kinds: invalid field 'kinds\.{name}': {message}"):
        kinds._validate("_Kinds", "kinds.")


def test_checker_accepts_and_normalises():
    k = _Kinds(
        choice="b",
        count=3,
        size=-1,
        rate=0,
        value=-2,
        cap=None,
        dtype="bfloat16",
        pair=[1, 2],
        ints=[1, 2],
        names=("a",),
        table={"a": 1},
        either=(0, 2),
        child=ParallelConfig(),
    )
    assert (k.rate, k.value, k.pair, k.ints, k.names, k.either) == (
        0.0,
        -2.0,
        (1.0, 2.0),
        (1, 2),
        ["a"],
        [0, 2],
    )
    assert (
        type(k.rate) is float and type(k.value) is float and all(type(x) is float for x in k.pair)
    )
    assert type(k.count) is int and all(type(x) is int for x in k.ints)


def test_nested_config_errors_carry_the_dotted_path():
    parallel = ParallelConfig()
    parallel.fsdp_axis_size = 0
    with pytest.raises(
        ValueError,
        match=r"^_Kinds: invalid field 'child\.fsdp_axis_size': must be a positive int or -1",
    ):
        _Kinds(child=parallel)
    cfg = _lm()
    cfg.mlstm_block.mlstm.mlstm_cell.backend.kwargs = {"eps": -1.0}
    with pytest.raises(
        ValueError,
        match=r"'mlstm_block\.mlstm\.mlstm_cell\.backend\.kwargs\.eps': must be a finite number >= 0",
    ):
        cfg.validate()


def test_package_configs_normalise_json_forms():
    """An int for a float field is stored as a float, a list for a tuple field as a tuple, a tuple
    for a list field as a list (JSON and YAML have only lists; the reference passes tuples)."""
    ffn = FeedForwardConfig(proj_factor=2, dropout=0)
    assert (ffn.proj_factor, ffn.dropout) == (2.0, 0.0) and type(ffn.proj_factor) is float
    cell = mLSTMCellConfig(igate_bias_init_range=[-1, 2], fgate_bias_init_range=3)
    assert cell.igate_bias_init_range == (-1.0, 2.0) and cell.fgate_bias_init_range == 3.0
    assert type(cell.fgate_bias_init_range) is float
    assert ParallelConfig(remat=("mLSTMBlock",)).remat == ["mLSTMBlock"]
    assert _lm(slstm_at=(1,), slstm_block=sLSTMBlockConfig()).slstm_at == [1]
    assert (
        type(LlamaConfig(vocab_size=8, embedding_dim=128, num_blocks=1, theta=500000).theta)
        is float
    )
    assert type(mLSTMLayerConfig(num_heads=2).num_heads) is int


_WRONG_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 3),
    st.floats(),
    st.text(max_size=4),
    st.binary(max_size=2),
    st.lists(st.integers(-2, 2) | st.text(max_size=2), max_size=3),
    st.tuples(st.integers(-2, 2)) | st.tuples(st.floats(), st.text(max_size=2)),
    st.dictionaries(st.integers(0, 2) | st.text(max_size=2), st.integers(0, 2), max_size=2),
    st.sampled_from([object(), 1j, frozenset({1}), ParallelConfig(), FeedForwardConfig()]),
)


def _admitted(value, hint):
    """Whether a runtime type checker admits `value` for `hint`, counting an int as a float
    (PEP 484), a list or tuple in either form and a dict for a config class (the constructor
    converts those; a dict it cannot parse is `from_dict`'s error)."""
    alts = get_args(hint) if get_origin(hint) in (Union, types.UnionType) else (hint,)
    if isinstance(value, dict) and any(isinstance(a, type) and issubclass(a, Config) for a in alts):
        return True
    forms = [value, list(value), tuple(value)] if isinstance(value, (list, tuple)) else [value]
    return any(is_bearable(v, hint, conf=BeartypeConf(is_pep484_tower=True)) for v in forms)


@pytest.mark.parametrize("cls", ALL_CONFIG_CLASSES, ids=lambda c: c.__name__)
@hypothesis.settings(
    max_examples=40, suppress_health_check=[hypothesis.HealthCheck.filter_too_much]
)
@hypothesis.given(data=st.data())
def test_wrong_typed_value_names_the_field(cls, data):
    """A value of a type the annotation does not admit raises the ValueError naming the field —
    under the import hook too, whose beartype check of `__init__` would otherwise come first."""
    hints = get_type_hints(cls)
    name = data.draw(st.sampled_from([f.name for f in dataclasses.fields(cls)]), label="field")
    value = data.draw(_WRONG_VALUES, label="value")
    hypothesis.assume(not _admitted(value, hints[name]))
    pattern = _error_start(cls, name) + "must be .*, got "
    with pytest.raises(ValueError, match=pattern):
        cls(**{**_REQUIRED.get(cls, {}), name: value})


@pytest.mark.parametrize("cls", ALL_CONFIG_CLASSES, ids=lambda c: c.__name__)
def test_bools_are_not_numbers_and_numbers_are_finite(cls):
    """What a runtime type checker lets through but the configs refuse."""
    checked = 0
    for name, hint in get_type_hints(cls).items():
        if name not in {f.name for f in dataclasses.fields(cls)}:
            continue
        alts = get_args(hint) if get_origin(hint) in (Union, types.UnionType) else (hint,)
        bad = [True] if int in alts or float in alts else []
        bad += [math.nan, math.inf] if float in alts else []
        for value in bad:
            with pytest.raises(ValueError, match=_error_start(cls, name)):
                cls(**{**_REQUIRED.get(cls, {}), name: value})
            checked += 1
    assert checked > 0 or cls is mLSTMBackendNameAndKwargs


def test_config_docs_sit_at_the_fields():
    """Every config field has its own docstring right below it."""
    for path in PACKAGE_DIR.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ClassDef) or node.name not in {
                c.__name__ for c in CONFIG_CLASSES
            }:
                continue
            for st_, nxt in zip(node.body, node.body[1:] + [None], strict=True):
                if isinstance(st_, ast.AnnAssign) and not ast.unparse(st_.annotation).startswith(
                    "ClassVar"
                ):
                    doc = isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    assert doc and isinstance(nxt.value.value, str), f"{node.name}.{st_.target.id}"


def test_literal_choices_match_the_registries():
    assert set(get_args(ActFn)) == set(ACTIVATIONS)
    assert get_args(BackendName) == tuple(MLSTM_BACKENDS)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_yaml_round_trip(name):
    cfg = PRESETS[name]()
    again = type(cfg).from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict())))
    assert again == cfg and hash(again) == hash(cfg)


def test_no_type_check_anywhere():
    for path in PACKAGE_DIR.rglob("*.py"):
        tree = ast.parse(path.read_text())
        names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
        names |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
        names |= {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
        assert "no_type_check" not in names, path
    for cls in _package_config_classes():
        members = [cls, *(m for m in vars(cls).values() if callable(m))]
        assert not any(getattr(m, "__no_type_check__", False) for m in members), cls


def test_import_hook_checks_the_configs(request):
    """Under the jaxtyping import hook (the normal test run) every config's `__init__` is wrapped
    in a beartype check of its arguments that runs before the body; the ValueError still comes
    first because the arguments are checked before `__init__` is called."""
    if not request.config.getoption("jaxtyping_packages"):
        pytest.skip("tests run without the jaxtyping import hook")
    for cls in ALL_CONFIG_CLASSES:
        assert cls.__init__.__globals__["__name__"] == "jaxtyping._decorator", cls
    raw = object.__new__(FeedForwardConfig)
    with pytest.raises(TypeError, match="act_fn"):  # the hook's own error, had it come first
        FeedForwardConfig.__init__(raw, act_fn="tanh")
    with pytest.raises(ValueError, match=r"^FeedForwardConfig: invalid field 'act_fn'"):
        FeedForwardConfig(act_fn="tanh")


_CASES = [
    "FeedForwardConfig(proj_factor='x')",
    "FeedForwardConfig(act_fn='tanh')",
    "mLSTMCellConfig(backend='flash')",
    "mLSTMCellConfig(igate_bias_init_range=(1.0, 2.0, 3.0))",
    "mLSTMBlockConfig(mlstm=3)",
    "mLSTMBackendNameAndKwargs('chunkwise', {'chunk_size': 8.0})",
    "xLSTMLMModelConfig(tie_weights='yes', mlstm_block=mLSTMBlockConfig())",
    "xLSTMBlockConfig(mlstm=mLSTMLayerConfig(), norm_type=1)",
    "xLSTMBlockStackConfig(slstm_at=[0.5], slstm_block=sLSTMBlockConfig())",
    "ParallelConfig(remat='abc')",
    "sLSTMLayerConfig(gradient_recurrent_clipval=1.0)",
    "sLSTMCellConfig(num_gates=3)",
    "LlamaConfig(vocab_size=True, embedding_dim=128, num_blocks=1)",
    "LlamaConfig(vocab_size=8, embedding_dim=128, num_blocks=1, parallel=[])",
    "mLSTMLayerConfig(proj_factor=float('nan'))",
]

_NO_HOOK_SCRIPT = """
import json, sys
from xlstm_eqx import *
from xlstm_eqx.presets import PRESETS
out = {"hooked": "jaxtyping" in mLSTMLayerConfig.__init__.__globals__["__name__"], "errors": []}
for case in json.loads(sys.argv[1]):
    try:
        eval(case)
        out["errors"].append(None)
    except Exception as e:
        out["errors"].append([type(e).__name__, str(e)])
for fn in PRESETS.values():
    cfg = fn()
    assert type(cfg).from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    getattr(cfg, "block_configs", list)()
print(json.dumps(out))
"""


@pytest.mark.slow
def test_same_valueerror_with_and_without_the_import_hook():
    namespace = {k: getattr(xlstm_eqx, k) for k in dir(xlstm_eqx) if not k.startswith("_")}
    here = []
    for case in _CASES:
        with pytest.raises(Exception) as info:
            eval(case, namespace)
        here.append([type(info.value).__name__, str(info.value)])
    root = str(PACKAGE_DIR.parent)
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    run = subprocess.run(
        [sys.executable, "-c", _NO_HOOK_SCRIPT, json.dumps(_CASES)],
        capture_output=True, text=True, env=env, cwd=root, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    there = json.loads(run.stdout.splitlines()[-1])
    assert there["hooked"] is False
    assert there["errors"] == here
    for (kind, message), case in zip(here, _CASES, strict=True):
        assert kind == "ValueError" and re.match(r"^\w+: invalid field '[\w.]+': ", message), case


def _is_config_hint(hint):
    alts = get_args(hint) if get_origin(hint) in (Union, types.UnionType) else (hint,)
    alts = [a for a in alts if a is not type(None)]
    return bool(alts) and all(
        a is ModelConfig or (isinstance(a, type) and issubclass(a, Config)) for a in alts
    )


def test_no_public_constructor_or_function_takes_an_untyped_config():
    modules = (
        xlstm_eqx,
        xlstm_eqx.nn,
        xlstm_eqx.cell,
        xlstm_eqx.xlstm,
        xlstm_eqx.llama,
        xlstm_eqx.models,
        xlstm_eqx.parallel,
        xlstm_eqx.interop,
    )
    seen = set()
    for module in modules:
        for name, obj in vars(module).items():
            if name.startswith("_"):
                continue
            if inspect.isclass(obj) and not issubclass(obj, Config) and "__init__" in vars(obj):
                fn = obj.__init__
            elif inspect.isfunction(obj):
                fn = obj
            else:
                continue
            hints = get_type_hints(fn)
            for param in inspect.signature(fn).parameters:
                if param in ("config", "cfg") or param.endswith("_config"):
                    where = f"{module.__name__}.{name}({param})"
                    assert _is_config_hint(hints.get(param, Any)), (where, hints.get(param))
                    seen.add(where)
    modules_taking_config = {w.split("(")[0].rsplit(".", 1)[1] for w in seen}
    assert {"mLSTMLayer", "mLSTMLayerV1", "mLSTMCell", "sLSTMLayer", "xLSTMBlock", "xLSTMBlockStack",
            "xLSTMLMModel", "FeedForward", "LlamaTransformer", "build_model", "memory_report",
            "init_sharded", "from_xlstm_jax"} <= modules_taking_config  # fmt: skip


def test_train_config_literal_fields_name_the_flag_and_the_choices():
    """`TrainConfig`'s enumerated fields are `Literal`s checked by the base, like every config's."""
    with pytest.raises(ValueError) as info:
        TrainConfig(optimizer="sgd")
    assert str(info.value) == (
        "--optimizer (TrainConfig.optimizer) must be one of ('adamw', 'lion', 'adafactor', 'ademamix'), "
        "got 'sgd'"
    )
    with pytest.raises(ValueError, match=r"^--schedule \(TrainConfig\.schedule\) must be one of"):
        TrainConfig.from_dict({"schedule": "step"})
    assert TrainConfig.from_dict(TrainConfig(dtype="bfloat16").to_dict()).dtype == "bfloat16"
