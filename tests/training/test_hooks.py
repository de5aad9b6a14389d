"""The run loop's hooks, each alone (fake records, fake stores and bars), their cadences, and the
step loop's record stream; no training run."""

import io
import json
import math

import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from xlstm_eqx.training.hooks import (
    Cadence,
    CheckpointHook,
    CompileNotice,
    Console,
    DecaySaveHook,
    EvalHook,
    HostScalars,
    InterruptHook,
    LastCheckpoint,
    MetricsHook,
    ProfileHook,
    ProgressHook,
    StepRecord,
    TrackerHook,
    TrainingDivergedError,
)
from xlstm_eqx.training.host_sync import ProfileWindow
from xlstm_eqx.training.loop import steps
from xlstm_eqx.training.orbax_checkpoint import CheckpointStore
from xlstm_eqx.training.run_files import InterruptFlag
from xlstm_eqx.training.step import TrainStep
from xlstm_eqx.training.trackers import Trackers
from xlstm_eqx.training.train_state import TrainState


TOKENS_PER_STEP = 64


def _records(losses, grad_norms=None, last=None):
    """Records of steps 1.. with these losses, sharing one `HostScalars`, made one by one as the
    step loop makes them (a step's scalars are pending from its record on)."""
    scalars = HostScalars(last or LastCheckpoint(None, 0))
    grad_norms = grad_norms or [1.0] * len(losses)
    for step, (loss, norm) in enumerate(zip(losses, grad_norms, strict=True), start=1):
        loss, norm = jnp.asarray(loss), jnp.asarray(norm)
        scalars.add(step, loss, norm)
        model = {"w": np.full(2, step)}
        yield StepRecord(
            step, model, {"m": step}, loss, norm, step * TOKENS_PER_STEP, 0.25, scalars
        )


class Lines:
    def __init__(self):
        self.lines: list[str] = []

    def __call__(self, line: str) -> None:
        self.lines.append(line)


def test_cadence_every_at_and_never():
    log = Cadence.of(every=5, at=[1, 12])
    assert [s for s in range(1, 13) if log.due(s)] == [1, 5, 10, 12]
    assert not any(Cadence().due(s) for s in range(1, 20))
    assert [s for s in range(1, 10) if Cadence.of(at=[3]).due(s)] == [3]


def test_host_scalars_read_once_and_stop_at_a_non_finite_step():
    scalars = HostScalars(LastCheckpoint(None, 0))
    scalars.add(1, jnp.asarray(2.0), jnp.asarray(1.0))
    scalars.add(2, jnp.asarray(1.5), jnp.asarray(0.5))
    assert scalars.read() == (1.5, 0.5)  # steps 1 and 2 in one read: the newest
    assert scalars.read() == (1.5, 0.5)  # nothing pending: the newest again
    scalars.add(3, jnp.asarray(1.0), jnp.asarray(0.25))
    assert scalars.losses == {1: 2.0, 2: 1.5}
    assert scalars.read() == (1.0, 0.25) and scalars.losses == {1: 2.0, 2: 1.5, 3: 1.0}

    last = LastCheckpoint("/runs/a/checkpoints/step_00000002", 2)
    bad = list(_records([2.0, 1.5, math.nan], last=last))
    with pytest.raises(TrainingDivergedError, match="step 3: loss nan") as err:
        bad[2].host_values()
    assert err.value.step == 3 and err.value.last_checkpoint == last.path
    assert "nothing was saved after step 2" in str(err.value)
    assert bad[2].scalars.losses == {1: 2.0, 2: 1.5}
    (none,) = _records([1.0], grad_norms=[math.inf])
    with pytest.raises(TrainingDivergedError, match="gradient norm inf.*no checkpoint was written"):
        none.host_values()


def test_console_writes_above_the_bar_only_when_printing():
    class Bar:
        written: list[str] = []

        def write(self, line):
            self.written.append(line)

    lines = Lines()
    Console(lines, Bar()).say("a")  # a custom log gets every line
    Console(lines).say("b")
    assert lines.lines == ["a", "b"]
    from xlstm_eqx.core.console import print_line

    bar = Bar()
    Console(print_line, bar).say("c")
    assert bar.written == ["c"]


def test_compile_notice_at_the_first_step_only():
    lines = Lines()
    hook = CompileNotice(3, Console(lines))
    for record in list(_records([1.0, 1.0, 1.0, 1.0]))[2:]:
        hook.before_step(record.step)
        hook(record)
    assert lines.lines == ["compiling the train step…", "compiled in 0.2 s"]


def test_profile_hook_starts_stops_and_says_where():
    class Window(ProfileWindow):
        def __init__(self):
            self.directory = "/runs/a/profile"
            self.active, self.calls = False, []

        def before(self, step):
            self.calls.append(("before", step))
            self.active = self.active or step == 2

        def after(self, step, outputs):
            self.calls.append(("after", step))
            self.active = self.active and step < 3

        def stop(self):
            self.calls.append("stop")

    lines, window = Lines(), Window()
    hook = ProfileHook(window, "2:3", Console(lines))
    for record in _records([1.0] * 4):
        hook.before_step(record.step)
        hook(record)
    hook.close()
    assert lines.lines == ["wrote the profile trace of steps 2:3 to /runs/a/profile"]
    assert window.calls[-1] == "stop" and ("before", 1) in window.calls


def test_eval_hook_at_its_cadence():
    seen = []

    def evaluate(model):
        seen.append(int(model["w"][0]))
        return 0.5, 0.25

    hook = EvalHook(Cadence.of(every=2, at=[3]), evaluate)
    for record in _records([1.0] * 4):
        hook(record)
    assert seen == [2, 3, 4]
    assert hook.latest is not None and hook.latest.step == 4
    assert hook.at(4) is hook.latest and hook.at(3) is None


def _metrics(lines, every=2, eval_at=()):
    evals = EvalHook(Cadence.of(at=eval_at), lambda model: (0.5, 0.25))
    file = io.StringIO()
    file.close = lambda: None  # read after the run
    hook = MetricsHook(
        Cadence.of(every=every, at=[1]),
        evals,
        file,
        Console(lines),
        lambda step: (1e-3 * step, step / 10),
        2.0,
    )
    return evals, hook, file


def test_metrics_rows_at_logged_and_evaluated_steps():
    lines = Lines()
    evals, hook, file = _metrics(lines, every=2, eval_at=[3])
    for record in _records([4.0, 3.0, 2.0, 1.0, 0.5]):
        evals(record)
        hook(record)
    rows = [json.loads(line) for line in file.getvalue().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert list(rows[0]) == ["step", "loss", "lr", "grad_norm", "tokens", "epoch", "tokens_per_s"]
    assert rows[2]["eval_loss"] == 0.5 and rows[2]["bits_per_byte"] == 0.25
    assert rows[2]["unigram_bits_per_byte"] == 2.0 and "eval_loss" not in rows[3]
    assert [r["loss"] for r in rows] == [4.0, 3.0, 2.0, 1.0]
    assert rows[3]["lr"] == pytest.approx(4e-3) and rows[3]["epoch"] == 0.4
    assert rows[3]["tokens"] == 4 * TOKENS_PER_STEP and rows[3]["tokens_per_s"] > 0
    assert lines.lines == [
        "step 3: loss 2.0000, held-out 0.5000 nats/token, 0.250 bits/byte (unigram baseline 2.000)"
    ]
    assert hook.at(4) == rows[3] and hook.at(5) is None


def test_trackers_and_progress_follow_the_rows():
    lines = Lines()
    evals, metrics, _ = _metrics(lines, every=2, eval_at=[2])

    class Tracker:
        rows: list[dict] = []
        closed = False

        def log(self, row, step):
            self.rows.append(row)

        def close(self):
            self.closed = True

    class Bar:
        def __init__(self):
            self.n, self.post = 0, None

        def update(self, n):
            self.n += n

        def set_postfix(self, post, refresh):
            self.post = post

    tracker, bar = Tracker(), Bar()
    tracker_hook = TrackerHook(Trackers([tracker]), metrics)
    progress = ProgressHook(bar, metrics, evals)
    for record in _records([4.0, 3.0, 2.0]):
        for hook in (evals, metrics, tracker_hook, progress):
            hook(record)
    tracker_hook.close()
    assert [r["step"] for r in tracker.rows] == [1, 2] and tracker.closed
    assert bar.n == 3
    assert bar.post is not None and bar.post["loss"] == "3.000" and bar.post["bpb"] == "0.250"


class Store(CheckpointStore):
    def __init__(self):  # no orbax manager: what the hooks call, recorded
        self.saved, self.waited, self.closed = [], 0, False

    def save(self, step, trees, meta):
        self.saved.append((step, int(trees["model"]["w"][0]), meta["step"]))
        return f"/runs/a/checkpoints/step_{step:08d}"

    def wait(self):
        self.waited += 1

    def close(self):
        self.closed = True


def test_checkpoints_at_cadence_and_on_request():
    asked = []

    def stop_requested():
        asked.append(True)
        return len(asked) == 2

    store, last = Store(), LastCheckpoint(None, 0)
    hook = CheckpointHook(
        store,
        Cadence.of(every=3, at=[4]),
        lambda step: {"step": step},
        last,
        stop_requested,
    )
    for record in _records([1.0] * 4):
        hook(record)
    hook.close()
    assert len(asked) == 4  # asked at every step (a collective on several processes)
    assert [s for s, _, _ in store.saved] == [2, 3, 4]
    assert all(step == w == m for step, w, m in store.saved)
    assert last == LastCheckpoint("/runs/a/checkpoints/step_00000004", 4)
    assert len(hook.blocked) == 3 and store.closed


def test_a_checkpoint_is_never_written_after_a_non_finite_loss():
    store = Store()
    hook = CheckpointHook(
        store,
        Cadence.of(every=1),
        lambda step: {"step": step},
        LastCheckpoint(None, 0),
        lambda: False,
    )
    records = _records([1.0, math.nan])
    hook(next(records))
    with pytest.raises(TrainingDivergedError):
        hook(next(records))
    assert [s for s, _, _ in store.saved] == [1]


def test_decay_save_at_its_step_only():
    saved = []
    hook = DecaySaveHook(Cadence.of(at=[3]), lambda step, trees: saved.append(step))
    for record in _records([1.0] * 5):
        hook(record)
    assert saved == [3]
    never = DecaySaveHook(Cadence(), lambda step, trees: saved.append(step))
    for record in _records([1.0] * 5):
        never(record)
    assert saved == [3]


class Flag(InterruptFlag):
    def __init__(self, at_call, mine=True):  # no signal handlers
        self.calls, self.at_call, self.set, self.restored = 0, at_call, mine, False

    def agreed(self):
        self.calls += 1
        return self.calls >= self.at_call

    def restore(self):
        self.restored = True


@pytest.mark.parametrize("mine", [True, False])
def test_interrupt_saves_writes_the_partial_files_and_stops(mine):
    store, last, lines, partial = Store(), LastCheckpoint(None, 0), Lines(), []
    flag = Flag(at_call=2, mine=mine)
    interrupt = InterruptHook(
        flag,
        store,
        last,
        lambda step, path: partial.append((step, path)),
        lines,
        lambda path: path.replace("/runs/a/", "a/"),
    )
    checkpoints = CheckpointHook(
        store,
        Cadence.of(every=100),
        lambda step: {"step": step},
        last,
        interrupt.agreed,
    )
    records = list(_records([1.0] * 3))
    for hook in (checkpoints, interrupt):
        hook(records[0])
    assert not store.saved and not partial
    checkpoints(records[1])
    with pytest.raises(KeyboardInterrupt):
        interrupt(records[1])
    interrupt.close()
    assert [s for s, _, _ in store.saved] == [2] and store.waited == 1
    assert partial == [(2, "/runs/a/checkpoints/step_00000002")] and flag.restored
    who = "" if mine else " (another process was interrupted)"
    assert lines.lines == [
        f"\ninterrupted after step 2{who}; saved a/checkpoints/step_00000002; "
        "continue with --resume"
    ]


def test_steps_yields_one_record_per_batch():
    """The step loop: the step runs on each batch with fold_in(loop_key, step), `before` runs
    first, the records carry the state after the step and the tokens so far."""
    calls = []

    def step_fn(inputs, model, opt_state):
        batch, key = inputs
        calls.append(("step", int(batch[0, 0, 0]), np.asarray(jr.key_data(key)).tolist()))
        return model + 1, opt_state + 2, jnp.asarray(float(batch.sum())), jnp.asarray(1.0)

    loop_key = jr.key(7)
    state = TrainState(0, 0, TrainStep(step_fn), 4, loop_key)
    batches = [(s, np.full((1, 2, 3), s)) for s in (5, 6, 7)]
    scalars = HostScalars(LastCheckpoint(None, 0))
    before = []
    records = list(
        steps(state, batches, scalars, tokens_per_step=10, before=lambda s: before.append(s))
    )
    assert [r.step for r in records] == [5, 6, 7] and before == [5, 6, 7]
    assert [(r.model, r.opt_state, r.tokens) for r in records] == [
        (1, 2, 50),
        (2, 4, 60),
        (3, 6, 70),
    ]
    keys = [np.asarray(jr.key_data(jr.fold_in(loop_key, s))).tolist() for s in (5, 6, 7)]
    assert [c[2] for c in calls] == keys
    assert records[-1].host_values() == (42.0, 1.0) and scalars.losses == {
        5: 30.0,
        6: 36.0,
        7: 42.0,
    }
    assert all(r.seconds >= 0 for r in records)
