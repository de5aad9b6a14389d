"""What a failed orbax read or write leaves behind, made into one line and a process that exits.

orbax logs each failure with a whole traceback, wraps tensorstore's error (which names the file)
in one that prints a TensorStore spec, leaves the other reads of a failed restore scheduled, and
keeps threads waiting for a failed save's signals; these helpers turn that into one
`CheckpointError` line for the caller and let the interpreter exit.
"""

import contextlib
import gc
import logging
import os
import sys
import threading
import warnings


__all__ = [
    "drop_failed_reads",
    "first_line",
    "quiet_orbax_tracebacks",
    "release_orbax_threads",
    "root_cause",
]


class _NoOrbaxTracebacks(logging.Filter):
    """Drops orbax's logged tracebacks (``absl`` ERROR records with exception info): every
    failure they report reaches the caller as one `CheckpointError` line naming the checkpoint."""

    def filter(self, record: logging.LogRecord) -> bool:
        from_orbax = f"{os.sep}orbax{os.sep}" in (record.pathname or "")
        return not (from_orbax and record.levelno >= logging.ERROR and record.exc_info)


def quiet_orbax_tracebacks() -> None:
    """Install the filter on the ``absl`` logger orbax logs through (once)."""
    absl = logging.getLogger("absl")
    if not any(isinstance(f, _NoOrbaxTracebacks) for f in absl.filters):
        absl.addFilter(_NoOrbaxTracebacks())


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    if isinstance(e, OSError) and e.strerror:
        text = e.strerror + (f": {e.filename!r}" if e.filename else "")
    return text.splitlines()[0] if text else type(e).__name__


def root_cause(e: BaseException) -> BaseException:
    """The innermost cause (orbax wraps tensorstore's error, which names the file and what is
    wrong with it, in one that prints a whole TensorStore spec)."""
    seen = {id(e)}
    while e.__cause__ is not None and id(e.__cause__) not in seen:
        e = e.__cause__
        seen.add(id(e))
    return e


def drop_failed_reads() -> None:
    """Collect what a failed orbax restore leaves behind now, quietly: its other reads'
    coroutines and tasks, whose collection would otherwise print "Exception ignored in ..." or
    "Task exception was never retrieved" tracebacks later on."""
    hook, log = sys.unraisablehook, logging.getLogger("asyncio")
    sys.unraisablehook, disabled, log.disabled = (lambda _: None), log.disabled, True
    try:
        gc.collect()
    finally:
        sys.unraisablehook, log.disabled = hook, disabled


def release_orbax_threads() -> None:
    """Let the interpreter exit after a failed asynchronous save: orbax's commit threads that
    wait for a signal the failed step never sends (e.g. "directory created") would otherwise
    keep the process alive for orbax's coordination timeout (many minutes). Each is cancelled and
    its signals set, so it wakes and returns at once."""
    try:
        from orbax.checkpoint._src.futures import future
    except ImportError:
        return
    released = False
    for t in threading.enumerate():
        if isinstance(t, future._SignalingThread) and t.is_alive():
            with contextlib.suppress(Exception):
                t.cancel()
                future.set_signals(t._receive_signals, operation_id=t._operation_id)
                released = True
    if released:  # their commits' coroutines are dropped unawaited: no warning for each at exit
        warnings.filterwarnings(
            "ignore", message=r"coroutine .* was never awaited", category=RuntimeWarning
        )
