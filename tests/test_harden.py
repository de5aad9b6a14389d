"""Hardening: one run per --out (lock), torn metrics rows, interrupted runs' files, eval lines."""

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from xlstm_eqx.training import read_metrics, train
from xlstm_eqx.training.run_lock import RunLockedError, hold_run_lock

from .test_train import TEXT, _cfg, _quiet


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "data" / "corpus.txt"
    path.parent.mkdir()
    path.write_text(TEXT)
    return str(path)


def _env(tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, *filter(None, [env.get("PYTHONPATH")])])
    env["JAX_PLATFORMS"] = "cpu"
    env["XLSTM_EQX_CACHE_DIR"] = str(tmp_path / "jax-cache")
    return env


_HOLDER = textwrap.dedent(
    """
    import sys, time
    from xlstm_eqx.training.run_lock import hold_run_lock
    with hold_run_lock(sys.argv[1]):
        print("held", flush=True)
        time.sleep(600)
    """
)


def test_lock_names_the_holder_and_a_killed_holder_is_taken_over(tmp_path):
    out = str(tmp_path / "run")
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, out],
        env=_env(tmp_path),
        stdout=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    try:
        assert proc.stdout.readline().strip() == "held"
        t0 = time.perf_counter()
        with pytest.raises(RunLockedError) as e, hold_run_lock(out):
            pass
        assert time.perf_counter() - t0 < 1.0  # refused at once, no waiting
        msg = str(e.value)
        assert f"pid {proc.pid}" in msg and socket.gethostname() in msg and "\n" not in msg
        proc.send_signal(signal.SIGKILL)  # a stale lock: the holder dies without cleaning up
        proc.wait()
        assert os.path.exists(os.path.join(out, ".lock"))
        with hold_run_lock(out) as path:
            with open(path) as f:
                assert json.load(f)["pid"] == os.getpid()
        assert not os.path.exists(path)
    finally:
        proc.kill()
        proc.communicate()


def test_lock_fallback_without_flock(tmp_path, monkeypatch):
    """Where flock is refused (some NFS/FUSE mounts): O_EXCL + pid liveness on this host."""
    from xlstm_eqx.training import run_lock

    monkeypatch.setattr(run_lock, "_flock", lambda out, path: None)
    out = str(tmp_path / "run")
    os.makedirs(out)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    with open(os.path.join(out, ".lock"), "w") as f:
        json.dump({"pid": int(dead.stdout), "host": socket.gethostname()}, f)
    with hold_run_lock(out):  # stale: taken over
        with pytest.raises(RunLockedError, match=f"pid {os.getpid()} on host"), hold_run_lock(out):
            pass
    with open(os.path.join(out, ".lock"), "w") as f:
        json.dump({"pid": 1, "host": "elsewhere"}, f)  # another host: never taken over
    with pytest.raises(RunLockedError, match="pid 1 on host elsewhere"), hold_run_lock(out):
        pass


def test_two_train_commands_into_one_out(tmp_path, data_file):
    """Started at once: one trains, the other refuses at once naming the holder; then the
    trainer is killed (SIGKILL) and a new run takes its stale lock over."""
    out = str(tmp_path / "run")
    argv = [
        sys.executable,
        "-m",
        "xlstm_eqx.cli",
        "train",
        "--preset",
        "tiny_xlstm",
        "--data",
        data_file,
        "--out",
        out,
        "--seq-len",
        "16",
        "--batch-size",
        "2",
        "--steps",
        "100000",
        "--no-progress",
        "--sample-tokens",
        "0",
        "--checkpoint-every",
        "100000",
        "--eval-every",
        "100000",
        "--log-every",
        "100000",
    ]
    env = _env(tmp_path)
    procs = [
        subprocess.Popen(
            argv, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    try:
        deadline = time.time() + 240
        while all(p.poll() is None for p in procs) and time.time() < deadline:
            time.sleep(0.2)
        done = [p for p in procs if p.poll() is not None]
        assert len(done) == 1, "neither run refused"
        loser = done[0]
        winner = procs[1 - procs.index(loser)]
        err = loser.stderr.read()
        assert loser.returncode == 2, err
        assert f"pid {winner.pid}" in err and "in use by another run" in err
        assert len(err.strip().splitlines()) == 1, err
        winner.send_signal(signal.SIGKILL)
        winner.wait()
        r = subprocess.run(
            argv[: argv.index("--steps")] + ["--steps", "2"],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert r.returncode == 0, r.stderr
    finally:
        for p in procs:
            p.kill()
            p.communicate()


def test_torn_metrics_row_does_not_block_resume(tmp_path, data_file):
    cfg = _cfg(tmp_path, data_file, steps=4, checkpoint_every=2)
    train(cfg, stop_after_step=2, log=_quiet)
    path = os.path.join(cfg.out, "metrics.jsonl")
    with open(path, "a") as f:
        f.write('{"step": 3, "loss": 1.2')  # a write cut short by a full disk
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    rest = train(dataclasses.replace(cfg, resume=True), log=_quiet)
    assert sorted(rest.losses) == [3, 4]
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3, 4]
    # a malformed row that is not the last one is an error naming the file and line
    with open(path, "a") as f:
        f.write("garbage\n" + json.dumps({"step": 9}) + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl: line 5"):
        read_metrics(path)


def test_interrupted_run_writes_plot_and_summary(tmp_path, data_file):
    pytest.importorskip("matplotlib")

    def interrupt_at_first_eval(msg):
        if msg.startswith("step 2:"):
            os.kill(os.getpid(), signal.SIGINT)

    cfg = _cfg(tmp_path, data_file, steps=6, eval_every=2, checkpoint_every=100)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, log=interrupt_at_first_eval)
    assert os.path.isfile(os.path.join(cfg.out, "loss.png"))
    with open(os.path.join(cfg.out, "summary.json")) as f:
        summary = json.load(f)
    assert summary["step"] == 2 and summary["interrupted"] is True
    assert summary["eval_loss"] is not None
    assert not os.path.exists(os.path.join(cfg.out, ".lock"))


def test_every_eval_logs_a_line_and_config_records_out(tmp_path, data_file, monkeypatch):
    lines = []
    cfg = _cfg(tmp_path, data_file, steps=6, eval_every=2, out="")
    monkeypatch.chdir(tmp_path)
    train(cfg, log=lines.append)
    evals = [m for m in lines if m.startswith("step ") and "held-out" in m]
    assert [m.split(":")[0] for m in evals] == ["step 2", "step 4", "step 6"]
    assert all("bits/byte" in m and "unigram baseline" in m for m in evals)
    with open(tmp_path / "runs" / "toy" / "config.json") as f:
        assert json.load(f)["train"]["out"] == os.path.join("runs", "toy")
