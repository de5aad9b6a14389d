"""Corpus loading, the train/held-out split, and deterministic, resumable batching.

Sources (`--data`, repeatable): files, globs (`**` allowed), JSONL, parquet/arrow files and saved
Hugging Face datasets (see `sources`). With no sources, the embedded default corpus is used: the
top-level `*.py` files of this Python's standard library (`sysconfig.get_paths()["stdlib"]`),
sorted by name — a few MB of real text present on every machine, no download.

`load_corpus` tokenizes through the token store (`store`): once per corpus, per document, with an
end-of-document token between documents, into memory-mapped files that later runs reuse. The split
(every k-th document held out, or the tail with fewer than k documents) is described there.

Batching: the training stream is cut into windows of `seq_len + 1` tokens at stride `seq_len`
(input = window[:-1], target = window[1:]). Epoch e shuffles the windows with a generator seeded
by (seed, e) and shifts them by a random offset. Batch i is a pure function of (tokens, seed, i),
so a run resumed at batch i sees exactly the batches the uninterrupted run would have seen, and
any process can read any rows of it (`BatchSampler.rows`) without reading the others.
"""

import dataclasses
import glob
import math
import os
import sysconfig
from collections.abc import Sequence
from typing import Any

import numpy as np
from jaxtyping import Int

from .batch import TokenBatch, batch_from_flags
from .corpus_identity import check_files_unchanged, check_identity_unchanged, corpus_identity
from .sft_store import chat_template_sha256
from .sources import iter_capped_pieces, resolve_sources
from .store import StoreOptions, TokenFile, store_for
from .tokenizer import Tokenizer


def default_corpus_files() -> list[str]:
    """The embedded default corpus: this Python's top-level stdlib `*.py` files, sorted."""
    stdlib = sysconfig.get_paths()["stdlib"]
    files = sorted(glob.glob(os.path.join(glob.escape(stdlib), "*.py")))
    files = [f for f in files if os.path.isfile(f) and os.path.getsize(f) > 0]
    if not files:
        raise FileNotFoundError(
            f"default corpus: no *.py files found in the standard library at {stdlib!r}; "
            "pass --data PATH_OR_GLOB"
        )
    return files


def resolve_paths(sources: Sequence[str]) -> list[str]:
    """Expand files and globs into a sorted, de-duplicated file list; error on anything unusable."""
    return [s.path for s in resolve_sources(sources)]


def read_documents(
    paths: Sequence[str],
    *,
    text_field: str = "text",
    max_bytes: int | None = None,
    split: str = "train",
) -> list[str]:
    """Every document of `paths` as a string, in order (at most `max_bytes` of text, the document
    that crosses it cut at it): for small texts, e.g. an evaluation file; training reads through the token store."""
    docs: list[str] = []
    for text, starts in iter_capped_pieces(
        resolve_sources(paths), text_field=text_field, split=split, max_bytes=max_bytes
    ):
        if not text:
            continue
        if starts or not docs:
            docs.append(text)
        else:
            docs[-1] += text
    if not docs:
        raise ValueError(f"data sources {list(paths)!r} contain no text")
    return docs


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Token streams of the training and held-out text (memory-mapped from the token store), with
    their sizes in bytes (UTF-8 bytes of the text, plus one per end-of-document token)."""

    train: np.ndarray
    heldout: np.ndarray
    train_bytes: int
    heldout_bytes: int
    num_documents: int
    sources: tuple[str, ...]
    train_counts: np.ndarray | None = None
    heldout_counts: np.ndarray | None = None
    identity: dict[str, Any] | None = None
    eod_id: int | None = None
    store_dir: str | None = None
    train_file: TokenFile | None = None
    heldout_file: TokenFile | None = None
    # a fine-tuning corpus (`data/sft_store.py`): rows of `packed_row` tokens and their flags
    train_flags: TokenFile | None = None
    heldout_flags: TokenFile | None = None
    packed_row: int | None = None
    heldout_targets: int | None = None  # target tokens of the held-out rows

    @property
    def train_reader(self) -> "np.ndarray | TokenFile":
        """What to read training windows through: the store's file (no memory map), else the
        array."""
        return self.train_file if self.train_file is not None else self.train

    @property
    def heldout_reader(self) -> "np.ndarray | TokenFile":
        return self.heldout_file if self.heldout_file is not None else self.heldout

    @property
    def heldout_tokens_per_byte(self) -> float:
        """Converts a loss in nats per token into nats per byte (exactly 1 for the byte tokenizer);
        for a fine-tuning corpus, per target token and byte of target text."""
        if self.heldout_targets is not None:
            return self.heldout_targets / self.heldout_bytes
        return len(self.heldout) / self.heldout_bytes

    def check_vocab(self, vocab_size: int) -> None:
        """Raise if a token id of either split is outside [0, vocab_size), from the stored counts
        (no pass over the tokens)."""
        for counts, tokens, what in (
            (self.train_counts, self.train, "training data"),
            (self.heldout_counts, self.heldout, "held-out data"),
        ):
            if counts is None:
                check_token_ids(tokens, vocab_size, what=what)
            elif len(counts) > vocab_size and counts[vocab_size:].any():
                bad = vocab_size + int(np.flatnonzero(counts[vocab_size:])[-1])
                check_token_ids(np.asarray([bad]), vocab_size, what=what)

    def unigram_bits_per_byte(self, vocab_size: int) -> float:
        """`unigram_bits_per_byte` of the held-out split, from the stored counts."""
        if self.train_counts is None or self.heldout_counts is None:
            return unigram_bits_per_byte(
                self.train, self.heldout, vocab_size, self.heldout_tokens_per_byte
            )
        return unigram_bits_per_byte_from_counts(
            self.train_counts, self.heldout_counts, vocab_size, self.heldout_tokens_per_byte
        )


def load_corpus(
    sources: Sequence[str],
    tokenizer: Tokenizer,
    *,
    text_field: str = "text",
    eval_fraction: float = 0.05,
    max_bytes: int | None = None,
    split: str = "train",
    eod_token: str = "",
    cache_dir: str | None = None,
    expected: dict[str, Any] | None = None,
    where: str = "data",
    build: bool = True,
    packed_row: int | None = None,
) -> Corpus:
    """The corpus of `sources` (empty: the embedded default corpus) from the token store, built
    on first use. `expected`: a run's recorded `identity`, checked (files and sizes before any
    tokenizing, then the token counts and hash), raising `CorpusChangedError` naming `where`.
    `packed_row`: the sources are fine-tuning JSONL (`data/sft.py`), packed into rows of that many
    tokens (seq_len + 1)."""
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    resolved = resolve_sources(sources) if sources else resolve_sources(default_corpus_files())
    if expected is not None:
        check_files_unchanged(expected, resolved, where)
    options = StoreOptions(
        text_field=text_field,
        split=split,
        eval_fraction=eval_fraction,
        max_bytes=max_bytes,
        eod_token=eod_token,
        packed_row=packed_row,
        chat_template_sha256=chat_template_sha256(tokenizer) if packed_row is not None else "",
    )
    store = store_for(resolved, tokenizer, options, cache_dir=cache_dir, build=build)
    identity = corpus_identity(store)
    if expected is not None:
        check_identity_unchanged(expected, identity, where)
    idx = store.index
    if len(store.train) == 0 or len(store.heldout) == 0 or idx["heldout"]["bytes"] == 0:
        raise ValueError(
            f"data sources {list(sources)!r} are too small to split into training and held-out "
            f"text ({len(store.train)} + {len(store.heldout)} tokens)"
        )
    return Corpus(
        train=store.train,
        heldout=store.heldout,
        train_bytes=int(idx["train"]["bytes"]),
        heldout_bytes=int(idx["heldout"]["bytes"]),
        num_documents=int(idx["num_documents"]),
        sources=tuple(s.path for s in resolved),
        train_counts=store.train_counts,
        heldout_counts=store.heldout_counts,
        identity=identity,
        eod_id=store.eod_id,
        store_dir=store.directory,
        train_file=store.token_file("train"),
        heldout_file=store.token_file("heldout"),
        train_flags=store.flags_file("train"),
        heldout_flags=store.flags_file("heldout"),
        packed_row=idx.get("packed_row"),
        heldout_targets=idx["heldout"].get("targets"),
    )


def check_token_ids(tokens: np.ndarray, vocab_size: int, *, what: str) -> None:
    """Raise if any token id is outside [0, vocab_size) — before any training step runs."""
    if tokens.size == 0:
        return
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(
            f"{what} contains token id {bad}, outside the model vocabulary [0, {vocab_size}) "
            f"(vocab_size={vocab_size}); use a model with a larger vocab_size or another tokenizer"
        )


_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _mix64(x: np.ndarray) -> np.ndarray:
    """A 64-bit integer hash (the splitmix64 finalizer), elementwise, wrapping."""
    x = x ^ (x >> np.uint64(30))
    x = x * _MIX1
    x = x ^ (x >> np.uint64(27))
    x = x * _MIX2
    return x ^ (x >> np.uint64(31))


class WindowPermutation:
    """A random permutation of `range(n)` evaluated one index at a time, in O(1) memory: a
    4-round Feistel network over the smallest even-bit domain >= n, keyed by `keys`, with
    cycle-walking back into `range(n)` (fewer than 4 rounds trips on average)."""

    def __init__(self, n: int, keys: Sequence[int]):
        self.n = n
        bits = max(2, int(n - 1).bit_length())
        self.half = np.uint64((bits + 1) // 2)
        self.mask = np.uint64((1 << int(self.half)) - 1)
        self.keys = [np.uint64(k) for k in keys]

    def _round_trip(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self.half, x & self.mask
        for k in self.keys:
            left, right = right, left ^ (_mix64(right ^ k) & self.mask)
        return (left << self.half) | right

    def __call__(self, index: np.ndarray) -> np.ndarray:
        y = self._round_trip(np.asarray(index, np.uint64))
        out_of_range = y >= np.uint64(self.n)
        while out_of_range.any():
            y[out_of_range] = self._round_trip(y[out_of_range])
            out_of_range = y >= np.uint64(self.n)
        return y.astype(np.int64)


class BatchSampler:
    """Deterministic shuffled windows; batch `i` depends only on (tokens, seq_len, batch, seed, i).

    Epoch e visits every window once, in the order of a `WindowPermutation` keyed by (seed, e),
    shifted by an offset drawn from the same generator: no per-epoch array, so memory does not grow
    with the corpus.
    """

    def __init__(
        self,
        tokens: "np.ndarray | TokenFile",
        *,
        seq_len: int,
        batch_size: int,
        seed: int,
        flags: TokenFile | None = None,
    ):
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len}, {batch_size}")
        if len(tokens) < seq_len + 1:
            raise ValueError(
                f"training data has {len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}; "
                "add data or lower seq_len"
            )
        self.tokens = tokens
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        # Packed fine-tuning rows (`flags` given): windows are the rows, at stride S+1, unshifted.
        self.flags = flags
        self.stride = seq_len + 1 if flags is not None else seq_len
        if flags is not None and len(tokens) % self.stride:
            raise ValueError(
                f"packed fine-tuning data of {len(tokens)} tokens is not in rows of seq_len + 1 = "
                f"{self.stride}"
            )
        self.num_windows = (len(tokens) - int(flags is None)) // self.stride
        self._slack = 0 if flags is not None else (len(tokens) - 1) - self.num_windows * seq_len
        self._epoch_cache: tuple[int, WindowPermutation, int] | None = None

    def _epoch(self, epoch: int) -> tuple[WindowPermutation, int]:
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            keys = rng.integers(0, 2**63, size=4).tolist()
            shift = int(rng.integers(0, self._slack + 1))
            self._epoch_cache = (epoch, WindowPermutation(self.num_windows, keys), shift)
        return self._epoch_cache[1], self._epoch_cache[2]

    def epoch_of(self, index: int) -> float:
        """Fractional epoch reached after batch `index`."""
        return index * self.batch_size / self.num_windows

    def batch(self, index: int) -> Int[np.ndarray, "B S1"]:
        """Windows `index*B … index*B+B-1` of the endless shuffled order, `(B, seq_len + 1)` int32."""
        return self.rows(index, 0, self.batch_size)

    def window_starts(self, index: int, start: int, stop: int) -> np.ndarray:
        """Token offsets of rows `start:stop` of `batch(index)`."""
        if not 0 <= start < stop <= self.batch_size:
            raise ValueError(f"rows {start}:{stop} are not within a batch of {self.batch_size}")
        j = np.arange(index * self.batch_size + start, index * self.batch_size + stop)
        epochs, pos = np.divmod(j, self.num_windows)
        out = np.empty(len(j), np.int64)
        for e in np.unique(epochs):
            perm, shift = self._epoch(int(e))
            sel = epochs == e
            out[sel] = shift + perm(pos[sel]) * self.stride
        return out

    def rows(self, index: int, start: int, stop: int) -> Int[np.ndarray, "R S1"]:
        """Rows `start:stop` of `batch(index)`, reading only those windows."""
        starts = self.window_starts(index, start, stop).tolist()
        if isinstance(self.tokens, TokenFile):
            return self.tokens.windows(starts, self.seq_len + 1).astype(np.int32)
        out = np.empty((len(starts), self.seq_len + 1), np.int32)
        for r, begin in enumerate(starts):
            out[r] = self.tokens[begin : begin + self.seq_len + 1]
        return out

    def batch_rows(self, index: int, start: int, stop: int) -> "np.ndarray | TokenBatch":
        """`rows(index, start, stop)`, as a `TokenBatch` with its loss mask and document borders
        for packed fine-tuning data."""
        tokens = self.rows(index, start, stop)
        if self.flags is None:
            return tokens
        starts = self.window_starts(index, start, stop).tolist()
        return batch_from_flags(tokens, self.flags.windows(starts, self.seq_len + 1))


def eval_windows(
    tokens: "np.ndarray | TokenFile",
    *,
    seq_len: int,
    batch_size: int,
    max_batches: int,
    flags: TokenFile | None = None,
) -> "list[np.ndarray] | list[TokenBatch]":
    """A fixed set of held-out batches: non-overlapping windows spread evenly over the stream
    (with `flags`, the packed fine-tuning rows, as `TokenBatch`es)."""
    stride = seq_len if flags is None else seq_len + 1
    n = (len(tokens) - int(flags is None)) // stride
    if n < 1:
        raise ValueError(
            f"held-out data has {len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}; "
            "add data, raise eval_fraction or lower seq_len"
        )
    b = min(batch_size, n)
    count = min(max_batches * b, (n // b) * b)
    picks = np.unique(np.linspace(0, n - 1, count).round().astype(np.int64))
    picks = picks[: (len(picks) // b) * b]
    windows = np.stack([tokens[p * stride : p * stride + seq_len + 1] for p in picks])
    parts = [w.astype(np.int32) for w in np.split(windows, len(windows) // b)]
    if flags is None:
        return parts
    flag_rows = np.split(flags.windows((picks * stride).tolist(), seq_len + 1), len(parts))
    return [batch_from_flags(t, f) for t, f in zip(parts, flag_rows, strict=True)]


def unigram_bits_per_byte(
    train: np.ndarray, targets: np.ndarray, vocab_size: int, tokens_per_byte: float
) -> float:
    """Cross-entropy of `targets` under add-one-smoothed training-set token frequencies, in bits
    per byte: the baseline a model that ignores context would reach."""
    counts = np.bincount(np.asarray(train).reshape(-1), minlength=vocab_size)
    target_counts = np.bincount(np.asarray(targets).reshape(-1), minlength=vocab_size)
    return unigram_bits_per_byte_from_counts(counts, target_counts, vocab_size, tokens_per_byte)


def unigram_bits_per_byte_from_counts(
    train_counts: np.ndarray, target_counts: np.ndarray, vocab_size: int, tokens_per_byte: float
) -> float:
    """`unigram_bits_per_byte` from token frequencies (`np.bincount` of each side)."""
    counts = np.zeros(vocab_size, np.float64)
    counts[: min(vocab_size, len(train_counts))] += train_counts[:vocab_size]
    counts += 1.0
    logp = np.log(counts / counts.sum())
    tc = np.asarray(target_counts[:vocab_size], np.float64)
    nats_per_token = -float((logp[: len(tc)] * tc).sum() / tc.sum())
    return nats_per_token * tokens_per_byte / math.log(2.0)
