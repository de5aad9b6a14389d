"""Sharding: the mesh, the partition rules, sharded init / train step / checkpoints, multi-process.

Multi-device checks run in subprocesses (``tests/parallel/sharding_worker.py``) with 8 simulated CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``), so this process keeps one device. They are
started together, once per session, by the ``results`` fixture; each test reads its numbers.
Expected partition specs are written out by hand below from the rules in docs/architecture.md,
"Partition rules".
"""

import ast
import dataclasses
import json
import math
import pathlib
import subprocess
import time

import equinox as eqx
import jax
import jax.extend
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from tests.corpus import write_corpus
from tests.multiprocess import collect, free_port, once_per_session, start_worker, worker_result
from xlstm_eqx import get_preset
from xlstm_eqx.core import ParallelConfig
from xlstm_eqx.llama import LlamaTransformer
from xlstm_eqx.parallel import (
    axis_sizes,
    count_all_gathers,
    gather_at_use,
    initialize_distributed,
    make_mesh,
    memory_report,
    opt_state_specs,
    param_partition_specs,
    parse_mesh_spec,
)
from xlstm_eqx.presets import tiny_llama, tiny_xlstm, tiny_xlstm_slstm
from xlstm_eqx.xlstm import xLSTMLMModel


MESHES = ("dp=8", "fsdp=8", "tp=2,dp=4", "fsdp=4,tp=2")
MODELS = ("xlstm_v1", "xlstm_mixed", "llama")


# ----------------------------------------------------------------------------------------------
# the workers


def _start(args: list[str], devices: int, cwd: pathlib.Path) -> subprocess.Popen:
    return start_worker("tests.parallel.sharding_worker", args, devices, cwd)


def _run_workers(tmp: pathlib.Path) -> dict:
    data = write_corpus(tmp)
    port = free_port()
    t0 = time.perf_counter()
    procs = {
        "equiv_a": _start(["equiv", "xlstm_v1", "llama"], 8, tmp),
        "equiv_b": _start(["equiv", "xlstm_mixed"], 8, tmp),
        "train": _start(["train", data, str(tmp / "runs"), "dp=2,fsdp=2,tp=2"], 8, tmp),
        "dist0": _start(["dist", data, "0", "2", str(port)], 2, tmp),
        "dist1": _start(["dist", data, "1", "2", str(port)], 2, tmp),
    }
    out = {name: collect(name, p, timeout=900) for name, p in procs.items()}
    out["seconds"] = time.perf_counter() - t0
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Run every worker once per session, concurrently: equivalence on 8 devices (two processes),
    the trainer's loop on a mesh with checkpoints across meshes, and the two-process run."""
    return once_per_session(tmp_path_factory, "sharding", _run_workers)


def _equiv(results, model):
    part = "equiv_b" if model == "xlstm_mixed" else "equiv_a"
    return worker_result(results[part])[model]


def _norm(spec: str | P) -> tuple:
    """A spec as a tuple without trailing Nones (P(None, 'tp', None) == P(None, 'tp'))."""
    t = list(ast.literal_eval(spec) if isinstance(spec, str) else tuple(spec))
    while t and t[-1] is None:
        t.pop()
    return tuple(t)


# ----------------------------------------------------------------------------------------------
# the mesh


def test_parse_mesh_spec():
    pc = parse_mesh_spec("dp=2,fsdp=2,tp=2")
    assert (pc.data_axis_size, pc.fsdp_axis_size, pc.pipeline_axis_size) == (2, 2, 1)
    assert pc.model_axis_size == 2
    pc = parse_mesh_spec("fsdp=8")  # the data axis fills the rest
    assert (pc.data_axis_size, pc.fsdp_axis_size, pc.model_axis_size) == (-1, 8, 1)
    pc = parse_mesh_spec(" tp=2 , fsdp=-1 ")  # another axis fills: data is 1
    assert (pc.data_axis_size, pc.fsdp_axis_size, pc.model_axis_size) == (1, -1, 2)
    base = ParallelConfig(fsdp_modules=["Embed"], remat=["mLSTMBlock"], model_axis_name="mp")
    pc = parse_mesh_spec("mp=4,data=2", base)
    assert (pc.data_axis_size, pc.model_axis_size) == (2, 4)
    assert pc.fsdp_modules == ["Embed"] and pc.remat == ["mLSTMBlock"]


@pytest.mark.parametrize(
    "spec,match",
    [
        ("dp=2,xx=2", "'xx=2'"),
        ("dp=2,dp=4", "axis 'dp' is given twice"),
        ("tp=two", "size of axis 'tp' must be an int"),
        ("tp=0", "size of axis 'tp' must be positive or -1"),
        ("", "non-empty"),
        ("dp=-1,tp=-1", "at most one axis size may be -1"),
    ],
)
def test_parse_mesh_spec_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_mesh_spec(spec)


def test_axis_sizes_infer_and_errors():
    assert axis_sizes(parse_mesh_spec("fsdp=4,tp=2"), 16) == {"dp": 2, "fsdp": 4, "pp": 1, "tp": 2}
    assert axis_sizes(parse_mesh_spec("dp=2,fsdp=2,tp=2"), 8)["dp"] == 2
    with pytest.raises(
        ValueError, match=r"dp=2, fsdp=2, pp=1, tp=2 multiply to 8, but there are 4"
    ):
        axis_sizes(parse_mesh_spec("dp=2,fsdp=2,tp=2"), 4)
    with pytest.raises(
        ValueError, match=r"multiply to 3, which does not divide the device count 8"
    ):
        axis_sizes(parse_mesh_spec("tp=3"), 8)
    # This process has one device.
    with pytest.raises(ValueError, match=r"multiply to 2, but there are 1 devices"):
        make_mesh(parse_mesh_spec("dp=2"))
    mesh = make_mesh(parse_mesh_spec("fsdp=-1"))
    assert mesh.axis_names == ("dp", "fsdp", "pp", "tp") and mesh.devices.shape == (1, 1, 1, 1)


# ----------------------------------------------------------------------------------------------
# the partition rules, on shape skeletons (no devices needed)

XLSTM_FSDP = ParallelConfig(
    fsdp_modules=["Embed", "LMHead", "mLSTMBlock"], fsdp_min_weight_size=128
)
LLAMA_FSDP = ParallelConfig(
    fsdp_modules=["Embed", "LMHead", "TransformerBlock"], fsdp_min_weight_size=128
)

# tiny_xlstm (2 scanned mlstm_v1 blocks, D=32, 4 heads, FFN 128, vocab 64) on fsdp=4 x tp=2:
# tp splits output features of up-projections / input features of down-projections, the
# residual norms and heads; FSDP takes the largest free divisible axis of weights with more
# than 128 elements per tp shard inside Embed / LMHead / mLSTMBlock; the scan axis is never split.
V1_FSDP4_TP2 = {
    ".token_embedding.embedding": ("fsdp", "tp"),
    ".xlstm_block_stack.blocks.xlstm_res_block.norm.scale": (None, "tp"),
    ".xlstm_block_stack.blocks.xlstm_res_block.layer.dense_q.kernel": (None, "fsdp", "tp"),
    ".xlstm_block_stack.blocks.xlstm_res_block.layer.dense_k.kernel": (None, "fsdp", "tp"),
    ".xlstm_block_stack.blocks.xlstm_res_block.layer.dense_v.kernel": (None, "fsdp", "tp"),
    ".xlstm_block_stack.blocks.xlstm_res_block.layer.dense_o.kernel": (None, "fsdp", "tp"),
    ".xlstm_block_stack.blocks.xlstm_res_block.layer.cell.igate.kernel": (None, None, "tp"),
    ".xlstm_block_stack.blocks.xlstm_res_block.layer.cell.igate.bias": (None, "tp"),
    ".xlstm_block_stack.blocks.xlstm_res_block.layer.cell.fgate.kernel": (None, None, "tp"),
    ".xlstm_block_stack.blocks.xlstm_res_block.layer.cell.fgate.bias": (None, "tp"),
    ".xlstm_block_stack.blocks.xlstm_res_block.layer.cell.outnorm.scale": (None, "tp"),
    ".xlstm_block_stack.blocks.xlstm_res_block.layer.proj_down.kernel": (None, "tp", "fsdp"),
    ".xlstm_block_stack.blocks.ffn_res_block.norm.scale": (None, "tp"),
    ".xlstm_block_stack.blocks.ffn_res_block.layer.proj_up.kernel": (None, "fsdp", "tp"),
    ".xlstm_block_stack.blocks.ffn_res_block.layer.proj_up_gate.kernel": (None, "fsdp", "tp"),
    ".xlstm_block_stack.blocks.ffn_res_block.layer.proj_down.kernel": (None, "tp", "fsdp"),
    ".out_norm.scale": (),
    ".lm_head.kernel": ("fsdp", "tp"),
}
# fsdp=8 alone: no tp; FSDP as above (largest divisible free axis).
V1_FSDP8 = {
    ".token_embedding.embedding": ("fsdp",),
    ".xlstm_block_stack.blocks.xlstm_res_block.norm.scale": (),
    ".xlstm_block_stack.blocks.xlstm_res_block.layer.dense_q.kernel": (None, "fsdp"),
    ".xlstm_block_stack.blocks.xlstm_res_block.layer.dense_k.kernel": (None, "fsdp"),
    ".xlstm_block_stack.blocks.xlstm_res_block.layer.dense_v.kernel": (None, None, "fsdp"),
    ".xlstm_block_stack.blocks.xlstm_res_block.layer.dense_o.kernel": (None, None, "fsdp"),
    ".xlstm_block_stack.blocks.xlstm_res_block.layer.cell.igate.kernel": (),
    ".xlstm_block_stack.blocks.xlstm_res_block.layer.cell.igate.bias": (),
    ".xlstm_block_stack.blocks.xlstm_res_block.layer.cell.fgate.kernel": (),
    ".xlstm_block_stack.blocks.xlstm_res_block.layer.cell.fgate.bias": (),
    ".xlstm_block_stack.blocks.xlstm_res_block.layer.cell.outnorm.scale": (),
    ".xlstm_block_stack.blocks.xlstm_res_block.layer.proj_down.kernel": (None, None, "fsdp"),
    ".xlstm_block_stack.blocks.ffn_res_block.norm.scale": (),
    ".xlstm_block_stack.blocks.ffn_res_block.layer.proj_up.kernel": (None, None, "fsdp"),
    ".xlstm_block_stack.blocks.ffn_res_block.layer.proj_up_gate.kernel": (None, None, "fsdp"),
    ".xlstm_block_stack.blocks.ffn_res_block.layer.proj_down.kernel": (None, "fsdp"),
    ".out_norm.scale": (),
    ".lm_head.kernel": (None, "fsdp"),
}
# tiny_llama (2 scanned blocks, D=32, 4 heads of 8, FFN 128): Megatron-style tp.
LLAMA_FSDP4_TP2 = {
    ".token_embedding.embedding": ("fsdp", "tp"),
    ".blocks.blocks.attn.pre_norm.scale": (),
    ".blocks.blocks.attn.dense_q.kernel": (None, "fsdp", "tp"),
    ".blocks.blocks.attn.dense_k.kernel": (None, "fsdp", "tp"),
    ".blocks.blocks.attn.dense_v.kernel": (None, "fsdp", "tp"),
    ".blocks.blocks.attn.dense_out.kernel": (None, "tp", None, "fsdp"),
    ".blocks.blocks.ffn.pre_norm.scale": (),
    ".blocks.blocks.ffn.proj_up.kernel": (None, "fsdp", "tp"),
    ".blocks.blocks.ffn.proj_up_gate.kernel": (None, "fsdp", "tp"),
    ".blocks.blocks.ffn.proj_down.kernel": (None, "tp", "fsdp"),
    ".out_norm.scale": (),
    ".lm_head.kernel": ("fsdp", "tp"),
}
# The 2-block "mlstm" + sLSTM model (unscanned): a selection.
MIXED_FSDP4_TP2 = {
    ".xlstm_block_stack.blocks[0].xlstm_res_block.layer.proj_up_mlstm.kernel": ("fsdp", "tp"),
    ".xlstm_block_stack.blocks[0].xlstm_res_block.layer.inner_layer.conv1d.kernel": (None, "tp"),
    ".xlstm_block_stack.blocks[0].xlstm_res_block.layer.inner_layer.q_proj.kernel": ("tp",),
    ".xlstm_block_stack.blocks[0].xlstm_res_block.layer.inner_layer.mlstm_cell.igate.kernel": (
        "fsdp",
        "tp",
    ),
    ".xlstm_block_stack.blocks[0].xlstm_res_block.layer.inner_layer.mlstm_cell.outnorm.scale": (
        "tp",
    ),
    ".xlstm_block_stack.blocks[0].xlstm_res_block.layer.inner_layer.learnable_skip": ("tp",),
    ".xlstm_block_stack.blocks[0].xlstm_res_block.layer.proj_down.kernel": ("tp", "fsdp"),
    ".xlstm_block_stack.blocks[1].xlstm_res_block.layer.igate.kernel": ("tp",),
    ".xlstm_block_stack.blocks[1].xlstm_res_block.layer.cell.recurrent_kernel": (
        "tp",
        None,
        None,
        "fsdp",
    ),
    ".xlstm_block_stack.blocks[1].xlstm_res_block.layer.cell.bias": ("tp",),
    ".xlstm_block_stack.blocks[1].xlstm_res_block.layer.group_norm_weight": ("tp",),
    ".xlstm_block_stack.blocks[1].ffn_res_block.layer.proj_down.kernel": ("tp", "fsdp"),
}


def _mixed():
    return dataclasses.replace(tiny_xlstm_slstm(), num_blocks=2, slstm_at=[1])


def _skeleton(name):
    cfg, cls, base = {
        "xlstm_v1": (tiny_xlstm, xLSTMLMModel, XLSTM_FSDP),
        "xlstm_mixed": (_mixed, xLSTMLMModel, XLSTM_FSDP),
        "llama": (tiny_llama, LlamaTransformer, LLAMA_FSDP),
    }[name]
    return eqx.filter_eval_shape(cls, cfg(), key=jr.key(0)), base


def _spec_table(skeleton, pc, num_devices=8):
    specs = param_partition_specs(skeleton, pc, num_devices=num_devices)
    flat = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda s: isinstance(s, P))[0]
    return {jax.tree_util.keystr(p): _norm(s) for p, s in flat}


@pytest.mark.parametrize(
    "name,mesh,expected",
    [
        ("xlstm_v1", "fsdp=4,tp=2", V1_FSDP4_TP2),
        ("xlstm_v1", "fsdp=8", V1_FSDP8),
        ("llama", "fsdp=4,tp=2", LLAMA_FSDP4_TP2),
        ("xlstm_mixed", "fsdp=4,tp=2", MIXED_FSDP4_TP2),
    ],
)
def test_partition_rules(name, mesh, expected):
    skeleton, base = _skeleton(name)
    table = _spec_table(skeleton, parse_mesh_spec(mesh, base))
    for path, spec in expected.items():
        assert table[path] == spec, (path, table[path], spec)
    if name != "xlstm_mixed":
        assert set(table) == set(expected)


def test_partition_rules_data_parallel_and_tp_only():
    skeleton, base = _skeleton("xlstm_v1")
    assert set(_spec_table(skeleton, parse_mesh_spec("dp=8", base)).values()) == {()}
    tp_only = _spec_table(skeleton, parse_mesh_spec("tp=2,dp=4", base))
    # tp alone: the same as fsdp=4 x tp=2 with the fsdp entries left out.
    assert tp_only == {
        k: _norm(tuple(None if a == "fsdp" else a for a in v)) for k, v in V1_FSDP4_TP2.items()
    }
    # FSDP only inside the named modules: without "mLSTMBlock" the blocks stay replicated.
    only_head = dataclasses.replace(base, fsdp_modules=["LMHead"])
    table = _spec_table(skeleton, parse_mesh_spec("fsdp=8", only_head))
    assert table[".lm_head.kernel"] == (None, "fsdp")
    assert table[".token_embedding.embedding"] == ()
    assert all(v == () for k, v in table.items() if "blocks" in k)


def test_partition_rules_7b_preset():
    """The reference's 7B layout (fsdp=8 on Embed, LMHead, mLSTMBlock; min size 2^18) plus tp=2."""
    cfg = get_preset("mLSTMv1_7B")
    skeleton = eqx.filter_eval_shape(xLSTMLMModel, cfg, key=jr.key(0))
    pc = dataclasses.replace(cfg.parallel, model_axis_size=2)  # dp=-1, fsdp=8, tp=2
    table = _spec_table(skeleton, pc, num_devices=64)
    blk = ".xlstm_block_stack.blocks."
    # (50304, 4096): tp on D; FSDP on the vocabulary (largest free axis divisible by 8).
    assert table[".token_embedding.embedding"] == ("fsdp", "tp")
    # (L, 4096, 2048): column-parallel q; FSDP on the remaining D axis; layer axis untouched.
    assert table[blk + "xlstm_res_block.layer.dense_q.kernel"] == (None, "fsdp", "tp")
    # (L, 4096, 4096) row-parallel down projection.
    assert table[blk + "xlstm_res_block.layer.proj_down.kernel"] == (None, "tp", "fsdp")
    # gates (L, 4096, 8): 32768 elements <= 2^18: tp only.
    assert table[blk + "xlstm_res_block.layer.cell.igate.kernel"] == (None, None, "tp")
    # (4096, 50304) head: tp on the largest axis (the vocabulary), FSDP on D.
    assert table[".lm_head.kernel"] == ("fsdp", "tp")
    assert table[".out_norm.scale"] == ()


def test_unknown_module_name_is_named():
    skeleton, base = _skeleton("llama")
    bad = dataclasses.replace(base, fsdp_modules=["Embed", "mLSTMBlok"])
    with pytest.raises(ValueError, match=r"fsdp_modules: unknown module name 'mLSTMBlok'"):
        param_partition_specs(skeleton, parse_mesh_spec("fsdp=8", bad), num_devices=8)


def test_opt_state_specs_follow_params():
    skeleton, base = _skeleton("llama")
    pc = parse_mesh_spec("fsdp=4,tp=2", base)
    specs = param_partition_specs(skeleton, pc, num_devices=8)
    params = eqx.filter(skeleton, lambda x: isinstance(x, jax.ShapeDtypeStruct))
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    with jax.numpy_dtype_promotion("standard"):
        state = jax.eval_shape(opt.init, params)
    ospecs = opt_state_specs(state, params, specs)
    adam = ospecs[1][0]
    is_p = lambda s: isinstance(s, P)  # noqa: E731
    assert jax.tree.leaves(adam.mu, is_leaf=is_p) == jax.tree.leaves(specs, is_leaf=is_p)
    assert jax.tree.leaves(adam.nu, is_leaf=is_p) == jax.tree.leaves(specs, is_leaf=is_p)
    assert adam.count == P()


def test_gather_at_use_is_a_noop_without_fsdp():
    skeleton, base = _skeleton("llama")
    pc = parse_mesh_spec("dp=1", base)
    mesh = make_mesh(pc)
    specs = param_partition_specs(skeleton, pc)
    assert gather_at_use(skeleton, specs, mesh, pc) is skeleton


def test_count_all_gathers_parses_hlo():
    hlo = (
        "  %all-gather.5 = f32[32,16]{1,0} all-gather(%x), channel_id=2, dimensions={1}\n"
        "  %ag = (bf16[2,8]{1,0}, u32[]) all-gather-start(%y), dimensions={0}\n"
        "  %d = f32[4]{0} add(%a, %b)\n"
    )
    assert count_all_gathers(hlo) == [("f32", (32, 16)), ("bf16", (2, 8))]


# ----------------------------------------------------------------------------------------------
# memory report (shape skeletons only)


def test_memory_report_7b():
    cfg = get_preset("mLSTMv1_7B")
    n = 6_865_424_896  # the closed-form count in the xlstm_eqx/presets.py docstring
    dp = memory_report(cfg, parse_mesh_spec("dp=8", cfg.parallel))
    assert dp.num_params == n
    assert dp.param_bytes == dp.param_bytes_per_device == 4 * n  # replicated float32
    # AdamW: two float32 moments per parameter plus an int32 step count.
    assert dp.opt_bytes == 8 * n + 4
    fsdp = memory_report(cfg, parse_mesh_spec("fsdp=8", cfg.parallel))
    # Everything above 2^18 elements has an axis divisible by 8, and those weights are >99.9%
    # of the model: per device a bit more than 1/8.
    assert 4 * n / 8 < fsdp.param_bytes_per_device < 1.01 * 4 * n / 8
    assert 8 * n / 8 < fsdp.opt_bytes_per_device < 1.01 * 8 * n / 8
    tp8 = memory_report(cfg, parse_mesh_spec("tp=8", cfg.parallel))
    assert tp8.mesh == {"dp": 1, "fsdp": 1, "pp": 1, "tp": 8}
    assert 4 * n / 8 < tp8.param_bytes_per_device < 1.01 * 4 * n / 8
    assert "per device" in str(tp8)


def test_memory_report_by_hand():
    """min size 0, fsdp=8 on everything: each array with an axis divisible by 8 is split 8 ways."""
    cfg = tiny_llama()
    pc = ParallelConfig(
        fsdp_axis_size=8,
        data_axis_size=1,
        fsdp_modules=["Embed", "LMHead", "BlockStack"],
        fsdp_min_weight_size=0,
    )
    rep = memory_report(cfg, pc)
    skeleton = eqx.filter_eval_shape(LlamaTransformer, cfg, key=jr.key(0))
    expected = 0
    for x in jax.tree.leaves(skeleton):
        # stacked block weights carry a leading layer axis, which is never split
        per_layer = x.shape[1:] if x.shape[0] == cfg.num_blocks else x.shape
        split = any(d % 8 == 0 for d in per_layer)
        expected += math.prod(x.shape) * 4 // (8 if split else 1)
    assert rep.param_bytes_per_device == expected
    assert rep.param_bytes == 4 * sum(math.prod(x.shape) for x in jax.tree.leaves(skeleton))


# ----------------------------------------------------------------------------------------------
# remat (the models honour `parallel.remat`; the gradients do not change)


def _checkpoint_count(fn, *args) -> int:
    jaxpr = jax.make_jaxpr(fn)(*args)

    def count(jp) -> int:
        n = 0
        for eqn in jp.eqns:
            if eqn.primitive.name in ("checkpoint", "remat2", "remat"):
                n += 1
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                n += count(sub)
        return n

    return count(jaxpr.jaxpr)


@pytest.mark.parametrize(
    "family,names,expected",
    [
        ("llama", [], 0),
        ("llama", ["TransformerBlock"], 1),
        ("llama", ["AttnBlock", "FFNBlock"], 2),
        ("xlstm", [], 0),
        ("xlstm", ["xLSTMResBlock", "FFNResBlock"], 2),
    ],
)
def test_remat_follows_parallel_config(family, names, expected):
    from xlstm_eqx.training import next_token_loss

    if family == "llama":
        cfg = dataclasses.replace(tiny_llama(), parallel=ParallelConfig(remat=names))
        cls = LlamaTransformer
    else:
        cfg = dataclasses.replace(tiny_xlstm(), parallel=ParallelConfig(remat=names))
        cls = xLSTMLMModel
    model = eqx.filter_eval_shape(cls, cfg, key=jr.key(0))
    params, static = eqx.partition(model, lambda x: isinstance(x, jax.ShapeDtypeStruct))
    tokens = jax.ShapeDtypeStruct((2, 9), jnp.int32)

    def loss(p, t):
        return next_token_loss(eqx.combine(p, static), t)

    # One scanned block body: each named module is one checkpoint in the gradient's jaxpr.
    assert _checkpoint_count(jax.grad(loss), params, tokens) == expected


def test_remat_keeps_gradients():
    from xlstm_eqx.training import next_token_loss

    plain = tiny_llama()
    remat = dataclasses.replace(plain, parallel=ParallelConfig(remat=["AttnBlock", "FFNBlock"]))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 9)), jnp.int32)
    model = eqx.filter_jit(lambda k: LlamaTransformer(plain, key=k))(jr.key(0))
    # The same arrays under the remat config's static structure.
    skeleton = eqx.filter_eval_shape(LlamaTransformer, remat, key=jr.key(0))
    model_remat = jax.tree.unflatten(jax.tree.structure(skeleton), jax.tree.leaves(model))
    grad = eqx.filter_jit(eqx.filter_grad(next_token_loss))
    grads = [grad(model, tokens), grad(model_remat, tokens)]
    # (the two models differ in their static remat flags, so compare the leaves)
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------------------------
# multi-host entry point


def test_initialize_distributed_single_process_and_errors():
    assert initialize_distributed(environ={}) is False
    with pytest.raises(ValueError, match="needs a coordinator address"):
        initialize_distributed(num_processes=2, environ={})
    with pytest.raises(ValueError, match="also needs num_processes and process_id"):
        initialize_distributed(environ={"JAX_COORDINATOR_ADDRESS": "host:1234"})
    with pytest.raises(ValueError, match=r"process_id=2 must be in \[0, num_processes=2\)"):
        initialize_distributed("host:1234", 2, 2, environ={})


# ----------------------------------------------------------------------------------------------
# 8 simulated devices (subprocesses)


@pytest.mark.slow
@pytest.mark.parametrize("mesh", MESHES)
@pytest.mark.parametrize("model", MODELS)
def test_loss_and_grads_equal_single_device(results, model, mesh):
    r = _equiv(results, model)["meshes"][mesh]
    assert r["loss_rel"] <= 1e-5, r["loss_rel"]
    # every gradient leaf: ||g_mesh - g_1|| <= 1e-5 ||g_1||
    assert r["grad_norm_rel"] <= 1e-5, r["grad_norm_rel"]


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
def test_parameter_shardings_are_the_intended_ones(results, model):
    """Every array's ``.sharding.spec`` on the mesh (placed, gradients, after a train step) is
    what the rules give, and the main cases equal the hand-written tables."""
    res = _equiv(results, model)
    skeleton, base = _skeleton(model)
    for mesh, r in res["meshes"].items():
        want = _spec_table(skeleton, parse_mesh_spec(mesh, base))
        for key in ("param_specs", "grad_specs") + (("out_specs",) if "out_specs" in r else ()):
            got = {k: _norm(v) for k, v in r[key].items()}
            assert got == want, (mesh, key)
    hand = {"xlstm_v1": V1_FSDP4_TP2, "llama": LLAMA_FSDP4_TP2, "xlstm_mixed": MIXED_FSDP4_TP2}
    got = {k: _norm(v) for k, v in res["meshes"]["fsdp=4,tp=2"]["param_specs"].items()}
    assert {k: got[k] for k in hand[model]} == hand[model]
    if model == "xlstm_v1":
        got = {k: _norm(v) for k, v in res["meshes"]["fsdp=8"]["out_specs"].items()}
        assert got == V1_FSDP8


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
def test_born_sharded_init_equals_plain_init(results, model):
    res = _equiv(results, model)
    assert res["init_equal"] is True
    skeleton, base = _skeleton(model)
    want = _spec_table(skeleton, parse_mesh_spec("fsdp=4,tp=2", base))
    assert {k: _norm(v) for k, v in res["init_specs"].items()} == want


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
def test_fsdp_step_gathers_weights_per_layer(results, model):
    """The compiled fsdp=8 train step all-gathers weights one layer at a time (forward, and again
    in the backward pass): every all-gather has the shape of one layer's weight, none has the
    shape of a whole stacked (L, ...) weight, and no activation is gathered."""
    r = _equiv(results, model)["meshes"]["fsdp=8"]
    skeleton, base = _skeleton(model)
    specs = _spec_table(skeleton, parse_mesh_spec("fsdp=8", base))
    shapes = {k: tuple(v) for k, v in r["param_shapes"].items()}
    stacked = {k for k in shapes if ".blocks.blocks." in k or "xlstm_block_stack.blocks." in k}
    stacked = {k for k in stacked if "[" not in k}  # unscanned blocks are tuples: blocks[i]
    per_layer = {
        shapes[k][1:] if k in stacked else shapes[k] for k, s in specs.items() if "fsdp" in s
    }
    whole = {shapes[k] for k in stacked}
    gathers = [tuple(s) for _, s in r["all_gathers"]]
    assert gathers, "no all-gather at all: FSDP did not shard anything"
    assert not [g for g in gathers if g in whole and g not in per_layer]
    assert set(gathers) <= per_layer, set(gathers) - per_layer
    # Each sharded block weight is gathered; the matmul kernels twice (forward, and again for the
    # backward pass: the gathered copies are not kept in between).
    for k, s in specs.items():
        if "fsdp" not in s or ("blocks" not in k):
            continue
        shape = shapes[k][1:] if k in stacked else shapes[k]
        want = 1 if "conv1d" in k or not k.endswith("kernel") else 2
        assert gathers.count(shape) >= want, (k, shape)


@pytest.mark.slow
def test_trainer_loop_on_a_mesh_logs_the_same_losses(results):
    r = worker_result(results["train"])
    assert r["mesh_shape"] == {"dp": 2, "fsdp": 2, "pp": 1, "tp": 2}
    assert len(r["losses_mesh"]) == len(r["losses_single"]) == 3
    np.testing.assert_allclose(r["losses_mesh"], r["losses_single"], rtol=1e-5)
    np.testing.assert_allclose(r["grad_norms_mesh"], r["grad_norms_single"], rtol=1e-5)
    np.testing.assert_allclose(r["eval_mesh"], r["eval_single"], rtol=1e-5)
    assert r["final_params_rel"][0] <= 1e-5
    # The layout is the intended one before and after the steps.
    assert r["mesh_after_step_specs"] == r["mesh_model_specs"]
    assert _norm(r["mesh_model_specs"][".token_embedding.embedding"]) == (None, "tp")


@pytest.mark.slow
def test_checkpoints_restore_across_meshes(results):
    """Saved from fsdp=8, restored onto tp=2 x dp=4 and onto one device: the same arrays, in each
    mesh's own layout."""
    r = worker_result(results["train"])
    assert r["roundtrip_equal"] == {
        "fsdp8": True,
        "tp2dp4": True,
        "single": True,
        "opt_tp2dp4": True,
    }
    assert _norm(r["fsdp8_specs"][".token_embedding.embedding"]) == ("fsdp",)
    assert _norm(r["tp_specs"][".token_embedding.embedding"]) == (None, "tp")
    assert {_norm(s) for s in r["tp_opt_specs"]} == {(), (None, "tp"), (None, None, "tp")}
    assert r["plain_devices"] == ["cpu:0"] or len(r["plain_devices"]) == 1
    assert r["ckpt_meta_step"] == 7


@pytest.mark.slow
def test_fsdp_gathers_in_the_gather_dtype(results):
    """With fsdp_gather_dtype="bfloat16" the FSDP weights reach the model rounded to bfloat16:
    the step's loss is the float32 loss of the model with those weights rounded, not the plain
    one."""
    r = worker_result(results["train"])
    assert abs(r["loss_bf16_gather"] - r["loss_rounded_ref"]) <= 1e-5 * abs(r["loss_rounded_ref"])
    assert abs(r["loss_bf16_gather"] - r["loss_f32_ref"]) > 1e-6


def test_gather_cast_gradient_goes_through_the_scatter_dtype():
    from xlstm_eqx.parallel.fsdp import gather_cast

    w = jnp.asarray([1.0, 1.0 + 2.0**-12, 3.0], jnp.float32)
    y, vjp = jax.vjp(lambda w: gather_cast(w, "bfloat16", "bfloat16"), w)
    assert y.dtype == jnp.bfloat16
    g = jnp.asarray([1.0 + 2.0**-12, 2.0, -1.0], jnp.bfloat16)
    (gw,) = vjp(g)
    assert gw.dtype == jnp.float32
    np.testing.assert_array_equal(gw, np.asarray(g, np.float32))
    _, vjp32 = jax.vjp(lambda w: gather_cast(w, "bfloat16", "float32"), w)
    (gw32,) = vjp32(g)
    np.testing.assert_array_equal(gw32, np.asarray(g, np.float32))


@pytest.mark.slow
def test_two_processes_train_data_parallel_like_one(results):
    """Two processes (2 CPU devices each, gloo collectives) train data-parallel over the 4
    devices; both log the losses of the one-process, one-device run of the same config."""
    single = worker_result(results["train"])["losses_single"]
    for name in ("dist0", "dist1"):
        r = worker_result(results[name])
        assert r["initialized"] is True
        assert r["process_count"] == 2 and r["local_devices"] == 2 and r["global_devices"] == 4
        assert r["mesh"] == {"dp": 4, "fsdp": 1, "pp": 1, "tp": 1}
        np.testing.assert_allclose(r["losses"], single, rtol=1e-5)
    assert worker_result(results["dist0"])["process_index"] == 0
    assert worker_result(results["dist1"])["process_index"] == 1


@pytest.mark.slow
def test_two_processes_run_the_trainer_loop_with_fsdp(results):
    """`train()` (what `xlstm-eqx train --mesh fsdp=-1` runs on every host) over two processes:
    the same losses as one device, one writer for every file, a checkpoint that loads."""
    from xlstm_eqx.training import load_run

    single = worker_result(results["train"])["losses_single"]
    r0, r1 = worker_result(results["dist0"]), worker_result(results["dist1"])
    for r in (r0, r1):
        np.testing.assert_allclose(r["trainer_losses"], single, rtol=1e-5)
        assert r["trainer_sample"] is not None and len(r["trainer_sample"]) > 0
    assert r0["trainer_eval_loss"] == pytest.approx(r1["trainer_eval_loss"], rel=1e-6)
    assert r0["trainer_sample"] == r1["trainer_sample"]
    run_dir = pathlib.Path(r0["run_dir"])
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3]  # written once, not once per process
    assert not list(run_dir.rglob("*.tmp*"))
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "step_00000002",
        "step_00000003",
    ]
    model, _, step = load_run(str(run_dir))
    assert step == 3 and isinstance(model, xLSTMLMModel)
    assert all(
        np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(eqx.filter(model, eqx.is_array))
    )
