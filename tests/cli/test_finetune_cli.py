"""What a user types for LoRA fine-tuning, from another working directory with relative paths:
`train --lora-rank`, then `convert --merge-lora` (transformers) and `convert --to peft`; the same
from a transformers directory (``--init-from``)."""

import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from xlstm_eqx.cli import main
from xlstm_eqx.interop.hf import from_hf_pretrained, to_hf
from xlstm_eqx.interop.peft import read_peft_adapter
from xlstm_eqx.training import load_run
from xlstm_eqx.training.finetune import has_lora, strip_lora
from xlstm_eqx.training.init_from import load_init_model


TEXT = "def add(a, b):\n    return a + b\n\n\nclass Point:\n    x: int = 0\n" * 30
HF = os.path.join(os.path.dirname(__file__), "..", "fixtures", "interop", "hf_train")
FAST = ["--seq-len", "16", "--batch-size", "2", "--no-progress", "--sample-tokens", "0"]
FAST += ["--eval-batches", "1", "--warmup-steps", "0", "--log-every", "1", "--lr", "3e-2"]


@pytest.mark.slow
def test_lora_train_then_merge_and_peft_export(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    os.makedirs("data")
    with open("data/code.py", "w") as f:
        f.write(TEXT)
    args = ["train", "--preset", "tiny", "--data", "data/code.py", "--out", "runs/lora"]
    args += ["--steps", "3", "--checkpoint-every", "3", "--eval-every", "3", *FAST]
    args += ["--lora-rank", "4", "--lora-alpha", "8"]
    assert main(args) == 0
    model, _, step = load_run("runs/lora")
    assert step == 3 and has_lora(model)
    layer = model.xlstm_block_stack.blocks.xlstm_res_block.layer.dense_q
    assert float(jnp.max(jnp.abs(layer.lora_b))) > 0  # trained from zero
    tokens = jnp.asarray([list(b"def add(a, b):")], jnp.int32)
    want = np.asarray(model(tokens))

    # a LoRA run converts only merged or as its adapter
    assert main(["convert", "--from", "eqx", "--to", "hf", "runs/lora", "out/plain"]) == 2
    assert "--merge-lora" in capsys.readouterr().err
    merge = ["convert", "--from", "eqx", "--to", "hf", "--merge-lora", "runs/lora", "out/merged"]
    assert main(merge) == 0
    merged, _ = from_hf_pretrained("out/merged")
    np.testing.assert_allclose(np.asarray(merged(tokens)), want, rtol=1e-5, atol=1e-5)
    as_source, _, _ = load_init_model("runs/lora")  # --init-from a LoRA run: merged weights
    np.testing.assert_allclose(np.asarray(as_source(tokens)), want, rtol=1e-5, atol=1e-5)

    assert main(["convert", "--from", "eqx", "--to", "peft", "runs/lora", "out/adapter"]) == 0
    assert sorted(os.listdir("out/adapter")) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    # the adapter onto the base (the run's model without adapters, exported as transformers)
    _, config = from_hf_pretrained("out/merged")
    to_hf(strip_lora(model), config, "out/base", tokenizer="bytes")
    base, _ = from_hf_pretrained("out/base")
    readapted = read_peft_adapter(base, "out/adapter")
    np.testing.assert_allclose(np.asarray(readapted(tokens)), want, rtol=1e-5, atol=1e-5)
    # the merged model converted again, with its adapter read through --adapter, merges equal
    again = ["convert", "--from", "hf", "--adapter", "out/adapter", "--to", "eqx"]
    assert main([*again, "--merge-lora", "out/base", "out/again"]) == 0
    again_model, _, _ = load_run("out/again")
    np.testing.assert_allclose(np.asarray(again_model(tokens)), want, rtol=1e-5, atol=1e-5)


def test_info_lora_rank(capsys):
    assert main(["info", "--preset", "tiny", "--lora-rank", "4", "--mesh", "fsdp=1"]) == 0
    printed = capsys.readouterr().out
    assert "LoRA r=4:" in printed and "full:" in printed


@pytest.mark.slow
def test_lora_from_a_transformers_directory(tmp_path, monkeypatch, capsys):
    """``train --init-from base --lora-rank``: the checkpoints hold the adapter and point at
    ``base``; ``convert --merge-lora`` and ``--init-from`` the run read it again; a moved base is
    an error naming its path."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(HF, "base")
    os.makedirs("data")
    with open("data/code.py", "w") as f:
        f.write(TEXT)
    args = ["train", "--init-from", "base", "--data", "data/code.py", "--out", "runs/ft"]
    args += ["--steps", "2", "--checkpoint-every", "2", "--eval-every", "2", "--eod-token", "none"]
    args += FAST
    assert main([*args, "--lora-rank", "4"]) == 0
    model, _, _ = load_run("runs/ft")
    tokens = jnp.asarray([list(b"def add(a, b):")], jnp.int32) % 40
    merge = ["convert", "--from", "eqx", "--to", "hf", "--merge-lora", "runs/ft", "out/merged"]
    assert main(merge) == 0
    merged, _ = from_hf_pretrained("out/merged")
    np.testing.assert_allclose(merged(tokens), model(tokens), rtol=1e-5, atol=1e-5)
    again = ["train", "--init-from", "runs/ft", "--data", "data/code.py", "--out", "runs/next"]
    assert main([*again, "--steps", "1", "--eval-every", "1", "--eod-token", "none", *FAST]) == 0
    os.rename("base", "moved")
    assert main([*merge[:-1], "out/merged2"]) == 2
    assert f"--init-from {os.path.abspath('base')!r}" in capsys.readouterr().err
