"""Every parameter of every preset has an explicit sharding decision (logical axes declared where
it is created, xlstm_eqx.nn.axes), the tensor-parallel specs follow the written rule
(docs/architecture.md, "Partition rules") and an array without a declaration fails loudly."""

import dataclasses
import functools
import math
import re

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import pytest
from jax.sharding import PartitionSpec as P

from xlstm_eqx.core.parallel_config import ParallelConfig
from xlstm_eqx.models import build_model
from xlstm_eqx.nn import Dense
from xlstm_eqx.parallel import LOGICAL_AXIS_RULES, logical_axes, param_partition_specs
from xlstm_eqx.presets import PRESETS


@functools.cache
def _skeleton(name):
    """The preset's shape skeleton, built once per test process (the tests below share it)."""
    return eqx.filter_eval_shape(build_model, CONFIGS[name], key=jr.key(0))


def _configs():
    """Every preset, and each scannable one in its other block layout."""
    for name, make in PRESETS.items():
        config = make()
        yield name, config
        if config.scan_blocks or not getattr(config, "slstm_at", None):
            yield (
                f"{name}/scan={not config.scan_blocks}",
                dataclasses.replace(config, scan_blocks=not config.scan_blocks),
            )


CONFIGS = dict(_configs())


def _array_leaves(tree):
    def is_names(x):
        return isinstance(x, tuple) and all(isinstance(a, str) for a in x)

    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_names)[0]
    return [(jax.tree_util.keystr(path), value) for path, value in flat]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_parameter_of_every_preset_has_a_decision(name):
    skeleton = _skeleton(name)
    decisions = dict(_array_leaves(logical_axes(skeleton)))
    shapes = {
        jax.tree_util.keystr(path): x.shape
        for path, x in jax.tree_util.tree_flatten_with_path(skeleton)[0]
        if isinstance(x, jax.ShapeDtypeStruct)
    }
    assert set(decisions) == set(shapes)
    for path, axes in decisions.items():
        assert all(a == "replicated" or a in LOGICAL_AXIS_RULES for a in axes), (path, axes)
        if "replicated" not in axes:
            assert len(axes) == len(shapes[path]), (path, axes, shapes[path])


# The written rule, by the role of each array (independent of the declarations): column-parallel
# layers split their outputs, row-parallel ones their inputs (bias replicated), headwise kernels,
# per-head norms, conv channels, the skip, sLSTM heads and the xLSTM residual norms their
# heads/features, the embedding its features, the LM head its largest divisible axis when larger
# than fsdp_min_weight_size; q/k norms and the Llama pre-norms stay replicated.
_COLUMN = r"(proj_up|proj_up_gate|proj_up_mlstm|proj_up_z|dense_[qkvo]|igate|fgate|zgate|ogate"
_COLUMN += r"|[qkv]_proj|qk_proj|x_mlstm_conv_scaling)"
_RULES = [
    (r"\.token_embedding\.embedding$", 1),
    (r"\.(lm_head|out_norm)\.\w+$", "largest"),
    (r"\.attn\.dense_[qkv]\.kernel$", 1),
    (r"\.attn\.dense_out\.kernel$", 0),
    (r"\.(proj_down|dense_out)\.kernel$", 0),
    (r"\.(proj_down|dense_out)\.bias$", None),
    (_COLUMN + r"\.kernel$", "last_if_dense"),
    (_COLUMN + r"\.bias$", 0),
    (r"\.conv1d\.kernel$", 1),
    (r"\.conv1d\.bias$", 0),
    (r"\.(outnorm\.\w+|learnable_skip|cell\.recurrent_kernel|cell\.bias|group_norm_weight)$", 0),
    (r"_res_block\.(norm|post_norm)\.\w+$", 0),
    (r"\.(q_norm|k_norm|pre_norm)\.\w+$", None),
]


def _expected_tp_axis(path, layer_shape, tp, min_size):
    rules = [rule for pattern, rule in _RULES if re.search(pattern, path)]
    assert rules, f"{path}: no written rule covers this array"
    rule = rules[0]
    if rule == "largest":
        if math.prod(layer_shape) <= min_size:
            return None
        fits = [i for i, n in enumerate(layer_shape) if n % tp == 0]
        return max(fits, key=lambda i: (layer_shape[i], i)) if fits else None
    if rule == "last_if_dense":  # Dense (in, out) → out; headwise (P, o, i) → its blocks
        rule = 1 if len(layer_shape) == 2 else 0
    if rule is None or layer_shape[rule] % tp != 0:
        return None
    return rule


def _stacked(path):
    scanned = re.search(r"\.blocks\.(?!blocks)\w", path) is not None
    return int(scanned) + int(".qk_proj." in path)


@pytest.mark.slow
def test_tensor_parallel_specs_follow_the_written_rule():
    for name in CONFIGS:
        skeleton = _skeleton(name)
        shapes = dict(
            (jax.tree_util.keystr(path), x.shape)
            for path, x in jax.tree_util.tree_flatten_with_path(skeleton)[0]
        )
        for tp in (2, 4):
            _check_written_rule(name, skeleton, shapes, tp)


def _check_written_rule(name, skeleton, shapes, tp):
    pc = ParallelConfig(data_axis_size=-1, model_axis_size=tp)
    specs = param_partition_specs(skeleton, pc, num_devices=8)
    flat_specs = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda s: isinstance(s, P))[0]
    for path, spec in flat_specs:
        where = jax.tree_util.keystr(path)
        lead = _stacked(where)
        layer_shape = shapes[where][lead:]
        axis = _expected_tp_axis(where, layer_shape, tp, pc.fsdp_min_weight_size)
        want = [None] * len(layer_shape)
        if axis is not None:
            want[axis] = "tp"
        while want and want[-1] is None:
            want.pop()
        expected = P(*([None] * lead if want else []), *want)
        assert spec == expected, (name, tp, where, spec, expected)


class _Undeclared(eqx.Module):
    weight: jax.Array


class _StaleDeclaration(eqx.Module):
    """A field renamed (``kernel`` → ``w``) with its declaration left behind."""

    w: jax.Array
    kernel_axes = ("embed", "mlp")


class _Wrapper(eqx.Module):
    inner: eqx.Module


@pytest.mark.parametrize(
    "module, match",
    [
        (_Undeclared(jnp.zeros((4, 8))), r"\.inner\.weight .*no logical axes declared"),
        (_StaleDeclaration(jnp.zeros((4, 8))), r"\.inner\.w .*no logical axes declared"),
        (Dense(4, 8, key=jr.key(0)), r"\.inner\.kernel .*no logical axes declared"),
        (Dense(4, 8, axes=("embed",), key=jr.key(0)), r"1 logical axes .* rank 2"),
        (Dense(4, 8, axes=("embed", "hidden"), key=jr.key(0)), r"unknown logical axis 'hidden'"),
    ],
)
def test_an_undeclared_array_fails_loudly_instead_of_replicating(module, match):
    pc = ParallelConfig(data_axis_size=-1, model_axis_size=2)
    with pytest.raises(ValueError, match=match):
        param_partition_specs(_Wrapper(module), pc, num_devices=2)


def test_a_declared_module_is_sharded_by_its_names():
    pc = ParallelConfig(data_axis_size=-1, model_axis_size=2)
    column = Dense(4, 8, use_bias=True, axes=("embed", "mlp"), key=jr.key(0))
    specs = param_partition_specs(_Wrapper(column), pc, num_devices=2)
    assert specs.inner.kernel == P(None, "tp") and specs.inner.bias == P("tp")


def test_without_tensor_parallelism_an_undeclared_module_still_shards_by_fsdp():
    """The names only decide tp: a user's own module without declarations runs on a dp/fsdp mesh
    (its arrays split by size, as the reference's FSDP does), and fails only once tp > 1."""
    pc = ParallelConfig(
        data_axis_size=1, fsdp_axis_size=2, fsdp_modules=["Embed"], fsdp_min_weight_size=1
    )
    specs = param_partition_specs(_Wrapper(_Undeclared(jnp.zeros((4, 8)))), pc, num_devices=2)
    assert specs.inner.weight == P()
    with pytest.raises(ValueError, match="no logical axes declared"):
        tp = ParallelConfig(data_axis_size=1, model_axis_size=2)
        param_partition_specs(_Wrapper(_Undeclared(jnp.zeros((4, 8)))), tp, num_devices=2)
