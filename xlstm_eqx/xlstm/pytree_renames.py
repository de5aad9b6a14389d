"""Renamed parameter paths of the xLSTM model tree, and how a reader of an older checkpoint of our
own format finds each of today's leaves under the path it was stored with.

Checkpoints name every leaf by its pytree path (``jax.tree_util.keystr``; orbax also nests the
arrays by the path's entries). When a module moves in the tree, `PYTREE_RENAMES` records the
move, and the readers (`training.checkpoint`, `training.orbax_checkpoint`, and through them
`interop.runs`) look a leaf missing from a checkpoint up under its older path. The foreign
formats (transformers, xlstm-jax) are mapped by name in `interop` and need no entry here.

This table sits in `xlstm/` (layer 2) rather than in `interop/` (layer 6): the checkpoint readers
in `training/` (layer 5) apply it and may import only from lower layers.
"""

import re
from collections.abc import Iterable
from typing import Any


#: ``(old attribute path, new attribute path)``: a run of attribute names inside a leaf's path,
#: oldest rename first. Issue 20: `mLSTMLayerV1` holds its gates and norms in an `mLSTMCell`
#: (``layer.igate`` became ``layer.cell.igate``).
PYTREE_RENAMES: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = tuple(
    (("layer", name), ("layer", "cell", name))
    for name in ("igate", "fgate", "q_norm", "k_norm", "outnorm")
)


def older_keys(keys: tuple[str, ...]) -> tuple[str, ...] | None:
    """The entries of a leaf's path (attribute names, indices as strings) before the newest
    rename that applies to it, or None where none does."""
    for old, new in reversed(PYTREE_RENAMES):
        for start in range(len(keys) - len(new) + 1):
            if keys[start : start + len(new)] == new:
                return keys[:start] + old + keys[start + len(new) :]
    return None


def older_keystr(path: str) -> str | None:
    """`older_keys` on a ``keystr`` path such as ``.blocks[0].layer.cell.igate.kernel``."""
    for old, new in reversed(PYTREE_RENAMES):
        pattern = re.escape("." + ".".join(new)) + r"(?=[.\[]|$)"
        renamed, count = re.subn(pattern, "." + ".".join(old), path, count=1)
        if count:
            return renamed
    return None


def renamed_paths(stored: Iterable[str], wanted: Iterable[str]) -> dict[str, str]:
    """``{stored path: today's path}`` for each wanted ``keystr`` path that the checkpoint lacks
    but holds under its older name; every other path is read as it is."""
    stored = set(stored)
    out = {}
    for path in wanted:
        if path in stored:
            continue
        old = older_keystr(path)
        if old is not None and old in stored:
            out[old] = path
    return out


def manifest_with_current_paths(
    saved: list[dict[str, Any]], wanted: Iterable[str]
) -> list[dict[str, Any]]:
    """A checkpoint's leaf manifest (entries with a ``"path"``) with every leaf stored under an
    older path named by today's path (`renamed_paths`); the order is kept."""
    renamed = renamed_paths([entry["path"] for entry in saved], wanted)
    return [{**entry, "path": renamed.get(entry["path"], entry["path"])} for entry in saved]
