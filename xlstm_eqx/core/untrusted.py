"""Reading files that may be hostile: strict bounded JSON and ``.npz`` archives read one member at a
time with each header checked before anything is allocated.

Every reader here turns what can go wrong into one exception type chosen by the caller (the
checkpoint, interop and safetensors errors), with one-line messages that name the file and the
member; nothing is unpickled.
"""

import json
import math
import os
import warnings
import zipfile
import zlib
from typing import Any

import jax.numpy as jnp
import numpy as np
from jaxtyping import Shaped


# The JSON files read here and in interop are configs, indexes and metadata: kilobytes. The bounds
# only keep a hostile file from costing memory (size) or the interpreter's stack (depth).
MAX_JSON_BYTES = 64 * 1024 * 1024
MAX_JSON_DEPTH = 100


def printable(text: str) -> str:
    """``text`` with line breaks and other unprintable characters escaped, so that a message built
    from names found in an untrusted file stays one line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _no_constant(token: str) -> Any:
    raise ValueError(f"non-finite number {token}")


def _finite_float(token: str) -> float:
    value = float(token)
    if not math.isfinite(value):
        raise ValueError(f"number {token[:40]} is out of range")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {printable(key)!r} is repeated")
        out[key] = value
    return out


def _json_depth(value: Any) -> int:
    depth, stack = 0, [(value, 1)]
    while stack:  # iterative: safe at any depth
        node, d = stack.pop()
        if isinstance(node, dict | list):
            depth = max(depth, d)
            stack.extend((v, d + 1) for v in (node.values() if isinstance(node, dict) else node))
    return depth


def parse_json(raw: bytes) -> Any:
    """Strict JSON: UTF-8, no NaN/Infinity or numbers beyond float range, no repeated keys, at
    most `MAX_JSON_DEPTH` levels (what ``json.loads`` lets through would otherwise surface later
    as inf weights or eps, or as `RecursionError`s). Raises a one-line `ValueError`."""
    try:
        value = json.loads(
            raw.decode("utf-8"),
            parse_constant=_no_constant,
            parse_float=_finite_float,
            object_pairs_hook=_unique_keys,
        )
    except RecursionError:
        raise ValueError(f"nested more than {MAX_JSON_DEPTH} levels deep") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, integer digit limit, ours
        raise ValueError(printable(str(e))) from None
    if _json_depth(value) > MAX_JSON_DEPTH:
        raise ValueError(f"nested more than {MAX_JSON_DEPTH} levels deep")
    return value


def load_json(
    path: str, *, error: type[Exception] = ValueError, max_bytes: int = MAX_JSON_BYTES
) -> Any:
    """`parse_json` of a file of at most ``max_bytes``; every failure is an ``error`` naming
    the file."""
    try:
        with open(path, "rb") as f:
            raw = f.read(max_bytes + 1)
    except OSError as e:
        raise error(f"{path!r} cannot be read ({printable(str(e))})") from None
    if len(raw) > max_bytes:
        raise error(f"{path!r} is larger than {max_bytes} bytes, too large for a JSON file here")
    try:
        return parse_json(raw)
    except ValueError as e:
        raise error(f"{path!r} is not valid JSON: {e}") from None


# What reading a malformed zip archive or .npy header can raise (zipfile and numpy.lib.format).
_ZIP_ERRORS = (
    OSError,
    EOFError,
    ValueError,
    KeyError,
    NotImplementedError,
    RuntimeError,
    Warning,
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    zlib.error,
)
_DEFLATE_MAX_RATIO = 1032  # the most a deflate stream can expand


def numeric_dtype(dtype: Any) -> bool:
    """Plain numbers (no objects, records or strings), including ml_dtypes' bfloat16 & co."""
    dtype = np.dtype(dtype)
    return dtype.kind in "biufc" or (dtype.kind == "V" and jnp.issubdtype(dtype, jnp.number))


class NpzReader:
    """An ``.npz`` archive read one member at a time, each member's ``.npy`` header checked
    before its data is allocated: a numeric dtype and, when given, the expected dtype and shape;
    and exactly the bytes the member holds (so the allocation is never larger than the archive,
    or than what its deflate stream can expand to). No pickle. Every failure is an ``error``
    naming ``what`` and the member. Use as a context manager."""

    def __init__(self, path: str, *, error: type[Exception], what: str):
        self.error, self.what = error, what
        try:
            size = os.path.getsize(path)
            self._zip = zipfile.ZipFile(path)
            infos = self._zip.infolist()
        except _ZIP_ERRORS as e:
            raise error(f"{what}: not a readable .npz archive ({printable(str(e))})") from None
        self.members: dict[str, zipfile.ZipInfo] = {}
        for info in infos:
            if info.filename in self.members:
                self._zip.close()
                raise error(f"{what}: member {info.filename!r} is stored twice")
            self.members[info.filename] = info
        self._size = size

    def names(self) -> list[str]:
        """Array names in the archive (member names without ``.npy``)."""
        return [n[: -len(".npy")] for n in self.members if n.endswith(".npy")]

    def read(
        self,
        name: str,
        *,
        shape: tuple[int, ...] | None = None,
        dtype: Any = None,
        label: str = "",
    ) -> np.ndarray:
        """Array ``name`` (member ``name.npy``), checked against ``shape``/``dtype`` if given."""
        where = f"{self.what}: member {name + '.npy'!r}{f' ({label})' if label else ''}"
        info = self.members.get(name + ".npy")
        if info is None:
            raise self.error(f"{where} is missing")
        if info.flag_bits & 0x1:
            raise self.error(f"{where} is encrypted")
        if info.compress_type == zipfile.ZIP_STORED:
            limit = info.compress_size
        elif info.compress_type == zipfile.ZIP_DEFLATED:
            limit = info.compress_size * _DEFLATE_MAX_RATIO + 1024
        else:
            raise self.error(f"{where}: compression method {info.compress_type} is not read here")
        if info.header_offset + info.compress_size > self._size or info.file_size > limit:
            raise self.error(f"{where}: the zip directory declares more data than the file holds")
        try:
            with self._zip.open(info) as f, warnings.catch_warnings():
                warnings.simplefilter("error")  # a doubtful header is refused, not warned about
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    got_shape, fortran, got_dtype = np.lib.format.read_array_header_1_0(f)
                elif version == (2, 0):
                    got_shape, fortran, got_dtype = np.lib.format.read_array_header_2_0(f)
                else:
                    raise ValueError(f".npy format version {version} is not read here")
                if got_dtype.hasobject or not numeric_dtype(got_dtype):
                    raise ValueError(f"dtype {got_dtype} is not a plain numeric type")
                got = f"{got_dtype.str}{list(got_shape)}"
                if dtype is not None and got_dtype != np.dtype(dtype):
                    raise ValueError(f"holds {got}, expected dtype {np.dtype(dtype).str}")
                if shape is not None and tuple(got_shape) != tuple(shape):
                    raise ValueError(f"holds {got}, expected shape {list(shape)}")
                nbytes = math.prod(got_shape) * got_dtype.itemsize
                held = info.file_size - f.tell()
                if nbytes != held:
                    raise ValueError(f"header declares {got} ({nbytes} bytes), member holds {held}")
                out = np.empty(tuple(reversed(got_shape)) if fortran else got_shape, got_dtype)
                view, pos = out.reshape(-1).view(np.uint8), 0
                while pos < nbytes:  # in slices: no second copy of a large member
                    chunk = f.read(min(nbytes - pos, 1 << 24))
                    if not chunk:
                        raise ValueError(f"data ends after {pos} of {nbytes} bytes")
                    view[pos : pos + len(chunk)] = np.frombuffer(chunk, np.uint8)
                    pos += len(chunk)
        except _ZIP_ERRORS as e:
            raise self.error(f"{where}: {printable(str(e))}") from None
        out = out.T if fortran else out
        if not out.dtype.isnative:
            out = out.astype(out.dtype.newbyteorder("="))
        return out

    def close(self) -> None:
        self._zip.close()

    def __enter__(self) -> "NpzReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def count_nonfinite(array: Shaped[np.ndarray, "..."]) -> int:
    """NaN/inf entries of a float array (0 for other dtypes), counted in slices so that the check
    costs a small fraction of the array's memory."""
    if not jnp.issubdtype(array.dtype, jnp.inexact):
        return 0
    flat, step = array.reshape(-1), 1 << 22
    return sum(
        int(np.count_nonzero(~np.isfinite(flat[i : i + step]))) for i in range(0, flat.size, step)
    )
