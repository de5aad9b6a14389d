"""Safetensors files: reading through the ``safetensors`` package's parser, writing on NumPy.

The format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length N,
N bytes of JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``
padded with spaces, then the raw little-endian tensor bytes; offsets are relative to the end of the
header. Files are untrusted input: the package validates a header (size, JSON, dtypes, shapes,
byte ranges that are in bounds, in order, without overlap or gap, and cover the data exactly)
before anything is read; this module adds what it lets through (repeated names, dtypes NumPy
cannot hold) and turns every failure into a one-line `SafetensorsError`. Reading is lazy: opening
a file reads its header, ``read(name)`` reads one tensor into a fresh array with ``readinto`` (no
memory map), so a loader holds one tensor of a shard at a time on top of whatever it keeps; a
tensor is never larger than the file. Sharded checkpoints come with an index
``model.safetensors.index.json`` (``{"metadata": ..., "weight_map": {name: file}}``).
"""

import json
import math
import os
import struct
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import ml_dtypes
import numpy as np
import safetensors

from ..core.files import write_atomic
from ..core.untrusted import load_json, parse_json, printable


__all__ = [
    "SafetensorsError",
    "SafetensorsFile",
    "TensorInfo",
    "read_index",
    "save_file",
]

_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES: dict[np.dtype, str] = {v: k for k, v in _DTYPES.items()}

if sys.byteorder != "little":  # pragma: no cover - JAX's platforms are little-endian
    raise ImportError("xlstm_eqx.interop reads and writes safetensors on little-endian hosts only")


class SafetensorsError(ValueError):
    """A safetensors file (or index) is malformed or does not hold what was asked for."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies in a file: dtype, shape and absolute byte range."""

    dtype: np.dtype
    shape: tuple[int, ...]
    start: int
    end: int


def _dtype_name(dtype: np.dtype) -> str:
    try:
        return _NAMES[np.dtype(dtype)]
    except KeyError:
        raise SafetensorsError(f"dtype {np.dtype(dtype)} cannot be stored in safetensors") from None


def _read_header(path: str) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Tensor infos in file order and the metadata of a file whose header the package validated."""
    try:
        with safetensors.safe_open(path, framework="numpy") as f:
            specs = {}
            for name in f.keys():
                tensor = f.get_slice(name)
                specs[name] = (tensor.get_dtype(), tuple(tensor.get_shape()))
            metadata = f.metadata() or {}
        with open(path, "rb") as raw:
            (length,) = struct.unpack("<Q", raw.read(8))  # within the package's bounds
            header = raw.read(length)
    except safetensors.SafetensorError as e:
        msg = printable(str(e))
        if "invalid JSON" in msg or "invalid UTF-8" in msg:
            raise SafetensorsError(f"{path!r}: header is not valid JSON ({msg})") from None
        raise SafetensorsError(
            f"{path!r}: not a valid safetensors file, its header or byte ranges are malformed "
            f"({msg})"
        ) from None
    except OSError as e:
        raise SafetensorsError(f"{path!r}: cannot be read ({printable(str(e))})") from None
    # Read again for what the package does not report: repeated names (it keeps the last) and
    # the byte offsets (valid: in bounds, without overlap or gap).
    try:
        entries = parse_json(header)
        offsets = {name: tuple(int(x) for x in entries[name]["data_offsets"]) for name in specs}
    except ValueError as e:
        raise SafetensorsError(f"{path!r}: header: {e}") from None
    except (KeyError, TypeError):
        raise SafetensorsError(f"{path!r}: header changed while it was read") from None
    tensors: dict[str, TensorInfo] = {}
    base = 8 + length
    for name in sorted(specs, key=lambda n: offsets[n]):
        (dtype_name, shape), (begin, end) = specs[name], offsets[name]
        dtype = _DTYPES.get(dtype_name)
        if dtype is None:
            raise SafetensorsError(
                f"{path!r}: tensor {name!r} has dtype {dtype_name}, which is not read here "
                f"(supported: {', '.join(_DTYPES)})"
            )
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise SafetensorsError(f"{path!r}: header changed while it was read")
        tensors[name] = TensorInfo(dtype, shape, base + begin, base + end)
    return tensors, dict(metadata)


class SafetensorsFile:
    """One ``.safetensors`` file opened for lazy reads. Use as a context manager.

    ``keys()`` lists the tensor names in file order, ``info(name)`` gives dtype/shape without
    reading, ``read(name)`` returns a new NumPy array (native byte order). ``metadata`` is the
    ``__metadata__`` dict. Every failure is a `SafetensorsError`.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self.tensors, self.metadata = _read_header(self.path)
        try:
            self._file = open(self.path, "rb")
        except OSError as e:
            raise SafetensorsError(f"{self.path!r}: cannot be read ({printable(str(e))})") from None

    def keys(self) -> list[str]:
        return list(self.tensors)

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise SafetensorsError(f"{self.path!r} has no tensor {name!r}") from None

    def read(self, name: str) -> np.ndarray:
        """The tensor ``name`` as a new array (one read, no memory map)."""
        info = self.info(name)
        out = np.empty(info.shape, info.dtype)
        if out.nbytes:
            try:
                self._file.seek(info.start)
                got = self._file.readinto(out.reshape(-1).view(np.uint8).data)
            except OSError as e:
                raise SafetensorsError(
                    f"{self.path!r}: tensor {name!r} cannot be read ({printable(str(e))})"
                ) from None
            if got != out.nbytes:
                raise SafetensorsError(f"{self.path!r}: short read for tensor {name!r}")
        return out

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def read_index(path: str | os.PathLike) -> dict[str, str]:
    """The ``weight_map`` (tensor name -> shard file name) of a ``*.safetensors.index.json``."""
    path = os.fspath(path)
    index = load_json(path, error=SafetensorsError)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise SafetensorsError(f"{path!r} has no valid 'weight_map' (tensor name -> file name)")
    for name, file in weight_map.items():
        if os.path.basename(file) != file or file in ("", ".", "..") or "\x00" in file:
            raise SafetensorsError(
                f"{path!r}: shard {file!r} of tensor {name!r} must be a file name in the same "
                "directory"
            )
    return weight_map


# A tensor to write: an array, or (shape, dtype, producer) so that large tensors are made (e.g.
# transposed from a model leaf) only while they are written.
Writable = np.ndarray | tuple[tuple[int, ...], Any, Callable[[], np.ndarray]]


def _describe(value: Writable) -> tuple[tuple[int, ...], np.dtype]:
    if isinstance(value, tuple):
        shape, dtype, _ = value
        return tuple(int(s) for s in shape), np.dtype(dtype)
    arr = np.asarray(value)
    return arr.shape, arr.dtype


def save_file(
    tensors: Mapping[str, Writable] | Iterable[tuple[str, Writable]],
    path: str | os.PathLike,
    metadata: Mapping[str, str] | None = None,
) -> int:
    """Write tensors (in the given order) to ``path``; returns the number of data bytes.

    Values are arrays or ``(shape, dtype, producer)`` triples whose producer is called once, when
    its tensor is written, so at most one produced tensor is alive at a time.
    """
    if isinstance(tensors, Mapping):  # (a Mapping is an Iterable too: narrowed by hand)
        items = list(cast("Mapping[str, Writable]", tensors).items())
    else:
        items = list(tensors)
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    described = []
    for name, value in items:
        if name in header or name == "__metadata__":
            raise SafetensorsError(f"tensor name {name!r} is repeated or reserved")
        shape, dtype = _describe(value)
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {
            "dtype": _dtype_name(dtype),
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        described.append((name, value, shape, dtype))
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)

    def write(f: Any) -> None:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, value, shape, dtype in described:
            arr = value[2]() if isinstance(value, tuple) else value
            arr = np.ascontiguousarray(np.asarray(arr))
            if arr.shape != shape or arr.dtype != dtype:
                raise SafetensorsError(
                    f"tensor {name!r}: produced {arr.dtype}{list(arr.shape)}, announced "
                    f"{dtype}{list(shape)}"
                )
            f.write(arr.reshape(-1).view(np.uint8))
            del arr

    # whole or not at all, through a new temporary file (never a link planted at a fixed name)
    write_atomic(os.fspath(path), write)
    return offset
