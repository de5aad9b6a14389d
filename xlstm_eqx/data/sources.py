"""Where training text comes from: files and globs resolved into sources, and each source read as
a stream of documents in bounded pieces (so no source is ever held in memory whole).

Kinds, by name:

- `*.jsonl`: one JSON object per line; its text field (`--text-field`, default `"text"`) is a
  document. Blank lines are skipped.
- `*.parquet`, `*.arrow`: tables read through Hugging Face `datasets` (optional extra, streaming,
  no hub access); each row's text column is a document.
- a directory written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk` (it holds
  `state.json` or `dataset_dict.json`): read with `datasets.load_from_disk`; of a `DatasetDict`
  the split `--data-split` (default `"train"`).
- anything else: a UTF-8 text file, one document.

`iter_capped_pieces` reads the sources in order and stops at `--max-data-bytes` of UTF-8 text: the
piece that crosses the cap is cut at it (never inside a character), and no text file is read past
it.

A document longer than `piece_chars` is cut into pieces after a newline (else after a space) near
each multiple of `piece_chars`, so memory stays bounded for a multi-GB file; a tokenizer then sees
the pieces one at a time (for the byte tokenizer this changes nothing; for BPE a token may be split
at the few cut points).
"""

import codecs
import dataclasses
import glob
import json
import os
from collections.abc import Iterator, Sequence

from ..core.files import clip_utf8


PIECE_CHARS = 1 << 20  # 1 Mi characters per piece of a long document

_HF_KINDS = ("parquet", "arrow", "hf_disk")


@dataclasses.dataclass(frozen=True)
class Source:
    """One input: its path, its kind, and the files behind it (for the cache key and the run's
    record of its data)."""

    path: str
    kind: str  # "text" | "jsonl" | "parquet" | "arrow" | "hf_disk"

    def files(self) -> list[str]:
        """The files whose sizes and modification times identify this source."""
        if self.kind != "hf_disk":
            return [self.path]
        out = []
        for dirpath, dirnames, names in os.walk(self.path):
            dirnames.sort()
            out.extend(os.path.join(dirpath, n) for n in sorted(names))
        return out


def is_hf_dataset_dir(path: str) -> bool:
    """A directory made by `save_to_disk` (a Dataset or a DatasetDict)."""
    return os.path.isdir(path) and any(
        os.path.isfile(os.path.join(path, n)) for n in ("state.json", "dataset_dict.json")
    )


def source_kind(path: str) -> str:
    if os.path.isdir(path):
        return "hf_disk"
    for ext, kind in ((".jsonl", "jsonl"), (".parquet", "parquet"), (".arrow", "arrow")):
        if path.endswith(ext):
            return kind
    return "text"


def resolve_sources(sources: Sequence[str]) -> list[Source]:
    """Expand files, globs (`**` allowed) and dataset directories into a de-duplicated list of
    sources: glob matches sorted, empty files skipped; anything unusable is an error naming it."""
    out: list[Source] = []
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
            if os.path.isdir(src) and not is_hf_dataset_dir(src):
                raise IsADirectoryError(
                    f"data path {src!r} is a directory but not a saved Hugging Face dataset; pass "
                    f"a glob such as {os.path.join(src, '**', '*.txt')!r}"
                )
            if not os.path.exists(src):
                raise FileNotFoundError(f"data path {src!r} does not exist")
            if os.path.isfile(src) and os.path.getsize(src) == 0:
                raise ValueError(f"data file {src!r} is empty")
            matches = [src]
        for p in matches:
            key = os.path.abspath(p)
            if key not in seen:
                seen.add(key)
                out.append(Source(p, source_kind(p)))
    return out


# reading


def split_text(text: str, piece_chars: int = PIECE_CHARS) -> Iterator[str]:
    """`text` in pieces of about `piece_chars`, each cut after a newline (else a space) if the
    piece holds one; the pieces join back to `text`."""
    start = 0
    while len(text) - start > piece_chars:
        end = start + piece_chars
        cut = text.rfind("\n", start, end)
        if cut < 0:
            cut = text.rfind(" ", start, end)
        end = cut + 1 if cut >= 0 else end
        yield text[start:end]
        start = end
    if start < len(text):
        yield text[start:] if start else text


def _text_file_pieces(
    path: str, piece_chars: int, max_bytes: int | None = None
) -> Iterator[tuple[str, bool]]:
    """Pieces of the text file `path`, reading no more than its first `max_bytes` bytes (a
    character cut by that limit is dropped)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    carry = ""
    offset = 0
    first = True
    try:
        with open(path, "rb") as f:
            while True:
                size = piece_chars if max_bytes is None else min(piece_chars, max_bytes - offset)
                raw = f.read(size) if size > 0 else b""
                try:
                    # At the end of the file a cut character is an error; at the cap it is dropped.
                    text = carry + decoder.decode(raw, final=not raw and size > 0)
                except UnicodeDecodeError as e:
                    raise ValueError(
                        f"data file {path!r} is not UTF-8 text ({e.reason} at byte "
                        f"{offset + e.start})"
                    ) from None
                offset += len(raw)
                if not raw:
                    if text:
                        yield text, first
                    return
                pieces = list(split_text(text, piece_chars))
                # The last piece may continue in the next read: carry it over.
                carry = pieces.pop() if pieces else ""
                for piece in pieces:
                    yield piece, first
                    first = False
    except OSError as e:
        raise OSError(f"cannot read data file {path!r}: {e.strerror or e}") from e


def _jsonl_documents(path: str, text_field: str) -> Iterator[str]:
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
                except RecursionError:
                    raise ValueError(f"{path}:{lineno}: JSON nested too deeply") from None
                if not isinstance(obj, dict) or text_field not in obj:
                    raise ValueError(
                        f"{path}:{lineno}: no text field {text_field!r} in this JSON line"
                    )
                text = obj[text_field]
                if not isinstance(text, str):
                    raise ValueError(
                        f"{path}:{lineno}: field {text_field!r} is {type(text).__name__}, "
                        "not a string"
                    )
                yield text
    except UnicodeDecodeError as e:
        raise ValueError(f"data file {path!r} is not UTF-8 text ({e.reason})") from None


def _import_datasets(path: str):
    try:
        import datasets
    except ImportError as e:
        raise ImportError(
            f"reading {path!r} needs the optional package `datasets` "
            "(pip install 'xlstm_eqx[data]')"
        ) from e
    return datasets


def _hf_documents(
    source: Source, text_field: str, split: str, batch_rows: int = 512
) -> Iterator[str]:
    datasets = _import_datasets(source.path)
    if source.kind == "hf_disk":
        ds = datasets.load_from_disk(source.path)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(
                    f"dataset {source.path!r} has no split {split!r} "
                    f"(splits: {', '.join(ds)}); pass --data-split"
                )
            ds = ds[split]
        columns = list(ds.column_names)
    else:
        ds = datasets.load_dataset(
            source.kind, data_files=[source.path], split="train", streaming=True
        )
        columns = list(ds.column_names or [])
    if text_field not in columns:
        raise ValueError(
            f"data file {source.path!r} has no column {text_field!r} "
            f"(columns: {', '.join(columns)}); pass --text-field"
        )
    row = 0
    for batch in ds.select_columns([text_field]).iter(batch_size=batch_rows):
        for text in batch[text_field]:
            if not isinstance(text, str):
                raise ValueError(
                    f"{source.path}: row {row}: column {text_field!r} is "
                    f"{type(text).__name__}, not a string"
                )
            row += 1
            yield text


def iter_pieces(
    source: Source,
    *,
    text_field: str = "text",
    split: str = "train",
    piece_chars: int = PIECE_CHARS,
    max_bytes: int | None = None,
) -> Iterator[tuple[str, bool]]:
    """`(text, starts_document)` for every piece of every non-empty document of `source`; of a
    text file, only what its first `max_bytes` bytes hold."""
    if source.kind == "text":
        yield from _text_file_pieces(source.path, piece_chars, max_bytes)
        return
    if source.kind == "jsonl":
        docs = _jsonl_documents(source.path, text_field)
    elif source.kind in _HF_KINDS:
        docs = _hf_documents(source, text_field, split)
    else:
        raise ValueError(f"data source {source.path!r}: unknown kind {source.kind!r}")
    for doc in docs:
        for i, piece in enumerate(split_text(doc, piece_chars)):
            yield piece, i == 0


def iter_capped_pieces(
    sources: Sequence[Source],
    *,
    text_field: str = "text",
    split: str = "train",
    max_bytes: int | None = None,
    piece_chars: int = PIECE_CHARS,
) -> Iterator[tuple[str, bool]]:
    """`iter_pieces` of every source in order, stopping at `max_bytes` of UTF-8 text: the piece
    that crosses it is cut at it and is the last; nothing past it is read from a text file."""
    total = 0
    for source in sources:
        left = None if max_bytes is None else max_bytes - total
        for text, starts in iter_pieces(
            source, text_field=text_field, split=split, piece_chars=piece_chars, max_bytes=left
        ):
            if max_bytes is None:
                yield text, starts
                continue
            kept = clip_utf8(text, max_bytes - total)
            total += len(kept.encode("utf-8"))
            if kept:
                yield kept, starts
            if len(kept) < len(text) or total >= max_bytes:
                return
