"""The sLSTM of the original xLSTM paper (docs/architecture.md, "sLSTM"): cell, layer, decode
state.

The reference Flax model has no sLSTM (it raises NotImplementedError); the semantics here follow the PyTorch
copy in xlstm-jax (`xlstm_pytorch/blocks/slstm`), with its CUDA pointwise kernel as the ground truth:

    ĩ, f̃, z̃, õ = W x + R y_{t-1} + b                 (R block-diagonal per head, b per unit)
    m_t = ĩ                          if n_{t-1} == 0   (first step; decided per element)
          max(ĩ, m_{t-1} + logσ(f̃))  otherwise
    i' = exp(ĩ - m_t),   f' = exp(m_{t-1} + logσ(f̃) - m_t)
    c_t = f' c_{t-1} + i' tanh(z̃),   n_t = f' n_{t-1} + i',   y_t = σ(õ) c_t / n_t

The stabiliser m cancels from y_t, so it is held constant for autodiff (`lax.stop_gradient`), as the CUDA
backward does. Where n_{t-1} == 0 the old state is zero and f' is set to 0 (the CUDA kernel clamps f' <= 1 for
the same reason: exp(logσ(f̃) - ĩ) may overflow there). The CUDA clamps i' <= 1 and σ(õ) <= 1 are no-ops
(m_t >= ĩ) and are left out. The "lstm" function is a classic LSTM: c_t = σ(f̃) c + σ(ĩ) tanh(z̃),
y_t = σ(õ) tanh(c_t) (n and m stay zero).

Dtypes: parameters float32; the four gate projections, the recurrence and the state are float32 whatever the
compute dtype (everything here is on the gate path); the causal conv runs in the compute dtype `dtype`; the
group norm computes in float32 and returns `dtype`.

Checkpoint conversion notes (PyTorch -> here): the PyTorch module named `fgate` produces the *input*-gate
pre-activation and `igate` the forget one [quirk]; here `igate` makes ĩ and `fgate` makes f̃. The PyTorch
recurrent kernel `(NH, DH, 4, DH)` and bias `(NH, 4, DH)` layouts are kept. The PyTorch group-norm weight is
stored as an offset from 1; here `group_norm_weight` is the scale itself (init 1).
"""

import math
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Bool, Float, PRNGKeyArray

from ..nn.axes import LogicalAxes
from ..nn.conv import CausalConv1d
from ..nn.functional import dropout
from ..nn.init import small_initializer
from ..nn.linear import LinearHeadwiseExpand
from .slstm_config import sLSTMCellConfig, sLSTMLayerConfig


class sLSTMState(eqx.Module):
    """sLSTM cell state: output y, cell c, normaliser n, stabiliser m, each `(B, NH, DH)` float32."""

    y: Float[Array, "B NH DH"]
    c: Float[Array, "B NH DH"]
    n: Float[Array, "B NH DH"]
    m: Float[Array, "B NH DH"]


def _zero_state(batch_size: int, num_heads: int, head_dim: int) -> sLSTMState:
    z = jnp.zeros((batch_size, num_heads, head_dim), jnp.float32)
    return sLSTMState(y=z, c=z, n=z, m=z)


def slstm_bias_init(config: sLSTMCellConfig, *, key: PRNGKeyArray) -> Float[Array, "NH 4 DH"]:
    """Gate biases `(NH, 4, DH)` in gate order (i, f, z, o) per `config.bias_init`.

    `powerlaw_blockdependent`: forget bias of unit j is `-(-5 + 12 (j/(DH-1))^(0.3 + 1.3 r))` with
    `r = _block_idx / (_num_blocks - 1)` (0 for one block), from +5 (j=0) down to -7; other gates 0. With
    DH = 1 the single unit gets +5 (the reference divides 0 by 0). `small_init`: forget bias
    linspace(3, 6) over DH, others 0. `standard`: all `U(±1/sqrt(hidden_size))`. `zeros`: all 0.
    """
    nh, dh = config.num_heads, config.head_dim
    if config.bias_init == "standard":
        bound = 1.0 / math.sqrt(config.hidden_size)
        return jr.uniform(key, (nh, 4, dh), jnp.float32, minval=-bound, maxval=bound)
    bias = jnp.zeros((nh, 4, dh), jnp.float32)
    if config.bias_init == "powerlaw_blockdependent":
        nb = config._num_blocks
        ratio = config._block_idx / (nb - 1) if nb > 1 else 0.0
        frac = jnp.arange(dh, dtype=jnp.float32) / max(dh - 1, 1)
        fbias = -(-5.0 + 12.0 * frac ** (0.3 + 1.3 * ratio))
        return bias.at[:, 1, :].set(fbias)
    if config.bias_init == "small_init":
        return bias.at[:, 1, :].set(jnp.linspace(3.0, 6.0, dh, dtype=jnp.float32))
    if config.bias_init == "zeros":
        return bias
    raise ValueError(
        f"sLSTMCellConfig.bias_init: unknown value {config.bias_init!r}; allowed: "
        "('powerlaw_blockdependent', 'small_init', 'standard', 'zeros')"
    )


class sLSTMCell(eqx.Module):
    """Recurrent sLSTM cell, scanned over time with `lax.scan` (recurrence in the module docstring).

    Input: gate pre-activations from the input projections, `(B, S, 4, NH, DH)` in gate order (i, f, z, o).
    Parameters: block-diagonal recurrent kernel `(NH, DH_in, 4, DH_out)` and bias `(NH, 4, DH)`, float32.
    """

    recurrent_kernel: Float[Array, "NH DH 4 DH"]
    bias: Float[Array, "NH 4 DH"]
    config: sLSTMCellConfig = eqx.field(static=True)
    recurrent_kernel_axes: ClassVar[LogicalAxes] = ("heads", "head_dim", "gates", "head_dim")
    bias_axes: ClassVar[LogicalAxes] = ("heads", "gates", "head_dim")

    def __init__(self, config: sLSTMCellConfig, *, key: PRNGKeyArray):
        if config.hidden_size <= 0:
            raise ValueError(
                f"sLSTMCell: hidden_size must be set (positive), got {config.hidden_size}; an "
                "sLSTMLayerConfig sets it from embedding_dim"
            )
        if config.hidden_size % config.num_heads != 0:
            raise ValueError(
                f"sLSTMCell: num_heads={config.num_heads} must divide hidden_size={config.hidden_size}"
            )
        krec, kbias = jr.split(key)
        nh, dh = config.num_heads, config.head_dim
        if config.recurrent_weight_init == "zeros":
            self.recurrent_kernel = jnp.zeros((nh, dh, 4, dh), jnp.float32)
        elif config.recurrent_weight_init == "standard":
            bound = 1.0 / math.sqrt(config.hidden_size)
            self.recurrent_kernel = jr.uniform(
                krec, (nh, dh, 4, dh), jnp.float32, minval=-bound, maxval=bound
            )
        else:
            raise ValueError(
                "sLSTMCellConfig.recurrent_weight_init: unknown value "
                f"{config.recurrent_weight_init!r}; allowed: ('zeros', 'standard')"
            )
        self.bias = slstm_bias_init(config, key=kbias)
        self.config = config

    @property
    def num_heads(self) -> int:
        return self.config.num_heads

    @property
    def head_dim(self) -> int:
        return self.config.head_dim

    def init_state(self, batch_size: int) -> sLSTMState:
        """All-zero state (y, c, n, m), each `(batch_size, NH, DH)` float32."""
        return _zero_state(batch_size, self.num_heads, self.head_dim)

    def _pointwise(self, state: sLSTMState, wx: Float[Array, "B 4 NH DH"]) -> sLSTMState:
        y_prev = state.y
        if self.config.gradient_recurrent_cut:
            y_prev = jax.lax.stop_gradient(y_prev)
        ry = jnp.einsum("bhi,higo->bgho", y_prev, self.recurrent_kernel)
        raw = wx.astype(jnp.float32) + ry + jnp.transpose(self.bias, (1, 0, 2))
        i_raw, f_raw, z_raw, o_raw = raw[:, 0], raw[:, 1], raw[:, 2], raw[:, 3]
        if self.config.function == "lstm":
            c = jax.nn.sigmoid(f_raw) * state.c + jax.nn.sigmoid(i_raw) * jnp.tanh(z_raw)
            y = jax.nn.sigmoid(o_raw) * jnp.tanh(c)
            n, m = state.n, state.m
        else:
            first = state.n == 0.0
            log_f_plus_m = state.m + jax.nn.log_sigmoid(f_raw)
            m = jnp.where(first, i_raw, jnp.maximum(i_raw, log_f_plus_m))
            m = jax.lax.stop_gradient(m)
            i_gate = jnp.exp(i_raw - m)
            # Where n == 0 the old state is zero: f' = 0 (exp(-inf)), avoiding inf * 0.
            f_gate = jnp.exp(jnp.where(first, -jnp.inf, log_f_plus_m - m))
            c = f_gate * state.c + i_gate * jnp.tanh(z_raw)
            n = f_gate * state.n + i_gate
            y = jax.nn.sigmoid(o_raw) * c / n
        clip = self.config.forward_clipval
        if clip is not None:
            y = jnp.clip(y, -clip, clip)
        return sLSTMState(y=y, c=c, n=n, m=m)

    @jax.named_scope("sLSTMCell")
    def call_with_state(
        self, x_gates: Float[Array, "B S 4 NH DH"], state: sLSTMState
    ) -> tuple[Float[Array, "B NH S DH"], sLSTMState]:
        """The recurrence over the sequence from ``state``: outputs ``(B, NH, S, DH)`` float32 and
        the state after the last step."""

        def body(carry: sLSTMState, wx: Array) -> tuple[sLSTMState, Array]:
            new = self._pointwise(carry, wx)
            return new, new.y

        if x_gates.shape[1] == 1:  # one decode step: no scan
            last = self._pointwise(state, x_gates[:, 0])
            return last.y[:, :, None], last
        xs = jnp.moveaxis(x_gates.astype(jnp.float32), 1, 0)  # (S, B, 4, NH, DH)
        last, ys = jax.lax.scan(body, state, xs)
        return jnp.transpose(ys, (1, 2, 0, 3)), last

    def __call__(self, x_gates: Float[Array, "B S 4 NH DH"]) -> Float[Array, "B NH S DH"]:
        """The whole sequence from a zero state: outputs ``(B, NH, S, DH)`` float32."""
        return self.call_with_state(x_gates, self.init_state(x_gates.shape[0]))[0]


class sLSTMLayerState(eqx.Module):
    """Decode state of an sLSTM layer: the conv window `(B, K, D)` and the cell state."""

    conv: Float[Array, "B K D"]
    cell: sLSTMState


class sLSTMLayer(eqx.Module):
    """sLSTM layer: `(B, S, D) -> (B, S, D)`, input already pre-normed by the block.

    `x_c = SiLU(conv(x))` (identity if `conv1d_kernel_size == 0`); ĩ, f̃ from `x_c` and z̃, õ from `x` through
    four headwise block-diagonal projections (NH blocks of DH×DH, no bias, small-init(D)); the cell; dropout
    (only with a key); a per-head LayerNorm over DH (eps `group_norm_eps`, weight `(D,)`, no bias). No
    output projection.
    """

    conv1d: CausalConv1d
    igate: LinearHeadwiseExpand
    fgate: LinearHeadwiseExpand
    zgate: LinearHeadwiseExpand
    ogate: LinearHeadwiseExpand
    cell: sLSTMCell
    group_norm_weight: Float[Array, " D"] | None
    config: sLSTMLayerConfig = eqx.field(static=True)
    # Set by `parallel.with_context_parallel`: the sLSTM has no context-parallel path (`_run`).
    context_axis: str | None = eqx.field(static=True)
    group_norm_weight_axes: ClassVar[LogicalAxes] = ("embed",)

    def __init__(self, config: sLSTMLayerConfig, *, key: PRNGKeyArray):
        if not isinstance(config, sLSTMLayerConfig):
            raise ValueError(f"sLSTMLayer expects an sLSTMLayerConfig, got {type(config).__name__}")
        D, nh = config.embedding_dim, config.num_heads
        if D <= 0:
            raise ValueError(f"sLSTMLayerConfig.embedding_dim must be set (positive), got {D}")
        if D % nh != 0:
            raise ValueError(f"sLSTMLayerConfig.num_heads={nh} must divide embedding_dim={D}")
        kconv, ki, kf, kz, ko, kcell = jr.split(key, 6)
        self.context_axis = None
        self.conv1d = CausalConv1d(
            D, config.conv1d_kernel_size, dtype=config.dtype, channels_axis="embed", key=kconv
        )
        init = small_initializer(D)

        def proj(k: PRNGKeyArray) -> LinearHeadwiseExpand:
            return LinearHeadwiseExpand(
                D,
                nh,
                D,
                use_bias=False,
                dtype="float32",
                kernel_init=init,
                features_axis="embed",
                key=k,
            )

        self.igate, self.fgate, self.zgate, self.ogate = proj(ki), proj(kf), proj(kz), proj(ko)
        self.cell = sLSTMCell(config, key=kcell)
        self.group_norm_weight = jnp.ones((D,), jnp.float32) if config.group_norm_weight else None
        self.config = config

    def _conv_act(self, x_conv: Array) -> Array:
        return jax.nn.silu(x_conv) if self.config.conv1d_kernel_size > 0 else x_conv

    def _gates(self, x: Array, x_c: Array) -> Array:
        """`(..., D)` inputs -> gate pre-activations `(..., 4, NH, DH)` float32, order (i, f, z, o)."""
        nh, dh = self.config.num_heads, self.config.head_dim
        g = jnp.stack([self.igate(x_c), self.fgate(x_c), self.zgate(x), self.ogate(x)], axis=-2)
        return g.reshape(*g.shape[:-1], nh, dh)

    def _group_norm(self, y: Float[Array, "*batch NH DH"]) -> Float[Array, "*batch D"]:
        y = y.astype(jnp.float32)
        mean = jnp.mean(y, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(y - mean), axis=-1, keepdims=True)
        y = (y - mean) * jax.lax.rsqrt(var + self.config.group_norm_eps)
        y = y.reshape(*y.shape[:-2], -1)
        if self.group_norm_weight is not None:
            y = y * self.group_norm_weight
        return y.astype(jnp.dtype(self.config.dtype))

    def _conv(
        self, x: Float[Array, "B S D"], window: Float[Array, "B K D"]
    ) -> tuple[Float[Array, "B S D"], Float[Array, "B K D"]]:
        """The causal conv of ``x`` continuing from the previous inputs in ``window``, activated,
        and the window after ``x``."""
        if self.config.conv1d_kernel_size == 0:
            return x, window
        if x.shape[1] == 1:
            x_conv, window = self.conv1d.step(window, x[:, 0])
            return self._conv_act(x_conv[:, None]), window
        window = window.astype(jnp.dtype(self.config.dtype))
        full = jnp.concatenate([window, x.astype(window.dtype)], axis=1)
        x_conv = self.conv1d(full)[:, window.shape[1] :]
        return self._conv_act(x_conv), self.conv1d.state_from_sequence(full)

    def _run(
        self, x: Float[Array, "B S D"], state: sLSTMLayerState, key: PRNGKeyArray | None
    ) -> tuple[Float[Array, "B S D"], sLSTMLayerState]:
        if self.context_axis is not None:
            raise ValueError(
                "sLSTM blocks cannot run with the sequence split over the context-parallel axis "
                f"'{self.context_axis}': the sLSTM recurrence is non-linear, so a segment needs the "
                "exact state after every earlier token, which no exchange of small states gives "
                "(a hand-off along the axis would run the segments one after another); use cp=1 "
                "(the dp, fsdp and tp axes) for models with sLSTM blocks (slstm_at)"
            )
        x_c, conv_state = self._conv(x, state.conv)
        y, cell_state = self.cell.call_with_state(self._gates(x, x_c), state.cell)
        y = dropout(y, self.config.dropout, key=key)  # (B, NH, S, DH) float32
        out = self._group_norm(jnp.transpose(y, (0, 2, 1, 3)))
        return out, sLSTMLayerState(conv=conv_state, cell=cell_state)

    @jax.named_scope("sLSTMLayer")
    def __call__(
        self,
        x: Float[Array, "B S D"],
        *,
        document_borders: Bool[Array, "B S"] | None = None,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "B S D"]:
        """Full sequence from a zero state. Output in the compute dtype. Dropout only with a key.
        ``document_borders`` are accepted like the mLSTM layers' and unused: the sLSTM has no
        memory reset."""
        del document_borders
        return self._run(x, self.init_state(x.shape[0]), key)[0]

    def init_state(self, batch_size: int) -> sLSTMLayerState:
        """Zero decode state: conv window `(B, K, D)` in the compute dtype and a zero cell state."""
        return sLSTMLayerState(
            conv=self.conv1d.init_state(batch_size), cell=self.cell.init_state(batch_size)
        )

    @jax.named_scope("sLSTMLayer")
    def call_with_state(
        self,
        x: Float[Array, "B S D"],
        state: sLSTMLayerState,
        *,
        document_borders: Bool[Array, "B S"] | None = None,
    ) -> tuple[Float[Array, "B S D"], sLSTMLayerState]:
        """``S`` tokens continuing from ``state`` (deterministic): outputs and the state after the
        last one. Serves prefill (from ``init_state``), decoding (``S = 1``) and whole sequences.
        ``document_borders`` are unused (no memory reset in the sLSTM)."""
        del document_borders
        return self._run(x, state, None)
