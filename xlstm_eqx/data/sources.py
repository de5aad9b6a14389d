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
import fnmatch
import glob
import io
import json
import os
import re
import stat
import sys
from collections.abc import Iterator, Sequence
from typing import Any, BinaryIO, cast

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


def open_regular(path: str) -> BinaryIO:
    """`path` opened for reading bytes if it is a regular file (checked on the opened file, and
    without blocking on a FIFO): a FIFO would hang the run and a device such as `/dev/zero`
    would never end."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError(f"data path {path!r} is not a regular file")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _hidden_ok(name: str, part: str) -> bool:
    """glob's rule: a wildcard does not match a name starting with a dot."""
    return not name.startswith(".") or part.startswith(".")


def _glob_walk(pattern: str, skipped: list[str] | None = None) -> list[str]:
    """The paths of the regular files `pattern` matches (`**`: any number of folders), like
    `glob.glob(pattern, recursive=True)` but bounded: a folder reached again through a symbolic
    link (a loop such as `sub/up -> ..`) is not entered again at the same point of the pattern.
    Matches that are neither files nor folders (FIFOs, devices, dangling links) go to
    `skipped`."""
    skipped = [] if skipped is None else skipped
    root, parts = _split_pattern(pattern)
    if not parts:
        if os.path.lexists(root) and not os.path.isfile(root) and not os.path.isdir(root):
            skipped.append(root)
        return [root] if os.path.isfile(root) else []
    walker = _GlobWalker(parts, skipped)
    walker.walk(root, 0)
    return sorted(walker.found)


def _split_pattern(pattern: str) -> tuple[str, list[str]]:
    """`(root, parts)`: the pattern's leading folders without glob characters joined (with its
    drive and leading separator), and its remaining path components."""
    drive, rest = os.path.splitdrive(pattern)
    parts = rest.split(os.sep) if os.altsep is None else re.split(r"[\\/]", rest)
    root = drive + (os.sep if parts and parts[0] == "" else "")
    parts = [p for p in parts if p]
    while parts and not glob.has_magic(parts[0]):
        root = os.path.join(root, parts.pop(0)) if root else parts.pop(0)
    return root, parts


class _GlobWalker:
    """One walk of `_glob_walk` over the pattern components `parts`: the files found, the
    matches skipped, the (device, inode, component) triples of the `**` folders entered and the
    folder listings read."""

    def __init__(self, parts: list[str], skipped: list[str]):
        self.parts = parts
        self.skipped = skipped
        self.found: list[str] = []
        self.seen: set[tuple[int, int, int]] = set()
        self.listings: dict[str, list[tuple[str, str, bool, bool]]] = {}
        self.match = {p: re.compile(fnmatch.translate(p)).match for p in parts if glob.has_magic(p)}

    def entered(self, folder: str, at: int) -> bool:
        """Whether `folder` was entered before at component `at` (or cannot be)."""
        try:
            st = os.stat(folder)
        except OSError:
            return True
        key = (st.st_dev, st.st_ino, at)
        if key in self.seen:
            return True
        self.seen.add(key)
        return False

    def entries(self, folder: str) -> list[tuple[str, str, bool, bool]]:
        """`(name, path, is_dir, is_file)` of each entry of `folder`, links followed, sorted."""
        if folder in self.listings:
            return self.listings[folder]
        try:
            with os.scandir(folder or os.curdir) as it:
                found = [(e.name, e.is_dir(), e.is_file()) for e in it]
        except OSError:
            return []
        self.listings[folder] = [(n, os.path.join(folder, n), d, f) for n, d, f in sorted(found)]
        return self.listings[folder]

    def walk(self, folder: str, at: int) -> None:
        """Match the components from `at` on below `folder`."""
        if at == len(self.parts):
            return
        part = self.parts[at]
        if part == "**":
            self.walk_any_depth(folder, at)
        elif not glob.has_magic(part):
            self.walk_literal(folder, at)
        else:
            self.walk_matching(folder, at)

    def walk_any_depth(self, folder: str, at: int) -> None:
        """Component `at` is `**`: this folder and every one below it (hidden ones excepted)."""
        if self.entered(folder or os.curdir, at):
            return
        if at == len(self.parts) - 1:  # `dir/**` matches the files of every folder below
            for name, path, is_dir, is_file in self.entries(folder):
                if name.startswith("."):
                    continue
                if is_dir:
                    self.walk(path, at)
                else:
                    (self.found if is_file else self.skipped).append(path)
            return
        self.walk(folder, at + 1)
        for name, path, is_dir, _ in self.entries(folder):
            if is_dir and not name.startswith("."):
                self.walk(path, at)

    def walk_literal(self, folder: str, at: int) -> None:
        """Component `at` has no glob characters: the one entry of that name."""
        path = os.path.join(folder, self.parts[at])
        if at == len(self.parts) - 1:
            if os.path.isfile(path):
                self.found.append(path)
            elif os.path.lexists(path) and not os.path.isdir(path):
                self.skipped.append(path)
        elif os.path.isdir(path):
            self.walk(path, at + 1)

    def walk_matching(self, folder: str, at: int) -> None:
        """Component `at` is a glob: the entries of `folder` whose names it matches."""
        part, last = self.parts[at], at == len(self.parts) - 1
        for name, path, is_dir, is_file in self.entries(folder):
            if not self.match[part](name) or not _hidden_ok(name, part):
                continue
            if last:
                if not is_dir:
                    (self.found if is_file else self.skipped).append(path)
            elif is_dir:
                self.walk(path, at + 1)


def absolute_patterns(sources: Sequence[str], cwd: str | None = None) -> list[str]:
    """`sources` (files, globs, folders) made absolute against `cwd` (default: the current
    directory), so a run's record of its data means the same files from any directory; the
    directory's own glob characters are escaped."""
    cwd = os.path.abspath(cwd or os.getcwd())
    out = []
    for src in sources:
        if os.path.isabs(src):
            out.append(src)
        elif glob.has_magic(src):
            out.append(os.path.join(glob.escape(cwd), src))
        else:
            out.append(os.path.join(cwd, src))
    return out


def _skipped_entries(src: str, skipped: list[str], *, any_match: bool) -> None:
    """Say which matches of glob `src` are not regular files (FIFOs, devices, dangling links):
    a warning when regular files matched too, else the error that nothing usable matched."""
    unique: dict[str, str] = {}  # each special file once, however many links or loops reach it
    for path in skipped:
        unique.setdefault(os.path.realpath(path), path)
    names = list(unique.values())
    if len(names) == 1:
        what = f"1 entry that is not a regular file ({names[0]!r})"
    else:
        what = f"{len(names)} entries that are not regular files (first: {names[0]!r})"
    if not any_match:
        raise FileNotFoundError(f"data glob {src!r} matches no regular files, only {what}")
    print(f"warning: --data {src!r}: skipped {what}", file=sys.stderr, flush=True)


def _file_id(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return (st.st_dev, st.st_ino)


def resolve_sources(sources: Sequence[str]) -> list[Source]:
    """Expand files, globs (`**` allowed) and dataset directories into a list of sources, each
    real file once (however many links or globs reach it): glob matches sorted, empty files
    skipped; anything unusable is an error naming it."""
    out: list[Source] = []
    seen: set[tuple[int, int]] = set()
    for src in sources:
        if glob.has_magic(src):
            skipped: list[str] = []
            matches = _glob_walk(src, skipped)
            if skipped:
                _skipped_entries(src, skipped, any_match=bool(matches))
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
            if not os.path.isdir(src) and not os.path.isfile(src):
                raise ValueError(f"data path {src!r} is not a regular file")
            if os.path.isfile(src) and os.path.getsize(src) == 0:
                raise ValueError(f"data file {src!r} is empty")
            matches = [src]
        for p in matches:
            key = _file_id(p)
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
        with open_regular(path) as f:
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


def iter_jsonl(path: str, error: type[ValueError] = ValueError) -> Iterator[tuple[int, Any]]:
    """`(line number, object)` for every non-blank line of the JSONL file `path` (lines from 1),
    opened with `open_regular` (a FIFO or device is refused at once, not waited on). A line that
    is not JSON, or is nested too deeply for the parser, is an `error` naming `path:line`; bytes
    that are not UTF-8 are one naming the file."""
    try:
        with io.TextIOWrapper(open_regular(path), encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise error(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
                except RecursionError:
                    raise error(f"{path}:{lineno}: JSON nested too deeply") from None
                yield lineno, obj
    except UnicodeDecodeError as e:
        raise error(f"data file {path!r} is not UTF-8 text ({e.reason})") from None


def _jsonl_documents(path: str, text_field: str) -> Iterator[str]:
    for lineno, obj in iter_jsonl(path):
        if not isinstance(obj, dict) or text_field not in obj:
            raise ValueError(f"{path}:{lineno}: no text field {text_field!r} in this JSON line")
        text = obj[text_field]
        if not isinstance(text, str):
            raise ValueError(
                f"{path}:{lineno}: field {text_field!r} is {type(text).__name__}, not a string"
            )
        yield text


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
                    f"(splits: {', '.join(map(str, ds))}); pass --data-split"
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
        # `iter` yields dicts of columns; datasets leaves its return type unannotated
        for text in cast("dict[str, list[Any]]", batch)[text_field]:
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
