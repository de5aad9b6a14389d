"""GPU check, part 2: forward and forward+backward speed of the chunkwise forms (ours and, if
installed, mlstm-kernels'), tokens/s, achieved TFLOP/s, planned peak memory, the `auto` choice.
"""

import importlib
import sys
import time
import types
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array

from ...cell import fastest_chunkwise_backend, mlstm_chunkwise, mlstm_chunkwise_pallas
from ...core import median_seconds
from ...core.timing import peak_bytes
from ...models import mlstm_dims
from ...presets import get_preset
from ...xlstm import xLSTMLMModelConfig
from .report import Part, gib, memory_limit, mlstm_inputs
from .settings import CheckSettings, chunkwise_flops, package_version, pallas_chunk


# Part 2: kernel speed


def _peer_forms() -> tuple[dict[str, Callable[..., Callable[..., Array]]], str | None, str]:
    """mlstm-kernels' chunkwise forms by name -> (chunk size -> fn), a note, and its version.
    The Triton forms need `jax_triton` and `triton`; the JAX form imports Triton glue at import
    time, which is stubbed when `jax_triton` is missing (as in benchmarks/cell.py)."""
    version = package_version("mlstm-kernels")
    if version is None:
        return {}, "mlstm-kernels not installed (pip install -e '.[bench]')", ""
    forms: dict[str, Callable[..., Callable[..., Array]]] = {}
    notes = []
    try:
        if jax.default_backend() != "gpu":
            raise RuntimeError("Triton kernels need a GPU")
        # Optional GPU-only packages, imported by name (not installed where the checker runs);
        # the real `jax_triton` first, so a stub left by the JAX form's import is never used.
        importlib.import_module("jax_triton").triton_call  # noqa: B018 - raises if stubbed
        triton_xl = importlib.import_module("mlstm_kernels.jax.chunkwise.triton_xl_chunk")
        mlstm_chunkwise__xl_chunk = triton_xl.mlstm_chunkwise__xl_chunk

        def xl(chunk: int) -> Callable[..., Array]:
            def fn(q, k, v, i, f):
                return mlstm_chunkwise__xl_chunk(
                    q, k, v, i, f, chunk_size=chunk, autocast_kernel_dtype=q.dtype
                )

            return fn

        forms["mk triton_xl_chunk"] = xl
    except Exception as err:  # noqa: BLE001 - Triton forms unavailable
        notes.append(f"mlstm-kernels Triton forms unavailable ({type(err).__name__}: {err})")
        try:
            importlib.import_module("jax_triton")
        except Exception:  # noqa: BLE001
            sys.modules.setdefault("jax_triton", types.ModuleType("jax_triton"))
    try:
        native_module = importlib.import_module("mlstm_kernels.jax.chunkwise.native")
        mlstm_chunkwise__native_autograd = native_module.mlstm_chunkwise__native_autograd

        def native(chunk: int) -> Callable[..., Array]:
            def fn(q, k, v, i, f):
                # The peer mixes bf16 and float32 implicitly; the suite runs strict promotion.
                with jax.numpy_dtype_promotion("standard"):
                    return mlstm_chunkwise__native_autograd(q, k, v, i, f, chunk_size=chunk)

            return fn

        forms["mk native (JAX)"] = native
    except Exception as err:  # noqa: BLE001 - JAX form unavailable
        notes.append(f"mlstm-kernels JAX form unavailable ({type(err).__name__}: {err})")
    return forms, ("; ".join(notes) or None), version


def peer_chunk(name: str, s: int, chunk: int, max_chunks: int) -> int:
    """The chunk each peer form runs with: triton_xl_chunk (the kernel xlstm-jax trains with) its
    default 128; the JAX form `chunk` doubled until at most `max_chunks` chunks (its chunk loop
    is unrolled: compile time grows with the chunk count)."""
    if name == "mk triton_xl_chunk":
        return 128
    size = chunk
    while -(-s // size) > max_chunks:
        size *= 2
    return size


def layer_shape(preset: str) -> tuple[int, int, int]:
    config = get_preset(preset)
    if not isinstance(config, xLSTMLMModelConfig):
        raise ValueError(f"preset {preset!r} is not an xLSTM model")
    return mlstm_dims(config)


def _compile_cell(
    fn: Callable[..., Array], backward: bool, args: tuple[Array, ...], w: Array
) -> Any:
    if backward:

        def loss(*a: Array) -> Array:
            return jnp.sum(fn(*a).astype(jnp.float32) * w)

        target = jax.grad(loss, argnums=(0, 1, 2, 3, 4))
    else:
        target = fn
    return jax.jit(target).lower(*args).compile()


def _time_form(
    fn: Callable[..., Array],
    backward: bool,
    args: tuple[Array, ...],
    w: Array,
    shape: tuple[int, int, int, int, int],
    chunk: int,
    repeats: int,
    limit: float | None,
) -> dict[str, Any]:
    b, nh, s, dhqk, dhv = shape
    t0 = time.perf_counter()
    compiled = _compile_cell(fn, backward, args, w)
    row: dict[str, Any] = {"compile_s": time.perf_counter() - t0}
    peak = peak_bytes(compiled)
    row["peak_gib"] = gib(peak)
    if peak is not None and limit is not None and peak > limit:
        row.update(status="skipped", note=f"plan needs {peak / 2**30:.1f} GiB > the limit")
        return row
    seconds = median_seconds(lambda: compiled(*args), repeats, warmup=1)
    flops = chunkwise_flops(b, nh, s, dhqk, dhv, chunk, backward=backward)
    row.update(
        ms=1e3 * seconds,
        tokens_per_s=b * s / seconds,
        tflops=flops / seconds / 1e12,
        flops=flops,
    )
    return row


def run_kernels(part: Part, settings: CheckSettings) -> None:
    limit, _ = memory_limit(settings)
    peers, peer_note, _ = _peer_forms()
    chunk = settings.kernel_chunk
    for layer, s in settings.kernel_shapes:
        nh, dhqk, dhv = layer_shape(layer)
        b = max(1, settings.kernel_tokens // s)
        shape = (b, nh, s, dhqk, dhv)
        q, k, v, i, f, w = mlstm_inputs(b, nh, s, dhqk, dhv, jnp.bfloat16, "trained")
        args = (q, k, v, i, f)
        forms: dict[str, tuple[Callable[..., Array], int]] = {
            "chunkwise": (
                lambda *a: mlstm_chunkwise(*a, chunk_size=chunk)[0],
                min(chunk, s),
            ),
            "chunkwise_pallas": (
                lambda *a: mlstm_chunkwise_pallas(*a, chunk_size=chunk)[0],
                pallas_chunk(chunk, s),
            ),
        }
        for name, make in peers.items():
            if "native" in name and s not in settings.peer_native_seq_lens:
                continue
            size = peer_chunk(name, s, chunk, settings.peer_max_chunks)
            forms[name] = (make(size), size)
        common = {"layer": layer, "shape": f"{b}×{nh}×{s}×{dhqk}/{dhv}", "seq_len": s}
        fwd_bwd_ms: dict[str, float] = {}
        for name, (fn, size) in forms.items():
            for pass_name in settings.kernel_passes:
                backward = pass_name == "fwd+bwd"

                def run(
                    fn=fn, size=size, backward=backward, args=args, w=w, shape=shape
                ) -> dict[str, Any]:
                    return _time_form(
                        fn, backward, args, w, shape, size, settings.kernel_repeats, limit
                    )

                row = part.case(
                    f"{layer} S{s} {name} {pass_name}",
                    run,
                    form=name,
                    chunk=size,
                    **common,
                    **{"pass": pass_name},
                )
                if backward and row.get("ms") is not None:
                    fwd_bwd_ms[name] = row["ms"]

        def auto(q_shape=q.shape, v_shape=v.shape, fwd_bwd_ms=fwd_bwd_ms) -> dict[str, Any]:
            choice = fastest_chunkwise_backend(q_shape, v_shape, jnp.bfloat16, chunk_size=chunk)
            ours = {n: fwd_bwd_ms[n] for n in ("chunkwise", "chunkwise_pallas") if n in fwd_bwd_ms}
            faster = min(ours, key=ours.__getitem__) if len(ours) == 2 else None
            note = "" if faster is None else f"faster in the rows above: {faster}"
            return {"auto_choice": choice, "note": note}

        part.case(f"{layer} S{s} auto", auto, form="auto", **common)
    note = (
        "bf16 q/k/v, float32 gates (trained range), loss sum(h·w) for fwd+bwd; median of "
        f"{settings.kernel_repeats} after a warm-up; TFLOP/s from `chunkwise_flops` with each "
        "form's own L; peak = XLA's compiled memory plan."
    )
    part.finish(note + (f" {peer_note}" if peer_note else ""))
