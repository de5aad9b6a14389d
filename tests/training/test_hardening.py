"""Hardening: one run per --out (lock), torn metrics rows, interrupted runs' files, eval lines."""

import argparse
import dataclasses
import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from xlstm_eqx.training import read_metrics, train

from .test_train import quiet, toy_config


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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


@pytest.mark.slow
def test_lock_names_the_holder_and_a_killed_holder_is_taken_over(tmp_path):
    from xlstm_eqx.training.run_lock import RunLockedError, hold_run_lock

    out = str(tmp_path / "run")
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, out],
        env=_env(tmp_path),
        stdout=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    try:
        assert proc.stdout is not None
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
    from xlstm_eqx.training.run_lock import RunLockedError, hold_run_lock

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


@pytest.mark.slow
def test_two_train_commands_into_one_out(tmp_path, data_file):
    """Started at once: one trains, the other refuses at once naming the holder; then the
    trainer is killed (SIGKILL) and a new run takes its stale lock over. That run also fills
    the persistent compile cache `$XLSTM_EQX_CACHE_DIR` names (`_env`)."""
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
        assert loser.stderr is not None
        err = loser.stderr.read()
        assert loser.returncode == 2, err
        assert f"pid {winner.pid}" in err and "in use by another run" in err
        assert len(err.strip().splitlines()) == 1, err
        winner.send_signal(signal.SIGKILL)
        winner.wait()
        cache = tmp_path / "jax-cache"
        cached = set(cache.iterdir()) if cache.is_dir() else set()
        r = subprocess.run(
            argv[: argv.index("--steps")] + ["--steps", "2"],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert r.returncode == 0, r.stderr
        assert set(cache.iterdir()) - cached, "nothing was cached"  # its train step at least
    finally:
        for p in procs:
            p.kill()
            p.communicate()


def test_torn_metrics_row_does_not_block_resume(tmp_path, data_file):
    cfg = toy_config(tmp_path, data_file, steps=4, checkpoint_every=2)
    train(cfg, stop_after_step=2, log=quiet)
    path = os.path.join(cfg.out, "metrics.jsonl")
    with open(path, "a") as f:
        f.write('{"step": 3, "loss": 1.2')  # a write cut short by a full disk
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    rest = train(dataclasses.replace(cfg, resume=True), log=quiet)
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

    cfg = toy_config(tmp_path, data_file, steps=6, eval_every=2, checkpoint_every=100)
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
    cfg = toy_config(tmp_path, data_file, steps=6, eval_every=2, out="")
    monkeypatch.chdir(tmp_path)
    train(cfg, log=lines.append)
    evals = [m for m in lines if m.startswith("step ") and "held-out" in m]
    assert [m.split(":")[0] for m in evals] == ["step 2", "step 4", "step 6"]
    assert all("bits/byte" in m and "unigram baseline" in m for m in evals)
    with open(tmp_path / "runs" / "toy" / "config.json") as f:
        assert json.load(f)["train"]["out"] == os.path.join("runs", "toy")


# --- one-line errors, raised before anything is written ---------------------------------------


def _cli_fast(tmp_path, data_file):
    return [
        "--model",
        "toy",
        "--preset",
        "tiny",
        "--data",
        data_file,
        "--seq-len",
        "16",
        "--batch-size",
        "2",
        "--steps",
        "2",
        "--no-progress",
        "--sample-tokens",
        "0",
        "--warmup-steps",
        "0",
        "--eval-batches",
        "1",
        "--out",
        str(tmp_path / "run"),
    ]


def _one_error_line(capsys):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_negative_seed_fails_before_anything_is_written(tmp_path, data_file, capsys):
    from xlstm_eqx.cli import main

    assert main(["train", *_cli_fast(tmp_path, data_file), "--seed", "-1"]) == 2
    assert "TrainConfig.seed" in _one_error_line(capsys)
    assert not os.path.exists(tmp_path / "run")
    assert main(["train", *_cli_fast(tmp_path, data_file), "--max-data-bytes", "0"]) == 2
    assert "TrainConfig.max_data_bytes" in _one_error_line(capsys)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,text,match",
    [
        (
            "evil.yaml",
            "seed: !!python/object/apply:os.system ['true']\n",
            r"not valid \(safe\) YAML",
        ),
        ("broken.yaml", "steps: [1, 2\n", r"not valid \(safe\) YAML"),
        ("deep.json", "[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ("deep.yaml", "[" * 20_000 + "]" * 20_000, "evil|deep|YAML|nested"),
        (
            "typed.json",
            '{"steps": "ten"}',
            r"TrainConfig.steps\) must be a positive int, got 'ten'",
        ),
        ("flag.yaml", "progress: maybe\n", r"TrainConfig.progress\) must be a bool"),
        ("list.json", '{"data": [1, 2]}', r"TrainConfig.data\) must be a list of strings"),
    ],
)
def test_config_file_errors_are_one_line(tmp_path, capsys, name, text, match):
    from xlstm_eqx.cli import main

    path = tmp_path / name
    path.write_text(text)
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "run")]) == 2
    err = _one_error_line(capsys)
    assert re.search(match, err), err
    assert not os.path.exists(tmp_path / "run")


def test_a_string_data_value_is_one_file(tmp_path, data_file):
    from xlstm_eqx.cli import build_parser, resolve_train_config

    path = tmp_path / "c.yaml"
    path.write_text(f"data: {data_file}\n")
    cfg = resolve_train_config(build_parser().parse_args(["train", "--config", str(path)]))
    assert cfg.data == [data_file]  # not one "file" per character


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EROFS])
def test_disk_full_or_read_only_is_one_line(tmp_path, data_file, capsys, monkeypatch, err):
    from xlstm_eqx.cli import main
    from xlstm_eqx.training import run_ends

    def fail(path, obj):
        raise OSError(err, os.strerror(err), path)

    monkeypatch.setattr(run_ends, "write_json_atomic", fail)
    assert main(["train", *_cli_fast(tmp_path, data_file)]) == 2
    line = _one_error_line(capsys)
    assert os.strerror(err) in line and "config.json" in line


# --- --help, the compilation cache ---------------------------------------------------------------


def test_help_shows_every_default_and_the_dtype_choices():
    from xlstm_eqx.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = []
    for name, p in sub.choices.items():
        fmt = p._get_formatter()
        for a in p._actions:
            if not a.option_strings or isinstance(a, argparse._HelpAction) or a.required:
                continue
            if "default" not in fmt._expand_help(a):
                missing.append(f"{name} {a.option_strings[0]}")
    assert not missing, missing
    assert "{float32,bfloat16}" in sub.choices["train"].format_help()
    gen = sub.choices["generate"].format_help()
    assert "(default: 0.8)" in gen and "(default: 200)" in gen


def test_compile_cache_dir_resolution(tmp_path, monkeypatch):
    from xlstm_eqx.core.compile_cache import CACHE_ENV, compile_cache_dir

    monkeypatch.delenv(CACHE_ENV, raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert compile_cache_dir() == str(tmp_path / "home" / ".cache" / "xlstm_eqx" / "jax")
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "c"))
    assert compile_cache_dir() == str(tmp_path / "c")
    assert compile_cache_dir(str(tmp_path / "flag")) == str(tmp_path / "flag")
    assert compile_cache_dir("off") is None
    monkeypatch.setenv(CACHE_ENV, "off")
    assert compile_cache_dir() is None


# --- generation: constant memory, a bound on the count ------------------------------------------


@pytest.mark.slow
def test_stream_generate_holds_no_per_token_buffers():
    import jax
    import jax.random as jr

    from tests.test_generation import random_prompt, tiny_model
    from xlstm_eqx.generation import MAX_NEW_TOKENS, stream_generate

    model = tiny_model("mlstm")
    stream = stream_generate(model, random_prompt(), 3, temperature=1.0, key=jr.key(0))
    list(stream)  # compile first
    before = sum(x.nbytes for x in jax.live_arrays())
    stream = stream_generate(model, random_prompt(), MAX_NEW_TOKENS, temperature=1.0, key=jr.key(0))
    first = [next(stream) for _ in range(3)]
    grown = sum(x.nbytes for x in jax.live_arrays()) - before
    assert grown < 1_000_000, f"{grown:,} bytes held for a {MAX_NEW_TOKENS:,}-token stream"
    assert all(t.shape == (2,) for t in first)
    with pytest.raises(ValueError, match="max_new_tokens must be <= 10,000,000"):
        stream_generate(model, random_prompt(), MAX_NEW_TOKENS + 1, key=jr.key(0))


# --- presets: one set of names, listed with their sizes ------------------------------------------


def test_list_presets_shows_parameter_counts(capsys):
    import equinox as eqx
    import jax.random as jr

    from xlstm_eqx.cli import main
    from xlstm_eqx.core.params import count_params
    from xlstm_eqx.models import MODEL_FAMILIES
    from xlstm_eqx.presets import get_preset, tiny_xlstm

    assert main(["info", "--list-presets"]) == 0
    listing = capsys.readouterr().out
    n = count_params(
        eqx.filter_eval_shape(MODEL_FAMILIES["xlstm"].build, tiny_xlstm(), key=jr.key(0))
    )
    assert re.search(rf"tiny_xlstm \(tiny\)\s+{n:,} parameters", listing), listing
    assert re.search(r"llama7B\s+[\d,]+ parameters \(6\.\d\dB\)", listing), listing
    # every name a family's CLI knows, get_preset knows too, as the same config
    for kind in ("xlstm", "llama"):
        for name, fn in MODEL_FAMILIES[kind].presets().items():
            assert get_preset(name, kind) == fn(), (kind, name)
    assert get_preset("tiny_slstm") == get_preset("tiny_xlstm_slstm")
    with pytest.raises(ValueError, match="unknown preset 'huge'.*tiny_slstm"):
        get_preset("huge")


# --- the newcomer's path: runs that would do nothing, unrelated --out, --mesh early ---------------


def test_resume_that_would_do_nothing_is_an_error(tmp_path, data_file):
    cfg = toy_config(tmp_path, data_file, steps=4, checkpoint_every=2)
    train(cfg, log=quiet)
    with pytest.raises(ValueError, match="already at step 4.*--steps greater than 4"):
        train(dataclasses.replace(cfg, resume=True, steps=3), log=quiet)
    with pytest.raises(ValueError, match="already at step 4"):
        train(dataclasses.replace(cfg, resume=True, steps=4), log=quiet)


def test_out_with_unrelated_files_is_refused(tmp_path, data_file):
    cfg = toy_config(tmp_path, data_file, steps=2)
    os.makedirs(cfg.out)
    (tmp_path / "run" / "thesis.tex").write_text("mine")
    with pytest.raises(FileExistsError, match=r"not a run's \(thesis.tex\)"):
        train(cfg, log=quiet)
    assert sorted(os.listdir(cfg.out)) == ["thesis.tex"]


def test_bad_mesh_fails_before_the_data_is_read(tmp_path, data_file, monkeypatch):
    from xlstm_eqx.training import prepare

    def no_reading(*a, **k):
        raise AssertionError("the corpus was loaded before the mesh was checked")

    monkeypatch.setattr(prepare, "load_corpus_all_processes", no_reading)
    for mesh, match in [("fsdp=3", "multiply to 3"), ("dp=2,bogus=2", "bogus")]:
        cfg = toy_config(tmp_path, data_file, mesh=mesh)
        with pytest.raises(ValueError, match=match):
            train(cfg, log=quiet)
        assert not os.path.exists(cfg.out)


def test_info_mesh_checks_heads_and_shows_the_mesh_config(capsys):
    from xlstm_eqx.cli import main

    assert main(["info", "--preset", "tiny", "--mesh", "fsdp=8,tp=3"]) == 2
    assert "tensor-parallel size 3 does not divide" in _one_error_line(capsys)
    assert main(["info", "--preset", "tiny", "--mesh", "fsdp=2,tp=2"]) == 0
    text = capsys.readouterr().out
    assert "  parallel.fsdp_axis_size = 2" in text and "  parallel.model_axis_size = 2" in text
    assert "gradients and activations" in text


# --- --max-data-bytes bounds what is read and kept ---------------------------------------------


def test_max_data_bytes_bounds_reading_and_the_crossing_document(tmp_path):
    from xlstm_eqx.data.corpus import load_corpus, read_documents
    from xlstm_eqx.data.tokenizer import load_tokenizer

    big = tmp_path / "big.txt"
    # 200 kB of text, then bytes that are not UTF-8: with a cap they are never read
    big.write_bytes(("é" + "x" * 98 + "\n").encode() * 2000 + b"\xff\xfe" * 10)
    docs = read_documents([str(big)], max_bytes=1001)
    assert sum(len(d.encode()) for d in docs) <= 1001
    with pytest.raises(ValueError, match="not UTF-8"):
        read_documents([str(big)])
    corpus = load_corpus([str(big)], load_tokenizer("bytes"), max_bytes=1000)
    assert len(corpus.train) + len(corpus.heldout) <= 1000

    jl = tmp_path / "docs.jsonl"
    jl.write_text("".join(json.dumps({"text": "é" * 300}) + "\n" for _ in range(5)))
    docs = read_documents([str(jl)], max_bytes=1001)
    assert [len(d.encode()) for d in docs] == [600, 400]  # the crossing document is cut
    deep = tmp_path / "deep.jsonl"
    deep.write_text("[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(ValueError, match="deep.jsonl:1: JSON nested too deeply"):
        read_documents([str(deep)])
