"""Structure metrics of the package, for the before/after of a restructure.

Prints the longest functions of `xlstm_eqx/`, the imports of `_private` names across modules
(package, tests, benchmarks, scripts and notebooks), free functions with many parameters in
`xlstm/`, functions over 60 lines in `training/` and annotations `config: Any`.

    python scripts/code_metrics.py [--top 10]
"""

import argparse
import ast
import json
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "xlstm_eqx"


def _functions(tree: ast.AST):
    """(qualified name, node) for every function, methods as `Class.method`."""

    def walk(node: ast.AST, prefix: str):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                name = f"{prefix}{child.name}"
                yield name, child
                yield from walk(child, f"{name}.")
            elif isinstance(child, ast.ClassDef):
                yield from walk(child, f"{prefix}{child.name}.")

    yield from walk(tree, "")


def _length(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    start = min([node.lineno] + [d.lineno for d in node.decorator_list])
    return (node.end_lineno or node.lineno) - start + 1


def _module_name(path: Path) -> str:
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


def _private_imports(path: Path, source: str) -> list[tuple[str, str]]:
    """(module, name) of each `_name` imported from another module of the package."""
    tree = ast.parse(source)
    importer = _module_name(path) if path.is_relative_to(ROOT) else path.stem
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            target = _resolve(node.module, node.level, importer, path.name == "__init__.py")
            if not target.startswith(PACKAGE):
                continue
            for alias in node.names:
                name = alias.name
                if name.startswith("_") and not name.startswith("__"):
                    found.append((target, name))
                elif target.split(".")[-1].startswith("_"):
                    found.append((target, name))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith(PACKAGE) and any(
                    p.startswith("_") and not p.startswith("__") for p in alias.name.split(".")
                ):
                    found.append((alias.name, "*"))
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_"):
            if node.attr.startswith("__"):
                continue
            chain = node.value
            dotted = []
            while isinstance(chain, ast.Attribute):
                dotted.append(chain.attr)
                chain = chain.value
            if isinstance(chain, ast.Name) and chain.id == PACKAGE:
                found.append((".".join([PACKAGE, *reversed(dotted)]), node.attr))
    return found


def _sources():
    for folder in ("xlstm_eqx", "tests", "benchmarks", "scripts"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            yield path, path.read_text()
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        cells = json.loads(path.read_text())["cells"]
        code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
        lines = [ln for ln in code.splitlines() if not ln.lstrip().startswith(("%", "!"))]
        yield path, "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top", type=int, default=10)
    args = parser.parse_args()

    lengths, training_long, wide = [], [], []
    config_any = 0
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        source = path.read_text()
        rel = path.relative_to(ROOT).as_posix()
        config_any += source.count("config: Any")
        for name, node in _functions(ast.parse(source)):
            n = _length(node)
            lengths.append((n, f"{rel}:{name}"))
            if rel.startswith(f"{PACKAGE}/training/") and n > 60:
                training_long.append((n, f"{rel}:{name}"))
            a = node.args
            params = [*a.posonlyargs, *a.args, *a.kwonlyargs]
            params = [p for p in params if p.arg not in ("self", "cls")]
            params += [x for x in (a.vararg, a.kwarg) if x is not None]
            if rel.startswith(f"{PACKAGE}/xlstm/") and "." not in name and len(params) > 8:
                wide.append((len(params), f"{rel}:{name}"))

    print(f"## {args.top} longest functions in {PACKAGE}/ (lines)")
    for n, where in sorted(lengths, reverse=True)[: args.top]:
        print(f"{n:5d}  {where}")
    print(f"\n## functions over 60 lines in {PACKAGE}/training/: {len(training_long)}")
    for n, where in sorted(training_long, reverse=True):
        print(f"{n:5d}  {where}")
    print(f"\n## free functions with more than 8 parameters in {PACKAGE}/xlstm/: {len(wide)}")
    for n, where in sorted(wide, reverse=True):
        print(f"{n:5d}  {where}")
    print(f"\n## `config: Any` annotations in {PACKAGE}/: {config_any}")

    imports, names, files = 0, set(), set()
    for path, source in _sources():
        found = _private_imports(path, source)
        rel = path.relative_to(ROOT).as_posix()
        own = _module_name(path) if path.suffix == ".py" else None
        found = [(m, n) for m, n in found if m != own]
        if found:
            files.add(rel)
        imports += len(found)
        names.update(found)
        for module, name in found:
            print(f"  {rel}: {module}.{name}") if args.top < 0 else None
    print(
        f"\n## imports of private names across modules: {imports} "
        f"({len(names)} names, {len(files)} files)"
    )
    for rel in sorted(files):
        print(f"  {rel}")


if __name__ == "__main__":
    main()
