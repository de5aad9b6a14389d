"""What the run loop does around its steps, one hook per concern.

`training/loop.py` runs the steps as a stream of `StepRecord`s and hands each record to its hooks
in order: the compile notice, the profiler, evaluation, the metrics row, the trackers, the
progress bar, checkpoints, the WSD decay save and the interrupt. Each hook decides from its
`Cadence` (every n steps, at given steps) whether the step concerns it; ``before_step`` runs before
a step is dispatched, ``close`` when the run ends (normally or not). A hook that needs host values
reads them through the record (`StepRecord.host_values`): the pending steps' losses are then read
in one transfer and checked for NaN/inf, never before a step that needs them.
"""

import dataclasses
import json
import math
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol, runtime_checkable

from jaxtyping import Array, PyTree

from ..core.console import print_line, silence_stdout
from .host_sync import PendingScalars, ProfileWindow
from .orbax_checkpoint import CheckpointStore
from .run_files import InterruptFlag
from .trackers import Trackers


class TrainingDivergedError(FloatingPointError):
    """The loss became NaN or infinite; the run stopped before writing anything after it."""

    def __init__(self, message: str, step: int, last_checkpoint: str | None):
        super().__init__(message)
        self.step = step
        self.last_checkpoint = last_checkpoint


@dataclasses.dataclass
class LastCheckpoint:
    """The newest checkpoint this run has (``path`` None: none yet) and its step."""

    path: str | None
    step: int


class HostScalars:
    """The steps' losses and gradient norms: kept on the device (`PendingScalars`) until a hook
    reads them; every read step is checked for NaN/inf and its loss kept in ``losses``."""

    def __init__(self, last_checkpoint: LastCheckpoint):
        self.losses: dict[int, float] = {}
        self._pending = PendingScalars()
        self._last = last_checkpoint
        self._newest: tuple[float, float] = (math.nan, math.nan)

    def add(self, step: int, loss: Array, grad_norm: Array) -> None:
        self._pending.add(step, loss, grad_norm)

    def read(self) -> tuple[float, float]:
        """``(loss, grad_norm)`` of the newest step, the pending ones read in one transfer;
        a non-finite one raises `TrainingDivergedError` naming the last good checkpoint."""
        for step, (loss, grad_norm) in self._pending.read():
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                raise self._diverged(step, loss, grad_norm)
            self.losses[step] = loss
            self._newest = (loss, grad_norm)
        return self._newest

    def _diverged(self, step: int, loss: float, grad_norm: float) -> TrainingDivergedError:
        what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {grad_norm}"
        last = self._last
        where = (
            f"last good checkpoint: {last.path} (step {last.step})"
            if last.path
            else "no checkpoint was written"
        )
        return TrainingDivergedError(
            f"training stopped at step {step}: {what} is not finite; nothing was saved "
            f"after step {last.step}; {where}. Try a lower --lr or --grad-clip.",
            step,
            last.path,
        )


@dataclasses.dataclass(frozen=True)
class StepRecord:
    """One finished (dispatched) step: its number, the model and optimizer state after it, its
    loss and gradient norm still on the device, the tokens trained on so far and the seconds the
    step call took (the first one compiles)."""

    step: int
    model: PyTree
    opt_state: PyTree
    loss: Array
    grad_norm: Array
    tokens: int
    seconds: float
    scalars: HostScalars

    def host_values(self) -> tuple[float, float]:
        """``(loss, grad_norm)`` of this step on the host (see `HostScalars.read`)."""
        return self.scalars.read()


@dataclasses.dataclass(frozen=True)
class Cadence:
    """When a hook acts: every ``every`` steps (0: never) and at the ``at`` steps."""

    every: int = 0
    at: frozenset[int] = frozenset()

    @classmethod
    def of(cls, every: int = 0, at: Iterable[int] = ()) -> "Cadence":
        return cls(every, frozenset(at))

    def due(self, step: int) -> bool:
        return (self.every > 0 and step % self.every == 0) or step in self.at


@runtime_checkable
class TextSink(Protocol):
    """Where metrics rows go (a text file)."""

    def write(self, text: str, /) -> int: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


@runtime_checkable
class Hook(Protocol):
    def before_step(self, step: int) -> None: ...
    def __call__(self, record: StepRecord) -> None: ...
    def close(self) -> None: ...


class BaseHook:
    """A hook that does nothing; each concern overrides what it needs."""

    def before_step(self, step: int) -> None:
        del step

    def __call__(self, record: StepRecord) -> None:
        del record

    def close(self) -> None:
        pass


class Console:
    """The run's log: lines go above the progress bar when there is one (and the log prints)."""

    def __init__(self, log: Callable[[str], None], bar: Any = None):
        self.log = log
        self.bar = bar

    def say(self, line: str) -> None:
        if self.bar is not None and self.log is print_line:
            try:
                self.bar.write(line)
            except BrokenPipeError:
                silence_stdout()
        else:
            self.log(line)


class CompileNotice(BaseHook):
    """A line before the first step (its call traces and compiles) and its time after it."""

    def __init__(self, first_step: int, console: Console):
        self.first_step = first_step
        self.console = console

    def before_step(self, step: int) -> None:
        if step == self.first_step:
            self.console.say("compiling the train step…")

    def __call__(self, record: StepRecord) -> None:
        if record.step == self.first_step:
            self.console.say(f"compiled in {record.seconds:.1f} s")


class ProfileHook(BaseHook):
    """``--profile-steps A:B``: a trace of steps A…B (`ProfileWindow`), and a line once written."""

    def __init__(self, window: ProfileWindow, spec: str, console: Console):
        self.window = window
        self.spec = spec
        self.console = console

    def before_step(self, step: int) -> None:
        self.window.before(step)

    def __call__(self, record: StepRecord) -> None:
        tracing = self.window.active
        self.window.after(record.step, record.loss)
        if tracing and not self.window.active:
            self.console.say(
                f"wrote the profile trace of steps {self.spec} to {self.window.directory}"
            )

    def close(self) -> None:
        self.window.stop()


@dataclasses.dataclass(frozen=True)
class HeldOut:
    """An evaluation: its step, the held-out loss (nats/token), bits per byte, and the seconds
    it took (which the throughput of its step leaves out)."""

    step: int
    loss: float
    bits_per_byte: float
    seconds: float


class EvalHook(BaseHook):
    """The held-out loss and bits per byte at its cadence; ``latest`` is the newest."""

    def __init__(self, cadence: Cadence, evaluate: Callable[[PyTree], tuple[float, float]]):
        self.cadence = cadence
        self.evaluate = evaluate  # model -> (loss, bits per byte)
        self.latest: HeldOut | None = None

    def __call__(self, record: StepRecord) -> None:
        if self.cadence.due(record.step):
            record.host_values()  # a non-finite step stops the run before its evaluation
            start = time.perf_counter()
            loss, bpb = self.evaluate(record.model)
            self.latest = HeldOut(record.step, loss, bpb, time.perf_counter() - start)

    def at(self, step: int) -> HeldOut | None:
        latest = self.latest
        return latest if latest is not None and latest.step == step else None


class MetricsHook(BaseHook):
    """A `metrics.jsonl` row at every logged or evaluated step (with the evaluation's fields and a
    line of the log at an evaluated one); ``row`` is the newest, ``tokens_per_s`` its rate."""

    def __init__(
        self,
        cadence: Cadence,
        evals: EvalHook,
        file: TextSink,
        console: Console,
        schedule: Callable[[int], tuple[float, float]],
        unigram_bpb: float,
        tokens_through: Callable[[int], int] | None = None,
    ):
        self.cadence = cadence
        self.evals = evals
        self.file = file
        self.console = console
        self.schedule = schedule  # step -> (its learning rate, the epoch at its end)
        self.unigram_bpb = unigram_bpb
        self.tokens_through = tokens_through  # step -> tokens so far (default: equal steps)
        self.row: dict[str, Any] | None = None
        self._start, self._steps = time.perf_counter(), 0

    def __call__(self, record: StepRecord) -> None:
        self._steps += 1
        held_out = self.evals.at(record.step)
        if not (self.cadence.due(record.step) or held_out is not None):
            return
        loss, grad_norm = record.host_values()
        # The rate of the steps since the last row, the evaluation's own time left out.
        seconds = time.perf_counter() - self._start - (held_out.seconds if held_out else 0.0)
        since = record.step - self._steps  # the step before the first one of this row's
        before = (
            self.tokens_through(since)
            if self.tokens_through is not None
            else since * (record.tokens // record.step)
        )
        tokens_per_s = (record.tokens - before) / max(seconds, 1e-9)
        lr, epoch = self.schedule(record.step)
        row = {
            "step": record.step,
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": record.tokens,
            "epoch": epoch,
            "tokens_per_s": round(tokens_per_s, 1),
        }
        if held_out is not None:
            row["eval_loss"] = held_out.loss
            row["bits_per_byte"] = held_out.bits_per_byte
            row["unigram_bits_per_byte"] = self.unigram_bpb
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        self.row = row
        if held_out is not None:  # every evaluation gets a line, beside the unigram baseline
            self.console.say(
                f"step {record.step}: loss {loss:.4f}, held-out {held_out.loss:.4f} nats/token, "
                f"{held_out.bits_per_byte:.3f} bits/byte (unigram baseline {self.unigram_bpb:.3f})"
            )
        self._start, self._steps = time.perf_counter(), 0

    def at(self, step: int) -> dict[str, Any] | None:
        row = self.row
        return row if row is not None and row["step"] == step else None

    def leave_out(self, seconds: float) -> None:
        """Time spent outside the steps (an lm-eval evaluation) that the next rate leaves out."""
        self._start += seconds

    def close(self) -> None:
        self.file.close()


class TrackerHook(BaseHook):
    """Every metrics row forwarded to the experiment trackers (TensorBoard, W&B, …)."""

    def __init__(self, trackers: Trackers, metrics: MetricsHook):
        self.trackers = trackers
        self.metrics = metrics

    def __call__(self, record: StepRecord) -> None:
        row = self.metrics.at(record.step)
        if row is not None:
            self.trackers.log(row)

    def close(self) -> None:
        self.trackers.close()


class LMEvalHook(BaseHook):
    """`--lm-eval-tasks` at its cadence: ``evaluate(step, model)``'s scores go to the trackers
    and the log; its time is left out of the next throughput."""

    def __init__(
        self,
        cadence: Cadence,
        evaluate: Callable[[int, PyTree], dict[str, float]],
        trackers: Trackers,
        metrics: MetricsHook,
        console: Console,
    ):
        self.cadence = cadence
        self.evaluate = evaluate
        self.trackers = trackers
        self.metrics = metrics
        self.console = console

    def __call__(self, record: StepRecord) -> None:
        if not self.cadence.due(record.step):
            return
        record.host_values()  # a non-finite step stops the run before its evaluation
        start = time.perf_counter()
        scores = self.evaluate(record.step, record.model)
        self.trackers.log({"step": record.step, **scores})
        shown = ", ".join(f"{name.removeprefix('lm_eval/')} {v:.4f}" for name, v in scores.items())
        self.console.say(f"step {record.step}: lm-eval {shown}")
        self.metrics.leave_out(time.perf_counter() - start)


class ProgressHook(BaseHook):
    """The progress bar (tqdm): one tick a step; the newest loss, rate and bits per byte."""

    def __init__(self, bar: Any, metrics: MetricsHook, evals: EvalHook):
        self.bar = bar
        self.metrics = metrics
        self.evals = evals

    def __call__(self, record: StepRecord) -> None:
        self.bar.update(1)
        row = self.metrics.at(record.step)
        if row is None:
            return
        post = {"loss": f"{row['loss']:.3f}", "tok/s": f"{row['tokens_per_s']:,.0f}"}
        if self.evals.latest is not None:
            post["bpb"] = f"{self.evals.latest.bits_per_byte:.3f}"
        self.bar.set_postfix(post, refresh=False)

    def close(self) -> None:
        self.bar.close()


class InterruptHook(BaseHook):
    """Ctrl-C/SIGTERM (`InterruptFlag`): the step ends, `CheckpointHook` saves it (it asks
    ``agreed`` every step, so every process stops at the same one) into ``store`` (``last``),
    then this hook waits for the save, writes the partial run files (``write_partial``), logs and raises KeyboardInterrupt."""

    def __init__(
        self,
        flag: InterruptFlag,
        store: CheckpointStore,
        last: LastCheckpoint,
        write_partial: Callable[[int, str | None], None],
        log: Callable[[str], None],
        as_given: Callable[[str], str],
    ):
        self.flag = flag
        self.store = store
        self.last = last
        self.write_partial = write_partial
        self.log = log
        self.as_given = as_given
        self.stopping = False

    def agreed(self) -> bool:
        """Whether any process was interrupted (one collective: call it once per step)."""
        self.stopping = self.flag.agreed()
        return self.stopping

    def __call__(self, record: StepRecord) -> None:
        if not self.stopping:
            return
        self.store.wait()
        last = self.last.path
        self.write_partial(record.step, last)
        who = "" if self.flag.set else " (another process was interrupted)"
        saved = self.as_given(last) if last else None
        self.log(
            f"\ninterrupted after step {record.step}{who}; saved {saved}; continue with --resume"
        )
        raise KeyboardInterrupt

    def close(self) -> None:
        self.flag.restore()


class CheckpointHook(BaseHook):
    """A checkpoint at its cadence (the run's last step among them) and when ``stop_requested``
    says so (asked every step); never after a non-finite loss. Saves are asynchronous; ``blocked``
    holds the seconds each held the loop up."""

    def __init__(
        self,
        store: CheckpointStore,
        cadence: Cadence,
        meta: Callable[[int], dict[str, Any]],
        last: LastCheckpoint,
        stop_requested: Callable[[], bool],
        model_view: Callable[[PyTree], PyTree] | None = None,
    ):
        self.store = store
        self.cadence = cadence
        self.meta = meta
        self.last = last
        self.stop_requested = stop_requested
        self.model_view = model_view  # what of the model is saved (None: all of it)
        self.blocked: list[float] = []

    def __call__(self, record: StepRecord) -> None:
        stop = self.stop_requested()  # first: every process asks at every step
        if not (self.cadence.due(record.step) or stop):
            return
        record.host_values()  # never a checkpoint after a non-finite loss
        start = time.perf_counter()
        model = record.model if self.model_view is None else self.model_view(record.model)
        trees = {"model": model, "opt_state": record.opt_state}
        path = self.store.save(record.step, trees, self.meta(record.step))
        self.blocked.append(time.perf_counter() - start)
        self.last.path, self.last.step = path, record.step

    def close(self) -> None:
        self.store.close()  # waits for the last write: a run ends with its checkpoints committed


class DecaySaveHook(BaseHook):
    """The checkpoint where an extension of a WSD run restarts (training/extend.py): one
    synchronous ``save`` of the step where the decay starts, into its own directory."""

    def __init__(self, cadence: Cadence, save: Callable[[int, dict[str, PyTree]], None]):
        self.cadence = cadence
        self.save = save

    def __call__(self, record: StepRecord) -> None:
        if self.cadence.due(record.step):
            record.host_values()
            self.save(record.step, {"model": record.model, "opt_state": record.opt_state})
