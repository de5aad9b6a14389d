"""The token store and its sources: per-document tokens with the end-of-document token, the split,
reuse and rebuild, atomic builds, Hugging Face inputs, and the corpus identity checked on resume."""

import dataclasses
import json
import os

import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest

from tests.training.test_train import quiet, toy_config
from xlstm_eqx.data import (
    ByteTokenizer,
    CorpusChangedError,
    StoreOptions,
    build_store,
    default_cache_dir,
    iter_capped_pieces,
    load_corpus,
    load_tokenizer,
    resolve_sources,
    split_text,
)
from xlstm_eqx.training import read_metrics, train


DOCS = [f"document {i}: " + "lorem ipsum dolor sit amet " * (5 + i) for i in range(6)]


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return str(path)


def _bytes(text):
    return list(text.encode("utf-8"))


def _stores(cache):
    return sorted(d for d in os.listdir(cache) if not d.startswith("."))


@pytest.fixture
def bpe(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    tok.train_from_iterator(DOCS * 3, trainer)
    path = str(tmp_path / "tokenizer.json")
    tok.save(path)
    return path, tok


# --- per-document tokens and the split ---------------------------------------------------------


def test_documents_tokenized_separately_with_eod_between(tmp_path):
    """Two text files and a JSONL of four documents: 6 documents, every 3rd held out; each split
    is its documents' bytes with byte 0 (the byte tokenizer's end-of-document) between them."""
    a = _write(tmp_path / "d" / "a.txt", DOCS[0])
    b = _write(tmp_path / "d" / "b.txt", DOCS[1])
    lines = [json.dumps({"text": d, "n": i}) for i, d in enumerate(DOCS[2:])]
    j = _write(tmp_path / "d" / "c.jsonl", "\n".join(lines) + "\n")
    cache = str(tmp_path / "cache")
    corpus = load_corpus([a, b, j], ByteTokenizer(), eval_fraction=1 / 3, cache_dir=cache)
    train_ids = _bytes(DOCS[0]) + [0] + _bytes(DOCS[1]) + [0] + _bytes(DOCS[3])
    train_ids += [0] + _bytes(DOCS[4])
    held_ids = _bytes(DOCS[2]) + [0] + _bytes(DOCS[5])
    assert corpus.train.tolist() == train_ids and corpus.heldout.tolist() == held_ids
    assert corpus.train.dtype == np.uint16 and corpus.eod_id == 0
    assert corpus.num_documents == 6
    assert (corpus.train_bytes, corpus.heldout_bytes) == (len(train_ids), len(held_ids))
    assert corpus.heldout_tokens_per_byte == 1.0
    np.testing.assert_array_equal(corpus.train_counts[:256], np.bincount(train_ids, minlength=256))
    np.testing.assert_array_equal(corpus.train_file[5:17], corpus.train[5:17])
    ident = corpus.identity
    assert ident["files"] == [[os.path.abspath(p), os.path.getsize(p)] for p in (a, b, j)]
    assert (ident["train_tokens"], ident["heldout_tokens"]) == (len(train_ids), len(held_ids))
    # no end-of-document token when asked
    plain = load_corpus(
        [a, b, j], ByteTokenizer(), eval_fraction=1 / 3, cache_dir=cache, eod_token="none"
    )
    assert plain.train.tolist() == [t for t in train_ids if t != 0]
    assert len(_stores(cache)) == 2


def test_bpe_encodes_each_document_with_its_eod_token(tmp_path, bpe):
    path, tok = bpe
    lines = [json.dumps({"text": d}) for d in DOCS]
    j = _write(tmp_path / "docs.jsonl", "\n".join(lines))
    hf = load_tokenizer(path)
    eod = tok.token_to_id("<|endoftext|>")
    assert hf.eod_id == eod
    corpus = load_corpus([j], hf, eval_fraction=0.5, cache_dir=str(tmp_path / "c"))
    want = []
    for d in DOCS[0::2]:
        want += ([eod] if want else []) + tok.encode(d).ids
    assert corpus.train.tolist() == want
    assert corpus.train_bytes == sum(len(d.encode()) for d in DOCS[0::2]) + 2
    explicit = load_corpus(
        [j], hf, eval_fraction=0.5, cache_dir=str(tmp_path / "c"), eod_token="<|endoftext|>"
    )
    assert explicit.train.tolist() == want
    with pytest.raises(ValueError, match="--eod-token 'nope'"):
        load_corpus([j], hf, eval_fraction=0.5, cache_dir=str(tmp_path / "c"), eod_token="nope")


@pytest.mark.slow
def test_a_huge_document_is_read_in_pieces(tmp_path):
    text = "".join(f"line {i} " + "x" * (i % 50) + "\n" for i in range(400))
    p = _write(tmp_path / "big.txt", text)
    out = build_store(
        resolve_sources([p]),
        ByteTokenizer(),
        str(tmp_path / "store"),
        StoreOptions(eval_fraction=0.1, piece_chars=256),
    )
    with open(os.path.join(out, "index.json")) as f:
        index = json.load(f)
    assert index["split"] == "tail" and index["num_documents"] == 1
    tokens = np.fromfile(os.path.join(out, "train.bin"), np.uint16)
    assert bytes(tokens.astype(np.uint8)) == text.encode()  # one document: no token inside
    n = len(tokens)
    cut = n - int(n * 0.1)
    assert index["train"]["tokens"] == cut and index["heldout"]["offset"] == cut
    assert index["heldout"]["bytes"] == n - cut


def test_max_data_bytes_spans_sources_and_reads_no_further(tmp_path):
    """The cap counts across sources; a text file is not read past it (its invalid bytes after
    the cap are never decoded), the crossing piece is cut inside no character, and the store
    built under the cap holds exactly the kept text."""
    a = _write(tmp_path / "a.txt", "é" * 300)  # 600 bytes
    b = tmp_path / "b.txt"
    b.write_bytes(("ü" * 50).encode() + b"\xff" * 10)  # 100 bytes of text, then not UTF-8
    pieces = list(iter_capped_pieces(resolve_sources([a, str(b)]), max_bytes=651, piece_chars=16))
    kept = "".join(t for t, _ in pieces)
    assert kept == "é" * 300 + "ü" * 25 and sum(s for _, s in pieces) == 2
    with pytest.raises(ValueError, match="not UTF-8"):
        list(iter_capped_pieces(resolve_sources([a, str(b)])))
    corpus = load_corpus([a, str(b)], ByteTokenizer(), max_bytes=651, cache_dir=str(tmp_path / "c"))
    assert corpus.num_documents == 2
    assert corpus.train_bytes + corpus.heldout_bytes == 650 + 1  # the text and one EOD token


@hypothesis.given(st.text(alphabet="ab \n", max_size=300), st.integers(1, 40))
def test_split_text_pieces(text, size):
    pieces = list(split_text(text, size))
    assert "".join(pieces) == text
    assert all(0 < len(p) <= size for p in pieces)


def test_not_utf8_names_the_byte(tmp_path):
    p = tmp_path / "x.txt"
    p.write_bytes(b"abc" * 10 + b"\xff")
    with pytest.raises(ValueError, match=r"x.txt.*not UTF-8.*byte 30"):
        load_corpus([str(p)], ByteTokenizer(), cache_dir=str(tmp_path / "c"))


# --- the cache ---------------------------------------------------------------------------------


def test_store_is_reused_and_rebuilt_when_a_file_changes(tmp_path):
    files = [_write(tmp_path / "d" / f"{i}.txt", d) for i, d in enumerate(DOCS)]
    cache = str(tmp_path / "cache")
    kw = dict(eval_fraction=0.34, cache_dir=cache)
    first = load_corpus(files, ByteTokenizer(), **kw)
    index = os.path.join(first.store_dir, "index.json")
    stamp = os.stat(index).st_mtime_ns
    again = load_corpus(files, ByteTokenizer(), **kw)
    assert again.store_dir == first.store_dir and os.stat(index).st_mtime_ns == stamp
    # the same bytes with a new modification time: another key, the same tokens
    os.utime(files[1], ns=(1, 1))
    touched = load_corpus(files, ByteTokenizer(), **kw)
    assert touched.store_dir != first.store_dir
    assert touched.identity == first.identity
    # new contents: new tokens, another hash
    _write(tmp_path / "d" / "1.txt", DOCS[1].upper())
    changed = load_corpus(files, ByteTokenizer(), **kw)
    assert changed.identity["blake2b"] != first.identity["blake2b"]
    assert len(_stores(cache)) == 3


def test_an_interrupted_build_leaves_nothing(tmp_path):
    files = [_write(tmp_path / "d" / f"{i}.txt", d) for i, d in enumerate(DOCS)]
    cache = tmp_path / "cache"

    class Failing(ByteTokenizer):
        calls = 0

        def encode_batch(self, texts):
            Failing.calls += 1
            if Failing.calls == 2:
                raise RuntimeError("killed mid-build")
            return super().encode_batch(texts)

    with pytest.raises(RuntimeError, match="mid-build"):
        build_store(
            resolve_sources(files),
            Failing(),
            str(cache / "s"),
            StoreOptions(eval_fraction=0.3),
            batch_chars=50,
        )
    assert os.listdir(cache) == []
    # A build killed outright leaves its temporary directory: never read, never in the way.
    (cache / "s.tmp-dead").mkdir()
    (cache / "s.tmp-dead" / "train.bin").write_bytes(b"\x00" * 10)
    build_store(
        resolve_sources(files), ByteTokenizer(), str(cache / "s"), StoreOptions(eval_fraction=0.3)
    )
    corpus = load_corpus(files, ByteTokenizer(), eval_fraction=0.3, cache_dir=str(cache))
    assert corpus.num_documents == 6


def test_default_cache_dir_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("XLSTM_EQX_DATA_CACHE_DIR", str(tmp_path / "stores"))
    p = _write(tmp_path / "a.txt", DOCS[0] * 4)
    corpus = load_corpus([p], ByteTokenizer())
    assert corpus.store_dir.startswith(str(tmp_path / "stores" / ""))
    monkeypatch.delenv("XLSTM_EQX_DATA_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == str(tmp_path / "xdg" / "xlstm_eqx" / "token_stores")


# --- Hugging Face datasets -----------------------------------------------------------------------


def _hf_inputs(tmp_path):
    """The same six documents as a JSONL file, a saved Dataset, a saved DatasetDict (split
    "train"), a parquet file and an arrow file."""
    datasets = pytest.importorskip("datasets")

    ds = datasets.Dataset.from_dict({"body": DOCS, "n": list(range(len(DOCS)))})
    base = tmp_path / "hf"
    ds.save_to_disk(str(base / "disk"))
    other = datasets.Dataset.from_dict({"body": ["not this"] * 3, "n": [0] * 3})
    datasets.DatasetDict({"train": ds, "validation": other}).save_to_disk(str(base / "dict"))
    ds.to_parquet(str(base / "docs.parquet"))
    arrow = [f for f in os.listdir(base / "disk") if f.endswith(".arrow")]
    lines = [json.dumps({"body": d}) for d in DOCS]
    return {
        "jsonl": _write(base / "docs.jsonl", "\n".join(lines)),
        "save_to_disk": str(base / "disk"),
        "dataset_dict": str(base / "dict"),
        "parquet": str(base / "docs.parquet"),
        "arrow": str(base / "disk" / arrow[0]),
    }


def test_hf_dataset_inputs_give_the_jsonl_tokens(tmp_path):
    inputs = _hf_inputs(tmp_path)
    cache = str(tmp_path / "cache")
    kw = dict(text_field="body", eval_fraction=1 / 3, cache_dir=cache)
    want = load_corpus([inputs["jsonl"]], ByteTokenizer(), **kw)
    for name in ("save_to_disk", "dataset_dict", "parquet", "arrow"):
        got = load_corpus([inputs[name]], ByteTokenizer(), **kw)
        assert got.train.tolist() == want.train.tolist(), name
        assert got.heldout.tolist() == want.heldout.tolist(), name
    files = load_corpus([inputs["dataset_dict"]], ByteTokenizer(), **kw).identity["files"]
    assert any(f[0].endswith("dataset_dict.json") for f in files)
    with pytest.raises(ValueError, match=r"no column 'text' \(columns: body, n\)"):
        load_corpus([inputs["parquet"]], ByteTokenizer(), cache_dir=cache)
    with pytest.raises(ValueError, match=r"no split 'test' \(splits: train, validation\)"):
        load_corpus([inputs["dataset_dict"]], ByteTokenizer(), split="test", **kw)
    with pytest.raises(IsADirectoryError, match="not a saved Hugging Face dataset"):
        load_corpus([str(tmp_path)], ByteTokenizer(), cache_dir=cache)


@pytest.mark.parametrize("kind", ["save_to_disk", "parquet", "jsonl"])
def test_hf_and_jsonl_inputs_train(tmp_path, kind):
    src = _hf_inputs(tmp_path)[kind]
    cfg = toy_config(
        tmp_path, src, text_field="body", seq_len=8, steps=2, eval_every=2, eval_fraction=0.34
    )
    result = train(cfg, log=quiet)
    assert sorted(result.losses) == [1, 2] and np.isfinite(result.eval_loss)
    with open(os.path.join(cfg.out, "config.json")) as f:
        data = json.load(f)["data"]
    assert data["identity"]["num_documents"] == 6 and data["eod_id"] == 0


# --- the corpus identity on resume ---------------------------------------------------------------


def test_changed_data_is_refused_on_resume(tmp_path):
    d = tmp_path / "data"
    for i, doc in enumerate(DOCS):
        _write(d / f"{i}.txt", doc * 3)
    cfg = toy_config(tmp_path, str(d / "*.txt"), steps=2, eval_fraction=0.34, seq_len=8)
    train(cfg, log=quiet)
    resume = dataclasses.replace(cfg, resume=True, steps=3)
    before = read_metrics(os.path.join(cfg.out, "metrics.jsonl"))

    # a file under the glob grows
    original = (d / "2.txt").read_text()
    (d / "2.txt").write_text(original + "more")
    with pytest.raises(CorpusChangedError, match=r"2\.txt'?: \d+ -> \d+"):
        train(resume, log=quiet)
    # the same size, other contents: caught by the token hash
    (d / "2.txt").write_text(original.upper())
    with pytest.raises(CorpusChangedError, match="blake2b"):
        train(resume, log=quiet)
    (d / "2.txt").write_text(original)
    # a new file matching the glob
    _write(d / "9.txt", "new")
    with pytest.raises(CorpusChangedError, match=r"1 file\(s\) added.*9\.txt"):
        train(resume, log=quiet)
    os.remove(d / "9.txt")
    assert read_metrics(os.path.join(cfg.out, "metrics.jsonl")) == before
    # restored (a new modification time, the same bytes): resumes
    result = train(resume, log=quiet)
    assert sorted(result.losses) == [3]
