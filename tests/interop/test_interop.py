"""Interop: transformers xLSTM checkpoints and xlstm-jax parameter trees, both ways.

The expected logits and greedy generations under ``tests/fixtures/interop/`` were made by the peers
themselves (transformers 5.23 on torch 2.13 CPU, and the xlstm-jax Flax reference) with
``scripts/make_interop_fixtures.py``; nothing here needs them installed. Round trips are checked
bit for bit; errors must name what is wrong.
"""

import json
import os
import shutil

import equinox as eqx
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from xlstm_eqx import generate
from xlstm_eqx.cell import mLSTMBackendNameAndKwargs
from xlstm_eqx.cli import convert_main, generate_main
from xlstm_eqx.core import count_params
from xlstm_eqx.interop import (
    InteropError,
    from_hf_pretrained,
    from_xlstm_jax,
    hf_config_to_eqx,
    load_xlstm_jax_params,
    save_xlstm_jax_params,
    to_hf,
    to_xlstm_jax,
    xlstm_jax_config,
)
from xlstm_eqx.interop.hf import hf_entries
from xlstm_eqx.interop.safetensors_files import SafetensorsError, SafetensorsFile, save_file
from xlstm_eqx.interop.xlstm_jax import flatten_params, unflatten_params
from xlstm_eqx.llama import LlamaConfig, LlamaTransformer
from xlstm_eqx.nn import FeedForwardConfig
from xlstm_eqx.presets import tiny_xlstm_slstm
from xlstm_eqx.xlstm import (
    mLSTMBlockConfig,
    mLSTMCellConfig,
    mLSTMLayerConfig,
    xLSTMLMModel,
    xLSTMLMModelConfig,
)


FIXTURES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "interop")
HF_FIXTURES = ("hf_small", "hf_fused_tied")
XJ_FIXTURES = ("xlstm_jax_mlstm_v1", "xlstm_jax_mlstm", "xlstm_jax_llama")
TOL = 1e-4


def read_json(path):
    with open(path) as f:
        return json.load(f)


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f)


def fixture(name: str) -> str:
    return os.path.join(FIXTURES, name)


def expected(name: str) -> dict[str, np.ndarray]:
    with np.load(os.path.join(fixture(name), "expected.npz"), allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


@eqx.filter_jit
def logits_of(model, tokens):
    return model(tokens)


def random_model(cls, config, seed):
    """A model of ``config`` with every parameter drawn at random (distinct values everywhere, so
    a round trip that drops, swaps or transposes anything fails). Built from a shape skeleton
    with NumPy: no initialiser runs, nothing compiles."""
    skeleton = eqx.filter_eval_shape(cls, config, key=jr.key(0))
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda s: jnp.asarray(rng.standard_normal(s.shape).astype(s.dtype)),
        skeleton,
        is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct),
    )


def same_arrays(a, b) -> bool:
    """Same structure and static fields, bit-identical arrays of the same dtypes."""
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    return ta == tb and all(
        x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(la, lb, strict=True)
    )


# ----------------------------------------------------------------------------------------------
# configs used by the round trips


def v1_config(*, num_heads=4, scan=True, tie=False, qk=1.0, v=0.5, cell=None, block=None, **model):
    """Tiny xLSTM-7B style configs (what transformers can hold, unless changed)."""
    cell_kw = dict(
        backend=mLSTMBackendNameAndKwargs(name="chunkwise", kwargs={"chunk_size": 8}),
        norm_eps=1e-5,
        gate_soft_cap=10.0,
        igate_bias_init_range=-10.0,
    )
    model_kw = dict(
        vocab_size=40,
        embedding_dim=32,
        num_blocks=2,
        context_length=64,
        tie_weights=tie,
        norm_type="rmsnorm",
        norm_eps=1e-5,
        logits_soft_cap=20.0,
        lm_head_dtype="float32",
        dtype="float32",
        scan_blocks=scan,
    )
    return xLSTMLMModelConfig(
        **dict(model_kw, **model),
        mlstm_block=mLSTMBlockConfig(
            mlstm=mLSTMLayerConfig(
                layer_type="mlstm_v1",
                num_heads=num_heads,
                qk_dim_factor=qk,
                v_dim_factor=v,
                mlstm_cell=mLSTMCellConfig(**dict(cell_kw, **(cell or {}))),
            ),
            feedforward=FeedForwardConfig(
                proj_factor=1.0, act_fn="swish", round_proj_up_to_multiple_of=16
            ),
            **(block or {}),
        ),
    )


def mlstm_config(*, scan=False, headwise=True, vmap_qk=False, bias=True, post=True, qk_norm=True):
    return xLSTMLMModelConfig(
        vocab_size=36,
        embedding_dim=32,
        num_blocks=2,
        norm_type="layernorm",
        dtype="float32",
        lm_head_dtype="float32",
        scan_blocks=scan,
        bias=bias,
        mlstm_block=mLSTMBlockConfig(
            mlstm=mLSTMLayerConfig(
                layer_type="mlstm",
                num_heads=2,
                proj_factor=1.0,
                round_proj_up_to_multiple_of=16,
                conv1d_kernel_size=3,
                v_dim_factor=0.5,
                vmap_qk=vmap_qk,
                mlstm_cell=mLSTMCellConfig(gate_linear_headwise=headwise, add_qk_norm=qk_norm),
            ),
            add_post_norm=post,
        ),
    )


def llama_config(**kw):
    base = dict(
        vocab_size=30,
        embedding_dim=12,
        num_blocks=2,
        head_dim=6,
        dtype="float32",
        ffn_multiple_of=8,
    )
    return LlamaConfig(**dict(base, **kw))


# ----------------------------------------------------------------------------------------------
# transformers fixtures


@pytest.mark.parametrize("name", HF_FIXTURES)
def test_hf_logits_match_transformers(name):
    model, config = from_hf_pretrained(fixture(name))
    exp = expected(name)
    logits = np.asarray(logits_of(model, jnp.asarray(exp["input_ids"])))
    assert logits.shape == exp["logits"].shape and logits.dtype == np.float32
    assert np.max(np.abs(logits - exp["logits"])) <= TOL
    # The two fixtures differ in what a converter could get wrong.
    hf = read_json(os.path.join(fixture(name), "config.json"))
    assert config.mlstm_block.mlstm.num_heads == hf["num_heads"]
    assert config.logits_soft_cap == hf["output_logit_soft_cap"]
    if name == "hf_fused_tied":  # stored head equal to the embedding: tied again
        assert config.tie_weights and model.lm_head is None
        assert config.norm_eps == 1e-5 and config.mlstm_block.mlstm.mlstm_cell.gate_soft_cap == 5.0
    else:
        assert not config.tie_weights and model.lm_head is not None
        assert os.path.isfile(os.path.join(fixture(name), "model.safetensors.index.json"))


def test_hf_7b_config_maps_to_the_7b_architecture():
    """transformers' xLSTMConfig defaults are the released xLSTM-7B: 6,865,424,896 parameters
    (27.46 GB of float32 safetensors), F = 10944, DHQK = 256, DHV = 512."""
    hf = dict(
        model_type="xlstm",
        vocab_size=50304,
        hidden_size=4096,
        num_hidden_layers=32,
        num_heads=8,
        qk_dim_factor=0.5,
        v_dim_factor=1.0,
        ffn_proj_factor=2.667,
        ffn_round_up_to_multiple_of=64,
        gate_soft_cap=15.0,
        output_logit_soft_cap=30.0,
        weight_mode="single",
    )
    config = hf_config_to_eqx(hf)
    skeleton = eqx.filter_eval_shape(xLSTMLMModel, config, key=jr.key(0))
    assert count_params(skeleton) == 6_865_424_896
    shapes = {e.name: e for e in hf_entries(skeleton)}
    assert len(shapes) == 2 + 32 * 15 + 1
    block = skeleton.xlstm_block_stack.blocks
    assert block.ffn_res_block.layer.proj_up.kernel.shape == (32, 4096, 10944)
    assert block.xlstm_res_block.layer.cell.outnorm.scale.shape == (32, 8, 512)
    assert block.xlstm_res_block.layer.dense_q.kernel.shape == (32, 4096, 2048)


def test_hf_unrolled_layout_same_weights():
    scanned, _ = from_hf_pretrained(fixture("hf_fused_tied"))
    unrolled, config = from_hf_pretrained(fixture("hf_fused_tied"), scan_blocks=False)
    assert isinstance(unrolled.xlstm_block_stack.blocks, tuple) and not config.scan_blocks
    assert same_arrays(
        scanned.xlstm_block_stack.block_list(), list(unrolled.xlstm_block_stack.blocks)
    )


def test_hf_greedy_generation_matches_transformers():
    model, _ = from_hf_pretrained(fixture("hf_small"))
    exp = expected("hf_small")
    prompt = jnp.asarray(exp["prompt_ids"])
    out = generate(model, prompt, exp["greedy_ids"].shape[1] - prompt.shape[1], key=None)
    np.testing.assert_array_equal(np.asarray(out), exp["greedy_ids"])


def test_generate_cli(capsys):
    exp = expected("hf_small")
    n = exp["greedy_ids"].shape[1] - exp["prompt_ids"].shape[1]
    ids = ",".join(str(int(t)) for t in exp["prompt_ids"][0])
    argv = ["--hf", fixture("hf_small"), "--prompt-ids", ids, "--max-new-tokens", str(n), "--ids"]
    assert generate_main(argv) == 0
    got = [int(t) for t in capsys.readouterr().out.strip().split(",")]
    assert got == exp["greedy_ids"][0].tolist()
    # Text in, text out through the checkpoint's tokenizer.json.
    argv = ["--hf", fixture("hf_small"), "--prompt", "the fox", "--max-new-tokens", "4"]
    assert generate_main(argv) == 0
    assert capsys.readouterr().out.strip().replace(" ", "").startswith("thefox")
    assert generate_main(["--hf", fixture("hf_fused_tied"), "--prompt", "x"]) == 2
    assert "tokenizer" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# xlstm-jax fixtures


def load_xj_fixture(name):
    with open(os.path.join(fixture(name), "config.json")) as f:
        d = json.load(f)
    cls = xLSTMLMModelConfig if d["model_kind"] == "xlstm" else LlamaConfig
    return load_xlstm_jax_params(fixture(name)), cls.from_dict(d["model_config"])


@pytest.mark.parametrize("name", XJ_FIXTURES)
def test_xlstm_jax_logits_match_reference(name):
    params, config = load_xj_fixture(name)
    model = from_xlstm_jax(params, config)
    exp = expected(name)
    logits = np.asarray(logits_of(model, jnp.asarray(exp["input_ids"])))
    assert np.max(np.abs(logits - exp["logits"])) <= TOL
    # The reference quirks that the fixture configs turn on are kept by the converter.
    if name == "xlstm_jax_mlstm_v1":
        assert config.tie_weights and model.lm_head is not None  # Flax ignores tie_weights
    if name == "xlstm_jax_mlstm":
        assert not config.add_post_blocks_norm and model.out_norm is not None  # always applied
    if name == "xlstm_jax_llama":  # NH^-1/2, not head_dim^-1/2
        attn = model.blocks.blocks.attn
        assert attn.query_scale == pytest.approx(model.num_heads**-0.5)
        assert attn.query_scale != pytest.approx(config.head_dim**-0.5)


@pytest.mark.parametrize("name", XJ_FIXTURES)
def test_xlstm_jax_fixture_tree_round_trip(name):
    """Our export reproduces the reference's own stored tree, names, layout and values."""
    params, config = load_xj_fixture(name)
    model = from_xlstm_jax(params, config)
    back = flatten_params(to_xlstm_jax(model))
    ref = flatten_params(params)
    assert sorted(back) == sorted(ref)
    for k in ref:
        np.testing.assert_array_equal(back[k], ref[k], err_msg=k)


# ----------------------------------------------------------------------------------------------
# round trips


@hypothesis.settings(max_examples=6)
@hypothesis.given(
    num_heads=st.sampled_from([1, 2, 4]),
    scan=st.booleans(),
    tie=st.booleans(),
    v=st.sampled_from([0.5, 1.0]),
    shard=st.sampled_from([None, 3000]),
    seed=st.integers(0, 2**16),
)
def test_eqx_hf_eqx_round_trip_is_exact(tmp_path_factory, num_heads, scan, tie, v, shard, seed):
    config = v1_config(num_heads=num_heads, scan=scan, tie=tie, v=v)
    model = random_model(xLSTMLMModel, config, seed)
    path = str(tmp_path_factory.mktemp("hf"))
    to_hf(model, config, path, max_shard_bytes=shard)
    if shard is not None:
        assert os.path.isfile(os.path.join(path, "model.safetensors.index.json"))
    back, back_config = from_hf_pretrained(path, scan_blocks=scan)
    assert back_config == config
    assert same_arrays(back, model)


def test_to_hf_writes_transformers_format(tmp_path):
    config = v1_config(tie=True)
    model = random_model(xLSTMLMModel, config, 0)
    to_hf(model, config, str(tmp_path))
    hf = read_json(tmp_path / "config.json")
    assert hf["model_type"] == "xlstm" and hf["architectures"] == ["xLSTMForCausalLM"]
    assert hf["weight_mode"] == "single" and hf["tie_word_embeddings"] is True
    with SafetensorsFile(tmp_path / "model.safetensors") as st_file:
        names = set(st_file.keys())
        assert st_file.metadata == {"format": "pt"}
        q = st_file.read("backbone.blocks.1.mlstm_layer.q.weight")
        head = st_file.read("lm_head.weight")  # transformers does not tie: stored explicitly
    assert "backbone.blocks.0.mlstm_layer.multihead_norm.weight" in names
    # torch (out, in) layout of the second block's (scanned) query kernel.
    np.testing.assert_array_equal(
        q, np.asarray(model.xlstm_block_stack.blocks.xlstm_res_block.layer.dense_q.kernel[1]).T
    )
    np.testing.assert_array_equal(head, np.asarray(model.token_embedding.embedding))


@pytest.mark.slow
@pytest.mark.parametrize(
    "config",
    [
        v1_config(scan=True, cell=dict(add_qk_norm=True), block=dict(add_post_norm=True)),
        v1_config(scan=False, bias=True, num_heads=2),
        mlstm_config(scan=False),
        mlstm_config(
            scan=True, headwise=False, vmap_qk=True, bias=False, post=False, qk_norm=False
        ),
        llama_config(scan_blocks=True, qk_norm=True, query_scale_quirk=True),
        llama_config(scan_blocks=False, use_bias=True, query_scale_quirk=True),
    ],
    ids=[
        "v1-scan-qknorm-post",
        "v1-unrolled-bias",
        "mlstm-headwise",
        "mlstm-scan-vmapqk",
        "llama-scan",
        "llama-bias",
    ],
)
def test_eqx_xlstm_jax_eqx_round_trip_is_exact(config, tmp_path):
    cls = LlamaTransformer if isinstance(config, LlamaConfig) else xLSTMLMModel
    model = random_model(cls, config, 3)
    params = to_xlstm_jax(model)
    assert same_arrays(from_xlstm_jax(params, config), model)
    # The other block layout in the tree, and a trip through a file.
    scanned = config.scan_blocks
    other = to_xlstm_jax(model, scan_blocks=not scanned)
    names = flatten_params(other)
    stacked = ("blocks/block/" in "".join(names)) or ("block_stack/block/" in "".join(names))
    assert stacked == (not scanned)
    assert same_arrays(from_xlstm_jax(other, config), model)
    save_xlstm_jax_params(params, tmp_path / "p.safetensors")
    assert same_arrays(
        from_xlstm_jax(load_xlstm_jax_params(tmp_path / "p.safetensors"), config), model
    )


@pytest.mark.parametrize("qk_norm", [False, True])
def test_llama_clean_scale_exported_for_the_reference(qk_norm):
    """A Llama with the clean head_dim^-1/2 scale comes back (with the reference's NH^-1/2)
    computing the same logits: the ratio sqrt(NH/hd) = sqrt(1/3) is folded into the queries."""
    config = llama_config(qk_norm=qk_norm, use_bias=True)
    assert not config.query_scale_quirk
    model = random_model(LlamaTransformer, config, 5)
    back = from_xlstm_jax(to_xlstm_jax(model), config)
    assert back.blocks.blocks.attn.query_scale == pytest.approx(2**-0.5)
    tokens = jr.randint(jr.key(7), (2, 9), 0, config.vocab_size)
    a, b = np.asarray(model(tokens)), np.asarray(back(tokens))
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
    folded = (
        (lambda m: m.blocks.blocks.attn.q_norm.scale)
        if qk_norm
        else (lambda m: m.blocks.blocks.attn.dense_q.kernel)
    )
    np.testing.assert_allclose(
        np.asarray(folded(back)), np.asarray(folded(model)) * 3**-0.5, rtol=1e-6
    )


def test_xlstm_jax_config_quirks():
    assert xlstm_jax_config(llama_config()).query_scale_quirk
    c = xlstm_jax_config(v1_config(tie=True, add_post_blocks_norm=False))
    assert not c.tie_weights and c.add_post_blocks_norm
    tied = random_model(xLSTMLMModel, v1_config(tie=True), 0)
    params = flatten_params(to_xlstm_jax(tied))  # the reference always has a separate head
    np.testing.assert_array_equal(
        params["lm_head/out_dense/kernel"], np.asarray(tied.token_embedding.embedding).T
    )


# ----------------------------------------------------------------------------------------------
# conversion CLI


def test_convert_cli_hf_eqx_hf(tmp_path):
    from xlstm_eqx.training import load_run

    eqx_dir, hf_dir = str(tmp_path / "eqx"), str(tmp_path / "hf")
    assert convert_main(["--from", "hf", "--to", "eqx", fixture("hf_small"), eqx_dir]) == 0
    model, run, step = load_run(eqx_dir)
    exp = expected("hf_small")
    logits = np.asarray(logits_of(model, jnp.asarray(exp["input_ids"])))
    assert np.max(np.abs(logits - exp["logits"])) <= TOL
    assert run["tokenizer"]["kind"] == "tokenizers" and os.path.isfile(run["tokenizer"]["path"])
    assert convert_main(["--from", "eqx", "--to", "hf", eqx_dir, hf_dir]) == 0
    back, _ = from_hf_pretrained(hf_dir)
    assert same_arrays(back, model)
    assert os.path.isfile(os.path.join(hf_dir, "tokenizer.json"))


def test_convert_cli_xlstm_jax(tmp_path, capsys):
    from xlstm_eqx.training import load_run

    out = str(tmp_path / "eqx")
    src = fixture("xlstm_jax_llama")
    assert convert_main(["--from", "xlstm-jax", "--to", "eqx", src, out]) == 0
    model, run, _ = load_run(out)
    assert run["model_config"]["query_scale_quirk"] is True
    exp = expected("xlstm_jax_llama")
    assert (
        np.max(np.abs(np.asarray(logits_of(model, jnp.asarray(exp["input_ids"]))) - exp["logits"]))
        <= TOL
    )
    # A Mamba-style model has no transformers counterpart: a clear error, exit status 2.
    bad = str(tmp_path / "bad")
    assert convert_main(["--from", "xlstm-jax", "--to", "hf", fixture("xlstm_jax_mlstm"), bad]) == 2
    assert "layer_type='mlstm'" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# errors


def copy_fixture(name, tmp_path):
    dst = tmp_path / name
    shutil.copytree(fixture(name), dst)
    return dst


def rewrite_single_file(path, edit):
    with SafetensorsFile(path / "model.safetensors") as f:
        tensors = {k: f.read(k) for k in f.keys()}
    edit(tensors)
    save_file(tensors, path / "model.safetensors", {"format": "pt"})


def test_missing_unexpected_and_mismatched_keys_are_named(tmp_path):
    path = copy_fixture("hf_fused_tied", tmp_path)

    def edit(t):
        del t["backbone.blocks.1.norm_ffn.weight"]
        t["backbone.blocks.0.extra.weight"] = np.zeros(3, np.float32)
        t["backbone.out_norm.weight"] = np.ones(31, np.float32)
        t["backbone.blocks.2.mlstm_layer.qkv_opreact.weight"] = np.zeros((5, 32), np.float32)

    rewrite_single_file(path, edit)
    with pytest.raises(InteropError) as e:
        from_hf_pretrained(path)
    msg = str(e.value)
    assert "missing keys (1)" in msg and "backbone.blocks.1.norm_ffn.weight" in msg
    assert "unexpected keys (1)" in msg and "backbone.blocks.0.extra.weight" in msg
    assert "backbone.out_norm.weight: checkpoint has shape (31,), the model expects (32,)" in msg
    assert (
        "backbone.blocks.2.mlstm_layer.qkv_opreact.weight: checkpoint has shape (5, 32), the model expects (96, 32)"
        in msg
    )


def test_config_shape_mismatch_is_named(tmp_path):
    path = copy_fixture("hf_fused_tied", tmp_path)
    hf = read_json(path / "config.json")
    hf["ffn_proj_factor"] = 2.0  # F = 64 instead of 32
    write_json(path / "config.json", hf)
    with pytest.raises(
        InteropError,
        match=r"proj_up_gate_z.weight: checkpoint has shape \(64, 32\), the model expects \(128, 32\)",
    ):
        from_hf_pretrained(path)


@pytest.mark.parametrize(
    "field, value",
    [
        ("use_bias", True),
        ("add_out_norm", False),
        ("weight_mode", "split"),
        ("model_type", "llama"),
        ("add_qk_norm", True),
    ],
)
def test_unsupported_hf_config_values_are_named(field, value):
    hf = read_json(os.path.join(fixture("hf_small"), "config.json"))
    hf[field] = value
    with pytest.raises(InteropError, match=f"{field}={value!r}"):
        hf_config_to_eqx(hf)


def test_no_pickle_and_no_weights(tmp_path):
    shutil.copy(os.path.join(fixture("hf_small"), "config.json"), tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(InteropError, match="never are"):
        from_hf_pretrained(tmp_path)


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(logits_soft_cap=None), "logits_soft_cap"),
        (dict(norm_type="layernorm"), "norm_type"),
        (dict(cell=dict(add_qk_norm=True)), "add_qk_norm"),
    ],
)
def test_to_hf_refuses_what_transformers_cannot_express(change, field, tmp_path):
    config = v1_config(**change)
    model = random_model(xLSTMLMModel, config, 0)
    with pytest.raises(InteropError, match=field):
        to_hf(model, config, str(tmp_path))
    assert not os.listdir(tmp_path)  # nothing written
    mamba = mlstm_config()
    with pytest.raises(InteropError, match="layer_type='mlstm'"):
        to_hf(random_model(xLSTMLMModel, mamba, 0), mamba, str(tmp_path))


def test_to_hf_model_must_match_config(tmp_path):
    model = random_model(xLSTMLMModel, v1_config(num_heads=2), 0)
    with pytest.raises(
        InteropError,
        match=r"outnorm.scale: model has shape \(2, 2, 8\), the config describes \(2, 4, 4\)",
    ):
        to_hf(model, v1_config(num_heads=4), str(tmp_path))


def test_xlstm_jax_errors_are_named():
    params, config = load_xj_fixture("xlstm_jax_mlstm_v1")
    flat = flatten_params(params)
    flat.pop("lm_head/out_norm/scale")
    flat["lm_head/bias"] = np.zeros(3, np.float32)
    k = "xlstm_block_stack/blocks/block/xlstm_res_block/xlstm/dense_q/Dense_0/kernel"
    flat[k] = flat[k][:, :, :8]
    with pytest.raises(InteropError) as e:
        from_xlstm_jax(unflatten_params(flat), config)
    msg = str(e.value)
    assert "missing keys (1)" in msg and "lm_head/out_norm/scale" in msg
    assert "unexpected keys (1)" in msg and "lm_head/bias" in msg
    assert (
        "xlstm_block_stack/blocks/1/xlstm_res_block/xlstm/dense_q/Dense_0/kernel: checkpoint has shape (32, 8), the model expects (32, 16)"
        in msg
    )
    # tensor parallelism > 1 and sLSTM stacks are refused by name
    flat = flatten_params(params)
    emb = flat["token_embedding/sharded/embedding"]
    flat["token_embedding/sharded/embedding"] = np.concatenate([emb, emb])
    with pytest.raises(
        InteropError,
        match="token_embedding/sharded/embedding: leading tensor-parallel axis of size 2",
    ):
        from_xlstm_jax(unflatten_params(flat), config)
    with pytest.raises(InteropError, match="sLSTM"):
        from_xlstm_jax(params, tiny_xlstm_slstm())


# ----------------------------------------------------------------------------------------------
# safetensors


def test_safetensors_round_trip_and_corruption(tmp_path):
    tensors = {
        "a": np.arange(6, dtype=np.float32).reshape(2, 3),
        "b": np.asarray([1.5, -2.25], dtype=jnp.bfloat16),
        "c": np.asarray([[1, 2]], dtype=np.int64),
        "empty": np.zeros((0, 4), np.float16),
    }
    path = tmp_path / "t.safetensors"
    save_file(tensors, path, {"k": "v"})
    with SafetensorsFile(path) as f:
        assert f.keys() == list(tensors) and f.metadata == {"k": "v"}
        for k, v in tensors.items():
            got = f.read(k)
            assert got.dtype == v.dtype and got.shape == v.shape
            np.testing.assert_array_equal(got, v)
    raw = bytearray(path.read_bytes())
    (tmp_path / "short.safetensors").write_bytes(bytes(raw[:-4]))
    with pytest.raises(SafetensorsError, match="byte range"):
        SafetensorsFile(tmp_path / "short.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    with pytest.raises(SafetensorsError, match="not valid JSON"):
        SafetensorsFile(tmp_path / "junk.safetensors")


def test_hf_dtype_argument_sets_compute_dtype():
    model, config = from_hf_pretrained(fixture("hf_fused_tied"), dtype="bfloat16")
    assert config.dtype == "bfloat16" and config.lm_head_dtype == "bfloat16"
    assert model.token_embedding.embedding.dtype == jnp.float32  # parameters stay float32
    exp = expected("hf_fused_tied")
    logits = np.asarray(logits_of(model, jnp.asarray(exp["input_ids"])))
    assert logits.dtype == np.float32
    assert 1e-4 < np.max(np.abs(logits - exp["logits"])) < 1.0  # bf16 compute: close, not equal
