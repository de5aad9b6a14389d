"""Checkpoints as a user meets them, through the CLI: relative run directories, a save that
fails (it must end the run at once, not hang), damaged shards (fall back to the newest intact
checkpoint with a warning, or one error line), and `eval` racing a live run's pruning."""

import contextlib
import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.cli.test_cli import FAST
from tests.corpus import write_corpus
from xlstm_eqx.cli import main
from xlstm_eqx.training import orbax_checkpoint


RUN = "runs/mine"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A scratch working directory holding `data/` and a 3-step run in `runs/mine` (checkpoints
    of steps 1, 2, 3), made with relative paths from that directory; tests copy it."""
    root = tmp_path_factory.mktemp("base")
    write_corpus(root / "data")
    args = ["train", "--preset", "tiny", "--data", "data/corpus.txt", "--out", RUN]
    with contextlib.chdir(root):
        assert main([*args, "--steps", "3", "--checkpoint-every", "1", *FAST]) == 0
    return root


@pytest.fixture
def work(base, tmp_path, monkeypatch):
    """A copy of the base directory as the working directory."""
    shutil.copytree(base, tmp_path, dirs_exist_ok=True)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _ckpt(step: int) -> str:
    return os.path.abspath(os.path.join(RUN, "checkpoints", f"step_{step:08d}"))


def _damage(ckpt: str, how: str) -> None:
    """Truncate, delete or flip one bit of the largest data file of the checkpoint's model."""
    shards = []
    for d, _, files in os.walk(os.path.join(ckpt, "model")):
        if os.path.basename(d) == "d" and "ocdbt.process_" in d:
            shards += [os.path.join(d, f) for f in files]
    shard = max(shards, key=os.path.getsize)
    if how == "truncated":
        os.truncate(shard, os.path.getsize(shard) // 2)
    elif how == "deleted":
        os.remove(shard)
    else:
        with open(shard, "r+b") as f:
            f.seek(os.path.getsize(shard) // 2)
            byte = f.read(1)[0]
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte ^ 0x10]))


def _edit_meta(ckpt: str, **changes) -> None:
    """Rewrite a checkpoint's meta/metadata with `changes` (None: the key removed)."""
    meta_file = os.path.join(ckpt, "meta", "metadata")
    with open(meta_file) as f:
        meta = json.load(f)
    for key, value in changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    with open(meta_file, "w") as f:
        json.dump(meta, f, indent=1)


@pytest.mark.slow
def test_relative_run_directory(work, capsys):
    """`--out runs/mine` as typed, from the run's parent directory: resume, eval, generate and
    convert all read the checkpoints the fixture's `train --out runs/mine` wrote; the checkpoint
    paths printed are as relative as --out; a run directory that does not exist is named."""
    assert main(["train", "--out", RUN, "--resume", "--steps", "4", "--no-progress"]) == 0
    relative = os.path.join(RUN, "checkpoints", "step_00000003")
    assert f"resumed from {relative} at step 3\n" in capsys.readouterr().out
    for cmd in (["eval"], ["generate", "--prompt", "a"]):
        assert main([*cmd, "--out", "runs/does-not-exist"]) == 2
        err = capsys.readouterr().err
        assert err.endswith(": error: no run in 'runs/does-not-exist' (no such directory)\n"), err
    assert main(["eval", "--out", RUN, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 4
    assert main(["generate", "--out", RUN, "--prompt", "a", "--max-new-tokens", "2"]) == 0
    assert capsys.readouterr().out.startswith("a")
    assert main(["convert", "--from", "eqx", "--to", "hf", RUN, "runs/mine-hf"]) == 0
    assert capsys.readouterr().out == f"converted eqx {RUN} (step 4) -> hf runs/mine-hf\n"
    assert os.path.isfile(work / "runs" / "mine-hf" / "config.json")


@pytest.mark.slow
def test_failed_save_exits_at_once(tmp_path, data_file):
    """A checkpoint directory nothing can be written to: the run ends non-zero within seconds
    with one line naming the checkpoint (it used to print the error and hang in orbax's threads).
    Root ignores permission bits, so as root `checkpoints` is a link into /sys, which root cannot
    write either."""
    out = tmp_path / "run"
    out.mkdir()
    ckpts = out / "checkpoints"
    if os.geteuid() == 0:
        assert os.path.isdir("/sys/kernel")
        ckpts.symlink_to("/sys/kernel", target_is_directory=True)
    else:
        ckpts.mkdir(mode=0o555)
    args = ["train", "--preset", "tiny", "--data", data_file, "--out", str(out), "--steps", "2"]
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "xlstm_eqx.cli", *args, *FAST],
            capture_output=True,
            text=True,
            timeout=120,
        )
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"the run hung after a failed save:\n{e.stderr}") from None
    finally:
        if not ckpts.is_symlink():
            ckpts.chmod(0o755)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    err = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(err) == 1, proc.stderr
    assert err[0].startswith("xlstm-eqx train: error: cannot save checkpoint ")
    assert repr(os.path.join(str(ckpts), "step_00000002")) in err[0]


@pytest.mark.slow
@pytest.mark.parametrize("how", ["truncated", "deleted", "flipped"])
def test_damaged_newest_checkpoint_falls_back(work, capsys, how):
    """eval, generate and train --resume skip the damaged newest checkpoint with one warning
    naming it and use the one before; a flipped bit is caught by the checksums recorded at save
    (it used to load silently)."""
    _damage(_ckpt(3), how)

    def one_warning(err: str) -> None:
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("warning: "), err
        assert repr(_ckpt(3)) in lines[0]

    assert main(["eval", "--out", RUN, "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["step"] == 2
    one_warning(captured.err)
    assert main(["generate", "--out", RUN, "--prompt", "a", "--max-new-tokens", "2"]) == 0
    one_warning(capsys.readouterr().err)

    assert main(["train", "--out", RUN, "--resume", "--steps", "4", "--no-progress"]) == 0
    captured = capsys.readouterr()
    one_warning(captured.err)
    assert f"resumed from {os.path.join(RUN, 'checkpoints', 'step_00000002')} at step 2" in (
        captured.out
    )
    # the damaged step 3 was moved aside and saved again; the run goes on to step 4
    steps = [s for s, _ in orbax_checkpoint.list_checkpoints(os.path.join(RUN, "checkpoints"))]
    assert steps == [2, 3, 4]
    assert main(["eval", "--out", RUN, "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["step"] == 4 and not captured.err


def test_damaged_metadata_falls_back(work, capsys):
    """A newest step directory that is empty, or whose meta/metadata is truncated or deleted:
    `convert` and `train --resume` skip it with a warning naming it, as eval does (resume used to
    stop, convert to export an older step without saying which). An edited metadata (a step
    changed) is damaged too: its recorded digest no longer matches, or without one, the step is
    not its directory's."""
    os.mkdir(_ckpt(9))
    with open(os.path.join(_ckpt(3), "meta", "metadata"), "r+") as f:
        f.truncate(40)
    assert main(["convert", "--from", "eqx", "--to", "hf", RUN, "runs/mine-hf"]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"converted eqx {RUN} (step 2) -> hf runs/mine-hf\n"
    warnings = captured.err.splitlines()
    assert [w[:9] for w in warnings] == ["warning: "] * 2, warnings
    assert repr(_ckpt(9)) in warnings[0] and "no meta/ item" in warnings[0]
    assert repr(_ckpt(3)) in warnings[1] and "cannot read meta/metadata" in warnings[1]

    shutil.rmtree(os.path.join(_ckpt(3), "meta"))
    assert main(["train", "--out", RUN, "--resume", "--steps", "4", "--no-progress"]) == 0
    captured = capsys.readouterr()
    warnings = captured.err.splitlines()
    assert len(warnings) == 2 and repr(_ckpt(3)) in warnings[1], warnings
    assert f"resumed from {os.path.join(RUN, 'checkpoints', 'step_00000002')} at step 2" in (
        captured.out
    )
    root = os.path.join(RUN, "checkpoints")
    assert [s for s, _ in orbax_checkpoint.list_checkpoints(root)] == [2, 3, 4]

    _edit_meta(_ckpt(4), step=5)
    assert main(["eval", "--out", RUN, "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["step"] == 3
    assert captured.err.startswith(f"warning: checkpoint {_ckpt(4)!r} is damaged: meta/metadata ")
    assert "does not match the checksum recorded in it" in captured.err
    _edit_meta(_ckpt(4), meta_sha256=None)
    with pytest.raises(orbax_checkpoint.CheckpointError, match="records step 5, not the direc"):
        orbax_checkpoint.load_metadata(_ckpt(4))
    _edit_meta(_ckpt(3))  # rewritten in another layout, content unchanged: still intact
    assert orbax_checkpoint.load_metadata(_ckpt(3))["step"] == 3


@pytest.mark.slow
def test_no_intact_checkpoint_is_one_error(work, capsys):
    """Every checkpoint damaged, or a damaged `--checkpoint` given: one error line naming the
    checkpoint, no traceback, no fallback for an explicit one."""
    _damage(_ckpt(2), "flipped")
    assert main(["eval", "--out", RUN, "--checkpoint", _ckpt(2)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("xlstm-eqx eval: error: ")
    assert repr(_ckpt(2)) in err and "damaged" in err

    _damage(_ckpt(1), "truncated")
    _damage(_ckpt(3), "deleted")
    commands = [
        ["eval", "--out", RUN],
        ["generate", "--out", RUN, "--prompt", "a", "--max-new-tokens", "2"],
        ["train", "--out", RUN, "--resume", "--steps", "4", "--no-progress"],
    ]
    for args in commands:
        assert main(args) == 2
        lines = capsys.readouterr().err.splitlines()
        # a warning for each fallback tried (none for the oldest), then one line saying so
        assert [line[:8] for line in lines] == ["warning:"] * 2 + ["xlstm-eq"], lines
        assert "trying the next older" in lines[1] and repr(_ckpt(2)) in lines[1]
        assert lines[-1].startswith(f"xlstm-eqx {args[0]}: error: no intact checkpoint in ")
        assert ": 3 damaged, the newest: " in lines[-1] and repr(_ckpt(3)) in lines[-1]
    # nothing was moved or written: the run is as it was
    steps = [s for s, _ in orbax_checkpoint.list_checkpoints(os.path.join(RUN, "checkpoints"))]
    assert steps == [1, 2, 3]


def test_eval_survives_pruning_race(work, capsys, monkeypatch):
    """`eval` on a live run: the newest checkpoint listed is pruned (keep-N) before it is read,
    or while it is read; the newest one still there is read instead, without a warning."""
    load_metadata = orbax_checkpoint.load_metadata
    restore = orbax_checkpoint.restore_checkpoint

    def pruned_before_reading(path):
        if path == _ckpt(3):
            shutil.rmtree(path)
        return load_metadata(path)

    monkeypatch.setattr(orbax_checkpoint, "load_metadata", pruned_before_reading)
    assert main(["eval", "--out", RUN, "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["step"] == 2 and not captured.err
    monkeypatch.setattr(orbax_checkpoint, "load_metadata", load_metadata)

    def pruned_while_reading(path, *args, **kwargs):
        if path == _ckpt(2):
            shutil.rmtree(path)
        return restore(path, *args, **kwargs)

    monkeypatch.setattr(orbax_checkpoint, "restore_checkpoint", pruned_while_reading)
    assert main(["eval", "--out", RUN, "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["step"] == 1 and not captured.err


def test_checkpoint_without_checksums_still_loads(tmp_path):
    """Checkpoints written before checksums were recorded load unverified; a checksum list that
    does not fit its tree is one error line."""
    import jax.numpy as jnp

    tree = {"w": jnp.arange(6.0).reshape(2, 3), "n": jnp.arange(4, dtype=jnp.int32)}
    path = orbax_checkpoint.save_checkpoint(tmp_path / "ck", 1, {"model": tree})
    meta_file = os.path.join(path, "meta", "metadata")
    with open(meta_file) as f:
        meta = json.load(f)
    del meta["meta_sha256"]  # recorded since; absent in those checkpoints
    assert len(meta["checksums"]["model"]) == 2
    meta["checksums"]["model"] = meta["checksums"]["model"][:1]
    with open(meta_file, "w") as f:
        json.dump(meta, f)
    with pytest.raises(orbax_checkpoint.CheckpointError, match="checksums.model must list"):
        orbax_checkpoint.restore_checkpoint(path, {"model": tree})
    del meta["checksum"], meta["checksums"]
    with open(meta_file, "w") as f:
        json.dump(meta, f)
    trees, _ = orbax_checkpoint.restore_checkpoint(path, {"model": tree})
    assert (trees["model"]["w"] == tree["w"]).all() and (trees["model"]["n"] == tree["n"]).all()
