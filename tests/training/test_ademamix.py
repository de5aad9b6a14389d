"""AdEMAMix (`--optimizer ademamix`): the updates equal the paper's formula computed in float64
NumPy (with the reference trainer's alpha and beta3 warmups and the kernels-only weight decay),
and a tiny run trains with it."""

import json
import math

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from tests.corpus import TEXT
from tests.training.test_train import ToyConfig, ToyLM, quiet, toy_config
from xlstm_eqx.cli import main
from xlstm_eqx.training import TrainConfig, make_optimizer, read_metrics, train, trainable_params


NAMES = ("embedding", "kernel", "bias", "head_kernel")


def _numpy_ademamix(params, grads_per_step, *, lr, b1, b2, b3, alpha, eps, wd, warmup):
    """Pagliardini et al. (2024), Algorithm 1, step by step in float64: alpha rises linearly from
    0 and beta3's half-life linearly from beta1's over `warmup` steps; no bias correction of the
    slow EMA; decoupled weight decay on the kernels."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    m1 = {k: np.zeros_like(v) for k, v in p.items()}
    m2 = {k: np.zeros_like(v) for k, v in p.items()}
    nu = {k: np.zeros_like(v) for k, v in p.items()}
    half_life = lambda beta: math.log(0.5) / math.log(beta)  # noqa: E731
    for t, grads in enumerate(grads_per_step):
        frac = min(t / warmup, 1.0)
        alpha_t = frac * alpha
        beta3_t = 0.5 ** (1.0 / ((1 - frac) * half_life(b1) + frac * half_life(b3)))
        for k in p:
            g = np.asarray(grads[k], np.float64)
            m1[k] = b1 * m1[k] + (1 - b1) * g
            m2[k] = beta3_t * m2[k] + (1 - beta3_t) * g
            nu[k] = b2 * nu[k] + (1 - b2) * g * g
            m1_hat = m1[k] / (1 - b1 ** (t + 1))
            nu_hat = nu[k] / (1 - b2 ** (t + 1))
            step = (m1_hat + alpha_t * m2[k]) / (np.sqrt(nu_hat) + eps)
            decay = wd * p[k] if k.endswith("kernel") else 0.0
            p[k] = p[k] - lr * (step + decay)
    return p


def test_ademamix_updates_equal_the_formula():
    config = ToyConfig(vocab_size=8, embedding_dim=4)
    model = ToyLM(config, key=jr.key(0))
    hp = dict(b1=0.8, b2=0.95, b3=0.999, alpha=5.0, eps=1e-8, wd=0.1, warmup=3)
    cfg = TrainConfig(
        optimizer="ademamix",
        steps=10,
        lr=0.01,
        warmup_steps=0,
        schedule="constant",
        grad_clip=None,
        beta1=hp["b1"],
        beta2=hp["b2"],
        beta3=hp["b3"],
        alpha=hp["alpha"],
        adam_eps=hp["eps"],
        weight_decay=hp["wd"],
        ademamix_warmup_steps=hp["warmup"],
    )
    opt = make_optimizer(cfg, model, config)
    params = trainable_params(model)
    keys = jr.split(jr.key(1), 5)
    grads_per_step = [jax.tree.map(lambda x, k=k: jr.normal(k, x.shape), params) for k in keys]
    with jax.numpy_dtype_promotion("standard"):
        state = opt.init(params)
        for grads in grads_per_step:
            updates, state = opt.update(grads, state, params)
            params = jax.tree.map(jnp.add, params, updates)
    as_dict = lambda tree: {k: np.asarray(getattr(tree, k)) for k in NAMES}  # noqa: E731
    want = _numpy_ademamix(
        as_dict(trainable_params(model)),
        [as_dict(g) for g in grads_per_step],
        lr=0.01,
        **hp,
    )
    for k in NAMES:
        np.testing.assert_allclose(np.asarray(getattr(params, k)), want[k], rtol=2e-5, atol=1e-7)


def test_ademamix_run_trains(tmp_path, data_file):
    cfg = toy_config(tmp_path, data_file, optimizer="ademamix", lr=1e-2, steps=12, eval_every=12)
    result = train(cfg, log=quiet)
    first = np.mean([result.losses[s] for s in (1, 2)])
    last = np.mean([result.losses[s] for s in (11, 12)])
    assert last < first - 0.3, (first, last)


@pytest.mark.slow
def test_cli_ademamix_with_relative_paths(tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    (work / "data.txt").write_text(TEXT)
    monkeypatch.chdir(work)
    args = ["train", "--model", "toy", "--preset", "tiny", "--data", "data.txt", "--out", "run"]
    args += ["--seq-len", "16", "--batch-size", "2", "--steps", "3", "--no-progress"]
    args += ["--sample-tokens", "0", "--eval-batches", "1", "--optimizer", "ademamix"]
    assert main([*args, "--beta3", "1.0"]) == 2
    assert "--beta3 (TrainConfig.beta3)" in capsys.readouterr().err
    assert main([*args, "--beta3", "0.999", "--alpha", "5", "--ademamix-warmup-steps", "2"]) == 0
    with open("run/config.json") as f:
        train_cfg = json.load(f)["train"]
    assert (train_cfg["optimizer"], train_cfg["beta3"], train_cfg["alpha"]) == (
        "ademamix",
        0.999,
        5,
    )
    assert train_cfg["ademamix_warmup_steps"] == 2
    rows = read_metrics("run/metrics.jsonl")
    assert [r["step"] for r in rows][-1] == 3 and all(math.isfinite(r["loss"]) for r in rows)
