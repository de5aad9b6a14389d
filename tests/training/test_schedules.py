"""Learning-rate schedules (cosine, wsd, linear, constant), extending a finished wsd run, and the
optimizers (adamw, lion, adafactor) with the decay mask."""

import dataclasses
import math
import os

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from tests.training.test_train import ToyConfig, ToyLM, quiet, toy_config
from xlstm_eqx.training import (
    TrainConfig,
    learning_rate_schedule,
    list_checkpoints,
    make_optimizer,
    read_metrics,
    train,
    trainable_params,
)


def _values(cfg, steps):
    sched = learning_rate_schedule(cfg)
    with jax.numpy_dtype_promotion("standard"):
        return [float(sched(i)) for i in steps]


def test_schedule_shapes():
    base = TrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1, decay_fraction=0.2)
    at = [0, 5, 10, 50, 80, 90, 100]
    lin = _values(dataclasses.replace(base, schedule="linear"), at)
    np.testing.assert_allclose(
        lin, [0, 0.5, 1.0, 1 - 0.9 * 40 / 90, 1 - 0.9 * 70 / 90, 1 - 0.9 * 80 / 90, 0.1], atol=1e-6
    )
    const = _values(dataclasses.replace(base, schedule="constant"), at)
    np.testing.assert_allclose(const, [0, 0.5, 1, 1, 1, 1, 1], atol=1e-6)
    wsd = _values(dataclasses.replace(base, schedule="wsd"), at)
    # stable until step 80 (the last 20% decay linearly to 0.1)
    np.testing.assert_allclose(wsd, [0, 0.5, 1, 1, 1, 0.55, 0.1], atol=1e-6)
    # without warmup the peak is there from the first step
    no_warm = dataclasses.replace(base, warmup_steps=0)
    for name in ("constant", "linear", "wsd"):
        assert _values(dataclasses.replace(no_warm, schedule=name), [0])[0] == pytest.approx(1.0)


def test_schedule_and_optimizer_validation(tmp_path, data_file):
    for kw, match in [
        (dict(schedule="step"), "TrainConfig.schedule"),
        (dict(optimizer="sgd"), "TrainConfig.optimizer"),
        (dict(decay_fraction=0.0), "TrainConfig.decay_fraction"),
    ]:
        with pytest.raises(ValueError, match=match):
            train(toy_config(tmp_path, data_file, **kw), log=quiet)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("optimizer", ["adamw", "lion", "adafactor", "ademamix"])
def test_optimizers_decay_kernels_only(optimizer):
    """Zero gradients: the update is the decoupled weight decay alone, -lr * wd * param, on the
    kernels (the decay mask) and nothing elsewhere."""
    config = ToyConfig()
    model = ToyLM(config, key=jr.key(1))
    cfg = TrainConfig(
        steps=10, lr=0.5, warmup_steps=0, weight_decay=0.1, grad_clip=None, optimizer=optimizer
    )
    opt = make_optimizer(cfg, model, config)
    params = trainable_params(model)
    zeros = jax.tree.map(jnp.zeros_like, params)
    with jax.numpy_dtype_promotion("standard"):
        state = opt.init(params)
        updates, _ = opt.update(zeros, state, params)
    for name in ("embedding", "kernel", "bias", "head_kernel"):
        p = np.asarray(getattr(params, name), np.float64)
        u = np.asarray(getattr(updates, name), np.float64)
        want = -0.5 * 0.1 * p if name.endswith("kernel") else 0 * p
        np.testing.assert_allclose(u, want, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("optimizer", ["lion", "adafactor"])
def test_other_optimizers_train(tmp_path, data_file, optimizer):
    lr = 1e-2 if optimizer == "lion" else 3e-2
    cfg = toy_config(tmp_path, data_file, optimizer=optimizer, lr=lr, steps=12, eval_every=12)
    result = train(cfg, log=quiet)
    first = np.mean([result.losses[s] for s in (1, 2)])
    last = np.mean([result.losses[s] for s in (11, 12)])
    assert last < first - 0.3, (first, last)


def test_wsd_run_extends_without_lr_jump(tmp_path, data_file):
    """A finished 10-step wsd run extended to 20 steps restarts from its decay start (step 8),
    keeps the peak learning rate until step 16, and from there on is the 20-step run exactly."""
    kw = dict(schedule="wsd", decay_fraction=0.2, steps=10, checkpoint_every=100, eval_every=5)
    short = toy_config(tmp_path / "a", data_file, **kw)
    train(short, log=quiet)
    out = short.out
    assert [s for s, _ in list_checkpoints(os.path.join(out, "wsd_decay_start"))] == [8]
    assert [s for s, _ in list_checkpoints(os.path.join(out, "checkpoints"))] == [10]
    rows = read_metrics(os.path.join(out, "metrics.jsonl"))
    assert rows[-1]["lr"] < short.lr  # decayed

    lines = []
    extended = train(dataclasses.replace(short, resume=True, steps=20), log=lines.append)
    assert sorted(extended.losses) == list(range(9, 21))
    assert any("moved" in line and "step_00000010" in line for line in lines)
    assert os.path.isdir(os.path.join(out, "superseded", "step_00000010"))
    rows = read_metrics(os.path.join(out, "metrics.jsonl"))
    assert [r["step"] for r in rows] == list(range(1, 21))
    lrs = {r["step"]: r["lr"] for r in rows}
    assert all(lrs[s] == pytest.approx(short.lr) for s in range(2, 17))  # no jump, stable to 16
    assert lrs[20] < lrs[18] < short.lr

    fresh = train(toy_config(tmp_path / "b", data_file, **{**kw, "steps": 20}), log=quiet)
    assert {s: fresh.losses[s] for s in range(9, 21)} == extended.losses
    fresh_rows = read_metrics(os.path.join(fresh.out_dir, "metrics.jsonl"))
    assert [r["loss"] for r in fresh_rows] == [r["loss"] for r in rows]
    # the extended run, finished, is like any other: a resume that would do nothing is refused
    with pytest.raises(ValueError, match="already at step 20"):
        train(dataclasses.replace(short, resume=True, steps=20), log=quiet)


def test_cosine_extension_jumps_up():
    """What the docs say: a stretched cosine is higher at the old end than the old cosine was."""
    old = TrainConfig(steps=100, lr=1.0, warmup_steps=10)
    new = dataclasses.replace(old, steps=200)
    assert _values(new, [100])[0] > _values(old, [100])[0] + 0.3
    assert math.isclose(
        _values(dataclasses.replace(old, schedule="constant"), [100])[0],
        _values(dataclasses.replace(new, schedule="constant"), [100])[0],
    )
