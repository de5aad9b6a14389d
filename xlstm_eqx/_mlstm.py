"""mLSTM layers: the Mamba-style ``mlstm`` layer (ARCHITECTURE §3) and the xLSTM-7B ``mlstm_v1``
layer (§4), with the gate handling and backend dispatch to the cell functions of ``_cell.py``.

Layers take ``(B, S, ·)`` activations; the cell functions take ``(B, NH, S, ·)`` and the layers
transpose. Gate pre-activations and everything on the gate path are float32 (``gate_dtype``).

Each layer has a decode API for generation:

- ``init_state(batch_size)``: a zero state (cell memory, plus the conv window for ``mlstm``);
- ``prefill(x, ...) -> (y, state)``: the full sequence, also returning the state after it;
- ``step(state, x_t, ...) -> (y_t, state)``: one token, O(1) in the sequence length.
"""

from collections.abc import Mapping
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Bool, Float, PRNGKeyArray

from ._cell import (
    mlstm_chunkwise,
    mlstm_recurrent,
    mlstm_recurrent_step,
    mLSTMState,
    parallel_stabilized_simple,
)
from ._configs import mLSTMBackendNameAndKwargs
from ._nn import (
    CausalConv1d,
    Dense,
    LayerNorm,
    LinearHeadwiseExpand,
    MultiHeadNorm,
    RMSNorm,
    bias_linspace_init,
    dropout,
    make_norm,
    output_initializer,
    small_initializer,
    soft_cap,
    zeros_init,
)


# ----------------------------------------------------------------------------------------------
# backend dispatch


def resolve_backend(backend: Any) -> tuple[str, tuple[tuple[str, Any], ...]]:
    """Normalise ``mLSTMCellConfig.backend`` to ``(name, sorted kwargs items)``.

    Accepts a plain name, an object with ``name`` and ``kwargs`` attributes (the reference's
    name-and-kwargs form) or a mapping ``{"name": ..., "kwargs": {...}}``; the mapping of the
    reference's names, the default kwargs and the validation are `mLSTMBackendNameAndKwargs`'s.
    """
    if isinstance(backend, str):
        name, kwargs = backend, {}
    elif isinstance(backend, Mapping):
        name, kwargs = backend.get("name"), backend.get("kwargs") or {}
    elif hasattr(backend, "name"):
        name, kwargs = backend.name, getattr(backend, "kwargs", None) or {}
    else:
        raise ValueError(f"mlstm_cell.backend: cannot interpret {backend!r}")
    resolved = mLSTMBackendNameAndKwargs(name=name, kwargs=dict(kwargs))
    items = resolved.kwargs.items()
    return resolved.name, tuple(sorted((str(k), _hashable(v)) for k, v in items))


def _hashable(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    return value


@jax.named_scope("mLSTMCell")
def run_backend(
    name: str,
    kwargs: tuple[tuple[str, Any], ...],
    q: Float[Array, "B NH S DHQK"],
    k: Float[Array, "B NH S DHQK"],
    v: Float[Array, "B NH S DHV"],
    igate_preact: Float[Array, "B NH S"],
    fgate_preact: Float[Array, "B NH S"],
    *,
    initial_state: mLSTMState | None = None,
    return_last_state: bool = False,
) -> Float[Array, "B NH S DHV"] | tuple[Float[Array, "B NH S DHV"], mLSTMState]:
    """Run the mLSTM cell with the backend ``name``.

    The parallel form has no state: when a state goes in or must come out (prefill), the
    chunkwise form is used instead (same math; ARCHITECTURE §9.4 on the eps placement).
    """
    opts = dict(kwargs)
    eps = float(opts.get("eps", 1e-6))
    stateful = initial_state is not None or return_last_state
    if name == "parallel_stabilized" and not stateful:
        return parallel_stabilized_simple(q, k, v, igate_preact, fgate_preact, eps=eps)
    if name == "recurrent":
        return mlstm_recurrent(
            q,
            k,
            v,
            igate_preact,
            fgate_preact,
            initial_state=initial_state,
            return_last_state=return_last_state,
            eps=eps,
        )
    if name == "auto":
        from ._pallas import fastest_chunkwise_backend

        name = fastest_chunkwise_backend(
            q.shape, v.shape, q.dtype, chunk_size=int(opts.get("chunk_size", 64)), eps=eps
        )
    if name == "chunkwise_pallas":  # Pallas kernels on GPU, interpret mode elsewhere
        from ._pallas import mlstm_chunkwise_pallas

        return mlstm_chunkwise_pallas(
            q,
            k,
            v,
            igate_preact,
            fgate_preact,
            chunk_size=int(opts.get("chunk_size", 64)),
            initial_state=initial_state,
            return_last_state=return_last_state,
            eps=eps,
        )
    return mlstm_chunkwise(
        q,
        k,
        v,
        igate_preact,
        fgate_preact,
        chunk_size=int(opts.get("chunk_size", 64)),
        initial_state=initial_state,
        return_last_state=return_last_state,
        eps=eps,
    )


# ----------------------------------------------------------------------------------------------
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
            key=key,
        )
    else:
        layer = Dense(
            in_features, num_heads, use_bias=True, dtype=gate_dtype, kernel_init=zeros_init, key=key
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
    (ARCHITECTURE §5.5; the reset value lies deliberately outside the cap)."""
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


def _cell_opts(cell_config: Any) -> dict[str, Any]:
    cap = cell_config.gate_soft_cap
    return dict(
        gate_soft_cap=None if cap is None else float(cap),
        reset=bool(cell_config.reset_at_document_boundaries),
        reset_value=float(cell_config.reset_fgate_value),
    )


# ----------------------------------------------------------------------------------------------
# the mLSTM cell wrapper of the Mamba-style layer (§3.3)


class mLSTMCell(eqx.Module):
    """Gates, optional q/k norm, backend and per-head out-norm of the ``mlstm`` layer (§3.3).

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
        config: Any,
        *,
        gate_in_features: int,
        qk_dim: int,
        v_dim: int,
        dtype: str,
        key: PRNGKeyArray,
    ):
        """``config`` is an ``mLSTMCellConfig``; ``qk_dim``/``v_dim`` are the total (all heads)
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
            norm = dict(eps=config.norm_eps, dtype=dtype)
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


# ----------------------------------------------------------------------------------------------
# the Mamba-style layer (§3)


class mLSTMLayerState(eqx.Module):
    """Decode state of one mLSTM layer: the cell memory and (``mlstm`` only) the conv window
    ``(B, K, I)`` of the last K up-projected inputs."""

    cell: mLSTMState
    conv: Float[Array, "B K C"] | None


def _layer_dims(config: Any) -> tuple[int, int, int, int]:
    """(I, Dqk, Dv, P) of an ``mlstm`` layer config, validated."""
    inner = config._inner_embedding_dim
    if inner is None or inner <= 0:
        raise ValueError(f"mLSTMLayerConfig._inner_embedding_dim must be positive, got {inner}")
    blocksize = config.qkv_proj_blocksize
    if blocksize <= 0 or inner % blocksize != 0:
        raise ValueError(
            f"qkv_proj_blocksize ({blocksize}) must be positive and divide the inner "
            f"embedding dim ({inner})"
        )
    num_blocks = inner // blocksize
    qk_dim = round(config.qk_dim_factor * inner)
    v_dim = round(config.v_dim_factor * inner)
    for name, dim in (("qk_dim_factor", qk_dim), ("v_dim_factor", v_dim)):
        if dim <= 0 or dim % num_blocks != 0:
            raise ValueError(
                f"{name}: projected dim {dim} must be positive and divisible by the number of "
                f"headwise blocks {num_blocks} (= inner dim / qkv_proj_blocksize)"
            )
    _check_divides("num_heads: qk dim", qk_dim, config.num_heads)
    _check_divides("num_heads: v dim", v_dim, config.num_heads)
    return inner, qk_dim, v_dim, num_blocks


_GATE_INPUTS = ("qkv", "x_mlstm", "x_mlstm_conv", "x_mlstm_conv_act")


class mLSTMInnerLayer(eqx.Module):
    """Conv → headwise q/k/v → mLSTM cell → learnable skip → SiLU(z) gate (§3.1 steps 2–8).

    Input ``x_mlstm (B, S, I)`` and ``z (B, S, Dv)``; output ``(B, S, Dv)`` in float32 (the
    float32 ``learnable_skip`` promotes the branch to float32, as in the reference; the down
    projection casts back to the compute dtype).
    """

    conv1d: CausalConv1d
    q_proj: LinearHeadwiseExpand | None
    k_proj: LinearHeadwiseExpand | None
    qk_proj: LinearHeadwiseExpand | None
    v_proj: LinearHeadwiseExpand
    mlstm_cell: mLSTMCell
    x_mlstm_conv_scaling: LinearHeadwiseExpand | None
    learnable_skip: Float[Array, " DV"]
    gate_input: str = eqx.field(static=True)

    def __init__(self, config: Any, *, key: PRNGKeyArray):
        if config.gate_input not in _GATE_INPUTS:
            raise ValueError(
                f"gate_input: unknown value {config.gate_input!r}; allowed: "
                f"{', '.join(_GATE_INPUTS)}"
            )
        inner, qk_dim, v_dim, num_blocks = _layer_dims(config)
        kconv, kq, kk, kv, kcell, kscale = jr.split(key, 6)
        dtype = config.dtype
        self.conv1d = CausalConv1d(inner, config.conv1d_kernel_size, dtype=dtype, key=kconv)
        # q/k/v and the scaling use small-init of D, the model width (§3.6).
        hw = dict(
            use_bias=config.bias,
            dtype=dtype,
            kernel_init=small_initializer(config.embedding_dim, config.init_distribution),
        )
        if config.vmap_qk:
            # q and k as one headwise layer with kernels stacked (2, P, o, i) as the reference.
            self.qk_proj = eqx.filter_vmap(
                lambda k: LinearHeadwiseExpand(inner, num_blocks, qk_dim, key=k, **hw)
            )(jnp.stack([kq, kk]))
            self.q_proj = self.k_proj = None
        else:
            self.q_proj = LinearHeadwiseExpand(inner, num_blocks, qk_dim, key=kq, **hw)
            self.k_proj = LinearHeadwiseExpand(inner, num_blocks, qk_dim, key=kk, **hw)
            self.qk_proj = None
        self.v_proj = LinearHeadwiseExpand(inner, num_blocks, v_dim, key=kv, **hw)
        gate_in = qk_dim * 2 + v_dim if config.gate_input == "qkv" else inner
        self.mlstm_cell = mLSTMCell(
            config.mlstm_cell,
            gate_in_features=gate_in,
            qk_dim=qk_dim,
            v_dim=v_dim,
            dtype=dtype,
            key=kcell,
        )
        self.x_mlstm_conv_scaling = (
            LinearHeadwiseExpand(inner, num_blocks, v_dim, key=kscale, **hw)
            if v_dim != inner
            else None
        )
        self.learnable_skip = jnp.ones((v_dim,), jnp.float32)
        self.gate_input = config.gate_input

    def _qk(self, x: Float[Array, "B S I"]) -> tuple[Array, Array]:
        if self.qk_proj is not None:
            qk = eqx.filter_vmap(lambda layer: layer(x))(self.qk_proj)
            return qk[0], qk[1]
        assert self.q_proj is not None and self.k_proj is not None
        return self.q_proj(x), self.k_proj(x)

    def _features(
        self, x_mlstm: Float[Array, "B S I"], x_conv: Float[Array, "B S I"]
    ) -> tuple[Array, Array, Array, Array, Array]:
        """q, k, v, gate features and the (scaled) skip input from the conv output."""
        x_conv_act = jax.nn.silu(x_conv)
        q, k = self._qk(x_conv_act)
        v = self.v_proj(x_mlstm)
        if self.gate_input == "qkv":
            g = self.mlstm_cell.gate_features(q, k, v)
        else:
            g = {"x_mlstm": x_mlstm, "x_mlstm_conv": x_conv, "x_mlstm_conv_act": x_conv_act}[
                self.gate_input
            ]
        if self.x_mlstm_conv_scaling is not None:
            x_conv_act = self.x_mlstm_conv_scaling(x_conv_act)
        return q, k, v, g, x_conv_act

    def _output(self, h: Array, skip_in: Array, z: Array) -> Array:
        f32 = jnp.float32
        h = h.astype(f32) + self.learnable_skip * skip_in.astype(f32)
        return h * jax.nn.silu(z).astype(f32)

    @jax.named_scope("mLSTMLayer")
    def __call__(
        self,
        x_mlstm: Float[Array, "B S I"],
        z: Float[Array, "B S DV"],
        document_borders: Bool[Array, "B S"] | None = None,
        *,
        initial_state: mLSTMLayerState | None = None,
        return_last_state: bool = False,
    ) -> Float[Array, "B S DV"] | tuple[Float[Array, "B S DV"], mLSTMLayerState]:
        if initial_state is not None and initial_state.conv is not None:
            # Continue the conv from the window of earlier inputs.
            k = self.conv1d.kernel_size
            full = jnp.concatenate([initial_state.conv.astype(x_mlstm.dtype), x_mlstm], axis=1)
            x_conv = self.conv1d(full)[:, k:]
        else:
            x_conv = self.conv1d(x_mlstm)
        q, k_, v, g, skip_in = self._features(x_mlstm, x_conv)
        cell_state = None if initial_state is None else initial_state.cell
        out = self.mlstm_cell(
            q,
            k_,
            v,
            g,
            document_borders,
            initial_state=cell_state,
            return_last_state=return_last_state,
        )
        if not return_last_state:
            return self._output(out, skip_in, z)
        h, cell_state = out
        if initial_state is not None and initial_state.conv is not None:
            conv_in = jnp.concatenate([initial_state.conv.astype(x_mlstm.dtype), x_mlstm], axis=1)
        else:
            conv_in = x_mlstm
        conv_state = (
            self.conv1d.state_from_sequence(conv_in) if self.conv1d.kernel_size > 0 else None
        )
        return self._output(h, skip_in, z), mLSTMLayerState(cell=cell_state, conv=conv_state)

    def init_state(self, batch_size: int) -> mLSTMLayerState:
        nh = self.mlstm_cell.num_heads
        qk_proj = self.qk_proj if self.qk_proj is not None else self.q_proj
        assert qk_proj is not None
        qk_dim = qk_proj.out_features
        v_dim = self.v_proj.out_features
        conv = self.conv1d.init_state(batch_size) if self.conv1d.kernel_size > 0 else None
        return mLSTMLayerState(
            cell=mLSTMState.zeros(batch_size, nh, qk_dim // nh, v_dim // nh), conv=conv
        )

    def step(
        self,
        state: mLSTMLayerState,
        x_mlstm: Float[Array, "B I"],
        z: Float[Array, "B DV"],
        document_border: Bool[Array, " B"] | None = None,
    ) -> tuple[Float[Array, "B DV"], mLSTMLayerState]:
        if state.conv is not None:
            x_conv, conv_state = self.conv1d.step(state.conv, x_mlstm)
        else:
            x_conv, conv_state = self.conv1d(x_mlstm[:, None])[:, 0], None
        q, k, v, g, skip_in = self._features(x_mlstm[:, None], x_conv[:, None])
        h, cell_state = self.mlstm_cell.step(
            state.cell, q[:, 0], k[:, 0], v[:, 0], g[:, 0], document_border
        )
        y = self._output(h, skip_in[:, 0], z)
        return y, mLSTMLayerState(cell=cell_state, conv=conv_state)


class mLSTMLayer(eqx.Module):
    """The Mamba-style mLSTM layer, ``layer_type="mlstm"`` (§3.1): ``(B, S, D) -> (B, S, D)``.

    ``x_mlstm = x W_up_mlstm``, ``z = x W_up_z`` (small-init(D)), the inner layer, then
    ``y = h W_down`` (``output_init_fn`` with dim D and L blocks) and dropout (with a key).
    ``debug_cell=True`` skips the inner layer (``h = z``, debug only).
    """

    proj_up_mlstm: Dense
    proj_up_z: Dense
    inner_layer: mLSTMInnerLayer | None
    proj_down: Dense
    dropout_rate: float = eqx.field(static=True)

    def __init__(self, config: Any, *, key: PRNGKeyArray):
        inner, _, v_dim, _ = _layer_dims(config)
        D = config.embedding_dim
        kup, kz, kinner, kdown = jr.split(key, 4)
        dense = dict(use_bias=config.bias, dtype=config.dtype)
        up_init = small_initializer(D, config.init_distribution)
        self.proj_up_mlstm = Dense(D, inner, kernel_init=up_init, key=kup, **dense)
        self.proj_up_z = Dense(D, v_dim, kernel_init=up_init, key=kz, **dense)
        self.inner_layer = None if config.debug_cell else mLSTMInnerLayer(config, key=kinner)
        down_init = output_initializer(
            config.output_init_fn, D, config._num_blocks or 1, config.init_distribution
        )
        self.proj_down = Dense(v_dim, D, kernel_init=down_init, key=kdown, **dense)
        self.dropout_rate = float(config.dropout)

    def _run(
        self,
        x: Float[Array, "B S D"],
        document_borders: Bool[Array, "B S"] | None,
        key: PRNGKeyArray | None,
        initial_state: mLSTMLayerState | None,
        return_last_state: bool,
    ) -> tuple[Float[Array, "B S D"], mLSTMLayerState | None]:
        x_mlstm, z = self.proj_up_mlstm(x), self.proj_up_z(x)
        state = None
        if self.inner_layer is None:
            h = z
        elif return_last_state:
            h, state = self.inner_layer(
                x_mlstm, z, document_borders, initial_state=initial_state, return_last_state=True
            )
        else:
            h = self.inner_layer(x_mlstm, z, document_borders, initial_state=initial_state)
        return dropout(self.proj_down(h), self.dropout_rate, key=key), state

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
        if self.inner_layer is None:
            raise ValueError("debug_cell=True layers have no state to prefill")
        y, state = self._run(x, document_borders, None, initial_state, True)
        assert state is not None
        return y, state

    def init_state(self, batch_size: int) -> mLSTMLayerState:
        if self.inner_layer is None:
            raise ValueError("debug_cell=True layers have no decode state")
        return self.inner_layer.init_state(batch_size)

    def step(
        self,
        state: mLSTMLayerState,
        x_t: Float[Array, "B D"],
        *,
        document_border: Bool[Array, " B"] | None = None,
    ) -> tuple[Float[Array, "B D"], mLSTMLayerState]:
        """One decode step ``(B, D) -> (B, D)`` (recurrent cell form plus the conv window)."""
        if self.inner_layer is None:
            raise ValueError("debug_cell=True layers have no decode state")
        h, state = self.inner_layer.step(
            state, self.proj_up_mlstm(x_t), self.proj_up_z(x_t), document_border
        )
        return self.proj_down(h), state


# ----------------------------------------------------------------------------------------------
# the xLSTM-7B layer (§4)


def _v1_dims(config: Any) -> tuple[int, int]:
    D = config.embedding_dim
    qk_dim, v_dim = int(D * config.qk_dim_factor), int(D * config.v_dim_factor)
    _check_divides("num_heads: qk dim (embedding_dim * qk_dim_factor)", qk_dim, config.num_heads)
    _check_divides("num_heads: v dim (embedding_dim * v_dim_factor)", v_dim, config.num_heads)
    return qk_dim, v_dim


class mLSTMLayerV1(eqx.Module):
    """The xLSTM-7B mLSTM layer, ``layer_type="mlstm_v1"`` (§4.1): ``(B, S, D) -> (B, S, D)``.

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

    def __init__(self, config: Any, *, key: PRNGKeyArray):
        cell = config.mlstm_cell
        D, nh = config.embedding_dim, config.num_heads
        qk_dim, v_dim = _v1_dims(config)
        kq, kk, kv, ko, ki, kf, kdown = jr.split(key, 7)
        dense = dict(use_bias=config.bias, dtype=config.dtype)
        qkv_init = small_initializer(D, config.init_distribution)
        self.dense_q = Dense(D, qk_dim, kernel_init=qkv_init, key=kq, **dense)
        self.dense_k = Dense(D, qk_dim, kernel_init=qkv_init, key=kk, **dense)
        self.dense_v = Dense(D, v_dim, kernel_init=qkv_init, key=kv, **dense)
        self.dense_o = Dense(D, v_dim, kernel_init=zeros_init, key=ko, **dense)
        gate = dict(headwise=False, gate_dtype=cell.gate_dtype)
        self.igate = _make_gate(D, nh, bias_init_range=cell.igate_bias_init_range, key=ki, **gate)
        self.fgate = _make_gate(D, nh, bias_init_range=cell.fgate_bias_init_range, key=kf, **gate)
        if cell.add_qk_norm:
            norm = dict(eps=cell.norm_eps, dtype=config.dtype)
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
        self.proj_down = Dense(v_dim, D, kernel_init=down_init, key=kdown, **dense)
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


def make_mlstm_layer(config: Any, *, key: PRNGKeyArray) -> mLSTMLayer | mLSTMLayerV1:
    """The layer class chosen by ``config.layer_type`` (``"mlstm"`` or ``"mlstm_v1"``)."""
    if config.layer_type == "mlstm":
        return mLSTMLayer(config, key=key)
    if config.layer_type == "mlstm_v1":
        return mLSTMLayerV1(config, key=key)
    raise ValueError(f"layer_type: unknown value {config.layer_type!r}; allowed: mlstm, mlstm_v1")
