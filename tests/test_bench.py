import math

from xlstm_eqx._bench import bench_train, train_flops_per_token
from xlstm_eqx._presets import tiny_llama, tiny_xlstm


def test_train_flops_per_token_by_hand():
    S = 32
    # tiny_xlstm: 2 mLSTM v1 blocks, D=32, NH=4, qk 16 (DHQK 4), v 32 (DHV 8), SwiGLU FFN H=128
    # (2.667*32 rounded up to 64), vocab 64, parallel backend (L = S, no state term).
    D, H, V, NH, DQK, DV = 32, 128, 64, 4, 4, 8
    per_block = D * 16 + D * 16 + D * 32 + D * 32 + D * NH + D * NH + 32 * D + 3 * D * H
    n = 2 * per_block + D * V
    mix = 2 * 3 * NH * (2 * S * (DQK + DV))
    assert math.isclose(train_flops_per_token(tiny_xlstm(), S), 6 * n + mix, rel_tol=1e-12)
    # tiny_llama: 2 blocks, D=32, 4 heads of 8, FFN H=128, vocab 64, full S x S attention.
    n = 2 * (4 * D * D + 3 * D * H) + D * V
    mix = 2 * 12 * S * D
    assert math.isclose(train_flops_per_token(tiny_llama(), S), 6 * n + mix, rel_tol=1e-12)


def test_bench_train_tiny():
    rows = bench_train(seq_len=32, batch_size=1, steps=1, size="tiny", matmul_n=256, memory=False)
    assert [r["model"] for r in rows] == ["xlstm", "llama"]
    for r in rows:
        assert math.isfinite(r["tokens_per_s"]) and r["tokens_per_s"] > 0
        assert 0 < r["mfu"] < 1.5
        assert math.isfinite(r["loss"])
        assert r["peak_mb"] is None or r["peak_mb"] > 0
