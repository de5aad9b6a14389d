"""The mapping machinery shared by the Hugging Face and xlstm-jax converters.

A converter describes a format as a list of `Entry`s: one per external tensor, naming the model
leaf it fills (a path of attribute names and tuple indices from the model root), the slot along
the leaf's leading axis when blocks are stacked for `lax.scan`, and the `Layout` that turns the
external array into that slot (a reshape, or the 2-D transpose between torch's ``(out, in)`` and
our ``(in, out)``). Both directions use the same list, so a round trip is exact by construction.

Loading fills a shape-only skeleton (`eqx.filter_eval_shape`): `ModelFiller.check` compares the
external names and shapes with the entries before any data is read, `put` copies each tensor into
its (float32, 64-byte aligned) leaf buffer as it arrives (one shard at a time), a leaf is handed
to JAX as soon as all its slots are filled — adopted without a copy on the CPU backend — and
`finish` puts the leaves into the skeleton with one `eqx.tree_at`. Peak host memory is one
float32 copy of the weights plus the tensor being read. Given target shardings (`mesh_shardings`),
each completed leaf goes straight into its sharding instead (each device receiving only its slice)
and its host buffer is released: host memory then stays near the leaves still being filled.
"""

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jaxtyping import Shaped

from ..core.parallel_config import ParallelConfig
from ..core.untrusted import (
    MAX_JSON_BYTES,
    count_nonfinite,
    load_json as _load_json,
    printable as printable,
)
from ..parallel.placement import place_global
from ..parallel.rules import param_partition_specs
from ..training.init_from import parallel_for_mesh


Path = tuple[str | int, ...]


class InteropError(ValueError):
    """A checkpoint or config cannot be converted: the message (one line) names every key, shape
    or config value at fault."""


# ----------------------------------------------------------------------------------------------
# untrusted input


def load_json(path: str, *, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """Strict JSON (`parse_json`: bounded size and depth, no NaN, no repeated keys) of a file;
    every failure is a one-line `InteropError` naming it."""
    return _load_json(path, error=InteropError, max_bytes=max_bytes)


def check_finite(array: Shaped[np.ndarray, "..."], what: str) -> None:
    """Raise `InteropError` if a float tensor holds NaN or inf: such weights load silently into a
    model whose every output is NaN, far from the tensor at fault."""
    bad = count_nonfinite(array)
    if bad:
        raise InteropError(
            f"{what} holds {bad} non-finite value{'s' if bad > 1 else ''} (NaN or inf) of "
            f"{array.size}"
        )


# Blocks a loaded config may ask for (the 7B has 32): a bound before per-block lists are made.
MAX_BLOCKS = 4096


def check_block_count(
    source: str, field: str, num_blocks: int, present: set[int], *, limit: int
) -> None:
    """Compare a config's block count with the blocks a checkpoint holds before anything of the
    config's size is built (the per-block model and name lists are far larger than a header)."""
    if num_blocks > limit:
        raise InteropError(f"{source}: {field}={num_blocks} is more than {limit} blocks")
    if num_blocks != len(present):
        held = f"{len(present)} blocks" if present else "no blocks"
        raise InteropError(f"{source}: {field}={num_blocks}, but the checkpoint holds {held}")


def get_path(tree: Any, path: Path) -> Any:
    """Follow attribute names (str) and sequence indices (int) from ``tree``."""
    for p in path:
        tree = tree[p] if isinstance(p, int) else getattr(tree, p)
    return tree


def path_str(path: Path) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path)


@dataclasses.dataclass(frozen=True)
class Layout:
    """How an external tensor is laid out relative to our array (a slot of one leaf).

    ``transpose``: the external tensor is the 2-D transpose of ours (torch ``(out, in)`` vs our
    ``(in, out)`` kernels). ``ext_shape``: the external shape as a function of ours, for layouts
    that only differ by a reshape (same element order), e.g. a leading tensor-parallel axis of
    size 1 or a flattened per-head norm scale.
    """

    transpose: bool = False
    ext_shape_fn: Callable[[tuple[int, ...]], tuple[int, ...]] | None = None

    def ext_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        if self.transpose:
            return tuple(reversed(shape))
        if self.ext_shape_fn is not None:
            return tuple(self.ext_shape_fn(shape))
        return tuple(shape)

    def to_eqx(self, x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        return (x.T if self.transpose else x).reshape(shape)

    def to_ext(self, x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        return x.T if self.transpose else x.reshape(self.ext_shape(shape))


SAME = Layout()


TRANSPOSE = Layout(transpose=True)


@dataclasses.dataclass(frozen=True)
class Entry:
    """One external tensor: its name, the model leaf (path) it maps to, the slot along the leaf's
    stacked leading axis (``None`` if the leaf is not stacked) and the layout."""

    name: str
    leaf: Path
    index: int | None
    layout: Layout = SAME


def leaf_paths(tree: Any) -> dict[Path, Any]:
    """Every array (or ShapeDtypeStruct) leaf of ``tree`` by its attribute/index path."""
    arrays, _ = eqx.partition(
        tree, lambda x: eqx.is_array(x) or isinstance(x, jax.ShapeDtypeStruct)
    )
    return {_key_path(keys): leaf for keys, leaf in jax.tree_util.tree_flatten_with_path(arrays)[0]}


def _slot_shape(leaf_shape: tuple[int, ...], index: int | None) -> tuple[int, ...]:
    return leaf_shape if index is None else leaf_shape[1:]


def format_shape(shape: Iterable[int]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(tuple(shape)) == 1 else "") + ")"


def _listing(title: str, items: list[str], limit: int = 40) -> str:
    """One line: ``title (n): a; b; ... and k more`` (names from files made printable)."""
    shown = [printable(i) for i in items[:limit]]
    more = f"; ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"{title} ({len(items)}): " + "; ".join(shown) + more


def _aligned_empty(shape: tuple[int, ...], dtype: Any, align: int = 64) -> np.ndarray:
    """An uninitialised host array whose data is ``align``-byte aligned (so that JAX's CPU
    client can adopt it without a copy)."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(nbytes + align, np.uint8)
    offset = (-raw.ctypes.data) % align
    return raw[offset : offset + nbytes].view(dtype).reshape(shape)


def _to_jax(buf: np.ndarray) -> jax.Array:
    """``buf`` as a JAX array. On the CPU backend the (aligned) host buffer is adopted through
    DLPack, without a copy, so that loading holds one copy of the weights; elsewhere it is
    copied to the default device and released once the copy is done."""
    if jax.default_backend() == "cpu":
        try:
            return jax.dlpack.from_dlpack(buf)
        except (TypeError, ValueError, RuntimeError, BufferError):  # pragma: no cover
            pass
    return jnp.asarray(buf).block_until_ready()


def _key_path(keys: Iterable[Any]) -> Path:
    path: list[str | int] = []
    for k in keys:
        if isinstance(k, jax.tree_util.GetAttrKey):
            path.append(k.name)
        elif isinstance(k, jax.tree_util.SequenceKey):
            path.append(k.idx)
        else:  # pragma: no cover - our models only nest modules and tuples
            raise InteropError(f"unexpected pytree key {k!r} in the model")
    return tuple(path)


def mesh_shardings(
    skeleton: Any,
    mesh: Mesh,
    parallel: ParallelConfig | None = None,
    *,
    base: ParallelConfig | None = None,
) -> dict[Path, NamedSharding]:
    """The sharding of every leaf of ``skeleton`` on ``mesh`` by the partition rules of
    ``parallel`` (default: ``base`` — e.g. the model config's ``parallel`` — with the mesh's axis
    sizes, and where ``base`` names no FSDP modules but the mesh has an fsdp axis > 1, FSDP over
    `default_fsdp_modules`: a model loaded at size is sharded by the mesh, not replicated)."""
    if parallel is None:
        try:
            parallel = parallel_for_mesh(mesh, base, skeleton)
        except ValueError as e:
            raise InteropError(str(e)) from None
    specs = param_partition_specs(skeleton, parallel, num_devices=mesh.devices.size)
    flat = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, P))[0]
    return {_key_path(k): NamedSharding(mesh, s) for k, s in flat if isinstance(s, P)}


class ModelFiller:
    """Fills a model skeleton from external tensors described by ``entries``.

    Leaves are float32 parameters; external arrays of any float dtype are cast on the way in.
    With ``shardings`` (leaf path → sharding, from `mesh_shardings`) each leaf is placed in its
    sharding as soon as it is complete.
    """

    def __init__(
        self,
        skeleton: Any,
        entries: list[Entry],
        *,
        source: str,
        shardings: Mapping[Path, jax.sharding.Sharding] | None = None,
    ):
        self.skeleton = skeleton
        self.shardings = dict(shardings or {})
        self.source = source
        self.entries = {e.name: e for e in entries}
        if len(self.entries) != len(entries):
            raise InteropError(f"{source}: internal error, repeated external names")
        self.leaves = leaf_paths(skeleton)
        slots: dict[Path, set[int | None]] = {}
        for e in entries:
            if e.leaf not in self.leaves:
                raise InteropError(f"{source}: internal error, no model leaf {path_str(e.leaf)}")
            slots.setdefault(e.leaf, set()).add(e.index)
        uncovered = [path_str(p) for p in self.leaves if p not in slots]
        if uncovered:
            raise InteropError(
                f"{source}: the model has parameters this format cannot hold: "
                + _listing("not expressible", uncovered)
            )
        for path, idx in slots.items():
            n = self.leaves[path].shape[0] if None not in idx else 1
            if len(idx) != n:
                raise InteropError(f"{source}: internal error, slots of {path_str(path)}")
        self.remaining = {p: len(s) for p, s in slots.items()}
        self.buffers: dict[Path, np.ndarray] = {}
        self.done: dict[Path, jax.Array] = {}
        self.seen: set[str] = set()

    def expected_shape(self, name: str) -> tuple[int, ...]:
        e = self.entries[name]
        return e.layout.ext_shape(_slot_shape(tuple(self.leaves[e.leaf].shape), e.index))

    def check(
        self,
        shapes: Mapping[str, tuple[int, ...]],
        dtypes: Mapping[str, Any],
        *,
        extra_missing: Iterable[str] = (),
        extra_mismatched: Iterable[str] = (),
    ) -> None:
        """Raise one `InteropError` naming every missing and unexpected tensor, every shape
        mismatch (with both shapes) and every non-float dtype — before any data is read."""
        missing = sorted(set(self.entries) - set(shapes)) + sorted(extra_missing)
        unexpected = sorted(set(shapes) - set(self.entries))
        mismatched = list(extra_mismatched)
        for name in sorted(set(shapes) & set(self.entries)):
            want, got = self.expected_shape(name), tuple(shapes[name])
            if want != got:
                mismatched.append(
                    f"{name}: checkpoint has shape {format_shape(got)}, the model expects "
                    f"{format_shape(want)}"
                )
        bad_dtypes = [
            f"{name}: dtype {np.dtype(dtypes[name])} is not a float type"
            for name in sorted(set(dtypes) & set(self.entries))
            if not jnp.issubdtype(np.dtype(dtypes[name]), jnp.floating)
        ]
        parts = []
        if missing:
            parts.append(_listing("missing keys", missing))
        if unexpected:
            parts.append(_listing("unexpected keys", unexpected))
        if mismatched:
            parts.append(_listing("shape mismatches", mismatched))
        if bad_dtypes:
            parts.append(_listing("bad dtypes", bad_dtypes))
        if parts:
            raise InteropError(
                f"{self.source} does not match the model its config describes: " + " | ".join(parts)
            )

    def put(self, name: str, array: np.ndarray) -> None:
        """Copy one external tensor into its leaf slot (float32)."""
        e = self.entries[name]
        if name in self.seen:
            raise InteropError(f"{self.source}: tensor {name!r} given twice")
        leaf = self.leaves[e.leaf]
        shape = _slot_shape(tuple(leaf.shape), e.index)
        if tuple(array.shape) != e.layout.ext_shape(shape):
            raise InteropError(
                f"{self.source}: {name}: shape {format_shape(array.shape)}, the model expects "
                f"{format_shape(e.layout.ext_shape(shape))}"
            )
        value = e.layout.to_eqx(np.asarray(array), shape)
        buf = self.buffers.get(e.leaf)
        if buf is None:
            buf = self.buffers[e.leaf] = _aligned_empty(tuple(leaf.shape), leaf.dtype)
        if e.index is None:
            buf[...] = value  # casts to float32
        else:
            buf[e.index] = value
        del value, buf
        self.seen.add(name)
        self.remaining[e.leaf] -= 1
        if self.remaining[e.leaf] == 0:  # complete: hand the buffer to JAX
            sharding = self.shardings.get(e.leaf)
            if sharding is None:
                self.done[e.leaf] = _to_jax(self.buffers.pop(e.leaf))
            else:  # each device gets its slice; the host buffer goes
                self.done[e.leaf] = place_global(self.buffers.pop(e.leaf), sharding)

    def finish(self) -> Any:
        """The skeleton with every leaf filled (raises if a tensor never arrived)."""
        missing = sorted(set(self.entries) - self.seen)
        if missing:
            raise InteropError(f"{self.source}: " + _listing("missing keys", missing))
        paths = list(self.done)
        return eqx.tree_at(
            lambda m: [get_path(m, p) for p in paths],
            self.skeleton,
            [self.done[p] for p in paths],
        )


def export_arrays(
    model: Any, entries: list[Entry]
) -> Iterator[tuple[str, tuple[tuple[int, ...], np.dtype, Callable[[], np.ndarray]]]]:
    """``(name, (shape, dtype, producer))`` per entry, for `save_file` or a dict: the producer
    makes the external array from the model leaf (float32) only when called."""
    leaves = leaf_paths(model)
    for e in entries:
        leaf = leaves[e.leaf]
        shape = _slot_shape(tuple(leaf.shape), e.index)
        ext = e.layout.ext_shape(shape)

        def produce(leaf: Any = leaf, e: Entry = e, shape: tuple[int, ...] = shape) -> np.ndarray:
            x = leaf if e.index is None else leaf[e.index]
            return np.ascontiguousarray(e.layout.to_ext(np.asarray(x), shape))

        yield e.name, (ext, np.dtype(leaf.dtype), produce)


def check_matches_config(model: Any, skeleton: Any) -> None:
    """Raise if ``model`` does not have the leaves (paths, shapes) its config describes."""
    have, want = leaf_paths(model), leaf_paths(skeleton)
    problems = [f"{path_str(p)}: missing from the model" for p in want if p not in have]
    problems += [f"{path_str(p)}: not described by the config" for p in have if p not in want]
    problems += [
        f"{path_str(p)}: model has shape {format_shape(have[p].shape)}, the config describes "
        f"{format_shape(want[p].shape)}"
        for p in want
        if p in have and tuple(have[p].shape) != tuple(want[p].shape)
    ]
    if problems:
        raise InteropError("the model does not match its config: " + _listing("problems", problems))


def shardings_by_path(shardings: Any) -> dict[Path, jax.sharding.Sharding]:
    """A tree of shardings (a model's structure, None at non-arrays: e.g. ``MeshLayout.
    model_shardings``) as leaf path → sharding, the form `ModelFiller` takes."""
    flat = jax.tree_util.tree_flatten_with_path(
        shardings, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding)
    )[0]
    return {_key_path(k): s for k, s in flat if isinstance(s, jax.sharding.Sharding)}
