"""Reading the newest checkpoint that reads: a damaged one is skipped with a warning naming it,
one pruned by a live run while being read is replaced silently (`read_newest`)."""

import sys
from collections.abc import Callable
from typing import TypeVar

import jax

from .checkpoint import CheckpointError
from .orbax_faults import first_line


_T = TypeVar("_T")

_MAX_TRIES = 32  # checkpoints tried by `read_newest` (new ones may appear while a run is live)


def warn(message: str) -> None:
    """One line on stderr, from process 0 only."""
    if jax.process_index() == 0:
        print(message, file=sys.stderr, flush=True)


def read_newest(
    listing: Callable[[], list[str]],
    read: Callable[[str], _T],
    *,
    where: str,
    first: str | None = None,
    warn: Callable[[str], None] = warn,
) -> tuple[_T, str, list[str]]:
    """``read`` the newest checkpoint that reads (``first``, where given, else the newest of
    ``listing()``, paths oldest first); returns ``(result, path, damaged paths)``.

    A checkpoint that fails with a `CheckpointError` (or a vanished file) while still listed is
    damaged: where an older one is left to try, ``warn`` names it (a warning is printed only for
    a fallback actually tried). One no longer listed was pruned (by a live run keeping its newest
    N) between listing and reading: the listing is read again, without a warning. Where none
    reads, one `CheckpointError` line says how many were damaged and why the newest was."""
    tried: set[str] = set()
    damaged: list[str] = []
    newest: Exception | None = None
    pending: str | None = None  # the last damaged one's warning, once an older one is tried
    for _ in range(_MAX_TRIES):
        if first is not None and first not in tried:
            path = first
        else:
            fresh = [p for p in listing() if p not in tried]
            if not fresh:
                break
            path = fresh[-1]
        if pending is not None:
            warn(pending)
            pending = None
        tried.add(path)
        try:
            return read(path), path, damaged
        except (CheckpointError, FileNotFoundError) as e:
            if path not in listing():
                continue
            pending = f"warning: {first_line(e)}; trying the next older checkpoint"
            damaged.append(path)
            newest = newest or e
    if newest is None:
        raise FileNotFoundError(f"no checkpoint found in {where!r}")
    raise CheckpointError(
        f"no intact checkpoint in {where!r}: {len(damaged)} damaged, the newest: "
        f"{first_line(newest)}"
    )
