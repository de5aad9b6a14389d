"""Execute the tutorials in ``notebooks/`` top to bottom and store them with their outputs.

    python scripts/execute_notebooks.py [NAME ...]     # default: every notebook

Each notebook runs in its own Jupyter kernel with ``notebooks/`` as its working directory and this
checkout first on ``PYTHONPATH``; it is written back (atomically) only when every cell ran. The
test suite runs the same notebooks again (``tests/test_notebooks.py``) and checks that the stored
copies are complete executions: every code cell executed once, in order, with no error output.
"""

import argparse
import os
import pathlib
import sys

import nbformat
from nbclient import NotebookClient


ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"


def execute(path: pathlib.Path) -> None:
    nb = nbformat.read(path, as_version=4)
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
    ).execute()
    tmp = path.with_suffix(".ipynb.tmp")
    nbformat.write(nb, tmp)
    os.replace(tmp, path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="notebook names (default: all)")
    args = parser.parse_args()
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    )
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    paths = sorted(NOTEBOOKS.glob("*.ipynb"))
    if args.names:
        paths = [p for p in paths if p.stem in args.names or p.name in args.names]
    for path in paths:
        print(f"executing {path.relative_to(ROOT)}", flush=True)
        execute(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
