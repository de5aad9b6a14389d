"""The training loop: exact resume, NaN stop, bad input, optimizer details, files written."""

import dataclasses
import json
import math
import os
import signal

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from tests.corpus import TEXT
from xlstm_eqx import ModelFamily, register_model_family
from xlstm_eqx.training import (
    CheckpointError,
    TrainConfig,
    TrainingDivergedError,
    default_decay_mask,
    evaluate_run,
    latest_checkpoint,
    learning_rate_schedule,
    list_checkpoints,
    make_optimizer,
    make_train_step,
    read_metrics,
    sample_tokens,
    train,
    trainable_params,
)
from xlstm_eqx.training.leaf_checksums import with_meta_digest


# --- a throwaway causal LM: fast to compile, same protocol as the real models -----------------


@dataclasses.dataclass
class ToyConfig:
    vocab_size: int = 256
    embedding_dim: int = 16
    context_length: int = 64
    dtype: str = "float32"
    weight_decay_on_embedding: bool = False

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d):
        return cls(**d)


class ToyLM(eqx.Module):
    embedding: jax.Array
    kernel: jax.Array
    bias: jax.Array
    head_kernel: jax.Array
    dtype: str = eqx.field(static=True)

    def __init__(self, config, *, key):
        k1, k2, k3 = jr.split(key, 3)
        V, D = config.vocab_size, config.embedding_dim
        self.embedding = jr.normal(k1, (V, D)) * 0.5
        self.kernel = jr.normal(k2, (D, D)) / math.sqrt(D)
        self.bias = jnp.zeros((D,))
        self.head_kernel = jr.normal(k3, (D, V)) / math.sqrt(D)
        self.dtype = config.dtype

    def __call__(self, tokens, *, key=None, document_borders=None):
        dt = jnp.dtype(self.dtype)
        x = self.embedding[tokens].astype(dt)
        S = tokens.shape[1]
        c = jnp.cumsum(x, axis=1) / jnp.arange(1, S + 1, dtype=dt)[None, :, None]
        h = jnp.tanh(c @ self.kernel.astype(dt) + self.bias.astype(dt)) + x
        return (h @ self.head_kernel.astype(dt)).astype(jnp.float32)


register_model_family(
    ModelFamily(
        "toy",
        ToyConfig,
        lambda config, *, key: ToyLM(config, key=key),
        lambda: {"tiny": ToyConfig, "short": lambda: ToyConfig(context_length=8)},
    )
)


def toy_config(tmp_path, data_file, **kw):
    base = dict(
        model="toy",
        preset="tiny",
        data=[data_file],
        seq_len=16,
        batch_size=4,
        steps=6,
        lr=1e-2,
        warmup_steps=1,
        log_every=1,
        eval_every=3,
        eval_batches=2,
        checkpoint_every=2,
        progress=False,
        sample_tokens=0,
        out=str(tmp_path / "run"),
    )
    base.update(kw)
    return TrainConfig(**base)


def quiet(msg):
    pass


def _snapshot(root):
    """Every file under root with its bytes: to show nothing already written was lost."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = fh.read()
    return out


# --- resume ----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("model,grad_accum", [("toy", 1), ("toy", 2), ("xlstm", 1)])
def test_resume_gives_identical_losses(tmp_path, data_file, model, grad_accum):
    kw = dict(model=model, grad_accum=grad_accum)
    full = train(toy_config(tmp_path / "a", data_file, **kw), log=quiet)
    assert sorted(full.losses) == [1, 2, 3, 4, 5, 6]

    cfg_b = toy_config(tmp_path / "b", data_file, checkpoint_every=100, **kw)
    first = train(cfg_b, stop_after_step=3, log=quiet)  # "interrupted" after step 3
    assert sorted(first.losses) == [1, 2, 3]
    assert [s for s, _ in list_checkpoints(os.path.join(cfg_b.out, "checkpoints"))] == [3]
    second = train(dataclasses.replace(cfg_b, resume=True), log=quiet)
    assert sorted(second.losses) == [4, 5, 6]

    resumed = {**first.losses, **second.losses}
    assert resumed == full.losses  # float32 on CPU: bit-identical
    a = read_metrics(os.path.join(full.out_dir, "metrics.jsonl"))
    b = read_metrics(os.path.join(second.out_dir, "metrics.jsonl"))
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(a, b, strict=True):
        for k in ("step", "loss", "lr", "grad_norm", "eval_loss", "bits_per_byte"):
            assert ra.get(k) == rb.get(k)
    for x, y in zip(jax.tree.leaves(full.model), jax.tree.leaves(second.model), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_ctrl_c_saves_then_resume_is_exact(tmp_path, data_file):
    full = train(toy_config(tmp_path / "a", data_file, steps=4), log=quiet)

    def interrupt_at_first_eval(msg):
        if msg.startswith("step 2:"):  # logged at the eval of step 2, mid-run
            os.kill(os.getpid(), signal.SIGINT)

    cfg = toy_config(tmp_path / "b", data_file, steps=4, eval_every=2, checkpoint_every=100)
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, log=interrupt_at_first_eval)
    assert [s for s, _ in list_checkpoints(os.path.join(cfg.out, "checkpoints"))] == [2]
    assert signal.getsignal(signal.SIGINT) is handler  # the handler is restored
    rest = train(dataclasses.replace(cfg, resume=True), log=quiet)
    assert sorted(rest.losses) == [3, 4]
    assert [rest.losses[s] for s in (3, 4)] == [full.losses[s] for s in (3, 4)]


def test_resume_errors_keep_files(tmp_path, data_file):
    cfg = toy_config(tmp_path, data_file, steps=2)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(dataclasses.replace(cfg, resume=True), log=quiet)
    assert not os.path.exists(cfg.out)
    train(cfg, log=quiet)
    before = _snapshot(cfg.out)
    # a second run into the same directory without --resume
    with pytest.raises(FileExistsError, match="--resume"):
        train(cfg, log=quiet)
    # resuming with a config that changes what is computed
    with pytest.raises(ValueError, match=r"lr: checkpoint has 0.01, given 0.02"):
        train(dataclasses.replace(cfg, resume=True, lr=0.02), log=quiet)
    assert _snapshot(cfg.out) == before
    # a damaged checkpoint: the error names it, nothing is overwritten
    ckpt = latest_checkpoint(os.path.join(cfg.out, "checkpoints"))
    damaged = 0
    for dirpath, _, files in os.walk(os.path.join(ckpt, "model")):
        if os.path.basename(dirpath) == "d":  # the OCDBT data files
            for name in files:
                with open(os.path.join(dirpath, name), "wb") as f:
                    f.write(b"not tensorstore data")
                damaged += 1
    assert damaged
    before = _snapshot(cfg.out)
    with pytest.raises(CheckpointError, match=r"cannot read model/"):
        train(dataclasses.replace(cfg, resume=True, steps=4), log=quiet)
    assert _snapshot(cfg.out) == before


def test_resume_into_a_mismatched_model(tmp_path, data_file):
    cfg = toy_config(tmp_path, data_file, steps=2)
    train(cfg, log=quiet)
    ckpt = latest_checkpoint(os.path.join(cfg.out, "checkpoints"))
    meta_path = os.path.join(ckpt, "meta", "metadata")  # the checkpoint's JSON item
    with open(meta_path) as f:
        meta = json.load(f)
    meta["metadata"]["run_config"]["model_config"]["embedding_dim"] = 8
    with open(meta_path, "w") as f:  # sealed again: a whole checkpoint of another model, not damage
        json.dump(with_meta_digest(meta), f)
    before = _snapshot(cfg.out)
    with pytest.raises(
        CheckpointError, match=r"model\.embedding: checkpoint has float32\[256, 16\]"
    ):
        train(dataclasses.replace(cfg, resume=True, steps=3), log=quiet)
    assert _snapshot(cfg.out) == before


# --- NaN / inf ---------------------------------------------------------------------------------


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, data_file):
    # Adam steps have size ~lr whatever the gradient: lr=1e30 overflows the logits at step 2.
    cfg = toy_config(
        tmp_path, data_file, lr=1e30, warmup_steps=0, weight_decay=0.0, checkpoint_every=1, steps=5
    )
    with pytest.raises(TrainingDivergedError, match=r"stopped at step 2: loss nan") as info:
        train(cfg, log=quiet)
    assert info.value.step == 2
    ckpts = list_checkpoints(os.path.join(cfg.out, "checkpoints"))
    assert [s for s, _ in ckpts] == [1]
    assert str(ckpts[0][1]) in str(info.value)
    rows = read_metrics(os.path.join(cfg.out, "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1] and math.isfinite(rows[0]["loss"])
    # the last good checkpoint is intact and loadable
    result = evaluate_run(cfg.out)
    assert result.step == 1


# --- bad input ---------------------------------------------------------------------------------


def test_bad_input_fails_before_writing(tmp_path, data_file):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"seq_len=16 exceeds the model's context_length=8"):
        train(toy_config(tmp_path, data_file, preset="short"), log=quiet)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        train(toy_config(tmp_path, str(tmp_path / "missing.txt")), log=quiet)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty.txt"):
        train(toy_config(tmp_path, str(empty)), log=quiet)
    with pytest.raises(ValueError, match="unknown preset 'huge'.*short, tiny"):
        train(toy_config(tmp_path, data_file, preset="huge"), log=quiet)
    with pytest.raises(ValueError, match="TrainConfig.batch_size"):
        train(toy_config(tmp_path, data_file, batch_size=0), log=quiet)
    with pytest.raises(ValueError, match="TrainConfig.dtype"):
        train(toy_config(tmp_path, data_file, dtype="float16"), log=quiet)
    with pytest.raises(ValueError, match="warmup_steps"):
        train(toy_config(tmp_path, data_file, warmup_steps=6), log=quiet)
    # token ids outside the vocabulary: a model-config file with a 64-token vocab, byte data
    model_file = tmp_path / "toy64.json"
    model_file.write_text(json.dumps({"kind": "toy", **ToyConfig(vocab_size=64).to_dict()}))
    with pytest.raises(ValueError, match=r"training data contains token id \d+.*vocab_size=64"):
        train(toy_config(tmp_path, data_file, model=str(model_file)), log=quiet)
    with pytest.raises(FileNotFoundError, match="nomodel.json"):
        train(toy_config(tmp_path, data_file, model=str(tmp_path / "nomodel.json")), log=quiet)
    assert not out.exists()


# --- the files of a run --------------------------------------------------------------------------


def test_run_files_and_sample(tmp_path, data_file):
    cfg = toy_config(tmp_path, data_file, steps=4, sample_tokens=5, sample_prompt="The ")
    lines = []
    result = train(cfg, log=lines.append)
    out = cfg.out
    with open(os.path.join(out, "config.json")) as f:
        run = json.load(f)
    assert run["train"] == cfg.to_dict()
    assert run["model_kind"] == "toy" and run["model_config"]["vocab_size"] == 256
    assert run["tokenizer"] == {"kind": "bytes"}
    rows = read_metrics(os.path.join(out, "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) for r in rows)
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [3, 4]
    for r in evals:
        assert r["bits_per_byte"] == pytest.approx(r["eval_loss"] / math.log(2))
    with open(os.path.join(out, "loss.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    assert summary["step"] == 4 and summary["bits_per_byte"] == result.bits_per_byte
    assert result.unigram_bits_per_byte > 0
    assert len(result.sample.encode("utf-8", errors="replace")) >= 1
    assert any("unigram baseline" in line for line in lines)
    assert any("sample" in line for line in lines)
    # keep-last-N with checkpoint_every=2: steps 2 and 4
    assert [s for s, _ in list_checkpoints(os.path.join(out, "checkpoints"))] == [2, 4]
    ev = evaluate_run(out)
    assert ev.step == 4 and ev.eval_loss == pytest.approx(result.eval_loss, rel=1e-6)


@pytest.mark.slow
def test_learns_a_repetitive_text(tmp_path, data_file):
    cfg = toy_config(tmp_path, data_file, steps=30, lr=3e-2, warmup_steps=2, eval_every=30)
    result = train(cfg, log=quiet)
    first = np.mean([result.losses[s] for s in (1, 2, 3)])
    last = np.mean([result.losses[s] for s in (28, 29, 30)])
    assert last < first - 1.0
    assert result.bits_per_byte < result.unigram_bits_per_byte


def test_tokenizer_json_run_reports_bits_per_byte(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"],
    )
    tok.train_from_iterator([TEXT], trainer)
    eod = tok.token_to_id("<|endoftext|>")
    tok_path = str(tmp_path / "tokenizer.json")
    tok.save(tok_path)
    docs = tmp_path / "docs.jsonl"
    docs.write_text(
        "".join(json.dumps({"text": TEXT[i * 400 : (i + 1) * 400]}) + "\n" for i in range(8))
    )
    cfg = toy_config(
        tmp_path, str(docs), tokenizer=tok_path, eval_fraction=0.25, steps=2, eval_every=2
    )
    result = train(cfg, log=quiet)
    with open(os.path.join(cfg.out, "config.json")) as f:
        run = json.load(f)
    vocab = tok.get_vocab_size()
    assert run["model_config"]["vocab_size"] == 64 * math.ceil(vocab / 64)
    # Every 4th document is held out, each tokenized on its own, with the end-of-document token
    # between them (counted as one byte).
    held = [TEXT[i * 400 : (i + 1) * 400] for i in (3, 7)]
    held_ids = tok.encode(held[0]).ids + [eod] + tok.encode(held[1]).ids
    held_bytes = sum(len(d.encode()) for d in held) + 1
    assert run["data"]["heldout_tokens"] == len(held_ids) and run["data"]["eod_id"] == eod
    expected = result.eval_loss / math.log(2) * len(held_ids) / held_bytes
    assert result.bits_per_byte == pytest.approx(expected, rel=1e-9)
    assert len(held_ids) < held_bytes  # BPE: fewer tokens than bytes


def test_bfloat16_compute_keeps_float32_params(tmp_path, data_file):
    result = train(toy_config(tmp_path, data_file, steps=2, dtype="bfloat16"), log=quiet)
    assert all(math.isfinite(v) for v in result.losses.values())
    assert result.model_config.dtype == "bfloat16"
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(result.model))


# --- optimizer and step units -----------------------------------------------------------------


def test_decay_mask_rule():
    model = ToyLM(ToyConfig(), key=jr.key(0))
    mask = default_decay_mask(trainable_params(model))
    assert (mask.embedding, mask.kernel, mask.bias, mask.head_kernel) == (False, True, False, True)
    mask = default_decay_mask(trainable_params(model), decay_embedding=True)
    assert mask.embedding is True


@pytest.mark.parametrize("on_embedding", [False, True])
def test_weight_decay_applies_to_kernels_only(on_embedding):
    config = ToyConfig(weight_decay_on_embedding=on_embedding)
    model = ToyLM(config, key=jr.key(1))
    cfg = TrainConfig(steps=10, lr=0.5, warmup_steps=0, weight_decay=0.1, grad_clip=None)
    opt = make_optimizer(cfg, model, config)
    params = trainable_params(model)
    zeros = jax.tree.map(jnp.zeros_like, params)
    with jax.numpy_dtype_promotion("standard"):
        state = opt.init(params)
        updates, _ = opt.update(zeros, state, params)
    # zero gradients: Adam's part is 0, so the update is -lr * wd * param where decayed
    for name in ("embedding", "kernel", "bias", "head_kernel"):
        p = np.asarray(getattr(params, name), np.float64)
        u = np.asarray(getattr(updates, name), np.float64)
        decayed = name.endswith("kernel") or (name == "embedding" and on_embedding)
        np.testing.assert_allclose(u, -0.5 * 0.1 * p if decayed else 0 * p, rtol=1e-6, atol=1e-9)


def test_schedule_warmup_then_cosine():
    cfg = TrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    sched = learning_rate_schedule(cfg)
    with jax.numpy_dtype_promotion("standard"):
        values = [float(sched(i)) for i in (0, 5, 10, 55, 100)]
    cos_mid = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 45 / 90))
    np.testing.assert_allclose(values, [0.0, 0.5, 1.0, cos_mid, 0.1], rtol=1e-5, atol=1e-7)
    assert TrainConfig(steps=50).resolved_warmup() == 5


def test_grad_accumulation_equals_the_big_batch():
    config = ToyConfig()
    cfg = TrainConfig(steps=10, lr=1e-2, warmup_steps=0, grad_clip=1.0)
    batch = jr.randint(jr.key(3), (4, 9), 0, 256)
    results = []
    for shape in [(1, 4, 9), (2, 2, 9), (4, 1, 9)]:
        model = ToyLM(config, key=jr.key(2))
        opt = make_optimizer(cfg, model, config)
        with jax.numpy_dtype_promotion("standard"):
            state = opt.init(trainable_params(model))
        step = make_train_step(opt)
        model, state, loss, gnorm = step((batch.reshape(shape), jr.key(0)), model, state)
        results.append((model, float(loss), float(gnorm)))
    for model, loss, gnorm in results[1:]:
        assert loss == pytest.approx(results[0][1], rel=1e-5)
        assert gnorm == pytest.approx(results[0][2], rel=1e-5)
        for x, y in zip(jax.tree.leaves(model), jax.tree.leaves(results[0][0]), strict=True):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)


def test_sampling_window_matches_unpadded_forward():
    model = ToyLM(ToyConfig(), key=jr.key(4))
    prompt = [72, 101, 108]
    got = sample_tokens(model, prompt, 6, window=12, temperature=0.0, key=jr.key(0))
    seq = list(prompt)
    for _ in range(6):  # independent: greedy over the unpadded sequence
        logits = model(jnp.asarray([seq[-12:]], jnp.int32))
        seq.append(int(np.argmax(np.asarray(logits[0, -1]))))
    assert got == seq[len(prompt) :]
