"""Small file helpers shared by the trainer and the CLI: reading a JSON or YAML
mapping with errors that name the file, writing files atomically and never through a symbolic
link, syncing a folder, and cutting text at a UTF-8 byte count.
"""

import contextlib
import errno
import json
import os
import secrets
from collections.abc import Callable
from typing import IO, Any


def read_mapping_file(path: str, what: str) -> dict[str, Any]:
    """The mapping in a JSON or YAML (`.yaml`/`.yml`) file; errors name `what` and the path."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ValueError(f"{what} {path!r} is not UTF-8 text (line {line}: {e.reason})") from None
    if path.endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError as e:
            raise ImportError(f"reading {path!r} needs PyYAML (pip install pyyaml)") from e
        try:
            d = yaml.safe_load(text)
        except yaml.YAMLError as e:  # syntax, and tags safe_load refuses (!!python/object…)
            mark = getattr(e, "problem_mark", None)
            first = getattr(e, "problem", None) or " ".join(str(e).split())
            if mark is not None:
                first += f" (line {mark.line + 1}, column {mark.column + 1})"
            raise ValueError(f"{what} {path!r} is not valid (safe) YAML: {first}") from None
        except RecursionError:
            raise ValueError(f"{what} {path!r} is nested too deeply") from None
    else:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{what} {path!r} is not valid JSON: {e}") from None
        except RecursionError:
            raise ValueError(f"{what} {path!r} is nested too deeply") from None
    if not isinstance(d, dict):
        raise ValueError(f"{what} {path!r} must hold a mapping, got {type(d).__name__}")
    return d


# Run files are never written through a symbolic link: a link planted in a run directory (or at
# a predictable temporary name) would otherwise make the run overwrite the link's target.
NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def refuse_symlink(path: str) -> None:
    """A FileExistsError naming `path` if it is a symbolic link (the run never follows one)."""
    if os.path.islink(path):
        raise FileExistsError(
            f"{path!r} is a symbolic link; refusing to follow it (remove the link)"
        )


def _open_fd(path: str, flags: int) -> int:
    try:
        return os.open(path, flags | NOFOLLOW, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:  # O_NOFOLLOW met a link
            refuse_symlink(path)
        raise


def open_append(path: str) -> IO[str]:
    """`path` opened for appending text, created if missing, never through a symbolic link."""
    return os.fdopen(_open_fd(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT), "a")


def open_read_binary(path: str) -> IO[bytes]:
    """`path` opened for reading bytes, never through a symbolic link."""
    return os.fdopen(_open_fd(path, os.O_RDONLY), "rb")


def write_atomic(path: str, write: Callable[[IO[bytes]], object]) -> None:
    """Write `path` whole or not at all: `write` fills a new temporary file beside it (a unique
    name, created with O_EXCL|O_NOFOLLOW, so a link planted there is never followed), which is
    synced and renamed over `path` (a link at `path` is replaced, not followed). On failure the
    temporary file is removed."""
    folder = os.path.dirname(path) or "."
    for _ in range(100):
        tmp = os.path.join(
            folder, f"{os.path.basename(path)}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        )
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | NOFOLLOW, 0o644)
            break
        except FileExistsError:
            continue
    else:
        raise FileExistsError(f"cannot create a temporary file beside {path!r}")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def copy_file_atomic(src: str, dst: str) -> None:
    """`src`'s bytes into `dst`, atomically (`write_atomic`)."""
    with open(src, "rb") as f:
        data = f.read()
    write_atomic(dst, lambda f: f.write(data))


def write_json_atomic(path: str, obj: Any) -> None:
    """`obj` as indented JSON in `path`, atomically (`write_atomic`). A value JSON cannot hold
    (NaN, inf) is a ValueError naming the file, raised before anything is created."""
    try:
        text = json.dumps(obj, indent=2, allow_nan=False) + "\n"
    except ValueError as e:
        raise ValueError(f"cannot write {path!r}: {e}") from None
    write_atomic(path, lambda f: f.write(text.encode("utf-8")))


def fsync_dir(path: str) -> None:
    """Make a rename or a new file in the folder `path` durable (best effort: a file system that
    cannot sync a folder is left alone)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def clip_utf8(text: str, max_bytes: int) -> str:
    """The longest prefix of `text` whose UTF-8 encoding has at most `max_bytes` bytes."""
    if len(text) <= max_bytes // 4:  # at most 4 bytes per character: short texts fit as they are
        return text
    raw = text.encode("utf-8")
    if len(raw) <= max_bytes:
        return text
    return raw[: max(0, max_bytes)].decode("utf-8", errors="ignore")
