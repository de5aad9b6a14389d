"""Checkpoints without pickle: arrays in `.npz` files, everything else in JSON.

Layout of one checkpoint, `ROOT/step_00000123/`:

- `<name>.npz` for each saved PyTree (`model`, `opt_state`, …): its array leaves, in flattening order.
- `meta.json`: format version, step, for each tree the leaves' key paths, shapes and dtypes, and the
  caller's metadata (the trainer stores the data position, the RNG key and the resolved config).

Writes are atomic: everything goes into a temporary sibling directory that is renamed into place
with `os.replace` once complete, so a crash never leaves a half-written `step_*` directory, and the
previous checkpoints stay intact. Only the newest `keep` checkpoints are kept.

Restoring takes a template for each tree (a real PyTree or an `eqx.filter_eval_shape` skeleton),
checks that the saved leaves have the template's key paths, shapes and dtypes, and names every
mismatch (one line).

Checkpoints are read as untrusted input: `meta.json` is strict JSON (bounded size and depth, no
NaN, no repeated keys) whose structure is validated before use, each `.npz` member's `.npy` header
is checked against the template (dtype, shape, the bytes the member really holds) before its data
is allocated (`NpzReader`; nothing is unpickled), and floating-point leaves must be finite. Every
failure is a one-line `CheckpointError`. The strict JSON parser and the npz reader also serve the
interop loaders.
"""

import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any, cast

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import PyTree

from ..core.files import fsync_dir
from ..core.untrusted import (
    NpzReader,
    count_nonfinite,
    load_json,
    numeric_dtype,
    printable,
)
from ..parallel.placement import gather_to_host, place_global
from ..xlstm.pytree_renames import manifest_with_current_paths


FORMAT = "xlstm_eqx-checkpoint"


VERSION = 1


_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint is unreadable, incomplete, or does not match what it is restored into."""


def _is_leaf_array(x: Any) -> bool:
    return eqx.is_array(x) or isinstance(x, jax.ShapeDtypeStruct)


def _flatten(tree: PyTree) -> tuple[list[tuple[str, Any]], Any]:
    arrays, _ = eqx.partition(tree, _is_leaf_array)
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(arrays)
    return [(jax.tree_util.keystr(p), leaf) for p, leaf in leaves_with_path], treedef


def _storable_dtype(dtype: np.dtype) -> np.dtype:
    # bfloat16 & co. are not native NumPy dtypes: their bits are stored as unsigned integers.
    if dtype.kind in "biufc" and type(dtype).__module__.startswith("numpy"):
        return dtype
    return np.dtype(f"u{dtype.itemsize}")


def _to_storable(x: np.ndarray) -> np.ndarray:
    return x.view(_storable_dtype(x.dtype))


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(root: str | os.PathLike) -> list[tuple[int, str]]:
    """Complete checkpoints under `root` as `(step, path)`, oldest first."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        return []
    out = []
    for name in os.listdir(root):
        m = _STEP_DIR.match(name)
        path = os.path.join(root, name)
        if m and os.path.isfile(os.path.join(path, "meta.json")):
            out.append((int(m.group(1)), path))
    return sorted(out)


def latest_checkpoint(root: str | os.PathLike) -> str | None:
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def save_checkpoint(
    root: str | os.PathLike,
    step: int,
    trees: Mapping[str, PyTree],
    metadata: Mapping[str, Any] | None = None,
    *,
    keep: int | None = 3,
) -> str:
    """Write `trees` (name -> PyTree) and JSON `metadata` as `root/step_XXXXXXXX`, atomically.

    Afterwards only the newest `keep` checkpoints remain (`None` keeps all). Returns the path.
    """
    root = os.fspath(root)
    os.makedirs(root, exist_ok=True)
    for name in trees:
        if not re.fullmatch(r"[A-Za-z0-9_]+", name):
            raise ValueError(f"checkpoint tree name {name!r} must be alphanumeric/underscore")
    for stale in os.listdir(root):
        if stale.startswith(".tmp-"):
            shutil.rmtree(os.path.join(root, stale), ignore_errors=True)
    final = os.path.join(root, step_dir_name(step))
    tmp = tempfile.mkdtemp(prefix=f".tmp-{step_dir_name(step)}-", dir=root)
    try:
        meta: dict[str, Any] = {"format": FORMAT, "version": VERSION, "step": int(step)}
        meta["trees"] = {name: _write_tree(tmp, name, tree) for name, tree in trees.items()}
        meta["metadata"] = dict(metadata or {})
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1, allow_nan=False)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(tmp)
        _replace_directory(tmp, final, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep is not None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1 or None, got {keep}")
        for _, old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _write_tree(directory: str, name: str, tree: PyTree) -> list[dict[str, Any]]:
    """Write the leaves of ``tree`` as ``directory/name.npz`` (``a000000``, ``a000001``, ... in
    flattening order), synced to disk; returns each leaf's path, shape and dtype for meta.json."""
    flat, _ = _flatten(tree)
    arrays: dict[str, np.ndarray] = {}
    leaves_meta: list[dict[str, Any]] = []
    for i, (path, leaf) in enumerate(flat):
        if isinstance(leaf, jax.ShapeDtypeStruct):
            raise ValueError(f"cannot save {name}{path}: it is a shape skeleton, not data")
        arr = np.asarray(jax.device_get(leaf))
        arrays[f"a{i:06d}"] = _to_storable(arr)
        leaves_meta.append({"path": path, "shape": list(arr.shape), "dtype": str(arr.dtype)})
    with open(os.path.join(directory, f"{name}.npz"), "wb") as f:
        # (numpy's stub would match `**arrays` against its `allow_pickle: bool`)
        np.savez(f, **cast(dict[str, Any], arrays))
        f.flush()
        os.fsync(f.fileno())
    return leaves_meta


def _replace_directory(tmp: str, final: str, root: str) -> None:
    """Move the written ``tmp`` to ``final``; an older ``final`` (the same step saved again) is
    moved aside first and deleted only after, so one of the two is always in place."""
    if os.path.exists(final):
        trash = tempfile.mkdtemp(prefix=".tmp-replaced-", dir=root)
        os.replace(final, os.path.join(trash, "old"))
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_dir(root)


def _dtype_name_ok(name: Any) -> bool:
    if not isinstance(name, str):
        return False
    try:
        dtype = jnp.dtype(name)
    except (TypeError, ValueError):
        return False
    return str(dtype) == name and numeric_dtype(dtype)


def check_meta(meta: dict[str, Any], where: str) -> None:
    """The structure `restore_checkpoint` and its callers rely on, checked once."""

    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{where}: {what}")

    def is_int(x: Any) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    if not is_int(meta.get("step")) or meta["step"] < 0:
        raise bad("'step' must be an int >= 0")
    if not isinstance(meta.get("metadata", {}), dict):
        raise bad("'metadata' must be an object")
    trees = meta.get("trees")
    if not isinstance(trees, dict):
        raise bad("'trees' must be an object (tree name -> leaves)")
    for name, leaves in trees.items():
        if not re.fullmatch(r"[A-Za-z0-9_]+", name):
            raise bad(f"tree name {name!r} is not alphanumeric/underscore")
        if not isinstance(leaves, list):
            raise bad(f"trees.{name} must be a list of leaves")
        for i, e in enumerate(leaves):
            at = f"trees.{name}[{i}]"
            if not isinstance(e, dict) or set(e) != {"path", "shape", "dtype"}:
                raise bad(f"{at} must be an object with exactly 'path', 'shape' and 'dtype'")
            if not isinstance(e["path"], str):
                raise bad(f"{at}.path must be a string")
            shape = e["shape"]
            if not isinstance(shape, list) or not all(is_int(d) and d >= 0 for d in shape):
                raise bad(f"{at}.shape must be a list of ints >= 0")
            if not _dtype_name_ok(e["dtype"]):
                raise bad(f"{at}.dtype {printable(str(e['dtype']))[:40]!r} is not a numeric dtype")


def check_manifest(
    path: str,
    name: str,
    saved: list[dict[str, Any]],
    wanted: list[tuple[str, list[int], str]],
    *,
    ordered: bool = False,
) -> None:
    """Compare a checkpoint's leaf manifest (validated ``{path, shape, dtype}`` entries) with the
    ``(path, shape, dtype)`` of the tree it is restored into; every difference (missing and
    unexpected keys, shapes, dtypes) is named in one `CheckpointError` line, before any array is
    read. Both checkpoint formats use it."""
    problems = []
    saved_by_path = {e["path"]: e for e in saved}
    if len(saved_by_path) != len(saved):
        problems.append(f"{name}: the metadata lists a leaf path twice")
    want_paths = [p for p, _, _ in wanted]
    want_set = set(want_paths)
    for p in want_paths:
        if p not in saved_by_path:
            problems.append(f"{name}{p}: missing from the checkpoint")
    for p in saved_by_path:
        if p not in want_set:
            problems.append(f"{name}{printable(p)}: in the checkpoint but not in the {name}")
    for p, want_shape, want_dtype in wanted:
        e = saved_by_path.get(p)
        if e is not None and (e["shape"] != want_shape or e["dtype"] != want_dtype):
            problems.append(
                f"{name}{p}: checkpoint has {e['dtype']}{e['shape']}, "
                f"expected {want_dtype}{want_shape}"
            )
    if ordered and not problems and [e["path"] for e in saved] != want_paths:
        problems.append(f"{name}: leaves are stored in a different order")
    if problems:
        shown = "; ".join(problems[:20])
        more = f"; … and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise CheckpointError(
            f"checkpoint {path!r} does not match the {name} it is restored into: {shown}{more}"
        )


def load_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The `meta.json` of a checkpoint directory, validated as one of ours (structure included)."""
    path = os.fspath(path)
    meta_path = os.path.join(path, "meta.json")
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist or is not a directory")
    if not os.path.exists(meta_path):
        raise CheckpointError(f"checkpoint {path!r} is incomplete: no meta.json")
    try:
        meta = load_json(meta_path, error=ValueError)
    except ValueError as e:
        raise CheckpointError(f"checkpoint {path!r}: cannot read meta.json ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path!r}: meta.json is not an {FORMAT} file")
    if meta.get("version") != VERSION:
        raise CheckpointError(
            f"checkpoint {path!r}: format version {printable(repr(meta.get('version')))[:40]}, "
            f"this code reads {VERSION}"
        )
    check_meta(meta, f"checkpoint {path!r}: meta.json")
    return meta


def restore_checkpoint(
    path: str | os.PathLike, templates: Mapping[str, PyTree]
) -> tuple[dict[str, PyTree], dict[str, Any]]:
    """Load the trees named in `templates` from checkpoint `path`; returns `(trees, metadata)`.

    Each template supplies the structure and the non-array parts; its array leaves (or
    `jax.ShapeDtypeStruct`s) fix the expected key paths, shapes and dtypes. Every mismatch is
    listed in the `CheckpointError`.
    """
    path = os.fspath(path)
    meta = load_metadata(path)
    out: dict[str, PyTree] = {}
    for name, template in templates.items():
        saved = meta["trees"].get(name)
        if saved is None:
            raise CheckpointError(f"checkpoint {path!r} has no tree {name!r}")
        flat, treedef = _flatten(template)
        saved = manifest_with_current_paths(saved, [p for p, _ in flat])  # renamed since saved
        check_manifest(
            path,
            name,
            saved,
            [(p, list(leaf.shape), str(jnp.dtype(leaf.dtype))) for p, leaf in flat],
            ordered=True,  # npz members are positional
        )
        # Every leaf now matches the template: each npz member is checked against it before its
        # data is read.
        leaves = []
        what = f"checkpoint {path!r}: cannot read {name}.npz"
        with NpzReader(os.path.join(path, f"{name}.npz"), error=CheckpointError, what=what) as npz:
            for i, (p, leaf) in enumerate(flat):
                dtype = jnp.dtype(leaf.dtype)
                arr = npz.read(
                    f"a{i:06d}",
                    shape=tuple(leaf.shape),
                    dtype=_storable_dtype(dtype),
                    label=f"{name}{p}",
                )
                if arr.dtype != dtype:
                    arr = arr.view(dtype)
                bad = count_nonfinite(arr)
                if bad:
                    raise CheckpointError(
                        f"checkpoint {path!r}: {name}{p} holds {bad} non-finite value"
                        f"{'s' if bad > 1 else ''} (NaN or inf) of {arr.size}"
                    )
                leaves.append(jnp.asarray(arr))
        arrays = jax.tree_util.tree_unflatten(treedef, leaves)
        _, static = eqx.partition(template, _is_leaf_array)
        out[name] = eqx.combine(arrays, static)
    return out, meta.get("metadata", {})


def save_sharded_checkpoint(
    root: str | os.PathLike,
    step: int,
    trees: Mapping[str, PyTree],
    metadata: Mapping[str, Any] | None = None,
    *,
    keep: int | None = 3,
) -> str | None:
    """`save_checkpoint` for sharded trees: arrays are gathered to global host
    arrays (the stored format has no mesh in it), and only process 0 writes. Returns the path on
    process 0, None elsewhere. Every process must call it (the gather is collective)."""

    host = {name: gather_to_host(tree) for name, tree in trees.items()}
    if jax.process_index() != 0:
        return None
    return save_checkpoint(root, step, host, metadata, keep=keep)


def restore_sharded_checkpoint(
    path: str | os.PathLike,
    templates: Mapping[str, PyTree],
    shardings: Mapping[str, PyTree],
) -> tuple[dict[str, PyTree], dict[str, Any]]:
    """Load the named trees (templates may be ``eqx.filter_eval_shape`` skeletons) and place each
    array with its sharding from ``shardings[name]`` (a tree of ``Sharding``s, e.g.
    ``named_shardings(param_partition_specs(...), mesh)``) — whatever mesh the checkpoint was
    written from. The file is read on the host CPU; each device receives only its slice."""

    cpu = jax.local_devices(backend="cpu")[0]
    with jax.default_device(cpu):
        trees, meta = restore_checkpoint(path, templates)
    out = {}
    for name, tree in trees.items():
        sh = shardings.get(name)
        if sh is None:
            out[name] = tree
            continue
        arrays, static = eqx.partition(tree, eqx.is_array)
        placed = jax.tree.map(
            lambda a, s: place_global(np.asarray(a), s),
            arrays,
            sh,
            is_leaf=lambda s: isinstance(s, jax.sharding.Sharding),
        )
        out[name] = eqx.combine(placed, static)
    return out, meta
