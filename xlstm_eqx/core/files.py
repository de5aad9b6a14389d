"""Small file helpers shared by the trainer and the CLI: reading a JSON or YAML
mapping with errors that name the file, writing JSON atomically, syncing a folder, and cutting
text at a UTF-8 byte count.
"""

import json
import os
from typing import Any


def read_mapping_file(path: str, what: str) -> dict[str, Any]:
    """The mapping in a JSON or YAML (`.yaml`/`.yml`) file; errors name `what` and the path."""
    with open(path) as f:
        text = f.read()
    if path.endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError as e:
            raise ImportError(f"reading {path!r} needs PyYAML (pip install pyyaml)") from e
        try:
            d = yaml.safe_load(text)
        except yaml.YAMLError as e:  # syntax, and tags safe_load refuses (!!python/object…)
            mark = getattr(e, "problem_mark", None)
            first = getattr(e, "problem", None) or " ".join(str(e).split())
            if mark is not None:
                first += f" (line {mark.line + 1}, column {mark.column + 1})"
            raise ValueError(f"{what} {path!r} is not valid (safe) YAML: {first}") from None
        except RecursionError:
            raise ValueError(f"{what} {path!r} is nested too deeply") from None
    else:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{what} {path!r} is not valid JSON: {e}") from None
        except RecursionError:
            raise ValueError(f"{what} {path!r} is nested too deeply") from None
    if not isinstance(d, dict):
        raise ValueError(f"{what} {path!r} must hold a mapping, got {type(d).__name__}")
    return d


def _write_json_atomic(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, allow_nan=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def fsync_dir(path: str) -> None:
    """Make a rename or a new file in the folder `path` durable (best effort: a file system that
    cannot sync a folder is left alone)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def clip_utf8(text: str, max_bytes: int) -> str:
    """The longest prefix of `text` whose UTF-8 encoding has at most `max_bytes` bytes."""
    if len(text) <= max_bytes // 4:  # at most 4 bytes per character: short texts fit as they are
        return text
    raw = text.encode("utf-8")
    if len(raw) <= max_bytes:
        return text
    return raw[: max(0, max_bytes)].decode("utf-8", errors="ignore")
