"""Between an mLSTM layer and the cell functions of `xlstm_eqx.cell`: `mLSTMCell` (the ``mlstm``
layer's gates, optional q/k norm, backend call and per-head out-norm) and the helpers the
``mlstm_v1`` layer shares with it (gate layers, soft cap and document reset, head split, decode
step).

Activations here are ``(B, S, NH·DH)``; heads are split to ``(B, NH, S, DH)`` for the cell and
merged after the per-head norm. Gate pre-activations are ``(B, S, NH)`` in ``gate_dtype`` (float32
by default). See docs/architecture.md, "The mlstm layer" and "Gates and document reset".
"""

from typing import Any

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Bool, Float, PRNGKeyArray

from ..cell.backends import resolve_backend, run_backend
from ..cell.forms import mlstm_recurrent_step, mLSTMState
from ..nn.functional import soft_cap
from ..nn.init import bias_linspace_init, zeros_init
from ..nn.linear import Dense, LinearHeadwiseExpand
from ..nn.norm import LayerNorm, MultiHeadNorm, RMSNorm, make_norm
from .mlstm_config import mLSTMCellConfig


# shared pieces of the two layer types


def _gate_bias(init_range: Any, num_heads: int, key: PRNGKeyArray) -> Float[Array, " NH"]:
    if isinstance(init_range, list):
        init_range = tuple(init_range)
    return bias_linspace_init(init_range, num_heads, key=key)


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
    return eqx.tree_at(lambda g: g.bias, layer, _gate_bias(bias_init_range, num_heads, key))


def _gate_preacts(
    igate: Dense | LinearHeadwiseExpand,
    fgate: Dense | LinearHeadwiseExpand,
    gate_input: Float[Array, "B S G"],
    document_borders: Bool[Array, "B S"] | None,
    *,
    gate_soft_cap: float | None,
    reset: bool,
    reset_value: float,
) -> tuple[Float[Array, "B S NH"], Float[Array, "B S NH"]]:
    """ĩ, f̃ (float32 for gate_dtype float32): soft cap first, then the document reset of f̃
    (docs/architecture.md, "Gates and document reset"; the reset value lies deliberately outside
    the cap)."""
    i = soft_cap(igate(gate_input), gate_soft_cap)
    f = soft_cap(fgate(gate_input), gate_soft_cap)
    if reset and document_borders is not None:
        f = jnp.where(document_borders[..., None], jnp.asarray(reset_value, f.dtype), f)
    return i, f


def _heads(x: Float[Array, "B S F"], num_heads: int) -> Float[Array, "B NH S DH"]:
    """(B, S, NH·DH) -> (B, NH, S, DH)."""
    b, s, _ = x.shape
    return x.reshape(b, s, num_heads, -1).transpose(0, 2, 1, 3)


def _cell_call(
    backend: str,
    backend_kwargs: tuple[tuple[str, Any], ...],
    num_heads: int,
    q: Float[Array, "B S DQK"],
    k: Float[Array, "B S DQK"],
    v: Float[Array, "B S DV"],
    i: Float[Array, "B S NH"],
    f: Float[Array, "B S NH"],
    q_norm: LayerNorm | RMSNorm | None,
    k_norm: LayerNorm | RMSNorm | None,
    outnorm: MultiHeadNorm,
    *,
    initial_state: mLSTMState | None,
    return_last_state: bool,
) -> tuple[Float[Array, "B S DV"], mLSTMState | None]:
    """Split heads, optional q/k norm, backend, per-head out-norm, merge heads."""
    qh, kh, vh = (_heads(x, num_heads) for x in (q, k, v))
    if q_norm is not None and k_norm is not None:
        qh, kh = q_norm(qh), k_norm(kh)
    ih, fh = i.transpose(0, 2, 1), f.transpose(0, 2, 1)
    out = run_backend(
        backend,
        backend_kwargs,
        qh,
        kh,
        vh,
        ih,
        fh,
        initial_state=initial_state,
        return_last_state=return_last_state,
    )
    h, state = out if isinstance(out, tuple) else (out, None)
    h = outnorm(h.transpose(0, 2, 1, 3))  # (B, S, NH, DHV), normalised per head
    return h.reshape(*h.shape[:2], -1), state


def _cell_step(
    num_heads: int,
    eps: float,
    state: mLSTMState,
    q: Float[Array, "B DQK"],
    k: Float[Array, "B DQK"],
    v: Float[Array, "B DV"],
    i: Float[Array, "B NH"],
    f: Float[Array, "B NH"],
    q_norm: LayerNorm | RMSNorm | None,
    k_norm: LayerNorm | RMSNorm | None,
    outnorm: MultiHeadNorm,
) -> tuple[Float[Array, "B DV"], mLSTMState]:
    b = q.shape[0]
    qh, kh, vh = (x.reshape(b, num_heads, -1) for x in (q, k, v))
    if q_norm is not None and k_norm is not None:
        qh, kh = q_norm(qh), k_norm(kh)
    h, state = mlstm_recurrent_step(state, qh, kh, vh, i, f, eps=eps)
    h = outnorm(h)
    return h.reshape(b, -1), state


def _check_divides(field: str, value: int, num_heads: int) -> None:
    if value <= 0 or value % num_heads != 0:
        raise ValueError(
            f"{field} ({value}) must be positive and divisible by num_heads ({num_heads})"
        )


def _cell_opts(cell_config: mLSTMCellConfig) -> dict[str, Any]:
    cap = cell_config.gate_soft_cap
    return dict(
        gate_soft_cap=None if cap is None else float(cap),
        reset=bool(cell_config.reset_at_document_boundaries),
        reset_value=float(cell_config.reset_fgate_value),
    )


# the mLSTM cell wrapper of the Mamba-style layer (docs/architecture.md, "The mlstm layer")


class mLSTMCell(eqx.Module):
    """Gates, optional q/k norm, backend and per-head out-norm of the ``mlstm`` layer.

    ``__call__(q, k, v, gate_input, document_borders)`` with q/k ``(B, S, NH·DHQK)``, v
    ``(B, S, NH·DHV)`` and gate features ``(B, S, G)`` (see ``gate_features``) returns the
    per-head-normalised cell output ``(B, S, NH·DHV)`` in the compute dtype.

    Gates: Dense ``G → NH`` or headwise (``gate_linear_headwise``), kernels zero, biases from
    ``igate_bias_init_range`` / ``fgate_bias_init_range`` (pair → linspace over heads, float →
    constant, None → N(0, 0.1²)), in ``gate_dtype``; soft cap ``gate_soft_cap``; then, with
    ``reset_at_document_boundaries`` and borders given, ``f̃ ← reset_fgate_value`` at each border
    (the first token of a document) so that the memory of earlier documents is wiped.
    """

    igate: Dense | LinearHeadwiseExpand
    fgate: Dense | LinearHeadwiseExpand
    q_norm: LayerNorm | RMSNorm | None
    k_norm: LayerNorm | RMSNorm | None
    outnorm: MultiHeadNorm
    num_heads: int = eqx.field(static=True)
    gate_linear_headwise: bool = eqx.field(static=True)
    backend: str = eqx.field(static=True)
    backend_kwargs: tuple[tuple[str, Any], ...] = eqx.field(static=True)
    gate_soft_cap: float | None = eqx.field(static=True)
    reset_at_document_boundaries: bool = eqx.field(static=True)
    reset_fgate_value: float = eqx.field(static=True)

    def __init__(
        self,
        config: mLSTMCellConfig,
        *,
        gate_in_features: int,
        qk_dim: int,
        v_dim: int,
        dtype: str,
        key: PRNGKeyArray,
    ):
        """``qk_dim``/``v_dim`` are the total (all heads)
        q/k and v widths, ``gate_in_features`` the width of the gate features."""
        nh = config.num_heads
        _check_divides("mlstm_cell.num_heads: qk dim", qk_dim, nh)
        _check_divides("mlstm_cell.num_heads: v dim", v_dim, nh)
        self.backend, self.backend_kwargs = resolve_backend(config.backend)
        ikey, fkey = jr.split(key)
        gate = dict(headwise=bool(config.gate_linear_headwise), gate_dtype=config.gate_dtype)
        self.igate = _make_gate(
            gate_in_features, nh, bias_init_range=config.igate_bias_init_range, key=ikey, **gate
        )
        self.fgate = _make_gate(
            gate_in_features, nh, bias_init_range=config.fgate_bias_init_range, key=fkey, **gate
        )
        if config.add_qk_norm:
            norm = dict(eps=config.norm_eps, dtype=dtype, axes=("head_dim",))
            self.q_norm = make_norm(config.norm_type, qk_dim // nh, **norm)
            self.k_norm = make_norm(config.norm_type, qk_dim // nh, **norm)
        else:
            self.q_norm = self.k_norm = None
        self.outnorm = MultiHeadNorm(
            nh, v_dim // nh, norm_type=config.norm_type, eps=config.norm_eps, dtype=dtype
        )
        self.num_heads = nh
        self.gate_linear_headwise = bool(config.gate_linear_headwise)
        opts = _cell_opts(config)
        self.gate_soft_cap = opts["gate_soft_cap"]
        self.reset_at_document_boundaries = opts["reset"]
        self.reset_fgate_value = opts["reset_value"]

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
        """Gate pre-activations ĩ, f̃ after soft cap and document reset."""
        return _gate_preacts(
            self.igate,
            self.fgate,
            gate_input,
            document_borders,
            gate_soft_cap=self.gate_soft_cap,
            reset=self.reset_at_document_boundaries,
            reset_value=self.reset_fgate_value,
        )

    def __call__(
        self,
        q: Float[Array, "B S DQK"],
        k: Float[Array, "B S DQK"],
        v: Float[Array, "B S DV"],
        gate_input: Float[Array, "B S G"],
        document_borders: Bool[Array, "B S"] | None = None,
        *,
        initial_state: mLSTMState | None = None,
        return_last_state: bool = False,
    ) -> Float[Array, "B S DV"] | tuple[Float[Array, "B S DV"], mLSTMState]:
        i, f = self.gates(gate_input, document_borders)
        h, state = _cell_call(
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
            initial_state=initial_state,
            return_last_state=return_last_state,
        )
        return (h, state) if return_last_state else h

    def step(
        self,
        state: mLSTMState,
        q: Float[Array, "B DQK"],
        k: Float[Array, "B DQK"],
        v: Float[Array, "B DV"],
        gate_input: Float[Array, "B G"],
        document_border: Bool[Array, " B"] | None = None,
    ) -> tuple[Float[Array, "B DV"], mLSTMState]:
        """One decode step with the recurrent form."""
        borders = None if document_border is None else document_border[:, None]
        i, f = self.gates(gate_input[:, None], borders)
        eps = float(dict(self.backend_kwargs).get("eps", 1e-6))
        return _cell_step(
            self.num_heads,
            eps,
            state,
            q,
            k,
            v,
            i[:, 0],
            f[:, 0],
            self.q_norm,
            self.k_norm,
            self.outnorm,
        )
