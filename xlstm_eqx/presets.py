"""The reference's shipped model configurations, and tiny ones for tests and CPU runs.

The values follow NX-AI/xlstm-jax (commit 0f3ebc2) `configs/model/*.yaml` + `configs/parallel/*.yaml`, as the
reference trainer (`train_init_fns.init_model_config`) assembles them, with the experiment defaults
`context_length: 2048` and vocab 50304 (GPT-2 tokenizer rounded up to a multiple of 64). Notes:
- Backend: the yaml's `triton_kernels` / `chunkwise--triton_xl_chunk` is mapped to this package's
  `auto` backend with chunk size 64 (the chunkwise form, or the Pallas kernels on a GPU where
  they are faster; see `mLSTMBackendNameAndKwargs`).
- The yaml's `cell_norm_type` (rmsnorm) is overwritten by the model `norm_type` (also rmsnorm) as in the
  reference; the v1 out-norm uses `cell_norm_type_v1` (layernorm).
- The `mlstm` configs have no FFN; the `mlstm_v1` configs use a SwiGLU FFN (proj_factor 2.667, "swish").
- Llama: the yaml sets `logits_soft_cap: 30.0` but the reference trainer never passes it to `LlamaConfig`,
  so the reference Llama runs trained without a soft cap. The presets keep the yaml's 30.0. The yaml's
  `attention_backend: cudnn` is kept (a GPU backend; use `dataclasses.replace(cfg, attention_backend="xla")`
  on CPU). The Llama parallel yaml inherits `pipeline_axis_name: pipe` from `parallel/default.yaml`; the
  presets keep the dataclass default "pp" (the pipeline axis has size 1 and no effect).

Parameter counts: the reference does not record exact counts for these configs (its trainer only logs
`get_num_params` at run time); the names ("165M", "1.3B", "7B") are nominal. Closed-form counts of the
reference architecture (embedding + LM head + out-norm + blocks, no buffers), which this package's models
reproduce:
    mLSTMv1_165M 164,073,312    mLSTM165M 163,806,144    llama165M 162,220,800    mLSTM120M 120,536,928
    mLSTMv1_1.3B 1,420,839,104  mLSTM1.3B 1,422,559,616  llama1.3B 1,420,396,544
    mLSTMv1_7B 6,865,424,896    mLSTM7B 6,889,935,872    llama7B 6,863,196,160
The one published figure is the xLSTM 7B release (NX-AI/xLSTM-7b on the HF Hub, the mLSTMv1_7B
architecture with the same 50304 vocabulary): 27.46 GB of float32 safetensors, i.e. 6.865e9 parameters,
consistent with the mLSTMv1_7B count above.
"""

from collections.abc import Callable

from .cell.backend_config import mLSTMBackendNameAndKwargs
from .core.parallel_config import ParallelConfig
from .llama.config import LlamaConfig
from .nn.feedforward_config import FeedForwardConfig
from .xlstm.config import xLSTMLMModelConfig
from .xlstm.mlstm_config import LayerType, mLSTMBlockConfig, mLSTMCellConfig, mLSTMLayerConfig
from .xlstm.slstm_config import sLSTMBlockConfig, sLSTMLayerConfig


VOCAB_SIZE = 50304


CONTEXT_LENGTH = 2048


def _xlstm_parallel(remat: list[str], fsdp: int) -> ParallelConfig:
    big = fsdp > 1
    return ParallelConfig(
        data_axis_size=-1,
        fsdp_axis_size=fsdp,
        model_axis_size=1,
        remat=list(remat),
        fsdp_modules=["Embed", "LMHead", "mLSTMBlock"] if big else [],
        fsdp_min_weight_size=2**18,
        fsdp_gather_dtype="bfloat16",
        tp_async_dense=False,
    )


def _xlstm(
    *,
    layer_type: LayerType,
    embedding_dim: int,
    num_blocks: int,
    num_heads: int,
    parallel: ParallelConfig,
    scan_blocks: bool = True,
) -> xLSTMLMModelConfig:
    v1 = layer_type == "mlstm_v1"
    cell = mLSTMCellConfig(
        gate_dtype="float32",
        backend=mLSTMBackendNameAndKwargs(
            name="triton_kernels", kwargs={"backend_name": "chunkwise--triton_xl_chunk"}
        ),
        igate_bias_init_range=-10.0 if v1 else 0.0,
        add_qk_norm=False,
        norm_type="rmsnorm",
        norm_type_v1="layernorm",
        norm_eps=1e-6,
        gate_soft_cap=15.0,
        reset_at_document_boundaries=False,
    )
    layer = mLSTMLayerConfig(
        layer_type=layer_type,
        num_heads=num_heads,
        init_distribution="normal",
        output_init_fn="wang",
        qk_dim_factor=0.5 if v1 else 1.0,
        v_dim_factor=1.0,
        norm_type="rmsnorm",
        mlstm_cell=cell,
    )
    feedforward = (
        FeedForwardConfig(
            proj_factor=2.667,
            act_fn="swish",
            ff_type="ffn_gated",
            dtype="bfloat16",
            output_init_fn="wang",
            init_distribution="normal",
        )
        if v1
        else None
    )
    return xLSTMLMModelConfig(
        vocab_size=VOCAB_SIZE,
        embedding_dim=embedding_dim,
        num_blocks=num_blocks,
        context_length=CONTEXT_LENGTH,
        tie_weights=False,
        add_embedding_dropout=False,
        add_post_blocks_norm=True,
        parallel=parallel,
        scan_blocks=scan_blocks,
        norm_eps=1e-6,
        norm_type="rmsnorm",
        init_distribution_out="normal",
        init_distribution_embed="normal",
        logits_soft_cap=30.0,
        lm_head_dtype="bfloat16",
        dtype="bfloat16",
        mlstm_block=mLSTMBlockConfig(mlstm=layer, feedforward=feedforward, add_post_norm=False),
    )


# --- mLSTM (Mamba-style "mlstm" layer, no FFN) ----------------------------------------------------------


def mLSTM120M() -> xLSTMLMModelConfig:
    """D=768, 12 blocks, 4 heads, unscanned."""
    return _xlstm(
        layer_type="mlstm",
        embedding_dim=768,
        num_blocks=12,
        num_heads=4,
        scan_blocks=False,
        parallel=_xlstm_parallel([], 1),
    )


def mLSTM165M() -> xLSTMLMModelConfig:
    """D=768, 24 blocks, 4 heads."""
    return _xlstm(
        layer_type="mlstm",
        embedding_dim=768,
        num_blocks=24,
        num_heads=4,
        parallel=_xlstm_parallel(["mLSTMBlock"], 1),
    )


def mLSTM1_3B() -> xLSTMLMModelConfig:
    """D=2048, 48 blocks, 4 heads."""
    return _xlstm(
        layer_type="mlstm",
        embedding_dim=2048,
        num_blocks=48,
        num_heads=4,
        parallel=_xlstm_parallel(["mLSTMBlock"], 1),
    )


def mLSTM7B() -> xLSTMLMModelConfig:
    """D=4096, 64 blocks, 8 heads, FSDP 8."""
    return _xlstm(
        layer_type="mlstm",
        embedding_dim=4096,
        num_blocks=64,
        num_heads=8,
        parallel=_xlstm_parallel(["mLSTMBlock"], 8),
    )


# --- mLSTM v1 (xLSTM-7B style layer + SwiGLU FFN) --------------------------------------------------------


def mLSTMv1_165M() -> xLSTMLMModelConfig:
    """D=768, 12 blocks, 4 heads, FFN 2112."""
    return _xlstm(
        layer_type="mlstm_v1",
        embedding_dim=768,
        num_blocks=12,
        num_heads=4,
        parallel=_xlstm_parallel(["xLSTMResBlock", "FFNResBlock"], 1),
    )


def mLSTMv1_1_3B() -> xLSTMLMModelConfig:
    """D=2048, 24 blocks, 4 heads, FFN 5504."""
    return _xlstm(
        layer_type="mlstm_v1",
        embedding_dim=2048,
        num_blocks=24,
        num_heads=4,
        parallel=_xlstm_parallel(["xLSTMResBlock", "FFNResBlock"], 1),
    )


def mLSTMv1_2_7B() -> xLSTMLMModelConfig:
    """D=2560, 32 blocks, 5 heads, FFN 6848, FSDP 8."""
    return _xlstm(
        layer_type="mlstm_v1",
        embedding_dim=2560,
        num_blocks=32,
        num_heads=5,
        parallel=_xlstm_parallel(["xLSTMResBlock", "FFNResBlock"], 8),
    )


def mLSTMv1_7B() -> xLSTMLMModelConfig:
    """D=4096, 32 blocks, 8 heads, FFN 10944, FSDP 8."""
    return _xlstm(
        layer_type="mlstm_v1",
        embedding_dim=4096,
        num_blocks=32,
        num_heads=8,
        parallel=_xlstm_parallel(["xLSTMResBlock", "FFNResBlock"], 8),
    )


# --- Llama ----------------------------------------------------------------------------------------------


def _llama(embedding_dim: int, num_blocks: int, parallel: ParallelConfig) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB_SIZE,
        embedding_dim=embedding_dim,
        num_blocks=num_blocks,
        head_dim=128,
        qk_norm=False,
        theta=10_000.0,
        add_embedding_dropout=False,
        scan_blocks=True,
        dtype="bfloat16",
        attention_backend="cudnn",
        mask_across_document_boundaries=False,
        logits_soft_cap=30.0,
        parallel=parallel,
        context_length=CONTEXT_LENGTH,
    )


def llama165M() -> LlamaConfig:
    """D=768, 12 blocks, head_dim 128 (6 heads), FFN 2048."""
    return _llama(768, 12, ParallelConfig(remat=["TransformerBlock"]))


def llama1_3B() -> LlamaConfig:
    """D=2048, 24 blocks, 16 heads, FFN 5504."""
    return _llama(2048, 24, ParallelConfig(remat=["TransformerBlock"]))


def llama7B() -> LlamaConfig:
    """D=4096, 32 blocks, 32 heads, FFN 10944, FSDP 8."""
    return _llama(
        4096,
        32,
        ParallelConfig(
            fsdp_axis_size=8,
            remat=["AttnBlock", "FFNBlock"],
            fsdp_modules=["Embed", "LMHead", "TransformerBlock"],
        ),
    )


# --- Tiny configs for tests and the CPU main job (float32, vocab 64, exact backends) ----------------------


def tiny_xlstm() -> xLSTMLMModelConfig:
    """2 mLSTM v1 blocks with a SwiGLU FFN, D=32, 4 heads, float32, the parallel backend."""
    return xLSTMLMModelConfig(
        vocab_size=64,
        embedding_dim=32,
        num_blocks=2,
        context_length=64,
        norm_type="rmsnorm",
        logits_soft_cap=30.0,
        lm_head_dtype="float32",
        dtype="float32",
        scan_blocks=True,
        mlstm_block=mLSTMBlockConfig(
            mlstm=mLSTMLayerConfig(
                layer_type="mlstm_v1",
                num_heads=4,
                qk_dim_factor=0.5,
                mlstm_cell=mLSTMCellConfig(
                    backend="parallel_stabilized",
                    igate_bias_init_range=-10.0,
                    gate_soft_cap=15.0,
                ),
            ),
            feedforward=FeedForwardConfig(proj_factor=2.667, act_fn="swish"),
        ),
    )


def tiny_xlstm_slstm() -> xLSTMLMModelConfig:
    """3 blocks (mLSTM, sLSTM, mLSTM), D=32, "mlstm" layers with 4 heads, float32, unscanned."""
    return xLSTMLMModelConfig(
        vocab_size=64,
        embedding_dim=32,
        num_blocks=3,
        context_length=64,
        dtype="float32",
        lm_head_dtype="float32",
        scan_blocks=False,
        slstm_at=[1],
        mlstm_block=mLSTMBlockConfig(
            mlstm=mLSTMLayerConfig(layer_type="mlstm", num_heads=4, qkv_proj_blocksize=4)
        ),
        slstm_block=sLSTMBlockConfig(slstm=sLSTMLayerConfig(num_heads=4, conv1d_kernel_size=4)),
    )


def tiny_llama() -> LlamaConfig:
    """2 blocks, D=32, head_dim 8 (4 heads), vocab 64, float32, xla attention."""
    return LlamaConfig(
        vocab_size=64,
        embedding_dim=32,
        num_blocks=2,
        head_dim=8,
        dtype="float32",
        attention_backend="xla",
        context_length=64,
    )


def small_xlstm() -> xLSTMLMModelConfig:
    """The main job's xLSTM (3.35M parameters with the byte vocabulary): 4 mLSTM v1 blocks
    (xLSTM-7B style, SwiGLU FFN), D=256, 4 heads, backend "auto" (chunk 64: the chunkwise form,
    or the Pallas kernels on a GPU where they time faster), float32,
    context 1024 — sized to learn visibly in a few CPU minutes.

    Blocks unrolled (``scan_blocks=False``): with 4 blocks compile time is no issue, and the
    profile of the train step showed the scan's stacked residuals (writes, reads, zero fills)
    taking ~25% of the step on CPU; unrolled is 1.2x faster and needs 30% less memory."""
    return xLSTMLMModelConfig(
        vocab_size=256,
        embedding_dim=256,
        num_blocks=4,
        context_length=1024,
        norm_type="rmsnorm",
        logits_soft_cap=30.0,
        lm_head_dtype="float32",
        dtype="float32",
        scan_blocks=False,
        mlstm_block=mLSTMBlockConfig(
            mlstm=mLSTMLayerConfig(
                layer_type="mlstm_v1",
                num_heads=4,
                qk_dim_factor=0.5,
                mlstm_cell=mLSTMCellConfig(
                    backend=mLSTMBackendNameAndKwargs(name="auto", kwargs={"chunk_size": 64}),
                    igate_bias_init_range=-10.0,
                    gate_soft_cap=15.0,
                ),
            ),
            feedforward=FeedForwardConfig(proj_factor=2.667, act_fn="swish"),
        ),
    )


def small_llama() -> LlamaConfig:
    """The Llama baseline at the main job's size: 4 blocks, D=256, head_dim 64 (4 heads),
    3.34M parameters with the byte vocabulary — equal to `small_xlstm` within 0.5%. Blocks
    unrolled, as in `small_xlstm`."""
    return LlamaConfig(
        vocab_size=256,
        embedding_dim=256,
        num_blocks=4,
        head_dim=64,
        scan_blocks=False,
        dtype="float32",
        attention_backend="xla",
        context_length=1024,
    )


PRESETS: dict[str, Callable[[], xLSTMLMModelConfig | LlamaConfig]] = {
    "mLSTM120M": mLSTM120M,
    "mLSTM165M": mLSTM165M,
    "mLSTM1.3B": mLSTM1_3B,
    "mLSTM7B": mLSTM7B,
    "mLSTMv1_165M": mLSTMv1_165M,
    "mLSTMv1_1.3B": mLSTMv1_1_3B,
    "mLSTMv1_2.7B": mLSTMv1_2_7B,
    "mLSTMv1_7B": mLSTMv1_7B,
    "llama165M": llama165M,
    "llama1.3B": llama1_3B,
    "llama7B": llama7B,
    "tiny_xlstm": tiny_xlstm,
    "tiny_xlstm_slstm": tiny_xlstm_slstm,
    "tiny_llama": tiny_llama,
    "small_xlstm": small_xlstm,
    "small_llama": small_llama,
}


"""Preset name (the reference's yaml names, e.g. "mLSTMv1_1.3B") -> a function returning a fresh config."""


def preset_family(name: str) -> str:
    """'xlstm' or 'llama': the family of the preset `name` (a key of `PRESETS`)."""
    return "llama" if isinstance(PRESETS[name](), LlamaConfig) else "xlstm"


def preset_aliases(family: str) -> dict[str, str]:
    """Short names within a family → the `PRESETS` key: the family part dropped from names like
    `tiny_xlstm` (`tiny`, and `tiny_slstm` for `tiny_xlstm_slstm`); `small` is the main job's."""
    out: dict[str, str] = {}
    for name in PRESETS:
        parts = name.split("_")
        if family in parts and len(parts) > 1 and preset_family(name) == family:
            out.setdefault("_".join(p for p in parts if p != family), name)
    return out


def resolve_preset_name(name: str, family: str = "xlstm") -> str:
    """The `PRESETS` key that `name` means in `family`: the key itself, "1.3B" written "1_3B",
    or an alias of `preset_aliases(family)`; a ValueError naming the known names otherwise."""
    if name in PRESETS:
        return name
    for key in PRESETS:
        if key.replace(".", "_") == name:
            return key
    aliases = preset_aliases(family)
    if name in aliases:
        return aliases[name]
    known = sorted(PRESETS) + sorted(aliases)
    raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(known)}")


def get_preset(name: str, family: str = "xlstm") -> xLSTMLMModelConfig | LlamaConfig:
    """A fresh config for `name`; "1.3B" may also be written "1_3B" (the function names), and
    the short names of `preset_aliases(family)` (`small`, `tiny`, `tiny_slstm` for xLSTM;
    `small`, `tiny` for Llama with family="llama") are the presets they stand for."""
    return PRESETS[resolve_preset_name(name, family)]()
