"""Structure metrics of the package, for the before/after of a restructure.

Prints the longest functions of `xlstm_eqx/`, the imports of `_private` names across modules
(package, tests, benchmarks, scripts and notebooks), free functions with many parameters in
`xlstm/`, functions over 60 lines in `training/` and annotations `config: Any`.

    python scripts/code_metrics.py [--top 10]

The functions below are public: `tests/test_structure.py` asserts the same limits with them.
"""

import argparse
import ast
import json
from collections.abc import Iterator
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "xlstm_eqx"
# the folders whose sources may not import a `_private` name from another module of the package
SOURCE_FOLDERS = ("xlstm_eqx", "tests", "benchmarks", "scripts")
LONG_FUNCTION_LINES = 60  # limit for a function in training/
MAX_PARAMETERS = 8  # limit for a free function in xlstm/

FunctionNode = ast.FunctionDef | ast.AsyncFunctionDef


def functions(tree: ast.AST) -> Iterator[tuple[str, FunctionNode]]:
    """(qualified name, node) for every function, methods as `Class.method`."""

    def walk(node: ast.AST, prefix: str) -> Iterator[tuple[str, FunctionNode]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                name = f"{prefix}{child.name}"
                yield name, child
                yield from walk(child, f"{name}.")
            elif isinstance(child, ast.ClassDef):
                yield from walk(child, f"{prefix}{child.name}.")

    yield from walk(tree, "")


def function_length(node: FunctionNode) -> int:
    """Lines from the first decorator to the end of the body."""
    start = min([node.lineno] + [d.lineno for d in node.decorator_list])
    return (node.end_lineno or node.lineno) - start + 1


def parameter_count(node: FunctionNode) -> int:
    """Parameters other than `self`/`cls`, `*args` and `**kwargs` counted as one each."""
    a = node.args
    params = [p for p in [*a.posonlyargs, *a.args, *a.kwonlyargs] if p.arg not in ("self", "cls")]
    return len(params) + sum(x is not None for x in (a.vararg, a.kwarg))


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _resolve(module: str | None, level: int, importer: str, is_package: bool) -> str:
    if level == 0:
        return module or ""
    base = importer.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_imports(path: Path, source: str) -> list[tuple[str, str]]:
    """(module, name) of each `_name` imported from another module of the package: `from
    xlstm_eqx.m import _name` (or from a `_private` module), `import xlstm_eqx.m._name` and the
    attribute `xlstm_eqx.m._name`. Uses of the file's own module are not counted."""
    tree = ast.parse(source)
    importer = module_name(path) if path.is_relative_to(ROOT) else path.stem
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            target = _resolve(node.module, node.level, importer, path.name == "__init__.py")
            if not target.startswith((PACKAGE, "tests")):  # the package, or the tests' own helpers
                continue
            for alias in node.names:
                if _is_private(alias.name) or _is_private(target.split(".")[-1]):
                    found.append((target, alias.name))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith((PACKAGE, "tests")) and any(
                    _is_private(part) for part in alias.name.split(".")
                ):
                    found.append((alias.name, "*"))
        elif isinstance(node, ast.Attribute) and _is_private(node.attr):
            chain = node.value
            dotted = []
            while isinstance(chain, ast.Attribute):
                dotted.append(chain.attr)
                chain = chain.value
            if isinstance(chain, ast.Name) and chain.id == PACKAGE:
                found.append((".".join([PACKAGE, *reversed(dotted)]), node.attr))
    own = module_name(path) if path.suffix == ".py" and path.is_relative_to(ROOT) else None
    return [(m, n) for m, n in found if m != own]


def sources() -> Iterator[tuple[Path, str]]:
    """Every Python source of SOURCE_FOLDERS and the code cells of `notebooks/*.ipynb` (without
    the `%`/`!` lines, which are not Python)."""
    for folder in SOURCE_FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            yield path, path.read_text()
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        cells = json.loads(path.read_text())["cells"]
        code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
        lines = [ln for ln in code.splitlines() if not ln.lstrip().startswith(("%", "!"))]
        yield path, "\n".join(lines)


def cross_module_private_imports() -> list[tuple[str, str, str]]:
    """(file, module, name) of every import of a `_private` name from another module."""
    return [
        (path.relative_to(ROOT).as_posix(), module, name)
        for path, source in sources()
        for module, name in private_imports(path, source)
    ]


def package_functions() -> Iterator[tuple[str, str, FunctionNode]]:
    """(file, qualified name, node) for every function of the package."""
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        for name, node in functions(ast.parse(path.read_text())):
            yield rel, name, node


def long_training_functions() -> list[tuple[int, str]]:
    """(lines, `file:function`) of each function in training/ over LONG_FUNCTION_LINES."""
    return [
        (function_length(node), f"{rel}:{name}")
        for rel, name, node in package_functions()
        if rel.startswith(f"{PACKAGE}/training/") and function_length(node) > LONG_FUNCTION_LINES
    ]


def wide_xlstm_functions() -> list[tuple[int, str]]:
    """(parameters, `file:function`) of each free function in xlstm/ over MAX_PARAMETERS."""
    return [
        (parameter_count(node), f"{rel}:{name}")
        for rel, name, node in package_functions()
        if rel.startswith(f"{PACKAGE}/xlstm/")
        and "." not in name
        and parameter_count(node) > MAX_PARAMETERS
    ]


def config_any() -> list[str]:
    """`file:line` of each `config: Any` in the package."""
    return [
        f"{path.relative_to(ROOT).as_posix()}:{i}"
        for path in sorted((ROOT / PACKAGE).rglob("*.py"))
        for i, line in enumerate(path.read_text().splitlines(), 1)
        for _ in range(line.count("config: Any"))
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--top", type=int, default=10, help="a negative value lists every import")
    args = parser.parse_args()

    lengths = [(function_length(node), f"{rel}:{name}") for rel, name, node in package_functions()]
    print(f"## {args.top} longest functions in {PACKAGE}/ (lines)")
    for n, where in sorted(lengths, reverse=True)[: args.top]:
        print(f"{n:5d}  {where}")
    training_long = long_training_functions()
    print(f"\n## functions over 60 lines in {PACKAGE}/training/: {len(training_long)}")
    for n, where in sorted(training_long, reverse=True):
        print(f"{n:5d}  {where}")
    wide = wide_xlstm_functions()
    print(f"\n## free functions with more than 8 parameters in {PACKAGE}/xlstm/: {len(wide)}")
    for n, where in sorted(wide, reverse=True):
        print(f"{n:5d}  {where}")
    print(f"\n## `config: Any` annotations in {PACKAGE}/: {len(config_any())}")

    imports = cross_module_private_imports()
    if args.top < 0:
        for rel, module, name in imports:
            print(f"  {rel}: {module}.{name}")
    files = sorted({rel for rel, _, _ in imports})
    names = {(module, name) for _, module, name in imports}
    print(
        f"\n## imports of private names across modules: {len(imports)} "
        f"({len(names)} names, {len(files)} files)"
    )
    for rel in files:
        print(f"  {rel}")


if __name__ == "__main__":
    main()
