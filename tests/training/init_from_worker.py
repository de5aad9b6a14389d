"""Runs with 8 simulated devices for tests/training/test_init_from.py (the test process keeps one
device): ``python -m tests.training.init_from_worker TMPDIR``; prints ``RESULT {json}``.

- ``bytes``: a random transformers-layout xLSTM with weights above the FSDP size threshold,
  written by `to_hf` and read by ``from_hf_pretrained(path, mesh=fsdp=8 mesh)`` without
  ``parallel=``: per leaf, the bytes the fullest device holds and the whole leaf's bytes.
- ``logits``: `load_init_model` of the hf_train fixture on a fsdp=8 mesh (every weight sharded:
  ``fsdp_min_weight_size=0``) against one device: the largest logit difference.
- ``losses``: `train` from the fixture without a mesh and on ``--mesh dp=2,fsdp=4``.
- ``lora``: the same with ``--lora-rank 4``, the mesh run stopped after step 2 and resumed (its
  checkpoints hold only the adapters: the base is read again into its shardings).
"""

import dataclasses
import json
import os
import sys

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

from xlstm_eqx.core.parallel_config import ParallelConfig
from xlstm_eqx.interop import from_hf_pretrained, to_hf
from xlstm_eqx.interop.hf_config import hf_config_to_eqx
from xlstm_eqx.parallel.mesh import make_mesh
from xlstm_eqx.training.config import TrainConfig
from xlstm_eqx.training.init_from import load_init_model
from xlstm_eqx.training.loop import train
from xlstm_eqx.training.prepare import prepare_run
from xlstm_eqx.training.run_files import read_metrics
from xlstm_eqx.xlstm.model import xLSTMLMModel


FIXTURE = os.path.join(os.path.dirname(__file__), "..", "fixtures", "interop", "hf_train")


def _bytes(tmp: str, corpus: str) -> dict:
    with open(os.path.join(FIXTURE, "config.json")) as fh:
        hf = json.load(fh)
    hf.update(
        hidden_size=512,
        embedding_dim=512,
        vocab_size=1024,
        num_hidden_layers=1,
        num_heads=4,
        ffn_proj_factor=2.0,
    )
    config = hf_config_to_eqx(hf)
    path = to_hf(xLSTMLMModel(config, key=jr.key(0)), config, os.path.join(tmp, "big"))
    mesh = make_mesh(ParallelConfig(data_axis_size=1, fsdp_axis_size=8))
    model, _ = from_hf_pretrained(path, mesh=mesh)
    init_model, _, _ = load_init_model(path, mesh=mesh)  # --init-from's loader, same default
    out = os.path.join(tmp, "prepared")
    cfg = TrainConfig(init_from=path, data=[corpus], eod_token="none", mesh="fsdp=8", out=out)
    return {
        "leaves": _leaf_bytes(model),
        "init_leaves": _leaf_bytes(init_model),
        "train_fsdp_modules": prepare_run(cfg).model_config.parallel.fsdp_modules,
        "min_weight_size": ParallelConfig().fsdp_min_weight_size,
    }


def _leaf_bytes(model) -> list[list[int]]:
    """``[elements, bytes, bytes on the fullest device]`` of each array leaf."""
    leaves = []
    for leaf in jax.tree.leaves(model):
        if isinstance(leaf, jax.Array):
            fullest = max(s.data.nbytes for s in leaf.addressable_shards)
            leaves.append([int(leaf.size), int(leaf.nbytes), int(fullest)])
    return leaves


def _logits() -> float:
    tokens = jnp.asarray(np.arange(64).reshape(2, 32) % 64, jnp.int32)
    one, _, _ = load_init_model(FIXTURE)
    mesh = make_mesh(ParallelConfig(data_axis_size=1, fsdp_axis_size=8))
    pc = ParallelConfig(
        data_axis_size=1,
        fsdp_axis_size=8,
        fsdp_modules=["Embed", "LMHead", "mLSTMBlock"],
        fsdp_min_weight_size=0,
    )
    sharded, _, _ = load_init_model(FIXTURE, mesh=mesh, parallel=pc)
    split = [x for x in jax.tree.leaves(sharded) if isinstance(x, jax.Array)]
    assert any(len({str(s.index) for s in x.addressable_shards}) == 8 for x in split), "not sharded"
    return float(np.max(np.abs(np.asarray(one(tokens)) - np.asarray(sharded(tokens)))))


def _losses(tmp: str, corpus: str, lora_rank: int = 0) -> dict:
    out = {}
    for name, mesh in (("one", ""), ("mesh", "dp=2,fsdp=4")):
        cfg = TrainConfig(
            lora_rank=lora_rank,
            checkpoint_every=2,
            init_from=FIXTURE,
            data=[corpus],
            eod_token="none",
            steps=4,
            batch_size=8,
            seq_len=16,
            warmup_steps=1,
            lr=1e-3,
            log_every=1,
            eval_every=4,
            eval_batches=1,
            sample_tokens=0,
            progress=False,
            mesh=mesh,
            out=os.path.join(tmp, f"{name}{lora_rank}"),
        )
        if lora_rank and mesh:  # stopped and resumed on the mesh
            train(cfg, stop_after_step=2, log=lambda message: None)
            cfg = dataclasses.replace(cfg, resume=True)
        train(cfg, log=lambda message: None)
        rows = read_metrics(os.path.join(cfg.out, "metrics.jsonl"))
        out[name] = [r["loss"] for r in rows if "loss" in r]
    return out


def main() -> None:
    tmp, corpus = sys.argv[1], sys.argv[2]
    result = {"bytes": _bytes(tmp, corpus), "logits": _logits(), "losses": _losses(tmp, corpus)}
    result["lora"] = _losses(tmp, corpus, lora_rank=4)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
