"""Tokenizers for training and sampling: raw UTF-8 bytes by default, or a local `tokenizer.json`.

A tokenizer here is anything with `vocab_size`, `encode(text) -> int32 array`, `decode(ids) -> str`
and `to_dict()` (enough to rebuild it with `tokenizer_from_dict`); optionally `encode_batch(texts)`
(used by the token store) and `eod_id` (the end-of-document token put between documents). The byte
tokenizer needs no files and no download: token id = byte value, vocabulary 256 (already a multiple
of 64), end of document = byte 0 (NUL, which text files do not contain). The `tokenizers` package
(Hugging Face) is imported only when a `tokenizer.json` is asked for; its end-of-document token is
the first of `EOD_TOKEN_NAMES` in its vocabulary, or the one named by `--eod-token`.
"""

import hashlib
import os
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np


EOD_TOKEN_NAMES = (
    "<|endoftext|>",
    "<|end_of_text|>",
    "</s>",
    "<eos>",
    "<|eos|>",
    "[EOS]",
    "<|im_end|>",
    "[SEP]",
)


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline, the trainer and the CLI need from a tokenizer."""

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> np.ndarray: ...

    def decode(self, ids: Any) -> str: ...

    def to_dict(self) -> dict[str, Any]: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens: id = byte value, vocab 256, no special tokens.

    One token is one byte, so a loss in nats per token converts to bits per byte by dividing by
    ln 2. `decode` replaces invalid UTF-8 (a sample cut mid-character) instead of raising.
    """

    vocab_size: int = 256
    eod_id: int = 0

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Any) -> str:
        arr = np.asarray(ids).reshape(-1)
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            bad = int(arr[(arr < 0) | (arr > 255)][0])
            raise ValueError(f"ByteTokenizer.decode: token id {bad} is not a byte (0..255)")
        return arr.astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "bytes"}

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=256)"


class HFTokenizer:
    """A local `tokenizer.json` read with the `tokenizers` package (imported lazily).

    Special tokens added by the tokenizer's post-processor are not inserted by `encode`: the
    training stream is plain text.
    """

    def __init__(self, path: str | os.PathLike, *, sha256: str | None = None):
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer file not found: {path!r}")
        try:
            import tokenizers
        except ImportError as e:
            raise ImportError(
                f"reading {path!r} needs the optional package `tokenizers` "
                "(pip install tokenizers); the default byte tokenizer needs nothing"
            ) from e
        with open(path, "rb") as f:
            raw = f.read()
        # The hash of the bytes parsed (not of the file read again): what `to_dict` records.
        self.sha256 = hashlib.sha256(raw).hexdigest()
        if sha256 is not None and sha256 != self.sha256:
            raise ValueError(
                f"tokenizer file {os.path.abspath(path)!r} is not the one the run was made with "
                f"(sha256 {self.sha256[:12]}…, the run recorded {sha256[:12]}…); restore it"
            )
        try:
            self._tok = tokenizers.Tokenizer.from_str(raw.decode("utf-8"))
        except Exception as e:
            raise ValueError(f"cannot read tokenizer file {path!r}: {e}") from e
        self.path = os.path.abspath(path)

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> np.ndarray:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return np.asarray(ids, dtype=np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Each text on its own (in parallel threads inside `tokenizers`), without offsets."""
        fast = getattr(self._tok, "encode_batch_fast", None) or self._tok.encode_batch
        return [
            np.asarray(e.ids, dtype=np.int32) for e in fast(list(texts), add_special_tokens=False)
        ]

    @property
    def eod_id(self) -> int | None:
        """The first of `EOD_TOKEN_NAMES` this tokenizer has, else None."""
        for name in EOD_TOKEN_NAMES:
            i = self._tok.token_to_id(name)
            if i is not None:
                return int(i)
        return None

    def token_to_id(self, token: str) -> int | None:
        i = self._tok.token_to_id(token)
        return None if i is None else int(i)

    def decode(self, ids: Any) -> str:
        return self._tok.decode([int(i) for i in np.asarray(ids).reshape(-1)])

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "tokenizers", "path": self.path, "sha256": self.sha256}

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size})"


# What names the byte tokenizer where a tokenizer is given as text (`--tokenizer`, convert).
BYTES_SPECS = ("bytes", "byte")


def load_tokenizer(spec: str) -> Tokenizer:
    """`"bytes"` (the default), the path of a local `tokenizer.json`, or its folder (a
    transformers tokenizer directory, whose `tokenizer_config.json` may hold a chat template)."""
    if spec in BYTES_SPECS or spec == "":
        return ByteTokenizer()
    if os.path.isdir(spec):
        return HFTokenizer(os.path.join(spec, "tokenizer.json"))
    return HFTokenizer(spec)


def tokenizer_from_dict(d: dict[str, Any]) -> Tokenizer:
    """Inverse of `to_dict`, used when a run is resumed or evaluated from its saved config: a
    recorded `sha256` (runs made before it was recorded have none) must match the file's bytes,
    so a replaced `tokenizer.json` is an error rather than another tokenization."""
    kind = d.get("kind")
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "tokenizers":
        return HFTokenizer(d["path"], sha256=d.get("sha256"))
    raise ValueError(f"unknown tokenizer kind {kind!r} (expected 'bytes' or 'tokenizers')")


def padded_vocab_size(vocab_size: int, multiple: int = 64) -> int:
    """Round a tokenizer's vocabulary up to a multiple of `multiple` for the model's embedding."""
    return multiple * -(-vocab_size // multiple)


def encode_batch(tokenizer: Tokenizer, texts: Sequence[str]) -> list[np.ndarray]:
    """`tokenizer.encode_batch(texts)` if it has one, else `encode` on each text."""
    batch = getattr(tokenizer, "encode_batch", None)
    if batch is not None:
        return batch(texts)
    return [tokenizer.encode(t) for t in texts]


def resolve_eod_id(tokenizer: Tokenizer, spec: str = "") -> int | None:
    """The end-of-document token id: `spec` "" = the tokenizer's own (`eod_id`), "none" = no token
    between documents, a token string of the tokenizer's vocabulary, or an integer id."""
    if spec.lower() == "none":
        return None
    if spec == "":
        eod = getattr(tokenizer, "eod_id", None)
        if eod is None:
            raise ValueError(
                f"tokenizer {tokenizer!r} has no end-of-document token (none of "
                f"{', '.join(EOD_TOKEN_NAMES)}); pass --eod-token TOKEN, or --eod-token none"
            )
        return int(eod)
    lookup = getattr(tokenizer, "token_to_id", None)
    found = lookup(spec) if lookup is not None else None
    if found is None:
        try:
            found = int(spec)
        except ValueError:
            raise ValueError(
                f"--eod-token {spec!r} is not a token of {tokenizer!r} nor a token id"
            ) from None
    if not 0 <= found < tokenizer.vocab_size:
        raise ValueError(
            f"--eod-token {spec!r}: id {found} is outside the vocabulary [0, {tokenizer.vocab_size})"
        )
    return int(found)
