"""The mLSTM backends as a table, ``name -> cell function``, and the dispatch the layers use.

A backend name comes from `mLSTMCellConfig.backend` (normalised by `resolve_backend`); every
entry of `BACKENDS` takes the same arguments, so adding a backend is one function and one entry.
"""

from collections.abc import Callable, Mapping
from typing import Any

import jax
from jaxtyping import Array, Float

from .autotune import auto_backend_choice
from .backend_config import mLSTMBackendNameAndKwargs
from .forms import mlstm_chunkwise, mlstm_recurrent, mLSTMState, parallel_stabilized_simple
from .pallas import mlstm_chunkwise_pallas


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


def _parallel(q, k, v, i, f, *, chunk_size, initial_state, return_last_state, eps):
    if initial_state is not None or return_last_state:  # no state in the parallel form
        return mlstm_chunkwise(
            q,
            k,
            v,
            i,
            f,
            chunk_size=chunk_size,
            initial_state=initial_state,
            return_last_state=return_last_state,
            eps=eps,
        )
    return parallel_stabilized_simple(q, k, v, i, f, eps=eps)


def _recurrent(q, k, v, i, f, *, chunk_size, initial_state, return_last_state, eps):
    return mlstm_recurrent(
        q, k, v, i, f, initial_state=initial_state, return_last_state=return_last_state, eps=eps
    )


def _auto(q, k, v, i, f, *, chunk_size, initial_state, return_last_state, eps):
    name = auto_backend_choice(q.shape, v.shape, q.dtype, chunk_size=chunk_size, eps=eps)
    return BACKENDS[name](
        q,
        k,
        v,
        i,
        f,
        chunk_size=chunk_size,
        initial_state=initial_state,
        return_last_state=return_last_state,
        eps=eps,
    )


#: Backend name -> the cell function it runs, all with one keyword signature
#: ``(q, k, v, i, f, *, chunk_size, initial_state, return_last_state, eps)``. The names are those
#: of `MLSTM_BACKENDS`; `mLSTMBackendNameAndKwargs` maps the reference's names onto them.
BACKENDS: dict[str, Callable[..., Any]] = {
    "parallel_stabilized": _parallel,
    "chunkwise": mlstm_chunkwise,
    "chunkwise_pallas": mlstm_chunkwise_pallas,
    "auto": _auto,
    "recurrent": _recurrent,
}


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
    """Run the mLSTM cell with the backend ``name`` (a key of `BACKENDS`).

    The parallel form has no state: when a state goes in or must come out (prefill), the
    chunkwise form runs instead (the same math).
    """
    fn = BACKENDS.get(name)
    if fn is None:
        raise ValueError(f"mlstm_cell.backend: unknown backend {name!r}; known: {sorted(BACKENDS)}")
    opts = dict(kwargs)
    return fn(
        q,
        k,
        v,
        igate_preact,
        fgate_preact,
        chunk_size=int(opts.get("chunk_size", 64)),
        initial_state=initial_state,
        return_last_state=return_last_state,
        eps=float(opts.get("eps", 1e-6)),
    )
