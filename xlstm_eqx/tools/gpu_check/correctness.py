"""GPU check, part 1: `mlstm_chunkwise_pallas` against `mlstm_chunkwise` (outputs and gradients), and
the Llama attention backends against a float32 reference, on the device.
"""

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array

from ...cell import mlstm_chunkwise, mlstm_chunkwise_pallas
from ...llama.attention import multihead_attention
from .report import Part, mlstm_inputs, norm_err, random_array
from .settings import (
    ATTENTION_TOLERANCE,
    GATE_RANGES,
    TOLERANCES,
    AttentionCase,
    CellCase,
    CheckSettings,
)


# Part 1: correctness


def _vjp_program(fn: Callable[..., Array], n_args: int) -> Callable[..., Any]:
    """jit of (args..., cotangent) -> (output, gradients of <output, cotangent> w.r.t. args)."""

    def run(*args_and_cot: Array) -> tuple[Array, tuple[Array, ...]]:
        args, cot = args_and_cot[:n_args], args_and_cot[n_args]
        out, pull = jax.vjp(fn, *args)
        return out, pull(cot.astype(out.dtype))

    return jax.jit(run)


def _check_cell(case: CellCase) -> dict[str, Any]:
    """Pallas kernels vs the pure-JAX chunkwise form: output and the five gradients."""
    dtype = jnp.dtype(case.dtype)
    q, k, v, i, f, w = mlstm_inputs(case.b, case.nh, case.s, case.dhqk, case.dhv, dtype, case.gates)
    args = (q, k, v, i, f, w)
    results = {}
    # Both in full float32 matmul precision (the default on GPUs may be TF32 for the reference).
    with jax.default_matmul_precision("highest"):
        for name, cell in (("ref", mlstm_chunkwise), ("pallas", mlstm_chunkwise_pallas)):

            def fn(*a: Array, cell: Callable[..., tuple[Array, Any]] = cell) -> Array:
                return cell(*a, chunk_size=case.chunk)[0]

            results[name] = jax.block_until_ready(_vjp_program(fn, 5)(*args))
    (h_ref, g_ref), (h, g) = results["ref"], results["pallas"]
    out_err = norm_err(h, h_ref)
    grad_errs = [norm_err(a, r) for a, r in zip(g, g_ref, strict=True)]
    tol_out, tol_grad = TOLERANCES[case.dtype]
    ok = out_err <= tol_out and max(grad_errs) <= tol_grad
    (ilo, ihi), (flo, fhi) = GATE_RANGES[case.gates]
    return {
        "status": "pass" if ok else "fail",
        "out_err": out_err,
        "grad_err": max(grad_errs),
        "grad_errs": dict(zip(("q", "k", "v", "igate", "fgate"), grad_errs, strict=True)),
        "tol": [tol_out, tol_grad],
        "gates": f"U({ilo:g},{ihi:g}); U({flo:g},{fhi:g})",
    }


def _attention_inputs(case: AttentionCase) -> tuple[Array, ...]:
    shape = (case.b, case.s, case.nh, case.hd)
    q, k, v, cot = (random_array("normal", 20 + j, shape, jnp.float32) for j in range(4))
    return q / math.sqrt(case.hd), k, v, cot


def _check_attention(case: AttentionCase, part: Part) -> None:
    """Each backend (bf16 inputs) against the XLA core on the same inputs in float32."""
    q, k, v, cot = _attention_inputs(case)
    seg = None
    if case.segments > 1:
        seg = jnp.broadcast_to(
            (jnp.arange(case.s) * case.segments // case.s).astype(jnp.int32), (case.b, case.s)
        )

    def attention(backend: str) -> Callable[..., Array]:
        def fn(q: Array, k: Array, v: Array) -> Array:
            return multihead_attention(q, k, v, causal=True, segment_ids=seg, backend=backend)

        return fn

    reference: list[Any] = []

    def ref() -> tuple[Array, tuple[Array, ...]]:
        if not reference:  # computed by the first backend's case (its errors are recorded there)
            with jax.default_matmul_precision("highest"):
                program = _vjp_program(attention("xla"), 3)
                reference.append(jax.block_until_ready(program(q, k, v, cot)))
        return reference[0]

    bf16 = tuple(x.astype(jnp.bfloat16) for x in (q, k, v))
    on_gpu = jax.default_backend() == "gpu"
    for backend in ("xla", "cudnn", "pallas_triton"):
        label = f"{case.label()} {backend}"
        if backend != "xla" and not on_gpu:
            part.add({"case": label, "backend": backend, "status": "skipped", "note": "needs GPU"})
            continue

        def run(backend: str = backend) -> dict[str, Any]:
            ref_out, ref_grads = ref()
            out, grads = jax.block_until_ready(
                _vjp_program(attention(backend), 3)(*bf16, cot.astype(jnp.bfloat16))
            )
            out_err = norm_err(out, ref_out)
            grad_err = max(norm_err(a, r) for a, r in zip(grads, ref_grads, strict=True))
            ok = max(out_err, grad_err) <= ATTENTION_TOLERANCE
            return {
                "status": "pass" if ok else "fail",
                "out_err": out_err,
                "grad_err": grad_err,
                "tol": [ATTENTION_TOLERANCE, ATTENTION_TOLERANCE],
            }

        part.case(label, run, backend=backend)


def run_correctness(part: Part, settings: CheckSettings) -> None:
    for case in settings.correctness_cases:
        if isinstance(case, AttentionCase):
            if part.spent():
                part.case(case.label(), dict, backend="all")  # recorded as timed out
                continue
            _check_attention(case, part)
        else:
            part.case(case.label(), lambda case=case: _check_cell(case), backend="pallas")
    part.finish(
        "mLSTM: `mlstm_chunkwise_pallas` vs `mlstm_chunkwise` (both in float32 matmul precision "
        "'highest'), output and gradients of sum(h·w) w.r.t. q, k, v, igate, fgate; gates float32."
        " Attention: each backend in bf16 vs the XLA core in float32, causal."
    )
