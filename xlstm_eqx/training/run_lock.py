"""One run per output directory: `DIR/.lock`, held by process 0 of a run for its whole life.

The lock is an advisory `fcntl.flock` on `DIR/.lock` (on Linux NFS it becomes a POSIX byte-range
lock, served by the NFS lock manager). The kernel drops it when the holder exits in any way,
SIGKILL included, so a lock left by a killed run is stale by construction and the next run takes
it over. The file's text names the holder (pid, host, start time) for the refusal message; it is
not the lock itself. Where the file system refuses `flock` (some FUSE/NFS setups), the fallback
is `O_EXCL` creation of the file plus a liveness check of the recorded pid (same host only: a
lock held from another host is never taken over automatically).

Only process 0 of a multi-process run takes the lock: the other processes write nothing. A
`.lock` that is a symbolic link is refused (O_NOFOLLOW), never followed: its target stays as it is.
"""

import contextlib
import errno
import json
import os
import socket
import time
from collections.abc import Iterator
from typing import Any

from ..core.files import NOFOLLOW, open_read_binary


__all__ = ["LOCK_NAME", "RunLockSymlinkError", "RunLockedError", "hold_run_lock"]

LOCK_NAME = ".lock"


class RunLockedError(FileExistsError):
    """Another live run holds the output directory."""


def _holder_text() -> str:
    return json.dumps(
        {"pid": os.getpid(), "host": socket.gethostname(), "started": round(time.time(), 1)}
    )


def _read_holder(path: str) -> dict[str, Any]:
    try:
        with open_read_binary(path) as f:
            d = json.loads(f.read(4096) or b"{}")
        return d if isinstance(d, dict) else {}
    except (OSError, ValueError):
        return {}


def _describe(holder: dict[str, Any]) -> str:
    if "pid" not in holder:
        return "another process"
    return f"pid {holder.get('pid')} on host {holder.get('host', '?')}"


def _refuse(out: str, path: str) -> RunLockedError:
    holder = _describe(_read_holder(path))
    return RunLockedError(
        f"--out {out!r} is in use by another run ({holder}, lock file {path!r}); "
        "wait for it to finish or choose another --out"
    )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write_holder(fd: int) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, _holder_text().encode(), 0)


class RunLockSymlinkError(FileExistsError):
    """The lock file is a symbolic link: never followed (its target would be overwritten)."""


def _symlink_error(out: str, path: str) -> RunLockSymlinkError:
    return RunLockSymlinkError(
        f"--out {out!r}: the lock file {path!r} is a symbolic link; refusing to follow it "
        "(remove the link)"
    )


def _open_lock_file(out: str, path: str, flags: int) -> int:
    """The lock file opened with O_NOFOLLOW: a link there is refused, its target left alone."""
    try:
        return os.open(path, flags | NOFOLLOW, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP or (e.errno == errno.EEXIST and os.path.islink(path)):
            raise _symlink_error(out, path) from None
        raise


def _flock(out: str, path: str) -> int | None:
    """The locked fd, or None where the file system does not support flock."""
    import fcntl

    while True:
        fd = _open_lock_file(out, path, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _refuse(out, path) from None
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                return None
            raise
        # The holder before us may have unlinked the file after we opened it: then our lock is
        # on a dead inode; start over on the current file.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            _write_holder(fd)
            return fd
        os.close(fd)


def _exclusive(out: str, path: str) -> None:
    """Fallback: O_EXCL creation; a file whose pid is dead on this host is stale and replaced."""
    for _ in range(3):
        try:
            fd = _open_lock_file(out, path, os.O_RDWR | os.O_CREAT | os.O_EXCL)
        except RunLockSymlinkError:
            raise
        except FileExistsError:
            holder = _read_holder(path)
            pid = holder.get("pid")
            same_host = holder.get("host") == socket.gethostname()
            if isinstance(pid, int) and same_host and not _pid_alive(pid):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
                continue
            raise _refuse(out, path) from None
        _write_holder(fd)
        os.close(fd)
        return
    raise _refuse(out, path)


def _missing_folders(path: str) -> list[str]:
    """`path` and each of its parents that does not exist yet, deepest first."""
    missing: list[str] = []
    path = os.path.abspath(path)
    while not os.path.isdir(path) and os.path.dirname(path) != path:
        missing.append(path)
        path = os.path.dirname(path)
    return missing


@contextlib.contextmanager
def hold_run_lock(out: str) -> Iterator[str]:
    """Hold `out`'s run lock for the body (creating `out` if needed); raise `RunLockedError`,
    naming the holder, at once if another live run holds it. Yields the lock file's path.

    The folders it creates (`out` and any missing parents, as `runs/` of `--out runs/x`) are
    removed again, deepest first, if they hold nothing but the lock when the body ends (a run
    that failed before writing, e.g. on bad data).
    """
    created = _missing_folders(out)
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise OSError(e.errno, f"cannot create --out {out!r}: {e.strerror}") from None
    path = os.path.join(out, LOCK_NAME)
    fd = _flock(out, path)
    if fd is None:
        _exclusive(out, path)
    try:
        yield path
    finally:
        # Unlink while still holding the lock, so a waiter never locks a file we then delete.
        with contextlib.suppress(OSError):
            os.remove(path)
        if fd is not None:
            os.close(fd)
        for folder in created:
            with contextlib.suppress(OSError):
                os.rmdir(folder)  # only if empty
