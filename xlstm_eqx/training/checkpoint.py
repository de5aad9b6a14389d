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
mismatch; `.npz` files are read with `allow_pickle=False`.
"""

import json
import os
import re
import shutil
import tempfile
import zipfile
from collections.abc import Mapping
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import PyTree

from ..parallel.placement import gather_to_host, place_global


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


def _to_storable(x: np.ndarray) -> np.ndarray:
    # bfloat16 & co. are not native NumPy dtypes: store their bits as unsigned integers.
    if x.dtype.kind in "biufc" and type(x.dtype).__module__.startswith("numpy"):
        return x
    return x.view(np.dtype(f"u{x.dtype.itemsize}"))


def _fsync_dir(path: str) -> None:
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
        leaves_meta: dict[str, list[dict[str, Any]]] = {}
        for name, tree in trees.items():
            flat, _ = _flatten(tree)
            arrays: dict[str, np.ndarray] = {}
            leaves_meta[name] = []
            for i, (path, leaf) in enumerate(flat):
                if isinstance(leaf, jax.ShapeDtypeStruct):
                    raise ValueError(f"cannot save {name}{path}: it is a shape skeleton, not data")
                arr = np.asarray(jax.device_get(leaf))
                arrays[f"a{i:06d}"] = _to_storable(arr)
                leaves_meta[name].append(
                    {"path": path, "shape": list(arr.shape), "dtype": str(arr.dtype)}
                )
            with open(os.path.join(tmp, f"{name}.npz"), "wb") as f:
                np.savez(f, **arrays)
                f.flush()
                os.fsync(f.fileno())
        meta["trees"] = leaves_meta
        meta["metadata"] = dict(metadata or {})
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1, allow_nan=False)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if os.path.exists(final):
            trash = tempfile.mkdtemp(prefix=".tmp-replaced-", dir=root)
            os.replace(final, os.path.join(trash, "old"))
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep is not None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1 or None, got {keep}")
        for _, old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The `meta.json` of a checkpoint directory, validated as one of ours."""
    path = os.fspath(path)
    meta_path = os.path.join(path, "meta.json")
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist or is not a directory")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path!r} is incomplete: no meta.json") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint {path!r}: cannot read meta.json ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path!r}: meta.json is not an {FORMAT} file")
    if meta.get("version") != VERSION:
        raise CheckpointError(
            f"checkpoint {path!r}: format version {meta.get('version')!r}, this code reads {VERSION}"
        )
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
        saved = meta.get("trees", {}).get(name)
        if saved is None:
            raise CheckpointError(f"checkpoint {path!r} has no tree {name!r}")
        flat, treedef = _flatten(template)
        problems = []
        saved_by_path = {e["path"]: e for e in saved}
        want_paths = [p for p, _ in flat]
        for p in want_paths:
            if p not in saved_by_path:
                problems.append(f"{name}{p}: missing from the checkpoint")
        for p in saved_by_path:
            if p not in set(want_paths):
                problems.append(f"{name}{p}: in the checkpoint but not in the {name}")
        for p, leaf in flat:
            e = saved_by_path.get(p)
            if e is None:
                continue
            want_shape, want_dtype = list(leaf.shape), str(jnp.dtype(leaf.dtype))
            if e["shape"] != want_shape or e["dtype"] != want_dtype:
                problems.append(
                    f"{name}{p}: checkpoint has {e['dtype']}{e['shape']}, "
                    f"expected {want_dtype}{want_shape}"
                )
        if not problems and [e["path"] for e in saved] != want_paths:
            problems.append(f"{name}: leaves are stored in a different order")
        if problems:
            shown = "\n  ".join(problems[:20])
            more = f"\n  … and {len(problems) - 20} more" if len(problems) > 20 else ""
            raise CheckpointError(
                f"checkpoint {path!r} does not match the {name} it is restored into:\n  "
                f"{shown}{more}"
            )
        npz_path = os.path.join(path, f"{name}.npz")
        try:
            with np.load(npz_path, allow_pickle=False) as data:
                leaves = []
                for i, e in enumerate(saved):
                    arr = data[f"a{i:06d}"]
                    dtype = jnp.dtype(e["dtype"])
                    if arr.dtype != dtype:
                        arr = arr.view(dtype)
                    if list(arr.shape) != e["shape"]:
                        raise CheckpointError(
                            f"checkpoint {path!r}: {name}{e['path']} stored with shape "
                            f"{list(arr.shape)}, meta.json says {e['shape']}"
                        )
                    leaves.append(jnp.asarray(arr))
        except CheckpointError:
            raise
        except (OSError, KeyError, ValueError, zipfile.BadZipFile, EOFError) as e:
            raise CheckpointError(f"checkpoint {path!r}: cannot read {name}.npz ({e})") from None
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
