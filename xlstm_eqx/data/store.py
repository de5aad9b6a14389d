"""The token store: a corpus tokenized once into memory-mapped token files, reused by later runs.

Building streams every source in bounded pieces (`sources.iter_capped_pieces`), tokenizes them in
batches of at most `batch_chars` characters (`encode_batch` for Hugging Face tokenizers), and
appends the tokens to `train.bin` or `heldout.bin` (`uint16` when the vocabulary fits, else
`uint32`), with the end-of-document token between consecutive documents of a stream. Peak memory
is that of one batch, not of the corpus.

Split: with at least k = round(1/eval_fraction) documents, document i is held out when
i % k == k-1 (held-out text is never trained on); with fewer, the last `eval_fraction` of the
token stream is. Sizes in bytes are the documents' UTF-8 bytes plus one per end-of-document token,
so the byte tokenizer has exactly one token per byte.

The store lives in `CACHE/<key>/` (`index.json`, the `.bin` files, `counts.npz`: the token
frequencies of each stream, for the unigram baseline and the vocabulary check without reading the
corpus again). The key hashes the sources (paths, sizes, modification times), the tokenizer (its
file's contents), the end-of-document token and every option that changes the tokens. A build
writes into a temporary sibling directory renamed into place when complete, so an interrupted
build leaves nothing that a later run would use, and concurrent builders do not collide.
`CACHE` is `--data-cache`, else `$XLSTM_EQX_DATA_CACHE_DIR`, else
`~/.cache/xlstm_eqx/token_stores` (`$XDG_CACHE_HOME` respected).

Trust: the index records the sha256 of every 4 MiB block of the token files and each source
file's sha256, inode and ctime. Opening a store checks the files' sizes and re-hashes their blocks
(all of them up to 256 MiB, else 64 spread evenly: ~0.05 s for a 50 MB store); a source whose
inode or ctime moved (a same-size edit with its mtime put back still moves the ctime) is hashed
again. A damaged store, or one built from other bytes, is rebuilt with a warning naming it. The
temporary folder of a build is `<key>.tmp-<host>-<pid>-…`: one whose builder is gone (or older
than a week) is removed. Corpora of 8 MiB or more are tokenized in a child process
(`build_child`), so the build's memory is given back before the run compiles.
"""

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from ..core.files import fsync_dir
from .sources import PIECE_CHARS, Source, iter_capped_pieces
from .store_integrity import (
    StoreDamagedError,
    changed_source,
    clean_stale_temporaries,
    discard_store,
    sha256_file,
    source_file_records,
    temporary_prefix,
    verify_token_file,
    warn,
)
from .token_file import TokenFile as TokenFile
from .token_stream import TokenStream, chunked_counts
from .tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, encode_batch, resolve_eod_id


FORMAT = "xlstm_eqx-token-store"
VERSION = 2
_INDEX = "index.json"
_BATCH_CHARS = 1 << 20  # characters tokenized per batch (more keeps more memory after the build)
_CHILD_BYTES = 8 << 20  # corpora this large are tokenized in a child process (see `store_for`)


CACHE_ENV = "XLSTM_EQX_DATA_CACHE_DIR"


def default_cache_dir() -> str:
    """Where token stores live unless `--data-cache` says otherwise (the same rule as the compile
    cache's, `core/compile_cache.py`)."""
    folder = os.environ.get(CACHE_ENV)
    if folder:
        return folder
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "xlstm_eqx", "token_stores")


def tokenizer_fingerprint(tokenizer: Tokenizer) -> dict[str, Any]:
    """What identifies a tokenizer's output: its description, and its file's hash if it has one."""
    d = dict(tokenizer.to_dict())
    path = d.get("path")
    if "sha256" not in d and isinstance(path, str) and os.path.isfile(path):
        d["sha256"] = sha256_file(path)
    return d


def source_stats(sources: Sequence[Source]) -> list[dict[str, Any]]:
    out = []
    for s in sources:
        files = []
        for f in s.files():
            st = os.stat(f)
            files.append([os.path.abspath(f), st.st_size, st.st_mtime_ns])
        out.append({"path": os.path.abspath(s.path), "kind": s.kind, "files": files})
    return out


def _batches(
    pieces: Iterator[tuple[int, str, bool]], batch_chars: int
) -> Iterator[list[tuple[int, str, bool]]]:
    batch: list[tuple[int, str, bool]] = []
    size = 0
    for item in pieces:
        batch.append(item)
        size += len(item[1])
        if size >= batch_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _numbered_pieces(
    sources: Sequence[Source],
    text_field: str,
    split: str,
    max_bytes: int | None,
    piece_chars: int,
) -> Iterator[tuple[int, str, bool]]:
    """`(document number, piece, starts_document)` over all sources, up to `max_bytes` of text
    (`iter_capped_pieces`)."""
    doc = -1
    for text, starts in iter_capped_pieces(
        sources, text_field=text_field, split=split, max_bytes=max_bytes, piece_chars=piece_chars
    ):
        if not text:
            continue
        if starts:
            doc += 1
        yield doc, text, starts


@dataclasses.dataclass(frozen=True)
class StoreOptions:
    """Everything besides the sources and tokenizer that changes a store's tokens."""

    text_field: str = "text"
    split: str = "train"
    eval_fraction: float = 0.05
    max_bytes: int | None = None
    eod_token: str = ""
    piece_chars: int = PIECE_CHARS
    # supervised fine-tuning (`data/sft_store.py`): examples packed into rows of this many tokens
    # (seq_len + 1), with a flags file beside each token file; None: plain text
    packed_row: int | None = None
    chat_template_sha256: str = ""  # the template messages were rendered with (part of the key)


def store_key(sources: Sequence[Source], tokenizer: Tokenizer, options: StoreOptions) -> str:
    ident = {
        "format": FORMAT,
        "version": VERSION,
        "sources": source_stats(sources),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "options": dataclasses.asdict(options),
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:24]


def _decoded_bytes(tokenizer: Tokenizer, tokens: np.ndarray, chunk: int = 1 << 20) -> int:
    total = 0
    for i in range(0, len(tokens), chunk):
        piece = np.asarray(tokens[i : i + chunk]).astype(np.int32)
        total += len(tokenizer.decode(piece).encode("utf-8"))
    return total


def build_store(
    sources: Sequence[Source],
    tokenizer: Tokenizer,
    directory: str,
    options: StoreOptions,
    *,
    batch_chars: int = _BATCH_CHARS,
) -> str:
    """Tokenize `sources` into the store `directory` (atomically); returns `directory`."""
    if not 0.0 < options.eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {options.eval_fraction}")

    def write(tmp: str, eod: int | None, vocab: int, dtype: np.dtype) -> StoreParts:
        train, held, num_docs = _write_token_files(
            tmp, sources, tokenizer, options, eod, vocab, dtype, batch_chars
        )
        if num_docs == 0 or train.tokens == 0:
            names = [s.path for s in sources]
            raise ValueError(f"data sources {names!r} contain no text")
        split, train_counts, held_counts = _split_records(
            tmp, train, held, tokenizer, dtype, options.eval_fraction
        )
        files = {"train.bin": train.blocks.record(), "heldout.bin": held.blocks.record()}
        entries = {"token_files": files, "num_documents": num_docs, **split}
        return StoreParts(entries, train_counts, held_counts)

    return build_atomically(sources, tokenizer, directory, options, write)


@dataclasses.dataclass(frozen=True)
class StoreParts:
    """What a store's writer returns: its index entries (`token_files`, `num_documents`, the
    `train`/`heldout` records, ...) and the token counts of the two streams."""

    entries: dict[str, Any]
    train_counts: np.ndarray
    heldout_counts: np.ndarray


def build_atomically(
    sources: Sequence[Source],
    tokenizer: Tokenizer,
    directory: str,
    options: StoreOptions,
    write: Callable[[str, int | None, int, np.dtype], StoreParts],
) -> str:
    """The frame of every store build: `write(tmp, eod, vocab, dtype)` fills a temporary sibling
    folder, then the index (identity, sources, hashes) and counts are written and the folder is
    renamed into place as `directory`; on any failure the temporary folder is removed."""
    eod = resolve_eod_id(tokenizer, options.eod_token)
    vocab = int(tokenizer.vocab_size)
    dtype = np.dtype(np.uint16 if vocab <= 1 << 16 else np.uint32)
    parent = os.path.dirname(os.path.abspath(directory))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=temporary_prefix(directory), dir=parent)
    t0 = time.perf_counter()
    # recorded before reading: a file changed meanwhile is seen later
    contents = source_file_records(sources)
    try:
        parts = write(tmp, eod, vocab, dtype)
        index: dict[str, Any] = {
            "format": FORMAT,
            "version": VERSION,
            "dtype": dtype.name,
            "eod_id": eod,
            "tokenizer": tokenizer_fingerprint(tokenizer),
            "options": dataclasses.asdict(options),
            "sources": source_stats(sources),
            "contents": contents,
            **parts.entries,
        }
        index["blake2b"] = hashlib.blake2b(
            json.dumps([index["train"], index["heldout"], index.get("stream_blake2b")]).encode(),
            digest_size=16,
        ).hexdigest()
        index["build_seconds"] = round(time.perf_counter() - t0, 2)
        write_counts_and_index(tmp, index, parts.train_counts, parts.heldout_counts)
        install_store(tmp, directory)
        fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _write_token_files(
    tmp: str,
    sources: Sequence[Source],
    tokenizer: Tokenizer,
    options: StoreOptions,
    eod: int | None,
    vocab: int,
    dtype: np.dtype,
    batch_chars: int,
) -> tuple[TokenStream, TokenStream, int]:
    """Tokenize the sources batch by batch into `tmp/train.bin` and `tmp/heldout.bin` (synced):
    `(train stream, held-out stream, number of documents)`; every k-th document is held out."""
    heldout_every = max(2, round(1.0 / options.eval_fraction))
    eod_arr = np.asarray([eod if eod is not None else 0], np.int32)
    with (
        open(os.path.join(tmp, "train.bin"), "wb") as ftrain,
        open(os.path.join(tmp, "heldout.bin"), "wb") as fheld,
    ):
        train = TokenStream(ftrain, dtype, np.zeros(vocab, np.int64))
        held = TokenStream(fheld, dtype, np.zeros(vocab, np.int64))
        pieces = _numbered_pieces(
            sources, options.text_field, options.split, options.max_bytes, options.piece_chars
        )
        num_docs = 0
        for batch in _batches(pieces, batch_chars):
            encoded = encode_batch(tokenizer, [text for _, text, _ in batch])
            parts: dict[int, list[np.ndarray]] = {id(train): [], id(held): []}
            for (doc, text, starts), ids in zip(batch, encoded, strict=True):
                stream = held if doc % heldout_every == heldout_every - 1 else train
                if starts:
                    num_docs = doc + 1
                    if stream.documents and eod is not None:
                        parts[id(stream)].append(eod_arr)
                        stream.bytes += 1
                    stream.documents += 1
                parts[id(stream)].append(np.asarray(ids))
                stream.bytes += len(text.encode("utf-8"))
            del encoded
            train.write(parts[id(train)])
            held.write(parts[id(held)])
        for f in (ftrain, fheld):
            f.flush()
            os.fsync(f.fileno())
    return train, held, num_docs


def _split_records(
    tmp: str,
    train: TokenStream,
    held: TokenStream,
    tokenizer: Tokenizer,
    dtype: np.dtype,
    eval_fraction: float,
) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """The index's split entries and the two streams' token counts. With no held-out document
    (fewer documents than k) the last `eval_fraction` of the train stream is held out."""
    if held.documents > 0:
        split = {
            "split": "documents",
            "train": {"file": "train.bin", "offset": 0, **train.stats()},
            "heldout": {"file": "heldout.bin", "offset": 0, **held.stats()},
        }
        return split, train.counts, held.counts
    all_tokens = np.memmap(os.path.join(tmp, "train.bin"), dtype, mode="r")
    n = len(all_tokens)
    cut = n - max(1, int(n * eval_fraction))
    tail = all_tokens[cut:]
    held_counts = chunked_counts(tail)
    train_counts = train.counts.copy()
    train_counts[: len(held_counts)] -= held_counts
    held_bytes = n - cut if _is_byte_level(tokenizer) else _decoded_bytes(tokenizer, tail)
    del all_tokens, tail
    split = {
        "split": "tail",
        "train": {
            "file": "train.bin",
            "offset": 0,
            "tokens": cut,
            "bytes": train.bytes - held_bytes,
            "documents": train.documents,
        },
        "heldout": {
            "file": "train.bin",
            "offset": cut,
            "tokens": n - cut,
            "bytes": held_bytes,
            "documents": 0,
        },
        "stream_blake2b": train.hash.hexdigest(),
    }
    return split, train_counts, held_counts


def write_counts_and_index(
    tmp: str, index: dict[str, Any], train_counts: np.ndarray, held_counts: np.ndarray
) -> None:
    """Write `counts.npz` and `index.json` into `tmp`, synced to disk with the folder."""
    np.savez(os.path.join(tmp, "counts.npz"), train=train_counts, heldout=held_counts)
    with open(os.path.join(tmp, _INDEX), "w") as f:
        json.dump(index, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(tmp)


def install_store(tmp: str, directory: str) -> None:
    """Rename the built `tmp` to `directory`; a damaged store already there is moved aside and
    removed; a complete one another process installed meanwhile wins (ours is dropped)."""
    for _ in range(3):
        try:
            os.rename(tmp, directory)
            return
        except OSError:
            if not os.path.lexists(directory):
                raise
        if _intact(directory):
            shutil.rmtree(tmp, ignore_errors=True)  # another process finished the same store
            return
        discard_store(directory)
    os.rename(tmp, directory)


def _intact(directory: str) -> bool:
    try:
        open_store(directory)
    except StoreDamagedError:
        return False
    return True


def _is_byte_level(tokenizer: Tokenizer) -> bool:
    return tokenizer.to_dict().get("kind") == "bytes"


@dataclasses.dataclass(frozen=True)
class TokenStore:
    """An opened store: the token streams as read-only memory maps, their sizes and counts."""

    directory: str
    index: dict[str, Any]
    train: np.ndarray
    heldout: np.ndarray
    train_counts: np.ndarray
    heldout_counts: np.ndarray

    @property
    def eod_id(self) -> int | None:
        return self.index["eod_id"]

    def token_file(self, name: str) -> TokenFile:
        """The `train` or `heldout` stream as a `TokenFile`."""
        part = self.index[name]
        path = os.path.join(self.directory, part["file"])
        return TokenFile(path, np.dtype(self.index["dtype"]), part["offset"], part["tokens"])

    def flags_file(self, name: str) -> TokenFile | None:
        """The per-token `uint8` flags (`data/batch.py`) of a packed fine-tuning store's `train`
        or `heldout` stream, aligned with `token_file(name)`; None for a plain text store."""
        flags = self.index.get("flags")
        if not flags:
            return None
        part = self.index[name]
        path = os.path.join(self.directory, flags[name])
        return TokenFile(path, np.dtype(np.uint8), part["offset"], part["tokens"])


def _map_tokens(path: str, dtype: np.dtype, offset: int, count: int) -> np.ndarray:
    """A read-only memory map of `count` tokens of `path` from token `offset` (for whole-array
    use; batches read through `TokenFile`)."""
    return np.memmap(path, dtype, mode="r", offset=offset * dtype.itemsize, shape=(count,))


def open_store(directory: str) -> TokenStore:
    """The store in `directory`, checked against its index (file sizes, block hashes, counts);
    a `StoreDamagedError` naming it and the fault otherwise."""
    path = os.path.join(directory, _INDEX)
    try:
        with open(path) as f:
            index = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        what = "no index.json" if isinstance(e, FileNotFoundError) else f"index.json: {e}"
        raise StoreDamagedError(directory, what) from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise StoreDamagedError(directory, "index.json is not a token store index")
    if index.get("version") != VERSION:
        raise StoreDamagedError(
            directory, f"format version {index.get('version')!r}, not {VERSION}"
        )
    try:
        dtype = np.dtype(index["dtype"])
        for name, record in index["token_files"].items():
            verify_token_file(directory, name, record)
        maps = {}
        for name in ("train", "heldout"):
            part = index[name]
            file = os.path.join(directory, part["file"])
            end = (part["offset"] + part["tokens"]) * dtype.itemsize
            if end > index["token_files"][part["file"]]["size"]:
                raise StoreDamagedError(
                    directory, f"{name} tokens run past the end of {part['file']}"
                )
            if part["tokens"] == 0:
                maps[name] = np.zeros(0, dtype)
                continue
            maps[name] = _map_tokens(file, dtype, part["offset"], part["tokens"])
        with np.load(os.path.join(directory, "counts.npz"), allow_pickle=False) as counts:
            train_counts, held_counts = counts["train"], counts["heldout"]
    except StoreDamagedError:
        raise
    except (OSError, KeyError, TypeError, ValueError, zipfile.BadZipFile) as e:
        raise StoreDamagedError(directory, f"{type(e).__name__}: {e}") from None
    return TokenStore(directory, index, maps["train"], maps["heldout"], train_counts, held_counts)


def store_for(
    sources: Sequence[Source],
    tokenizer: Tokenizer,
    options: StoreOptions,
    *,
    cache_dir: str | None = None,
    build: bool = True,
) -> TokenStore:
    """The store of these sources, built first if the cache has none, or rebuilt (with a warning
    naming it) if the one there is damaged or was built from other bytes (unless `build=False`,
    then FileNotFoundError). Temporary folders of dead builds are removed first."""
    cache = os.path.abspath(cache_dir or default_cache_dir())
    clean_stale_temporaries(cache)
    directory = os.path.join(cache, store_key(sources, tokenizer, options))
    if os.path.lexists(directory):
        try:
            store = open_store(directory)
            changed = changed_source(store.index["contents"], sources)
            if changed is None:
                return store
            reason = f"was built from other bytes of {changed!r}"
        except StoreDamagedError as e:
            reason = f"is damaged ({e.what})"
        if not build:
            raise FileNotFoundError(f"token store {directory!r} {reason}")
        warn(f"token store {directory!r} {reason}; rebuilding it")
        discard_store(directory)
    elif not build:
        raise FileNotFoundError(f"token store {directory!r} does not exist yet")
    if options.packed_row is not None:
        from .sft_store import build_sft_store

        build_sft_store(sources, tokenizer, directory, options)
    elif _build_elsewhere(sources, tokenizer):
        from .build_child import build_in_child

        build_in_child(sources, tokenizer, directory, options)
    else:
        build_store(sources, tokenizer, directory, options)
    return open_store(directory)


def _build_elsewhere(sources: Sequence[Source], tokenizer: Tokenizer) -> bool:
    """Whether to build in a child process (`build_child`): for a corpus of `_CHILD_BYTES` or
    more through a tokenizer a child can rebuild from its `to_dict`; the child's start (~2 s)
    costs more than it saves below that."""
    if type(tokenizer) not in (ByteTokenizer, HFTokenizer):
        return False
    total = 0
    for s in sources:
        for f in s.files():
            total += os.path.getsize(f)
            if total >= _CHILD_BYTES:
                return True
    return False
