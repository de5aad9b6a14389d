"""The train step that the benchmark and the profiler both measure: a preset, its optimizer and
its jitted step, on random tokens."""

import dataclasses
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

from ..llama.config import LlamaConfig
from ..models import MODEL_FAMILIES
from ..presets import get_preset
from ..training.config import TrainConfig
from ..training.optim import trainable_params
from ..training.step import optimizer_and_step
from ..xlstm.config import xLSTMLMModelConfig


def preset_model_config(model: str, size: str, seq_len: int) -> xLSTMLMModelConfig | LlamaConfig:
    """The preset ``f"{size}_{model}"``, its context raised to ``seq_len`` if shorter: the model
    the benchmark and the profiler train (and count the FLOPs of)."""
    config = get_preset(f"{size}_{model}")
    if config.context_length < seq_len:
        config = dataclasses.replace(config, context_length=seq_len)
    return config


def zeros_of_skeleton(skeleton: Any) -> Any:
    """`skeleton` (an ``eqx.filter_eval_shape`` result) with each ``jax.ShapeDtypeStruct`` made
    an array of zeros (a PRNG key: ``jr.key(0)`` of its shape): copied from host memory, so
    nothing is compiled or run."""

    def leaf(x: Any) -> Any:
        if not isinstance(x, jax.ShapeDtypeStruct):
            return x
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jnp.broadcast_to(jr.key(0), x.shape)
        return jnp.asarray(np.zeros(x.shape, x.dtype))

    return jax.tree.map(leaf, skeleton)


def train_step_setup(
    model_name: str,
    size: str,
    seq_len: int,
    batch_size: int,
    *,
    config: xLSTMLMModelConfig | LlamaConfig | None = None,
    abstract: bool = False,
) -> tuple[Any, ...]:
    """The trainer's own jitted step (`xlstm_eqx.training.step.optimizer_and_step`) for the preset
    ``f"{size}_{model_name}"`` (context raised to `seq_len` if needed), or for `config` when
    given, with its model, optimizer state and inputs: random tokens
    ``(1, batch_size, seq_len+1)`` and a key. `abstract`: the model, state and inputs are zeros
    of their shapes (`zeros_of_skeleton`; nothing initialised, seconds less on a CPU, the same
    compiled step: enough for its cost analysis).
    Returns ``(config, model, opt_state, step, inputs)``; ``step(inputs, model, opt_state)``."""

    def make(build: Callable[[], Any]) -> Any:
        return zeros_of_skeleton(eqx.filter_eval_shape(build)) if abstract else build()

    if model_name not in MODEL_FAMILIES:
        raise ValueError(f"unknown model {model_name!r}; known: {sorted(MODEL_FAMILIES)}")
    family = MODEL_FAMILIES[model_name]
    if config is None:
        config = preset_model_config(model_name, size, seq_len)
    vocab_size = config.vocab_size
    model = make(lambda: family.build(config, key=jr.key(0)))
    cfg = TrainConfig(model=model_name, seq_len=seq_len, batch_size=batch_size, steps=1000)
    optimizer, step = optimizer_and_step(cfg, model, config, family)
    opt_state = make(lambda: optimizer.init(trainable_params(model)))
    shape = (1, batch_size, seq_len + 1)
    inputs = make(lambda: (jr.randint(jr.key(1), shape, 0, vocab_size, jnp.int32), jr.key(2)))
    return config, model, opt_state, step, inputs
