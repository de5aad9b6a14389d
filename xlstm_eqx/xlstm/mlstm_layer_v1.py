"""The xLSTM-7B mLSTM layer, ``layer_type="mlstm_v1"``: dense q/k/v/o and gates straight from the
block input, the cell, a per-head norm and a sigmoid output gate, ``(B, S, D) -> (B, S, D)``;
see docs/architecture.md, "The mlstm_v1 layer".
"""

from typing import Any

import equinox as eqx
import jax
import jax.random as jr
from jaxtyping import Array, Bool, Float, PRNGKeyArray

from ..cell.backends import resolve_backend
from ..cell.forms import mLSTMState
from ..nn.axes import REPLICATED
from ..nn.functional import dropout
from ..nn.init import output_initializer, small_initializer, zeros_init
from ..nn.linear import Dense
from ..nn.norm import LayerNorm, MultiHeadNorm, RMSNorm, make_norm
from .mlstm_cell import (
    _cell_call,
    _cell_opts,
    _cell_step,
    _check_divides,
    _gate_preacts,
    _make_gate,
)
from .mlstm_config import mLSTMLayerConfig
from .mlstm_layer import mLSTMLayerState


# the xLSTM-7B layer (docs/architecture.md, "The mlstm_v1 layer")


def _v1_dims(config: mLSTMLayerConfig) -> tuple[int, int]:
    D = config.embedding_dim
    qk_dim, v_dim = int(D * config.qk_dim_factor), int(D * config.v_dim_factor)
    _check_divides("num_heads: qk dim (embedding_dim * qk_dim_factor)", qk_dim, config.num_heads)
    _check_divides("num_heads: v dim (embedding_dim * v_dim_factor)", v_dim, config.num_heads)
    return qk_dim, v_dim


class mLSTMLayerV1(eqx.Module):
    """The xLSTM-7B mLSTM layer, ``layer_type="mlstm_v1"``: ``(B, S, D) -> (B, S, D)``.

    Dense q, k, v, o on x (o kernel zero, so σ(o) = ½ at init); gates from x (Dense D → NH in
    gate_dtype, kernel zero, bias per the cell config), soft cap, document reset; the cell; a
    per-head out-norm of type ``norm_type_v1``; ``σ(o) ⊙ h``; ``proj_down`` and dropout.
    """

    dense_q: Dense
    dense_k: Dense
    dense_v: Dense
    dense_o: Dense
    igate: Dense
    fgate: Dense
    q_norm: LayerNorm | RMSNorm | None
    k_norm: LayerNorm | RMSNorm | None
    outnorm: MultiHeadNorm
    proj_down: Dense
    num_heads: int = eqx.field(static=True)
    backend: str = eqx.field(static=True)
    backend_kwargs: tuple[tuple[str, Any], ...] = eqx.field(static=True)
    gate_soft_cap: float | None = eqx.field(static=True)
    reset_at_document_boundaries: bool = eqx.field(static=True)
    reset_fgate_value: float = eqx.field(static=True)
    dropout_rate: float = eqx.field(static=True)

    def __init__(self, config: mLSTMLayerConfig, *, key: PRNGKeyArray):
        cell = config.mlstm_cell
        D, nh = config.embedding_dim, config.num_heads
        qk_dim, v_dim = _v1_dims(config)
        kq, kk, kv, ko, ki, kf, kdown = jr.split(key, 7)
        dense = dict(use_bias=config.bias, dtype=config.dtype)
        qkv_init = small_initializer(D, config.init_distribution)
        # Column-parallel q/k/v/o, a row-parallel proj_down (logical axes: nn.axes).
        up = dict(axes=("embed", "mlp"), **dense)
        self.dense_q = Dense(D, qk_dim, kernel_init=qkv_init, key=kq, **up)
        self.dense_k = Dense(D, qk_dim, kernel_init=qkv_init, key=kk, **up)
        self.dense_v = Dense(D, v_dim, kernel_init=qkv_init, key=kv, **up)
        self.dense_o = Dense(D, v_dim, kernel_init=zeros_init, key=ko, **up)
        gate = dict(headwise=False, gate_dtype=cell.gate_dtype)
        self.igate = _make_gate(D, nh, bias_init_range=cell.igate_bias_init_range, key=ki, **gate)
        self.fgate = _make_gate(D, nh, bias_init_range=cell.fgate_bias_init_range, key=kf, **gate)
        if cell.add_qk_norm:
            norm = dict(eps=cell.norm_eps, dtype=config.dtype, axes=("head_dim",))
            self.q_norm = make_norm(config.norm_type, qk_dim // nh, **norm)
            self.k_norm = make_norm(config.norm_type, qk_dim // nh, **norm)
        else:
            self.q_norm = self.k_norm = None
        self.outnorm = MultiHeadNorm(
            nh, v_dim // nh, norm_type=cell.norm_type_v1, eps=cell.norm_eps, dtype=config.dtype
        )
        down_init = output_initializer(
            config.output_init_fn, D, config._num_blocks or 1, config.init_distribution
        )
        self.proj_down = Dense(
            v_dim,
            D,
            kernel_init=down_init,
            axes=("mlp", "embed"),
            bias_axes=REPLICATED,
            key=kdown,
            **dense,
        )
        self.num_heads = nh
        self.backend, self.backend_kwargs = resolve_backend(cell.backend)
        opts = _cell_opts(cell)
        self.gate_soft_cap = opts["gate_soft_cap"]
        self.reset_at_document_boundaries = opts["reset"]
        self.reset_fgate_value = opts["reset_value"]
        self.dropout_rate = float(config.dropout)

    def _gates(
        self, x: Float[Array, "B S D"], document_borders: Bool[Array, "B S"] | None
    ) -> tuple[Array, Array]:
        return _gate_preacts(
            self.igate,
            self.fgate,
            x,
            document_borders,
            gate_soft_cap=self.gate_soft_cap,
            reset=self.reset_at_document_boundaries,
            reset_value=self.reset_fgate_value,
        )

    def _run(
        self,
        x: Float[Array, "B S D"],
        document_borders: Bool[Array, "B S"] | None,
        key: PRNGKeyArray | None,
        initial_state: mLSTMLayerState | None,
        return_last_state: bool,
    ) -> tuple[Float[Array, "B S D"], mLSTMLayerState | None]:
        q, k, v, o = self.dense_q(x), self.dense_k(x), self.dense_v(x), self.dense_o(x)
        i, f = self._gates(x, document_borders)
        h, cell_state = _cell_call(
            self.backend,
            self.backend_kwargs,
            self.num_heads,
            q,
            k,
            v,
            i,
            f,
            self.q_norm,
            self.k_norm,
            self.outnorm,
            initial_state=None if initial_state is None else initial_state.cell,
            return_last_state=return_last_state,
        )
        y = self.proj_down(jax.nn.sigmoid(o) * h.astype(o.dtype))
        y = dropout(y, self.dropout_rate, key=key)
        state = None if cell_state is None else mLSTMLayerState(cell=cell_state, conv=None)
        return y, state

    @jax.named_scope("mLSTMLayer")
    def __call__(
        self,
        x: Float[Array, "B S D"],
        *,
        document_borders: Bool[Array, "B S"] | None = None,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "B S D"]:
        return self._run(x, document_borders, key, None, False)[0]

    def prefill(
        self,
        x: Float[Array, "B S D"],
        *,
        document_borders: Bool[Array, "B S"] | None = None,
        initial_state: mLSTMLayerState | None = None,
    ) -> tuple[Float[Array, "B S D"], mLSTMLayerState]:
        """Full sequence, deterministic, returning the decode state after its last token."""
        y, state = self._run(x, document_borders, None, initial_state, True)
        assert state is not None
        return y, state

    def init_state(self, batch_size: int) -> mLSTMLayerState:
        nh = self.num_heads
        qk_dim, v_dim = self.dense_q.out_features, self.dense_v.out_features
        return mLSTMLayerState(
            cell=mLSTMState.zeros(batch_size, nh, qk_dim // nh, v_dim // nh), conv=None
        )

    def step(
        self,
        state: mLSTMLayerState,
        x_t: Float[Array, "B D"],
        *,
        document_border: Bool[Array, " B"] | None = None,
    ) -> tuple[Float[Array, "B D"], mLSTMLayerState]:
        """One decode step ``(B, D) -> (B, D)`` with the recurrent cell form."""
        q, k, v, o = self.dense_q(x_t), self.dense_k(x_t), self.dense_v(x_t), self.dense_o(x_t)
        borders = None if document_border is None else document_border[:, None]
        i, f = self._gates(x_t[:, None], borders)
        eps = float(dict(self.backend_kwargs).get("eps", 1e-6))
        h, cell_state = _cell_step(
            self.num_heads,
            eps,
            state.cell,
            q,
            k,
            v,
            i[:, 0],
            f[:, 0],
            self.q_norm,
            self.k_norm,
            self.outnorm,
        )
        y = self.proj_down(jax.nn.sigmoid(o) * h.astype(o.dtype))
        return y, mLSTMLayerState(cell=cell_state, conv=None)
