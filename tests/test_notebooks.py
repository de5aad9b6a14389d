"""The notebooks in ``notebooks/`` run top to bottom without an error, and are stored executed.

Each notebook is executed by ``nbclient`` in a subprocess (its own Jupyter kernel, so this test
process's warning filters and jaxtyping hook do not apply inside it), with the repository root
first on ``PYTHONPATH`` so the kernel imports this checkout of ``xlstm_eqx``.
"""

import os
import pathlib
import subprocess
import sys
import time

import nbformat
import pytest


ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
EXPECTED = ["01_quickstart", "02_mlstm_cell", "03_train_tiny", "05_generation"]

_RUNNER = r"""
import sys
import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

path = sys.argv[1]
nb = nbformat.read(path, as_version=4)
client = NotebookClient(
    nb, timeout=240, kernel_name="python3", resources={"metadata": {"path": sys.argv[2]}}
)
try:
    client.execute()
except CellExecutionError as err:
    print(err)
    sys.exit(1)
"""


def _notebook_paths() -> list[pathlib.Path]:
    return sorted(NOTEBOOKS.glob("*.ipynb"))


def test_expected_notebooks_exist():
    names = {p.stem for p in _notebook_paths()}
    missing = [n for n in EXPECTED if n not in names]
    assert not missing, f"missing notebooks: {missing}"


@pytest.mark.parametrize("path", _notebook_paths(), ids=lambda p: p.stem)
def test_notebook_stored_executed(path):
    """The stored copy is one whole run (scripts/execute_notebooks.py): every code cell executed
    once, in order, with no error among its outputs, so a reader sees what the code prints."""
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), (
        f"{path.name} is not stored as one run from the top: "
        "run `python scripts/execute_notebooks.py` before committing"
    )
    for i, cell in enumerate(code):
        errors = [o for o in cell.outputs if o.output_type == "error"]
        assert not errors, f"{path.name} code cell {i} stored an error: {errors[0].get('ename')}"
    assert any(cell.outputs for cell in code), f"{path.name} stores no output at all"


@pytest.mark.slow
@pytest.mark.parametrize("path", _notebook_paths(), ids=lambda p: p.stem)
def test_notebook_runs(path):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    )
    env.setdefault("JAX_PLATFORMS", "cpu")
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", _RUNNER, str(path), str(NOTEBOOKS)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, (
        f"{path.name} failed after {seconds:.0f} s:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    )
