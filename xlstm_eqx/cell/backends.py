"""FIXME docstring."""

from collections.abc import Mapping
from typing import Any

import jax
from jaxtyping import Array, Float

from .autotune import fastest_chunkwise_backend
from .backend_config import mLSTMBackendNameAndKwargs
from .forms import mlstm_chunkwise, mlstm_recurrent, mLSTMState, parallel_stabilized_simple
from .pallas import mlstm_chunkwise_pallas


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
        name = fastest_chunkwise_backend(
            q.shape, v.shape, q.dtype, chunk_size=int(opts.get("chunk_size", 64)), eps=eps
        )
    if name == "chunkwise_pallas":  # Pallas kernels on GPU, interpret mode elsewhere
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
