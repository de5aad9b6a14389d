"""xlstm-jax parameter trees on disk, without pickle: flat ``a/b/c`` names in ``.safetensors`` or
``.npz`` files, and the reference trainer's orbax checkpoints, read whatever devices wrote them.
"""

import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from ..core.untrusted import NpzReader
from .common import InteropError
from .safetensors_files import SafetensorsError, SafetensorsFile, save_file
from .xlstm_jax import flatten_params, unflatten_params


_ORBAX_STEP = re.compile(r"^(?:checkpoint_)?(\d+)$")


def orbax_params_item(path: str) -> str:
    """The orbax item directory holding the parameters: ``path`` itself, its ``params/``, or the
    newest ``checkpoint_<step>/params`` under it (or under its ``checkpoints/``)."""
    if os.path.isfile(os.path.join(path, "_METADATA")):
        return path
    if os.path.isdir(os.path.join(path, "params")):
        return orbax_params_item(os.path.join(path, "params"))
    for root in (path, os.path.join(path, "checkpoints")):
        if not os.path.isdir(root):
            continue
        steps = sorted(
            (int(m.group(1)), name)
            for name in os.listdir(root)
            if (m := _ORBAX_STEP.match(name)) and os.path.isdir(os.path.join(root, name, "params"))
        )
        if steps:
            return os.path.join(root, steps[-1][1], "params")
    raise InteropError(
        f"{path!r} has no params.safetensors / params.npz and is not an orbax checkpoint "
        "(no _METADATA, params/ or checkpoint_<step>/params)"
    )


def _read_orbax_params(path: str) -> Any:
    """An orbax parameter tree as host arrays, whatever devices wrote it: each array is read
    into one local CPU device (the saved shardings name devices this process may not have)."""
    import orbax.checkpoint as ocp

    item = os.path.abspath(orbax_params_item(path))
    checkpointer = ocp.Checkpointer(ocp.StandardCheckpointHandler())
    try:
        meta = checkpointer.metadata(item)
        tree = getattr(meta, "item_metadata", meta)
        tree = getattr(tree, "tree", tree)
        cpu = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])

        def target(m: Any) -> Any:
            if not hasattr(m, "shape") or not hasattr(m, "dtype"):
                raise InteropError(f"{item!r}: a non-array leaf ({type(m).__name__}) among params")
            return jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=cpu)

        abstract = jax.tree.map(target, tree, is_leaf=lambda m: hasattr(m, "shape"))
        restored = checkpointer.restore(item, args=ocp.args.StandardRestore(abstract))
    except InteropError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InteropError(f"{item!r}: cannot read the orbax checkpoint ({first})") from None
    return jax.tree.map(np.asarray, restored)


def load_xlstm_jax_params(path: str | os.PathLike) -> dict[str, Any]:
    """A reference parameter tree from disk, without pickle.

    ``path``: a ``.safetensors`` or ``.npz`` file of flat ``a/b/c`` names (as
    `save_xlstm_jax_params` writes), a directory holding ``params.safetensors`` or
    ``params.npz``, or an orbax checkpoint of the reference trainer: its ``checkpoints/``
    directory (the newest ``checkpoint_<step>``), one step directory, or its ``params/`` item.
    An orbax checkpoint saved on more devices (or hosts) than this process has is read all the
    same: every array goes to one local CPU device.
    """

    path = os.fspath(path)
    if os.path.isdir(path):
        for name in ("params.safetensors", "params.npz"):
            if os.path.isfile(os.path.join(path, name)):
                return load_xlstm_jax_params(os.path.join(path, name))
        return unflatten_params(flatten_params(_read_orbax_params(path)))
    if path.endswith(".safetensors"):
        try:
            with SafetensorsFile(path) as st:
                return unflatten_params({k: st.read(k) for k in st.keys()})
        except SafetensorsError as e:
            raise InteropError(str(e)) from None
    if path.endswith(".npz"):
        # Each member's header is checked before its data is allocated; no pickle.
        with NpzReader(path, error=InteropError, what=repr(path)) as npz:
            others = [n for n in npz.members if not n.endswith(".npy")]
            if others:
                raise InteropError(f"{path!r}: member {others[0]!r} is not a .npy array")
            return unflatten_params({k: npz.read(k) for k in npz.names()})
    raise InteropError(f"{path!r}: expected a .safetensors or .npz file, or a checkpoint directory")


def save_xlstm_jax_params(params: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Write a parameter tree as flat ``a/b/c`` names to a ``.safetensors`` file."""

    flat = {k: np.asarray(v) for k, v in flatten_params(params).items()}
    save_file(flat, path, metadata={"format": "flax"})
