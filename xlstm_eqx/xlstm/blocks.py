"""xLSTM blocks and the block stack (docs/architecture.md, "Forward pass of xLSTMLMModel").

A block is pre-norm with a residual: ``x = x + PostNorm?(Layer(Norm(x)))`` with the mLSTM layer
(``mlstm`` or ``mlstm_v1``) or the sLSTM layer, then optionally the same around a feed-forward.
The stack applies the blocks in order, either as a tuple of blocks or — ``scan_blocks=True`` —
as one block whose parameters are stacked on a leading axis of length L (built with
``eqx.filter_vmap`` over split keys) and applied with ``jax.lax.scan``. Both layouts give the
same parameters for the same key, hence the same outputs.
"""

from collections.abc import Mapping
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Bool, Float, PRNGKeyArray, PyTree

from ..core.parallel_config import ParallelConfig
from ..core.utils import split_optional_key
from ..nn.axes import LogicalAxes
from ..nn.feedforward import FeedForward
from ..nn.feedforward_config import FeedForwardConfig
from ..nn.norm import LayerNorm, RMSNorm, make_norm
from .config import xLSTMBlockConfig, xLSTMBlockStackConfig
from .mlstm_config import mLSTMLayerConfig
from .mlstm_layer import mLSTMLayer
from .mlstm_layer_v1 import mLSTMLayerV1
from .slstm import sLSTMLayer
from .slstm_config import sLSTMLayerConfig


def make_mlstm_layer(config: mLSTMLayerConfig, *, key: PRNGKeyArray) -> mLSTMLayer | mLSTMLayerV1:
    """The layer class chosen by ``config.layer_type`` (``"mlstm"`` or ``"mlstm_v1"``)."""
    if config.layer_type == "mlstm":
        return mLSTMLayer(config, key=key)
    if config.layer_type == "mlstm_v1":
        return mLSTMLayerV1(config, key=key)
    raise ValueError(f"layer_type: unknown value {config.layer_type!r}; allowed: mlstm, mlstm_v1")


def _remat_names(config: xLSTMBlockConfig | xLSTMBlockStackConfig) -> tuple[str, ...]:
    parallel = config.parallel
    return tuple(parallel.remat) if isinstance(parallel, ParallelConfig) else ()


def _maybe_remat(fn: Any, enabled: bool) -> Any:
    """``fn`` rematerialised in the backward pass when ``enabled``: no activations are saved inside;
    ``prevent_cse=False`` as the reference, fine under scan (docs/architecture.md, "Module remat")."""
    return eqx.filter_checkpoint(fn, prevent_cse=False) if enabled else fn


class ResidualBlock(eqx.Module):
    """``x + post_norm(layer(norm(x)))`` (``post_norm`` optional, Gemma-2 style: it sits before the
    residual add, not on the stream). ``layer`` is an mLSTM/sLSTM layer or a feed-forward."""

    norm: LayerNorm | RMSNorm
    layer: Any
    post_norm: LayerNorm | RMSNorm | None

    def _add(self, x: Float[Array, "B S D"], y: Float[Array, "B S D"]) -> Float[Array, "B S D"]:
        if self.post_norm is not None:
            y = self.post_norm(y)
        return x + y.astype(x.dtype)

    def __call__(
        self, x: Float[Array, "B S D"], *, key: PRNGKeyArray | None = None, **layer_kwargs: Any
    ) -> Float[Array, "B S D"]:
        """Extra keyword arguments (``document_borders``) go to the layer."""
        return self._add(x, self.layer(self.norm(x), key=key, **layer_kwargs))

    def call_with_state(
        self,
        x: Float[Array, "B S D"],
        state: PyTree,
        *,
        document_borders: Bool[Array, "B S"] | None = None,
    ) -> tuple[Float[Array, "B S D"], PyTree]:
        """The same with the layer's decode state in and out (a recurrent layer only)."""
        y, state = self.layer.call_with_state(
            self.norm(x), state, document_borders=document_borders
        )
        return self._add(x, y), state


class xLSTMBlock(eqx.Module):
    """One xLSTM block from an ``xLSTMBlockConfig``: the mLSTM or sLSTM residual sub-block and an
    optional feed-forward residual sub-block. Norms: ``norm_type`` with ``norm_eps``, scale only,
    output in the compute dtype. ``"xLSTMResBlock"`` / ``"FFNResBlock"`` in ``parallel.remat``
    rematerialise the sub-blocks in the backward pass."""

    xlstm_res_block: ResidualBlock
    ffn_res_block: ResidualBlock | None
    is_slstm: bool = eqx.field(static=True)
    remat_xlstm: bool = eqx.field(static=True)
    remat_ffn: bool = eqx.field(static=True)
    # the reference's names (fsdp_modules / remat; parallel.rules.module_names)
    reference_name: ClassVar[str] = "mLSTMBlock"
    field_reference_names: ClassVar[Mapping[str, str | None]] = {
        "xlstm_res_block": "xLSTMResBlock",
        "ffn_res_block": "FFNResBlock",
    }

    def __init__(self, config: xLSTMBlockConfig, *, key: PRNGKeyArray):
        klayer, kffn = jr.split(key)
        # (the config's derive step has parsed dicts into config objects)
        if isinstance(config.mlstm, mLSTMLayerConfig):
            layer = make_mlstm_layer(config.mlstm, key=klayer)
            D = config.mlstm.embedding_dim
            self.is_slstm = False
        elif isinstance(config.slstm, sLSTMLayerConfig):
            layer = sLSTMLayer(config.slstm, key=klayer)
            D = config.slstm.embedding_dim
            self.is_slstm = True
        else:
            raise ValueError("xLSTMBlockConfig: exactly one of 'mlstm' and 'slstm' must be set")

        def norm() -> LayerNorm | RMSNorm:
            return make_norm(
                config.norm_type, D, eps=config.norm_eps, dtype=config.dtype, axes=("embed",)
            )

        post = config.add_post_norm
        self.xlstm_res_block = ResidualBlock(norm(), layer, norm() if post else None)
        if isinstance(config.feedforward, FeedForwardConfig):
            ffn = FeedForward(config.feedforward, key=kffn)
            self.ffn_res_block = ResidualBlock(norm(), ffn, norm() if post else None)
        else:
            self.ffn_res_block = None
        remat = _remat_names(config)
        self.remat_xlstm = self.field_reference_names["xlstm_res_block"] in remat
        self.remat_ffn = self.field_reference_names["ffn_res_block"] in remat

    def __call__(
        self,
        x: Float[Array, "B S D"],
        *,
        document_borders: Bool[Array, "B S"] | None = None,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "B S D"]:
        """``(B, S, D) -> (B, S, D)``. ``document_borders`` reach the mLSTM layer (memory reset;
        the sLSTM layer has none). Dropout only with a key."""
        klayer, kffn = split_optional_key(key, 2)
        # Called through the sub-modules themselves (not an unbound __call__): FSDP may have
        # wrapped them (parallel/fsdp.py, gather-at-use).
        xlstm_residual = _maybe_remat(self.xlstm_res_block, self.remat_xlstm)
        x = xlstm_residual(x, key=klayer, document_borders=document_borders)
        if self.ffn_res_block is not None:
            x = _maybe_remat(self.ffn_res_block, self.remat_ffn)(x, key=kffn)
        return x

    def init_state(self, batch_size: int) -> PyTree:
        """Zero decode state of the block's layer."""
        return self.xlstm_res_block.layer.init_state(batch_size)

    def call_with_state(
        self,
        x: Float[Array, "B S D"],
        state: PyTree,
        *,
        document_borders: Bool[Array, "B S"] | None = None,
    ) -> tuple[Float[Array, "B S D"], PyTree]:
        """``S`` tokens continuing from the layer's decode ``state`` (deterministic): outputs and
        the state after the last one."""
        x, state = self.xlstm_res_block.call_with_state(x, state, document_borders=document_borders)
        if self.ffn_res_block is not None:
            x = self.ffn_res_block(x)
        return x, state


class xLSTMBlockStack(eqx.Module):
    """The stack of ``num_blocks`` xLSTM blocks of a stack/LM config (no norm of its own).

    ``scan_blocks=True`` (pure mLSTM stacks only): ``blocks`` is a single ``xLSTMBlock`` whose
    array leaves carry a leading axis of length L; it is applied with ``jax.lax.scan``.
    ``scan_blocks=False``: ``blocks`` is a tuple of L blocks. Block ``l`` is initialised from
    ``jr.split(key, L)[l]`` in both layouts, so the same key gives the same weights.
    ``"mLSTMBlock"`` in ``parallel.remat`` rematerialises each whole block (any block type).
    """

    blocks: xLSTMBlock | tuple[xLSTMBlock, ...]
    num_blocks: int = eqx.field(static=True)
    scan_blocks: bool = eqx.field(static=True)
    remat_blocks: bool = eqx.field(static=True)
    # logical name (nn.axes) of the leading axis of the scanned (single, stacked) block
    blocks_axes: ClassVar[LogicalAxes] = ("layers",)
    reference_name: ClassVar[str] = "BlockStack"  # fsdp_modules / remat name

    def __init__(self, config: xLSTMBlockStackConfig, *, key: PRNGKeyArray):
        block_configs = config.block_configs()
        L = len(block_configs)
        keys = jr.split(key, L)
        if config.scan_blocks:
            if any(c.slstm is not None for c in block_configs):
                raise ValueError(
                    "scan_blocks must be False when the stack has sLSTM blocks "
                    f"(slstm_at={config.slstm_at})"
                )
            # Every block config is the same apart from _block_idx, which mLSTM blocks ignore.
            template = block_configs[0]
            self.blocks = eqx.filter_vmap(lambda k: xLSTMBlock(template, key=k))(keys)
        else:
            self.blocks = tuple(
                xLSTMBlock(c, key=k) for c, k in zip(block_configs, keys, strict=True)
            )
        self.num_blocks = L
        self.scan_blocks = bool(config.scan_blocks)
        self.remat_blocks = xLSTMBlock.reference_name in _remat_names(config)

    def __call__(
        self,
        x: Float[Array, "B S D"],
        *,
        document_borders: Bool[Array, "B S"] | None = None,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "B S D"]:
        # "mLSTMBlock" in parallel.remat: each whole block is rematerialised in the backward pass.
        remat = self.remat_blocks
        if isinstance(self.blocks, tuple):
            for block, k in zip(self.blocks, split_optional_key(key, self.num_blocks), strict=True):
                x = _maybe_remat(block, remat)(x, document_borders=document_borders, key=k)
            return x
        params, static = eqx.partition(self.blocks, eqx.is_array)
        keys = None if key is None else jr.split(key, self.num_blocks)

        def body(h: Array, xs: tuple[PyTree, PRNGKeyArray | None]) -> tuple[Array, None]:
            block_params, block_key = xs
            block = _maybe_remat(eqx.combine(block_params, static), remat)
            return block(h, document_borders=document_borders, key=block_key), None

        return jax.lax.scan(body, x, (params, keys))[0]

    def block_list(self) -> list[xLSTMBlock]:
        """The blocks as a list of unstacked modules (either layout)."""
        if isinstance(self.blocks, tuple):
            return list(self.blocks)
        params, static = eqx.partition(self.blocks, eqx.is_array)
        return [
            eqx.combine(jax.tree.map(lambda a, i=i: a[i], params), static)
            for i in range(self.num_blocks)
        ]

    def unstacked(self) -> "xLSTMBlockStack":
        """This stack with its blocks as a tuple (the scanned layout's parameters copied out once;
        itself if already a tuple). For the token loop of generation (`generation.decode_view`):
        a scanned decode step would copy every block's parameters and state out of the stacked
        arrays and write the states back, each token. Use `unstack_state` on its states."""
        if isinstance(self.blocks, tuple):
            return self
        return eqx.tree_at(lambda s: s.blocks, self, tuple(self.block_list()))

    def unstack_state(self, state: PyTree) -> PyTree:
        """A decode state of this stack in the layout of `unstacked`: a tuple of per-block states."""
        if isinstance(self.blocks, tuple):
            return state
        return tuple(jax.tree.map(lambda a, i=i: a[i], state) for i in range(self.num_blocks))

    # States are per block: a tuple for the unrolled layout, a stacked PyTree (leading axis L)
    # for the scanned one, carried through the scan's xs/ys.

    def init_state(self, batch_size: int) -> PyTree:
        """Zero decode state of every block."""
        if isinstance(self.blocks, tuple):
            return tuple(b.init_state(batch_size) for b in self.blocks)
        one = self.block_list()[0].init_state(batch_size)
        return jax.tree.map(lambda a: jnp.broadcast_to(a, (self.num_blocks, *a.shape)), one)

    def call_with_state(
        self,
        x: Float[Array, "B S D"],
        state: PyTree,
        *,
        document_borders: Bool[Array, "B S"] | None = None,
    ) -> tuple[Float[Array, "B S D"], PyTree]:
        """``S`` tokens through every block, each continuing from its state in ``state``
        (deterministic): outputs and the states after the last token."""
        if isinstance(self.blocks, tuple):
            states = []
            for block, block_state in zip(self.blocks, state, strict=True):
                x, block_state = block.call_with_state(
                    x, block_state, document_borders=document_borders
                )
                states.append(block_state)
            return x, tuple(states)
        params, static = eqx.partition(self.blocks, eqx.is_array)

        def body(h: Array, xs: tuple[PyTree, PyTree]) -> tuple[Array, PyTree]:
            block_params, block_state = xs
            block = eqx.combine(block_params, static)
            return block.call_with_state(h, block_state, document_borders=document_borders)

        return jax.lax.scan(body, x, (params, state))
