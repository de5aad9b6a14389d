"""The names accepted in ``fsdp_modules`` / ``remat`` are declared on the modules they name
(``reference_name`` on a class, ``field_reference_names`` on an owner) and read in one place,
``parallel.rules.module_names``; ``MODULE_NAME_MAP`` documents exactly those names."""

import dataclasses

import equinox as eqx
import jax
import jax.random as jr
import pytest

from xlstm_eqx.core.parallel_config import ParallelConfig
from xlstm_eqx.models import build_model
from xlstm_eqx.parallel import MODULE_NAME_MAP, param_partition_specs
from xlstm_eqx.parallel.rules import declared_module_names, module_names, modules_in
from xlstm_eqx.presets import PRESETS


_SMALL = ("tiny_xlstm", "tiny_xlstm_slstm", "tiny_llama", "mLSTMv1_165M")


def _skeleton(name: str):
    return eqx.filter_eval_shape(build_model, PRESETS[name](), key=jr.key(0))


def _fsdp_sharded(skeleton, names: list[str]) -> set[str]:
    """Paths of the arrays that fsdp=8 shards when ``fsdp_modules=names`` (no size threshold)."""
    pc = ParallelConfig(fsdp_axis_size=8, data_axis_size=1, fsdp_modules=names)
    pc = dataclasses.replace(pc, fsdp_min_weight_size=0)
    specs = param_partition_specs(skeleton, pc, num_devices=8)
    flat = jax.tree_util.tree_flatten_with_path(
        specs, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec)
    )[0]
    return {jax.tree_util.keystr(p) for p, s in flat if "fsdp" in tuple(s)}


def test_module_name_map_is_what_the_presets_modules_declare():
    declared = set().union(*(declared_module_names(_skeleton(name)) for name in PRESETS))
    assert declared == set(MODULE_NAME_MAP)


def test_declared_field_names_are_fields_of_their_module():
    """A renamed field with a stale ``field_reference_names`` entry fails here, not silently."""
    for name in _SMALL:
        for module in modules_in(_skeleton(name)):
            declared = getattr(type(module), "field_reference_names", {})
            fields = {f.name for f in dataclasses.fields(module)}
            assert set(declared) <= fields, (type(module).__name__, set(declared) - fields)


@pytest.mark.parametrize("name", sorted(MODULE_NAME_MAP))
def test_every_documented_name_reaches_a_module(name):
    assert any(_fsdp_sharded(_skeleton(preset), [name]) for preset in _SMALL), name


def test_mlstm_cell_name_reaches_the_v2_cell_only():
    """As in the reference: "mLSTMCell" is the cell of the mLSTM inner layer (gates, norms); the
    v1 layer holds its gates and norms itself there, so its cell answers to no name."""
    v2 = _fsdp_sharded(_skeleton("mLSTM120M"), ["mLSTMCell"])
    assert v2 and all(".inner_layer.mlstm_cell." in path for path in v2)
    v1_skeleton = _skeleton("mLSTMv1_165M")
    assert _fsdp_sharded(v1_skeleton, ["mLSTMCell"]) == set()
    layer = v1_skeleton.xlstm_block_stack.blocks.xlstm_res_block.layer
    assert module_names(layer.cell, layer, "cell") == set()
    # the v1 gates are still reached through the enclosing block
    blocks = _fsdp_sharded(v1_skeleton, ["mLSTMBlock"])
    assert any(".layer.cell.igate." in path for path in blocks)


@pytest.mark.parametrize("field", ["fsdp_modules", "remat"])
def test_an_unknown_name_is_an_error(field):
    base = ParallelConfig(fsdp_axis_size=8, data_axis_size=1)
    pc = dataclasses.replace(base, **{field: ["Embed", "mLSTMBlok"]})
    with pytest.raises(ValueError, match=rf"{field}: unknown module name 'mLSTMBlok'"):
        param_partition_specs(_skeleton("tiny_xlstm"), pc, num_devices=8)
