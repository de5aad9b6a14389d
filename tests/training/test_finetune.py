"""Fine-tuning (training/finetune.py and the train step): only trainable leaves change and have
optimizer state (LoRA adapters, ``--trainable REGEX``); the trainable count from the layer
shapes; merged logits equal the adapted model's; bad targets and patterns are errors."""

import dataclasses
import os
import shutil

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest

from tests.corpus import write_corpus
from xlstm_eqx.interop.hf import SINGLE_FILE
from xlstm_eqx.models import family_of
from xlstm_eqx.nn.linear import Dense, DenseGeneral, LinearHeadwiseExpand
from xlstm_eqx.presets import tiny_llama, tiny_xlstm, tiny_xlstm_slstm
from xlstm_eqx.training.checkpoint import CheckpointError
from xlstm_eqx.training.config import TrainConfig
from xlstm_eqx.training.evaluate import load_run
from xlstm_eqx.training.finetune import (
    DEFAULT_LORA_TARGETS,
    LoRASettings,
    add_lora,
    finetune_memory,
    has_lora,
    merge_lora,
    param_path,
    trainable_count,
    trainable_mask,
)
from xlstm_eqx.training.init_from import load_init_model
from xlstm_eqx.training.loop import train
from xlstm_eqx.training.optim import trainable_params
from xlstm_eqx.training.orbax_checkpoint import latest_checkpoint, load_metadata
from xlstm_eqx.training.run_files import read_metrics
from xlstm_eqx.training.step import make_train_step
from xlstm_eqx.xlstm.slstm import sLSTMLayer


HF = os.path.join(os.path.dirname(__file__), "..", "fixtures", "interop", "hf_train")


def _model(preset):
    config = preset()
    return family_of(config).build(config, key=jr.key(0))


def _tokens():
    return jr.randint(jr.key(5), (1, 2, 17), 0, 64)


def _steps(model, pattern=None, n=2):
    """``n`` AdamW steps (weight decay on, so a frozen kernel would move if it were updated):
    the model after them and the optimizer state."""
    optimizer = optax.adamw(1e-2, weight_decay=0.1)
    opt_state = optimizer.init(eqx.filter(model, trainable_mask(model, pattern)))
    step = make_train_step(optimizer, trainable=pattern)
    model = jax.tree.map(lambda x: jnp.array(x, copy=True) if eqx.is_array(x) else x, model)
    for i in range(n):
        model, opt_state, _, _ = step((_tokens(), jr.key(i)), model, opt_state)
    return model, opt_state


def _changed(before, after) -> set[str]:
    arrays_a, arrays_b = eqx.filter(before, eqx.is_array), eqx.filter(after, eqx.is_array)
    diff = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), arrays_a, arrays_b)
    return {param_path(p) for p, v in jax.tree_util.tree_leaves_with_path(diff) if v}


def _array_count(tree) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(eqx.filter(tree, eqx.is_array)))


def test_lora_steps_change_only_adapters():
    # Llama: its step compiles in a third of tiny_xlstm's time; the xLSTM path runs in the
    # CLI test (tests/cli/test_finetune_cli.py) and merges in test_merged_logits_...
    model = add_lora(_model(tiny_llama), LoRASettings(rank=2, alpha=4.0), jr.key(1))
    after, opt_state = _steps(model)
    changed = _changed(model, after)
    adapters = {param_path(p) for p, _ in jax.tree_util.tree_leaves_with_path(model)}
    adapters = {n for n in adapters if n.endswith((".lora_a", ".lora_b"))}
    assert changed == adapters
    # AdamW's two moments per trainable scalar (plus scalar counts): no state for the base
    moments = _array_count(opt_state) - sum(1 for x in jax.tree.leaves(opt_state) if x.ndim == 0)
    assert moments == 2 * trainable_count(model)


def _expected_lora_count(model, rank: int) -> int:
    """Σ over targeted projection kernels of stack · (in + out) · rank, from the base's kernel
    shapes (headwise: per block, in/P + out/P)."""
    total = 0

    def visit(path, node):
        nonlocal total
        name = path[-1].name if path and hasattr(path[-1], "name") else ""
        if name not in DEFAULT_LORA_TARGETS or isinstance(node, sLSTMLayer):
            return node  # sLSTM layers are not adapted
        k = node.kernel.shape
        if isinstance(node, LinearHeadwiseExpand):
            stack = int(np.prod(k[:-3]))
            total += stack * k[-3] * (k[-2] + k[-1]) * rank
        elif isinstance(node, DenseGeneral):
            n_in, n_out = len(node.in_shape), len(node.out_shape)
            stack = int(np.prod(k[: len(k) - n_in - n_out]))
            total += stack * (int(np.prod(node.in_shape)) + int(np.prod(node.out_shape))) * rank
        else:
            total += int(np.prod(k[:-2])) * (k[-2] + k[-1]) * rank
        return node

    layers = (Dense, DenseGeneral, LinearHeadwiseExpand, sLSTMLayer)
    jax.tree_util.tree_map_with_path(visit, model, is_leaf=lambda x: isinstance(x, layers))
    return total


@pytest.mark.parametrize("preset", [tiny_xlstm, tiny_xlstm_slstm, tiny_llama])
def test_trainable_count_from_layer_shapes(preset):
    base = _model(preset)
    model = add_lora(base, LoRASettings(rank=3, alpha=3.0), jr.key(1))
    assert trainable_count(model) == _expected_lora_count(base, 3) > 0
    assert trainable_count(base) == _array_count(base)  # no LoRA, no pattern: everything


def test_merged_logits_equal_adapted_logits():
    base = _model(tiny_xlstm_slstm)  # mlstm layers (headwise q/k/v), an sLSTM block, unscanned
    model = add_lora(base, LoRASettings(rank=2, alpha=4.0), jr.key(1))
    tokens = _tokens()[0, :, :16]
    forward = eqx.filter_jit(lambda m, b, t: (m(t), merge_lora(m)(t), b(t)))
    at_init, _, plain = forward(model, base, tokens)
    np.testing.assert_array_equal(at_init, plain)  # B = 0 at the start
    params, frozen = eqx.partition(model, trainable_mask(model))
    params = jax.tree.map(lambda x: 0.2 * jr.normal(jr.key(9), x.shape), params)
    adapted, merged, plain = forward(eqx.combine(params, frozen), base, tokens)
    assert float(jnp.max(jnp.abs(adapted - plain))) > 1e-2  # the adapter matters
    np.testing.assert_allclose(merged, adapted, rtol=1e-5, atol=2e-5)
    assert jax.tree.structure(merge_lora(model)) == jax.tree.structure(base)


def test_trainable_regex_freezes_the_rest():
    model = _model(tiny_xlstm)
    pattern = r"layer\.dense_v\.kernel"
    after, opt_state = _steps(model, pattern)
    assert _changed(model, after) == {
        "xlstm_block_stack.blocks.xlstm_res_block.layer.dense_v.kernel"
    }
    kernel = model.xlstm_block_stack.blocks.xlstm_res_block.layer.dense_v.kernel
    moments = _array_count(opt_state) - sum(1 for x in jax.tree.leaves(opt_state) if x.ndim == 0)
    assert moments == 2 * kernel.size


def test_lora_base_dtype_bfloat16_keeps_adapters_float32():
    model = add_lora(_model(tiny_xlstm), LoRASettings(2, 2.0, base_dtype="bfloat16"), jr.key(1))
    layer = model.xlstm_block_stack.blocks.xlstm_res_block.layer.dense_q
    assert layer.kernel.dtype == jnp.bfloat16 and layer.lora_a.dtype == jnp.float32


def test_bad_patterns_and_targets_are_named():
    model = _model(tiny_xlstm)
    with pytest.raises(ValueError, match="--trainable: 'nothing_here' matches no parameter"):
        trainable_mask(model, "nothing_here")
    with pytest.raises(ValueError, match="--trainable: '\\(' is not a regular expression"):
        trainable_mask(model, "(")
    with pytest.raises(ValueError, match=r"--lora-targets: \['dense_x'\]"):
        add_lora(model, LoRASettings(2, 2.0, targets=("dense_q", "dense_x")), jr.key(1))


def test_finetune_memory_from_counts():
    base = _model(tiny_xlstm)
    n = _array_count(base)
    for dtype, base_bytes in (("float32", 4 * n), ("bfloat16", 2 * n)):
        memory = finetune_memory(base, LoRASettings(2, 2.0, base_dtype=dtype), 4 * n, 1000)
        adapters = _expected_lora_count(base, 2)
        assert (memory.num_params, memory.num_adapter_params) == (n, adapters)
        assert memory.full_bytes == 4 * 4 * n + 1000  # params, grads, two moments + activations
        assert memory.lora_bytes == base_bytes + 4 * 4 * adapters + 1000
        assert memory.lines(1e-9)[-1].endswith("does NOT fit in 1e-09 GiB")


@pytest.mark.slow
def test_lora_from_source_checkpoints_hold_the_adapter(tmp_path):
    """A LoRA run from a transformers directory checkpoints only its adapters (paths
    ``...lora_a/lora_b``; the model tree a small share of the base's bytes), ``--resume`` reads
    the base again and logs the losses of a run that never stopped, `load_run` and a run-directory
    ``--init-from`` (merged) give the trained model, and a moved or changed base is an error
    naming its path."""
    src = tmp_path / "src"
    shutil.copytree(HF, src)
    cfg = TrainConfig(
        init_from=str(src), data=[write_corpus(tmp_path)], eod_token="none", steps=4,
        batch_size=2, seq_len=12, warmup_steps=1, log_every=1, eval_every=4, eval_batches=1,
        checkpoint_every=2, sample_tokens=0, progress=False, lora_rank=4, lr=1e-2,
        out=str(tmp_path / "whole"),
    )  # fmt: skip
    train(cfg, log=lambda m: None)
    stopped = dataclasses.replace(cfg, out=str(tmp_path / "stopped"))
    train(stopped, stop_after_step=2, log=lambda m: None)
    train(dataclasses.replace(stopped, resume=True), log=lambda m: None)
    rows = {
        name: [r["loss"] for r in read_metrics(str(tmp_path / name / "metrics.jsonl"))]
        for name in ("whole", "stopped")
    }
    assert rows["stopped"] == rows["whole"] and len(rows["whole"]) == 4

    newest = latest_checkpoint(str(tmp_path / "whole" / "checkpoints"))
    assert newest is not None
    manifest = load_metadata(newest)["trees"]["model"]
    saved = [e["path"] for e in manifest]
    assert saved and all(p.endswith((".lora_a", ".lora_b")) for p in saved)
    model, _, step = load_run(str(tmp_path / "whole"))
    assert step == 4 and has_lora(model)
    assert len(saved) == len(jax.tree.leaves(trainable_params(model)))
    # the arrays saved: a fifth of the base's float32 bytes (orbax's own files on top)
    saved_bytes = sum(4 * int(np.prod(e["shape"])) for e in manifest)
    assert saved_bytes < 0.2 * os.path.getsize(src / SINGLE_FILE)

    tokens = jnp.asarray(np.arange(24).reshape(2, 12) % 40, jnp.int32)
    again, _, _ = load_run(str(tmp_path / "stopped"))
    np.testing.assert_array_equal(np.asarray(again(tokens)), np.asarray(model(tokens)))
    merged, _, _ = load_init_model(str(tmp_path / "whole"))  # a LoRA run as a source
    np.testing.assert_allclose(merged(tokens), model(tokens), rtol=1e-5, atol=1e-5)

    os.rename(src, tmp_path / "moved")
    with pytest.raises(CheckpointError, match=f"--init-from '{src}'.* is gone"):
        load_run(str(tmp_path / "whole"))
    shutil.copytree(tmp_path / "moved", src)
    with open(src / "config.json", "a") as f:
        f.write(" ")
    with pytest.raises(CheckpointError, match=f"'{src}' changed since .*recorded sha256:"):
        train(dataclasses.replace(stopped, resume=True, steps=6), log=lambda m: None)
