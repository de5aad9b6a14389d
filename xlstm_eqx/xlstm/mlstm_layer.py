"""The Mamba-style mLSTM layer, ``layer_type="mlstm"``: `mLSTMLayer` (up-projections, down
projection, dropout) around `mLSTMInnerLayer` (causal conv, headwise q/k/v, the cell, learnable skip
and SiLU(z) gate), and `mLSTMLayerState`, the decode state of either mLSTM layer type.

``(B, S, D) -> (B, S, D)`` with inner width ``I = _inner_embedding_dim``; see docs/architecture.md,
"The mlstm layer".
"""

from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Bool, Float, PRNGKeyArray

from ..cell.forms import mLSTMState
from ..nn.axes import REPLICATED, LogicalAxes
from ..nn.conv import CausalConv1d
from ..nn.functional import dropout
from ..nn.init import output_initializer, small_initializer
from ..nn.linear import Dense, LinearHeadwiseExpand
from .mlstm_cell import _check_divides, mLSTMCell
from .mlstm_config import mLSTMLayerConfig


# the Mamba-style layer (docs/architecture.md, "The mlstm layer")


class mLSTMLayerState(eqx.Module):
    """Decode state of one mLSTM layer: the cell memory and (``mlstm`` only) the conv window
    ``(B, K, I)`` of the last K up-projected inputs."""

    cell: mLSTMState
    conv: Float[Array, "B K C"] | None


def _layer_dims(config: mLSTMLayerConfig) -> tuple[int, int, int, int]:
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
    """Conv → headwise q/k/v → mLSTM cell → learnable skip → SiLU(z) gate (steps 2–4 of
    docs/architecture.md, "The mlstm layer").

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
    # logical axes (nn.axes): the skip's features; the stacked (q, k) pair of ``qk_proj``
    learnable_skip_axes: ClassVar[LogicalAxes] = ("mlp",)
    qk_proj_axes: ClassVar[LogicalAxes] = ("qk",)

    def __init__(self, config: mLSTMLayerConfig, *, key: PRNGKeyArray):
        if config.gate_input not in _GATE_INPUTS:
            raise ValueError(
                f"gate_input: unknown value {config.gate_input!r}; allowed: "
                f"{', '.join(_GATE_INPUTS)}"
            )
        inner, qk_dim, v_dim, num_blocks = _layer_dims(config)
        kconv, kq, kk, kv, kcell, kscale = jr.split(key, 6)
        dtype = config.dtype
        self.conv1d = CausalConv1d(
            inner, config.conv1d_kernel_size, dtype=dtype, channels_axis="mlp", key=kconv
        )
        # q/k/v and the scaling use small-init of D, the model width (docs/architecture.md,
        # "Initialisation").
        hw = dict(
            use_bias=config.bias,
            dtype=dtype,
            kernel_init=small_initializer(config.embedding_dim, config.init_distribution),
            features_axis="mlp",
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
    """The Mamba-style mLSTM layer, ``layer_type="mlstm"``: ``(B, S, D) -> (B, S, D)``.

    ``x_mlstm = x W_up_mlstm``, ``z = x W_up_z`` (small-init(D)), the inner layer, then
    ``y = h W_down`` (``output_init_fn`` with dim D and L blocks) and dropout (with a key).
    ``debug_cell=True`` skips the inner layer (``h = z``, debug only).
    """

    proj_up_mlstm: Dense
    proj_up_z: Dense
    inner_layer: mLSTMInnerLayer | None
    proj_down: Dense
    dropout_rate: float = eqx.field(static=True)

    def __init__(self, config: mLSTMLayerConfig, *, key: PRNGKeyArray):
        inner, _, v_dim, _ = _layer_dims(config)
        D = config.embedding_dim
        kup, kz, kinner, kdown = jr.split(key, 4)
        dense = dict(use_bias=config.bias, dtype=config.dtype)
        up_init = small_initializer(D, config.init_distribution)
        # Column-parallel up-projections, a row-parallel proj_down (logical axes: nn.axes).
        up = dict(kernel_init=up_init, axes=("embed", "mlp"), **dense)
        self.proj_up_mlstm = Dense(D, inner, key=kup, **up)
        self.proj_up_z = Dense(D, v_dim, key=kz, **up)
        self.inner_layer = None if config.debug_cell else mLSTMInnerLayer(config, key=kinner)
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
