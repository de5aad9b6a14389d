"""xlstm-jax's side of the train-step comparison in `xlstm-eqx bench train`.

Builds the reference Flax model (`xlstm_jax`) with the same architecture as one of our configs and
runs one optimizer step the way xlstm-jax's own trainer does: its `LLMTrainer` (model init inside
`shard_map` over a (dp, fsdp, pp, tp) mesh of size 1 on one CPU device, boxed `nn.Partitioned`
parameters, its loss, its `build_optimizer` AdamW with global-norm clipping, its jitted and
donated `train_step`). Needs the peers' virtualenv (benchmarks/peers/README.md); imported lazily
by `xlstm_eqx.tools.peers`, never by the test suite.
"""

import dataclasses
import logging
import os
import sys
import types
from collections.abc import Callable
from typing import Any


# xlstm-jax's pure-JAX CPU backend for the mLSTM cell: its `triton_kernels` backend calls
# mlstm-kernels by name, and the chunkwise native-autograd kernel runs anywhere (chunk 64, as ours).
MLSTM_BACKEND = {"name": "triton_kernels", "kwargs": {"backend_name": "chunkwise--native_autograd"}}


def import_peer() -> Any:
    """Import xlstm-jax (with the jax_triton stand-in mlstm-kernels needs on CPU); raises
    ImportError (or whatever the import raises) when the peer is not installed."""
    sys.modules.setdefault("jax_triton", types.ModuleType("jax_triton"))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    # Triton before TensorFlow (the trainer's loggers import it): both bundle LLVM, and the process
    # aborts on duplicate LLVM options when Triton's copy is loaded second.
    import triton  # noqa: F401
    import xlstm_jax
    from xlstm_jax.trainer.llm.trainer import LLMTrainer  # noqa: F401 - the trainer must import

    logging.getLogger("xlstm_jax").setLevel(logging.WARNING)
    return xlstm_jax


def _pick(cls: type, ours: dict[str, Any], **extra: Any) -> Any:
    """``cls`` built from the entries of our config dict that are its init fields (the reference's
    field names are ours), plus ``extra``."""
    names = {f.name for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")}
    kwargs = {k: v for k, v in ours.items() if k in names and k not in extra}
    kwargs = {
        k: tuple(v) if isinstance(v, list) and k.endswith("_range") else v
        for k, v in kwargs.items()
    }
    return cls(**kwargs, **extra)


def reference_model_config(config: Any) -> tuple[type, Any, Any]:
    """``(model class, its config, parallel config)`` of the reference for our `config`
    (an `xLSTMLMModelConfig` of mLSTM blocks or a `LlamaConfig`), on a mesh of size 1."""
    from xlstm_jax.models.configs import ParallelConfig

    parallel = ParallelConfig(remat=[], fsdp_modules=[])
    ours = config.to_dict()
    if "head_dim" in ours:
        from xlstm_jax.models.llama.llama import LlamaConfig, LlamaTransformer

        return LlamaTransformer, _pick(LlamaConfig, ours, parallel=parallel), parallel
    from xlstm_jax.models.xlstm_parallel.blocks.mlstm.block import mLSTMBlockConfig
    from xlstm_jax.models.xlstm_parallel.blocks.mlstm.cell import (
        mLSTMBackendNameAndKwargs,
        mLSTMCellConfig,
    )
    from xlstm_jax.models.xlstm_parallel.blocks.mlstm.layer import mLSTMLayerConfig
    from xlstm_jax.models.xlstm_parallel.components.feedforward import FeedForwardConfig
    from xlstm_jax.models.xlstm_parallel.xlstm_lm_model import xLSTMLMModel, xLSTMLMModelConfig

    if ours.get("slstm_at"):
        raise ValueError("xlstm-jax has no Flax sLSTM block")
    block = ours["mlstm_block"]
    layer, ffn = block["mlstm"], block["feedforward"]
    chunk = int((layer["mlstm_cell"]["backend"].get("kwargs") or {}).get("chunk_size", 64))
    backend = mLSTMBackendNameAndKwargs(
        name=MLSTM_BACKEND["name"], kwargs={**MLSTM_BACKEND["kwargs"], "chunk_size": chunk}
    )
    cell = _pick(mLSTMCellConfig, layer["mlstm_cell"], backend=backend)
    model = _pick(
        xLSTMLMModelConfig,
        ours,
        parallel=parallel,
        mlstm_block=_pick(
            mLSTMBlockConfig,
            block,
            mlstm=_pick(mLSTMLayerConfig, layer, mlstm_cell=cell),
            feedforward=None if ffn is None else _pick(FeedForwardConfig, ffn),
        ),
    )
    return xLSTMLMModel, model, parallel


def reference_train_step(
    config: Any, seq_len: int, batch_size: int, train: Any
) -> tuple[Callable[[], Any], int]:
    """xlstm-jax's trainer for our model `config` and optimizer settings `train` (a
    `TrainConfig`: lr, betas, eps, weight decay on kernels, grad clip), on random tokens
    ``(batch_size, seq_len)``. Returns ``(one_step, parameter count)``; ``one_step()`` runs one
    train step (donating the state, as the trainer does) and returns a value to block on."""
    import jax
    import numpy as np
    from jax.sharding import Mesh
    from xlstm_jax.dataset import LLMBatch
    from xlstm_jax.models import ModelConfig
    from xlstm_jax.trainer.llm.trainer import LLMTrainer, LLMTrainerConfig
    from xlstm_jax.trainer.optimizer import OptimizerConfig, SchedulerConfig

    model_class, model_config, parallel = reference_model_config(config)
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1, 1), ("dp", "fsdp", "pp", "tp"))
    optimizer = OptimizerConfig(
        name="adamw",
        scheduler=SchedulerConfig(
            name="cosine_decay", lr=train.lr, warmup_steps=10, decay_steps=1000
        ),
        beta1=train.beta1,
        beta2=train.beta2,
        eps=train.adam_eps,
        weight_decay=train.weight_decay,
        weight_decay_include=[r".*kernel"],
        grad_clip_norm=train.grad_clip,
    )
    trainer = LLMTrainer(
        LLMTrainerConfig(logger=None, callbacks=(), log_grad_norm=False, log_param_norm=False),
        ModelConfig(model_class=model_class, parallel=parallel, model_config=model_config),
        optimizer,
        batch=LLMBatch.get_dtype_struct(batch_size=batch_size, max_length=seq_len),
        mesh=mesh,
    )
    tokens = jax.random.randint(
        jax.random.PRNGKey(1), (batch_size, seq_len + 1), 0, config.vocab_size
    )
    batch = LLMBatch.from_inputs(inputs=tokens[:, :-1], targets=tokens[:, 1:])
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainer.state.params))
    metrics = trainer.init_train_metrics(batch)

    def one_step() -> Any:
        nonlocal metrics
        trainer.state, metrics = trainer.train_step(trainer.state, batch, metrics)
        return metrics

    return one_step, n_params
