"""`xlstm-eqx info --seq-len / --device-memory` on a mesh with a context-parallel axis."""

import math
import re
import subprocess

import equinox as eqx
import jax
import jax.random as jr
import pytest

from xlstm_eqx.cli import main
from xlstm_eqx.parallel.memory import (
    activation_model,
    activation_report,
    decode_state_bytes,
    size_text,
)
from xlstm_eqx.presets import get_preset, tiny_xlstm
from xlstm_eqx.xlstm import xLSTMLMModel


@pytest.mark.slow  # traces the backward three times
def test_info_cp_activations_are_one_device_activations_of_s_over_cp(capsys):
    assert main(["info", "--preset", "tiny", "--mesh", "cp=4", "--seq-len", "4096"]) == 0
    text = capsys.readouterr().out
    assert "cp=4: 1,024 tokens x 1 sequence(s) per device" in text
    cfg = tiny_xlstm()
    one_device = activation_report(activation_model(cfg), 4096 // 4, 1)  # cp=1, S/4
    assert f"kept for the backward: {size_text(one_device.saved_bytes)}" in text
    assert f"cp state exchange: {size_text(2 * 4 * decode_state_bytes(cfg))}" in text


@pytest.mark.slow  # a subprocess tracing the 7B model's backward
def test_info_7b_on_fsdp_cp_mesh_from_another_directory(tmp_path):
    args = ["--preset", "mLSTMv1_7B", "--mesh", "fsdp=8,cp=8", "--seq-len", "1048576"]
    run = subprocess.run(
        ["xlstm-eqx", "info", *args, "--device-memory", "80"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr
    text = run.stdout
    skeleton = eqx.filter_eval_shape(xLSTMLMModel, get_preset("mLSTMv1_7B"), key=jr.key(0))
    count = sum(math.prod(x.shape) for x in jax.tree.leaves(skeleton))
    assert f"{count:,} parameters" in text
    assert f"parameters: {count * 4 / 2**30:,.2f} GiB total" in text  # float32
    found = re.search(r"parameters: .* GiB total, ([\d.,]+) GiB per device", text)
    assert found is not None
    per_device = float(found[1])
    assert count * 4 / 8 / 2**30 <= per_device < count * 4 / 8 / 2**30 * 1.01  # fsdp splits 8
    assert "cp=8: 131,072 tokens x 1 sequence(s) per device" in text
    fit = re.search(
        r"S=1,048,576 (fits|does NOT fit); the largest S that fits on this mesh: ([\d,]+)", text
    )
    assert fit is not None
    best = int(fit[2].replace(",", ""))
    assert best % 8 == 0 and (best >= 1048576) == (fit[1] == "fits")
