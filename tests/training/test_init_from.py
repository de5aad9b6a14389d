"""`xlstm-eqx train --init-from` (training/init_from.py, interop/init_sources.py): a run starts
from a transformers directory, one of our runs or an xlstm-jax checkpoint; the first batch's loss
is the source model's own (transformers' float32 loss from the fixture script, the reference's
logits, the saved run's model), the loss falls, the weights go back to the source's format
unchanged, ``--resume`` continues exactly without reading the source, and on 8 simulated devices
(tests/training/init_from_worker.py) loading shards by the mesh and training equals one device."""

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.corpus import TEXT, write_corpus
from tests.multiprocess import collect, once_per_session, start_worker, worker_result
from xlstm_eqx.cli import main
from xlstm_eqx.interop import (
    from_hf_pretrained,
    from_xlstm_jax,
    load_xlstm_jax_params,
    save_eqx,
    save_xlstm_jax_params,
    to_hf,
    to_xlstm_jax,
)
from xlstm_eqx.training.config import TrainConfig
from xlstm_eqx.training.evaluate import load_run
from xlstm_eqx.training.init_from import load_init_model
from xlstm_eqx.training.loop import train
from xlstm_eqx.training.loss import next_token_loss
from xlstm_eqx.training.prepare import prepare_run
from xlstm_eqx.training.run_files import read_metrics


FIXTURES = os.path.join(os.path.dirname(__file__), "..", "fixtures", "interop")
HF = os.path.join(FIXTURES, "hf_train")
XJ = os.path.join(FIXTURES, "xlstm_jax_mlstm_v1")


def quiet(message):
    del message


def _float64_loss(logits, tokens):
    """Mean next-token cross-entropy of ``logits`` (B, S, V) for ``tokens[:, 1:]``, float64."""
    x = np.asarray(logits, np.float64)[:, :-1]
    x = x - x.max(-1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
    target = np.asarray(tokens)[:, 1:]
    return float(-np.take_along_axis(logp, target[..., None], -1).mean())


def _word_tokenizer(path):
    """A word-level tokenizer.json of the corpus's words (fewer ids than the xlstm-jax
    fixture's vocabulary of 40)."""
    tokenizers = pytest.importorskip("tokenizers")
    words = sorted(set(TEXT.replace(".", " ").replace("!", " ").split()))
    vocab = {"[UNK]": 0, ".": 1, "!": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(path))
    assert len(vocab) <= 40
    return str(path)


def test_first_batch_loss_equals_transformers():
    """The fixture's float32 loss, computed by transformers on a fixed batch."""
    with open(os.path.join(HF, "loss.json")) as fh:
        expected = json.load(fh)
    model, config, source = load_init_model(HF)
    loss = float(next_token_loss(model, jnp.asarray(expected["input_ids"], jnp.int32)))
    assert abs(loss - expected["loss"]) <= 1e-5 * expected["loss"]
    assert source.kind == "hf" and source.content_hash.startswith("sha256:")
    assert source.tokenizer is not None and source.tokenizer["kind"] == "tokenizers"
    assert config.num_blocks == 1


def test_xlstm_jax_source_loss_equals_the_reference():
    expected = np.load(os.path.join(XJ, "expected.npz"))
    model, _, source = load_init_model(XJ)
    tokens = jnp.asarray(expected["input_ids"], jnp.int32)
    loss = float(next_token_loss(model, tokens))
    reference = _float64_loss(expected["logits"], expected["input_ids"])
    assert abs(loss - reference) <= 1e-5 * reference
    assert source.kind == "xlstm-jax" and source.tokenizer is None


def test_architecture_is_the_sources():
    for flag, value in (("preset", "large"), ("model", "llama")):
        with pytest.raises(ValueError, match=f"--{flag} .*would change the architecture"):
            TrainConfig(init_from=HF, **{flag: value})
    with pytest.raises(ValueError, match="num_blocks would change the architecture"):
        load_init_model(HF, {"num_blocks": 2})
    with pytest.raises(ValueError, match="--dropout .*needs --init-from"):
        TrainConfig(dropout=0.1)
    _, config, _ = load_init_model(HF, {"context_length": 64, "dropout": 0.25})
    assert (config.context_length, config.dropout) == (64, 0.25)


def test_unknown_source_is_named(tmp_path):
    (tmp_path / "x.txt").write_text("not weights")
    with pytest.raises(ValueError, match="--init-from .*x.txt.* is not a checkpoint"):
        load_init_model(str(tmp_path / "x.txt"))


def _source(kind, tmp_path):
    """``(path, tokenizer flag, the source model, its loss on a batch or None)``."""
    if kind == "hf":
        return HF, "bytes", None
    if kind == "xlstm-jax":
        return XJ, _word_tokenizer(tmp_path / "words.json"), None
    model, config, _ = load_init_model(HF)
    run = save_eqx(model, config, str(tmp_path / "src_run"), tokenizer_file=HF + "/tokenizer.json")
    return run, "bytes", model


def _round_trip(kind, model, config, tmp_path):
    """The trained model written in the source's format and read back."""
    if kind == "hf":
        back, _ = from_hf_pretrained(to_hf(model, config, tmp_path / "back_hf"))
    elif kind == "xlstm-jax":
        save_xlstm_jax_params(to_xlstm_jax(model), tmp_path / "back.safetensors")
        back = from_xlstm_jax(load_xlstm_jax_params(tmp_path / "back.safetensors"), config)
    else:
        back, _, _ = load_run(save_eqx(model, config, str(tmp_path / "back_run")))
    return back


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["hf", "run", "xlstm-jax"])
def test_train_from_source(tmp_path, kind):
    """50 steps from each source: the first batch's loss is the source model's loss on it; the
    loss falls; the trained model written back to the source's format gives the same logits."""
    path, tokenizer, _ = _source(kind, tmp_path)
    cfg = TrainConfig(
        init_from=path, tokenizer=tokenizer, data=[write_corpus(tmp_path)], eod_token="none",
        steps=50, batch_size=4, seq_len=12, lr=3e-3, warmup_steps=2, log_every=1,
        eval_every=50, eval_batches=1, checkpoint_every=50, sample_tokens=0, progress=False,
        out=str(tmp_path / "run"),
    )  # fmt: skip
    prepared = prepare_run(cfg)
    source, _, _ = load_init_model(path)
    first = float(next_token_loss(source, jnp.asarray(prepared.sampler.batch(0))))
    train(cfg, log=quiet)
    losses = [r["loss"] for r in read_metrics(str(tmp_path / "run" / "metrics.jsonl"))]
    assert losses[0] == pytest.approx(first, rel=1e-5)
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:5])
    trained, run, _ = load_run(str(tmp_path / "run"))
    assert run["init_from"]["kind"] == kind
    assert run["init_from"]["path"] == os.path.abspath(path)
    config = prepared.model_config
    back = _round_trip(kind, trained, config, tmp_path)
    tokens = jnp.asarray(prepared.sampler.batch(1)[:, :-1])
    np.testing.assert_array_equal(np.asarray(back(tokens)), np.asarray(trained(tokens)))


@pytest.mark.slow
def test_resume_continues_exactly_without_the_source(tmp_path, capsys):
    """A run from weights stopped at step 3 and resumed after its source was moved away logs the
    losses of a run that never stopped; the moved source is reported, not read."""
    src = tmp_path / "src"
    shutil.copytree(HF, src)
    cfg = TrainConfig(
        init_from=str(src), data=[write_corpus(tmp_path)], eod_token="none", steps=6,
        batch_size=4, seq_len=12, warmup_steps=1, log_every=1, eval_every=6, eval_batches=1,
        checkpoint_every=3, sample_tokens=0, progress=False, out=str(tmp_path / "whole"),
    )  # fmt: skip
    train(cfg, log=quiet)
    stopped = dataclasses.replace(cfg, out=str(tmp_path / "stopped"))
    train(stopped, stop_after_step=3, log=quiet)
    os.rename(src, tmp_path / "moved")
    train(dataclasses.replace(stopped, resume=True), log=quiet)
    assert "changed since this run began" in capsys.readouterr().err
    rows = {
        name: [r["loss"] for r in read_metrics(str(tmp_path / name / "metrics.jsonl"))]
        for name in ("whole", "stopped")
    }
    assert rows["stopped"] == rows["whole"] and len(rows["whole"]) == 6


def _eight_devices(folder):
    proc = start_worker(
        "tests.training.init_from_worker", [str(folder), write_corpus(folder)], 8, folder
    )
    return worker_result(collect("init_from_worker", proc, timeout=900))


@pytest.fixture(scope="module")
def eight(tmp_path_factory):
    return once_per_session(tmp_path_factory, "init_from", _eight_devices)


@pytest.mark.slow
def test_from_hf_pretrained_shards_by_the_mesh(eight):
    """``from_hf_pretrained(path, mesh=fsdp 8)`` without ``parallel=``: every leaf above the FSDP
    size threshold holds 1/8 of its bytes per device; the rest (small) is replicated."""
    leaves, small = eight["bytes"]["leaves"], eight["bytes"]["min_weight_size"]
    big = [(whole, fullest) for size, whole, fullest in leaves if size > small]
    assert len(big) >= 4
    assert all(fullest * 8 <= whole for whole, fullest in big)
    rest = sum(whole for size, whole, _ in leaves if size <= small)
    assert sum(f for _, _, f in leaves) <= sum(w for _, w, _ in leaves) / 8 + rest
    assert eight["bytes"]["init_leaves"] == leaves  # load_init_model(path, mesh=) alike
    assert eight["bytes"]["train_fsdp_modules"] == ["Embed", "LMHead", "mLSTMBlock"]


@pytest.mark.slow
def test_eight_devices_equal_one(eight):
    assert eight["logits"] <= 1e-5
    np.testing.assert_allclose(eight["losses"]["mesh"], eight["losses"]["one"], rtol=1e-5)


@pytest.mark.slow
def test_lora_on_eight_devices_equals_one(eight):
    """``--init-from --lora-rank 4 --mesh dp=2,fsdp=4``, stopped after step 2 and resumed (the
    base read again into its shardings), logs one device's losses."""
    lora = eight["lora"]
    assert len(lora["mesh"]) == len(lora["one"]) == 4
    np.testing.assert_allclose(lora["mesh"], lora["one"], rtol=1e-5)


@pytest.mark.slow
def test_cli_from_another_directory(tmp_path, monkeypatch, capsys):
    """What a user types, with relative paths from their own directory."""
    shutil.copytree(HF, tmp_path / "model")
    write_corpus(tmp_path, "notes.txt")
    monkeypatch.chdir(tmp_path)
    args = ["train", "--init-from", "model", "--data", "notes.txt", "--eod-token", "none"]
    args += ["--steps", "3", "--batch-size", "2", "--seq-len", "12", "--out", "ft"]
    args += ["--no-progress", "--sample-tokens", "0", "--eval-every", "3", "--eval-batches", "1"]
    assert main([*args, "--preset", "large"]) == 2
    assert "--preset" in capsys.readouterr().err
    assert main(args) == 0
    run = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert run["init_from"]["path"] == str(tmp_path / "model")
    assert run["tokenizer"]["path"] == str(tmp_path / "ft" / "tokenizer.json")  # a copy
    assert main(["convert", "--from", "eqx", "--to", "hf", "ft", "exported"]) == 0
    assert (tmp_path / "exported" / "tokenizer.json").is_file()


def test_checksums_in_batches_equal_one_call(monkeypatch):
    """Checkpoint checksums are computed in batches of bounded bytes (the save's peak memory):
    the values are those of one call over every leaf."""
    from xlstm_eqx.training import leaf_checksums as sums

    model, _, _ = load_init_model(HF)
    leaves = [x for x in jax.tree.leaves(model) if isinstance(x, jax.Array)]
    whole = sums.leaf_checksums(leaves)
    monkeypatch.setattr(sums, "_BATCH_BYTES", 4096)
    assert len(sums._batches(leaves, list(range(len(leaves))))) > len(leaves) // 2
    assert sums.leaf_checksums(leaves) == whole


def test_run_source_newest_or_a_given_checkpoint(tmp_path):
    """A run directory gives its newest checkpoint; ``RUN/checkpoints/step_N`` that one."""
    from xlstm_eqx.training.orbax_checkpoint import list_checkpoints, save_checkpoint

    model, config, _ = load_init_model(HF)
    run = save_eqx(model, config, str(tmp_path / "run"), tokenizer_file="bytes")
    scaled = jax.tree.map(lambda x: x * 2 if isinstance(x, jax.Array) else x, model)
    record = json.loads((tmp_path / "run" / "config.json").read_text())
    save_checkpoint(
        tmp_path / "run" / "checkpoints", 7, {"model": scaled}, {"step": 7, "run_config": record}
    )
    tokens = jnp.asarray(np.arange(24).reshape(2, 12), jnp.int32)
    newest, _, source = load_init_model(run)
    assert source.step == 7 and source.tokenizer == {"kind": "bytes"}
    np.testing.assert_array_equal(np.asarray(newest(tokens)), np.asarray(scaled(tokens)))
    first = list_checkpoints(tmp_path / "run" / "checkpoints")[0][1]
    given, _, source = load_init_model(first)
    assert source.step == 0 and source.checkpoint == os.path.abspath(first)
    np.testing.assert_array_equal(np.asarray(given(tokens)), np.asarray(model(tokens)))
