"""The files a run keeps beside its checkpoints: `metrics.jsonl` (read, truncated to a resumed
step), the loss plot, the tokenizer of an ``--init-from`` source (`keep_source_tokenizer`), and
the Ctrl-C/SIGTERM flag that turns an interrupt into a checkpoint."""

import dataclasses
import json
import os
import signal
import threading
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from ..core.files import copy_file_atomic, open_read_binary, write_atomic, write_json_atomic
from ..data.tokenizer import HFTokenizer
from .prepare import PreparedRun


def keep_source_tokenizer(prepared: PreparedRun, *, write: bool) -> PreparedRun:
    """A run started ``--init-from`` a source with a ``tokenizer.json`` keeps a copy as
    ``DIR/tokenizer.json`` and records that (same hash), so that ``--resume``, ``eval`` and
    ``generate`` never need the source again. ``write``: this process writes the copy (process
    0); the others keep the source's."""
    tok = prepared.tokenizer
    if prepared.init is None or not write or not isinstance(tok, HFTokenizer):
        return prepared
    own = os.path.join(prepared.cfg.out_dir(), "tokenizer.json")
    if os.path.abspath(tok.path) != os.path.abspath(own):
        copy_file_atomic(tok.path, own)
    return dataclasses.replace(prepared, tokenizer=HFTokenizer(own, sha256=tok.sha256))


def read_metrics(path: str) -> list[dict[str, Any]]:
    """Rows of a `metrics.jsonl`. A torn last line (a write cut short by a full disk or a kill:
    no newline at its end) is dropped; any other malformed line is a ValueError naming the file
    and line. A symbolic link is refused, never followed."""
    if not os.path.exists(path):
        return []
    with open_read_binary(path) as f:
        lines = f.read().split(b"\n")
    rows: list[dict[str, Any]] = []
    # Only a last line without its newline can be torn: a complete line ends with one.
    last = len(lines) - 1
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
        except (ValueError, RecursionError) as e:
            if i == last:
                break  # torn tail
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ValueError(f"{path}: line {i + 1} is not a metrics row ({msg})") from None
        rows.append(row)
    return rows


def truncate_metrics(path: str, last_step: int) -> None:
    """On resume, drop rows of steps after the checkpoint: they are recomputed identically. A
    run killed mid-write may have left a torn last line: it is one of those rows. A malformed
    line elsewhere is a ValueError naming the file and line (`read_metrics`)."""
    rows = [r for r in read_metrics(path) if _step_of(r) <= last_step]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    write_atomic(path, lambda f: f.write(text.encode("utf-8")))


def _step_of(row: dict[str, Any]) -> int:
    step = row.get("step", 0)
    return step if isinstance(step, int) and not isinstance(step, bool) else 0


def plot_metrics(metrics_path: str, png_path: str) -> str | None:
    """Loss curves (train, held-out) from `metrics.jsonl` as a PNG; None if matplotlib is absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    held = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", lw=1)
    if held:
        ax.plot(*zip(*held, strict=True), "o-", label="held-out loss", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        write_atomic(png_path, lambda f: fig.savefig(f, format="png"))
    finally:
        plt.close(fig)
    return png_path


def write_partial_run_files(
    out: str, metrics_path: str, step: int, steps: int, checkpoint: str | None
) -> None:
    """`loss.png` and `summary.json` of an interrupted run (up to `step`)."""
    plot_metrics(metrics_path, os.path.join(out, "loss.png"))
    rows = [r for r in read_metrics(metrics_path) if "eval_loss" in r]
    last = rows[-1] if rows else {}
    summary = {
        "step": step,
        "steps": steps,
        "interrupted": True,
        "eval_loss": last.get("eval_loss"),
        "bits_per_byte": last.get("bits_per_byte"),
        "unigram_bits_per_byte": last.get("unigram_bits_per_byte"),
        "checkpoint": checkpoint,
    }
    write_json_atomic(os.path.join(out, "summary.json"), summary)


class InterruptFlag:
    """While training, the first Ctrl-C (or SIGTERM) only sets a flag: the current step ends, a
    checkpoint is written (by every process, at the step they agree on: `agreed`), then
    KeyboardInterrupt. A second Ctrl-C aborts at once."""

    def __init__(self, log: Callable[[str], None]):
        self.set = False
        self._log = log
        self._old: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.set:
            raise KeyboardInterrupt
        self.set = True
        self._log("\nstopping after this step and saving a checkpoint (Ctrl-C again to abort)")

    def agreed(self) -> bool:
        """Whether any process was interrupted: every process calls this once per step, so all
        of them see the same answer at the same step (one tiny all-gather over the processes;
        nothing when there is only one) and save the same checkpoint before stopping."""
        if jax.process_count() == 1:
            return self.set
        flags = multihost_utils.process_allgather(np.asarray([self.set], np.int32))
        return bool(np.any(flags))

    def restore(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old = {}
