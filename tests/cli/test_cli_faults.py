"""The command line under bad input and planted files, as a user types it (relative paths from
another working directory): one error line naming the flag or file, nothing followed through a
symbolic link, `convert` never overwriting a run, an exported byte-tokenizer model that
`generate --hf` can run, and the lines a run prints (compiling, the files it wrote)."""

import contextlib
import glob
import io
import json
import os
import shutil
import subprocess
import sys
from importlib.metadata import version

import pytest

from tests.cli.test_cli import FAST, TEXT
from xlstm_eqx.cli import convert_main, main
from xlstm_eqx.training import run_lock


RUN = os.path.join("runs", "mine")
RESUME = ["train", "--out", RUN, "--resume", "--steps", "3", "--no-progress"]


def _err_line(capsys) -> str:
    """The one error line a failed command printed (and nothing else)."""
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A working directory holding `code.py` and a 2-step tiny run `runs/mine` (made with
    relative paths), and what the run printed."""
    base = tmp_path_factory.mktemp("work")
    (base / "code.py").write_text(TEXT)
    args = ["train", "--preset", "tiny", "--data", "code.py", "--out", RUN, "--steps", "2"]
    args += ["--checkpoint-every", "1", "--eval-every", "2", "--profile-steps", "2:2", *FAST]
    args += ["--sample-tokens", "4"]  # the sample comes before the last line, `wrote …`
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(printed):
        mp.chdir(base)
        assert main(args) == 0
    return base, printed.getvalue()


@pytest.fixture
def work(trained, monkeypatch):
    """The trained working directory as the current directory (not a copy: `--resume` checks
    the data by where it is). A test puts back what it changes there."""
    monkeypatch.chdir(trained[0])
    return trained[0]


@pytest.mark.slow
def test_train_prints_compiling_profile_and_the_files_it_wrote(trained):
    base, printed = trained
    lines = printed.splitlines()
    compiling = lines.index("compiling the train step…")
    assert lines[compiling + 1].startswith("compiled in ") and lines[compiling + 1].endswith(" s")
    trace = os.path.join(RUN, "profile")
    assert f"wrote the profile trace of steps 2:2 to {trace}" in lines
    assert glob.glob(str(base / trace / "**" / "*.xplane.pb"), recursive=True)
    (ckpt,) = [os.path.relpath(p, base) for p in glob.glob(str(base / RUN / "checkpoints" / "*2"))]
    files = ["metrics.jsonl", "loss.png", "summary.json"]
    wrote = "wrote " + ", ".join([*(os.path.join(RUN, f) for f in files), ckpt])
    assert lines[-1] == wrote, printed  # the last line, after the sample
    assert any(line.startswith("sample (temperature") for line in lines[:-1]), printed
    for f in files:
        assert (base / RUN / f).is_file()


def test_float_flags_and_mesh_are_validated_before_anything_is_written(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    cases = [
        (["--lr", "inf"], "--lr", "inf"),
        (["--lr", "0"], "--lr", "0.0"),
        (["--weight-decay", "nan"], "--weight-decay", "nan"),
        (["--beta1", "nan"], "--beta1", "nan"),
        (["--beta2", "2"], "--beta2", "2.0"),
        (["--adam-eps", "-1"], "--adam-eps", "-1.0"),
        (["--grad-clip", "inf"], "--grad-clip", "inf"),
        (["--sample-temperature", "inf"], "--sample-temperature", "inf"),
        (["--min-lr-ratio", "nan"], "--min-lr-ratio", "nan"),
        (["--mesh", "dp=1,,tp=1"], "--mesh", "'dp=1,,tp=1'"),
        (["--batch-size", "1000000000"], "--batch-size", "1000000000"),
        (["--steps", "4", "--profile-steps", "2:99"], "--profile-steps", "--steps 4"),
        (["--preset", "tiny", "--seq-len", "128"], "seq_len=128", "context_length=64"),
    ]
    for flags, flag, shown in cases:
        assert main(["train", *flags, "--out", "r"]) == 2, flags
        err = _err_line(capsys)
        assert err.startswith("xlstm-eqx train: error: ") and flag in err and shown in err, err
    assert os.listdir(tmp_path) == []  # no run directory, no config.json.tmp-*

    # choices are the parser's: listed in the help, a bad one names the flag at once
    for flag, bad in (("--optimizer", "sgd"), ("--schedule", "cosin")):
        with pytest.raises(SystemExit) as e:
            main(["train", flag, bad])
        assert e.value.code == 2
        assert f"argument {flag}: invalid choice: '{bad}'" in capsys.readouterr().err


def test_help_shows_one_default_per_flag_choices_gpu_and_version(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--out OUT", "--warmup-steps WARMUP_STEPS", "--data-cache DATA_CACHE"):
        entry = text.split(flag, 2)[-1].split(" --", 1)[0]
        assert entry.count("default") == 1, entry
    entry = text.split("--mesh MESH", 2)[-1].split(" --", 1)[0]
    assert entry.count("default") == 1, entry
    assert "--optimizer {adamw,lion,adafactor,ademamix}" in text
    assert "--schedule {cosine,wsd,linear,constant}" in text
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    bench = capsys.readouterr().out
    assert "or gpu (check" in " ".join(bench.split())
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"xlstm-eqx {version('xlstm_eqx')}"


def test_lock_symlink_is_refused_and_its_target_untouched(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "victim.txt").write_text("precious\n")
    os.makedirs(RUN)
    lock = os.path.join(RUN, ".lock")
    os.symlink(os.path.join("..", "..", "victim.txt"), lock)
    train = ["train", "--preset", "tiny", "--out", RUN, *FAST]
    assert main(train) == 2
    err = _err_line(capsys)
    assert repr(lock) in err and "symbolic link" in err
    assert (tmp_path / "victim.txt").read_text() == "precious\n"
    assert os.path.islink(lock)
    # a dangling link: its target is not created either, also where flock is not available
    os.remove(lock)
    os.symlink(os.path.join("..", "..", "ghost.txt"), lock)
    assert main(train) == 2
    assert "symbolic link" in _err_line(capsys)
    monkeypatch.setattr(run_lock, "_flock", lambda out, path: None)
    assert main(train) == 2
    assert "symbolic link" in _err_line(capsys)
    assert not (tmp_path / "ghost.txt").exists()


def test_resume_refuses_planted_and_damaged_run_files(work, capsys):
    victim = work / "victim.txt"
    victim.write_text("precious\n")
    metrics = work / RUN / "metrics.jsonl"
    good = metrics.read_bytes()
    config = (work / RUN / "config.json").read_bytes()
    rows = good.splitlines(keepends=True)
    assert len(rows) == 2

    # metrics.jsonl as a link: refused, the target untouched
    metrics.unlink()
    metrics.symlink_to(victim)
    assert main(RESUME) == 2
    err = _err_line(capsys)
    assert "metrics.jsonl" in err and "symbolic link" in err
    assert victim.read_text() == "precious\n"
    metrics.unlink()

    # a row that is not an object, and a lone surrogate, each named by file and line
    for bad in (b"5\n", b'{"step": 1, "note": "\xed\xa0\x80"}\n'):
        metrics.write_bytes(rows[0] + bad + rows[1])
        assert main(RESUME) == 2
        err = _err_line(capsys)
        assert "metrics.jsonl: line 2 is not a metrics row" in err, err

    # trackers.json: not a mapping, or cut short
    metrics.write_bytes(good)
    state = work / RUN / "trackers.json"
    for text, why in (("[]", "must hold a mapping, got list"), ('{"wandb_id": ', "line 1")):
        state.write_text(text)
        assert main(RESUME) == 2
        err = _err_line(capsys)
        assert "tracker state" in err and os.path.join(RUN, "trackers.json") in err and why in err
    state.unlink()
    victim.unlink()
    (work / RUN / "config.json").write_bytes(config)  # the resumes recorded --steps 3
    assert not glob.glob(str(work / RUN / "*.tmp*"))


@pytest.mark.slow
def test_converted_byte_model_generates_and_convert_never_overwrites(work, capsys):
    hf = os.path.join("runs", "mine-hf")
    assert main(["convert", "--from", "eqx", "--to", "hf", RUN, hf]) == 0
    capsys.readouterr()
    assert json.loads((work / hf / "xlstm_eqx_tokenizer.json").read_text()) == {"kind": "bytes"}
    gen = ["--prompt", "def ", "--max-new-tokens", "6", "--temperature", "0"]
    assert main(["generate", "--out", RUN, *gen]) == 0
    expected = capsys.readouterr().out
    assert main(["generate", "--hf", hf, *gen]) == 0
    assert capsys.readouterr().out == expected
    assert main(["generate", "--hf", hf, "--tokenizer", "bytes", *gen]) == 0
    assert capsys.readouterr().out == expected
    # back to a run: it records the byte tokenizer, so generate needs no --tokenizer
    back = os.path.join("runs", "back")
    assert main(["convert", "--from", "hf", "--to", "eqx", hf, back]) == 0
    capsys.readouterr()
    assert main(["generate", "--out", back, *gen]) == 0
    assert capsys.readouterr().out == expected

    # a non-empty target is refused (a run's config.json stays as it is) unless --force
    config = (work / RUN / "config.json").read_bytes()
    assert main(["convert", "--from", "hf", "--to", "eqx", hf, RUN]) == 2
    err = _err_line(capsys)
    assert "not empty" in err and "--force" in err and repr(RUN) in err
    assert main(["convert", "--from", "eqx", "--to", "hf", RUN, hf]) == 2
    assert "not empty" in _err_line(capsys)
    assert convert_main(["--from", "eqx", "--to", "hf", RUN, hf]) == 2  # the Python entry point
    assert "not empty" in _err_line(capsys)
    assert main(["convert", "--from", "eqx", "--to", "hf", RUN, hf, "--force"]) == 0
    capsys.readouterr()
    # the input's own directory: never, even with --force
    for argv in (["eqx", RUN, RUN], ["eqx", RUN, "runs"], ["hf", RUN, RUN]):
        fmt, src, dst = argv
        assert main(["convert", "--from", "eqx", "--to", fmt, src, dst, "--force"]) == 2
        assert "would overwrite the input" in _err_line(capsys)
    assert (work / RUN / "config.json").read_bytes() == config
    shutil.rmtree(work / hf)
    shutil.rmtree(work / back)


@pytest.mark.slow
def test_eval_tasks_unknown_or_unreadable_is_one_line(work, capsys):
    pytest.importorskip("lm_eval")
    os.makedirs("tasks")
    with open(os.path.join("tasks", "broken.yaml"), "w") as f:
        f.write("task: mine\ndataset_path: json\n  data_files: [\n")
    args = ["eval", "--out", RUN, "--tasks", "mine", "--include-path", "tasks"]
    assert main(args) == 2
    err = _err_line(capsys)
    assert "'mine'" in err and os.path.join("tasks", "broken.yaml") in err and "line 3" in err
    assert main(["eval", "--out", RUN, "--tasks", "no_such_task"]) == 2
    err = _err_line(capsys)
    assert "'no_such_task' is not a task, group or tag of lm-eval" in err
    shutil.rmtree("tasks")


@pytest.mark.slow
def test_wandb_prints_no_summary_after_the_runs_last_lines(tmp_path):
    """A subprocess: W&B prints only outside pytest (its output goes through its own process)."""
    pytest.importorskip("wandb")
    (tmp_path / "code.py").write_text(TEXT)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "PYTEST_"))}
    env["WANDB_MODE"] = "offline"
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        env[name] = str(tmp_path / "wandb-home")
    args = ["train", "--preset", "tiny", "--data", "code.py", "--out", "r", "--steps", "2"]
    args += ["--tracker", "wandb", *FAST]
    proc = subprocess.run(
        [sys.executable, "-m", "xlstm_eqx.cli", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    # its header (where the offline run is) comes at the start; no summary after our lines
    printed = proc.stdout + proc.stderr
    assert "Run summary" not in printed and "wandb sync" not in printed, printed
    assert proc.stdout.splitlines()[-1].startswith("wrote r/metrics.jsonl")
    assert proc.stdout.splitlines()[-1].endswith(os.path.join("r", "wandb"))


def test_atomic_writes_never_follow_a_planted_link(tmp_path):
    """The run's JSON files and exported safetensors: links at the file and at the temporary
    names the writers used to use (`NAME.tmp-<pid>`, `NAME.tmp`) are replaced, never followed;
    a failed write leaves no temporary file."""
    import numpy as np

    from xlstm_eqx.core.files import write_json_atomic
    from xlstm_eqx.interop.safetensors_files import save_file

    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    summary = tmp_path / "summary.json"
    tensors = tmp_path / "model.safetensors"
    for planted in (summary, tensors, f"{summary}.tmp-{os.getpid()}", f"{tensors}.tmp"):
        os.symlink(victim, planted)
    write_json_atomic(str(summary), {"step": 1})
    save_file([("w", np.ones(3, np.float32))], str(tensors))
    assert victim.read_text() == "precious\n"
    assert json.loads(summary.read_text()) == {"step": 1} and not summary.is_symlink()
    assert not tensors.is_symlink() and tensors.stat().st_size > 12
    with pytest.raises(ValueError, match="summary.json"):
        write_json_atomic(str(summary), {"lr": float("inf")})
    assert json.loads(summary.read_text()) == {"step": 1}
    assert (
        sorted(p.name for p in tmp_path.iterdir() if ".tmp" in p.name and not p.is_symlink()) == []
    )


def test_seq_len_default_is_at_most_the_models_context():
    """Not given (by flag, config file or saved run): min(128, context_length); recorded as
    resolved in the TrainConfig that config.json is written from."""
    from xlstm_eqx.cli import build_parser, resolve_train_config

    def resolved(*flags):
        return resolve_train_config(build_parser().parse_args(["train", *flags])).seq_len

    assert resolved("--preset", "tiny") == 64
    assert resolved("--preset", "small") == 128
    assert resolved("--preset", "tiny", "--seq-len", "16") == 16


def _word_tokenizer(path, size):
    """A tokenizer.json of `size` ids (a word-level vocabulary), written to `path`."""
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, size)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(path))
    return str(path)


def test_tokenizer_override_in_eval_and_generate(work, capsys):
    """`--tokenizer`: the run's own (bytes here) is accepted, another is refused for the held-out
    split; generate refuses one that cannot decode the model's ids before sampling, and warns
    about any other; a converted run names --data for eval and works with it."""
    small = _word_tokenizer(work / "small.json", 50)
    big = _word_tokenizer(work / "big.json", 300)
    assert main(["eval", "--out", RUN, "--tokenizer", "bytes", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["unigram_bits_per_byte"] is not None
    assert main(["eval", "--out", RUN, "--tokenizer", "big.json"]) == 2
    err = _err_line(capsys)
    assert "--tokenizer 'big.json' is not the tokenizer" in err and repr(RUN) in err, err

    gen = ["generate", "--out", RUN, "--max-new-tokens", "3", "--temperature", "0"]
    assert main([*gen, "--tokenizer", "small.json", "--prompt", "w1"]) == 2
    err = _err_line(capsys)
    assert "decodes 50 token ids" in err and "emits ids up to 255" in err, err
    assert main([*gen, "--tokenizer", "big.json", "--prompt", "w1"]) == 0
    printed = capsys.readouterr()
    assert printed.out.startswith("w1")
    assert printed.err.count("\n") == 1 and "warning: --tokenizer 'big.json' is not" in printed.err

    # a converted run records no training data: one line naming --data; with it, a score
    hf, back = os.path.join("runs", "f1-hf"), os.path.join("runs", "f1-back")
    assert main(["convert", "--from", "eqx", "--to", "hf", RUN, hf]) == 0
    assert main(["convert", "--from", "hf", "--to", "eqx", hf, back]) == 0
    capsys.readouterr()
    assert main(["eval", "--out", back]) == 2
    err = _err_line(capsys)
    assert f"run {back!r} records no training data (converted from hf); pass --data" in err
    assert main(["eval", "--out", back, "--data", "code.py", "--eval-batches", "1"]) == 0
    out = capsys.readouterr().out
    assert "nats/token" in out and "tokens read of --data" in out, out
    shutil.rmtree(work / hf)
    shutil.rmtree(work / back)
    os.remove(small)
    os.remove(big)


def test_a_moved_tokenizer_is_recognised_by_its_hash(tmp_path):
    """A copy of the run's tokenizer.json (same sha256) is the run's own; another file is not."""
    from xlstm_eqx.training.evaluate import run_tokenizer

    own = _word_tokenizer(tmp_path / "tok.json", 300)
    other = _word_tokenizer(tmp_path / "other.json", 301)
    shutil.copy(own, tmp_path / "copy.json")
    from xlstm_eqx.data.tokenizer import load_tokenizer

    recorded = load_tokenizer(own).to_dict()
    os.remove(own)  # moved away: the recorded path is gone
    run = {"tokenizer": recorded}
    with pytest.raises(FileNotFoundError):
        run_tokenizer(run, None, "run 'r'")
    tok, is_own = run_tokenizer(run, str(tmp_path / "copy.json"), "run 'r'")
    assert is_own and tok.vocab_size == 300
    assert run_tokenizer(run, other, "run 'r'")[1] is False
    assert run_tokenizer(run, "bytes", "run 'r'")[1] is False


def test_closed_stdout_stops_printing_not_the_command(work):
    """`generate … | head -c 2` through a real pipe: exit 0, no traceback. train's log goes on
    (silently) when stdout is closed: the run's files are its product."""
    cmd = [sys.executable, "-m", "xlstm_eqx.cli", "generate", "--out", RUN]
    proc = subprocess.Popen(
        [*cmd, "--max-new-tokens", "50"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout.read(2) == b"de"  # the prompt, written before the first token
    proc.stdout.close()
    with proc.stderr:
        err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 0, err
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_train_log_survives_a_closed_stdout(monkeypatch):
    import inspect

    from xlstm_eqx.core import console
    from xlstm_eqx.training.loop import train

    assert inspect.signature(train).parameters["log"].default is console.print_line

    class Closed(io.StringIO):
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", Closed())
    console.print_line("step 1")  # no error: stdout now goes nowhere
    console.print_line("step 2")
    assert not isinstance(sys.stdout, Closed)
    sys.stdout.close()  # the os.devnull it opened (monkeypatch puts the real stdout back)
