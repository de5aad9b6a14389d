"""The ``"auto"`` mLSTM backend: on a GPU, whichever of the Pallas kernels and the pure-JAX
chunkwise form runs a layer's shapes faster, measured once per shape.

Tuning is kept out of trace time: `tune_auto_backend(fn, *args)` traces ``fn`` abstractly
(``jax.eval_shape``) to collect the shapes that reach the ``"auto"`` backend, then times each
eagerly; when ``jit`` later traces ``fn``, `auto_backend_choice` only reads the result. The trainer
and the benchmarks call it before compiling. Off a GPU ``"auto"`` is ``"chunkwise"``, untimed
(docs/architecture.md, "Backends"), with the caller's chunk size: on CPU the default 64 is the
rule, measured once (issue 21; B=1, NH=4, DH=64, float32, forward+backward): chunk 64 accesses the
fewest bytes at S = 256, 1024, 4096 and 16384 (32 has 25% fewer FLOPs but 4-5% more bytes, 128
20% more bytes and 50% more FLOPs), and was the fastest at S = 4096 in an alternated A/B (32:
0.90x, 128: 0.98x, 256: 0.61x the speed of 64).
"""

import concurrent.futures
import contextlib
import functools
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array

from ..core.timing import median_seconds
from .forms import mlstm_chunkwise, mLSTMState
from .pallas import mlstm_chunkwise_pallas


# (device kind, q shape, v shape, dtype, chunk size, eps) -> the faster backend, measured once.
_FASTEST: dict[tuple[Any, ...], str] = {}


def time_chunkwise_backends(
    q_shape: tuple[int, ...],
    v_shape: tuple[int, ...],
    dtype: Any,
    *,
    chunk_size: int = 64,
    eps: float = 1e-6,
    repeats: int = 3,
    backends: tuple[str, ...] = ("chunkwise", "chunkwise_pallas"),
) -> dict[str, float]:
    """Median seconds of one forward+backward (gradient w.r.t. all five inputs) of each backend
    on the default device, for random inputs of these shapes ``(B, NH, S, DHQK)`` /
    ``(B, NH, S, DHV)``, after a compile-and-warm-up call."""
    fns: dict[str, Callable[..., tuple[Array, mLSTMState]]] = {
        "chunkwise": functools.partial(mlstm_chunkwise, chunk_size=chunk_size, eps=eps),
        "chunkwise_pallas": functools.partial(
            mlstm_chunkwise_pallas, chunk_size=chunk_size, eps=eps
        ),
    }
    unknown = sorted(set(backends) - set(fns))
    if unknown:
        raise ValueError(
            f"time_chunkwise_backends: unknown backends {unknown}; known {sorted(fns)}"
        )
    keys = jax.random.split(jax.random.key(0), 5)
    gate_shape = tuple(q_shape[:3])
    q = jax.random.normal(keys[0], q_shape, dtype)
    k = jax.random.normal(keys[1], q_shape, dtype)
    v = jax.random.normal(keys[2], v_shape, dtype)
    i = jax.random.uniform(keys[3], gate_shape, jnp.float32, -5.0, 5.0)
    f = jax.random.uniform(keys[4], gate_shape, jnp.float32, -2.0, 8.0)

    out = {}
    for name in backends:
        fn = fns[name]
        grad = jax.jit(
            jax.grad(
                lambda *a, fn=fn: jnp.sum(fn(*a)[0].astype(jnp.float32)), argnums=(0, 1, 2, 3, 4)
            )
        )
        out[name] = median_seconds(lambda grad=grad: grad(q, k, v, i, f), repeats, warmup=1)
    return out


def fastest_chunkwise_backend(
    q_shape: tuple[int, ...],
    v_shape: tuple[int, ...],
    dtype: Any,
    *,
    chunk_size: int = 64,
    eps: float = 1e-6,
    platform: str | None = None,
) -> str:
    """The backend the name ``"auto"`` runs: on a GPU, whichever of ``chunkwise_pallas`` and
    ``chunkwise`` is faster forward+backward for these shapes (`time_chunkwise_backends`, timed
    once per device kind, shapes, dtype, chunk size and eps in this process, then remembered);
    on any other platform ``chunkwise`` without timing (the kernels would run interpreted).

    Needs static shapes only, so it can be called while ``jit`` traces the model; the timing
    runs eagerly on random inputs of the same shapes.
    """
    platform = platform or jax.default_backend()
    if platform != "gpu":
        return "chunkwise"
    key = (
        jax.devices()[0].device_kind,
        tuple(q_shape),
        tuple(v_shape),
        jnp.dtype(dtype).name,
        int(chunk_size),
        float(eps),
    )
    if key not in _FASTEST:
        # In a thread of its own: JAX's trace state is per thread, so the timing runs eagerly
        # even while a jit is tracing the caller.
        try:
            with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
                times = pool.submit(
                    time_chunkwise_backends,
                    tuple(q_shape),
                    tuple(v_shape),
                    dtype,
                    chunk_size=chunk_size,
                    eps=eps,
                ).result()
        except Exception as err:  # noqa: BLE001 - a kernel that fails here must not stop the model
            warnings.warn(
                f"mLSTM backend 'auto': timing the Pallas kernels failed ({type(err).__name__}: "
                f"{err}); using 'chunkwise'",
                RuntimeWarning,
                stacklevel=2,
            )
            times = {"chunkwise": 0.0}
        _FASTEST[key] = min(times, key=times.__getitem__)
    return _FASTEST[key]


# The shapes seen by the "auto" backend while `tune_auto_backend` traces; None when not tuning.
_RECORDING: list[tuple[Any, ...]] | None = None


def auto_backend_choice(
    q_shape: tuple[int, ...], v_shape: tuple[int, ...], dtype: Any, *, chunk_size: int, eps: float
) -> str:
    """The backend ``"auto"`` runs for these shapes, as decided at trace time: while
    `tune_auto_backend` traces, the shapes are recorded (and ``"chunkwise"`` stands in); otherwise
    the tuned choice, or `fastest_chunkwise_backend`'s for shapes nobody tuned."""
    if _RECORDING is not None:
        _RECORDING.append((tuple(q_shape), tuple(v_shape), jnp.dtype(dtype), chunk_size, eps))
        return "chunkwise"
    return fastest_chunkwise_backend(q_shape, v_shape, dtype, chunk_size=chunk_size, eps=eps)


@contextlib.contextmanager
def _recording() -> Any:
    global _RECORDING
    previous, _RECORDING = _RECORDING, []
    try:
        yield _RECORDING
    finally:
        _RECORDING = previous


def tune_auto_backend(
    fn: Callable[..., Any], *args: Any, platform: str | None = None, **kwargs: Any
) -> dict[tuple[Any, ...], str]:
    """Time the ``"auto"`` backend's candidates for every cell call of ``fn(*args, **kwargs)``
    before ``fn`` is compiled, so that compiling it times nothing. ``fn`` is traced abstractly
    (no FLOPs, no memory); returns the choices made (empty off a GPU, where nothing is timed)."""
    platform = platform or jax.default_backend()
    if platform != "gpu":
        return {}
    with _recording() as seen:
        jax.eval_shape(fn, *args, **kwargs)
    choices = {}
    for q_shape, v_shape, dtype, chunk_size, eps in dict.fromkeys(seen):
        choices[(q_shape, v_shape, dtype.name, chunk_size, eps)] = fastest_chunkwise_backend(
            q_shape, v_shape, dtype, chunk_size=chunk_size, eps=eps, platform=platform
        )
    return choices
