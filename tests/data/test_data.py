"""Tokenizers, corpus loading, the held-out split, deterministic batching, the unigram baseline."""

import json
import math
import os

import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest

from xlstm_eqx.data import (
    BatchSampler,
    ByteTokenizer,
    HFTokenizer,
    check_token_ids,
    default_corpus_files,
    eval_windows,
    load_corpus,
    load_tokenizer,
    padded_vocab_size,
    resolve_paths,
    tokenizer_from_dict,
    unigram_bits_per_byte,
)


# --- tokenizers ------------------------------------------------------------------------------


@hypothesis.given(st.text(max_size=200))
def test_byte_tokenizer_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids.dtype == np.int32
    assert list(ids) == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.vocab_size == 256


def test_byte_tokenizer_rejects_non_bytes():
    with pytest.raises(ValueError, match="300"):
        ByteTokenizer().decode([65, 300])


def test_byte_tokenizer_decodes_a_cut_character():
    ids = ByteTokenizer().encode("é")[:1]
    assert ByteTokenizer().decode(ids) == "\ufffd"


def test_padded_vocab_size():
    assert [padded_vocab_size(v) for v in (1, 64, 65, 256, 257, 50257)] == [
        64,
        64,
        128,
        256,
        320,
        50304,
    ]


def test_tokenizer_json(tmp_path):
    import tokenizers
    from tokenizers import models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=60, special_tokens=["[UNK]"])
    tok.train_from_iterator(["the cat sat on the mat", "the dog sat on the log"] * 5, trainer)
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))

    hf = load_tokenizer(str(path))
    assert isinstance(hf, HFTokenizer)
    assert hf.vocab_size == tok.get_vocab_size()
    ids = hf.encode("the cat sat")
    assert ids.dtype == np.int32 and len(ids) >= 3
    assert hf.decode(ids).replace(" ", "") == "thecatsat"
    again = tokenizer_from_dict(json.loads(json.dumps(hf.to_dict())))
    assert list(again.encode("the dog")) == list(hf.encode("the dog"))


def test_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_tokenizer(str(tmp_path / "nope.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        load_tokenizer(str(bad))
    with pytest.raises(ValueError, match="kind"):
        tokenizer_from_dict({"kind": "sentencepiece"})


# --- corpus ----------------------------------------------------------------------------------


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_default_corpus_is_real_sorted_stdlib_text():
    files = default_corpus_files()
    assert files == sorted(files) and len(files) > 20
    assert all(f.endswith(".py") for f in files)
    total = sum(os.path.getsize(f) for f in files)
    assert 1_000_000 < total < 20_000_000


def test_default_corpus_split_is_by_document():
    corpus = load_corpus([], ByteTokenizer(), eval_fraction=0.05, max_bytes=600_000)
    files = default_corpus_files()
    assert corpus.num_documents >= 20
    # every 20th document is held out, so held-out text is a whole file not in training
    with open(files[19], encoding="utf-8") as f:
        held_doc = f.read()
    assert bytes(corpus.heldout[: len(held_doc.encode())].astype(np.uint8)) == held_doc.encode()
    assert corpus.heldout_tokens_per_byte == 1.0
    assert len(corpus.train) == corpus.train_bytes


def test_text_glob_and_jsonl(tmp_path):
    a = _write(tmp_path / "d" / "a.txt", "alpha " * 50)
    _write(tmp_path / "d" / "sub" / "b.txt", "beta " * 50)
    _write(tmp_path / "d" / "empty.txt", "")
    lines = [json.dumps({"text": f"doc {i} " * 10, "id": i}) for i in range(3)]
    j = _write(tmp_path / "c.jsonl", "\n".join(lines) + "\n\n")
    paths = resolve_paths([str(tmp_path / "d" / "**" / "*.txt"), a, j])
    # glob sorted, empty matches skipped, duplicates removed
    assert [os.path.basename(p) for p in paths] == ["a.txt", "b.txt", "c.jsonl"]
    corpus = load_corpus(
        [str(tmp_path / "d" / "**" / "*.txt"), j], ByteTokenizer(), eval_fraction=0.4
    )
    assert corpus.num_documents == 5
    text = bytes(np.concatenate([corpus.train, corpus.heldout]).astype(np.uint8)).decode()
    for piece in ("alpha", "beta", "doc 0", "doc 2"):
        assert piece in text
    assert '"id"' not in text


def test_few_documents_split_at_the_tail(tmp_path):
    p = _write(tmp_path / "one.txt", "".join(chr(97 + i % 26) for i in range(1000)))
    corpus = load_corpus([p], ByteTokenizer(), eval_fraction=0.1)
    assert len(corpus.heldout) == 100 and len(corpus.train) == 900
    assert corpus.heldout_bytes == 100 and corpus.train_bytes == 900


def test_bad_data_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_corpus([str(tmp_path / "missing.txt")], ByteTokenizer())
    with pytest.raises(FileNotFoundError, match=r"\*\.md"):
        load_corpus([str(tmp_path / "*.md")], ByteTokenizer())
    empty = _write(tmp_path / "empty.txt", "")
    with pytest.raises(ValueError, match="empty.txt.*empty"):
        load_corpus([empty], ByteTokenizer())
    with pytest.raises(ValueError, match="only empty"):
        load_corpus([str(tmp_path / "*.txt")], ByteTokenizer())
    with pytest.raises(IsADirectoryError, match="directory"):
        load_corpus([str(tmp_path)], ByteTokenizer())
    binary = tmp_path / "x.bin"
    binary.write_bytes(b"\xff\xfe\x00abc")
    with pytest.raises(ValueError, match="x.bin.*not UTF-8"):
        load_corpus([str(binary)], ByteTokenizer())
    j = _write(tmp_path / "bad.jsonl", '{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2.*'text'"):
        load_corpus([j], ByteTokenizer())
    j2 = _write(tmp_path / "bad2.jsonl", '{"text": "ok"}\n{oops\n')
    with pytest.raises(ValueError, match=r"bad2.jsonl:2.*invalid JSON"):
        load_corpus([j2], ByteTokenizer())
    j3 = _write(tmp_path / "blank.jsonl", '{"text": ""}\n')
    with pytest.raises(ValueError, match="no text"):
        load_corpus([j3], ByteTokenizer())


def test_token_id_check():
    check_token_ids(np.array([0, 5, 63]), 64, what="training data")
    with pytest.raises(ValueError, match=r"training data.*token id 64.*vocab_size=64"):
        check_token_ids(np.array([0, 64]), 64, what="training data")
    with pytest.raises(ValueError, match="token id -1"):
        check_token_ids(np.array([-1, 3]), 64, what="held-out data")


# --- batching --------------------------------------------------------------------------------


@hypothesis.settings(max_examples=10)
@hypothesis.given(
    n=st.integers(20, 300),
    seq_len=st.integers(1, 16),
    batch=st.integers(1, 5),
    seed=st.integers(0, 2**31 - 1),
)
def test_batches_are_windows_and_deterministic(n, seq_len, batch, seed):
    hypothesis.assume(n >= seq_len + 1)
    tokens = np.arange(n, dtype=np.int32)  # token value = position: windows are easy to check
    s1 = BatchSampler(tokens, seq_len=seq_len, batch_size=batch, seed=seed)
    s2 = BatchSampler(tokens, seq_len=seq_len, batch_size=batch, seed=seed)
    indices = [0, 3, 1, 7, 3]
    for i in indices:
        b = s1.batch(i)
        assert b.shape == (batch, seq_len + 1) and b.dtype == np.int32
        # contiguous windows of the stream
        np.testing.assert_array_equal(np.diff(b, axis=1), 1)
        # random access equals the same batch from a fresh sampler: resume is exact
        np.testing.assert_array_equal(b, s2.batch(i))


def test_epoch_covers_every_window_once_and_reshuffles():
    tokens = np.arange(101, dtype=np.int32)
    s = BatchSampler(tokens, seq_len=10, batch_size=2, seed=3)
    assert s.num_windows == 10
    first = np.concatenate([s.batch(i) for i in range(5)])
    second = np.concatenate([s.batch(i) for i in range(5, 10)])
    # each epoch: 10 disjoint windows at stride 10 (shift 0 since 101 - 1 = 10 * 10)
    assert sorted(first[:, 0].tolist()) == list(range(0, 100, 10))
    assert sorted(second[:, 0].tolist()) == list(range(0, 100, 10))
    assert first[:, 0].tolist() != second[:, 0].tolist()
    other = BatchSampler(tokens, seq_len=10, batch_size=2, seed=4)
    assert np.concatenate([other.batch(i) for i in range(5)])[:, 0].tolist() != first[:, 0].tolist()


def test_sampler_errors():
    with pytest.raises(ValueError, match="fewer than seq_len"):
        BatchSampler(np.arange(8, dtype=np.int32), seq_len=8, batch_size=1, seed=0)
    with pytest.raises(ValueError, match="held-out data"):
        eval_windows(np.arange(5, dtype=np.int32), seq_len=8, batch_size=2, max_batches=2)


def test_eval_windows_fixed_and_disjoint():
    tokens = np.arange(1000, dtype=np.int32)
    batches = eval_windows(tokens, seq_len=16, batch_size=4, max_batches=3)
    assert len(batches) == 3 and all(b.shape == (4, 17) for b in batches)
    starts = np.concatenate(batches)[:, 0]
    assert len(set(starts.tolist())) == 12 and all(s % 16 == 0 for s in starts)
    small = eval_windows(np.arange(40, dtype=np.int32), seq_len=16, batch_size=4, max_batches=3)
    assert len(small) == 1 and small[0].shape == (2, 17)


def test_unigram_baseline_against_direct_formula():
    rng = np.random.default_rng(0)
    train = rng.integers(0, 8, size=500)
    targets = rng.integers(0, 8, size=(3, 7))
    counts = np.array([np.sum(train == v) for v in range(16)], np.float64) + 1
    p = counts / counts.sum()
    expected = -np.mean([math.log(p[t]) for t in targets.ravel()]) / math.log(2) * 1.25
    got = unigram_bits_per_byte(train, targets, 16, tokens_per_byte=1.25)
    assert abs(got - expected) < 1e-12
