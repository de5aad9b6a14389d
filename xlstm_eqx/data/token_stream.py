"""`TokenStream`: a token file being written by a store build, with its running statistics."""

import dataclasses
import hashlib
from typing import Any

import numpy as np

from .store_integrity import BlockHashes


@dataclasses.dataclass
class TokenStream:
    """One output token file being written, with its running statistics."""

    file: Any
    dtype: np.dtype
    counts: np.ndarray
    tokens: int = 0
    bytes: int = 0
    documents: int = 0
    hash: Any = dataclasses.field(default_factory=lambda: hashlib.blake2b(digest_size=16))
    blocks: BlockHashes = dataclasses.field(default_factory=lambda: BlockHashes())

    def write(self, parts: list[np.ndarray]) -> None:
        if not parts:
            return
        ids = np.concatenate(parts)
        if ids.size == 0:
            return
        if int(ids.min()) < 0 or int(ids.max()) > np.iinfo(self.dtype).max:
            raise ValueError(f"token id outside the token store's {self.dtype} range")
        data = ids.astype(self.dtype, copy=False).tobytes()
        self.file.write(data)
        self.hash.update(data)
        self.blocks.update(data)
        self.tokens += int(ids.size)
        self.counts = add_counts(self.counts, np.bincount(ids, minlength=len(self.counts)))

    def stats(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "bytes": self.bytes,
            "documents": self.documents,
            "blake2b": self.hash.hexdigest(),
        }


def add_counts(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """`a + b` for count vectors of possibly different lengths (in place into `a` if it can)."""
    if len(a) < len(b):
        a, b = b.astype(np.int64), a
    a[: len(b)] += b
    return a


def chunked_counts(arr: np.ndarray, chunk: int = 1 << 22) -> np.ndarray:
    counts = np.zeros(0, np.int64)
    for i in range(0, len(arr), chunk):
        counts = add_counts(counts, np.bincount(np.asarray(arr[i : i + chunk]).astype(np.int64)))
    return counts
