"""The xLSTM-7B mLSTM layer, ``layer_type="mlstm_v1"``: dense q/k/v/o straight from the block
input, the cell (`mLSTMCell`: gates from the block input, per-head norm), a sigmoid output gate,
``(B, S, D) -> (B, S, D)``; see docs/architecture.md, "The mlstm_v1 layer".
"""

from collections.abc import Mapping
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, Bool, Float, PRNGKeyArray

from ..nn.functional import dropout, matmul_rows, sigmoid
from ..nn.init import small_initializer, zeros_init
from ..nn.linear import Dense
from .mlstm_cell import check_heads_divide, mLSTMCell
from .mlstm_config import mLSTMLayerConfig
from .mlstm_layer import down_projection, mLSTMLayerState, up_projection


# the xLSTM-7B layer (docs/architecture.md, "The mlstm_v1 layer")


def mlstm_v1_dims(config: mLSTMLayerConfig) -> tuple[int, int]:
    """(Dqk, Dv) of an ``mlstm_v1`` layer config, validated."""
    D = config.embedding_dim
    qk_dim, v_dim = int(D * config.qk_dim_factor), int(D * config.v_dim_factor)
    check_heads_divide(
        "num_heads: qk dim (embedding_dim * qk_dim_factor)", qk_dim, config.num_heads
    )
    check_heads_divide("num_heads: v dim (embedding_dim * v_dim_factor)", v_dim, config.num_heads)
    return qk_dim, v_dim


class mLSTMLayerV1(eqx.Module):
    """The xLSTM-7B mLSTM layer, ``layer_type="mlstm_v1"``: ``(B, S, D) -> (B, S, D)``.

    Dense q, k, v, o on x (o kernel zero, so σ(o) = ½ at init); the cell with its gates on x
    (Dense D → NH in gate_dtype, kernel zero, bias per the cell config), soft cap, document reset
    and a per-head out-norm of type ``norm_type_v1``; ``σ(o) ⊙ h``; ``proj_down`` and dropout.
    """

    dense_q: Dense
    dense_k: Dense
    dense_v: Dense
    dense_o: Dense
    cell: mLSTMCell
    proj_down: Dense
    dropout_rate: float = eqx.field(static=True)
    # The reference's v1 layer holds its gates and norms itself (no mLSTMCell module), so "mLSTMCell"
    # in fsdp_modules / remat does not reach them: the cell answers to no name of its own.
    field_reference_names: ClassVar[Mapping[str, str | None]] = {"cell": None}

    def __init__(self, config: mLSTMLayerConfig, *, key: PRNGKeyArray):
        D = config.embedding_dim
        qk_dim, v_dim = mlstm_v1_dims(config)
        q_key, k_key, v_key, o_key, igate_key, fgate_key, down_key = jr.split(key, 7)
        qkv_init = small_initializer(D, config.init_distribution)
        self.dense_q = up_projection(config, qk_dim, qkv_init, key=q_key)
        self.dense_k = up_projection(config, qk_dim, qkv_init, key=k_key)
        self.dense_v = up_projection(config, v_dim, qkv_init, key=v_key)
        self.dense_o = up_projection(config, v_dim, zeros_init, key=o_key)
        self.cell = mLSTMCell(
            config.mlstm_cell,
            gate_in_features=D,
            qk_dim=qk_dim,
            v_dim=v_dim,
            dtype=config.dtype,
            layer_type="mlstm_v1",
            key=(igate_key, fgate_key),
        )
        self.proj_down = down_projection(config, v_dim, key=down_key)
        self.dropout_rate = float(config.dropout)

    def _projections(self, x: Float[Array, "B S D"]) -> tuple[Array, Array, Array, Array]:
        """Queries, keys, values and the output-gate pre-activation."""
        return self.dense_q(x), self.dense_k(x), self.dense_v(x), self.dense_o(x)

    def _output(self, h: Float[Array, "B S DV"], ogate: Float[Array, "B S DV"]) -> Array:
        return self.proj_down(sigmoid(ogate) * h.astype(ogate.dtype))

    @jax.named_scope("mLSTMLayer")
    def __call__(
        self,
        x: Float[Array, "B S D"],
        *,
        document_borders: Bool[Array, "B S"] | None = None,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "B S D"]:
        queries, keys, values, ogate = self._projections(x)
        h = self.cell(queries, keys, values, x, document_borders=document_borders)
        return dropout(self._output(h, ogate), self.dropout_rate, key=key)

    def init_state(self, batch_size: int) -> mLSTMLayerState:
        """The decode state before any token: the empty memory (no conv window)."""
        return mLSTMLayerState(cell=self.cell.init_state(batch_size), conv=None)

    @jax.named_scope("mLSTMLayer")
    def call_with_state(
        self,
        x: Float[Array, "B S D"],
        state: mLSTMLayerState,
        *,
        document_borders: Bool[Array, "B S"] | None = None,
    ) -> tuple[Float[Array, "B S D"], mLSTMLayerState]:
        """``__call__`` (deterministic) from ``state``, returning the state after the last token:
        prefill from ``init_state``, one decode step with S = 1."""
        return self.call_from_projections(
            self._projections(x), x, state, document_borders=document_borders
        )

    def call_from_projections(
        self,
        projections: tuple[Array, Array, Array, Array],
        x: Float[Array, "B S D"],
        state: mLSTMLayerState,
        *,
        document_borders: Bool[Array, "B S"] | None = None,
    ) -> tuple[Float[Array, "B S D"], mLSTMLayerState]:
        """`call_with_state` given q, k, v and the output-gate pre-activation of `x` (the gates
        are still read off `x`)."""
        queries, keys, values, ogate = projections
        h, cell_state = self.cell.call_with_state(
            queries, keys, values, x, state.cell, document_borders=document_borders
        )
        return self._output(h, ogate), mLSTMLayerState(cell=cell_state, conv=None)


class mLSTMLayerV1Decode(eqx.Module):
    """An ``mlstm_v1`` layer prepared for decoding (`fused_decode_layer`, once per generate call;
    never stored): the layer and its q, k, v and o kernels side by side ``(D, 2·Dqk + 2·Dv)``, so
    one token of one sequence (B = S = 1) takes one matrix product instead of four, bit for bit
    the same (a row times a matrix). Any other input takes the layer's own four products (with
    more rows XLA:CPU blocks the wider product differently)."""

    layer: mLSTMLayerV1
    qkvo_kernel: Float[Array, "D F"]

    def init_state(self, batch_size: int) -> mLSTMLayerState:
        return self.layer.init_state(batch_size)

    @jax.named_scope("mLSTMLayer")
    def call_with_state(
        self,
        x: Float[Array, "B S D"],
        state: mLSTMLayerState,
        *,
        document_borders: Bool[Array, "B S"] | None = None,
    ) -> tuple[Float[Array, "B S D"], mLSTMLayerState]:
        """`mLSTMLayerV1.call_with_state`, from the fused kernel when B = S = 1."""
        layer = self.layer
        if x.shape[:2] != (1, 1):
            return layer.call_with_state(x, state, document_borders=document_borders)
        dtype = jnp.dtype(layer.dense_q.dtype)
        y = matmul_rows(x.astype(dtype), self.qkvo_kernel)  # cast once, in fused_decode_layer
        ends = np.cumsum([d.out_features for d in (layer.dense_q, layer.dense_k, layer.dense_v)])
        q, k, v, o = jnp.split(y, ends, axis=-1)
        return layer.call_from_projections(
            (q, k, v, o), x, state, document_borders=document_borders
        )


def fused_decode_layer(layer: mLSTMLayerV1) -> mLSTMLayerV1 | mLSTMLayerV1Decode:
    """`layer` with its q|k|v|o kernels side by side for decoding (`mLSTMLayerV1Decode`), or
    `layer` itself where the four products do not fuse (biases, LoRA-adapted or other `Dense`
    subclasses, mixed dtypes)."""
    dense = (layer.dense_q, layer.dense_k, layer.dense_v, layer.dense_o)
    if any(
        type(d) is not Dense or d.bias is not None or d.dtype != layer.dense_q.dtype for d in dense
    ):
        return layer
    dtype = jnp.dtype(layer.dense_q.dtype)
    kernel = jnp.concatenate([d.kernel.astype(dtype) for d in dense], axis=-1)
    return mLSTMLayerV1Decode(layer, kernel)
