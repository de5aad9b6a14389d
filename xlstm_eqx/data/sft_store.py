"""The token store of a fine-tuning corpus: examples packed into rows, with per-token flags.

Examples (`data/sft.py`) are tokenized in file order and packed greedily, whole, into rows of
`packed_row` (= seq_len + 1) tokens: an example that does not fit the current row starts the next,
the rest of the row is padding (the end-of-document token, or 0; not a target, its own document).
An example longer than a row is cut to it (a warning counts them); one whose targets are all cut
is dropped. Every k-th example (k = round(1/eval_fraction)) is held out, or the last one when
there are fewer than k. Beside `train.bin` / `heldout.bin`, `train.flags` / `heldout.flags` hold
one `uint8` per token (`FLAG_TARGET`, `FLAG_BORDER`); both are block-hashed in the index like the
tokens and written into the same temporary folder renamed into place, so the store's integrity
and atomicity rules (`store.py`) hold for the flags too. Sizes in bytes count the target text
only (the completions' UTF-8 bytes, plus one per end-of-document target), so bits per byte are
those of the completions.
"""

import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from .batch import FLAG_BORDER, FLAG_TARGET
from .sft import load_chat_template, read_examples, tokenize_example
from .sources import Source
from .store import StoreOptions, StoreParts, build_atomically
from .store_integrity import BlockHashes, warn
from .tokenizer import Tokenizer


class _PackedStream:
    """Rows of packed examples written to `<name>.bin` and `<name>.flags`."""

    def __init__(self, folder: str, name: str, row: int, dtype: np.dtype, pad: int, vocab: int):
        self.name, self.row, self.dtype, self.pad = name, row, dtype, pad
        self.tokens_out = open(os.path.join(folder, f"{name}.bin"), "wb")
        self.flags_out = open(os.path.join(folder, f"{name}.flags"), "wb")
        self.token_blocks, self.flag_blocks = BlockHashes(), BlockHashes()
        self.hash = hashlib.blake2b(digest_size=16)
        self.counts = np.zeros(vocab, np.int64)
        self.ids: list[np.ndarray] = []
        self.flags: list[np.ndarray] = []
        self.used = 0
        self.rows = self.documents = self.targets = self.bytes = 0

    def add(self, ids: np.ndarray, targets: np.ndarray, target_bytes: int) -> None:
        if self.used + len(ids) > self.row:
            self._flush_row()
        flags = np.where(targets, FLAG_TARGET, 0).astype(np.uint8)
        flags[0] |= FLAG_BORDER
        self.ids.append(ids)
        self.flags.append(flags)
        self.used += len(ids)
        self.documents += 1
        self.targets += int(targets.sum())
        self.bytes += target_bytes

    def _flush_row(self) -> None:
        if not self.ids:
            return
        rest = self.row - self.used
        if rest:
            self.ids.append(np.full(rest, self.pad, np.int32))
            pad_flags = np.zeros(rest, np.uint8)
            pad_flags[0] = FLAG_BORDER
            self.flags.append(pad_flags)
        ids = np.concatenate(self.ids)
        data = ids.astype(self.dtype).tobytes()
        flag_data = np.concatenate(self.flags).tobytes()
        self.tokens_out.write(data)
        self.flags_out.write(flag_data)
        self.hash.update(data)
        self.hash.update(flag_data)
        self.token_blocks.update(data)
        self.flag_blocks.update(flag_data)
        self.counts += np.bincount(ids, minlength=len(self.counts))[: len(self.counts)]
        self.rows += 1
        self.ids, self.flags, self.used = [], [], 0

    def close(self) -> None:
        self._flush_row()
        for f in (self.tokens_out, self.flags_out):
            f.flush()
            os.fsync(f.fileno())
            f.close()

    def record(self) -> dict[str, Any]:
        return {
            "file": f"{self.name}.bin",
            "offset": 0,
            "tokens": self.rows * self.row,
            "bytes": self.bytes,
            "documents": self.documents,
            "targets": self.targets,
            "blake2b": self.hash.hexdigest(),
        }


def chat_template_sha256(tokenizer: Tokenizer) -> str:
    """What identifies the chat template chats are rendered with ('' without one)."""
    template = load_chat_template(tokenizer)
    if template is None:
        return ""
    ident = json.dumps([template.source, template.special_tokens], sort_keys=True)
    return hashlib.sha256(ident.encode()).hexdigest()


def _pack_examples(
    sources: Sequence[Source],
    tokenizer: Tokenizer,
    options: StoreOptions,
    train: _PackedStream,
    held: _PackedStream,
    eod: int | None,
) -> None:
    """Tokenize and pack every example into the train or held-out stream (the last example is
    held back one step, so with fewer than k examples it can go to the held-out side)."""
    k = max(2, round(1.0 / options.eval_fraction))
    row = train.row
    template = load_chat_template(tokenizer)
    files = [f for s in sources for f in s.files()]
    pending: tuple[np.ndarray, np.ndarray, int] | None = None
    cut = dropped = 0
    for i, example in enumerate(read_examples(files, template, options.max_bytes)):
        ids, targets = tokenize_example(tokenizer, example, eod)
        if len(ids) > row:
            ids, targets = ids[:row], targets[:row]
            cut += 1
        if not targets.any():
            dropped += 1
            continue
        target_bytes = sum(len(t.encode("utf-8")) for t, is_t in example.segments if is_t)
        target_bytes += int(example.add_eod and eod is not None)
        if pending is not None:
            train.add(*pending)
            pending = None
        if i % k == k - 1:
            held.add(ids, targets, target_bytes)
        else:
            pending = (ids, targets, target_bytes)
    if pending is not None:
        (held if held.documents == 0 else train).add(*pending)
    if cut or dropped:
        warn(
            f"fine-tuning data: {cut} example(s) longer than seq_len + 1 = {row} tokens were cut "
            f"to it, {dropped} of them (or empty ones) dropped with no target left"
        )


def build_sft_store(
    sources: Sequence[Source], tokenizer: Tokenizer, directory: str, options: StoreOptions
) -> str:
    """Pack the examples of `sources` (JSONL) into the store `directory` (atomically)."""
    row = options.packed_row
    if row is None or row < 2:
        raise ValueError(f"packed_row must be >= 2, got {row}")

    def write(tmp: str, eod: int | None, vocab: int, dtype: np.dtype) -> StoreParts:
        pad = eod if eod is not None else 0
        train = _PackedStream(tmp, "train", row, dtype, pad, vocab)
        held = _PackedStream(tmp, "heldout", row, dtype, pad, vocab)
        try:
            _pack_examples(sources, tokenizer, options, train, held, eod)
        finally:
            train.close()
            held.close()
        if train.documents == 0 or held.documents == 0:
            names = [s.path for s in sources]
            raise ValueError(
                f"fine-tuning data {names!r} has {train.documents + held.documents} usable "
                "example(s); at least 2 are needed (one is held out)"
            )
        files = {
            "train.bin": train.token_blocks.record(),
            "train.flags": train.flag_blocks.record(),
            "heldout.bin": held.token_blocks.record(),
            "heldout.flags": held.flag_blocks.record(),
        }
        entries = {
            "token_files": files,
            "flags": {"train": "train.flags", "heldout": "heldout.flags"},
            "packed_row": row,
            "num_documents": train.documents + held.documents,
            "split": "examples",
            "train": train.record(),
            "heldout": held.record(),
        }
        return StoreParts(entries, train.counts, held.counts)

    return build_atomically(sources, tokenizer, directory, options, write)
