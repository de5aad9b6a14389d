"""The train step that the benchmark and the profiler both measure: a preset, its optimizer and
its jitted step, on random tokens."""

import dataclasses
from typing import Any

import jax.numpy as jnp
import jax.random as jr

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


def train_step_setup(model_name: str, size: str, seq_len: int, batch_size: int) -> tuple[Any, ...]:
    """The trainer's own jitted step (`xlstm_eqx.training.step.optimizer_and_step`) for the preset
    ``f"{size}_{model_name}"`` (context raised to `seq_len` if needed) with its model, optimizer
    state and inputs: random tokens ``(1, batch_size, seq_len+1)`` and a key.
    Returns ``(config, model, opt_state, step, inputs)``; ``step(inputs, model, opt_state)``."""

    if model_name not in MODEL_FAMILIES:
        raise ValueError(f"unknown model {model_name!r}; known: {sorted(MODEL_FAMILIES)}")
    family = MODEL_FAMILIES[model_name]
    config = preset_model_config(model_name, size, seq_len)
    model = family.build(config, key=jr.key(0))
    cfg = TrainConfig(model=model_name, seq_len=seq_len, batch_size=batch_size, steps=1000)
    optimizer, step = optimizer_and_step(cfg, model, config, family)
    opt_state = optimizer.init(trainable_params(model))
    batch = jr.randint(jr.key(1), (1, batch_size, seq_len + 1), 0, config.vocab_size, jnp.int32)
    return config, model, opt_state, step, (batch, jr.key(2))
