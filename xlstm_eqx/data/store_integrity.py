"""The token store's integrity: block hashes of its token files, the source files' content
record, the checks run when a store is opened, and the removal of what dead builds left behind
(see `store` for when each is used)."""

import hashlib
import os
import secrets
import shutil
import socket
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from .sources import Source, open_regular


_BLOCK = 1 << 22  # bytes of a token file per recorded sha256 (verified when the store is opened)
_VERIFY_BLOCKS = 64  # at most this many blocks (256 MiB) are re-hashed per open, evenly spread
_STALE_SECONDS = 7 * 24 * 3600  # a temporary folder of another host is removed after a week


class StoreDamagedError(ValueError):
    """A token store on disk is incomplete or does not hold what its index says."""

    def __init__(self, directory: str, what: str):
        super().__init__(f"token store {directory!r} is damaged ({what})")
        self.what = what


def sha256_file(path: str) -> str:
    """The sha256 of a regular file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open_regular(path) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def source_file_records(sources: Sequence[Source]) -> list[list[Any]]:
    """`[path, inode, ctime_ns, sha256]` of every file: what a reused store is checked against
    (a same-size edit whose modification time was put back still changes the inode's ctime,
    and then the bytes are hashed again)."""
    out = []
    for s in sources:
        for f in s.files():
            st = os.stat(f)
            out.append([os.path.abspath(f), st.st_ino, st.st_ctime_ns, sha256_file(f)])
    return out


def changed_source(recorded: list[list[Any]], sources: Sequence[Source]) -> str | None:
    """The first file whose bytes are not those the store was built from, else None."""
    now = [(os.path.abspath(f), f) for s in sources for f in s.files()]
    if [p for p, _ in now] != [r[0] for r in recorded]:
        return now[0][1] if now else "the file list"
    for (_, f), (_, ino, ctime, sha) in zip(now, recorded, strict=True):
        st = os.stat(f)
        if (st.st_ino, st.st_ctime_ns) != (ino, ctime) and sha256_file(f) != sha:
            return f
    return None


class BlockHashes:
    """sha256 of each `_BLOCK` bytes of a file as it is written."""

    def __init__(self) -> None:
        self.digests: list[str] = []
        self.size = 0
        self._h = hashlib.sha256()

    def update(self, data: bytes) -> None:
        view = memoryview(data)
        while len(view):
            n = min(_BLOCK - self.size % _BLOCK, len(view))
            self._h.update(view[:n])
            self.size += n
            view = view[n:]
            if self.size % _BLOCK == 0:
                self.digests.append(self._h.hexdigest())
                self._h = hashlib.sha256()

    def record(self) -> dict[str, Any]:
        tail = [self._h.hexdigest()] if self.size % _BLOCK else []
        return {"size": self.size, "block": _BLOCK, "sha256": self.digests + tail}


def _host() -> str:
    """This host's name as a temporary folder's name holds it (no `-`, the field separator)."""
    return socket.gethostname().replace("-", "_") or "host"


def temporary_prefix(directory: str) -> str:
    """`<key>.tmp-<host>-<pid>-`: whose temporary folder it is, for `clean_stale_temporaries`."""
    return f"{os.path.basename(directory)}.tmp-{_host()}-{os.getpid()}-"


def clean_stale_temporaries(cache: str) -> list[str]:
    """Remove the temporary folders of builds that died (killed, power lost): those of this host
    whose process is gone, and any older than a week. Returns the paths removed."""
    try:
        names = os.listdir(cache)
    except OSError:
        return []
    host = _host()
    removed = []
    for name in names:
        if ".tmp-" not in name:
            continue
        path = os.path.join(cache, name)
        fields = name.split(".tmp-", 1)[1].split("-")
        try:
            age = time.time() - os.lstat(path).st_mtime
        except OSError:
            continue
        dead = False
        if len(fields) == 3 and fields[0] == host and fields[1].isdigit():
            try:
                os.kill(int(fields[1]), 0)  # signal 0: whether the builder still runs
            except ProcessLookupError:
                dead = True
            except PermissionError:  # another user's live process
                pass
        if dead or age > _STALE_SECONDS:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def discard_store(directory: str) -> None:
    """Remove a store: renamed aside first (to a temporary name), so no reader sees it half gone."""
    aside = os.path.join(
        os.path.dirname(directory), f"{temporary_prefix(directory)}{secrets.token_hex(4)}"
    )
    try:
        os.rename(directory, aside)
    except FileNotFoundError:
        return
    shutil.rmtree(aside, ignore_errors=True)


def verify_token_file(directory: str, name: str, record: dict[str, Any]) -> None:
    """The file's size, and the sha256 of its blocks: all of them up to `_VERIFY_BLOCKS`, else
    that many spread evenly from the first to the last (each open reads at most 256 MiB)."""
    path = os.path.join(directory, name)
    try:
        size = os.stat(path).st_size
    except OSError as e:
        raise StoreDamagedError(directory, f"{name}: {e.strerror}") from None
    if size != record["size"]:
        raise StoreDamagedError(
            directory, f"{name} holds {size} bytes, its index says {record['size']}"
        )
    digests = record["sha256"]
    block = int(record["block"])
    n = len(digests)
    picks = range(n) if n <= _VERIFY_BLOCKS else np.linspace(0, n - 1, _VERIFY_BLOCKS).round()
    with open(path, "rb") as f:
        for i in sorted({int(i) for i in picks}):
            f.seek(i * block)
            if hashlib.sha256(f.read(block)).hexdigest() != digests[i]:
                raise StoreDamagedError(
                    directory, f"{name}: bytes {i * block}..{min(size, (i + 1) * block)} changed"
                )


def warn(message: str) -> None:
    """One line on stderr: what the data layer did on its own (e.g. rebuilt a damaged store)."""
    print(f"warning: {message}", file=sys.stderr, flush=True)
