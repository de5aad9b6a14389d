"""Sharded, asynchronous checkpoints through orbax: what a run on many hosts needs.

Layout of one checkpoint, ``ROOT/step_00000123/`` (an orbax ``CheckpointManager`` step):

- ``<name>/`` for each saved PyTree (``model``, ``opt_state``): its array leaves as a nested dict
  (one key per path entry, e.g. ``xlstm_block_stack/blocks/…/kernel``) in orbax's OCDBT/zarr
  format. Every process writes only the shards its devices hold (``ocdbt.process_<i>/``), one
  replica of each; nothing is gathered.
- ``meta/metadata``: JSON: format, version, step, for each tree the leaves' key paths, shapes and
  dtypes (checked before any array is read), a checksum of each leaf (compared with what a
  restore read: a damaged shard is named, not loaded), and the caller's metadata (the trainer
  stores the data position, the RNG key data and the resolved run config). No pickle anywhere.

`CheckpointStore.save` returns once every array has been copied off the devices; the files are
written in the background while training goes on (the step may donate its buffers right away). A
checkpoint is written into a temporary directory and renamed (or, on buckets, marked committed)
only when complete, so a crash or ``SIGKILL`` never leaves a half-written checkpoint visible. Only
the newest ``keep`` checkpoints are kept.

Restoring takes a template for each tree (an ``eqx.filter_eval_shape`` skeleton will do) and,
optionally, a tree of target shardings (e.g. ``named_shardings(param_partition_specs(...),
mesh)``): every array is read straight into its target sharding, whatever mesh or number of
processes wrote it, and each process reads only the chunks its devices need.
"""

import contextlib
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import PyTree

from ..core.untrusted import load_json, printable
from ..xlstm.pytree_renames import manifest_with_current_paths, older_keys
from .checkpoint import CheckpointError, check_manifest, check_meta
from .leaf_checksums import (
    CHECKSUM,
    check_checksum_record,
    check_meta_digest,
    leaf_checksums,
    verify_leaves,
    with_meta_digest,
)
from .newest_intact import read_newest, warn as _warn
from .orbax_faults import (
    drop_failed_reads,
    first_line,
    quiet_orbax_tracebacks,
    release_orbax_threads,
    root_cause,
)


FORMAT = "xlstm_eqx-orbax-checkpoint"
VERSION = 1
META_ITEM = "meta"
_STEP_PREFIX = "step"
_STEP_DIGITS = 8
_STEP_DIR = re.compile(r"^step_(\d+)$")
_TREE_NAME = re.compile(r"^[A-Za-z0-9_]+$")


def _ocp() -> Any:
    # orbax (and tensorstore) take seconds to import: only when a checkpoint is touched.
    import orbax.checkpoint as ocp

    quiet_orbax_tracebacks()
    return ocp


def _epath(path: str | os.PathLike) -> Any:
    """An etils path; a local path made absolute, as orbax refuses relative ones."""
    from etils import epath

    text = os.fspath(path)
    return epath.Path(text if "://" in text else os.path.abspath(text))


def _name_format() -> Any:
    ocp = _ocp()
    return ocp.path.step.standard_name_format(
        step_prefix=_STEP_PREFIX, step_format_fixed_length=_STEP_DIGITS
    )


def step_dir_name(step: int) -> str:
    return f"{_STEP_PREFIX}_{step:0{_STEP_DIGITS}d}"


# trees <-> nested dicts of arrays


def _is_leaf_array(x: Any) -> bool:
    return eqx.is_array(x) or isinstance(x, jax.ShapeDtypeStruct)


def _entry_name(entry: Any) -> str:
    if isinstance(entry, jax.tree_util.GetAttrKey):
        return entry.name
    if isinstance(entry, jax.tree_util.SequenceKey):
        return str(entry.idx)
    if isinstance(entry, jax.tree_util.DictKey):
        return str(entry.key)
    if isinstance(entry, jax.tree_util.FlattenedIndexKey):
        return str(entry.key)
    return str(entry)


def _flatten(tree: PyTree) -> tuple[list[tuple[str, tuple[str, ...], Any]], Any]:
    """``[(key path string, storage keys, leaf)]`` of the array leaves, and their treedef."""
    arrays, _ = eqx.partition(tree, _is_leaf_array)
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(arrays)
    out = []
    for path, leaf in leaves_with_path:
        out.append((jax.tree_util.keystr(path), tuple(_entry_name(e) for e in path), leaf))
    return out, treedef


def _nest(name: str, flat: list[tuple[str, tuple[str, ...], Any]]) -> dict[str, Any]:
    """The leaves as a nested dict keyed by path entries (what orbax stores and names)."""
    root: dict[str, Any] = {}
    for path, keys, leaf in flat:
        if not keys:
            raise ValueError(f"cannot checkpoint {name}: its root is a bare array, not a PyTree")
        node = root
        for k in keys[:-1]:
            child = node.setdefault(k, {})
            if not isinstance(child, dict):
                raise ValueError(f"cannot checkpoint {name}{path}: its storage key collides")
            node = child
        if keys[-1] in node:
            raise ValueError(f"cannot checkpoint {name}{path}: its storage key collides")
        node[keys[-1]] = leaf
    return root


def _lookup(nested: Mapping[str, Any], keys: tuple[str, ...]) -> Any:
    node: Any = nested
    for k in keys:
        node = node[k]
    return node


def _dtype_name(x: Any) -> str:
    return str(jnp.dtype(x.dtype))


def _leaf_manifest(name: str, flat: list[tuple[str, tuple[str, ...], Any]]) -> list[dict]:
    out = []
    for path, _, leaf in flat:
        if isinstance(leaf, jax.ShapeDtypeStruct):
            raise ValueError(f"cannot save {name}{path}: it is a shape skeleton, not data")
        if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            raise ValueError(
                f"cannot save {name}{path}: a typed PRNG key array; save jax.random.key_data(key)"
            )
        out.append({"path": path, "shape": list(leaf.shape), "dtype": _dtype_name(leaf)})
    return out


# what is on disk


def _is_npz_checkpoint(path: Any) -> bool:
    return (path / "meta.json").exists() and not (path / META_ITEM).exists()


def npz_checkpoints(root: str | os.PathLike) -> list[str]:
    """Checkpoints of the older ``.npz`` format (``step_*/meta.json``) under ``root``."""
    root_p = _epath(root)
    if not root_p.is_dir():
        return []
    found = []
    for child in root_p.iterdir():
        if _STEP_DIR.match(child.name) and child.is_dir() and _is_npz_checkpoint(child):
            found.append(os.fspath(child))
    return sorted(found)


def refuse_npz_checkpoints(root: str | os.PathLike) -> None:
    """A clear error when ``root`` holds checkpoints of the older ``.npz`` format, which orbax
    would otherwise take for (broken) steps of its own."""
    old = npz_checkpoints(root)
    if old:
        raise CheckpointError(
            f"{os.fspath(root)!r} holds checkpoints in the older .npz format "
            f"({os.path.basename(old[-1])}/meta.json); this version writes and resumes orbax "
            "checkpoints: continue the run with an older xlstm-eqx or start a new run in another "
            "directory (xlstm-eqx eval / load_run still read the .npz ones)"
        )


def list_checkpoints(root: str | os.PathLike) -> list[tuple[int, str]]:
    """Complete (committed) orbax checkpoints under ``root`` as ``(step, path)``, oldest first;
    checkpoints still being written, or cut off by a crash, are not listed."""
    root_p = _epath(root)
    if not root_p.is_dir():
        return []
    out = []
    for meta in _name_format().find_all(root_p):
        if _is_npz_checkpoint(meta.path):
            continue
        out.append((int(meta.step), os.fspath(meta.path)))
    return sorted(out)


def latest_checkpoint(root: str | os.PathLike) -> str | None:
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def _checkpointer(handler: Any) -> Any:
    return _ocp().Checkpointer(handler)


def load_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON item of a checkpoint directory, validated as one of ours."""
    p = _epath(path)
    if not p.is_dir():
        raise CheckpointError(
            f"checkpoint {os.fspath(path)!r} does not exist or is not a directory"
        )
    if _is_npz_checkpoint(p):
        raise CheckpointError(
            f"checkpoint {os.fspath(path)!r} is in the older .npz format; read it with "
            "xlstm_eqx.training.checkpoint.restore_checkpoint (or xlstm-eqx eval / load_run)"
        )
    if not (p / META_ITEM).is_dir():
        raise CheckpointError(f"checkpoint {os.fspath(path)!r} is incomplete: no {META_ITEM}/ item")
    # Read as a plain file (orbax's JSON item is one JSON file, ``metadata``): no collective, so
    # one process alone can look (the arrays' restore is the collective part). Strict JSON, size-
    # and depth-bounded: the file is untrusted until its structure is checked.
    where = f"checkpoint {os.fspath(path)!r}: {META_ITEM}/metadata"
    try:
        meta = load_json(os.fspath(p / META_ITEM / "metadata"), error=ValueError)
    except ValueError as e:
        raise CheckpointError(
            f"checkpoint {os.fspath(path)!r}: cannot read {META_ITEM}/metadata ({e})"
        ) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{where} is not an {FORMAT} file")
    if meta.get("version") != VERSION:
        raise CheckpointError(
            f"{where}: format version {printable(repr(meta.get('version')))[:40]}, this code "
            f"reads {VERSION}"
        )
    check_meta(meta, where)
    check_checksum_record(meta, where)
    check_meta_digest(meta, os.fspath(path), f"{META_ITEM}/metadata")
    named = _STEP_DIR.match(os.path.basename(os.path.normpath(os.fspath(path))))
    if named and int(named.group(1)) != meta["step"]:
        raise CheckpointError(
            f"checkpoint {os.fspath(path)!r} is damaged: {META_ITEM}/metadata records step "
            f"{meta['step']}, not the directory's {int(named.group(1))}"
        )
    return meta


# restore


def _target_shardings(
    name: str, flat: list[tuple[str, tuple[str, ...], Any]], shardings: PyTree | None
) -> list[jax.sharding.Sharding]:
    """Where each leaf goes: ``shardings`` (by key path), else the template leaf's own sharding,
    else the first local device."""
    given: dict[str, jax.sharding.Sharding] = {}
    if shardings is not None:
        for p, s in jax.tree_util.tree_flatten_with_path(
            shardings, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding)
        )[0]:
            if isinstance(s, jax.sharding.Sharding):
                given[jax.tree_util.keystr(p)] = s
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    out = []
    for p, _, leaf in flat:
        s = given.get(p)
        if s is None:
            s = getattr(leaf, "sharding", None)
            if not isinstance(s, jax.sharding.Sharding):
                s = default
        out.append(s)
    return out


def restore_checkpoint(
    path: str | os.PathLike,
    templates: Mapping[str, PyTree],
    shardings: Mapping[str, PyTree] | None = None,
) -> tuple[dict[str, PyTree], dict[str, Any]]:
    """Load the trees named in ``templates`` from checkpoint ``path``; returns ``(trees,
    metadata)``.

    Each template supplies the structure and non-array parts; its array leaves (or
    ``jax.ShapeDtypeStruct``s) fix the expected key paths, shapes and dtypes, and every mismatch
    is named before any array is read. ``shardings[name]`` (a tree of ``Sharding``s, ``None``
    at non-array leaves) places each array: it is read straight into that layout, each process
    reading only what its devices hold. Without it, a leaf keeps the template's sharding or goes
    to the first local device.
    """
    spath = os.fspath(path)
    meta = load_metadata(path)
    shardings = shardings or {}
    out: dict[str, PyTree] = {}
    for name, template in templates.items():
        saved = meta.get("trees", {}).get(name)
        if saved is None:
            raise CheckpointError(f"checkpoint {spath!r} has no tree {name!r}")
        flat, treedef = _flatten(template)
        # A leaf renamed since it was saved (xlstm.pytree_renames) is stored under its old keys.
        stored = {e["path"] for e in saved}
        flat = [(p, k if p in stored else older_keys(k) or k, x) for p, k, x in flat]
        saved = manifest_with_current_paths(saved, [p for p, _, _ in flat])
        check_manifest(spath, name, saved, [(p, list(x.shape), _dtype_name(x)) for p, _, x in flat])
        targets = _target_shardings(name, flat, shardings.get(name))
        leaves = _read_tree(path, name, flat, targets) if flat else []
        sums = meta.get("checksums", {}).get(name)
        expected = (
            None if sums is None else dict(zip([e["path"] for e in saved], sums, strict=True))
        )
        verify_leaves(spath, name, [pth for pth, _, _ in flat], leaves, expected)
        arrays = jax.tree_util.tree_unflatten(treedef, leaves)
        _, static = eqx.partition(template, _is_leaf_array)
        out[name] = eqx.combine(arrays, static)
    return out, meta.get("metadata", {})


def _read_tree(
    path: str | os.PathLike,
    name: str,
    flat: list[tuple[str, tuple[str, ...], Any]],
    targets: list[jax.sharding.Sharding],
) -> list[Any]:
    """The arrays of tree ``name`` of checkpoint ``path``, in the order of ``flat`` (``(path,
    stored keys, template leaf)`` each), each read into its target sharding; an unreadable file
    is one `CheckpointError` line."""
    ocp = _ocp()
    abstract = _nest(
        name,
        [
            (pth, keys, jax.ShapeDtypeStruct(tuple(leaf.shape), leaf.dtype, sharding=s))
            for (pth, keys, leaf), s in zip(flat, targets, strict=True)
        ],
    )
    failure = None
    try:
        restored = _checkpointer(ocp.StandardCheckpointHandler()).restore(
            _epath(path) / name, args=ocp.args.StandardRestore(abstract)
        )
    except Exception as e:  # a damaged or vanished file: whatever orbax raises, one line
        failure = first_line(root_cause(e))
    if failure is not None:
        drop_failed_reads()
        raise CheckpointError(f"checkpoint {os.fspath(path)!r}: cannot read {name}/ ({failure})")
    return [_lookup(restored, keys) for _, keys, _ in flat]


# the newest checkpoint that reads


def restore_newest_intact(
    path: str | os.PathLike,
    templates: Mapping[str, PyTree],
    shardings: Mapping[str, PyTree] | None = None,
    *,
    warn: Callable[[str], None] = _warn,
) -> tuple[dict[str, PyTree], dict[str, Any], str, list[str]]:
    """`restore_checkpoint` of ``path`` or, where it is damaged, of the newest intact checkpoint
    before it in its directory (see `read_newest`): ``(trees, metadata, path read, damaged)``."""
    spath = os.fspath(_epath(path))  # as `list_checkpoints` names it
    root = os.path.dirname(spath)
    named = _STEP_DIR.match(os.path.basename(spath))
    last = int(named.group(1)) if named else None  # never a newer one than `path`

    def listing() -> list[str]:
        return [p for s, p in list_checkpoints(root) if last is None or s <= last]

    (trees, meta), used, damaged = read_newest(
        listing,
        lambda p: restore_checkpoint(p, templates, shardings),
        where=root,
        first=spath,
        warn=warn,
    )
    return trees, meta, used, damaged


# save


class CheckpointStore:
    """The checkpoints of one run under ``root``: asynchronous, sharded saves (every process
    calls `save` with the same step; each writes its own shards), keep-last-``keep``, atomic
    commits. Use as a context manager or call `close` (which waits for the last write)."""

    def __init__(
        self, root: str | os.PathLike, *, keep: int | None = 3, async_save: bool = True
    ) -> None:
        if keep is not None and keep < 1:
            raise ValueError(f"keep must be >= 1 or None, got {keep}")
        ocp = _ocp()
        self.root = os.path.abspath(os.fspath(root)) if "://" not in os.fspath(root) else root
        refuse_npz_checkpoints(self.root)
        policy = None if keep is None else ocp.checkpoint_managers.LatestN(n=keep)
        options = ocp.CheckpointManagerOptions(
            step_name_format=_name_format(),
            preservation_policy=policy,
            cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._manager = ocp.CheckpointManager(self.root, options=options)
        self._last_step: int | None = None  # the save that may still be being written
        self._failed = False  # a save failed (and was reported); nothing more is written
        self._closed = False

    def steps(self) -> list[int]:
        return sorted(int(s) for s in self._manager.all_steps())

    def path_of(self, step: int) -> str:
        return os.path.join(os.fspath(self.root), step_dir_name(step))

    def save(
        self,
        step: int,
        trees: Mapping[str, PyTree],
        metadata: Mapping[str, Any] | None = None,
    ) -> str:
        """Start writing ``trees`` (name → PyTree) and JSON ``metadata`` as step ``step``;
        returns the checkpoint's path once every array is off the devices (the write goes on in
        the background). Every process must call it. An existing step is never overwritten."""
        ocp = _ocp()
        for name in trees:
            if not _TREE_NAME.fullmatch(name) or name == META_ITEM:
                raise ValueError(
                    f"checkpoint tree name {name!r} must be alphanumeric/underscore and not "
                    f"{META_ITEM!r}"
                )
        if self._failed:
            raise CheckpointError(f"cannot save {self.path_of(step)!r}: an earlier save failed")
        self.wait()  # the previous save's error, if any, names its own checkpoint
        if step in self._manager.all_steps():
            raise CheckpointError(f"{self.path_of(step)!r} exists; checkpoints are not overwritten")
        manifest: dict[str, list[dict]] = {}
        checksums: dict[str, list[str]] = {}
        items: dict[str, Any] = {}
        for name, tree in trees.items():
            flat, _ = _flatten(tree)
            manifest[name] = _leaf_manifest(name, flat)
            checksums[name] = leaf_checksums([leaf for _, _, leaf in flat])
            if flat:
                items[name] = ocp.args.StandardSave(_nest(name, flat))
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "step": int(step),
            "trees": manifest,
            "checksum": CHECKSUM,
            "checksums": checksums,
            "metadata": dict(metadata or {}),
        }
        try:
            meta = with_meta_digest(meta)
        except (TypeError, ValueError) as e:
            raise ValueError(f"checkpoint metadata is not plain JSON: {e}") from None
        items[META_ITEM] = ocp.args.JsonSave(meta)
        self._last_step = int(step)
        try:
            self._manager.save(int(step), args=ocp.args.Composite(**items), force=True)
        except Exception as e:
            raise self._failure(e) from None
        return self.path_of(step)

    def _failure(self, e: BaseException) -> CheckpointError:
        """A failed save as one line naming its checkpoint; orbax's threads waiting on the
        failed step are released, so the process can exit (see `release_orbax_threads`)."""
        self._failed = True
        release_orbax_threads()
        where = self.root if self._last_step is None else self.path_of(self._last_step)
        return CheckpointError(f"cannot save checkpoint {where!r}: {first_line(e)}")

    def wait(self) -> None:
        """Block until the last save is written and committed; a `CheckpointError` naming the
        checkpoint if it failed (once: a failure is reported by the call that finds it)."""
        if self._failed:
            return
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            raise self._failure(e) from None

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.wait()
        finally:
            if self._failed:  # orbax's own close may fail again on the broken step
                with contextlib.suppress(Exception):
                    self._manager.close()
                release_orbax_threads()
            else:
                self._manager.close()

    def __enter__(self) -> "CheckpointStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def save_checkpoint(
    root: str | os.PathLike,
    step: int,
    trees: Mapping[str, PyTree],
    metadata: Mapping[str, Any] | None = None,
    *,
    keep: int | None = 3,
) -> str:
    """`CheckpointStore.save` once, waiting for the write: ``root/step_XXXXXXXX``. Every process
    must call it."""
    with CheckpointStore(root, keep=keep, async_save=False) as store:
        return store.save(step, trees, metadata)
