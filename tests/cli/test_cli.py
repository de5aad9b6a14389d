"""The `xlstm-eqx` command line: train / resume / eval / info end to end, config resolution, errors."""

import argparse
import json
import math
import os
import subprocess
import sys

import equinox as eqx
import jax
import jax.random as jr
import pytest

from xlstm_eqx.cli import build_parser, main, resolve_train_config
from xlstm_eqx.training import TrainConfig, load_run, read_metrics, sample_tokens


TEXT = "def add(a, b):\n    return a + b\n\n\nclass Point:\n    x: int = 0\n    y: int = 0\n\n" * 30


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "code.py"
    path.write_text(TEXT)
    return str(path)


FAST = ["--seq-len", "16", "--batch-size", "2", "--no-progress", "--sample-tokens", "0"]
FAST += ["--eval-batches", "1", "--warmup-steps", "0", "--log-every", "1"]


@pytest.mark.slow
def test_train_resume_eval_info(tmp_path, corpus, capsys):
    out = str(tmp_path / "run")
    args = ["train", "--model", "xlstm", "--preset", "tiny", "--data", corpus, "--out", out]
    args += ["--steps", "2", "--eval-every", "2", "--checkpoint-every", "1", *FAST]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "bits/byte" in printed and "unigram baseline" in printed

    with open(os.path.join(out, "config.json")) as f:
        run = json.load(f)
    assert run["train"]["steps"] == 2 and run["train"]["data"] == [corpus]
    assert run["model_kind"] == "xlstm" and run["model_config"]["vocab_size"] == 256
    rows = read_metrics(os.path.join(out, "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert "eval_loss" in rows[-1] and "bits_per_byte" in rows[-1]

    # --resume needs no other flag: the run's saved config is the base; --steps extends it
    assert main(["train", "--out", out, "--resume", "--steps", "3", "--no-progress"]) == 0
    assert "resumed from" in capsys.readouterr().out
    rows = read_metrics(os.path.join(out, "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2, 3]
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["train"]["steps"] == 3

    assert main(["eval", "--out", out, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["step"] == 3
    assert result["bits_per_byte"] == pytest.approx(result["eval_loss"] / math.log(2))
    assert result["unigram_bits_per_byte"] > 0

    assert main(["eval", "--out", out, "--data", corpus]) == 0
    assert "held-out loss" in capsys.readouterr().out

    assert main(["info", "--out", out]) == 0
    info = capsys.readouterr().out
    assert "model: xlstm" in info and "vocab_size = 256" in info

    # generate streams greedy text equal to argmax over full forward passes
    gen = ["generate", "--out", out, "--prompt", "def ", "--max-new-tokens", "6"]
    assert main([*gen, "--temperature", "0"]) == 0
    text = capsys.readouterr().out
    model, _, _ = load_run(out)
    prompt = list(b"def ")
    expected = sample_tokens(model, prompt, 6, window=16, temperature=0.0, key=jr.key(0))
    assert text == "def " + bytes(expected).decode("utf-8", errors="replace") + "\n"
    assert main([*gen, "--top-k", "5", "--seed", "1"]) == 0
    assert capsys.readouterr().out.startswith("def ")


@pytest.mark.slow
def test_info_counts_parameters(capsys):
    from xlstm_eqx.llama import LlamaConfig, LlamaTransformer
    from xlstm_eqx.presets import tiny_llama

    def count(config):
        model = eqx.filter_eval_shape(LlamaTransformer, config, key=jr.key(0))
        return sum(math.prod(x.shape) for x in jax.tree.leaves(model))

    # The preset as shipped (its own vocabulary), or as `train` would build it for a tokenizer.
    assert main(["info", "--model", "llama", "--preset", "tiny"]) == 0
    text = capsys.readouterr().out
    assert f"parameters: {count(tiny_llama()):,}" in text
    assert f"vocab_size = {tiny_llama().vocab_size}" in text
    assert main(["info", "--model", "llama", "--preset", "tiny", "--tokenizer", "bytes"]) == 0
    text = capsys.readouterr().out
    config = LlamaConfig.from_dict({**tiny_llama().to_dict(), "vocab_size": 256})
    assert f"parameters: {count(config):,}" in text and "vocab_size = 256" in text
    assert tiny_llama().vocab_size != 256  # so the two cases differ
    assert main(["info", "--list-presets"]) == 0
    listing = capsys.readouterr().out
    assert "xlstm:" in listing and "small" in listing and "llama165M" in listing


def test_bad_input_exit_code_and_message(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    missing = str(tmp_path / "missing.txt")
    assert main(["train", "--data", missing, "--out", str(out), *FAST]) == 2
    assert missing in capsys.readouterr().err
    too_long = ["train", "--model", "llama", "--preset", "tiny", "--data", corpus]
    assert main([*too_long, "--out", str(out), *FAST, "--seq-len", "100"]) == 2
    err = capsys.readouterr().err
    assert "seq_len=100" in err and "context_length=64" in err
    assert main(["train", "--out", str(out), "--resume", *FAST]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert main(["eval", "--out", str(out)]) == 2
    assert f"no run in {str(out)!r} (no such directory)" in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--no-such-flag"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--steps", "many"])


def _ns(argv):
    return build_parser().parse_args(argv)


def test_config_resolution_order(tmp_path):
    assert resolve_train_config(_ns(["train"])) == TrainConfig()
    cfg_file = tmp_path / "c.json"
    cfg_file.write_text(json.dumps({"steps": 7, "lr": 0.5, "data": ["a.txt"]}))
    cfg = resolve_train_config(_ns(["train", "--config", str(cfg_file), "--lr", "0.25"]))
    assert (cfg.steps, cfg.lr, cfg.data) == (7, 0.25, ["a.txt"])
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("steps: 9\ngrad_clip: null\nprogress: false\n")
    cfg = resolve_train_config(
        _ns(["train", "--config", str(yaml_file), "--data", "x", "--data", "y"])
    )
    assert (cfg.steps, cfg.grad_clip, cfg.progress, cfg.data) == (9, None, False, ["x", "y"])
    cfg = resolve_train_config(_ns(["train", "--grad-clip", "none", "--warmup-steps", "3"]))
    assert cfg.grad_clip is None and cfg.warmup_steps == 3
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"stepz": 3}))
    with pytest.raises(ValueError, match="stepz"):
        resolve_train_config(_ns(["train", "--config", str(bad)]))
    assert main(["train", "--config", str(bad)]) == 2


def test_flags_cover_every_train_config_field():
    import dataclasses

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    flags = {o for a in sub.choices["train"]._actions for o in a.option_strings}
    for f in dataclasses.fields(TrainConfig):
        assert "--" + f.name.replace("_", "-") in flags
    for fixed in ("--steps", "--out", "--data", "--seed", "--resume"):
        assert fixed in flags


@pytest.mark.slow
def test_console_module_runs():
    proc = subprocess.run(
        [sys.executable, "-m", "xlstm_eqx.cli", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    )
    assert proc.returncode == 0
    for name in ("train", "eval", "generate", "info"):
        assert name in proc.stdout


def test_console_module_runs_in_process(monkeypatch, capsys):
    """The fast counterpart of the test above: `python -m xlstm_eqx.cli` (its `__main__`) run in
    this process."""
    import runpy
    import warnings

    monkeypatch.setattr(sys, "argv", ["xlstm-eqx", "--help"])
    with pytest.raises(SystemExit) as done, warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # runpy, if __main__ was imported before
        runpy.run_module("xlstm_eqx.cli", run_name="__main__")
    assert done.value.code == 0
    printed = capsys.readouterr().out
    for name in ("train", "eval", "generate", "info"):
        assert name in printed
