import json
import math
import subprocess
import sys

import pytest

from xlstm_eqx.cli import main
from xlstm_eqx.tools import cost_check
from xlstm_eqx.tools.cost_check import (
    EXIT_NO_BASELINE,
    EXIT_OK,
    EXIT_REGRESSION,
    compare_costs,
    cost_ratio,
    environment,
    run_cost_check,
)


# the comparison, on made-up costs


def test_compare_costs_fails_on_growth_beyond_tolerance_only():
    committed = {"a": {"flops": 1000.0, "bytes": 2000.0}, "b": {"flops": 500.0, "bytes": 10.0}}
    measured = {"a": {"flops": 1040.0, "bytes": 2060.0}, "b": {"flops": 500.0, "bytes": 10.0}}
    report = compare_costs(committed, measured, tolerance=0.03)
    assert len(report.failures) == 1  # bytes grew by exactly 3%: allowed
    (failure,) = report.failures
    assert failure.startswith("a flops: committed 1,000, measured 1,040, ratio 1.040")
    assert report.notes == []
    assert len(report.rows) == 4


def test_compare_costs_notes_shrink_and_one_sided_entries():
    committed = {"a": {"flops": 1000.0, "bytes": 100.0}, "gone": {"flops": 1.0, "bytes": 1.0}}
    measured = {"a": {"flops": 960.0, "bytes": 98.0}, "new": {"flops": 1.0, "bytes": 1.0}}
    report = compare_costs(committed, measured, tolerance=0.03)
    assert report.failures == []
    shrink = [n for n in report.notes if n.startswith("a flops")]
    assert len(shrink) == 1 and "--update" in shrink[0] and "ratio 0.960" in shrink[0]
    assert not any(n.startswith("a bytes") for n in report.notes)  # 2% smaller: quiet
    assert any(n.startswith("gone:") for n in report.notes)
    assert any(n.startswith("new:") for n in report.notes)


def test_compare_costs_fails_on_a_missing_measurement():
    report = compare_costs({"a": {"flops": 10.0}}, {"a": {"flops": math.nan}})
    assert len(report.failures) == 1 and report.failures[0].startswith("a flops")


def test_cost_ratio_of_zero_costs():
    assert cost_ratio(0.0, 0.0) == 1.0
    assert cost_ratio(0.0, 1.0) == math.inf
    assert cost_ratio(4.0, 5.0) == 1.25


# the whole check on one cheap real entry, in process

ENTRY = "cell/recurrent/forward"


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> dict:
    """A costs file recorded by the check itself (`--update`) for one entry; its contents."""
    path = tmp_path_factory.mktemp("costs") / "costs.json"
    assert run_cost_check(path, update=True, names=[ENTRY]) == EXIT_OK
    return json.loads(path.read_text())


def _baseline_scaled(tmp_path, recorded: dict, metric: str, factor: float):
    data = json.loads(json.dumps(recorded))
    entry = data["backends"][environment()["backend"]]["entries"][ENTRY]
    entry[metric] = entry[metric] * factor
    path = tmp_path / "baseline.json"
    path.write_text(json.dumps(data))
    return path, entry[metric]


def test_check_fails_when_a_committed_value_is_5_percent_lower(tmp_path, recorded, capsys):
    path, committed = _baseline_scaled(tmp_path, recorded, "flops", 0.95)
    assert run_cost_check(path, names=[ENTRY]) == EXIT_REGRESSION
    out = capsys.readouterr().out
    (line,) = [x for x in out.splitlines() if x.startswith("FAIL ")]
    assert f"{ENTRY} flops: committed {committed:,.0f}" in line
    assert "ratio 1.05" in line
    env = environment()
    assert f"measured with jax {env['jax']} / jaxlib {env['jaxlib']}" in out
    assert f"committed with jax {recorded['backends'][env['backend']]['jax']}" in out


def test_check_passes_with_a_note_when_a_committed_value_is_5_percent_higher(
    tmp_path, recorded, capsys
):
    path, _ = _baseline_scaled(tmp_path, recorded, "bytes", 1.05)
    assert run_cost_check(path, names=[ENTRY]) == EXIT_OK
    out = capsys.readouterr().out
    assert "FAIL" not in out
    (note,) = [x for x in out.splitlines() if x.startswith("note: ")]
    assert f"{ENTRY} bytes" in note and "--update" in note


def test_check_without_values_for_this_backend_exits_3_and_update_keeps_others(
    tmp_path, recorded, capsys
):
    backend = environment()["backend"]
    other = {"jax": "0", "jaxlib": "0", "entries": {ENTRY: {"flops": 1, "bytes": 1}}}
    path = tmp_path / "costs.json"
    path.write_text(json.dumps({"backends": {"elsewhere": other}}))
    assert run_cost_check(path, names=[ENTRY]) == EXIT_NO_BASELINE
    assert f"no committed costs for backend {backend!r}" in capsys.readouterr().out
    assert run_cost_check(path, update=True, names=[ENTRY]) == EXIT_OK
    written = json.loads(path.read_text())["backends"]
    assert written["elsewhere"] == other
    assert written[backend]["entries"] == recorded["backends"][backend]["entries"]


def test_cli_update_or_baseline_without_check_is_a_usage_error(tmp_path, capsys):
    assert main(["bench", "--update", "--compile-cache", "off"]) == 2
    assert main(["bench", "--baseline", str(tmp_path / "x.json"), "--compile-cache", "off"]) == 2
    assert "go with --check" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


@pytest.mark.parametrize("text", ['{"backends', '["a list"]'])
def test_a_damaged_costs_file_is_an_error_naming_it(tmp_path, text):
    path = tmp_path / "costs.json"
    path.write_text(text)
    with pytest.raises(ValueError, match="costs.json: not a costs file"):
        cost_check.read_costs(path)


def test_committed_costs_cover_every_entry():
    data = cost_check.read_costs(cost_check.default_costs_path())
    entries = data["backends"]["cpu"]["entries"]
    names = [n for n in cost_check.cost_entries() if "pallas" not in n]  # GPU only
    assert sorted(entries) == sorted(names)


# the check as a user types it


@pytest.mark.slow
def test_bench_check_passes_against_the_committed_costs(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "xlstm_eqx.cli", "bench", "--check"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if environment()["backend"] != "cpu":  # only CPU values are committed so far
        assert result.returncode == EXIT_NO_BASELINE, result.stdout + result.stderr
        return
    assert result.returncode == EXIT_OK, result.stdout + result.stderr
    assert "bench --check: ok" in result.stdout
