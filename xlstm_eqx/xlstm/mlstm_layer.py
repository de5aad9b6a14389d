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
from ..nn.context import with_left_context
from ..nn.conv import CausalConv1d
from ..nn.functional import dropout, silu
from ..nn.init import Initializer, output_initializer, small_initializer
from ..nn.linear import Dense, LinearHeadwiseExpand
from .mlstm_cell import check_heads_divide, mLSTMCell
from .mlstm_config import mLSTMLayerConfig


# the Mamba-style layer (docs/architecture.md, "The mlstm layer")


class mLSTMLayerState(eqx.Module):
    """Decode state of one mLSTM layer: the cell memory and (``mlstm`` only) the conv window
    ``(B, K, I)`` of the last K up-projected inputs."""

    cell: mLSTMState
    conv: Float[Array, "B K C"] | None


def mlstm_layer_dims(config: mLSTMLayerConfig) -> tuple[int, int, int, int]:
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
    check_heads_divide("num_heads: qk dim", qk_dim, config.num_heads)
    check_heads_divide("num_heads: v dim", v_dim, config.num_heads)
    return inner, qk_dim, v_dim, num_blocks


# Both mLSTM layer types project the block input up and the cell's output down with these.


def up_projection(
    config: mLSTMLayerConfig, out_features: int, kernel_init: Initializer, *, key: PRNGKeyArray
) -> Dense:
    """A column-parallel ``D → out_features`` projection of the block input (logical axes
    ``("embed", "mlp")``, `nn.axes`)."""
    return Dense(
        config.embedding_dim,
        out_features,
        use_bias=config.bias,
        dtype=config.dtype,
        kernel_init=kernel_init,
        axes=("embed", "mlp"),
        key=key,
    )


def down_projection(config: mLSTMLayerConfig, in_features: int, *, key: PRNGKeyArray) -> Dense:
    """The row-parallel ``in_features → D`` output projection (``output_init_fn`` with dim D and
    L blocks; logical axes ``("mlp", "embed")``, a replicated bias)."""
    D = config.embedding_dim
    down_init = output_initializer(
        config.output_init_fn, D, config._num_blocks or 1, config.init_distribution
    )
    return Dense(
        in_features,
        D,
        kernel_init=down_init,
        axes=("mlp", "embed"),
        bias_axes=REPLICATED,
        use_bias=config.bias,
        dtype=config.dtype,
        key=key,
    )


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
    reference_name: ClassVar[str] = "mLSTMInnerLayer"  # fsdp_modules / remat name

    def __init__(self, config: mLSTMLayerConfig, *, key: PRNGKeyArray):
        if config.gate_input not in _GATE_INPUTS:
            raise ValueError(
                f"gate_input: unknown value {config.gate_input!r}; allowed: "
                f"{', '.join(_GATE_INPUTS)}"
            )
        inner, qk_dim, v_dim, num_blocks = mlstm_layer_dims(config)
        conv_key, q_key, k_key, v_key, cell_key, scale_key = jr.split(key, 6)
        dtype = config.dtype
        self.conv1d = CausalConv1d(
            inner, config.conv1d_kernel_size, dtype=dtype, channels_axis="mlp", key=conv_key
        )
        # q/k/v and the scaling use small-init of D, the model width (docs/architecture.md,
        # "Initialisation").
        small_init = small_initializer(config.embedding_dim, config.init_distribution)

        def headwise(out_features: int, proj_key: PRNGKeyArray) -> LinearHeadwiseExpand:
            return LinearHeadwiseExpand(
                inner,
                num_blocks,
                out_features,
                use_bias=config.bias,
                dtype=dtype,
                kernel_init=small_init,
                features_axis="mlp",
                key=proj_key,
            )

        if config.vmap_qk:
            # q and k as one headwise layer with kernels stacked (2, P, o, i) as the reference.
            self.qk_proj = eqx.filter_vmap(lambda proj_key: headwise(qk_dim, proj_key))(
                jnp.stack([q_key, k_key])
            )
            self.q_proj = self.k_proj = None
        else:
            self.q_proj, self.k_proj = headwise(qk_dim, q_key), headwise(qk_dim, k_key)
            self.qk_proj = None
        self.v_proj = headwise(v_dim, v_key)
        gate_in = qk_dim * 2 + v_dim if config.gate_input == "qkv" else inner
        self.mlstm_cell = mLSTMCell(
            config.mlstm_cell,
            gate_in_features=gate_in,
            qk_dim=qk_dim,
            v_dim=v_dim,
            dtype=dtype,
            key=cell_key,
        )
        self.x_mlstm_conv_scaling = headwise(v_dim, scale_key) if v_dim != inner else None
        self.learnable_skip = jnp.ones((v_dim,), jnp.float32)
        self.gate_input = config.gate_input

    def _queries_and_keys(self, x: Float[Array, "B S I"]) -> tuple[Array, Array]:
        if self.qk_proj is not None:
            both = eqx.filter_vmap(lambda layer: layer(x))(self.qk_proj)
            return both[0], both[1]
        assert self.q_proj is not None and self.k_proj is not None
        return self.q_proj(x), self.k_proj(x)

    def _features(
        self, x_mlstm: Float[Array, "B S I"], x_conv: Float[Array, "B S I"]
    ) -> tuple[Array, Array, Array, Array, Array]:
        """Queries, keys, values, gate features and the (scaled) skip input from the conv
        output."""
        x_conv_act = silu(x_conv)
        queries, keys = self._queries_and_keys(x_conv_act)
        values = self.v_proj(x_mlstm)
        if self.gate_input == "qkv":
            gate_features = self.mlstm_cell.gate_features(queries, keys, values)
        else:
            named = {"x_mlstm": x_mlstm, "x_mlstm_conv": x_conv, "x_mlstm_conv_act": x_conv_act}
            gate_features = named[self.gate_input]
        if self.x_mlstm_conv_scaling is not None:
            x_conv_act = self.x_mlstm_conv_scaling(x_conv_act)
        return queries, keys, values, gate_features, x_conv_act

    def _output(self, h: Array, skip_in: Array, z: Array) -> Array:
        f32 = jnp.float32
        h = h.astype(f32) + self.learnable_skip * skip_in.astype(f32)
        return h * silu(z).astype(f32)

    def _conv_with_state(
        self,
        x_mlstm: Float[Array, "B S I"],
        window: Float[Array, "B K I"] | None,
        borders: Bool[Array, "B S"] | None = None,
    ) -> tuple[Float[Array, "B S I"], Float[Array, "B K I"] | None]:
        """The causal conv continued from the window of the K inputs before ``x_mlstm``, and the
        window after it (None: a conv of width 0, no window). With ``borders`` the conv does not
        read across a document border, and the window keeps only the last document's inputs."""
        if window is None:
            return self.conv1d(x_mlstm, borders), None
        if x_mlstm.shape[1] == 1 and self.conv1d.context_axis is None:
            if borders is not None:  # a new document: an empty window
                window = jnp.where(borders[:, 0, None, None], jnp.zeros_like(window), window)
            x_conv, window = self.conv1d.step(window, x_mlstm[:, 0])
            return x_conv[:, None], window
        with_past = jnp.concatenate([window.astype(x_mlstm.dtype), x_mlstm], axis=1)
        past_borders = None if borders is None else jnp.pad(borders, ((0, 0), (window.shape[1], 0)))
        if self.conv1d.context_axis is not None:  # a prefill split over the axis (`nn.context`):
            conv, axis = self.conv1d.on_one_device(), self.conv1d.context_axis  # the window
            first = with_past[:, 1 : window.shape[1]]  # continues on the first device only
            x_conv = with_left_context(conv, x_mlstm, conv.kernel_size - 1, axis, borders, first)
        else:
            x_conv = self.conv1d(with_past, past_borders)[:, self.conv1d.kernel_size :]
        if past_borders is None:
            return x_conv, self.conv1d.state_from_sequence(with_past)
        doc = jnp.cumsum(past_borders.astype(jnp.int32), axis=1)
        last_document = with_past * (doc == doc[:, -1:])[..., None].astype(with_past.dtype)
        return x_conv, self.conv1d.state_from_sequence(last_document)

    @jax.named_scope("mLSTMLayer")
    def __call__(
        self,
        x_mlstm: Float[Array, "B S I"],
        z: Float[Array, "B S DV"],
        *,
        document_borders: Bool[Array, "B S"] | None = None,
    ) -> Float[Array, "B S DV"]:
        # With the memory reset on, the conv does not read across a border either (the
        # reference's conv does: docs/architecture.md, "Reference quirks kept").
        conv_borders = document_borders if self.mlstm_cell.reset_at_document_boundaries else None
        queries, keys, values, gate_features, skip_in = self._features(
            x_mlstm, self.conv1d(x_mlstm, conv_borders)
        )
        h = self.mlstm_cell(queries, keys, values, gate_features, document_borders=document_borders)
        return self._output(h, skip_in, z)

    def init_state(self, batch_size: int) -> mLSTMLayerState:
        conv = self.conv1d.init_state(batch_size) if self.conv1d.kernel_size > 0 else None
        return mLSTMLayerState(cell=self.mlstm_cell.init_state(batch_size), conv=conv)

    @jax.named_scope("mLSTMLayer")
    def call_with_state(
        self,
        x_mlstm: Float[Array, "B S I"],
        z: Float[Array, "B S DV"],
        state: mLSTMLayerState,
        *,
        document_borders: Bool[Array, "B S"] | None = None,
    ) -> tuple[Float[Array, "B S DV"], mLSTMLayerState]:
        """``__call__`` from ``state`` (conv window and cell memory), returning the state after
        the last token."""
        conv_borders = document_borders if self.mlstm_cell.reset_at_document_boundaries else None
        x_conv, window = self._conv_with_state(x_mlstm, state.conv, conv_borders)
        queries, keys, values, gate_features, skip_in = self._features(x_mlstm, x_conv)
        h, cell_state = self.mlstm_cell.call_with_state(
            queries, keys, values, gate_features, state.cell, document_borders=document_borders
        )
        return self._output(h, skip_in, z), mLSTMLayerState(cell=cell_state, conv=window)


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
        inner, _, v_dim, _ = mlstm_layer_dims(config)
        D = config.embedding_dim
        up_key, z_key, inner_key, down_key = jr.split(key, 4)
        up_init = small_initializer(D, config.init_distribution)
        self.proj_up_mlstm = up_projection(config, inner, up_init, key=up_key)
        self.proj_up_z = up_projection(config, v_dim, up_init, key=z_key)
        self.inner_layer = None if config.debug_cell else mLSTMInnerLayer(config, key=inner_key)
        self.proj_down = down_projection(config, v_dim, key=down_key)
        self.dropout_rate = float(config.dropout)

    def _inner(self) -> mLSTMInnerLayer:
        if self.inner_layer is None:
            raise ValueError("debug_cell=True layers have no decode state")
        return self.inner_layer

    @jax.named_scope("mLSTMLayer")
    def __call__(
        self,
        x: Float[Array, "B S D"],
        *,
        document_borders: Bool[Array, "B S"] | None = None,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "B S D"]:
        x_mlstm, z = self.proj_up_mlstm(x), self.proj_up_z(x)
        if self.inner_layer is None:
            h = z
        else:
            h = self.inner_layer(x_mlstm, z, document_borders=document_borders)
        return dropout(self.proj_down(h), self.dropout_rate, key=key)

    def init_state(self, batch_size: int) -> mLSTMLayerState:
        """The decode state before any token: the empty memory and a zero conv window."""
        return self._inner().init_state(batch_size)

    def call_with_state(
        self,
        x: Float[Array, "B S D"],
        state: mLSTMLayerState,
        *,
        document_borders: Bool[Array, "B S"] | None = None,
    ) -> tuple[Float[Array, "B S D"], mLSTMLayerState]:
        """``__call__`` (deterministic) from ``state``, returning the state after the last token:
        prefill from ``init_state``, one decode step with S = 1."""
        h, state = self._inner().call_with_state(
            self.proj_up_mlstm(x), self.proj_up_z(x), state, document_borders=document_borders
        )
        return self.proj_down(h), state
