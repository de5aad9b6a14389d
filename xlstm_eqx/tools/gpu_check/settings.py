"""What the GPU check runs: the cases of each part in full and `--quick` mode, tolerances, gate
ranges, the datasheet peak FLOP/s of known devices, and the analytic FLOP counts.
"""

import dataclasses
import importlib.metadata
import re
from collections.abc import Mapping
from typing import NamedTuple


PARTS: tuple[str, ...] = ("correctness", "kernels", "train", "generate", "context")


JSON_NAME = "gpu_check.json"


MD_NAME = "gpu_check.md"


#: Dense (no sparsity) bf16 tensor-core peak of known devices, TFLOP/s, from the vendors'
#: datasheets; matched against `jax.Device.device_kind` in this order (first match wins).
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    (r"\bB200\b", 2250.0),
    (r"\bGH200\b", 989.0),
    (r"\bH200\b", 989.0),
    (r"\bH100\b.*\bPCIe\b", 756.0),
    (r"\bH100\b.*\bNVL\b", 835.0),
    (r"\bH100\b", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    (r"\bH800\b", 989.0),
    (r"\bA100\b", 312.0),
    (r"\bA800\b", 312.0),
    (r"\bL40S\b", 362.0),
    (r"\bL4\b", 121.0),
    (r"\bA10G?\b", 125.0),
)


def peak_bf16_flops(device_kind: str) -> float | None:
    """Datasheet dense bf16 FLOP/s of a device kind (`PEAK_BF16_TFLOPS`), None when unknown: MFU
    against the datasheet is only reported for devices whose peak is known."""
    for pattern, tflops in PEAK_BF16_TFLOPS:
        if re.search(pattern, device_kind, flags=re.IGNORECASE):
            return tflops * 1e12
    return None


# What each mode runs


class CellCase(NamedTuple):
    """A correctness case of the mLSTM kernels: shapes, chunk size, q/k/v dtype, gate range."""

    b: int
    nh: int
    s: int
    dhqk: int
    dhv: int
    chunk: int
    dtype: str
    gates: str  # a key of GATE_RANGES

    def label(self) -> str:
        return (
            f"mlstm B{self.b} NH{self.nh} S{self.s} DHQK{self.dhqk} DHV{self.dhv} "
            f"L{self.chunk} {self.dtype} {self.gates}"
        )


class AttentionCase(NamedTuple):
    """A correctness case of the Llama attention backends (bf16 inputs, causal)."""

    b: int
    s: int
    nh: int
    hd: int
    segments: int  # documents per row (1: no segment ids)

    def label(self) -> str:
        return f"attention B{self.b} S{self.s} NH{self.nh} hd{self.hd} segments{self.segments}"


#: Gate pre-activation ranges (uniform) of the correctness cases: (igate, fgate).
GATE_RANGES: dict[str, tuple[tuple[float, float], tuple[float, float]]] = {
    "trained": ((-5.0, 5.0), (-2.0, 8.0)),  # the input/forget gates of a trained model
    "wide": ((-30.0, 30.0), (-30.0, 30.0)),  # beyond the presets' gate soft cap of 15
}


#: Tolerances of the normalised max error max|x - ref| / max|ref|, by the case's q/k/v dtype:
#: (outputs, gradients). bfloat16 outputs and gradients are rounded to bf16 (2^-8 relative).
TOLERANCES: dict[str, tuple[float, float]] = {
    "float32": (1e-4, 1e-3),
    "bfloat16": (2e-2, 2e-2),
}


#: Attention backends in bf16 against the float32 XLA reference (bf16 probabilities and outputs).
ATTENTION_TOLERANCE = 3e-2


@dataclasses.dataclass(frozen=True)
class CheckSettings:
    """Everything the four parts run; `FULL` for a GPU, `QUICK` for the CPU smoke test."""

    budgets_s: Mapping[str, float]
    correctness_cases: tuple[CellCase | AttentionCase, ...]
    kernel_shapes: tuple[tuple[str, int], ...]  # (xLSTM preset for the head dims, S), in order
    kernel_tokens: int  # B = max(1, kernel_tokens // S)
    kernel_chunk: int
    kernel_passes: tuple[str, ...]  # "fwd", "fwd+bwd"
    kernel_repeats: int
    peer_max_chunks: int  # mlstm-kernels' JAX form: chunk raised until at most this many chunks
    peer_native_seq_lens: tuple[int, ...]  # ... timed at these S only (compiles are slow)
    train_models: tuple[str, ...]  # presets, in pairs of equal size
    train_seq_lens: tuple[int, ...]
    train_max_tokens: int  # cap of batch x S in the batch search
    train_repeats: int
    matmul_n: int
    gen_models: tuple[str, ...]
    gen_batches: tuple[int, ...]
    gen_contexts: tuple[int, ...]
    gen_new_tokens: int
    gen_repeats: int
    gen_prefill_chunk: int  # Llama prefill in chunks of this many tokens
    memory_limit_gb: float | None  # None: the device's own limit (`memory_stats`)
    memory_headroom: float = 0.9  # a plan fits when its peak is at most this x the limit


def _c(b, nh, s, dhqk, dhv, chunk, dtype, gates) -> CellCase:
    return CellCase(b, nh, s, dhqk, dhv, chunk, dtype, gates)


FULL = CheckSettings(
    # 400 s in all: with start-up and each part's last case running past its budget, the run
    # stays within 8 minutes on one H100/H200 (see `estimate_durations`).
    budgets_s={
        "correctness": 50.0,
        "kernels": 150.0,
        "train": 130.0,
        "generate": 70.0,
        "context": 20.0,  # 2+ GPUs only (skipped on one)
    },
    correctness_cases=(
        _c(1, 4, 1000, 64, 128, 64, "float32", "wide"),  # S % L != 0, DHQK != DHV
        _c(2, 8, 2048, 128, 128, 128, "bfloat16", "trained"),
        AttentionCase(2, 2048, 6, 128, 1),  # llama165M's heads
        AttentionCase(2, 1024, 4, 64, 2),
        _c(1, 4, 4096, 96, 192, 64, "bfloat16", "wide"),  # mLSTMv1_165M's heads
        _c(1, 16, 8192, 64, 64, 64, "bfloat16", "trained"),
        _c(1, 4, 3001, 256, 128, 128, "float32", "trained"),
        _c(1, 4, 16384, 128, 256, 128, "bfloat16", "wide"),
        _c(1, 8, 2048, 256, 512, 64, "bfloat16", "trained"),  # mLSTMv1_7B's heads
    ),
    kernel_shapes=(
        ("mLSTMv1_165M", 8192),
        ("mLSTMv1_7B", 8192),
        ("mLSTMv1_165M", 2048),
        ("mLSTMv1_165M", 32768),
        ("mLSTMv1_7B", 32768),
        ("mLSTMv1_7B", 2048),
    ),
    kernel_tokens=65536,
    kernel_chunk=64,
    kernel_passes=("fwd", "fwd+bwd"),
    kernel_repeats=5,
    peer_max_chunks=32,
    peer_native_seq_lens=(2048,),
    train_models=("mLSTMv1_165M", "llama165M"),
    train_seq_lens=(8192, 2048),
    train_max_tokens=2**18,
    train_repeats=3,
    matmul_n=8192,
    gen_models=("mLSTMv1_165M", "llama165M"),
    gen_batches=(1, 16),
    gen_contexts=(1024, 8192, 32768),
    gen_new_tokens=32,
    gen_repeats=3,
    gen_prefill_chunk=1024,
    memory_limit_gb=None,
)


QUICK = CheckSettings(
    budgets_s={
        "correctness": 60.0,
        "kernels": 60.0,
        "train": 60.0,
        "generate": 60.0,
        "context": 60.0,
    },
    correctness_cases=(
        _c(1, 2, 40, 16, 32, 16, "float32", "wide"),
        AttentionCase(1, 32, 2, 16, 2),
    ),
    kernel_shapes=(("tiny_xlstm", 128),),
    kernel_tokens=256,
    kernel_chunk=32,
    kernel_passes=("fwd+bwd",),  # the forward-only program differs only in not taking a grad
    kernel_repeats=2,
    peer_max_chunks=8,
    peer_native_seq_lens=(128,),
    train_models=("tiny_xlstm", "tiny_llama"),
    train_seq_lens=(64,),
    train_max_tokens=64,  # B = 1: one compile per model (the search still plans and predicts)
    train_repeats=2,
    matmul_n=256,
    gen_models=("tiny_xlstm", "tiny_llama"),
    gen_batches=(1,),
    gen_contexts=(32,),  # one context: 4 compiles (2 contexts would be 7)
    gen_new_tokens=4,
    gen_repeats=2,
    gen_prefill_chunk=16,
    memory_limit_gb=1.0,  # a pretend device memory: the search logic runs on a CPU too
)


# FLOP counts


def chunkwise_flops(
    b: int, nh: int, s: int, dhqk: int, dhv: int, chunk: int, *, backward: bool = False
) -> float:
    """Model FLOPs of one chunkwise mLSTM call, counted analytically (what is computed, masked
    entries of the causal L x L blocks included, so forms with different L do different work).

    Per head and token, forward, with ``L = min(chunk, S)``:
    ``2 L (DHQK + DHV)`` (the L x L score block q kᵀ and its product with v)
    ``+ 4 DHQK DHV + 4 DHQK`` (the chunk's kᵀv and k sums into the state C, n, and the reads q C,
    q n), i.e. ``F = B NH S (2 L (DHQK + DHV) + 4 DHQK DHV + 4 DHQK)``. Forward+backward counts
    ``3 F`` (the backward's two matrix products per forward one); recomputation inside a backward
    is not counted. Gates' elementwise math and exponentials are not counted.
    """
    window = min(chunk, s)
    per_token = 2.0 * window * (dhqk + dhv) + 4.0 * dhqk * dhv + 4.0 * dhqk
    return (3.0 if backward else 1.0) * b * nh * s * per_token


def pallas_chunk(chunk: int, s: int) -> int:
    """The chunk length the Pallas kernels use: a power of two >= max(16, min(chunk, S))."""
    return max(16, 1 << (min(chunk, s) - 1).bit_length())


def attention_flops(b: int, s: int, nh: int, hd: int) -> float:
    """Forward FLOPs of full (S x S) attention: q kᵀ and p v, ``4 B NH S^2 hd``."""
    return 4.0 * b * nh * s * s * hd


# Entry points


def package_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None
