"""Context parallelism (issue 23): the ``cp`` mesh axis, its parsing and the sequence sharding of
the step's inputs; multi-device equivalence to one device in subprocesses
(``tests/parallel/context_worker.py``) with 8 simulated CPU devices."""

import pathlib
import subprocess
import sys

import equinox as eqx
import jax
import jax.random as jr
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from tests.corpus import write_corpus
from tests.multiprocess import (
    TOLERANT_XLA,
    collect,
    once_per_session,
    start_worker,
    worker_env,
    worker_result,
)
from tests.parallel.context_worker import CHUNK, MESHES, tiny_config
from xlstm_eqx.core.parallel_config import ParallelConfig
from xlstm_eqx.parallel import axis_sizes, make_mesh, parse_mesh_spec
from xlstm_eqx.parallel.context import (
    CONTEXT_AXIS_FIELD,
    check_sequence_split,
    with_context_parallel,
)
from xlstm_eqx.parallel.rules import batch_spec, modules_in, sequence_spec
from xlstm_eqx.presets import tiny_xlstm
from xlstm_eqx.training import read_metrics
from xlstm_eqx.training.preflight import check_mesh
from xlstm_eqx.xlstm import xLSTMLMModel


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
        ParallelConfig(**kwargs)  # checked on construction


def test_parse_context_axis_errors():
    with pytest.raises(ValueError, match="size of axis 'cp' must be positive or -1"):
        parse_mesh_spec("cp=0")
    with pytest.raises(ValueError, match="axis 'context' is given twice"):
        parse_mesh_spec("cp=2,context=2")


# ----------------------------------------------------------------------------------------------
# 8 simulated devices (subprocesses, tests/parallel/context_worker.py)


def _run_workers(tmp: pathlib.Path) -> dict:
    procs = {  # every check has a tolerance: the faster-compiling fusion emitter
        name: start_worker("tests.parallel.context_worker", args, 8, tmp, TOLERANT_XLA)
        for name, args in {
            "mlstm": ["equiv", "mlstm"],
            "mlstm_v1": ["equiv", "mlstm_v1"],
            "train": ["train"],
        }.items()
    }
    return {name: collect(name, p, timeout=1800) for name, p in procs.items()}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """The workers, once per session, concurrently."""
    return once_per_session(tmp_path_factory, "context_parallel", _run_workers)


@pytest.mark.slow
@pytest.mark.parametrize("layer_type", ["mlstm", "mlstm_v1"])
@pytest.mark.parametrize("mesh", MESHES)
@pytest.mark.parametrize("kind", ["multiple", "not_multiple"])
def test_loss_and_grads_equal_one_device(results, layer_type, mesh, kind):
    """Loss and gradients (float32) with document borders on segment boundaries and inside
    segments, S a multiple of cp × chunk or not, equal the one-device run's to 1e-5 relative."""
    r = worker_result(results[layer_type])[f"{mesh}/{kind}"]
    cp = parse_mesh_spec(mesh).context_axis_size
    multiple = r["seq"] % (cp * CHUNK) == 0
    assert multiple == (kind == "multiple")
    assert r["loss"] <= 1e-5, r
    assert r["grad_norm_rel"] <= 1e-5 and r["grad_max_rel"] <= 1e-5, r


@pytest.mark.slow
def test_training_on_cp4_follows_one_device(results):
    """20 optimizer steps on cp=4 log the one-device run's losses (<= 1e-4 relative per step)."""
    losses = worker_result(results["train"])
    one, split = np.asarray(losses["one"]), np.asarray(losses["cp=4"])
    assert len(one) == len(split) == 20 and one[-1] < one[0]  # it trains
    np.testing.assert_allclose(split, one, rtol=1e-4)


@pytest.mark.slow
def test_cli_train_on_cp2_from_another_directory(tmp_path):
    """`xlstm-eqx train --mesh cp=2` with relative paths from another working directory trains;
    a --seq-len that cp does not divide is refused naming the flag, before anything is written."""
    work = tmp_path / "work"
    write_corpus(work / "data", "text.txt")
    args = ["train", "--preset", "tiny", "--data", "data/text.txt", "--out", "runs/cp"]
    args += ["--batch-size", "2", "--steps", "2", "--no-progress", "--sample-tokens", "0"]
    args += ["--eval-batches", "1", "--log-every", "1", "--mesh", "cp=2", "--warmup-steps", "0"]
    env = worker_env(2)
    cli = [sys.executable, "-m", "xlstm_eqx.cli"]
    bad = subprocess.run(
        [*cli, *args, "--seq-len", "15"], cwd=work, env=env, capture_output=True, text=True
    )
    assert bad.returncode == 2, bad.stderr[-2000:]
    assert "--seq-len (TrainConfig.seq_len) = 15 is not divisible" in bad.stderr
    assert "cp=2" in bad.stderr and not (work / "runs" / "cp").exists()
    good = subprocess.run(
        [*cli, *args, "--seq-len", "16"], cwd=work, env=env, capture_output=True, text=True
    )
    assert good.returncode == 0, good.stderr[-3000:]
    rows = read_metrics(str(work / "runs" / "cp" / "metrics.jsonl"))
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 2 and all(np.isfinite(losses))


def test_sequence_split_errors_name_the_length():
    """S not divisible by cp: an error naming the flag and both numbers, before any run starts
    (the trainer's preflight; the step itself checks each batch the same way)."""
    config = tiny_xlstm()
    check_mesh("cp=4", config, what_if=True, seq_len=16)
    with pytest.raises(
        ValueError, match=r"--seq-len \(TrainConfig.seq_len\) = 15 is not divisible"
    ):
        check_mesh("cp=2,dp=2", config, what_if=True, seq_len=15)
    with pytest.raises(ValueError, match=r"sequence length S = 6 .* size cp=4 .* e.g. 4"):
        check_sequence_split(6, 4, "cp")
    check_sequence_split(6, 1, "cp")  # no cp axis: anything goes


def test_with_context_parallel_sets_the_axis_and_keeps_the_arrays():
    model = xLSTMLMModel(tiny_config("mlstm"), key=jr.key(0))
    split = with_context_parallel(model, "cp")
    declared = [m for m in modules_in(split) if hasattr(m, CONTEXT_AXIS_FIELD)]
    assert len(declared) >= 2  # the cell and the conv at least
    assert all(getattr(m, CONTEXT_AXIS_FIELD) == "cp" for m in declared)
    # the same arrays under the same paths (checkpoints unchanged), only the static field differs
    paths = jax.tree_util.tree_flatten_with_path(eqx.filter(model, eqx.is_array))[0]
    split_paths = jax.tree_util.tree_flatten_with_path(eqx.filter(split, eqx.is_array))[0]
    assert [(p, id(x)) for p, x in paths] == [(p, id(x)) for p, x in split_paths]
    assert eqx.tree_equal(with_context_parallel(split, None), model)
    with pytest.raises(ValueError, match="Linear has no context-parallel path"):
        with_context_parallel(eqx.nn.Linear(2, 2, key=jr.key(0)), "cp")


def _strip_axis(axis: str | None) -> str | None:
    return None if axis is None else axis.strip()


class _CheckedAxis(eqx.Module):
    """A module whose ``context_axis`` has a converter and an invariant, as Equinox runs them
    after ``__init__``."""

    weight: jax.Array
    context_axis: str | None = eqx.field(static=True, converter=_strip_axis)

    def __check_init__(self):
        if self.context_axis not in (None, "cp"):
            raise ValueError(f"unknown context axis {self.context_axis!r}")


def test_with_context_parallel_runs_the_modules_converters_and_checks():
    modules = [_CheckedAxis(jax.numpy.ones(2), None), _CheckedAxis(jax.numpy.zeros(3), None)]
    split = with_context_parallel(modules, " cp ")  # the converter strips it
    assert [m.context_axis for m in split] == ["cp", "cp"]
    assert all(a.weight is b.weight for a, b in zip(split, modules, strict=True))
    assert [m.context_axis for m in modules] == [None, None]  # the input is left as it was
    with pytest.raises(ValueError, match="unknown context axis 'sp'"):
        with_context_parallel(modules, "sp")
