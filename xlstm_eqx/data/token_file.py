"""`TokenFile`: windows of a token file read with `os.pread`, the store's reader for batches."""

import os
from collections.abc import Sequence
from typing import Any

import numpy as np


class TokenFile:
    """`count` tokens of a token file from token `offset`, read with `os.pread`: slicing returns
    a fresh array of just those tokens. What the batch sampler and the evaluation windows read
    through: nothing is mapped, so reading scattered windows of a huge file adds nothing to the
    process's RSS (a memory map would map, and count, whole page-cache folios around each)."""

    def __init__(self, path: str, dtype: np.dtype, offset: int, count: int):
        self.path = path
        self.dtype = np.dtype(dtype)
        self.offset = offset
        self.count = count

    def __len__(self) -> int:
        return self.count

    @property
    def shape(self) -> tuple[int]:
        return (self.count,)

    def __getitem__(self, item: slice) -> np.ndarray:
        if not isinstance(item, slice):
            raise TypeError(f"TokenFile supports slices only, got {type(item).__name__}")
        start, stop, step = item.indices(self.count)
        if step != 1:
            raise ValueError("TokenFile supports contiguous slices only")
        return self.windows([start], max(0, stop - start))[0]

    def windows(self, starts: Sequence[int], length: int) -> np.ndarray:
        """`(len(starts), length)` tokens: `length` from each start (each within the file)."""
        size = self.dtype.itemsize
        out = np.empty((len(starts), length), self.dtype)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for r, start in enumerate(starts):
                if start < 0 or start + length > self.count:
                    raise IndexError(f"tokens {start}:{start + length} outside 0:{self.count}")
                want = length * size
                data = os.pread(fd, want, (self.offset + start) * size)
                if len(data) != want:
                    raise ValueError(f"token file {self.path!r} is shorter than its index says")
                out[r] = np.frombuffer(data, self.dtype)
        finally:
            os.close(fd)
        return out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        arr = self[:]
        return arr if dtype is None else arr.astype(dtype)

    def __repr__(self) -> str:
        return (
            f"TokenFile({self.path!r}, {self.dtype.name}, offset={self.offset}, count={self.count})"
        )
