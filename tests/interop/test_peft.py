"""PEFT adapters (interop/peft.py) against a fixture made by peft itself
(scripts/make_interop_fixtures.py --only peft): a rank-4 adapter with random B on the tiny
transformers xLSTM ``hf_small`` and the peft model's logits. No torch here."""

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from xlstm_eqx.interop.common import InteropError
from xlstm_eqx.interop.peft import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    from_peft_pretrained,
    write_peft_adapter,
)
from xlstm_eqx.interop.safetensors_files import SafetensorsFile
from xlstm_eqx.training.finetune import merge_lora, trainable_count


FIXTURES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "interop")
BASE, ADAPTER = os.path.join(FIXTURES, "hf_small"), os.path.join(FIXTURES, "peft_small")


def _expected():
    with np.load(os.path.join(ADAPTER, "expected.npz"), allow_pickle=False) as data:
        return jnp.asarray(data["input_ids"]), data["logits"]


def _tensors(path):
    with SafetensorsFile(os.path.join(path, ADAPTER_WEIGHTS)) as f:
        return {k: f.read(k) for k in f.keys()}


@pytest.fixture(scope="module")
def adapted():
    return from_peft_pretrained(BASE, ADAPTER)[0]


def test_peft_adapter_gives_peft_logits(adapted):
    ids, want = _expected()
    got = np.asarray(adapted(ids))
    scale = float(np.max(np.abs(want)))
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * scale)
    # merged into the kernels: the same logits
    np.testing.assert_allclose(
        np.asarray(merge_lora(adapted)(ids)), want, rtol=0, atol=4e-5 * scale
    )
    # r=4 on 10 projections of 2 blocks: every adapter tensor of the file, no more
    file_count = sum(int(x.size) for x in _tensors(ADAPTER).values())
    assert trainable_count(adapted) == file_count


def test_peft_export_reproduces_the_fixture(adapted, tmp_path):
    out = write_peft_adapter(adapted, tmp_path / "adapter")
    theirs, ours = _tensors(ADAPTER), _tensors(out)
    assert sorted(ours) == sorted(theirs)
    for name, x in theirs.items():
        np.testing.assert_array_equal(ours[name], x, err_msg=name)
    with open(os.path.join(ADAPTER, ADAPTER_CONFIG)) as f:
        their_config = json.load(f)
    with open(os.path.join(out, ADAPTER_CONFIG)) as f:
        our_config = json.load(f)
    for key in ("peft_type", "r", "lora_alpha", "bias", "use_rslora", "fan_in_fan_out"):
        assert our_config[key] == their_config[key], key
    assert sorted(our_config["target_modules"]) == sorted(their_config["target_modules"])


def test_bad_adapter_is_named(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    with open(os.path.join(ADAPTER, ADAPTER_CONFIG)) as f:
        config = json.load(f)
    config["use_rslora"] = True
    (bad / ADAPTER_CONFIG).write_text(json.dumps(config))
    shutil.copy(os.path.join(ADAPTER, ADAPTER_WEIGHTS), bad / ADAPTER_WEIGHTS)
    with pytest.raises(InteropError, match="use_rslora=True is not supported"):
        from_peft_pretrained(BASE, bad)
