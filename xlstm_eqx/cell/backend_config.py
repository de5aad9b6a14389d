"""`mLSTMBackendNameAndKwargs`: which mLSTM cell backend a layer runs, with its keyword
arguments; the reference's backend names are mapped onto this package's (docs/architecture.md, "Backends")."""

from typing import Any, Literal

from ..core.config import (
    NON_NEGATIVE,
    POSITIVE,
    Config,
    check_value,
    configclass,
    fail_field,
    field,
)


BackendName = Literal["parallel_stabilized", "chunkwise", "chunkwise_pallas", "auto", "recurrent"]
"""The mLSTM backends implemented in this package."""


ReferenceBackendName = Literal["fwbw_stabilized", "triton_kernels", "recurrent_triton"]
"""The reference's backend names, mapped onto ours at construction."""


#: The mLSTM backends implemented in this package, and the keyword arguments each one accepts.
MLSTM_BACKENDS: dict[str, tuple[str, ...]] = {
    "parallel_stabilized": ("eps",),
    "chunkwise": ("chunk_size", "eps"),
    "chunkwise_pallas": ("chunk_size", "eps"),
    "auto": ("chunk_size", "eps"),
    "recurrent": ("eps",),
}


#: Default keyword arguments filled in for each backend (so equal settings compare equal).
_BACKEND_DEFAULT_KWARGS: dict[str, dict[str, Any]] = {
    "parallel_stabilized": {},
    "chunkwise": {"chunk_size": 64},
    "chunkwise_pallas": {"chunk_size": 64},
    "auto": {"chunk_size": 64},
    "recurrent": {},
}


#: The reference's backend names: (name here, default chunk size or None, reference kwargs that are kept,
#: reference kwargs that are accepted and dropped because they are dead or kernel-specific).
_REFERENCE_BACKENDS: dict[str, tuple[str, int | None, tuple[str, ...], tuple[str, ...]]] = {
    "fwbw_stabilized": (
        "chunkwise",
        512,
        ("chunk_size",),
        (
            "return_state",
            "use_initial_state",
            "keep_G",
            "keep_gates",
            "keep_M",
            "keep_c",
            "stabilize_correctly",
        ),
    ),
    "triton_kernels": (
        "auto",
        64,
        ("chunk_size",),
        (
            "autocast_dtype",
            "reduce_slicing",
            "backend_name",
            "eps",
            "norm_val",
            "stabilize_correctly",
        ),
    ),
    "recurrent_triton": ("recurrent", None, ("eps",), ("state_dtype", "use_scan", "backend_name")),
}


#: Types and constraints of the backend keyword arguments.
_KWARG_TYPES: dict[str, tuple[Any, Any]] = {
    "chunk_size": (int, POSITIVE),
    "eps": (float, NON_NEGATIVE),
}


#: Reference kwargs of the canonical names that are accepted and dropped.
_DROPPED_KWARGS: dict[str, tuple[str, ...]] = {
    "parallel_stabilized": ("context_length",),
    "chunkwise": (),
    "chunkwise_pallas": (),
    "auto": (),
    "recurrent": ("context_length", "state_dtype", "use_scan"),
}


# mLSTM backend (docs/architecture.md, "Backends")


@configclass
class mLSTMBackendNameAndKwargs(Config):
    """mLSTM backend name and its keyword arguments (passed to the cell function).

    The reference's names are accepted and mapped at construction (`name` documents how); the
    reference kwargs "context_length" (parallel, recurrent), "state_dtype" and "use_scan"
    (recurrent) are accepted and dropped. Anything else is an error, as are the reference's
    "attention" ablation backend and unknown names.
    """

    name: BackendName | ReferenceBackendName = "parallel_stabilized"
    """"parallel_stabilized" (kwargs: eps); "chunkwise" (kwargs: chunk_size, default 64; eps);
    "chunkwise_pallas" (the Pallas kernels; same kwargs); "auto" (on a GPU whichever of the two
    is faster for the shapes, measured once; "chunkwise" elsewhere); "recurrent" (kwargs: eps).
    The reference's names become ours:

    - "triton_kernels" -> "auto", chunk_size from kwargs (default 64). Its other kwargs
      (backend_name, autocast_dtype, reduce_slicing, eps, norm_val, stabilize_correctly) are dead
      in the reference and dropped; the kernel's eps is 1e-6, the cell default.
    - "fwbw_stabilized" -> "chunkwise", chunk_size from kwargs (default 512). Its keep_* /
      return_state / use_initial_state / stabilize_correctly kwargs are dropped. Note: fwbw uses
      the normaliser lower bound 1 and no eps (docs/architecture.md, "Reference quirks kept"); the mapped backend uses exp(-m) and eps=1e-6
      (differences vanish after the per-head norm).
    - "recurrent_triton" -> "recurrent" (eps kept; state_dtype, use_scan, backend_name dropped).
    """
    kwargs: dict[str, Any] | None = field(default_factory=dict)
    """Keyword arguments of the backend (see `name`; None means none). Defaults are filled in
    (`chunk_size` 64), so equal settings compare equal."""

    def _derive(self) -> None:
        kwargs = {} if self.kwargs is None else dict(self.kwargs)
        if self.name in _REFERENCE_BACKENDS:
            target, default_chunk, kept, dropped = _REFERENCE_BACKENDS[self.name]
            if set(kwargs) - set(kept) - set(dropped):
                self.kwargs = kwargs
                return  # unknown kwargs: reported by _cross_check
            kwargs = {k: v for k, v in kwargs.items() if k in kept}
            if default_chunk is not None:
                kwargs.setdefault("chunk_size", default_chunk)
            self.name = target  # type: ignore[assignment]
        kwargs = {k: v for k, v in kwargs.items() if k not in _DROPPED_KWARGS[self.name]}
        for key, value in _BACKEND_DEFAULT_KWARGS[self.name].items():
            kwargs.setdefault(key, value)
        self.kwargs = kwargs

    def _cross_check(self, root: str, prefix: str) -> None:
        kwargs = {} if self.kwargs is None else self.kwargs
        if self.name in _REFERENCE_BACKENDS:  # _derive left it unmapped: unknown kwargs
            _, _, kept, dropped = _REFERENCE_BACKENDS[self.name]
            unknown = sorted(set(kwargs) - set(kept) - set(dropped))
            fail_field(
                root,
                prefix + "kwargs",
                f"unknown keys {unknown} for backend {self.name!r}; allowed: {kept + dropped}",
            )
        allowed = MLSTM_BACKENDS[self.name]
        unknown = sorted(set(kwargs) - set(allowed))
        if unknown:
            fail_field(
                root,
                prefix + "kwargs",
                f"unknown keys {unknown} for backend {self.name!r}; allowed: {allowed}",
            )
        for key, value in kwargs.items():
            tp, check = _KWARG_TYPES[key]
            check_value(root, prefix + "kwargs." + key, value, tp, check)
