"""Batches for the train loop: each process reads only its own rows, on a background thread.

The global batch of step s is `(A, B, S+1)`: micro-batches `(s-1)*A … s*A-1` of the
`BatchSampler`, each a pure function of (corpus, seed, index). With a batch sharding (a mesh), a
process reads only the rows its devices hold (`process_rows`) and the global array is assembled
with `jax.make_array_from_process_local_data`; without one, the whole batch goes to the default
device. A daemon thread keeps up to `prefetch` placed batches ahead of the loop, so the host work
(reading the memory-mapped store, copying to devices) overlaps the device's steps.
"""

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import numpy as np

from .batch import TokenBatch, map_batch
from .corpus import BatchSampler, Corpus, load_corpus
from .tokenizer import Tokenizer


def process_rows(
    sharding: jax.sharding.Sharding, global_shape: tuple[int, ...], axis: int = 1
) -> list[tuple[int, int]]:
    """The distinct `[start, stop)` ranges along `axis` that this process's devices hold, sorted:
    the process-local data `jax.make_array_from_process_local_data` expects, in order."""
    ranges = set()
    for index in sharding.addressable_devices_indices_map(global_shape).values():
        if index is None:  # no index: the device holds the whole array
            index = (slice(None),) * len(global_shape)
        start, stop, _ = index[axis].indices(global_shape[axis])
        ranges.add((start, stop))
    blocks = sorted(ranges)
    if any(b[0] < a[1] for a, b in zip(blocks, blocks[1:], strict=False)):
        raise ValueError(f"batch sharding {sharding}: overlapping row blocks {blocks}")
    out: list[tuple[int, int]] = []
    for start, stop in blocks:  # adjacent blocks read as one
        if out and out[-1][1] == start:
            out[-1] = (out[-1][0], stop)
        else:
            out.append((start, stop))
    return out


def load_corpus_all_processes(
    sources: Sequence[str], tokenizer: Tokenizer, **kwargs: Any
) -> Corpus:
    """`load_corpus` in every process of a run: process 0 builds the store (if the cache has none)
    while the others wait, then each opens it (building its own if its cache directory is not
    shared with process 0)."""
    if jax.process_count() == 1:
        return load_corpus(sources, tokenizer, **kwargs)
    from jax.experimental import multihost_utils

    corpus = None
    if jax.process_index() == 0:
        corpus = load_corpus(sources, tokenizer, **kwargs)
    multihost_utils.sync_global_devices("xlstm_eqx token store")
    if corpus is None:
        corpus = load_corpus(sources, tokenizer, **kwargs)
    return corpus


class BatchLoader:
    """`(step, batch)` for steps `start_step+1 … end_step`, the batch placed on the devices.

    `sharding` is the batch's sharding over `(A, B, S+1)` (e.g. the train step's
    `batch_sharding`); None places the whole batch on the default device. Use as an iterator and
    `close()` it (or use it as a context manager); an error on the thread is raised by `next`.
    """

    def __init__(
        self,
        sampler: BatchSampler,
        *,
        grad_accum: int,
        start_step: int,
        end_step: int,
        sharding: jax.sharding.Sharding | None = None,
        prefetch: int = 2,
        layout: Callable[[int], tuple[int, int]] | None = None,
    ):
        if prefetch < 1:
            raise ValueError(f"prefetch must be >= 1, got {prefetch}")
        self.sampler = sampler
        self.grad_accum = grad_accum
        self.sharding = sharding
        # step -> (rows per micro-batch, its first window in the sampler's stream of windows):
        # a batch-size ramp (training/batch_ramp.py); by default every step has batch_size rows.
        self.layout = layout or self._fixed_layout
        self._ranges: dict[int, list[tuple[int, int]]] = {}
        self.global_shape = (grad_accum, sampler.batch_size, sampler.seq_len + 1)
        if sharding is None:
            self.row_ranges = [(0, sampler.batch_size)]
        else:
            try:
                sharding.shard_shape(self.global_shape)
            except ValueError as e:
                raise ValueError(
                    f"batch_size {sampler.batch_size} does not split evenly over the batch "
                    f"sharding {sharding} ({e})"
                ) from None
            self.row_ranges = process_rows(sharding, self.global_shape)
        self._steps = iter(range(start_step + 1, end_step + 1))
        self._queue: queue.Queue = queue.Queue(maxsize=prefetch)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="xlstm_eqx-batches", daemon=True)
        self._thread.start()

    def host_batch(self, step: int) -> "np.ndarray | TokenBatch":
        """This process's rows of step `step`'s batch: `(A, rows, S+1)` int32, or a `TokenBatch`
        of such arrays (tokens, loss mask, document borders) for packed fine-tuning data."""
        rows, first = self.layout(step)
        micro = [
            [part for lo, hi in self.rows_of(rows) for part in self._read(first + a * rows, lo, hi)]
            for a in range(self.grad_accum)
        ]
        if isinstance(micro[0][0], TokenBatch):
            return TokenBatch(
                *(
                    np.stack([np.concatenate([part[f] for part in parts]) for parts in micro])
                    for f in range(len(TokenBatch._fields))
                )
            )
        return np.stack([np.concatenate(parts) for parts in micro])

    def _fixed_layout(self, step: int) -> tuple[int, int]:
        rows = self.sampler.batch_size
        return rows, (step - 1) * self.grad_accum * rows

    def rows_of(self, rows: int) -> list[tuple[int, int]]:
        """This process's row ranges of a micro-batch of `rows` rows."""
        if rows not in self._ranges:
            shape = (self.grad_accum, rows, self.sampler.seq_len + 1)
            sharding = self.sharding
            self._ranges[rows] = [(0, rows)] if sharding is None else process_rows(sharding, shape)
        return self._ranges[rows]

    def _read(self, first: int, lo: int, hi: int) -> list[Any]:
        """Windows `first+lo … first+hi-1` of the sampler's stream (window `j` is row
        `j % batch_size` of its batch `j // batch_size`), in as few reads as the batches allow."""
        size, parts, j = self.sampler.batch_size, [], first + lo
        while j < first + hi:
            index, row = divmod(j, size)
            stop = min(size, row + first + hi - j)
            parts.append(self.sampler.batch_rows(index, row, stop))
            j += stop - row
        return parts

    def _place(self, host: "np.ndarray | TokenBatch", rows: int) -> Any:
        """Every field placed like the tokens (one sharding for all of them)."""
        if self.sharding is None:
            return jax.device_put(host)
        sharding = self.sharding
        shape = (self.grad_accum, rows, self.sampler.seq_len + 1)
        return map_batch(lambda x: jax.make_array_from_process_local_data(sharding, x, shape), host)

    def _run(self) -> None:
        try:
            for step in self._steps:
                item = (step, self._place(self.host_batch(step), self.layout(step)[0]))
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
            self._queue.put(None)
        except BaseException as e:  # handed to the consumer
            self._queue.put(e)

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        return self

    def __next__(self) -> tuple[int, Any]:
        item = self._queue.get()
        if item is None:
            self._queue.put(None)
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.1)
            except queue.Empty:
                pass
        self._thread.join()

    def __enter__(self) -> "BatchLoader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
