"""lm-eval tasks during training (`--lm-eval-tasks`, the reference trainer's extended
evaluation): scores every N steps and at the end, equal to a direct computation with the step's
model, in the trackers and in `DIR/lm_eval/step_*.json`; lm-eval missing, an unknown task or
include path are errors at the start, before anything is written; the command line from another
directory with relative paths."""

import glob
import json
import os
import sys

import jax
import jax.numpy as jnp
import pytest

from tests.corpus import TEXT
from tests.training.test_lm_eval import mc_accuracy, mc_task
from tests.training.test_train import quiet, toy_config
from xlstm_eqx.cli import main
from xlstm_eqx.training import hooks as hooks_module, lm_eval as lm_eval_module, train


def test_tasks_every_n_steps_equal_a_direct_computation(tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    data = tmp_path / "data.txt"
    data.write_text(TEXT)
    tasks, docs = mc_task(tmp_path)
    models, logged = {}, []

    class Recording(hooks_module.LMEvalHook):
        def __call__(self, record):
            if self.cadence.due(record.step):  # a copy: the next step donates the model
                models[record.step] = jax.tree.map(jnp.copy, record.model)
            super().__call__(record)

    monkeypatch.setattr("xlstm_eqx.training.run_hooks.LMEvalHook", Recording)
    monkeypatch.setattr(hooks_module.Trackers, "log", lambda self, row: logged.append(row))
    cfg = toy_config(
        tmp_path, str(data), steps=4, lr=3e-2, lm_eval_tasks="toy_mc", lm_eval_every=3,
        lm_eval_include_path=tasks, lm_eval_limit=4, checkpoint_every=100,
    )  # fmt: skip
    lines = []
    train(cfg, log=lines.append)
    assert sorted(models) == [3, 4]  # every 3 steps and the last
    files = sorted(glob.glob(os.path.join(cfg.out, "lm_eval", "*")))
    assert [os.path.basename(f) for f in files] == [f"step_{s:08d}.json" for s in (3, 4)]
    scored = [row for row in logged if "lm_eval/toy_mc/acc" in row]
    assert [row["step"] for row in scored] == [3, 4]
    for path, row in zip(files, scored, strict=True):
        with open(path) as f:
            results = json.load(f)
        want = mc_accuracy(models[row["step"]], docs)
        assert results["results"]["toy_mc"]["acc,none"] == pytest.approx(want)
        assert row["lm_eval/toy_mc/acc"] == pytest.approx(want)
    assert any(line.startswith("step 4: lm-eval toy_mc/acc ") for line in lines), lines
    assert not any("sample_len" in row for row in scored)  # counts are not scores


def test_errors_at_the_start(tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    data = tmp_path / "data.txt"
    data.write_text(TEXT)
    tasks, _ = mc_task(tmp_path)
    kw = dict(lm_eval_tasks="toy_mc", lm_eval_include_path=tasks)
    # (an unknown task: in the command-line test, as it indexes lm-eval's own tasks, ~20 s)
    cfg = toy_config(tmp_path, str(data), **{**kw, "lm_eval_include_path": str(tmp_path / "no")})
    with pytest.raises(FileNotFoundError, match="--lm-eval-include-path '.*no' is not a dir"):
        train(cfg, log=quiet)
    assert not os.path.exists(cfg.out)
    lm_eval_module.task_manager.cache_clear()
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed
    cfg = toy_config(tmp_path, str(data), **kw)
    with pytest.raises(ImportError, match=r"--lm-eval-tasks needs the optional package `lm-eval`"):
        train(cfg, log=quiet)
    assert not os.path.exists(cfg.out)
    lm_eval_module.task_manager.cache_clear()


@pytest.mark.slow
def test_cli_lm_eval_tasks_with_relative_paths(tmp_path, monkeypatch, capsys):
    pytest.importorskip("lm_eval")
    pytest.importorskip("tensorboard")
    work = tmp_path / "work"
    work.mkdir()
    mc_task(work)  # work/tasks/toy_mc.yaml
    (work / "data.txt").write_text(TEXT)
    monkeypatch.chdir(work)
    args = ["train", "--model", "toy", "--preset", "tiny", "--data", "data.txt"]
    args += ["--out", "runs/a", "--seq-len", "16", "--batch-size", "2", "--steps", "2"]
    args += ["--no-progress", "--sample-tokens", "0", "--eval-batches", "1"]
    args += ["--lm-eval-tasks", "toy_mc", "--lm-eval-include-path", "tasks"]
    args += ["--lm-eval-limit", "2", "--tracker", "tensorboard"]
    assert main(args) == 0
    assert "step 2: lm-eval toy_mc/acc" in capsys.readouterr().out
    assert glob.glob("runs/a/lm_eval/step_00000002.json")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator("runs/a/tensorboard")
    acc.Reload()
    assert [e.step for e in acc.Scalars("lm_eval/toy_mc/acc")] == [2]
    assert main([*args[:-4], "--lm-eval-tasks", "nope", "--out", "runs/b"]) == 2
    assert "--lm-eval-tasks: 'nope'" in capsys.readouterr().err
    assert not os.path.exists("runs/b")
