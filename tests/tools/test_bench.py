import math
import re
import sys
import types

import jax
import pytest

import xlstm_eqx.tools.bench as bench
from xlstm_eqx.models import train_flops_per_token
from xlstm_eqx.presets import tiny_llama, tiny_xlstm
from xlstm_eqx.tools import bench_train, run_bench


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


# ----------------------------------------------------------------------------------------------
# the `bench` command: each benchmark prints its table


def _table_rows(out: str, header: str) -> list[list[str]]:
    """The whitespace-split lines after the line starting with `header`, up to a blank line."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 1 :]:
        if not line.strip() or line.startswith("#"):
            break
        rows.append(line.split())
    return rows


def test_run_bench_unknown_benchmark():
    with pytest.raises(ValueError, match="'nope'"):
        run_bench("nope", quick=True)


@pytest.mark.slow
def test_run_bench_cell_quick_without_peer(monkeypatch, capsys):
    # the peer (mlstm-kernels) is optional: hide it, whether installed or not
    for name in [m for m in sys.modules if m.split(".")[0] in ("mlstm_kernels", "jax_triton")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "mlstm_kernels", None)
    # the script stubs `jax_triton` into sys.modules; keep that stub to this test
    monkeypatch.setitem(sys.modules, "jax_triton", types.ModuleType("jax_triton"))
    assert run_bench("cell", quick=True, seq_len=64) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"# jax {jax.__version__} on ")
    assert "\n## cell\n" in out
    assert "peer rows skipped" in out
    rows = _table_rows(out, "     S form")
    forms = [(r[0], r[1], r[2]) for r in rows]
    assert forms == [
        ("64", form, p)
        for form in ("chunkwise", "parallel", "recurrent")
        for p in ("fwd", "fwd+bwd")
    ]
    for r in rows:
        ms, tps, peak = float(r[3]), float(r[4].replace(",", "")), float(r[5])
        assert ms > 0 and tps > 0 and peak > 0
        # no "vs peer" ratio without the peer, and nothing over the memory budget
        assert not any(re.fullmatch(r"[\d.]+x", field) for field in r), r
        assert "skipped" not in r


@pytest.mark.slow
def test_run_bench_train_quick_tiny(capsys):
    assert run_bench("train", quick=True, size="tiny", seq_len=32) == 0
    out = capsys.readouterr().out
    assert "\n## train\n" in out
    assert "# train step (fwd+bwd+AdamW), B=1 S=32, float32" in out
    rows = _table_rows(out, "model ")
    assert [r[0] for r in rows] == ["xlstm", "llama"]
    for r in rows:
        assert int(r[1].replace(",", "")) > 0  # params
        assert float(r[2]) > 0  # ms/step
        assert r[-1].endswith("x")
    assert rows[-1][-1] == "1.00x"


def test_run_bench_profile_quick_tiny(capsys):
    assert run_bench("profile", quick=True, size="tiny", seq_len=32) == 0
    out = capsys.readouterr().out
    assert "\n## profile\n" in out
    assert "# tiny_xlstm train step, B=1 S=32: wall " in out
    assert "counted analytically" in out
    parts = [" ".join(r[:-5]) for r in _table_rows(out, "part ")]
    for part in ("mLSTM cell", "mLSTM layer (projections, gates)", "feed-forward", "norms"):
        assert part in parts
    assert "LM head" in parts and "optimizer (clip, AdamW)" in parts
    assert _table_rows(out, "slowest ops")  # the slowest single ops follow


@pytest.mark.slow
def test_run_bench_generate_quick(monkeypatch, capsys):
    # `generate --quick` (contexts 128 and 512) is run with smaller contexts to keep the test
    # short; the arguments `run_bench` passes are checked, then the real script runs
    real_load = bench._load_script
    passed = []

    def load(name):
        module = real_load(name)
        real_main = module.main

        def main(argv=None):
            passed.append(list(argv))
            argv = ["--contexts", "8", "16", "--batches", "1", "2"]
            return real_main([*argv, "--new-tokens", "2", "--repeats", "1"])

        module.main = main
        return module

    monkeypatch.setattr(bench, "_load_script", load)
    assert run_bench("generate", quick=True) == 0
    assert passed == [["--contexts", "128", "512", "--new-tokens", "8", "--repeats", "2"]]
    out = capsys.readouterr().out
    assert "\n## generate\n" in out
    assert "| model | batch | context | ms / token | tokens / s |" in out
    rows = [line.strip("|").split("|") for line in out.splitlines() if line.startswith("| ")]
    rows = [[c.strip() for c in r] for r in rows[1:]]  # after the header
    assert [(r[0], r[1], r[2]) for r in rows] == [
        (model, batch, context)
        for batch in ("1", "2")
        for context in ("8", "16")
        for model in ("xLSTM", "Llama")
    ]
    assert all(float(r[3]) > 0 and float(r[4]) > 0 for r in rows)
