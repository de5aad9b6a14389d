"""The older `.npz` checkpoints (still read by `load_run`): exact round trips, atomic writes,
keep-last-N, and clear errors on bad input. The orbax ones are in test_orbax_checkpoint.py."""

import json
import os

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest

from xlstm_eqx.training.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_metadata,
    restore_checkpoint,
    save_checkpoint,
)


class Net(eqx.Module):
    layers: tuple
    scale: jax.Array
    counter: jax.Array
    name: str = eqx.field(static=True)

    def __init__(self, sizes, *, key, name="net"):
        keys = jr.split(key, len(sizes) - 1)
        self.layers = tuple(
            eqx.nn.Linear(a, b, key=k) for a, b, k in zip(sizes[:-1], sizes[1:], keys, strict=True)
        )
        self.scale = jnp.ones((sizes[-1],), jnp.bfloat16)
        self.counter = jnp.array(7, jnp.int32)
        self.name = name


def example_trees(key, sizes=(3, 4, 2)):
    net = Net(sizes, key=key)
    opt = optax.adamw(1e-3)
    opt_state = opt.init(eqx.filter(net, eqx.is_inexact_array))
    # make the optimizer state non-trivial
    grads = jax.tree.map(jnp.ones_like, eqx.filter(net, eqx.is_inexact_array))
    with jax.numpy_dtype_promotion("standard"):  # optax mixes python floats and int32 counts
        _, opt_state = opt.update(grads, opt_state, eqx.filter(net, eqx.is_inexact_array))
    return net, opt_state


def same_tree(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(la, lb, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_bit_exact(tmp_path, getkey):
    net, opt_state = example_trees(getkey())
    meta = {"data_position": 12, "rng_key": [1, 2], "run_config": {"a": [1, 2.5, None]}}
    path = save_checkpoint(tmp_path, 5, {"model": net, "opt_state": opt_state}, meta)
    assert os.path.basename(path) == "step_00000005"
    template_net, template_opt = example_trees(getkey())
    trees, got_meta = restore_checkpoint(path, {"model": template_net, "opt_state": template_opt})
    same_tree(trees["model"], net)
    same_tree(trees["opt_state"], opt_state)
    assert trees["model"].name == "net" and trees["model"].scale.dtype == jnp.bfloat16
    assert got_meta == meta
    assert load_metadata(path)["step"] == 5


def test_restore_into_shape_skeleton(tmp_path, getkey):
    net, _ = example_trees(getkey())
    path = save_checkpoint(tmp_path, 1, {"model": net})
    skeleton = eqx.filter_eval_shape(Net, (3, 4, 2), key=getkey())
    trees, _ = restore_checkpoint(path, {"model": skeleton})
    same_tree(trees["model"], net)
    with pytest.raises(ValueError, match="skeleton"):
        save_checkpoint(tmp_path, 2, {"model": skeleton})
    assert latest_checkpoint(tmp_path) == path


def test_keep_last_n_and_resave(tmp_path, getkey):
    net, _ = example_trees(getkey())
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, {"model": net}, {"i": step}, keep=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 4]
    save_checkpoint(tmp_path, 4, {"model": net}, {"i": "again"}, keep=2)
    assert load_metadata(latest_checkpoint(tmp_path))["metadata"] == {"i": "again"}
    assert sorted(os.listdir(tmp_path)) == ["step_00000003", "step_00000004"]


def test_failed_write_leaves_previous_checkpoint_intact(tmp_path, getkey, monkeypatch):
    net, _ = example_trees(getkey())
    good = save_checkpoint(tmp_path, 1, {"model": net}, {"ok": True}, keep=1)
    calls = {"n": 0}
    real_savez = np.savez

    def failing_savez(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        return real_savez(*args, **kwargs)

    monkeypatch.setattr(np, "savez", failing_savez)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 2, {"model": net, "other": net}, keep=1)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["step_00000001"]  # no half-written step_2, no temp dir
    trees, meta = restore_checkpoint(good, {"model": example_trees(getkey())[0]})
    same_tree(trees["model"], net)
    assert meta == {"ok": True}


def test_mismatched_structure_names_the_leaf(tmp_path, getkey):
    net, _ = example_trees(getkey())
    path = save_checkpoint(tmp_path, 1, {"model": net})
    wider = Net((3, 5, 2), key=getkey())
    with pytest.raises(CheckpointError, match=r"model\.layers\[0\]\.weight.*\[4, 3\].*\[5, 3\]"):
        restore_checkpoint(path, {"model": wider})
    deeper = Net((3, 4, 2, 2), key=getkey())
    with pytest.raises(CheckpointError, match=r"model\.layers\[2\]\.weight: missing"):
        restore_checkpoint(path, {"model": deeper})
    with pytest.raises(CheckpointError, match="no tree 'opt_state'"):
        restore_checkpoint(path, {"model": net, "opt_state": net})
    f32 = eqx.tree_at(lambda n: n.scale, net, jnp.ones((2,), jnp.float32))
    with pytest.raises(
        CheckpointError, match=r"scale: checkpoint has bfloat16\[2\], expected float32"
    ):
        restore_checkpoint(path, {"model": f32})


def test_unreadable_checkpoints(tmp_path, getkey):
    net, _ = example_trees(getkey())
    with pytest.raises(CheckpointError, match="does not exist"):
        restore_checkpoint(tmp_path / "nothing", {"model": net})
    path = save_checkpoint(tmp_path, 1, {"model": net})
    with open(os.path.join(path, "model.npz"), "wb") as f:
        f.write(b"garbage, not a zip")
    with pytest.raises(CheckpointError, match="cannot read model.npz"):
        restore_checkpoint(path, {"model": net})
    meta_path = os.path.join(path, "meta.json")
    with open(meta_path, "w") as f:
        f.write("{truncated")
    with pytest.raises(CheckpointError, match="cannot read meta.json"):
        load_metadata(path)
    with open(meta_path, "w") as f:
        json.dump({"format": "something-else"}, f)
    with pytest.raises(CheckpointError, match="not an xlstm_eqx-checkpoint"):
        load_metadata(path)
    with open(meta_path, "w") as f:
        json.dump({"format": "xlstm_eqx-checkpoint", "version": 99}, f)
    with pytest.raises(CheckpointError, match="version 99"):
        load_metadata(path)
    os.remove(meta_path)
    with pytest.raises(CheckpointError, match="no meta.json"):
        load_metadata(path)
    assert list_checkpoints(tmp_path) == []  # incomplete directories are never "latest"


def test_no_pickle_in_files(tmp_path, getkey):
    net, opt_state = example_trees(getkey())
    path = save_checkpoint(tmp_path, 3, {"model": net, "opt_state": opt_state})
    for name in ("model.npz", "opt_state.npz"):
        with np.load(os.path.join(path, name), allow_pickle=False) as data:
            assert all(data[k].dtype != object for k in data.files)
