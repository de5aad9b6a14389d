"""`CausalConv1d`: the depthwise causal convolution over the sequence axis used by the mLSTM and
sLSTM layers, with a rolling ``(B, K, C)`` window for decoding.
"""

import copy
import math
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Bool, Float, PRNGKeyArray

from ..core.utils import dtype_name
from .axes import LogicalAxes
from .context import with_left_context


# causal depthwise convolution (docs/architecture.md, "Building blocks")


class CausalConv1d(eqx.Module):
    """Causal depthwise conv over the sequence axis, computed in ``dtype``.

    ``y[t, c] = b[c] + Σ_{j<K} kernel[j, c] · x[t − (K−1) + j, c]`` with ``x[<0] = 0``: ``kernel[K−1]``
    weights the current token. kernel ``(K, C)`` — the Flax ``(K, 1, C)`` with the singleton
    depthwise axis dropped (reshape when converting). ``K = 0`` is the identity (no params).
    Init: kernel and bias ``U(−1/√K, 1/√K)`` (PyTorch default, fan-in K).

    Decoding keeps a rolling state ``(B, K, C)`` of the last K inputs: see ``init_state``/``step``.
    ``channels_axis`` is the logical name of C (``nn.axes``), e.g. ``"mlp"``.
    ``context_axis`` (static; set by `parallel.with_context_parallel` inside its shard_map): the
    mesh axis the sequence is split over; the conv then reads its K−1 steps of left context from
    the previous device (`nn.context.with_left_context`).
    """

    kernel: Float[Array, "K C"] | None
    bias: Float[Array, " C"] | None
    kernel_size: int = eqx.field(static=True)
    channels: int = eqx.field(static=True)
    dtype: str = eqx.field(static=True)
    kernel_axes: LogicalAxes | None = eqx.field(static=True)
    bias_axes: LogicalAxes | None = eqx.field(static=True)
    context_axis: str | None = eqx.field(static=True)

    def __init__(
        self,
        channels: int,
        kernel_size: int = 4,
        *,
        use_bias: bool = True,
        dtype: Any = "float32",
        channels_axis: str | None = None,
        key: PRNGKeyArray,
    ):
        if kernel_size < 0:
            raise ValueError(f"conv1d_kernel_size must be >= 0, got {kernel_size}")
        if channels <= 0:
            raise ValueError(f"CausalConv1d channels must be positive, got {channels}")
        self.kernel_size = kernel_size
        self.channels = channels
        self.dtype = dtype_name(dtype)
        self.kernel_axes = None if channels_axis is None else ("conv_window", channels_axis)
        self.bias_axes = None if channels_axis is None else (channels_axis,)
        self.context_axis = None
        if kernel_size == 0:
            self.kernel = None
            self.bias = None
            return
        bound = 1.0 / math.sqrt(kernel_size)
        kkey, bkey = jr.split(key)
        self.kernel = jr.uniform(
            kkey, (kernel_size, channels), jnp.float32, minval=-bound, maxval=bound
        )
        self.bias = (
            jr.uniform(bkey, (channels,), jnp.float32, minval=-bound, maxval=bound)
            if use_bias
            else None
        )

    @jax.named_scope("CausalConv1d")
    def __call__(
        self,
        x: Float[Array, "*batch S C"],
        document_borders: Bool[Array, "*batch S"] | None = None,
    ) -> Float[Array, "*batch S C"]:
        """Full sequence ``(..., S, C) -> (..., S, C)``. With ``document_borders`` (True where a
        token starts a document) a tap never reads a token of an earlier document, as if each
        document were zero-padded on its own (packed fine-tuning examples)."""
        if self.kernel is None:
            return x
        if self.context_axis is not None:
            length, axis = self.kernel_size - 1, self.context_axis
            return with_left_context(self.on_one_device(), x, length, axis, document_borders)
        dtype = jnp.dtype(self.dtype)
        K, S = self.kernel_size, x.shape[-2]
        x = x.astype(dtype)
        w = self.kernel.astype(dtype)
        pad = [(0, 0)] * (x.ndim - 2) + [(K - 1, 0), (0, 0)]
        xp = jnp.pad(x, pad)
        if document_borders is not None:
            doc = jnp.cumsum(document_borders.astype(jnp.int32), axis=-1)
            doc_p = jnp.pad(doc, pad[:-1], constant_values=-1)
            taps = [
                xp[..., j : j + S, :] * (doc_p[..., j : j + S] == doc)[..., None].astype(dtype)
                for j in range(K)
            ]
        else:
            taps = [xp[..., j : j + S, :] for j in range(K)]
        y = taps[0] * w[0]
        for j in range(1, K):
            y = y + taps[j] * w[j]
        if self.bias is not None:
            y = y + self.bias.astype(dtype)
        return y

    def on_one_device(self) -> "CausalConv1d":
        """This conv with ``context_axis`` unset (the same arrays): the conv of one segment."""
        out = copy.copy(self)
        object.__setattr__(out, "context_axis", None)
        return out

    def init_state(self, batch_size: int) -> Float[Array, "B K C"]:
        """Zero conv state (the last K inputs) for decoding."""
        return jnp.zeros((batch_size, self.kernel_size, self.channels), jnp.dtype(self.dtype))

    def state_from_sequence(self, x: Float[Array, "B S C"]) -> Float[Array, "B K C"]:
        """The conv state after consuming ``x``: its last K inputs, zero-padded on the left."""
        K = self.kernel_size
        xp = jnp.pad(x.astype(jnp.dtype(self.dtype)), ((0, 0), (K, 0), (0, 0)))
        return xp[:, xp.shape[1] - K :, :]

    def step(
        self, state: Float[Array, "B K C"], x_t: Float[Array, "B C"]
    ) -> tuple[Float[Array, "B C"], Float[Array, "B K C"]]:
        """One decode step: push ``x_t`` into the window and return ``(y_t, new_state)``."""
        if self.kernel is None:
            return x_t, state
        dtype = jnp.dtype(self.dtype)
        state = jnp.concatenate([state[:, 1:, :], x_t.astype(dtype)[:, None, :]], axis=1)
        y = jnp.sum(state * self.kernel.astype(dtype), axis=1)
        if self.bias is not None:
            y = y + self.bias.astype(dtype)
        return y, state
