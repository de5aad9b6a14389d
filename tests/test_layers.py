"""Every import inside the package points down the layers (docs/architecture.md, "Layers").

Each subpackage (or top-level module) of `xlstm_eqx` is one unit with a level. A module may import
from its own unit and from units of lower levels only; an import of another unit of the same level
or of a higher one fails, naming the file and line. Imports inside functions count too (read with
`ast`, so a cycle hidden behind an in-function import is found). The package root is the public
facade: modules inside the package never import it.
"""

import ast
import pathlib
import sys

import pytest


PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "xlstm_eqx"

LEVELS: dict[str, float] = {
    "core": 0,
    "nn": 1,
    "cell": 1,
    "xlstm": 2,
    "llama": 2,
    "presets": 3.0,
    "data": 3.0,
    "models": 3.1,
    "generation": 3.2,
    "parallel": 4,
    "training": 5,
    "interop": 6,
    "tools": 7,
    "cli": 8,
}


def _module_name(path: pathlib.Path, root: pathlib.Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imported_modules(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """The absolute names of the `xlstm_eqx` modules an import statement reads."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    assert isinstance(node, ast.ImportFrom)
    if node.level == 0:
        base = node.module or ""
    else:
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join(package + ([node.module] if node.module else []))
    if node.module is None:  # `from . import x`: x may be a module
        return [f"{base}.{a.name}" for a in node.names]
    return [base]


def _unit(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "xlstm_eqx":
        return None
    return parts[1] if len(parts) > 1 else ""


def import_edges(root: pathlib.Path) -> list[tuple[str, int, str, str]]:
    """``(file, line, importing module, imported module)`` for every import of the package
    inside it, top-level or in a function."""
    edges = []
    for path in sorted(root.rglob("*.py")):
        module = _module_name(path, root)
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _imported_modules(node, module, path.name == "__init__.py"):
                    if _unit(target) is not None:
                        rel = path.relative_to(root.parent)
                        edges.append((str(rel), node.lineno, module, target))
    return edges


def layer_violations(root: pathlib.Path, levels: dict[str, float]) -> list[str]:
    problems = []
    for file, line, src, dst in import_edges(root):
        su, du = _unit(src), _unit(dst)
        if su == "":  # the root facade may import any layer
            continue
        if su not in levels:
            problems.append(f"{file}:{line}: module {src} belongs to no layer")
            continue
        if du == "":
            problems.append(f"{file}:{line}: {src} imports the package root (the public facade)")
            continue
        if du == su:
            continue
        if du not in levels:
            problems.append(f"{file}:{line}: {src} imports {dst}, which belongs to no layer")
        elif levels[du] >= levels[su]:
            kind = "the same layer" if levels[du] == levels[su] else "a higher layer"
            problems.append(
                f"{file}:{line}: {src} (layer {levels[su]:g}) imports {dst} "
                f"({kind}: {levels[du]:g})"
            )
    return problems


def import_cycles(root: pathlib.Path) -> list[list[str]]:
    """Cycles in the module import graph (one per strongly connected component), including
    imports inside functions."""
    graph: dict[str, set[str]] = {}
    modules = {_module_name(p, root) for p in root.rglob("*.py")}
    for _, _, src, dst in import_edges(root):
        while dst not in modules and "." in dst:  # `from pkg.mod import name`
            dst = dst.rsplit(".", 1)[0]
        if dst != src and dst in modules:
            graph.setdefault(src, set()).add(dst)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            # A package's __init__ importing its own modules is not a cycle between layers.
            if len(component) > 1 and len({_unit(c) for c in component}) > 1:
                cycles.append(sorted(component))

    for v in sorted(modules):
        if v not in index:
            visit(v)
    return cycles


def test_every_unit_has_a_layer():
    units = {
        p.stem if p.parent == PACKAGE else p.relative_to(PACKAGE).parts[0]
        for p in PACKAGE.rglob("*.py")
    } - {"__init__"}
    assert units == set(LEVELS), f"units without a layer: {units - set(LEVELS)}"


def test_imports_point_down_the_layers():
    problems = layer_violations(PACKAGE, LEVELS)
    assert not problems, "imports that do not point down:\n" + "\n".join(problems)


def test_no_import_cycles_between_layers():
    cycles = import_cycles(PACKAGE)
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_folder_depth_and_file_size():
    """One concept per file: no file much above 500 lines (the Pallas kernels excepted), and at
    most one folder level under the package, but for a tool made of several modules (one
    subpackage of tools/ each, such as tools/gpu_check/)."""
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        depth = 3 if rel.parts[0] == "tools" else 2
        assert len(rel.parts) <= depth, f"{rel}: deeper than one subpackage"
        lines = len(path.read_text().splitlines())
        if rel.as_posix() != "cell/pallas.py":
            assert lines <= 560, f"{rel}: {lines} lines; split it by concept"


@pytest.mark.parametrize(
    "source, expected",
    [
        ("from ..training.loop import train\n", "imports xlstm_eqx.training.loop (a higher layer"),
        ("from ..llama.model import FFNBlock\n", "(the same layer: 2)"),
        ("def f():\n    from ..tools import bench\n", "imports xlstm_eqx.tools (a higher layer"),
        ("import xlstm_eqx\n", "imports the package root"),
        ("from .. import count_params\n", "imports xlstm_eqx.count_params, which belongs to no"),
    ],
)
def test_the_checker_finds_upward_imports(tmp_path, source, expected):
    """The checker itself, on a small tree with one bad import each (also inside a function)."""
    root = tmp_path / "xlstm_eqx"
    (root / "xlstm").mkdir(parents=True)
    (root / "training").mkdir()
    (root / "__init__.py").write_text("from .xlstm import model\n")
    (root / "xlstm" / "__init__.py").write_text("")
    (root / "xlstm" / "model.py").write_text(source)
    (root / "training" / "loop.py").write_text("from ..xlstm.model import x\n")
    problems = layer_violations(root, LEVELS)
    assert len(problems) == 1 and "xlstm/model.py:" in problems[0], problems
    assert expected in problems[0], problems


def test_the_cycle_finder_sees_imports_inside_functions(tmp_path):
    root = tmp_path / "xlstm_eqx"
    root.mkdir()
    (root / "__init__.py").write_text("")
    (root / "_a.py").write_text("from ._b import f\n")
    (root / "_b.py").write_text("def f():\n    from ._a import g\n")
    assert import_cycles(root) == [["xlstm_eqx._a", "xlstm_eqx._b"]]
