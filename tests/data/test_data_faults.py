"""Faults of the data path, through the CLI as a user types it: globs through symbolic-link loops,
FIFOs and devices as data, `eval` reading the run's own files and tokenizer from any directory,
and damaged token stores (rebuilt with a warning naming them, or named in a one-line error)."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests.cli.test_cli import FAST
from tests.data.test_store import DOCS, bpe  # noqa: F401  (the BPE tokenizer fixture)
from xlstm_eqx.cli import main
from xlstm_eqx.data import ByteTokenizer, load_corpus
from xlstm_eqx.data.store import clean_stale_temporaries


def _loop_tree(root):
    """Six text files under `root`, with `sub/up -> ..` (and `sub/up2 -> ../..` if asked): each
    file reachable through endlessly many paths."""
    (root / "sub").mkdir(parents=True)
    for i, doc in enumerate(DOCS):
        folder = root / "sub" if i % 2 else root
        (folder / f"{i}.txt").write_text(doc * 4, encoding="utf-8")
    os.symlink("..", root / "sub" / "up")


# Run in a child with a time limit: before the fix, a FIFO hangs and /dev/zero never ends.
_SCRIPT = """
import contextlib, io, json, sys
from xlstm_eqx.cli import main
for args in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(args)
    print("@@" + json.dumps([rc, err.getvalue()]), flush=True)
"""


def _cli_in_child(cwd, runs, timeout=240):
    try:
        done = subprocess.run(
            [sys.executable, "-c", _SCRIPT, json.dumps(runs)],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else e.stdout or ""
        pytest.fail(f"hung after {out.count('@@')} of {len(runs)} commands: {out}")
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line[2:]) for line in done.stdout.splitlines() if line.startswith("@@")]


def _err(capsys):
    return capsys.readouterr().err.strip()


@pytest.mark.slow
def test_eval_uses_the_runs_files_and_tokenizer_from_anywhere(tmp_path, monkeypatch, capsys, bpe):  # noqa: F811
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    elsewhere.mkdir()
    _loop_tree(work / "data")
    shutil.copyfile(bpe[0], work / "tok.json")
    monkeypatch.chdir(work)
    run = ["--out", "runs/r"]
    args = ["train", "--data", "data/**/*.txt", "--tokenizer", "tok.json", *run, *FAST]
    assert main([*args, "--preset", "tiny", "--steps", "2", "--eval-every", "2"]) == 0
    with open("runs/r/config.json") as f:
        data = json.load(f)["data"]
    # The loop adds no copies: each real file is one document (none both trained and held out).
    assert len(data["identity"]["files"]) == len(DOCS) == data["num_documents"]
    assert data["paths"] == [os.path.join(str(work), "data/**/*.txt")]

    # eval from another directory: the run's files (recorded absolute), not the cwd's.
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert main(["eval", "--out", "../work/runs/r"]) == 0
    line = capsys.readouterr().out.strip()
    held = data["heldout_tokens"]
    assert f"over 32 of {held:,} held-out tokens (1 batches × 2 × 16" in line, line

    # eval --data reads only the start it scores: bytes far past it are never decoded.
    big = elsewhere / "big.txt"
    big.write_bytes(b"plain text. " * (300 << 10) + b"\xff")
    assert main(["eval", "--out", "../work/runs/r", "--data", "big.txt"]) == 0, _err(capsys)
    assert "of --data" in capsys.readouterr().out

    # FIFOs and devices: one line naming them, at once; a glob through two loops ends.
    monkeypatch.chdir(work)
    os.mkfifo("fifo")
    _loop_tree(work / "two")
    os.symlink("../..", work / "two" / "sub" / "up2")
    os.mkfifo(work / "two" / "fifo.txt")  # among a glob's matches: skipped with a warning
    os.symlink("/dev/zero", work / "two" / "zero.txt")
    bad = [
        ["train", "--data", "fifo", "--out", "runs/f", *FAST],
        ["train", "--data", "/dev/zero", "--out", "runs/z", *FAST],
        ["eval", *run, "--data", "fifo"],
        ["eval", *run, "--data", "/dev/zero"],
        ["eval", *run, "--data", "two/**/*.txt"],
        ["eval", *run, "--data", "two/f*.txt"],
    ]
    results = _cli_in_child(work, bad)
    for (rc, err), path in zip(results[:4], ["fifo", "/dev/zero"] * 2, strict=True):
        assert rc == 2 and err.count("\n") == 1, err
        assert f"data path {path!r} is not a regular file" in err, err
    assert results[4][0] == 0, results[4][1]
    warned = "warning: --data 'two/**/*.txt': skipped 2 entries that are not regular files "
    assert results[4][1] == warned + "(first: 'two/fifo.txt')\n", results[4][1]
    rc, err = results[5]  # only special files match: one error line, nothing read
    assert rc == 2 and err.count("\n") == 1, err
    assert "'two/f*.txt' matches no regular files, only 1 entry that is not a regular file " in err
    assert not os.path.exists("runs/f") and not os.path.exists("runs/z")

    # A same-size edit with the modification time put back: the store is rebuilt (with a
    # warning naming it) and --resume refuses the other data; eval too.
    victim = work / "data" / "0.txt"
    original = victim.read_bytes()
    stamp = os.stat(victim)
    victim.write_bytes(original.upper())
    os.utime(victim, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    capsys.readouterr()
    assert main([*args, "--resume", "--steps", "3"]) == 2
    err = _err(capsys).splitlines()
    assert err[0].startswith("warning: token store") and "0.txt" in err[0], err
    assert "rebuilding it" in err[0] and len(err) == 2, err
    assert "the data is not what the run was trained on" in err[1], err
    assert main(["eval", *run]) == 2
    assert "not what the run was trained on" in _err(capsys)
    victim.write_bytes(original)
    os.utime(victim, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    # a deleted index.json: rebuilt with a warning, and eval goes on
    store = data["store"]
    capsys.readouterr()
    assert main(["eval", *run]) == 0  # (rebuilds the edited store back: another warning)
    os.remove(os.path.join(store, "index.json"))
    capsys.readouterr()
    assert main(["eval", *run]) == 0
    err = _err(capsys)
    assert f"token store {store!r} is damaged (no index.json); rebuilding it" in err, err

    # A replaced tokenizer.json is refused by eval and generate, naming it.
    with open("tok.json", "a") as f:
        f.write("\n")
    for cmd in (["eval", *run], ["generate", *run, "--prompt", "a"]):
        assert main(cmd) == 2
        err = _err(capsys)
        assert "tok.json' is not the one the run was made with" in err and "\n" not in err, err


def _dead_pid():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_damaged_token_stores_are_rebuilt_with_a_warning(tmp_path, capsys):
    files = []
    for i, doc in enumerate(DOCS):
        path = tmp_path / "d" / f"{i}.txt"
        path.parent.mkdir(exist_ok=True)
        path.write_text(doc * 3, encoding="utf-8")
        files.append(str(path))
    cache = tmp_path / "cache"
    kw = dict(eval_fraction=0.34, cache_dir=str(cache))
    first = load_corpus(files, ByteTokenizer(), **kw)
    want = (first.train.tolist(), first.heldout.tolist())
    store = first.store_dir
    held = os.path.join(store, "heldout.bin")

    def damage_then_load(damage, what):
        damage()
        capsys.readouterr()
        again = load_corpus(files, ByteTokenizer(), **kw)
        err = capsys.readouterr().err
        assert err == f"warning: token store {store!r} is damaged ({what}); rebuilding it\n"
        assert (again.train.tolist(), again.heldout.tolist()) == want
        assert sorted(os.listdir(cache)) == [os.path.basename(store)]  # nothing left aside

    damage_then_load(lambda: os.remove(os.path.join(store, "index.json")), "no index.json")
    size = os.path.getsize(held)
    damage_then_load(
        lambda: os.truncate(held, size - 2),
        f"heldout.bin holds {size - 2} bytes, its index says {size}",
    )
    # the same size, token ids past the vocabulary
    damage_then_load(
        lambda: np.full(size // 2, 65535, np.uint16).tofile(held),
        f"heldout.bin: bytes 0..{size} changed",
    )

    # Temporary folders of dead builds are removed; a live builder's is not.
    key = os.path.basename(store)
    host = __import__("socket").gethostname().replace("-", "_")
    dead = cache / f"{key}.tmp-{host}-{_dead_pid()}-x1"
    live = cache / f"{key}.tmp-{host}-{os.getpid()}-x2"
    old = cache / f"{key}.tmp-unknown"
    for d in (dead, live, old):
        d.mkdir()
        (d / "train.bin").write_bytes(b"\0" * 10)
    os.utime(old, (1, 1))
    load_corpus(files, ByteTokenizer(), **kw)
    assert sorted(os.listdir(cache)) == sorted([key, live.name])
    assert clean_stale_temporaries(str(cache)) == []


@pytest.mark.slow
def test_a_large_corpus_is_tokenized_in_a_child_process(tmp_path, monkeypatch, bpe):  # noqa: F811
    """The build's memory is freed before the run compiles: above `_CHILD_BYTES` the store is
    built by another process (the parent's `build_store` is never called), with the same tokens
    and the same one-line errors."""
    from xlstm_eqx.data import load_tokenizer, store

    files = []
    for i, doc in enumerate(DOCS):
        files.append(str(tmp_path / f"{i}.txt"))
        with open(files[-1], "w", encoding="utf-8") as f:
            f.write(doc * 3)
    tok = load_tokenizer(bpe[0])
    want = load_corpus(files, tok, eval_fraction=0.34, cache_dir=str(tmp_path / "a"))

    def not_here(*args, **kwargs):
        raise AssertionError("the store was built in the parent process")

    monkeypatch.setattr(store, "_CHILD_BYTES", 1)
    monkeypatch.setattr(store, "build_store", not_here)
    got = load_corpus(files, tok, eval_fraction=0.34, cache_dir=str(tmp_path / "b"))
    assert got.train.tolist() == want.train.tolist()
    assert got.heldout.tolist() == want.heldout.tolist()
    with open(files[2], "ab") as f:
        f.write(b"\xff")
    with pytest.raises(ValueError, match=r"2\.txt' is not UTF-8 text"):
        load_corpus(files, tok, eval_fraction=0.34, cache_dir=str(tmp_path / "b"))


def test_the_child_build_protocol_in_process(tmp_path, monkeypatch):
    """The fast counterpart of the test above: `build_in_child`'s job on stdin and its result
    line on stdout, with `python -m xlstm_eqx.data.build_child` run inside this process; the
    same tokens as a build in the parent and the same one-line error."""
    import io
    import runpy
    import warnings

    from xlstm_eqx.data import build_child, store

    children = []

    def run_here(argv, *, input, stdout, text, check):
        assert argv[1:] == ["-m", "xlstm_eqx.data.build_child"] and text and not check
        children.append(json.loads(input)["directory"])
        out = io.StringIO()
        with monkeypatch.context() as patch, warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # runpy: the module is imported
            patch.setattr(sys, "stdin", io.StringIO(input))
            patch.setattr(sys, "stdout", out)
            try:
                runpy.run_module("xlstm_eqx.data.build_child", run_name="__main__")
            except SystemExit as e:
                return subprocess.CompletedProcess(argv, e.code, out.getvalue())
        raise AssertionError("the child did not exit")

    files = []
    for i, doc in enumerate(DOCS):
        files.append(str(tmp_path / f"{i}.txt"))
        with open(files[-1], "w", encoding="utf-8") as f:
            f.write(doc)
    want = load_corpus(files, ByteTokenizer(), eval_fraction=0.34, cache_dir=str(tmp_path / "a"))
    monkeypatch.setattr(store, "_CHILD_BYTES", 1)
    monkeypatch.setattr(build_child.subprocess, "run", run_here)
    got = load_corpus(files, ByteTokenizer(), eval_fraction=0.34, cache_dir=str(tmp_path / "b"))
    assert got.train.tolist() == want.train.tolist()
    assert got.heldout.tolist() == want.heldout.tolist()
    with open(files[2], "ab") as f:
        f.write(b"\xff")
    with pytest.raises(ValueError, match=r"2\.txt' is not UTF-8 text"):
        load_corpus(files, ByteTokenizer(), eval_fraction=0.34, cache_dir=str(tmp_path / "b"))
    assert len(children) == 2
