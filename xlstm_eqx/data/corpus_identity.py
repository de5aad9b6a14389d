"""The identity of a corpus that a run records (its files with their sizes, the documents and
tokens of each split, a hash of the tokens), and the checks that a resumed or evaluated run still
reads the same data: the file list first (cheap, before any tokenizing), then the tokens."""

import os
from collections.abc import Sequence
from typing import Any

from .sources import Source
from .store import TokenStore


class CorpusChangedError(ValueError):
    """The data behind a run's `--data` is not what the run was started with."""


def corpus_identity(store: TokenStore) -> dict[str, Any]:
    """What a run records about its data: every file with its size, the documents and tokens of
    each split, and a hash of the tokens."""
    idx = store.index
    return {
        "files": [[f[0], f[1]] for s in idx["sources"] for f in s["files"]],
        "num_documents": idx["num_documents"],
        "train_tokens": idx["train"]["tokens"],
        "heldout_tokens": idx["heldout"]["tokens"],
        "blake2b": idx["blake2b"],
    }


def check_files_unchanged(saved: dict[str, Any], sources: Sequence[Source], where: str) -> None:
    """Compare the file list and sizes with a run's record before any tokenizing (cheap)."""
    now = [[os.path.abspath(f), os.path.getsize(f)] for s in sources for f in s.files()]
    before = [list(f) for f in saved.get("files", [])]
    if now == before:
        return
    old = {f: n for f, n in before}
    new = {f: n for f, n in now}
    added = sorted(set(new) - set(old))
    removed = sorted(set(old) - set(new))
    resized = sorted(f for f in set(old) & set(new) if old[f] != new[f])
    what = []
    if added:
        what.append(f"{len(added)} file(s) added (first: {added[0]!r})")
    if removed:
        what.append(f"{len(removed)} file(s) missing (first: {removed[0]!r})")
    if resized:
        f = resized[0]
        what.append(f"{len(resized)} file(s) changed size (first: {f!r}: {old[f]} -> {new[f]})")
    if not what:
        what.append("the files are in another order")
    raise CorpusChangedError(
        f"{where}: the data is not what the run was trained on: {'; '.join(what)}; "
        "restore the data or start a new run"
    )


def check_identity_unchanged(saved: dict[str, Any], now: dict[str, Any], where: str) -> None:
    """Compare the tokens (counts and hash) with a run's record."""
    for key in ("num_documents", "train_tokens", "heldout_tokens", "blake2b"):
        if key in saved and saved[key] != now[key]:
            raise CorpusChangedError(
                f"{where}: the data is not what the run was trained on: {key} was "
                f"{saved[key]!r}, is now {now[key]!r} (a file's contents changed); restore the "
                "data or start a new run"
            )
