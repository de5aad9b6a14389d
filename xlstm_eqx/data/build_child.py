"""Builds a token store in a child process, so that the memory the build touches (tokenizer
batches, allocator arenas that are never given back) is freed before the parent goes on to
compile: a first run then peaks at the larger of the two, not at their sum.

The job goes in as JSON on stdin (sources, the tokenizer's `to_dict`, the options) and the result
comes back as one JSON line on stdout; nothing is pickled. Run as `python -m
xlstm_eqx.data.build_child`.
"""

import dataclasses
import json
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from .sources import Source
from .store import StoreOptions, build_store
from .tokenizer import Tokenizer, tokenizer_from_dict


# Errors the child reports by name and the parent raises again (the CLI prints them as one line).
_ERRORS: dict[str, type[Exception]] = {
    e.__name__: e
    for e in (ValueError, FileNotFoundError, IsADirectoryError, PermissionError, ImportError)
}


def build_in_child(
    sources: Sequence[Source], tokenizer: Tokenizer, directory: str, options: StoreOptions
) -> None:
    """`build_store(sources, tokenizer, directory, options)` in a fresh Python process."""
    job = {
        "sources": [[s.path, s.kind] for s in sources],
        "tokenizer": tokenizer.to_dict(),
        "directory": directory,
        "options": dataclasses.asdict(options),
    }
    done = subprocess.run(
        [sys.executable, "-m", "xlstm_eqx.data.build_child"],
        input=json.dumps(job),
        stdout=subprocess.PIPE,
        text=True,
        check=False,
    )
    lines = done.stdout.strip().splitlines()
    result = json.loads(lines[-1]) if lines else {}
    if done.returncode == 0 and result.get("ok"):
        return
    if "error" in result:
        raise _ERRORS.get(result["error"], RuntimeError)(result["message"])
    raise RuntimeError(
        f"building the token store {directory!r} failed in its process (exit status "
        f"{done.returncode})"
    )


def _main() -> int:
    job: dict[str, Any] = json.loads(sys.stdin.read())
    try:
        build_store(
            [Source(path, kind) for path, kind in job["sources"]],
            tokenizer_from_dict(job["tokenizer"]),
            job["directory"],
            StoreOptions(**job["options"]),
        )
    except Exception as e:
        name = next((n for n, t in _ERRORS.items() if type(e) is t), type(e).__name__)
        print(json.dumps({"error": name, "message": str(e)}), flush=True)
        return 1
    print(json.dumps({"ok": True}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
