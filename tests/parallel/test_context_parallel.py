"""Context parallelism (issue 23): the ``cp`` mesh axis, its parsing and the sequence sharding of
the step's inputs; multi-device equivalence to one device in subprocesses
(``tests/parallel/context_worker.py``) with 8 simulated CPU devices."""

import pytest
from jax.sharding import PartitionSpec as P

from xlstm_eqx.core.parallel_config import ParallelConfig
from xlstm_eqx.parallel import axis_sizes, make_mesh, parse_mesh_spec
from xlstm_eqx.parallel.rules import batch_spec, sequence_spec


# ----------------------------------------------------------------------------------------------
# the axis, parsing and specs (one device)


@pytest.mark.parametrize(
    "spec,devices,expected",
    [
        ("cp=8", 8, {"dp": 1, "fsdp": 1, "pp": 1, "cp": 8, "tp": 1}),
        ("dp=2,fsdp=4,cp=4", 32, {"dp": 2, "fsdp": 4, "pp": 1, "cp": 4, "tp": 1}),
        ("cp=2,fsdp=2,tp=2", 8, {"dp": 1, "fsdp": 2, "pp": 1, "cp": 2, "tp": 2}),
        ("cp=4", 8, {"dp": 2, "fsdp": 1, "pp": 1, "cp": 4, "tp": 1}),  # dp fills the rest
        ("context=-1,dp=2", 8, {"dp": 2, "fsdp": 1, "pp": 1, "cp": 4, "tp": 1}),
    ],
)
def test_parse_context_axis(spec, devices, expected):
    pc = parse_mesh_spec(spec)
    assert axis_sizes(pc, devices) == expected  # in mesh order: cp next to tp
    assert list(axis_sizes(pc, devices)) == ["dp", "fsdp", "pp", "cp", "tp"]


def test_mesh_without_cp_keeps_four_axes():
    pc = parse_mesh_spec("dp=-1")
    assert pc.context_axis_size == 1
    assert make_mesh(pc).axis_names == ("dp", "fsdp", "pp", "tp")
    assert sequence_spec(pc) == batch_spec(pc) == P(("dp", "fsdp"), None)


def test_context_axis_name_and_specs():
    base = ParallelConfig(context_axis_name="seq", fsdp_modules=["Embed"])
    pc = parse_mesh_spec("seq=2,fsdp=2", base)
    assert (pc.context_axis_size, pc.fsdp_axis_size, pc.fsdp_modules) == (2, 2, ["Embed"])
    assert axis_sizes(pc, 4) == {"dp": 1, "fsdp": 2, "pp": 1, "seq": 2, "tp": 1}
    # tokens (B, S+1) as loaded: not split over cp; inputs and targets (B, S): split
    assert batch_spec(pc) == P(("dp", "fsdp"), None)
    assert sequence_spec(pc) == P(("dp", "fsdp"), "seq")
    with pytest.raises(ValueError, match=r"cp=2, tp=2: the fixed sizes multiply to 8, which does"):
        make_mesh(parse_mesh_spec("cp=2,fsdp=2,tp=2"))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"context_axis_name": "tp"}, r"must differ from the other axis names \[.*'tp'\]"),
        ({"context_axis_size": 0}, r"context_axis_size"),
        ({"context_axis_size": -1, "fsdp_axis_size": -1}, r"at most one axis size may be -1"),
    ],
)
def test_context_axis_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ParallelConfig(**kwargs).validate()


def test_parse_context_axis_errors():
    with pytest.raises(ValueError, match="size of axis 'cp' must be positive or -1"):
        parse_mesh_spec("cp=0")
    with pytest.raises(ValueError, match="axis 'context' is given twice"):
        parse_mesh_spec("cp=2,context=2")
