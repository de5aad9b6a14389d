"""The GPU check's `context` part: skipped without two GPUs, and its check on simulated devices."""

import json

import pytest

from tests.multiprocess import TOLERANT_XLA, run_script
from xlstm_eqx.tools.gpu_check.context import context_sizes, run_context
from xlstm_eqx.tools.gpu_check.report import Part, Report


def test_context_part_is_skipped_with_a_note_without_two_gpus(tmp_path):
    report = Report(tmp_path, {"quick": True}, {"context": 60.0})
    part = Part(report, "context")
    run_context(part, quick=True)  # this machine: no GPU
    part_one = Part(Report(tmp_path / "one", {"quick": True}, {"context": 60.0}), "context")
    run_context(part_one, quick=True, devices=["gpu0"])  # one device: nothing to split over
    for p, found in ((part, "; 0 found"), (part_one, "; 1 found")):
        (row,) = p.entry["rows"]
        assert row["status"] == "skipped" and p.entry["status"] == "ok"
        assert row["note"].startswith("needs 2 or more GPUs") and found in row["note"]
    assert json.loads((tmp_path / "gpu_check.json").read_text())["parts"]["context"]["rows"]


def test_context_sizes():
    assert [context_sizes(n) for n in (0, 1, 2, 3)] == [(), (), (2,), (2,)]
    assert [context_sizes(n) for n in (4, 6, 8, 16)] == [(2, 4), (2, 4), (2, 8), (2, 8)]


_WORKER = """
import json, jax
from xlstm_eqx.tools.gpu_check.context import check_context_parallel
row = check_context_parallel(jax.devices(), 2, 256, repeats=1)
print("RESULT " + json.dumps(row))
"""


@pytest.mark.slow  # a subprocess with 2 simulated CPU devices
def test_context_check_passes_on_two_simulated_devices(tmp_path):
    row = run_script("gpu_check context", _WORKER, 2, tmp_path, 600, TOLERANT_XLA)  # a tolerance
    assert row["status"] == "pass" and row["rel_err"] <= row["tol"]
    assert row["ms_cp"] > 0 and row["temp_mib_per_device_cp"] > 0
