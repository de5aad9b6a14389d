"""Corpus loading, the train/held-out split, and deterministic, resumable batching.

Sources (`--data`, repeatable): a file path, or a glob (`**` allowed). `*.jsonl` files hold one JSON
object per line whose text field (default `"text"`) is a document; every other file is one UTF-8
document. With no sources, the embedded default corpus is used: the top-level `*.py` files of this
Python's standard library (`sysconfig.get_paths()["stdlib"]`), sorted by name — a few MB of real
text present on every machine, no download.

Split: with at least k = round(1/eval_fraction) documents, every k-th document (index % k == k-1)
is held out, so held-out text is never seen in training; with fewer documents, the last
`eval_fraction` of the token stream is held out. Documents are joined with a blank line.

Batching: the training stream is cut into windows of `seq_len + 1` tokens at stride `seq_len`
(input = window[:-1], target = window[1:]). Epoch e shuffles the windows with a generator seeded
by (seed, e) and shifts them by a random offset. Batch i is a pure function of (tokens, seed, i),
so a run resumed at batch i sees exactly the batches the uninterrupted run would have seen.
"""

import dataclasses
import glob
import json
import math
import os
import sysconfig
from collections.abc import Sequence

import numpy as np
from jaxtyping import Int

from ..core.files import clip_utf8, read_text_prefix
from .tokenizer import Tokenizer


_DOC_SEPARATOR = "\n\n"


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
    out: list[str] = []
    seen: set[str] = set()
    for src in sources:
        if glob.has_magic(src):
            matches = sorted(p for p in glob.glob(src, recursive=True) if os.path.isfile(p))
            if not matches:
                raise FileNotFoundError(f"data glob {src!r} matches no files")
            matches = [p for p in matches if os.path.getsize(p) > 0]
            if not matches:
                raise ValueError(f"data glob {src!r} matches only empty files")
        else:
            if os.path.isdir(src):
                raise IsADirectoryError(
                    f"data path {src!r} is a directory; pass a glob such as "
                    f"{os.path.join(src, '**', '*.txt')!r}"
                )
            if not os.path.exists(src):
                raise FileNotFoundError(f"data path {src!r} does not exist")
            if os.path.getsize(src) == 0:
                raise ValueError(f"data file {src!r} is empty")
            matches = [src]
        for p in matches:
            key = os.path.abspath(p)
            if key not in seen:
                seen.add(key)
                out.append(p)
    return out


def read_documents(
    paths: Sequence[str], *, text_field: str = "text", max_bytes: int | None = None
) -> list[str]:
    """Read every document of `paths` in order (stopping once `max_bytes` of text are read)."""
    docs: list[str] = []
    total = 0
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                left = None if max_bytes is None else max_bytes - total
                if path.endswith(".jsonl"):
                    new = _jsonl_documents(f, path, text_field, left)
                else:
                    new = [read_text_prefix(path, left)]  # reads no more than the cap
        except UnicodeDecodeError as e:
            raise ValueError(
                f"data file {path!r} is not UTF-8 text ({e.reason} at byte {e.start})"
            ) from None
        except OSError as e:
            raise OSError(f"cannot read data file {path!r}: {e.strerror or e}") from e
        for doc in new:
            if max_bytes is not None:  # the document that crosses the cap is cut at it
                doc = clip_utf8(doc, max_bytes - total)
            if doc:
                docs.append(doc)
                total += len(doc.encode("utf-8"))
            if max_bytes is not None and total >= max_bytes:
                return docs
    if not docs:
        raise ValueError(f"data sources {list(paths)!r} contain no text")
    return docs


def _jsonl_documents(f, path: str, text_field: str, max_bytes: int | None = None) -> list[str]:
    docs = []
    total = 0
    for lineno, line in enumerate(f, start=1):
        if max_bytes is not None and total >= max_bytes:
            break
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
        except RecursionError:
            raise ValueError(f"{path}:{lineno}: JSON nested too deeply") from None
        if not isinstance(obj, dict) or text_field not in obj:
            raise ValueError(f"{path}:{lineno}: no text field {text_field!r} in this JSON line")
        text = obj[text_field]
        if not isinstance(text, str):
            raise ValueError(
                f"{path}:{lineno}: field {text_field!r} is {type(text).__name__}, not a string"
            )
        docs.append(text)
        total += len(text.encode("utf-8")) if max_bytes is not None else 0
    return docs


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Token streams of the training and held-out text, with their sizes in UTF-8 bytes."""

    train: np.ndarray
    heldout: np.ndarray
    train_bytes: int
    heldout_bytes: int
    num_documents: int
    sources: tuple[str, ...]

    @property
    def heldout_tokens_per_byte(self) -> float:
        """Converts a loss in nats per token into nats per byte (exactly 1 for the byte tokenizer)."""
        return len(self.heldout) / self.heldout_bytes


def load_corpus(
    sources: Sequence[str],
    tokenizer: Tokenizer,
    *,
    text_field: str = "text",
    eval_fraction: float = 0.05,
    max_bytes: int | None = None,
) -> Corpus:
    """Read, split and tokenize. Empty `sources` means the embedded default corpus."""
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    paths = resolve_paths(sources) if sources else default_corpus_files()
    docs = read_documents(paths, text_field=text_field, max_bytes=max_bytes)
    k = max(2, round(1.0 / eval_fraction))
    if len(docs) >= k:
        train_docs = [d for i, d in enumerate(docs) if i % k != k - 1]
        held_docs = [d for i, d in enumerate(docs) if i % k == k - 1]
        train_text = _DOC_SEPARATOR.join(train_docs)
        held_text = _DOC_SEPARATOR.join(held_docs)
        train = tokenizer.encode(train_text)
        heldout = tokenizer.encode(held_text)
        train_bytes = len(train_text.encode("utf-8"))
        heldout_bytes = len(held_text.encode("utf-8"))
    else:
        text = _DOC_SEPARATOR.join(docs)
        tokens = tokenizer.encode(text)
        cut = len(tokens) - max(1, int(len(tokens) * eval_fraction))
        train, heldout = tokens[:cut], tokens[cut:]
        # Bytes of each part, by decoding (exact for bytes; the tokenizer's own split otherwise).
        heldout_bytes = len(tokenizer.decode(heldout).encode("utf-8"))
        train_bytes = len(text.encode("utf-8")) - heldout_bytes
    if len(train) == 0 or len(heldout) == 0 or heldout_bytes == 0:
        raise ValueError(
            f"data sources {list(sources)!r} are too small to split into training and held-out "
            f"text ({len(train)} + {len(heldout)} tokens)"
        )
    return Corpus(
        train=np.asarray(train, np.int32),
        heldout=np.asarray(heldout, np.int32),
        train_bytes=train_bytes,
        heldout_bytes=heldout_bytes,
        num_documents=len(docs),
        sources=tuple(paths),
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


class BatchSampler:
    """Deterministic shuffled windows; batch `i` depends only on (tokens, seq_len, batch, seed, i)."""

    def __init__(self, tokens: np.ndarray, *, seq_len: int, batch_size: int, seed: int):
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
        self.num_windows = (len(tokens) - 1) // seq_len
        self._slack = (len(tokens) - 1) - self.num_windows * seq_len
        self._epoch_cache: tuple[int, np.ndarray, int] | None = None

    def _epoch(self, epoch: int) -> tuple[np.ndarray, int]:
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            perm = rng.permutation(self.num_windows)
            shift = int(rng.integers(0, self._slack + 1))
            self._epoch_cache = (epoch, perm, shift)
        return self._epoch_cache[1], self._epoch_cache[2]

    def epoch_of(self, index: int) -> float:
        """Fractional epoch reached after batch `index`."""
        return index * self.batch_size / self.num_windows

    def batch(self, index: int) -> Int[np.ndarray, "B S1"]:
        """Windows `index*B … index*B+B-1` of the endless shuffled order, `(B, seq_len + 1)` int32."""
        rows = []
        for j in range(index * self.batch_size, (index + 1) * self.batch_size):
            epoch, pos = divmod(j, self.num_windows)
            perm, shift = self._epoch(epoch)
            start = shift + int(perm[pos]) * self.seq_len
            rows.append(self.tokens[start : start + self.seq_len + 1])
        return np.stack(rows).astype(np.int32)


def eval_windows(
    tokens: np.ndarray, *, seq_len: int, batch_size: int, max_batches: int
) -> list[np.ndarray]:
    """A fixed set of held-out batches: non-overlapping windows spread evenly over the stream."""
    n = (len(tokens) - 1) // seq_len
    if n < 1:
        raise ValueError(
            f"held-out data has {len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}; "
            "add data, raise eval_fraction or lower seq_len"
        )
    b = min(batch_size, n)
    count = min(max_batches * b, (n // b) * b)
    picks = np.unique(np.linspace(0, n - 1, count).round().astype(np.int64))
    picks = picks[: (len(picks) // b) * b]
    windows = np.stack([tokens[p * seq_len : p * seq_len + seq_len + 1] for p in picks])
    return [w.astype(np.int32) for w in np.split(windows, len(windows) // b)]


def unigram_bits_per_byte(
    train: np.ndarray, targets: np.ndarray, vocab_size: int, tokens_per_byte: float
) -> float:
    """Cross-entropy of `targets` under add-one-smoothed training-set token frequencies, in bits
    per byte: the baseline a model that ignores context would reach."""
    counts = np.bincount(train.reshape(-1), minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    nats_per_token = -float(logp[targets.reshape(-1)].mean())
    return nats_per_token * tokens_per_byte / math.log(2.0)
