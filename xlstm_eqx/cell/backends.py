"""The mLSTM backends as a table, ``name -> cell function``, and the dispatch the layers use.

A backend name comes from `mLSTMCellConfig.backend` (normalised by `resolve_backend`); every
entry of `BACKENDS` takes the same arguments, so adding a backend is one function and one entry.
Two entry points: `run_backend` (no state; the training path) and `run_backend_with_state`
(state in, h and state out; prefill, decoding).
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
    # `from_dict`: the name is only known to be a valid choice once the config checked it
    resolved = mLSTMBackendNameAndKwargs.from_dict({"name": name, "kwargs": dict(kwargs)})
    items = (resolved.kwargs or {}).items()
    return resolved.name, tuple(sorted((str(k), _hashable(v)) for k, v in items))


def _hashable(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    return value


#: A stateful cell function: ``(q, k, v, i, f, *, chunk_size, initial_state, eps) -> (h, state)``.
StatefulCell = Callable[..., tuple[Array, mLSTMState]]


def _chunkwise_for_parallel(q, k, v, i, f, *, chunk_size, initial_state, eps):
    # The parallel form has no state: its stateful call is the chunkwise form (the same math).
    return mlstm_chunkwise(
        q, k, v, i, f, chunk_size=chunk_size, initial_state=initial_state, eps=eps
    )


def _recurrent(q, k, v, i, f, *, chunk_size, initial_state, eps):
    del chunk_size
    return mlstm_recurrent(q, k, v, i, f, initial_state=initial_state, eps=eps)


def _auto(q, k, v, i, f, *, chunk_size, initial_state, eps):
    name = auto_backend_choice(q.shape, v.shape, q.dtype, chunk_size=chunk_size, eps=eps)
    return BACKENDS[name](
        q, k, v, i, f, chunk_size=chunk_size, initial_state=initial_state, eps=eps
    )


#: Backend name -> its stateful cell function (`StatefulCell`), all with one keyword signature.
#: The names are those of `MLSTM_BACKENDS`; `mLSTMBackendNameAndKwargs` maps the reference's names
#: onto them. `run_backend` (no state) runs the parallel form itself for "parallel_stabilized".
BACKENDS: dict[str, StatefulCell] = {
    "parallel_stabilized": _chunkwise_for_parallel,
    "chunkwise": mlstm_chunkwise,
    "chunkwise_pallas": mlstm_chunkwise_pallas,
    "auto": _auto,
    "recurrent": _recurrent,
}


def _lookup(name: str, kwargs: tuple[tuple[str, Any], ...]) -> tuple[StatefulCell, int, float]:
    """The backend's stateful function, chunk size and eps; an unknown name is a ValueError."""
    fn = BACKENDS.get(name)
    if fn is None:
        raise ValueError(f"mlstm_cell.backend: unknown backend {name!r}; known: {sorted(BACKENDS)}")
    opts = dict(kwargs)
    return fn, int(opts.get("chunk_size", 64)), float(opts.get("eps", 1e-6))


@jax.named_scope("mLSTMCell")
def run_backend(
    name: str,
    kwargs: tuple[tuple[str, Any], ...],
    q: Float[Array, "B NH S DHQK"],
    k: Float[Array, "B NH S DHQK"],
    v: Float[Array, "B NH S DHV"],
    igate_preact: Float[Array, "B NH S"],
    fgate_preact: Float[Array, "B NH S"],
) -> Float[Array, "B NH S DHV"]:
    """The mLSTM cell with the backend ``name`` (a key of `BACKENDS`), from a zero state, h only.

    The training path: "parallel_stabilized" runs the parallel form here (it has no state).
    """
    fn, chunk_size, eps = _lookup(name, kwargs)
    if name == "parallel_stabilized":
        return parallel_stabilized_simple(q, k, v, igate_preact, fgate_preact, eps=eps)
    h, _ = fn(
        q, k, v, igate_preact, fgate_preact, chunk_size=chunk_size, initial_state=None, eps=eps
    )
    return h


@jax.named_scope("mLSTMCell")
def run_backend_with_state(
    name: str,
    kwargs: tuple[tuple[str, Any], ...],
    initial_state: mLSTMState | None,
    q: Float[Array, "B NH S DHQK"],
    k: Float[Array, "B NH S DHQK"],
    v: Float[Array, "B NH S DHV"],
    igate_preact: Float[Array, "B NH S"],
    fgate_preact: Float[Array, "B NH S"],
) -> tuple[Float[Array, "B NH S DHV"], mLSTMState]:
    """The mLSTM cell with the backend ``name`` from ``initial_state`` (None: zeros); returns h
    and the final state. The parallel form has no state, so "parallel_stabilized" runs the
    chunkwise form here (the same math).
    """
    fn, chunk_size, eps = _lookup(name, kwargs)
    return fn(
        q,
        k,
        v,
        igate_preact,
        fgate_preact,
        chunk_size=chunk_size,
        initial_state=initial_state,
        eps=eps,
    )
