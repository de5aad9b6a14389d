"""The structure rules of the code base (issue 20), checked on the sources with `ast`.

The measuring functions are those of `scripts/code_metrics.py`, which prints the same numbers for
a before/after; each test here fails with the list of offenders (file and name).
"""

import importlib.util
import pathlib


ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load_code_metrics():
    spec = importlib.util.spec_from_file_location(
        "code_metrics", ROOT / "scripts" / "code_metrics.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


metrics = _load_code_metrics()


def test_no_private_name_is_imported_from_another_module():
    """`from xlstm_eqx.m import _name`, `import xlstm_eqx.m._name` and `xlstm_eqx.m._name`, in the
    package, tests, benchmarks, scripts and notebooks: a name used across modules is public."""
    found = metrics.cross_module_private_imports()
    listing = "\n".join(f"  {rel}: {module}.{name}" for rel, module, name in found)
    assert not found, f"{len(found)} imports of private names across modules:\n{listing}"


def test_no_function_in_training_is_over_60_lines():
    found = metrics.long_training_functions()
    listing = "\n".join(f"  {where}: {n} lines" for n, where in sorted(found, reverse=True))
    assert not found, f"functions over {metrics.LONG_FUNCTION_LINES} lines:\n{listing}"


def test_no_free_function_in_xlstm_has_more_than_8_parameters():
    found = metrics.wide_xlstm_functions()
    listing = "\n".join(f"  {where}: {n} parameters" for n, where in sorted(found, reverse=True))
    assert not found, f"free functions over {metrics.MAX_PARAMETERS} parameters:\n{listing}"


def test_no_config_is_typed_any():
    found = metrics.config_any()
    assert not found, "`config: Any` (name the config class):\n" + "\n".join(
        f"  {where}" for where in found
    )


def test_private_imports_are_found_in_every_form():
    """The detector itself: a `from` import (absolute or relative), a dotted `import` and an
    attribute chain each count; the module's own names and dunders do not."""
    source = (
        "import xlstm_eqx\n"
        "import xlstm_eqx.models._hidden\n"
        "from xlstm_eqx.generation import _decode, generate, __all__\n"
        "from .forms import _pad_time\n"
        "step = xlstm_eqx.training.step._optimizer_and_step\n"
        "own = xlstm_eqx.cell.pallas._kernel\n"
    )
    found = metrics.private_imports(ROOT / "xlstm_eqx" / "cell" / "pallas.py", source)
    assert sorted(found) == [
        ("xlstm_eqx.cell.forms", "_pad_time"),
        ("xlstm_eqx.generation", "_decode"),
        ("xlstm_eqx.models._hidden", "*"),
        ("xlstm_eqx.training.step", "_optimizer_and_step"),
    ]
