"""`mLSTMCell`: between an mLSTM layer and the cell functions of `xlstm_eqx.cell`. It holds the
gates, the optional q/k norm, the backend choice and the per-head out-norm, for both layer types
(the ``mlstm`` inner layer and the ``mlstm_v1`` layer each hold one).

Activations here are ``(B, S, NH·DH)``; heads are split to ``(B, NH, S, DH)`` for the cell and
merged after the per-head norm. Gate pre-activations are ``(B, S, NH)`` in ``gate_dtype`` (float32
by default). See docs/architecture.md, "The mlstm layer" and "Gates and document reset".
"""

from typing import Any, ClassVar, Literal

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Bool, Float, PRNGKeyArray

from ..cell.backends import resolve_backend, run_backend, run_backend_with_state
from ..cell.context import mlstm_chunkwise_context_parallel
from ..cell.forms import mlstm_recurrent_step, mLSTMState
from ..nn.functional import soft_cap
from ..nn.init import bias_linspace_init, zeros_init
from ..nn.linear import Dense, LinearHeadwiseExpand
from ..nn.norm import LayerNorm, MultiHeadNorm, RMSNorm, make_norm
from .mlstm_config import mLSTMCellConfig


def check_heads_divide(field: str, value: int, num_heads: int) -> None:
    """A ValueError naming ``field`` unless ``value`` is positive and a multiple of the heads."""
    if value <= 0 or value % num_heads != 0:
        raise ValueError(
            f"{field} ({value}) must be positive and divisible by num_heads ({num_heads})"
        )


def _make_gate(
    in_features: int,
    num_heads: int,
    *,
    headwise: bool,
    gate_dtype: str,
    bias_init_range: Any,
    key: PRNGKeyArray,
) -> Dense | LinearHeadwiseExpand:
    """A gate layer in → NH, kernel zeros, bias from ``bias_init_range``, computed in gate_dtype.

    Dense over all features, or headwise (NH blocks, one output each: head h sees only its own
    slice of the features)."""
    if headwise:
        if in_features % num_heads != 0:
            raise ValueError(
                f"gate_linear_headwise: gate input features ({in_features}) must be divisible "
                f"by num_heads ({num_heads})"
            )
        layer: Dense | LinearHeadwiseExpand = LinearHeadwiseExpand(
            in_features,
            num_heads,
            num_heads,
            use_bias=True,
            dtype=gate_dtype,
            kernel_init=zeros_init,
            features_axis="heads",
            key=key,
        )
    else:
        layer = Dense(
            in_features,
            num_heads,
            use_bias=True,
            dtype=gate_dtype,
            kernel_init=zeros_init,
            axes=("gate_features", "heads"),
            key=key,
        )
    if isinstance(bias_init_range, list):
        bias_init_range = tuple(bias_init_range)
    bias = bias_linspace_init(bias_init_range, num_heads, key=key)
    return eqx.tree_at(lambda gate: gate.bias, layer, bias)


def _split_heads(x: Float[Array, "B S F"], num_heads: int) -> Float[Array, "B NH S DH"]:
    """(B, S, NH·DH) -> (B, NH, S, DH)."""
    batch, seq_len, _ = x.shape
    return x.reshape(batch, seq_len, num_heads, -1).transpose(0, 2, 1, 3)


class mLSTMCell(eqx.Module):
    """Gates, optional q/k norm, backend and per-head out-norm of an mLSTM layer.

    ``__call__(q, k, v, gate_input)`` with q/k ``(B, S, NH·DHQK)``, v ``(B, S, NH·DHV)`` and gate
    features ``(B, S, G)`` (see ``gate_features``) returns the per-head-normalised cell output
    ``(B, S, NH·DHV)`` in the compute dtype; ``call_with_state`` does the same from a state
    (``init_state``) and returns the state after the last token.

    Gates: Dense ``G → NH`` or headwise (``gate_linear_headwise``), kernels zero, biases from
    ``igate_bias_init_range`` / ``fgate_bias_init_range`` (pair → linspace over heads, float →
    constant, None → N(0, 0.1²)), in ``gate_dtype``; soft cap ``gate_soft_cap``; then, with
    ``reset_at_document_boundaries`` and borders given, ``f̃ ← reset_fgate_value`` at each border
    (the first token of a document) so that the memory of earlier documents is wiped.

    ``context_axis`` (static, set by `parallel.with_context_parallel` inside its shard_map): the
    mesh axis the sequence is split over; the cell then runs `cell.context`'s chunkwise form
    across devices (whatever the backend; its chunk_size and eps are used), not the backend.
    """

    igate: Dense | LinearHeadwiseExpand
    fgate: Dense | LinearHeadwiseExpand
    q_norm: LayerNorm | RMSNorm | None
    k_norm: LayerNorm | RMSNorm | None
    outnorm: MultiHeadNorm
    num_heads: int = eqx.field(static=True)
    qk_head_dim: int = eqx.field(static=True)
    v_head_dim: int = eqx.field(static=True)
    gate_linear_headwise: bool = eqx.field(static=True)
    backend: str = eqx.field(static=True)
    backend_kwargs: tuple[tuple[str, Any], ...] = eqx.field(static=True)
    gate_soft_cap: float | None = eqx.field(static=True)
    reset_at_document_boundaries: bool = eqx.field(static=True)
    reset_fgate_value: float = eqx.field(static=True)
    context_axis: str | None = eqx.field(static=True)
    reference_name: ClassVar[str] = "mLSTMCell"  # fsdp_modules / remat name

    def __init__(
        self,
        config: mLSTMCellConfig,
        *,
        gate_in_features: int,
        qk_dim: int,
        v_dim: int,
        dtype: str,
        layer_type: Literal["mlstm", "mlstm_v1"] = "mlstm",
        key: PRNGKeyArray | tuple[PRNGKeyArray, PRNGKeyArray],
    ):
        """``qk_dim``/``v_dim`` are the total (all heads) q/k and v widths, ``gate_in_features``
        the width of the gate features. ``layer_type="mlstm_v1"``: dense gates whatever
        ``gate_linear_headwise`` says and the out-norm of ``norm_type_v1``. ``key`` is split into
        the two gate keys, or is that pair (the ``mlstm_v1`` layer draws them in its own split)."""
        nh = config.num_heads
        check_heads_divide("mlstm_cell.num_heads: qk dim", qk_dim, nh)
        check_heads_divide("mlstm_cell.num_heads: v dim", v_dim, nh)
        self.backend, self.backend_kwargs = resolve_backend(config.backend)
        ikey, fkey = key if isinstance(key, tuple) else jr.split(key)
        headwise = layer_type == "mlstm" and bool(config.gate_linear_headwise)

        def gate(bias_init_range: Any, gate_key: PRNGKeyArray) -> Dense | LinearHeadwiseExpand:
            return _make_gate(
                gate_in_features,
                nh,
                headwise=headwise,
                gate_dtype=config.gate_dtype,
                bias_init_range=bias_init_range,
                key=gate_key,
            )

        def qk_norm() -> LayerNorm | RMSNorm:
            head_dim = qk_dim // nh
            return make_norm(
                config.norm_type, head_dim, eps=config.norm_eps, dtype=dtype, axes=("head_dim",)
            )

        self.igate = gate(config.igate_bias_init_range, ikey)
        self.fgate = gate(config.fgate_bias_init_range, fkey)
        if config.add_qk_norm:
            self.q_norm, self.k_norm = qk_norm(), qk_norm()
        else:
            self.q_norm = self.k_norm = None
        out_type = config.norm_type_v1 if layer_type == "mlstm_v1" else config.norm_type
        self.outnorm = MultiHeadNorm(
            nh, v_dim // nh, norm_type=out_type, eps=config.norm_eps, dtype=dtype
        )
        self.num_heads, self.qk_head_dim, self.v_head_dim = nh, qk_dim // nh, v_dim // nh
        self.gate_linear_headwise = headwise
        cap = config.gate_soft_cap
        self.gate_soft_cap = None if cap is None else float(cap)
        self.reset_at_document_boundaries = bool(config.reset_at_document_boundaries)
        self.reset_fgate_value = float(config.reset_fgate_value)
        self.context_axis = None

    def gate_features(self, *inputs: Float[Array, "B S _"]) -> Float[Array, "B S G"]:
        """Gate features from one or several inputs: concatenated on the last axis for a dense
        gate; for a headwise gate each input is split into heads and concatenated per head, so
        head h sees ``[q_h | k_h | v_h]``."""
        if len(inputs) == 1:
            return inputs[0]
        if not self.gate_linear_headwise:
            return jnp.concatenate(inputs, axis=-1)
        b, s = inputs[0].shape[:2]
        per_head = [x.reshape(b, s, self.num_heads, -1) for x in inputs]
        return jnp.concatenate(per_head, axis=-1).reshape(b, s, -1)

    def gates(
        self, gate_input: Float[Array, "B S G"], document_borders: Bool[Array, "B S"] | None
    ) -> tuple[Float[Array, "B S NH"], Float[Array, "B S NH"]]:
        """ĩ, f̃ (float32 for gate_dtype float32): soft cap first, then the document reset of f̃
        (docs/architecture.md, "Gates and document reset"; the reset value lies deliberately
        outside the cap)."""
        igate = soft_cap(self.igate(gate_input), self.gate_soft_cap)
        fgate = soft_cap(self.fgate(gate_input), self.gate_soft_cap)
        if self.reset_at_document_boundaries and document_borders is not None:
            reset = jnp.asarray(self.reset_fgate_value, fgate.dtype)
            fgate = jnp.where(document_borders[..., None], reset, fgate)
        return igate, fgate

    def _cell_inputs(
        self, q: Array, k: Array, v: Array, gate_input: Array, document_borders: Array | None
    ) -> tuple[Array, Array, Array, Array, Array]:
        """(B, NH, S, DH) queries, keys, values (q/k normalised) and (B, NH, S) ĩ, f̃."""
        igate, fgate = self.gates(gate_input, document_borders)
        queries, keys, values = (_split_heads(x, self.num_heads) for x in (q, k, v))
        if self.q_norm is not None and self.k_norm is not None:
            queries, keys = self.q_norm(queries), self.k_norm(keys)
        return queries, keys, values, igate.transpose(0, 2, 1), fgate.transpose(0, 2, 1)

    def _merge_heads(self, h: Float[Array, "B NH S DHV"]) -> Float[Array, "B S DV"]:
        """Per-head out-norm, then (B, NH, S, DHV) -> (B, S, NH·DHV)."""
        h = self.outnorm(h.transpose(0, 2, 1, 3))  # (B, S, NH, DHV), normalised per head
        return h.reshape(*h.shape[:2], -1)

    def __call__(
        self,
        q: Float[Array, "B S DQK"],
        k: Float[Array, "B S DQK"],
        v: Float[Array, "B S DV"],
        gate_input: Float[Array, "B S G"],
        *,
        document_borders: Bool[Array, "B S"] | None = None,
    ) -> Float[Array, "B S DV"]:
        """The training path: the stateless backend call (the parallel form stays parallel)."""
        inputs = self._cell_inputs(q, k, v, gate_input, document_borders)
        if self.context_axis is not None:
            return self._merge_heads(self._across_devices(inputs, None)[0])
        return self._merge_heads(run_backend(self.backend, self.backend_kwargs, *inputs))

    def _across_devices(
        self, inputs: tuple[Array, ...], state: mLSTMState | None
    ) -> tuple[Float[Array, "B NH S DHV"], mLSTMState]:
        """The cell on a sequence split over ``context_axis`` (`cell.context`): this segment's h
        and the memory after the whole sequence (the same on every device)."""
        assert self.context_axis is not None
        kwargs = dict(self.backend_kwargs)
        return mlstm_chunkwise_context_parallel(
            *inputs,
            axis_name=self.context_axis,
            chunk_size=int(kwargs.get("chunk_size", 64)),
            initial_state=state,
            eps=float(kwargs.get("eps", 1e-6)),
        )

    def init_state(self, batch_size: int) -> mLSTMState:
        """The empty memory: zeros (float32)."""
        return mLSTMState.zeros(batch_size, self.num_heads, self.qk_head_dim, self.v_head_dim)

    def call_with_state(
        self,
        q: Float[Array, "B S DQK"],
        k: Float[Array, "B S DQK"],
        v: Float[Array, "B S DV"],
        gate_input: Float[Array, "B S G"],
        state: mLSTMState,
        *,
        document_borders: Bool[Array, "B S"] | None = None,
    ) -> tuple[Float[Array, "B S DV"], mLSTMState]:
        """``__call__`` from ``state``, also returning the state after the last token. One token
        (S = 1) takes the recurrent step form; longer inputs the backend's stateful form (the
        chunkwise form for "parallel_stabilized")."""
        queries, keys, values, igate, fgate = self._cell_inputs(
            q, k, v, gate_input, document_borders
        )
        if self.context_axis is not None:  # a prefill split over the axis; S = 1 is S_local = 1
            inputs = (queries, keys, values, igate, fgate)
            h, state = self._across_devices(inputs, state)
            return self._merge_heads(h), state
        if q.shape[1] == 1:
            eps = float(dict(self.backend_kwargs).get("eps", 1e-6))
            step_inputs = (x[:, :, 0] for x in (queries, keys, values, igate, fgate))
            h, state = mlstm_recurrent_step(state, *step_inputs, eps=eps)
            return self._merge_heads(h[:, :, None]), state
        h, state = run_backend_with_state(
            self.backend, self.backend_kwargs, state, queries, keys, values, igate, fgate
        )
        return self._merge_heads(h), state
