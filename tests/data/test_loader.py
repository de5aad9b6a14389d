"""The batch loader: the batches it places are the sampler's, read ahead on a thread; the loop reads
step results only where it logs or checkpoints; two processes read disjoint rows and train like
one; a run killed with SIGKILL resumes exactly from the token store and its last checkpoint."""

import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.multiprocess import collect, free_port, start_worker, worker_env, worker_result
from tests.training.test_train import quiet, toy_config
from xlstm_eqx.data import BatchLoader, BatchSampler, ByteTokenizer, load_corpus
from xlstm_eqx.training import host_sync, list_checkpoints, read_metrics, train


# --- the loader --------------------------------------------------------------------------------


def test_loader_places_the_samplers_batches(tmp_path, data_file):
    corpus = load_corpus([data_file], ByteTokenizer(), cache_dir=str(tmp_path / "c"))
    sampler = BatchSampler(corpus.train_reader, seq_len=16, batch_size=4, seed=3)
    reference = BatchSampler(np.asarray(corpus.train), seq_len=16, batch_size=4, seed=3)
    with BatchLoader(sampler, grad_accum=2, start_step=3, end_step=7, prefetch=2) as loader:
        got = list(loader)
    assert [s for s, _ in got] == [4, 5, 6, 7]
    for step, batch in got:
        want = np.stack([reference.batch(2 * (step - 1) + a) for a in range(2)])
        np.testing.assert_array_equal(np.asarray(batch), want)
        assert batch.dtype == np.int32 and batch.shape == (2, 4, 17)


def test_loader_errors_and_early_close():
    class Broken(BatchSampler):
        def rows(self, index, start, stop):
            if index == 2:
                raise ValueError("unreadable window")
            return super().rows(index, start, stop)

    tokens = np.arange(1000, dtype=np.int32)
    loader = BatchLoader(
        Broken(tokens, seq_len=8, batch_size=2, seed=0), grad_accum=1, start_step=0, end_step=5
    )
    assert [next(loader)[0], next(loader)[0]] == [1, 2]
    with pytest.raises(ValueError, match="unreadable window"):
        next(loader)
    loader.close()
    # closed long before the end: the thread stops, nothing hangs
    t0 = time.perf_counter()
    big = BatchLoader(
        BatchSampler(tokens, seq_len=8, batch_size=2, seed=0),
        grad_accum=1,
        start_step=0,
        end_step=10**6,
        prefetch=1,
    )
    next(big)
    big.close()
    assert time.perf_counter() - t0 < 10 and not big._thread.is_alive()


@pytest.mark.slow
def test_loop_reads_step_results_only_where_it_needs_them(tmp_path, data_file, monkeypatch):
    reads = []
    original = host_sync.PendingScalars.read

    def counted(self):
        out = original(self)
        reads.append([s for s, _ in out])
        return out

    monkeypatch.setattr(host_sync.PendingScalars, "read", counted)
    cfg = toy_config(
        tmp_path, data_file, steps=7, log_every=3, eval_every=100, checkpoint_every=100
    )
    result = train(cfg, log=quiet)
    # logged at 1, 3, 6 and 7 (the end, also a checkpoint): four reads, each of the steps since
    # the last one
    assert [r for r in reads if r] == [[1], [2, 3], [4, 5, 6], [7]]
    assert sorted(result.losses) == list(range(1, 8))
    rows = read_metrics(os.path.join(cfg.out, "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 3, 6, 7]
    assert [r["loss"] for r in rows] == [result.losses[s] for s in (1, 3, 6, 7)]


def test_profile_window_writes_a_trace(tmp_path, data_file):
    cfg = toy_config(tmp_path, data_file, steps=4, profile_steps="2:3")
    train(cfg, log=quiet)
    traces = list(pathlib.Path(cfg.out, "profile").rglob("*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0
    with pytest.raises(ValueError, match="profile_steps"):
        train(toy_config(tmp_path / "x", data_file, profile_steps="3"), log=quiet)


# --- processes ---------------------------------------------------------------------------------


def _worker(args: list[str], devices: int, cwd: pathlib.Path) -> subprocess.Popen:
    return start_worker("tests.parallel.sharding_worker", args, devices, cwd)


def _result(proc: subprocess.Popen, timeout: float = 600) -> dict:
    return worker_result(collect("worker", proc, timeout))


@pytest.mark.slow
def test_two_processes_read_disjoint_rows_and_train_like_one(tmp_path, data_file):
    """Two processes with two CPU devices each (gloo), the batch split over the four: each reads
    only its half of every batch, and both log the losses of the one-process run."""
    port = str(free_port())
    run = str(tmp_path / "two")
    procs = [_worker(["data", data_file, run, str(i), "2", port], 2, tmp_path) for i in range(2)]
    single = _worker(["data", data_file, str(tmp_path / "one"), "0", "1", "0"], 1, tmp_path)
    r0, r1 = (_result(p) for p in procs)
    one = _result(single)
    assert (r0["process_index"], r1["process_index"], r0["devices"]) == (0, 1, 4)
    assert sorted(r0["reads"]) == [[i, 0, 4] for i in range(4)]
    assert sorted(r1["reads"]) == [[i, 4, 8] for i in range(4)]
    assert sorted(one["reads"]) == [[i, 0, 8] for i in range(4)]
    for r in (r0, r1):
        np.testing.assert_allclose(r["losses"], one["losses"], rtol=1e-5)
        assert r["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-5)
    rows = read_metrics(os.path.join(run, "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # one writer


@pytest.mark.slow
def test_resume_after_sigkill_is_exact(tmp_path, data_file):
    """`xlstm-eqx train` killed with SIGKILL mid-run, then resumed: the same store, and the same
    losses and metrics rows as a run that was never stopped."""
    out = str(tmp_path / "killed")
    args = ["--model", "toy", "--preset", "tiny", "--data", data_file, "--seq-len", "16"]
    args += ["--batch-size", "4", "--lr", "0.01", "--schedule", "constant", "--warmup-steps", "2"]
    args += ["--log-every", "1", "--eval-every", "1000000", "--checkpoint-every", "3"]
    args += ["--no-progress", "--sample-tokens", "0"]
    code = "import sys, tests.training.test_train; from xlstm_eqx.cli import main; sys.exit(main())"
    cmd = [sys.executable, "-c", code, "train", *args, "--out", out, "--steps", "100000"]
    log = tmp_path / "stderr.txt"
    ckpts = os.path.join(out, "checkpoints")
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            cmd, cwd=tmp_path, env=worker_env(1), stdout=subprocess.DEVNULL, stderr=err
        )
        try:
            deadline = time.time() + 300
            while time.time() < deadline and proc.poll() is None:
                if len(list_checkpoints(ckpts)) >= 2:
                    break
                time.sleep(0.05)
            assert proc.poll() is None, log.read_text()[-3000:]
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.wait()
    last = list_checkpoints(ckpts)[-1][0]
    assert last >= 6
    with open(os.path.join(out, "config.json")) as f:
        store = json.load(f)["data"]["store"]
    stamp = os.stat(os.path.join(store, "index.json")).st_mtime_ns

    base = toy_config(tmp_path, data_file, schedule="constant", warmup_steps=2, log_every=1)
    base = dataclasses.replace(base, eval_every=1000000, checkpoint_every=3, steps=last + 3)
    resumed = train(dataclasses.replace(base, out=out, resume=True), log=quiet)
    assert sorted(resumed.losses) == [last + 1, last + 2, last + 3]
    assert os.stat(os.path.join(store, "index.json")).st_mtime_ns == stamp  # reused, not rebuilt
    fresh = train(dataclasses.replace(base, out=str(tmp_path / "fresh")), log=quiet)
    assert {s: fresh.losses[s] for s in resumed.losses} == resumed.losses
    a = read_metrics(os.path.join(out, "metrics.jsonl"))
    b = read_metrics(os.path.join(fresh.out_dir, "metrics.jsonl"))
    assert [r["step"] for r in a] == list(range(1, last + 4))
    assert [(r["loss"], r["lr"], r["grad_norm"]) for r in a] == [
        (r["loss"], r["lr"], r["grad_norm"]) for r in b
    ]
