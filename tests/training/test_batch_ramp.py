"""Batch-size ramp-up (`--batch-rampup-steps`): the schedule against a direct computation, the
loader's batches (sizes, and the windows read: one contiguous stream), the tokens and epochs in
the metrics, an exact `--resume` mid-ramp, the errors, and the command line on a 2-device mesh."""

import dataclasses
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.corpus import TEXT
from tests.multiprocess import worker_env
from tests.training.test_train import quiet, toy_config
from xlstm_eqx.training import loop as loop_module, read_metrics, train
from xlstm_eqx.training.batch_ramp import BatchRamp


def _direct_size(step, *, batch_size, start, increment, steps):
    """Linear from `start` at step 1 to `batch_size` at step `steps + 1`, rounded down to
    `start` plus a whole number of increments."""
    if step > steps:
        return batch_size
    exact = start + (batch_size - start) * (step - 1) / steps
    return start + math.floor((exact - start) / increment + 1e-9) * increment


@pytest.mark.parametrize(
    "batch_size,start,increment,steps",
    [(8, 2, 2, 4), (16, 4, 4, 7), (12, 3, 1, 5), (8, 8, 8, 3), (6, 2, 2, 1)],
)
def test_schedule_equals_a_direct_computation(batch_size, start, increment, steps):
    kw = dict(batch_size=batch_size, start=start, increment=increment, steps=steps)
    ramp = BatchRamp(grad_accum=3, **kw)
    sizes = [ramp.size(s) for s in range(1, steps + 5)]
    assert sizes == [_direct_size(s, **kw) for s in range(1, steps + 5)]
    assert sizes[0] == start and sizes[steps] == batch_size
    assert all((b - start) % increment == 0 and start <= b <= batch_size for b in sizes)
    assert sizes == sorted(sizes)
    windows = 0
    for s in range(1, steps + 5):  # the windows before each step: a running sum
        assert ramp.windows_before(s) == windows
        assert ramp.layout(s) == (sizes[s - 1], windows)
        windows += 3 * sizes[s - 1]
        assert ramp.tokens_through(s, seq_len=10) == windows * 10
    assert BatchRamp(grad_accum=2, batch_size=8, start=1, increment=1, steps=0).size(1) == 8


class _RecordingLoader(loop_module.BatchLoader):
    """The trainer's loader, keeping every step's host batch."""

    seen: dict[int, np.ndarray] = {}

    def host_batch(self, step):
        batch = super().host_batch(step)
        type(self).seen[step] = np.asarray(
            getattr(batch, "tokens", batch)
        )  # fine-tuning: a TokenBatch
        return batch


def _ramp_run(cfg, monkeypatch, **kw):
    _RecordingLoader.seen = {}
    monkeypatch.setattr(loop_module, "BatchLoader", _RecordingLoader)
    result = train(cfg, log=quiet, **kw)
    return result, dict(_RecordingLoader.seen)


RAMP = dict(batch_size=6, grad_accum=2, batch_rampup_steps=4, batch_rampup_start=2)
RAMP |= dict(batch_rampup_increment=2, steps=6, checkpoint_every=100, eval_every=100)


def test_run_reads_the_ramp_sizes_from_one_stream(tmp_path, data_file, monkeypatch):
    cfg = toy_config(tmp_path, data_file, **RAMP)
    result, seen = _ramp_run(cfg, monkeypatch)
    ramp = BatchRamp.of(cfg)
    sizes = [ramp.size(s) for s in range(1, 7)]
    assert sizes == [2, 2, 4, 4, 6, 6]
    assert [seen[s].shape for s in range(1, 7)] == [(2, b, cfg.seq_len + 1) for b in sizes]
    # every step continues the stream of windows where the one before stopped
    windows = np.concatenate([seen[s].reshape(-1, cfg.seq_len + 1) for s in range(1, 7)])
    sampler = _sampler(cfg)
    stream = np.concatenate([sampler.batch(i) for i in range(math.ceil(len(windows) / 6))])
    np.testing.assert_array_equal(windows, stream[: len(windows)])
    rows = read_metrics(os.path.join(result.out_dir, "metrics.jsonl"))
    tokens = np.cumsum([2 * b * cfg.seq_len for b in sizes]).tolist()
    assert [r["tokens"] for r in rows] == tokens
    assert [r["epoch"] for r in rows] == [
        round(t / cfg.seq_len / sampler.num_windows, 4) for t in tokens
    ]
    assert all(math.isfinite(r["loss"]) and r["tokens_per_s"] > 0 for r in rows)


def _sampler(cfg):
    from xlstm_eqx.training.prepare import prepare_run

    return prepare_run(dataclasses.replace(cfg, out=cfg.out + "-probe")).sampler  # writes nothing


def test_resume_mid_ramp_is_exact(tmp_path, data_file, monkeypatch):
    full, full_seen = _ramp_run(toy_config(tmp_path / "a", data_file, **RAMP), monkeypatch)
    cfg = toy_config(tmp_path / "b", data_file, **RAMP)
    first, _ = _ramp_run(cfg, monkeypatch, stop_after_step=3)  # mid-ramp: sizes 2, 2, 4
    second, seen = _ramp_run(dataclasses.replace(cfg, resume=True), monkeypatch)
    assert sorted(seen) == [4, 5, 6]
    for step in (4, 5, 6):  # the same windows, the same batch size
        np.testing.assert_array_equal(seen[step], full_seen[step])
    assert {**first.losses, **second.losses} == full.losses  # float32 on CPU: bit-identical
    a = read_metrics(os.path.join(full.out_dir, "metrics.jsonl"))
    b = read_metrics(os.path.join(second.out_dir, "metrics.jsonl"))
    assert [(r["step"], r["tokens"], r["loss"]) for r in a] == [
        (r["step"], r["tokens"], r["loss"]) for r in b
    ]


def test_ramp_errors_name_the_field(tmp_path, data_file):
    flag = r"--batch-rampup-start \(TrainConfig.batch_rampup_start\) must be at most --batch-size 4"
    with pytest.raises(ValueError, match=flag):
        toy_config(tmp_path, data_file, batch_rampup_steps=2, batch_rampup_start=8)
    cfg = toy_config(tmp_path, data_file, batch_rampup_steps=2)
    cfg.batch_rampup_start = 5  # assigned after the config was made: train() checks again
    with pytest.raises(ValueError, match=flag):
        train(cfg, log=quiet)
    with pytest.raises(ValueError, match="TrainConfig.batch_rampup_increment"):
        toy_config(tmp_path, data_file, batch_rampup_increment=0)
    assert not os.path.exists(cfg.out)


def _cli(args, cwd, devices):
    """`xlstm-eqx ARGS` in a subprocess with `devices` simulated devices, the toy model family
    registered (as a plugin would)."""
    code = "import sys, tests.training.test_train; from xlstm_eqx.cli import main; "
    code += "sys.exit(main(sys.argv[1:]))"
    cmd = [sys.executable, "-c", code, *args]
    return subprocess.run(cmd, cwd=cwd, env=worker_env(devices), capture_output=True, text=True)


@pytest.mark.slow
def test_cli_ramp_on_a_two_device_mesh(tmp_path):
    """From another directory with relative paths: a ramp not divisible by the mesh's data size
    is refused naming the flag; one that is trains, its tokens in the metrics."""
    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    (work / "data" / "text.txt").write_text(TEXT)
    args = ["train", "--model", "toy", "--preset", "tiny", "--data", "data/text.txt"]
    args += ["--out", "runs/ramp", "--seq-len", "16", "--batch-size", "4", "--steps", "2"]
    args += ["--no-progress", "--sample-tokens", "0", "--eval-batches", "1", "--log-every", "1"]
    args += ["--mesh", "dp=2", "--batch-rampup-steps", "1", "--warmup-steps", "0"]
    bad = _cli([*args, "--batch-rampup-start", "1"], work, devices=2)
    assert bad.returncode == 2, bad.stderr[-2000:]
    assert "--batch-rampup-start (TrainConfig.batch_rampup_start)" in bad.stderr
    assert "data-parallel size 2" in bad.stderr and not (work / "runs" / "ramp").exists()
    good = _cli([*args, "--batch-rampup-start", "2", "--batch-rampup-increment", "2"], work, 2)
    assert good.returncode == 0, good.stderr[-3000:]
    with open(work / "runs" / "ramp" / "config.json") as f:
        assert json.load(f)["train"]["batch_rampup_start"] == 2
    rows = read_metrics(str(work / "runs" / "ramp" / "metrics.jsonl"))
    assert [r["tokens"] for r in rows] == [2 * 16, (2 + 4) * 16]  # sizes 2, then 4
