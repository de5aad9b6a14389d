"""Supervised fine-tuning data: records, chat templates, packing with a loss mask and document
borders through the token store and the loader, the completion-only loss, and isolation of
packed examples in the models."""

import json
import os
import subprocess
import sys
import threading

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from xlstm_eqx.data import ByteTokenizer, load_corpus
from xlstm_eqx.data.batch import FLAG_BORDER, FLAG_TARGET, TokenBatch
from xlstm_eqx.data.corpus import BatchSampler, eval_windows
from xlstm_eqx.data.loader import BatchLoader
from xlstm_eqx.data.sft import (
    ChatTemplate,
    SFTRecordError,
    load_chat_template,
    read_examples,
    tokenize_example,
)
from xlstm_eqx.data.tokenizer import HFTokenizer
from xlstm_eqx.models import build_model
from xlstm_eqx.presets import get_preset
from xlstm_eqx.training.loss import next_token_loss
from xlstm_eqx.training.packing import isolate_documents


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

EXAMPLES = [
    {"prompt": "2+2=", "completion": "4"},
    {"prompt": "Capital of France? ", "completion": "Paris."},
    {"prompt": "", "completion": "hello there"},
    {"prompt": "Say hi: ", "completion": "hi"},
    {"prompt": "x", "completion": "yz"},
]


def _jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _expected_rows(records, row, eod=0):
    """Greedy packing computed here from the bytes: `(tokens, flags)` rows."""
    rows, cur_t, cur_f = [], [], []

    def close():
        nonlocal cur_t, cur_f
        if cur_t:
            pad = row - len(cur_t)
            cur_t += [eod] * pad
            cur_f += [FLAG_BORDER] + [0] * (pad - 1) if pad else []
            rows.append((cur_t, cur_f))
        cur_t, cur_f = [], []

    for r in records:
        p, c = list(r["prompt"].encode()), list(r["completion"].encode())
        t = p + c + [eod]
        f = [0] * len(p) + [FLAG_TARGET] * (len(c) + 1)
        f[0] = FLAG_BORDER  # the first token is never a target
        if len(cur_t) + len(t) > row:
            close()
        cur_t, cur_f = cur_t + t, cur_f + f
    close()
    return rows


def test_packed_store_round_trip_keeps_tokens_mask_and_borders(tmp_path):
    """The store's rows (tokens and flags) equal a greedy packing computed from the bytes; a
    second open reads the cached store; a damaged flags file is rebuilt, not used."""
    data = _jsonl(tmp_path / "sft.jsonl", EXAMPLES)
    cache = str(tmp_path / "cache")
    row = 32
    c = load_corpus([data], ByteTokenizer(), eval_fraction=0.5, cache_dir=cache, packed_row=row)
    assert c.train_flags is not None and c.heldout_flags is not None and c.packed_row == row
    # every 2nd example held out (k = 2): train 0, 2, 4; held out 1, 3
    for records, tokens, flags in (
        ([EXAMPLES[0], EXAMPLES[2], EXAMPLES[4]], c.train_reader, c.train_flags),
        ([EXAMPLES[1], EXAMPLES[3]], c.heldout_reader, c.heldout_flags),
    ):
        want = _expected_rows(records, row)
        got_t = np.asarray(tokens).reshape(-1, row)
        got_f = np.asarray(flags).reshape(-1, row)
        np.testing.assert_array_equal(got_t, [t for t, _ in want])
        np.testing.assert_array_equal(got_f, [f for _, f in want])
    again = load_corpus([data], ByteTokenizer(), eval_fraction=0.5, cache_dir=cache, packed_row=row)
    assert again.store_dir == c.store_dir
    np.testing.assert_array_equal(np.asarray(again.train_flags), np.asarray(c.train_flags))
    # damage one flag byte: the store is rebuilt (the flags are block-hashed like the tokens)
    assert c.store_dir is not None
    path = os.path.join(c.store_dir, "train.flags")
    with open(path, "r+b") as f:
        raw = bytearray(f.read())
        raw[3] ^= FLAG_TARGET
        f.seek(0)
        f.write(raw)
    rebuilt = load_corpus(
        [data], ByteTokenizer(), eval_fraction=0.5, cache_dir=cache, packed_row=row
    )
    np.testing.assert_array_equal(np.asarray(rebuilt.train_flags), np.asarray(c.train_flags))


def test_max_data_bytes_keeps_whole_examples_up_to_the_one_that_crosses_it(tmp_path):
    """--max-data-bytes on fine-tuning data: the whole examples whose text fits together; reading
    stops at the first one that would cross the cap, so a bad record after it is never read."""
    path = tmp_path / "sft.jsonl"
    _jsonl(path, EXAMPLES[:4])
    with open(path, "a") as f:
        f.write('{"prompt": "never read"}\n')
    cap = sum(len((r["prompt"] + r["completion"]).encode()) for r in EXAMPLES[:3])
    row = 32
    kw = {"eval_fraction": 0.5, "cache_dir": str(tmp_path / "c"), "packed_row": row}
    c = load_corpus([str(path)], ByteTokenizer(), max_bytes=cap, **kw)
    # every 2nd example held out (k = 2): train 0, 2; held out 1
    for records, tokens in ((EXAMPLES[0:3:2], c.train_reader), ([EXAMPLES[1]], c.heldout_reader)):
        got = np.asarray(tokens).reshape(-1, row)
        np.testing.assert_array_equal(got, [t for t, _ in _expected_rows(records, row)])
    with pytest.raises(SFTRecordError, match=r"sft\.jsonl:5: missing field 'completion'"):
        load_corpus([str(path)], ByteTokenizer(), max_bytes=cap + 100, **kw)


def test_loader_and_eval_batches_carry_mask_and_borders(tmp_path):
    data = _jsonl(tmp_path / "sft.jsonl", EXAMPLES * 4)
    c = load_corpus(
        [data], ByteTokenizer(), eval_fraction=0.25, cache_dir=str(tmp_path / "c"), packed_row=24
    )
    sampler = BatchSampler(c.train_reader, seq_len=23, batch_size=2, seed=0, flags=c.train_flags)
    rows = np.asarray(c.train_reader).reshape(-1, 24)
    flags = np.asarray(c.train_flags).reshape(-1, 24)
    with BatchLoader(sampler, grad_accum=2, start_step=0, end_step=1) as loader:
        step, batch = next(loader)
    assert step == 1 and isinstance(batch, TokenBatch)
    assert all(np.shape(x) == (2, 2, 24) for x in batch)
    # each row of the batch is one stored row, with its own flags
    for a in range(2):
        for b in range(2):
            i = int(np.flatnonzero((rows == np.asarray(batch.tokens[a, b])).all(1))[0])
            np.testing.assert_array_equal(batch.loss_mask[a, b], (flags[i] & FLAG_TARGET) != 0)
            np.testing.assert_array_equal(
                batch.document_borders[a, b], (flags[i] & FLAG_BORDER) != 0
            )
    evals = eval_windows(
        c.heldout_reader, seq_len=23, batch_size=2, max_batches=4, flags=c.heldout_flags
    )
    assert evals and all(isinstance(e, TokenBatch) and e.tokens.shape[1] == 24 for e in evals)


def _tiny(name, *, layer_type=None):
    config = get_preset(name)
    if layer_type is not None:
        d = config.to_dict()
        d["mlstm_block"]["mlstm"]["layer_type"] = layer_type
        config = type(config).from_dict(d)
    return config


@eqx.filter_jit
def _logits(model, tokens, borders):
    return model(tokens, document_borders=borders)


def _per_token_losses(model, batch):
    """Cross-entropy of every next token, in float64 NumPy from the model's logits."""
    logits = np.asarray(
        _logits(model, batch.tokens[:, :-1], batch.document_borders[:, :-1]), np.float64
    )
    shifted = logits - logits.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    targets = np.asarray(batch.tokens[:, 1:])
    return -np.take_along_axis(logp, targets[..., None], -1)[..., 0]


def test_completion_only_loss_equals_direct_computation(tmp_path):
    """`next_token_loss` on a packed batch = the float64 masked mean of the cross-entropy from the
    model's own logits, over exactly the completion bytes (and their end tokens)."""
    data = _jsonl(tmp_path / "sft.jsonl", EXAMPLES * 2)
    c = load_corpus(
        [data], ByteTokenizer(), eval_fraction=0.2, cache_dir=str(tmp_path / "c"), packed_row=33
    )
    sampler = BatchSampler(c.train_reader, seq_len=32, batch_size=2, seed=1, flags=c.train_flags)
    batch = TokenBatch(*(jnp.asarray(x) for x in sampler.batch_rows(0, 0, 2)))
    config = isolate_documents(_tiny("tiny_xlstm"))
    config = type(config).from_dict({**config.to_dict(), "vocab_size": 256})
    model = build_model(config, key=jr.key(0))
    ce = _per_token_losses(model, batch)
    mask = np.asarray(batch.loss_mask[:, 1:] & ~batch.document_borders[:, 1:])
    # the targets are the completions' bytes and the end-of-document byte after each
    completions = {r["completion"].encode() + b"\0" for r in EXAMPLES}
    targets = np.asarray(batch.tokens[:, 1:])
    for r in range(2):
        spans = np.split(targets[r], np.flatnonzero(np.diff(mask[r].astype(int))) + 1)
        kept = np.split(mask[r], np.flatnonzero(np.diff(mask[r].astype(int))) + 1)
        for span, keep in zip(spans, kept, strict=True):
            if keep[0]:
                assert bytes(span.astype(np.uint8).tolist()) in completions
    want = (ce * mask).sum() / mask.sum()
    got = float(eqx.filter_jit(next_token_loss)(model, batch))
    np.testing.assert_allclose(got, want, rtol=2e-6)
    assert got != pytest.approx(float(ce.mean()), rel=1e-3)  # the mask matters


@pytest.mark.parametrize(
    "name,layer_type",
    [("tiny_xlstm", "mlstm"), ("tiny_xlstm", "mlstm_v1"), ("tiny_llama", None)],
)
def test_packed_examples_do_not_see_each_other(name, layer_type):
    """Three examples packed in one row: changing the middle one leaves the per-token losses of
    the other two unchanged (memory reset, conv reset, same-document attention); the same model
    given one document over the row sees the change (so the test can fail)."""
    lengths = [7, 9, 8]
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 64, size=(1, sum(lengths)))
    borders = np.zeros_like(tokens, bool)
    borders[0, np.cumsum([0, *lengths[:-1]])] = True
    changed = tokens.copy()
    middle = slice(lengths[0] + 1, lengths[0] + lengths[1])
    changed[0, middle] = rng.integers(1, 64, lengths[1] - 1)
    # targets (positions of tokens[1:]) outside the middle example
    others = np.r_[0 : lengths[0] - 1, lengths[0] + lengths[1] : sum(lengths) - 1]
    model = build_model(isolate_documents(_tiny(name, layer_type=layer_type)), key=jr.key(3))
    ones = jnp.ones(tokens.shape, bool)

    def losses(toks, row_borders):
        batch = TokenBatch(jnp.asarray(toks), ones, jnp.asarray(row_borders))
        return _per_token_losses(model, batch)[0]

    a, b = losses(tokens, borders), losses(changed, borders)
    np.testing.assert_allclose(a[others], b[others], rtol=1e-5, atol=1e-6)
    assert not np.allclose(a[middle], b[middle])
    one_document = np.zeros_like(borders)
    one_document[0, 0] = True
    leaky_a, leaky_b = losses(tokens, one_document), losses(changed, one_document)
    assert not np.allclose(leaky_a[others], leaky_b[others], rtol=1e-5, atol=1e-6)


def test_sft_refuses_slstm_models():
    with pytest.raises(ValueError, match="sLSTM"):
        isolate_documents(get_preset("tiny_xlstm_slstm"))


TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _tokenizer_dir(tmp_path, template):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(sorted(alphabet))}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "<|endoftext|>"])
    folder = tmp_path / "tok"
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    config = {"bos_token": {"content": "<s>"}, "eos_token": "<|endoftext|>"}
    if template is not None:
        config["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return str(folder)


def test_messages_render_with_the_chat_template(tmp_path):
    """A chat renders as the template writes it; the assistant turns (with their end text) are
    the targets, everything else is not."""
    from xlstm_eqx.data import load_tokenizer

    tokenizer = load_tokenizer(_tokenizer_dir(tmp_path, TEMPLATE))
    template = load_chat_template(tokenizer)
    assert isinstance(template, ChatTemplate)
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Bye."},
    ]
    path = _jsonl(tmp_path / "chat.jsonl", [{"messages": chat}])
    (example,) = read_examples([path], template)
    assert "".join(t for t, _ in example.segments) == (
        "<s><|system|>Be brief.<|end|>\n<|user|>Hi<|end|>\n<|assistant|>Hello!<|end|>\n"
        "<|user|>Bye<|end|>\n<|assistant|>Bye.<|end|>\n"
    )
    assert [t for t, is_target in example.segments if is_target] == [
        "Hello!<|end|>\n",
        "Bye.<|end|>\n",
    ]
    ids, targets = tokenize_example(tokenizer, example, None)
    assert tokenizer.decode(ids[targets]) == "Hello!<|end|>\nBye.<|end|>\n"
    assert isinstance(tokenizer, HFTokenizer)
    assert ids[0] == tokenizer.token_to_id("<s>")  # the special token, not its characters


def test_messages_without_a_chat_template_are_an_error(tmp_path):
    from xlstm_eqx.data import load_tokenizer

    tokenizer = load_tokenizer(_tokenizer_dir(tmp_path, None))
    assert load_chat_template(tokenizer) is None
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    path = _jsonl(tmp_path / "chat.jsonl", [{"messages": chat}])
    with pytest.raises(SFTRecordError, match=r"chat\.jsonl:1: .*chat template"):
        list(read_examples([path], None))


@pytest.mark.parametrize(
    "line,match",
    [
        ('{"prompt": "a"}', r":2: missing field 'completion'"),
        ('{"prompt": 3, "completion": "b"}', r":2: field 'prompt' must be a string, got int"),
        ('{"prompt": "a", "completion": ""}', r":2: field 'completion' is empty"),
        ('{"prompt": "a", "completion": "b"', r":2: invalid JSON"),
        pytest.param("[" * 100_000 + "]" * 100_000, r":2: JSON nested too deeply", id="deep"),
        ("[1, 2]", r":2: a record must be a JSON object, got list"),
        ('{"messages": [{"role": "user"}]}', r":2: field 'messages\[0\]\.content' must be a str"),
        ('{"messages": [{"role": "user", "content": "x"}]}', r":2: .*no non-empty 'assistant'"),
    ],
)
def test_bad_records_name_file_line_and_field(tmp_path, line, match):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "ok", "completion": "fine"}\n' + line + "\n")
    with pytest.raises(SFTRecordError, match=r"bad\.jsonl" + match):
        load_corpus([str(path)], ByteTokenizer(), cache_dir=str(tmp_path / "c"), packed_row=16)


def test_sft_input_that_is_not_a_regular_file_is_refused_at_once(tmp_path):
    """A FIFO (or device) as SFT input is an error naming it, not a read that waits forever."""
    fifo = str(tmp_path / "chat.jsonl")
    os.mkfifo(fifo)
    outcome: list[BaseException | None] = []

    def read():
        try:
            list(read_examples([fifo], None))
            outcome.append(None)
        except BaseException as e:  # noqa: BLE001  (handed to the test thread)
            outcome.append(e)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout=10)
    if reader.is_alive():  # blocked in open(): a writer's open and close let it end
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        reader.join(timeout=10)
        pytest.fail("reading a FIFO as SFT input waited for a writer")
    assert isinstance(outcome[0], ValueError), outcome
    assert f"data path {fifo!r} is not a regular file" in str(outcome[0])


def test_bad_sft_record_leaves_no_folder_behind(tmp_path, monkeypatch, capsys):
    """`train --out runs/x` from another directory with a bad record: the one-line error names
    file:line and field, and neither the run folder nor its parents made for it are left; a
    parent that was there stays."""
    from xlstm_eqx.cli import main

    scratch = tmp_path / "scratch"
    _jsonl(scratch / "bad.jsonl", [{"prompt": "a"}])
    (scratch / "kept").mkdir()
    monkeypatch.chdir(scratch)
    for out in ("runs/x", "deep/er/x", "kept/x"):
        args = ["train", "--out", out, "--data", "bad.jsonl", "--data-format", "sft"]
        assert main([*args, "--preset", "tiny", "--no-progress"]) == 2
        assert "bad.jsonl:1: missing field 'completion'" in capsys.readouterr().err
    assert sorted(os.listdir(scratch)) == ["bad.jsonl", "kept"]
    assert os.listdir(scratch / "kept") == []


@pytest.mark.slow
def test_cli_trains_on_sft_jsonl_from_another_directory(tmp_path):
    """`xlstm-eqx train --data-format sft` with relative paths from the data's folder: the run
    records packed-data numbers and its loss falls."""
    work = tmp_path / "work"
    _jsonl(work / "data" / "train.jsonl", EXAMPLES * 8)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, *filter(None, [env.get("PYTHONPATH")])])
    env["JAX_PLATFORMS"] = "cpu"
    args = [
        sys.executable, "-m", "xlstm_eqx.cli", "train", "--data", "data/train.jsonl",
        "--data-format", "sft", "--preset", "tiny", "--seq-len", "32", "--batch-size", "4",
        "--steps", "6", "--lr", "3e-3", "--warmup-steps", "1", "--eval-every", "6",
        "--data-cache", "cache", "--out", "run", "--no-progress",
    ]  # fmt: skip
    proc = subprocess.run(args, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = json.loads((work / "run" / "config.json").read_text())
    assert saved["train"]["data_format"] == "sft"
    cell = json.dumps(saved["model_config"])
    assert '"reset_at_document_boundaries": true' in cell
    rows = [json.loads(x) for x in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < losses[0]
    # `eval` scores the run's own packed held-out rows with their loss mask: the run's number
    evaluated = subprocess.run(
        [sys.executable, "-m", "xlstm_eqx.cli", "eval", "--out", "run"],
        cwd=work, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    final = json.loads((work / "run" / "summary.json").read_text())["eval_loss"]
    assert f"held-out loss {final:.4f} nats/token" in evaluated.stdout


def test_train_step_takes_token_batches_on_a_mesh():
    """A `TokenBatch` of `A = 2` micro-batches through the mesh step: every field is placed with
    the batch sharding, and the step's loss is the mean of the two micro-batches' masked losses
    (computed directly with `next_token_loss`)."""
    import optax

    from xlstm_eqx.training.optim import trainable_params
    from xlstm_eqx.training.step import shard_train_state

    model = build_model(isolate_documents(get_preset("tiny_llama")), key=jr.key(0))
    rng = np.random.default_rng(2)
    shape = (2, 2, 17)
    borders = rng.random(shape) < 0.2
    borders[..., 0] = True
    batch = TokenBatch(
        rng.integers(0, 64, shape).astype(np.int32), rng.random(shape) < 0.6, borders
    )
    loss_of = eqx.filter_jit(next_token_loss)
    want = np.mean(
        [float(loss_of(model, TokenBatch(*(jnp.asarray(x[a]) for x in batch)))) for a in range(2)]
    )
    optimizer = optax.sgd(0.0)
    opt_state = optimizer.init(trainable_params(model))
    model, opt_state, step, _ = shard_train_state("dp=1", model, opt_state, optimizer)
    (placed, _), _, _ = step.place_inputs((batch, jr.key(1)), model, opt_state)
    assert isinstance(placed, TokenBatch)
    assert all(x.sharding == step.batch_sharding for x in placed)
    _, _, loss, _ = step((batch, jr.key(1)), model, opt_state)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)


def test_mlstm_conv_reset_holds_across_prefill_chunks():
    """The `mlstm` layer with the reset on: prefilling a sequence in two chunks (a border in each,
    the conv window carried between them) gives the full call's output."""
    from xlstm_eqx.xlstm.model import xLSTMLMModel

    config = isolate_documents(_tiny("tiny_xlstm", layer_type="mlstm"))
    model = build_model(config, key=jr.key(5))
    assert isinstance(model, xLSTMLMModel)
    tokens = jnp.asarray(np.random.default_rng(4).integers(1, 64, (1, 12)), jnp.int32)
    borders = jnp.zeros((1, 12), bool).at[0, jnp.array([0, 3, 9])].set(True)
    full = _logits(model, tokens, borders)
    call = eqx.filter_jit(lambda m, t, s, b: m.call_with_state(t, s, document_borders=b))
    first, state = call(model, tokens[:, :6], model.init_state(1), borders[:, :6])
    second, _ = call(model, tokens[:, 6:], state, borders[:, 6:])
    np.testing.assert_allclose(
        np.concatenate([first, second], 1), np.asarray(full), rtol=1e-4, atol=1e-5
    )
