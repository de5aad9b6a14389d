"""A checkpoint of our own format written before a module moved in the model tree
(`xlstm.pytree_renames`) still loads, in both formats, and gives the same logits."""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from xlstm_eqx.presets import get_preset
from xlstm_eqx.training import checkpoint as npz_checkpoint, orbax_checkpoint
from xlstm_eqx.xlstm import xLSTMLMModel
from xlstm_eqx.xlstm.pytree_renames import older_keys, older_keystr, renamed_paths


class OldV1Layer(eqx.Module):
    """The ``mlstm_v1`` layer's tree before issue 20: the cell's gates and norms were fields of
    the layer itself (``layer.igate`` instead of ``layer.cell.igate``)."""

    dense_q: Any
    dense_k: Any
    dense_v: Any
    dense_o: Any
    igate: Any
    fgate: Any
    q_norm: Any
    k_norm: Any
    outnorm: Any
    proj_down: Any


def _with_old_v1_tree(model: xLSTMLMModel) -> eqx.Module:
    layer = model.xlstm_block_stack.blocks.xlstm_res_block.layer  # scanned blocks: one layer
    cell = layer.cell
    old = OldV1Layer(
        layer.dense_q,
        layer.dense_k,
        layer.dense_v,
        layer.dense_o,
        cell.igate,
        cell.fgate,
        cell.q_norm,
        cell.k_norm,
        cell.outnorm,
        layer.proj_down,
    )
    return eqx.tree_at(lambda m: m.xlstm_block_stack.blocks.xlstm_res_block.layer, model, old)


def _perturbed(model: xLSTMLMModel) -> xLSTMLMModel:
    """Every weight moved off its init, so a leaf read into the wrong place shows."""
    arrays, static = eqx.partition(model, eqx.is_inexact_array)
    leaves, treedef = jax.tree.flatten(arrays)
    keys = jr.split(jr.key(1), len(leaves))
    leaves = [x + 0.1 * jr.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys, strict=True)]
    return eqx.combine(jax.tree.unflatten(treedef, leaves), static)


@pytest.mark.parametrize("store", [npz_checkpoint, orbax_checkpoint])
def test_checkpoint_of_the_old_v1_tree_loads_into_the_new_one(store, tmp_path):
    config = get_preset("tiny_xlstm")
    model = _perturbed(xLSTMLMModel(config, key=jr.key(0)))
    path = store.save_checkpoint(tmp_path, 3, {"model": _with_old_v1_tree(model)}, {"step": 3})
    saved = [e["path"] for e in store.load_metadata(path)["trees"]["model"]]
    assert ".xlstm_block_stack.blocks.xlstm_res_block.layer.igate.kernel" in saved
    assert not any(".cell." in p for p in saved)  # really the old layout

    template = xLSTMLMModel(config, key=jr.key(7))
    trees, _ = store.restore_checkpoint(path, {"model": template})
    restored = trees["model"]
    tokens = jr.randint(jr.key(2), (2, 12), 0, config.vocab_size)
    np.testing.assert_array_equal(np.asarray(restored(tokens)), np.asarray(model(tokens)))
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(model), strict=True):
        assert bool(jnp.all(a == b))


def test_renames_apply_to_the_v1_cell_only():
    new = ".xlstm_block_stack.blocks.xlstm_res_block.layer.cell.outnorm.scale"
    assert older_keystr(new) == ".xlstm_block_stack.blocks.xlstm_res_block.layer.outnorm.scale"
    assert older_keystr("[0].mu.blocks[2].layer.cell.igate.kernel") == (
        "[0].mu.blocks[2].layer.igate.kernel"
    )
    # The sLSTM cell and the mlstm layer's cell keep their paths.
    assert older_keystr(".blocks[1].xlstm_res_block.layer.cell.recurrent_kernel") is None
    assert older_keystr(".blocks[0].layer.inner_layer.mlstm_cell.igate.kernel") is None
    assert older_keys(("blocks", "0", "layer", "cell", "fgate", "bias")) == (
        "blocks",
        "0",
        "layer",
        "fgate",
        "bias",
    )
    # A path the checkpoint holds as it is is never renamed.
    old = ".layer.igate.kernel"
    assert renamed_paths([old, ".layer.cell.igate.kernel"], [".layer.cell.igate.kernel"]) == {}
    assert renamed_paths([old], [".layer.cell.igate.kernel"]) == {old: ".layer.cell.igate.kernel"}
