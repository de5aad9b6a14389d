import dataclasses
import json
import math

import pytest

import xlstm_eqx.tools.gpu_check as gc
import xlstm_eqx.tools.gpu_check.correctness as gpu_correctness
import xlstm_eqx.tools.gpu_check.run as gpu_check_run
import xlstm_eqx.tools.gpu_check.train as gpu_train
from xlstm_eqx.cell import mlstm_chunkwise, mLSTMBackendNameAndKwargs
from xlstm_eqx.cli.bench import gpu_check_main
from xlstm_eqx.models import matmul_param_count, train_flops_per_token
from xlstm_eqx.presets import tiny_xlstm


# Generous budgets: the tests check results, not this shared machine's speed (the budget logic
# has its own test below).
BIG = ["--budget", "correctness=900", "--budget", "kernels=900", "--budget", "train=900"]
BIG += ["--budget", "generate=900"]


def _load(tmp_path):
    data = json.loads((tmp_path / gc.JSON_NAME).read_text())
    md = (tmp_path / gc.MD_NAME).read_text()
    return data, md


@pytest.mark.slow
def test_quick_run_writes_results_and_passes(tmp_path, capsys):
    assert gpu_check_main(["--out", str(tmp_path), "--quick", *BIG]) == 0
    data, md = _load(tmp_path)
    meta = data["meta"]
    assert meta["quick"] is True and meta["jax_version"] and meta["device_kind"]
    assert meta["pallas_interpret"] is True  # no GPU here: the kernels ran interpreted
    assert list(data["parts"]) == list(gc.PARTS)
    for name, part in data["parts"].items():
        assert part["rows"], name
        assert part["status"] == "ok", (name, part)
        assert part["elapsed_s"] > 0
    summary = data["summary"]
    assert summary["correctness_passed"] is True and summary["exit_code"] == 0

    correctness = data["parts"]["correctness"]["rows"]
    mlstm = [r for r in correctness if r["case"].startswith("mlstm")]
    assert mlstm and all(r["status"] == "pass" for r in mlstm)
    for r in mlstm:
        assert r["out_err"] <= r["tol"][0] and r["grad_err"] <= r["tol"][1]
        assert set(r["grad_errs"]) == {"q", "k", "v", "igate", "fgate"}
    by_backend = {r["backend"]: r for r in correctness if r["case"].startswith("attention")}
    assert by_backend["xla"]["status"] == "pass"
    for backend in ("cudnn", "pallas_triton"):
        assert by_backend[backend]["status"] == "skipped"
        assert by_backend[backend]["note"] == "needs GPU"

    kernels = data["parts"]["kernels"]["rows"]
    timed = [r for r in kernels if r["form"] != "auto"]
    assert {r["form"] for r in timed} >= {"chunkwise", "chunkwise_pallas"}
    assert {r["pass"] for r in timed} == set(gc.QUICK.kernel_passes)
    for r in timed:
        assert r["ms"] > 0 and r["tokens_per_s"] > 0 and r["tflops"] > 0
    assert [r["auto_choice"] for r in kernels if r["form"] == "auto"] == ["chunkwise"]

    train = data["parts"]["train"]["rows"]
    assert [r["model"] for r in train] == list(gc.QUICK.train_models)
    for r in train:
        assert r["batch"] >= 1 and r["tokens_per_s"] > 0 and math.isfinite(r["loss"])
        assert r["mfu_datasheet"] is None  # a CPU has no datasheet bf16 peak
        assert r["mfu_matmul"] > 0 and r["peak_gib"] > 0
    assert meta["matmul_bf16_tflops"] > 0

    generate = data["parts"]["generate"]["rows"]
    assert len(generate) == len(gc.QUICK.gen_models) * len(gc.QUICK.gen_contexts)
    assert all(r["ms_per_token"] > 0 for r in generate)

    assert md.startswith("# xlstm_eqx GPU check")
    for name in gc.PARTS:
        assert f"## {name} — ok" in md
    assert "| case | backend |" in md and "needs GPU" in md
    out = capsys.readouterr().out
    assert "[correctness]" in out and "exit code 0" in out


@pytest.mark.slow
def test_forced_failure_is_recorded_and_later_parts_run(tmp_path, monkeypatch):
    def wrong_kernel(*args, **kwargs):
        h, state = mlstm_chunkwise(*args, **kwargs)
        return 1.5 * h, state

    monkeypatch.setattr(gpu_correctness, "mlstm_chunkwise_pallas", wrong_kernel)
    quick = dataclasses.replace(
        gc.QUICK,
        correctness_cases=(gc.CellCase(1, 2, 40, 16, 32, 16, "float32", "wide"),),
        gen_contexts=(16,),
    )
    monkeypatch.setattr(gpu_check_run, "QUICK", quick)
    argv = ["--out", str(tmp_path), "--quick", "--parts", "correctness,generate", *BIG]
    assert gpu_check_main(argv) == 1
    data, md = _load(tmp_path)
    (row,) = data["parts"]["correctness"]["rows"]
    assert row["status"] == "fail" and row["out_err"] > row["tol"][0]
    assert data["parts"]["correctness"]["status"] == "fail"
    assert data["summary"]["exit_code"] == 1
    assert data["summary"]["correctness_failed_cases"] == [row["case"]]
    generate = data["parts"]["generate"]["rows"]
    assert generate and all(r["status"] == "ok" for r in generate)
    assert "correctness FAILED" in md and "## generate — ok" in md


def test_spent_budget_records_timed_out_cases(tmp_path):
    argv = ["--out", str(tmp_path), "--quick", "--parts", "correctness,kernels"]
    argv += ["--budget", "correctness=0", "--budget", "kernels=0"]
    assert gpu_check_main(argv) == 0  # time-outs are recorded, they are not failures
    data, _ = _load(tmp_path)
    for name in ("correctness", "kernels"):
        part = data["parts"][name]
        assert part["status"] == "timed_out"
        assert part["rows"] and all(r["status"] == "timed_out" for r in part["rows"])
    assert set(data["parts"]) == {"correctness", "kernels"}


class _FakeTrainState(gpu_train.TrainState):
    """Plans from a memory model instead of compiles: fixed + per_token * tokens (+ a fixed
    temporary part the one-plan prediction over-counts)."""

    def __init__(self, fixed, per_token, fixed_temp):
        self.plans = []
        self.memory = (fixed, per_token, fixed_temp)
        self.compiled_batches = []

    def compile(self, batch, seq_len):
        fixed, per_token, fixed_temp = self.memory
        tokens = batch * seq_len
        temp = fixed_temp + per_token * tokens
        self.plans.append((tokens, fixed, temp))
        self.compiled_batches.append(batch)
        return f"compiled B={batch}", fixed + temp


@pytest.mark.parametrize(
    "limit, max_tokens, expected_batch, bound",
    [
        (1000.0, 100 * 64, 8, "memory"),  # peak 100 + 64 B: B=8 fits (612), B=16 not (1124)
        (10_000.0, 4 * 64, 4, "token cap"),
        (200.0, 64 * 64, 1, "memory"),
    ],
)
def test_search_batch_largest_power_of_two_that_fits(limit, max_tokens, expected_batch, bound):
    state = _FakeTrainState(fixed=80, per_token=1, fixed_temp=20)
    batch, compiled, plans, why, _ = gpu_train.search_batch(state, 64, limit, max_tokens, 1.0)
    assert (batch, why) == (expected_batch, bound)
    assert compiled == f"compiled B={batch}"
    assert state.compiled_batches[0] == 1 and len(state.compiled_batches) <= 4
    assert [b for b, _ in plans] == sorted(set(state.compiled_batches))
    # the next sequence length reuses the fitted line: one compile when the prediction is right
    before = len(state.compiled_batches)
    batch2, *_ = gpu_train.search_batch(state, 32, limit, max_tokens, 1.0)
    assert batch2 >= batch and len(state.compiled_batches) - before == 1


def test_search_batch_does_not_fit():
    state = _FakeTrainState(fixed=500, per_token=1, fixed_temp=0)
    with pytest.raises(RuntimeError, match="B=1 needs"):
        gpu_train.search_batch(state, 64, 400.0, 64 * 64, 1.0)


def test_chunkwise_flops_matches_the_train_count():
    # per token and mLSTM layer, train_flops_per_token counts 3 x the chunkwise forward
    config = tiny_xlstm()  # 2 blocks, NH 4, DHQK 4, DHV 8
    cell = dataclasses.replace(
        config.mlstm_block.mlstm.mlstm_cell,
        backend=mLSTMBackendNameAndKwargs(name="chunkwise", kwargs={"chunk_size": 16}),
    )
    layer = dataclasses.replace(config.mlstm_block.mlstm, mlstm_cell=cell)
    config = dataclasses.replace(
        config, mlstm_block=dataclasses.replace(config.mlstm_block, mlstm=layer)
    )
    seq_len = 64
    mix = train_flops_per_token(config, seq_len) - 6 * matmul_param_count(config)
    per_token = gc.chunkwise_flops(1, 4, seq_len, 4, 8, 16, backward=True) / seq_len
    assert math.isclose(mix, config.num_blocks * per_token, rel_tol=1e-12)
    f = gc.chunkwise_flops(2, 4, 128, 4, 8, 64)
    assert f == 2 * 4 * 128 * (2 * 64 * 12 + 4 * 32 + 4 * 4)
    assert gc.chunkwise_flops(2, 4, 128, 4, 8, 64, backward=True) == 3 * f
    assert gc.chunkwise_flops(1, 1, 16, 8, 8, 64) == 16 * (2 * 16 * 16 + 4 * 64 + 32)  # L = S


@pytest.mark.parametrize(
    "kind, tflops",
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H100 NVL", 835.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA GH200 480GB", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA L40S", 362.0),
        ("NVIDIA L4", 121.0),
        ("cpu", None),
        ("NVIDIA GeForce GTX 1080", None),
    ],
)
def test_peak_table(kind, tflops):
    peak = gc.peak_bf16_flops(kind)
    assert peak == (None if tflops is None else tflops * 1e12)


def test_estimate_prints_every_part(capsys):
    assert gpu_check_main(["--estimate"]) == 0
    out = capsys.readouterr().out
    for name in gc.PARTS:
        assert name in out
    est = gc.estimate_durations()
    assert est["mode"] == "full" and set(est["parts"]) == set(gc.PARTS)
    # the full run is planned to fit in 8 minutes with each part stopped at its budget
    assert est["expected_s"] < 480
    for part in est["parts"].values():
        assert part["compiles"] > 0 and part["expected_s"] > 0
