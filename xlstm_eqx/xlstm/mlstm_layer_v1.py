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
    # q|k|v|o kernels side by side (D, 2·Dqk + 2·Dv) for one-token decoding, set by
    # `with_decode_kernel` once per generate call; None (no leaf) in every stored model
    decode_kernel: Float[Array, "D F"] | None = None
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
        self.decode_kernel = None

    def _projections(self, x: Float[Array, "B S D"]) -> tuple[Array, Array, Array, Array]:
        """Queries, keys, values and the output-gate pre-activation."""
        return self.dense_q(x), self.dense_k(x), self.dense_v(x), self.dense_o(x)

    def with_decode_kernel(self) -> "mLSTMLayerV1":
        """This layer with `decode_kernel` set (no biases only): one matrix product for q, k, v
        and o of a single token (B = S = 1), where it equals the four products bit for bit (a
        row times a matrix; with more rows XLA:CPU blocks the product differently)."""
        dense = (self.dense_q, self.dense_k, self.dense_v, self.dense_o)
        # (LoRA-adapted projections, Dense subclasses, keep their own products)
        if any(
            type(d) is not Dense or d.bias is not None or d.dtype != self.dense_q.dtype
            for d in dense
        ):
            return self
        kernel = jnp.concatenate([d.kernel for d in dense], axis=-1)
        return eqx.tree_at(lambda m: m.decode_kernel, self, kernel, is_leaf=lambda x: x is None)

    def _decode_projections(self, x: Float[Array, "1 1 D"]) -> tuple[Array, Array, Array, Array]:
        """`_projections` of one token from `decode_kernel`."""
        assert self.decode_kernel is not None
        dtype = jnp.dtype(self.dense_q.dtype)
        y = matmul_rows(x.astype(dtype), self.decode_kernel.astype(dtype))
        ends = np.cumsum([d.out_features for d in (self.dense_q, self.dense_k, self.dense_v)])
        q, k, v, o = jnp.split(y, ends, axis=-1)
        return q, k, v, o

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
        if self.decode_kernel is not None and x.shape[:2] == (1, 1):
            queries, keys, values, ogate = self._decode_projections(x)
        else:
            queries, keys, values, ogate = self._projections(x)
        h, cell_state = self.cell.call_with_state(
            queries, keys, values, x, state.cell, document_borders=document_borders
        )
        return self._output(h, ogate), mLSTMLayerState(cell=cell_state, conv=None)
