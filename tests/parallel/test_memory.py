"""Activation bytes per device and the context-parallel arithmetic of `parallel/memory.py` (what
`xlstm-eqx info --seq-len` prints), against predictions made independently of the fit."""

import dataclasses

import pytest

from xlstm_eqx.core import ParallelConfig
from xlstm_eqx.parallel.memory import (
    ActivationModel,
    activation_model,
    activation_report,
    decode_state_bytes,
    largest_seq_len,
    residual_bytes,
)
from xlstm_eqx.presets import tiny_llama, tiny_xlstm


@pytest.mark.slow  # traces the backward four times
def test_remat_keeps_only_each_blocks_input():
    # With every block rematerialised, one more block keeps one more (B, S, D) input: per token
    # D values of the compute dtype, and nothing else that grows with S.
    base = dataclasses.replace(tiny_xlstm(), parallel=ParallelConfig(remat=["mLSTMBlock"]))
    itemsize = {"float32": 4, "bfloat16": 2}[base.dtype]
    batch, s = 2, 64

    def growth(blocks: int) -> int:
        cfg = dataclasses.replace(base, num_blocks=blocks)
        return residual_bytes(cfg, batch, 2 * s) - residual_bytes(cfg, batch, s)

    assert growth(2) - growth(1) == batch * s * base.embedding_dim * itemsize


@pytest.mark.slow  # traces the backward five times
def test_fit_predicts_a_length_it_was_not_fitted_on():
    cfg = tiny_xlstm()  # the parallel backend: a quadratic term
    model = activation_model(cfg, unit=64)
    assert model.quadratic > 0 and model.recompute(1000) == 0  # no remat in this preset
    measured = residual_bytes(cfg, 1, 5 * 64) - residual_bytes(cfg, 1, 64)
    assert model.saved(5 * 64) - model.saved(64) == measured


def test_cp_activations_are_one_device_activations_of_the_segment():
    model = ActivationModel(1, 1000.0, 3.0, 70.0, 0.5, ("mLSTMBlock",))
    seq_len, state = 1 << 20, 12345
    split = activation_report(model, seq_len, 8, state_bytes=state)
    whole = activation_report(model, seq_len // 8, 1, state_bytes=state)
    assert split.tokens_per_device == whole.tokens_per_device == seq_len // 8
    assert (split.saved_bytes, split.recompute_bytes) == (whole.saved_bytes, whole.recompute_bytes)
    t = seq_len // 8
    assert split.saved_bytes == 1000 * t + 3 * t * t
    assert whole.exchange_bytes == 0 and split.exchange_bytes == 2 * 8 * state
    assert activation_report(model, 1001, 8).tokens_per_device == 126  # ceil(1001 / 8)
    with pytest.raises(ValueError, match="cp"):
        activation_report(model, 1024, 0)


def test_largest_seq_len_fits_and_grows_linearly_with_cp():
    model = ActivationModel(1, 1000.0, 0.0, 0.0, 0.0, ())
    budget, fixed = 10**9, 10**8
    for cp in (1, 2, 4, 8):
        best = largest_seq_len(model, cp, budget, fixed_bytes=fixed)
        assert best == (budget - fixed) // 1000 * cp  # a linear model: exactly
    quad = ActivationModel(1, 500.0, 2.0, 100.0, 0.0, ())
    for cp in (1, 4):
        best = largest_seq_len(quad, cp, budget, fixed_bytes=fixed, state_bytes=10**6)
        room = budget - fixed - (2 * cp * 10**6 if cp > 1 else 0)

        def need(t):
            return 600 * t + 2 * t * t

        assert best % cp == 0 and need(best // cp) <= room < need(best // cp + 1)
    assert largest_seq_len(model, 2, 10**3, fixed_bytes=10**4) == 0


def test_decode_state_bytes():
    cfg = tiny_xlstm()  # mlstm_v1 layers: no conv window, C (DK, DV), n (DK), m per head
    layer = cfg.mlstm_block.mlstm
    heads = layer.num_heads
    dk = int(layer.qk_dim_factor * cfg.embedding_dim) // heads
    dv = int(layer.v_dim_factor * cfg.embedding_dim) // heads
    one = decode_state_bytes(cfg, 1)
    assert one == cfg.num_blocks * heads * (dk * dv + dk + 1) * 4  # float32
    assert decode_state_bytes(cfg, 3) == 3 * one
    assert decode_state_bytes(tiny_llama(), 1) == 0  # a KV cache hands nothing on
