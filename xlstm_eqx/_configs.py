"""Configuration dataclasses for the xLSTM and Llama language models.

The names, fields and defaults follow NX-AI/xlstm-jax (ARCHITECTURE.md §2, §6.1). Configs are plain mutable
`dataclasses.dataclass` objects: they hold no arrays, so they are cheap to build, compare, hash (modules keep
them as `eqx.field(static=True)`), and serialise with `to_dict()` / `from_dict()`.

Derived fields (names starting with `_`) are computed in `__post_init__`, following the reference's push-down
chain (§2.8): the block stack pushes `embedding_dim`, `bias`, `dropout`, `context_length`, `dtype`,
`norm_type` and `parallel` into its mLSTM layer template, which computes `_proj_up_dim` /
`_inner_embedding_dim` and pushes them into the cell; `_block_map` is built from `slstm_at`; and
`block_configs()` returns the per-block `xLSTMBlockConfig`s (deep copies with `_block_idx` set).

Differences from the reference, all deliberate:
- A parent deep-copies the child configs it is given before pushing values into them, so building a model
  config never mutates the caller's objects, and `dataclasses.replace(cfg, ...)` is safe.
- The stack also pushes `dtype` into the feed-forward configs and into the sLSTM layer (the reference
  trainer sets the FFN dtype to the model dtype by hand; its stack does not). So `dtype` is the compute dtype
  of the whole model.
- Invalid values raise `ValueError` naming the field (dotted path from the config being validated) and the
  allowed values, instead of `assert`s or silent fix-ups (the sLSTM's `num_heads <= 0 -> 1` becomes an error).
- `mLSTMCellConfig.backend` takes a plain name or `mLSTMBackendNameAndKwargs`; the reference's backend names
  are mapped onto the three JAX backends of this package (see `mLSTMBackendNameAndKwargs`).
- `xLSTMLMModelConfig` accepts the reference's `vocab_size=-1` default ("unset, filled from the tokenizer")
  at construction; a model must call `config.validate()`, which requires `vocab_size > 0`.
  `context_length=-1` means "unbounded" (nothing in the port is sized by it).
- `LlamaConfig` has two extra fields: `context_length` (-1 = unbounded; a bound for callers such as the CLI)
  and `query_scale_quirk` (reproduce the reference's NH^-1/2 query scale, §7.2; default off).

Reference quirks kept as fields (their handling is the modules' job; see ARCHITECTURE §9): `tie_weights`,
`weight_decay_on_embedding` and `add_post_blocks_norm` (never read by the Flax model) are real fields here;
the model-level `norm_type` overwrites the layer's and cell's `norm_type` (§2.8); the v1 out-norm uses
`mlstm_cell.norm_type_v1`; the FFN's `dropout` is not pushed by the stack.
"""

import copy
import dataclasses
import math
from collections.abc import Sequence
from typing import Any, ClassVar, Literal, TypeVar, no_type_check

import jax.numpy as jnp


__all__ = [
    "ParallelConfig",
    "mLSTMBackendNameAndKwargs",
    "mLSTMCellConfig",
    "mLSTMLayerConfig",
    "mLSTMBlockConfig",
    "FeedForwardConfig",
    "sLSTMCellConfig",
    "sLSTMLayerConfig",
    "sLSTMBlockConfig",
    "xLSTMBlockConfig",
    "xLSTMBlockStackConfig",
    "xLSTMLMModelConfig",
    "LlamaConfig",
]

# ------------------------------------------------------------------------------------------------------------
# Allowed values
# ------------------------------------------------------------------------------------------------------------

DTYPES = ("float32", "bfloat16", "float16")
NORM_TYPES = ("layernorm", "rmsnorm")
INIT_DISTRIBUTIONS = ("normal", "truncated_normal", "uniform")
OUTPUT_INIT_FNS = ("small", "wang", "wang2", "zeros")
LAYER_TYPES = ("mlstm", "mlstm_v1")
GATE_INPUTS = ("qkv", "x_mlstm", "x_mlstm_conv", "x_mlstm_conv_act")
ACT_FNS = ("gelu", "relu", "relu^2", "sigmoid", "swish", "selu")
FF_TYPES = ("ffn_gated", "ffn")
ATTENTION_BACKENDS = ("xla", "cudnn", "pallas_triton")
SLSTM_BACKENDS = ("cuda", "vanilla")
SLSTM_FUNCTIONS = ("slstm", "lstm")
SLSTM_BIAS_INITS = ("powerlaw_blockdependent", "small_init", "standard", "zeros")
SLSTM_RECURRENT_INITS = ("zeros", "standard")

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
#: Reference kwargs of the canonical names that are accepted and dropped.
_DROPPED_KWARGS: dict[str, tuple[str, ...]] = {
    "parallel_stabilized": ("context_length",),
    "chunkwise": (),
    "chunkwise_pallas": (),
    "auto": (),
    "recurrent": ("context_length", "state_dtype", "use_scan"),
}

# ------------------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------------------


def _fail(root: str, path: str, message: str, value: Any = dataclasses.MISSING) -> None:
    got = "" if value is dataclasses.MISSING else f", got {value!r}"
    raise ValueError(f"{root}: invalid field '{path}': {message}{got}")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_choice(root: str, path: str, value: Any, allowed: Sequence[Any]) -> None:
    if value not in allowed:
        _fail(root, path, f"must be one of {tuple(allowed)}", value)


def _check_positive_int(root: str, path: str, value: Any) -> None:
    if not _is_int(value) or value <= 0:
        _fail(root, path, "must be a positive int", value)


def _check_nonneg_int(root: str, path: str, value: Any) -> None:
    if not _is_int(value) or value < 0:
        _fail(root, path, "must be an int >= 0", value)


def _check_positive_or_unset(root: str, path: str, value: Any) -> None:
    """Sizes whose reference default is -1 ("set by a parent" / "unbounded")."""
    if not _is_int(value) or (value <= 0 and value != -1):
        _fail(root, path, "must be a positive int, or -1 for unset", value)


def _check_positive_float(root: str, path: str, value: Any, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not _is_number(value) or not value > 0 or not math.isfinite(value):
        extra = " or None" if allow_none else ""
        _fail(root, path, f"must be a finite number > 0{extra}", value)


def _check_rate(root: str, path: str, value: Any) -> None:
    if not _is_number(value) or not 0.0 <= value < 1.0:
        _fail(root, path, "must be a number in [0, 1)", value)


def _check_bool(root: str, path: str, value: Any) -> None:
    if not isinstance(value, bool):
        _fail(root, path, "must be a bool", value)


def _check_divides(root: str, path: str, divisor: int, dim: int, dim_name: str) -> None:
    if dim % divisor != 0:
        _fail(root, path, f"must divide {dim_name}={dim}", divisor)


def _freeze(obj: Any) -> Any:
    """A hashable image of a config value (lists -> tuples, dicts -> sorted item tuples)."""
    if isinstance(obj, _Config):
        return (type(obj).__name__,) + tuple(
            (f.name, _freeze(getattr(obj, f.name))) for f in dataclasses.fields(obj)
        )
    if isinstance(obj, dict):
        return tuple(sorted((str(k), _freeze(v)) for k, v in obj.items()))
    if isinstance(obj, (list, tuple)):
        return tuple(_freeze(x) for x in obj)
    return obj


def _to_jsonable(obj: Any) -> Any:
    if isinstance(obj, _Config):
        return obj.to_dict()
    if isinstance(obj, dict):
        return {str(k): _to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_jsonable(x) for x in obj]
    return obj


def _round_up_dim(factor: float | int, dim: int, multiple_of: int, round_up: bool) -> int:
    """`multiple_of * ceil(factor*dim / multiple_of)` (floor if not `round_up`), as the reference."""
    multiplier = factor * dim / multiple_of
    multiplier = math.ceil(multiplier) if round_up else math.floor(multiplier)
    return int(multiplier * multiple_of)


_C = TypeVar("_C", bound="_Config")


@no_type_check
class _Config:
    """Mixin: dict round trip, hashing, validation entry point.

    Subclasses list their nested-config fields in `_nested` (field name -> config class). `_derive()`
    computes derived fields and pushes values into children; `_validate(root, prefix)` raises `ValueError`
    for the first invalid field, naming it by its dotted path.
    """

    _nested: ClassVar[dict[str, type["_Config"]]] = {}

    def __post_init__(self) -> None:
        self._derive()
        self._validate(type(self).__name__, "")

    def _derive(self) -> None:
        pass

    def _validate(self, root: str, prefix: str) -> None:
        pass

    def __hash__(self) -> int:
        return hash(_freeze(self))

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable nested dict of every field (tuples become lists)."""
        return {f.name: _to_jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls: type[_C], d: dict[str, Any]) -> _C:
        """Rebuild a config from `to_dict()` output (also after a JSON round trip)."""
        if not isinstance(d, dict):
            raise ValueError(f"{cls.__name__}.from_dict: expected a dict, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(
                f"{cls.__name__}.from_dict: unknown field(s) {unknown}; known fields are {sorted(names)}"
            )
        kwargs = {}
        for key, value in d.items():
            sub = cls._nested.get(key)
            if sub is not None and isinstance(value, dict):
                value = sub.from_dict(value)
            kwargs[key] = value
        return cls(**kwargs)


def _config(cls: type[_C]) -> type[_C]:
    """`@dataclass` that keeps `_Config.__hash__` (a plain eq dataclass would set it to None)."""
    cls = dataclasses.dataclass(cls)
    cls.__hash__ = _Config.__hash__  # type: ignore[method-assign]
    return cls


def _config_kw(cls: type[_C]) -> type[_C]:
    cls = dataclasses.dataclass(kw_only=True)(cls)
    cls.__hash__ = _Config.__hash__  # type: ignore[method-assign]
    return cls


# ------------------------------------------------------------------------------------------------------------
# ParallelConfig (§2.11)
# ------------------------------------------------------------------------------------------------------------


@no_type_check
@_config_kw
class ParallelConfig(_Config):
    """Mesh layout (dp, fsdp, pp, tp) and FSDP/remat choices. An axis size of -1 takes the remaining devices."""

    data_axis_size: int = -1
    fsdp_axis_size: int = 1
    pipeline_axis_size: int = 1
    model_axis_size: int = 1
    data_axis_name: str = "dp"
    fsdp_axis_name: str = "fsdp"
    pipeline_axis_name: str = "pp"
    model_axis_name: str = "tp"
    remat: list[str] = dataclasses.field(default_factory=list)
    fsdp_modules: list[str] = dataclasses.field(default_factory=list)
    fsdp_min_weight_size: int = 2**18
    fsdp_gather_dtype: str | None = None
    fsdp_grad_scatter_dtype: str | None = None
    tp_async_dense: bool = False

    _AXES: ClassVar[tuple[str, ...]] = ("data", "fsdp", "pipeline", "model")

    def _derive(self) -> None:
        if isinstance(self.remat, tuple):
            self.remat = list(self.remat)
        if isinstance(self.fsdp_modules, tuple):
            self.fsdp_modules = list(self.fsdp_modules)

    def _validate(self, root: str, prefix: str) -> None:
        sizes = {}
        for axis in self._AXES:
            name = f"{axis}_axis_size"
            value = getattr(self, name)
            if not _is_int(value) or (value <= 0 and value != -1):
                _fail(
                    root,
                    prefix + name,
                    "must be a positive int or -1 (fill with the remaining devices)",
                    value,
                )
            sizes[name] = value
        filled = [n for n, v in sizes.items() if v == -1]
        if len(filled) > 1:
            _fail(root, prefix + filled[1], f"at most one axis size may be -1, but {filled} are")
        names = []
        for axis in self._AXES:
            name = f"{axis}_axis_name"
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                _fail(root, prefix + name, "must be a non-empty str", value)
            if value in names:
                _fail(root, prefix + name, f"must differ from the other axis names {names}", value)
            names.append(value)
        for name in ("remat", "fsdp_modules"):
            value = getattr(self, name)
            if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
                _fail(root, prefix + name, "must be a list of module names (str)", value)
        _check_nonneg_int(root, prefix + "fsdp_min_weight_size", self.fsdp_min_weight_size)
        for name in ("fsdp_gather_dtype", "fsdp_grad_scatter_dtype"):
            value = getattr(self, name)
            if value is not None:
                _check_choice(root, prefix + name, value, DTYPES + (None,))
        _check_bool(root, prefix + "tp_async_dense", self.tp_async_dense)


def _tp_size(parallel: ParallelConfig | None) -> int:
    """Tensor-parallel size known from the config (1 if unset or inferred with -1)."""
    if parallel is None or parallel.model_axis_size == -1:
        return 1
    return parallel.model_axis_size


def _proj_up_dim_of(cfg: Any) -> int | None:
    """The up-projection width of a layer or FFN config by the rounding rule (§2.8), or None
    while its inputs are unset or invalid (reported by `_validate`)."""
    if not (
        _is_int(cfg.embedding_dim)
        and cfg.embedding_dim > 0
        and _is_number(cfg.proj_factor)
        and _is_int(cfg.round_proj_up_to_multiple_of)
        and cfg.round_proj_up_to_multiple_of > 0
    ):
        return None
    return _round_up_dim(
        cfg.proj_factor,
        cfg.embedding_dim,
        cfg.round_proj_up_to_multiple_of,
        cfg.round_proj_up_dim_up,
    )


def _validate_parallel(obj: Any, root: str, prefix: str) -> None:
    _validate_child(root, prefix + "parallel", obj.parallel, ParallelConfig, optional=True)


def _validate_child(root: str, path: str, value: Any, cls: type, *, optional: bool) -> None:
    """A nested config field: it must be a `cls` (or None when `optional`); then validate it."""
    if value is None and optional:
        return
    if not isinstance(value, cls):
        expected = f"must be of type {cls.__name__}" + (" or None" if optional else "")
        _fail(root, path, expected, value)
    value._validate(root, path + ".")


def _validate_block_position(obj: Any, root: str, prefix: str) -> None:
    """The `_num_blocks` / `_block_idx` a parent pushed into a block config."""
    if obj._num_blocks is not None:
        _check_positive_int(root, prefix + "_num_blocks", obj._num_blocks)
    if obj._block_idx is not None:
        _check_nonneg_int(root, prefix + "_block_idx", obj._block_idx)


def _derived_copy(
    value: Any, cls: type, parent: Any, *, block_idx: bool = True, **fields: Any
) -> Any:
    """A nested config as its parent's `_derive` needs it: a dict is parsed, a `cls` copied (so
    parents never share a child), the parent's `_num_blocks` (and `_block_idx` if `block_idx`)
    and `fields` pushed in, then derived. Anything else is returned as is, for `_validate`."""
    if isinstance(value, dict):
        value = cls.from_dict(value)
    if not isinstance(value, cls):
        return value
    value = copy.deepcopy(value)
    if parent._num_blocks is not None:
        value._num_blocks = parent._num_blocks
    if block_idx and parent._block_idx is not None:
        value._block_idx = parent._block_idx
    for name, field_value in fields.items():
        setattr(value, name, field_value)
    value._derive()
    return value


# ------------------------------------------------------------------------------------------------------------
# mLSTM backend (§2.7)
# ------------------------------------------------------------------------------------------------------------


@no_type_check
@_config
class mLSTMBackendNameAndKwargs(_Config):
    """mLSTM backend name and its keyword arguments (passed to the cell function).

    Names here: "parallel_stabilized" (kwargs: eps), "chunkwise" (kwargs: chunk_size, default 64; eps),
    "chunkwise_pallas" (the Pallas kernels; same kwargs), "auto" (on a GPU whichever of the two is
    faster for the shapes, measured once; "chunkwise" elsewhere), "recurrent" (kwargs: eps). The
    reference's names are accepted and mapped at construction:
    - "triton_kernels" -> "auto", chunk_size from kwargs (default 64). Its other kwargs
      (backend_name, autocast_dtype, reduce_slicing, eps, norm_val, stabilize_correctly) are dead in the
      reference and dropped; the kernel's eps is 1e-6, the cell default.
    - "fwbw_stabilized" -> "chunkwise", chunk_size from kwargs (default 512). Its keep_* / return_state /
      use_initial_state / stabilize_correctly kwargs are dropped. Note: fwbw uses the normaliser lower bound
      1 and no eps (§5.4); the mapped backend uses exp(-m) and eps=1e-6 (differences vanish after the
      per-head norm).
    - "recurrent_triton" -> "recurrent" (eps kept; state_dtype, use_scan, backend_name dropped).
    The reference kwargs "context_length" (parallel, recurrent), "state_dtype" and "use_scan" (recurrent) are
    accepted and dropped. Anything else is an error, as are the reference's "attention" ablation backend
    and unknown names.
    """

    name: str = "parallel_stabilized"
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)

    def _derive(self) -> None:
        if self.kwargs is None:
            self.kwargs = {}
        if not isinstance(self.name, str) or not isinstance(self.kwargs, dict):
            return  # reported by _validate
        kwargs = dict(self.kwargs)
        if self.name in _REFERENCE_BACKENDS:
            target, default_chunk, kept, dropped = _REFERENCE_BACKENDS[self.name]
            unknown = sorted(set(kwargs) - set(kept) - set(dropped))
            if unknown:
                return  # reported by _validate
            kwargs = {k: v for k, v in kwargs.items() if k in kept}
            if default_chunk is not None:
                kwargs.setdefault("chunk_size", default_chunk)
            self.name = target
        if self.name in MLSTM_BACKENDS:
            kwargs = {k: v for k, v in kwargs.items() if k not in _DROPPED_KWARGS[self.name]}
            for key, value in _BACKEND_DEFAULT_KWARGS[self.name].items():
                kwargs.setdefault(key, value)
        self.kwargs = kwargs

    def _validate(self, root: str, prefix: str) -> None:
        allowed_names = tuple(MLSTM_BACKENDS) + tuple(_REFERENCE_BACKENDS)
        if not isinstance(self.name, str) or self.name not in allowed_names:
            _fail(root, prefix + "name", f"must be one of {allowed_names}", self.name)
        if not isinstance(self.kwargs, dict):
            _fail(root, prefix + "kwargs", "must be a dict", self.kwargs)
        if self.name in _REFERENCE_BACKENDS:  # _derive left it unmapped: unknown kwargs
            _, _, kept, dropped = _REFERENCE_BACKENDS[self.name]
            unknown = sorted(set(self.kwargs) - set(kept) - set(dropped))
            _fail(
                root,
                prefix + "kwargs",
                f"unknown keys {unknown} for backend {self.name!r}; allowed: {kept + dropped}",
            )
        allowed = MLSTM_BACKENDS[self.name]
        unknown = sorted(set(self.kwargs) - set(allowed))
        if unknown:
            _fail(
                root,
                prefix + "kwargs",
                f"unknown keys {unknown} for backend {self.name!r}; allowed: {allowed}",
            )
        if "chunk_size" in self.kwargs:
            _check_positive_int(root, prefix + "kwargs.chunk_size", self.kwargs["chunk_size"])
        if "eps" in self.kwargs:
            eps = self.kwargs["eps"]
            if not _is_number(eps) or eps < 0:
                _fail(root, prefix + "kwargs.eps", "must be a number >= 0", eps)


# ------------------------------------------------------------------------------------------------------------
# mLSTM cell, layer, block (§2.3, §2.5, §2.6)
# ------------------------------------------------------------------------------------------------------------


def _check_bias_range(root: str, path: str, value: Any) -> None:
    if value is None or _is_number(value):
        return
    if isinstance(value, tuple) and len(value) == 2 and all(_is_number(x) for x in value):
        return
    _fail(root, path, "must be a (start, end) pair, a number, or None", value)


def _as_range(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(value)
    return value


@no_type_check
@_config
class mLSTMCellConfig(_Config):
    """mLSTM cell: backend, gates, out-norm. `context_length`, `embedding_dim`, `num_heads`, `dtype`,
    `norm_type` and `parallel` are set by the layer."""

    context_length: int = -1
    embedding_dim: int = -1
    num_heads: int = -1
    backend: mLSTMBackendNameAndKwargs | str = dataclasses.field(
        default_factory=mLSTMBackendNameAndKwargs
    )
    norm_eps: float = 1e-6
    norm_type: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_type_v1: Literal["layernorm", "rmsnorm"] = "layernorm"
    dtype: str = "bfloat16"
    gate_dtype: str = "float32"
    gate_soft_cap: float | None = None
    gate_linear_headwise: bool = False
    igate_bias_init_range: tuple[float, float] | float | None = None
    fgate_bias_init_range: tuple[float, float] | float | None = (3.0, 6.0)
    add_qk_norm: bool = False
    reset_at_document_boundaries: bool = False
    reset_fgate_value: float = -25.0
    parallel: ParallelConfig | None = None

    _nested: ClassVar[dict[str, type[_Config]]] = {
        "backend": mLSTMBackendNameAndKwargs,
        "parallel": ParallelConfig,
    }

    def _derive(self) -> None:
        if isinstance(self.backend, str):
            self.backend = mLSTMBackendNameAndKwargs(name=self.backend)
        elif isinstance(self.backend, dict):
            self.backend = mLSTMBackendNameAndKwargs.from_dict(self.backend)
        elif isinstance(self.backend, mLSTMBackendNameAndKwargs):
            self.backend = copy.deepcopy(self.backend)
        self.igate_bias_init_range = _as_range(self.igate_bias_init_range)
        self.fgate_bias_init_range = _as_range(self.fgate_bias_init_range)

    def _validate(self, root: str, prefix: str) -> None:
        p = prefix
        _check_positive_or_unset(root, p + "context_length", self.context_length)
        _check_positive_or_unset(root, p + "embedding_dim", self.embedding_dim)
        _check_positive_or_unset(root, p + "num_heads", self.num_heads)
        if not isinstance(self.backend, mLSTMBackendNameAndKwargs):
            _fail(
                root,
                p + "backend",
                "must be a backend name or mLSTMBackendNameAndKwargs",
                self.backend,
            )
        self.backend._validate(root, p + "backend.")
        _check_positive_float(root, p + "norm_eps", self.norm_eps)
        _check_choice(root, p + "norm_type", self.norm_type, NORM_TYPES)
        _check_choice(root, p + "norm_type_v1", self.norm_type_v1, NORM_TYPES)
        _check_choice(root, p + "dtype", self.dtype, DTYPES)
        _check_choice(root, p + "gate_dtype", self.gate_dtype, DTYPES)
        _check_positive_float(root, p + "gate_soft_cap", self.gate_soft_cap, allow_none=True)
        _check_bool(root, p + "gate_linear_headwise", self.gate_linear_headwise)
        _check_bias_range(root, p + "igate_bias_init_range", self.igate_bias_init_range)
        _check_bias_range(root, p + "fgate_bias_init_range", self.fgate_bias_init_range)
        _check_bool(root, p + "add_qk_norm", self.add_qk_norm)
        _check_bool(root, p + "reset_at_document_boundaries", self.reset_at_document_boundaries)
        if not _is_number(self.reset_fgate_value) or not math.isfinite(self.reset_fgate_value):
            _fail(root, p + "reset_fgate_value", "must be a finite number", self.reset_fgate_value)
        _validate_parallel(self, root, p)

    @property
    def _dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def _gate_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.gate_dtype)


@no_type_check
@_config
class mLSTMLayerConfig(_Config):
    """mLSTM layer (`layer_type` "mlstm": Mamba-style, §3; "mlstm_v1": xLSTM-7B style, §4).

    Derived: `_proj_up_dim` = `_inner_embedding_dim` = round-up of `proj_factor * embedding_dim` to a multiple
    of `round_proj_up_to_multiple_of` (None while `embedding_dim` is unset). `embedding_dim`, `bias`,
    `dropout`, `context_length`, `dtype`, `norm_type`, `parallel` and `_num_blocks` are set by the stack.
    """

    conv1d_kernel_size: int = 4
    qkv_proj_blocksize: int = 4
    num_heads: int = 4
    proj_factor: float = 2.0
    vmap_qk: bool = False
    init_distribution: Literal["normal", "truncated_normal", "uniform"] = "normal"
    output_init_fn: Literal["small", "wang", "wang2", "zeros"] = "wang"
    layer_type: Literal["mlstm", "mlstm_v1"] = "mlstm"
    norm_type: Literal["layernorm", "rmsnorm"] = "layernorm"
    qk_dim_factor: float = 1.0
    v_dim_factor: float = 1.0
    embedding_dim: int = -1
    bias: bool = False
    dropout: float = 0.0
    context_length: int = -1
    dtype: str = "bfloat16"
    parallel: ParallelConfig | None = None
    debug_cell: bool = False
    gate_input: Literal["qkv", "x_mlstm", "x_mlstm_conv", "x_mlstm_conv_act"] = "qkv"
    round_proj_up_dim_up: bool = True
    round_proj_up_to_multiple_of: int = 64
    _proj_up_dim: int | None = None
    _num_blocks: int = 1
    _block_idx: int | None = None
    _inner_embedding_dim: int | None = None
    mlstm_cell: mLSTMCellConfig = dataclasses.field(default_factory=mLSTMCellConfig)

    _nested: ClassVar[dict[str, type[_Config]]] = {
        "mlstm_cell": mLSTMCellConfig,
        "parallel": ParallelConfig,
    }

    def _derive(self) -> None:
        self._proj_up_dim = _proj_up_dim_of(self)
        self._inner_embedding_dim = self._proj_up_dim
        if isinstance(self.mlstm_cell, dict):
            self.mlstm_cell = mLSTMCellConfig.from_dict(self.mlstm_cell)
        if isinstance(self.mlstm_cell, mLSTMCellConfig):
            cell = copy.deepcopy(self.mlstm_cell)
            cell.context_length = self.context_length
            inner = self._inner_embedding_dim
            cell.embedding_dim = inner if inner is not None and inner > 0 else -1
            cell.num_heads = self.num_heads
            cell.dtype = self.dtype
            cell.norm_type = self.norm_type
            cell.parallel = copy.deepcopy(self.parallel)
            cell._derive()
            self.mlstm_cell = cell

    # Dimensions used by the layers (None while embedding_dim is unset).
    @property
    def qk_dim(self) -> int | None:
        """Total q/k feature dim: round(qk_dim_factor * I) for "mlstm", int(qk_dim_factor * D) for v1."""
        if self.layer_type == "mlstm_v1":
            return int(self.embedding_dim * self.qk_dim_factor) if self.embedding_dim > 0 else None
        if self._inner_embedding_dim is None:
            return None
        return round(self.qk_dim_factor * self._inner_embedding_dim)

    @property
    def v_dim(self) -> int | None:
        """Total v feature dim (also z and the v1 output gate): like `qk_dim` with `v_dim_factor`."""
        if self.layer_type == "mlstm_v1":
            return int(self.embedding_dim * self.v_dim_factor) if self.embedding_dim > 0 else None
        if self._inner_embedding_dim is None:
            return None
        return round(self.v_dim_factor * self._inner_embedding_dim)

    def _validate(self, root: str, prefix: str) -> None:
        p = prefix
        _check_choice(root, p + "layer_type", self.layer_type, LAYER_TYPES)
        _check_nonneg_int(root, p + "conv1d_kernel_size", self.conv1d_kernel_size)
        _check_positive_int(root, p + "qkv_proj_blocksize", self.qkv_proj_blocksize)
        _check_positive_int(root, p + "num_heads", self.num_heads)
        _check_positive_float(root, p + "proj_factor", self.proj_factor)
        _check_bool(root, p + "vmap_qk", self.vmap_qk)
        _check_choice(root, p + "init_distribution", self.init_distribution, INIT_DISTRIBUTIONS)
        _check_choice(root, p + "output_init_fn", self.output_init_fn, OUTPUT_INIT_FNS)
        _check_choice(root, p + "norm_type", self.norm_type, NORM_TYPES)
        _check_positive_float(root, p + "qk_dim_factor", self.qk_dim_factor)
        _check_positive_float(root, p + "v_dim_factor", self.v_dim_factor)
        _check_positive_or_unset(root, p + "embedding_dim", self.embedding_dim)
        _check_bool(root, p + "bias", self.bias)
        _check_rate(root, p + "dropout", self.dropout)
        _check_positive_or_unset(root, p + "context_length", self.context_length)
        _check_choice(root, p + "dtype", self.dtype, DTYPES)
        _check_bool(root, p + "debug_cell", self.debug_cell)
        _check_choice(root, p + "gate_input", self.gate_input, GATE_INPUTS)
        _check_bool(root, p + "round_proj_up_dim_up", self.round_proj_up_dim_up)
        _check_positive_int(
            root, p + "round_proj_up_to_multiple_of", self.round_proj_up_to_multiple_of
        )
        _check_positive_int(root, p + "_num_blocks", self._num_blocks)
        if self._block_idx is not None:
            _check_nonneg_int(root, p + "_block_idx", self._block_idx)
        _validate_parallel(self, root, p)
        if not isinstance(self.mlstm_cell, mLSTMCellConfig):
            _fail(root, p + "mlstm_cell", "must be an mLSTMCellConfig", self.mlstm_cell)
        self.mlstm_cell._validate(root, p + "mlstm_cell.")
        if self.embedding_dim == -1:
            return  # dimension checks need embedding_dim, which the stack sets
        nh = self.num_heads
        if self._proj_up_dim is None or self._proj_up_dim <= 0:
            _fail(
                root,
                p + "proj_factor",
                f"proj_factor * embedding_dim rounded to a multiple of {self.round_proj_up_to_multiple_of} "
                f"must be positive (embedding_dim={self.embedding_dim})",
                self.proj_factor,
            )
        qk_dim, v_dim = self.qk_dim, self.v_dim
        assert qk_dim is not None and v_dim is not None
        if qk_dim <= 0:
            _fail(root, p + "qk_dim_factor", "gives an empty q/k dimension", self.qk_dim_factor)
        if v_dim <= 0:
            _fail(root, p + "v_dim_factor", "gives an empty v dimension", self.v_dim_factor)
        if self.layer_type == "mlstm":
            inner = self._inner_embedding_dim
            assert inner is not None
            _check_divides(
                root, p + "qkv_proj_blocksize", self.qkv_proj_blocksize, inner, "inner dim"
            )
            num_blocks = inner // self.qkv_proj_blocksize
            if qk_dim % num_blocks != 0:
                _fail(
                    root,
                    p + "qk_dim_factor",
                    f"q/k dim {qk_dim} must be a multiple of the {num_blocks} headwise blocks "
                    f"(inner dim {inner} / qkv_proj_blocksize {self.qkv_proj_blocksize})",
                    self.qk_dim_factor,
                )
            if v_dim % num_blocks != 0:
                _fail(
                    root,
                    p + "v_dim_factor",
                    f"v dim {v_dim} must be a multiple of the {num_blocks} headwise blocks "
                    f"(inner dim {inner} / qkv_proj_blocksize {self.qkv_proj_blocksize})",
                    self.v_dim_factor,
                )
            if self.mlstm_cell.gate_linear_headwise and self.gate_input != "qkv":
                _check_divides(root, p + "num_heads", nh, inner, "inner dim (headwise gates)")
        _check_divides(root, p + "num_heads", nh, qk_dim, "q/k dim")
        _check_divides(root, p + "num_heads", nh, v_dim, "v dim")
        tp = _tp_size(self.parallel)
        if tp > 1:
            _check_divides(root, p + "parallel.model_axis_size", tp, nh, "num_heads")
            _check_divides(root, p + "parallel.model_axis_size", tp, v_dim, "v dim")
            if self.layer_type == "mlstm" and not self.mlstm_cell.gate_linear_headwise:
                _fail(
                    root,
                    p + "mlstm_cell.gate_linear_headwise",
                    "must be True when parallel.model_axis_size > 1 (dense gates are not tensor-parallel)",
                    False,
                )

    @property
    def _dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)


@no_type_check
@_config
class FeedForwardConfig(_Config):
    """Feed-forward sub-block (§2.9, §4.2): F = `_proj_up_dim` = round-up of `proj_factor * embedding_dim`."""

    proj_factor: float = 1.3
    act_fn: str = "gelu"
    embedding_dim: int = -1
    dropout: float = 0.0
    bias: bool = False
    init_distribution: Literal["normal", "truncated_normal", "uniform"] = "normal"
    output_init_fn: Literal["small", "wang", "wang2", "zeros"] = "wang"
    ff_type: Literal["ffn_gated", "ffn"] = "ffn_gated"
    dtype: str = "bfloat16"
    parallel: ParallelConfig | None = None
    round_proj_up_dim_up: bool = True
    round_proj_up_to_multiple_of: int = 64
    _proj_up_dim: int | None = None
    _num_blocks: int = 1

    _nested: ClassVar[dict[str, type[_Config]]] = {"parallel": ParallelConfig}

    def _derive(self) -> None:
        self._proj_up_dim = _proj_up_dim_of(self)

    def _validate(self, root: str, prefix: str) -> None:
        p = prefix
        _check_positive_float(root, p + "proj_factor", self.proj_factor)
        _check_choice(root, p + "act_fn", self.act_fn, ACT_FNS)
        _check_positive_or_unset(root, p + "embedding_dim", self.embedding_dim)
        _check_rate(root, p + "dropout", self.dropout)
        _check_bool(root, p + "bias", self.bias)
        _check_choice(root, p + "init_distribution", self.init_distribution, INIT_DISTRIBUTIONS)
        _check_choice(root, p + "output_init_fn", self.output_init_fn, OUTPUT_INIT_FNS)
        _check_choice(root, p + "ff_type", self.ff_type, FF_TYPES)
        _check_choice(root, p + "dtype", self.dtype, DTYPES)
        _check_bool(root, p + "round_proj_up_dim_up", self.round_proj_up_dim_up)
        _check_positive_int(
            root, p + "round_proj_up_to_multiple_of", self.round_proj_up_to_multiple_of
        )
        _check_positive_int(root, p + "_num_blocks", self._num_blocks)
        _validate_parallel(self, root, p)
        if self.embedding_dim != -1:
            if self._proj_up_dim is None or self._proj_up_dim <= 0:
                _fail(
                    root,
                    p + "proj_factor",
                    f"proj_factor * embedding_dim rounded to a multiple of "
                    f"{self.round_proj_up_to_multiple_of} must be positive "
                    f"(embedding_dim={self.embedding_dim})",
                    self.proj_factor,
                )
            tp = _tp_size(self.parallel)
            if tp > 1:
                _check_divides(
                    root, p + "parallel.model_axis_size", tp, self._proj_up_dim, "FFN dim"
                )

    @property
    def _dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)


@no_type_check
@_config
class mLSTMBlockConfig(_Config):
    """Template for every mLSTM block: the layer, an optional FFN, an optional Gemma-2 style post-norm."""

    mlstm: mLSTMLayerConfig = dataclasses.field(default_factory=mLSTMLayerConfig)
    feedforward: FeedForwardConfig | None = None
    add_post_norm: bool = False
    parallel: ParallelConfig | None = None
    _num_blocks: int | None = None
    _block_idx: int | None = None

    _nested: ClassVar[dict[str, type[_Config]]] = {
        "mlstm": mLSTMLayerConfig,
        "feedforward": FeedForwardConfig,
        "parallel": ParallelConfig,
    }

    def _derive(self) -> None:
        self.mlstm = _derived_copy(self.mlstm, mLSTMLayerConfig, self)
        self.feedforward = _derived_copy(self.feedforward, FeedForwardConfig, self, block_idx=False)

    def _validate(self, root: str, prefix: str) -> None:
        p = prefix
        _validate_child(root, p + "mlstm", self.mlstm, mLSTMLayerConfig, optional=False)
        _validate_child(root, p + "feedforward", self.feedforward, FeedForwardConfig, optional=True)
        _check_bool(root, p + "add_post_norm", self.add_post_norm)
        _validate_parallel(self, root, p)
        _validate_block_position(self, root, p)


# ------------------------------------------------------------------------------------------------------------
# sLSTM (§6.1)
# ------------------------------------------------------------------------------------------------------------


@no_type_check
@_config
class sLSTMCellConfig(_Config):
    """sLSTM cell (PyTorch xLSTM, §6.1). `hidden_size` is set by the layer; `head_dim = hidden_size/num_heads`.

    Kept from the reference: `backend` ("cuda" | "vanilla": both run the same `lax.scan` here, with the
    CUDA kernel's per-element first-step rule), `function` ("slstm" | "lstm"), `bias_init`,
    `recurrent_weight_init`, `gradient_recurrent_cut` (stop the gradient through the recurrent input),
    `forward_clipval` (clip y to +-value), `_block_idx`/`_num_blocks` (forget-bias init), `dtype` (compute
    dtype of the gate projections; the cell state and gates are float32). Not kept: the CUDA kernel layout
    fields (`batch_size`, `input_shape`, `internal_input_shape`, `output_shape`, `constants`), the
    per-tensor dtypes (`dtype_b/r/w/g/s/a`: parameters are float32, the recurrence float32) and
    `initial_val`. `gradient_recurrent_clipval` (a CUDA-only backward clip) must stay None.
    `num_states` follows `function` (4 for slstm, 2 for lstm) as in the reference.
    """

    hidden_size: int = -1
    num_heads: int = 4
    num_states: int = 4
    backend: Literal["cuda", "vanilla"] = "cuda"
    function: Literal["slstm", "lstm"] = "slstm"
    bias_init: Literal["powerlaw_blockdependent", "small_init", "standard", "zeros"] = (
        "powerlaw_blockdependent"
    )
    recurrent_weight_init: Literal["zeros", "standard"] = "zeros"
    _block_idx: int = 0
    _num_blocks: int = 1
    num_gates: int = 4
    gradient_recurrent_cut: bool = False
    gradient_recurrent_clipval: float | None = None
    forward_clipval: float | None = None
    dtype: str = "bfloat16"

    def _derive(self) -> None:
        if self.function in SLSTM_FUNCTIONS:
            self.num_states = 4 if self.function == "slstm" else 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def _validate(self, root: str, prefix: str) -> None:
        p = prefix
        _check_positive_or_unset(root, p + "hidden_size", self.hidden_size)
        _check_positive_int(root, p + "num_heads", self.num_heads)
        _check_choice(root, p + "backend", self.backend, SLSTM_BACKENDS)
        _check_choice(root, p + "function", self.function, SLSTM_FUNCTIONS)
        _check_choice(root, p + "bias_init", self.bias_init, SLSTM_BIAS_INITS)
        _check_choice(
            root, p + "recurrent_weight_init", self.recurrent_weight_init, SLSTM_RECURRENT_INITS
        )
        _check_nonneg_int(root, p + "_block_idx", self._block_idx)
        _check_positive_int(root, p + "_num_blocks", self._num_blocks)
        if self._block_idx >= self._num_blocks:
            _fail(
                root, p + "_block_idx", f"must be < _num_blocks={self._num_blocks}", self._block_idx
            )
        if self.num_gates != 4:
            _fail(root, p + "num_gates", "must be 4 (i, f, z, o)", self.num_gates)
        _check_bool(root, p + "gradient_recurrent_cut", self.gradient_recurrent_cut)
        if self.gradient_recurrent_clipval is not None:
            _fail(
                root,
                p + "gradient_recurrent_clipval",
                "is a CUDA-kernel backward option not supported here; must be None",
                self.gradient_recurrent_clipval,
            )
        _check_positive_float(root, p + "forward_clipval", self.forward_clipval, allow_none=True)
        _check_choice(root, p + "dtype", self.dtype, DTYPES)
        if self.hidden_size != -1:
            _check_divides(root, p + "num_heads", self.num_heads, self.hidden_size, "hidden_size")

    @property
    def _dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)


@no_type_check
@_config
class sLSTMLayerConfig(sLSTMCellConfig):
    """sLSTM layer (§6.2): conv + 4 headwise gate projections + cell + per-head group norm.

    `hidden_size` is set to `embedding_dim`. `group_norm_eps` (port addition; PyTorch value 1e-5) is the eps
    of the per-head group norm. `parallel` is pushed by the block (unused: the sLSTM is not tensor-parallel).
    """

    embedding_dim: int = -1
    num_heads: int = 4
    conv1d_kernel_size: int = 4
    group_norm_weight: bool = True
    dropout: float = 0.0
    group_norm_eps: float = 1e-5
    parallel: ParallelConfig | None = None

    _nested: ClassVar[dict[str, type[_Config]]] = {"parallel": ParallelConfig}

    def _derive(self) -> None:
        self.hidden_size = self.embedding_dim
        super()._derive()

    def _validate(self, root: str, prefix: str) -> None:
        p = prefix
        _check_positive_or_unset(root, p + "embedding_dim", self.embedding_dim)
        super()._validate(root, prefix)
        _check_nonneg_int(root, p + "conv1d_kernel_size", self.conv1d_kernel_size)
        _check_bool(root, p + "group_norm_weight", self.group_norm_weight)
        _check_rate(root, p + "dropout", self.dropout)
        _check_positive_float(root, p + "group_norm_eps", self.group_norm_eps)
        _validate_parallel(self, root, p)


@no_type_check
@_config
class sLSTMBlockConfig(_Config):
    """Template for sLSTM blocks: the layer and a gated FFN by default (proj_factor 1.3, GELU)."""

    slstm: sLSTMLayerConfig = dataclasses.field(default_factory=sLSTMLayerConfig)
    feedforward: FeedForwardConfig | None = dataclasses.field(default_factory=FeedForwardConfig)
    parallel: ParallelConfig | None = None
    _num_blocks: int | None = None
    _block_idx: int | None = None

    _nested: ClassVar[dict[str, type[_Config]]] = {
        "slstm": sLSTMLayerConfig,
        "feedforward": FeedForwardConfig,
        "parallel": ParallelConfig,
    }

    def _derive(self) -> None:
        self.slstm = _derived_copy(
            self.slstm, sLSTMLayerConfig, self, parallel=copy.deepcopy(self.parallel)
        )
        self.feedforward = _derived_copy(self.feedforward, FeedForwardConfig, self, block_idx=False)

    def _validate(self, root: str, prefix: str) -> None:
        p = prefix
        _validate_child(root, p + "slstm", self.slstm, sLSTMLayerConfig, optional=False)
        _validate_child(root, p + "feedforward", self.feedforward, FeedForwardConfig, optional=True)
        _validate_parallel(self, root, p)
        _validate_block_position(self, root, p)


# ------------------------------------------------------------------------------------------------------------
# xLSTMBlockConfig (§2.4): one concrete block
# ------------------------------------------------------------------------------------------------------------


@no_type_check
@_config
class xLSTMBlockConfig(_Config):
    """One block: exactly one of `mlstm` / `slstm`, an optional FFN, pre-norms of `norm_type`/`norm_eps`.

    Pushes `_num_blocks`, `_block_idx`, `parallel` (and `norm_type` for mLSTM) into the layer and
    `embedding_dim`, `parallel`, `_num_blocks`, `dtype` into the FFN (the `dtype` push is a port choice).
    """

    mlstm: mLSTMLayerConfig | None = None
    slstm: sLSTMLayerConfig | None = None
    parallel: ParallelConfig | None = None
    feedforward: FeedForwardConfig | None = None
    dtype: str = "bfloat16"
    norm_eps: float = 1e-6
    norm_type: Literal["layernorm", "rmsnorm"] = "layernorm"
    add_post_norm: bool = False
    _num_blocks: int | None = None
    _block_idx: int | None = None

    _nested: ClassVar[dict[str, type[_Config]]] = {
        "mlstm": mLSTMLayerConfig,
        "slstm": sLSTMLayerConfig,
        "feedforward": FeedForwardConfig,
        "parallel": ParallelConfig,
    }

    def _derive(self) -> None:
        for name, cls in (
            ("mlstm", mLSTMLayerConfig),
            ("slstm", sLSTMLayerConfig),
            ("feedforward", FeedForwardConfig),
        ):
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, cls.from_dict(value))
            elif isinstance(value, cls):
                setattr(self, name, copy.deepcopy(value))
        layer: mLSTMLayerConfig | sLSTMLayerConfig | None = None
        if isinstance(self.mlstm, mLSTMLayerConfig):
            layer = self.mlstm
            self.mlstm.norm_type = self.norm_type
        elif isinstance(self.slstm, sLSTMLayerConfig):
            layer = self.slstm
        if layer is not None:
            if self._num_blocks is not None:
                layer._num_blocks = self._num_blocks
            if self._block_idx is not None:
                layer._block_idx = self._block_idx
            layer.parallel = copy.deepcopy(self.parallel)
            layer._derive()
            if isinstance(self.feedforward, FeedForwardConfig):
                self.feedforward.embedding_dim = layer.embedding_dim
                self.feedforward.parallel = copy.deepcopy(self.parallel)
                if self._num_blocks is not None:
                    self.feedforward._num_blocks = self._num_blocks
                self.feedforward.dtype = self.dtype
                self.feedforward._derive()

    def _validate(self, root: str, prefix: str) -> None:
        p = prefix
        _check_choice(root, p + "dtype", self.dtype, DTYPES)
        _check_positive_float(root, p + "norm_eps", self.norm_eps)
        _check_choice(root, p + "norm_type", self.norm_type, NORM_TYPES)
        _check_bool(root, p + "add_post_norm", self.add_post_norm)
        if (self.mlstm is None) == (self.slstm is None):
            _fail(root, p + "mlstm", "exactly one of 'mlstm' and 'slstm' must be set")
        _validate_child(root, p + "mlstm", self.mlstm, mLSTMLayerConfig, optional=True)
        _validate_child(root, p + "slstm", self.slstm, sLSTMLayerConfig, optional=True)
        _validate_child(root, p + "feedforward", self.feedforward, FeedForwardConfig, optional=True)
        _validate_parallel(self, root, p)
        _validate_block_position(self, root, p)
        tp = _tp_size(self.parallel)
        layer = self.mlstm if self.mlstm is not None else self.slstm
        if tp > 1 and layer is not None and layer.embedding_dim != -1:
            _check_divides(
                root, p + "parallel.model_axis_size", tp, layer.embedding_dim, "embedding_dim"
            )

    @property
    def _dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)


# ------------------------------------------------------------------------------------------------------------
# Stack and LM model (§2.1, §2.2)
# ------------------------------------------------------------------------------------------------------------


@no_type_check
@_config
class xLSTMBlockStackConfig(_Config):
    """The block stack: templates for mLSTM and sLSTM blocks, placement by `slstm_at`, and stack-wide values
    pushed into the templates (§2.8). `block_map` lists 0 (mLSTM) / 1 (sLSTM) per block;
    `block_configs()` gives the per-block `xLSTMBlockConfig`s."""

    mlstm_block: mLSTMBlockConfig | None = None
    slstm_block: sLSTMBlockConfig | None = None
    context_length: int = -1
    num_blocks: int = 1
    embedding_dim: int = 128
    add_post_blocks_norm: bool = True
    bias: bool = False
    dropout: float = 0.0
    scan_blocks: bool = False
    dtype: str = "bfloat16"
    parallel: ParallelConfig | None = None
    init_distribution_embed: Literal["normal", "truncated_normal", "uniform"] = "normal"
    init_distribution_out: Literal["normal", "truncated_normal", "uniform"] = "normal"
    slstm_at: list[int] | Literal["all"] = dataclasses.field(default_factory=list)
    _block_map: str | None = None

    _nested: ClassVar[dict[str, type[_Config]]] = {
        "mlstm_block": mLSTMBlockConfig,
        "slstm_block": sLSTMBlockConfig,
        "parallel": ParallelConfig,
    }

    @property
    def block_map(self) -> list[int]:
        """Per block: 0 = mLSTM block, 1 = sLSTM block."""
        assert self._block_map is not None
        return [int(x) for x in self._block_map.split(",")]

    def _create_block_map(self) -> str:
        block_map = [0] * self.num_blocks
        for idx in self.slstm_at:
            block_map[idx] = 1
        return ",".join(map(str, block_map))

    def _derive(self) -> None:
        if isinstance(self.mlstm_block, dict):
            self.mlstm_block = mLSTMBlockConfig.from_dict(self.mlstm_block)
        if isinstance(self.slstm_block, dict):
            self.slstm_block = sLSTMBlockConfig.from_dict(self.slstm_block)
        if isinstance(self.parallel, dict):
            self.parallel = ParallelConfig.from_dict(self.parallel)
        if self.mlstm_block is None:
            self.slstm_at = "all"
        if self.slstm_at == "all" and _is_int(self.num_blocks):
            self.slstm_at = list(range(self.num_blocks))
        elif isinstance(self.slstm_at, tuple):
            self.slstm_at = list(self.slstm_at)
        norm_type = getattr(self, "norm_type", None)  # only the LM config has one
        if isinstance(self.mlstm_block, mLSTMBlockConfig):
            block = copy.deepcopy(self.mlstm_block)
            layer = block.mlstm
            if isinstance(layer, mLSTMLayerConfig):
                layer.embedding_dim = self.embedding_dim
                layer.bias = self.bias
                layer.dropout = self.dropout
                layer.context_length = self.context_length
                layer.dtype = self.dtype
                if norm_type is not None:
                    layer.norm_type = norm_type
                layer.parallel = copy.deepcopy(self.parallel)
            block.parallel = copy.deepcopy(self.parallel)
            block._num_blocks = self.num_blocks
            self._push_ffn(block.feedforward)
            block._derive()
            self.mlstm_block = block
        if isinstance(self.slstm_block, sLSTMBlockConfig):
            block = copy.deepcopy(self.slstm_block)
            if isinstance(block.slstm, sLSTMLayerConfig):
                block.slstm.dropout = self.dropout
                block.slstm.embedding_dim = self.embedding_dim
                block.slstm.dtype = self.dtype
            block._num_blocks = self.num_blocks
            block.parallel = copy.deepcopy(self.parallel)
            self._push_ffn(block.feedforward)
            block._derive()
            self.slstm_block = block
        if self._slstm_at_ok():
            self._block_map = self._create_block_map()

    def _push_ffn(self, ffn: Any) -> None:
        if isinstance(ffn, FeedForwardConfig):
            ffn.embedding_dim = self.embedding_dim
            ffn.parallel = copy.deepcopy(self.parallel)
            ffn.dtype = self.dtype

    def _slstm_at_ok(self) -> bool:
        return (
            _is_int(self.num_blocks)
            and self.num_blocks > 0
            and isinstance(self.slstm_at, list)
            and all(_is_int(i) and 0 <= i < self.num_blocks for i in self.slstm_at)
        )

    def _validate(self, root: str, prefix: str) -> None:
        p = prefix
        _check_positive_int(root, p + "num_blocks", self.num_blocks)
        _check_positive_int(root, p + "embedding_dim", self.embedding_dim)
        _check_positive_or_unset(root, p + "context_length", self.context_length)
        _check_bool(root, p + "add_post_blocks_norm", self.add_post_blocks_norm)
        _check_bool(root, p + "bias", self.bias)
        _check_rate(root, p + "dropout", self.dropout)
        _check_bool(root, p + "scan_blocks", self.scan_blocks)
        _check_choice(root, p + "dtype", self.dtype, DTYPES)
        _check_choice(
            root, p + "init_distribution_embed", self.init_distribution_embed, INIT_DISTRIBUTIONS
        )
        _check_choice(
            root, p + "init_distribution_out", self.init_distribution_out, INIT_DISTRIBUTIONS
        )
        _validate_parallel(self, root, p)
        if not isinstance(self.slstm_at, list) or not all(_is_int(i) for i in self.slstm_at):
            _fail(
                root,
                p + "slstm_at",
                "must be a list of block indices (int) or 'all'",
                self.slstm_at,
            )
        for i in self.slstm_at:
            if not 0 <= i < self.num_blocks:
                _fail(
                    root,
                    p + "slstm_at",
                    f"indices must be in [0, num_blocks={self.num_blocks})",
                    self.slstm_at,
                )
        if len(set(self.slstm_at)) != len(self.slstm_at):
            _fail(root, p + "slstm_at", "indices must not repeat", self.slstm_at)
        if self.mlstm_block is not None:
            if not isinstance(self.mlstm_block, mLSTMBlockConfig):
                _fail(
                    root, p + "mlstm_block", "must be an mLSTMBlockConfig or None", self.mlstm_block
                )
            self.mlstm_block._validate(root, p + "mlstm_block.")
        if self.slstm_block is not None:
            if not isinstance(self.slstm_block, sLSTMBlockConfig):
                _fail(
                    root, p + "slstm_block", "must be an sLSTMBlockConfig or None", self.slstm_block
                )
            self.slstm_block._validate(root, p + "slstm_block.")
        if self.slstm_at and self.slstm_block is None:
            _fail(
                root,
                p + "slstm_block",
                f"must be set: slstm_at={self.slstm_at} places sLSTM blocks"
                + (
                    " (mlstm_block is None, so every block is an sLSTM block)"
                    if self.mlstm_block is None
                    else ""
                ),
            )
        if self.scan_blocks and self.slstm_at:
            _fail(
                root,
                p + "scan_blocks",
                f"must be False when the stack has sLSTM blocks (slstm_at={self.slstm_at}): "
                "their forget-gate init depends on the block index",
                True,
            )

    def block_config(self, idx: int) -> xLSTMBlockConfig:
        """The `xLSTMBlockConfig` of block `idx` (a deep copy of its template with `_block_idx=idx`)."""
        if not _is_int(idx) or not 0 <= idx < self.num_blocks:
            raise ValueError(
                f"block index must be in [0, num_blocks={self.num_blocks}), got {idx!r}"
            )
        parallel = copy.deepcopy(self.parallel)
        # `_block_map` joins one digit per block with ",": block idx is character 2 * idx. (Parsing
        # the whole map per block made `block_configs()` quadratic in num_blocks.)
        assert self._block_map is not None
        if self._block_map[2 * idx] == "0":
            assert self.mlstm_block is not None
            block = copy.deepcopy(self.mlstm_block)
            block._block_idx = idx
            block._derive()
            return xLSTMBlockConfig(
                mlstm=block.mlstm,
                slstm=None,
                parallel=parallel,
                feedforward=block.feedforward,
                dtype=block.mlstm.dtype,
                norm_eps=block.mlstm.mlstm_cell.norm_eps,
                norm_type=block.mlstm.mlstm_cell.norm_type,
                add_post_norm=block.add_post_norm,
                _num_blocks=self.num_blocks,
                _block_idx=idx,
            )
        assert self.slstm_block is not None
        block_s = copy.deepcopy(self.slstm_block)
        block_s._block_idx = idx
        block_s._derive()
        # sLSTM block norms: the model's norm_type/norm_eps when this is an LM config (a port choice; the
        # PyTorch sLSTM block uses LayerNorm with eps 1e-5), else the xLSTMBlockConfig defaults.
        norm_type = getattr(self, "norm_type", "layernorm")
        norm_eps = getattr(self, "norm_eps", 1e-6)
        return xLSTMBlockConfig(
            mlstm=None,
            slstm=block_s.slstm,
            parallel=parallel,
            feedforward=block_s.feedforward,
            dtype=self.dtype,
            norm_eps=norm_eps,
            norm_type=norm_type,
            add_post_norm=False,
            _num_blocks=self.num_blocks,
            _block_idx=idx,
        )

    def block_configs(self) -> list[xLSTMBlockConfig]:
        """Per-block configs in stack order (deep copies with `_block_idx` set)."""
        return [self.block_config(i) for i in range(self.num_blocks)]

    @property
    def _dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)


@no_type_check
@_config
class xLSTMLMModelConfig(xLSTMBlockStackConfig):
    """xLSTM language model: the stack plus embedding and LM head settings (§2.2).

    `vocab_size=-1` (the reference default, "fill from the tokenizer") is accepted here; `validate()` — which
    the model calls before making any array — requires a positive `vocab_size`. `norm_type` also sets the
    mLSTM layer's and cell's norm type (reference behaviour).
    """

    vocab_size: int = -1
    tie_weights: bool = False
    weight_decay_on_embedding: bool = False
    add_embedding_dropout: bool = False
    norm_eps: float = 1e-6
    norm_type: Literal["layernorm", "rmsnorm"] = "layernorm"
    logits_soft_cap: float | None = None
    lm_head_dtype: str = "float32"
    parallel: ParallelConfig | None = None

    def _validate(self, root: str, prefix: str) -> None:
        p = prefix
        _check_choice(root, p + "norm_type", self.norm_type, NORM_TYPES)
        _check_positive_or_unset(root, p + "vocab_size", self.vocab_size)
        super()._validate(root, prefix)
        _check_bool(root, p + "tie_weights", self.tie_weights)
        _check_bool(root, p + "weight_decay_on_embedding", self.weight_decay_on_embedding)
        _check_bool(root, p + "add_embedding_dropout", self.add_embedding_dropout)
        _check_positive_float(root, p + "norm_eps", self.norm_eps)
        _check_positive_float(root, p + "logits_soft_cap", self.logits_soft_cap, allow_none=True)
        _check_choice(root, p + "lm_head_dtype", self.lm_head_dtype, DTYPES)
        tp = _tp_size(self.parallel)
        if tp > 1:
            _check_divides(
                root, p + "parallel.model_axis_size", tp, self.embedding_dim, "embedding_dim"
            )

    def validate(self) -> None:
        """Full check before building a model: everything `__post_init__` checks, plus `vocab_size > 0`."""
        self._validate(type(self).__name__, "")
        if self.vocab_size <= 0:
            _fail(
                type(self).__name__,
                "vocab_size",
                "must be set to a positive int before a model is built (-1 means unset)",
                self.vocab_size,
            )

    @property
    def _lm_head_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.lm_head_dtype)


# ------------------------------------------------------------------------------------------------------------
# Llama (§2.10)
# ------------------------------------------------------------------------------------------------------------


@no_type_check
@_config
class LlamaConfig(_Config):
    """Llama baseline, one flat config (§2.10). `num_heads = embedding_dim // head_dim`;
    `ffn_hidden_dim` is the SwiGLU hidden size of §7.3.

    Port additions: `context_length` (-1 = unbounded; an upper bound callers may enforce, nothing is sized by
    it) and `query_scale_quirk` (True reproduces the reference's q scale NH^-1/2 instead of head_dim^-1/2).
    """

    vocab_size: int
    embedding_dim: int
    num_blocks: int
    head_dim: int = 128
    qk_norm: bool = False
    causal: bool = True
    theta: float = 1e4
    ffn_multiple_of: int = 64
    ffn_dim_multiplier: float | None = 1.0
    use_bias: bool = False
    scan_blocks: bool = True
    attention_backend: Literal["xla", "cudnn", "pallas_triton"] = "xla"
    mask_across_document_boundaries: bool = False
    dtype: str = "float32"
    dropout_rate: float = 0.0
    add_embedding_dropout: bool = False
    logits_soft_cap: float | None = None
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    context_length: int = -1
    query_scale_quirk: bool = False

    _nested: ClassVar[dict[str, type[_Config]]] = {"parallel": ParallelConfig}

    def _derive(self) -> None:
        if isinstance(self.parallel, dict):
            self.parallel = ParallelConfig.from_dict(self.parallel)
        elif self.parallel is None:
            self.parallel = ParallelConfig()
        else:
            self.parallel = copy.deepcopy(self.parallel)

    @property
    def num_heads(self) -> int:
        return self.embedding_dim // self.head_dim

    @property
    def ffn_hidden_dim(self) -> int:
        """int(8D/3), times `ffn_dim_multiplier` (int-truncated), rounded up to `ffn_multiple_of`."""
        hidden = int(8 * self.embedding_dim / 3)
        if self.ffn_dim_multiplier:
            hidden = int(hidden * self.ffn_dim_multiplier)
        m = self.ffn_multiple_of
        return m * ((hidden + m - 1) // m)

    def _validate(self, root: str, prefix: str) -> None:
        p = prefix
        _check_positive_int(root, p + "vocab_size", self.vocab_size)
        _check_positive_int(root, p + "embedding_dim", self.embedding_dim)
        _check_positive_int(root, p + "num_blocks", self.num_blocks)
        _check_positive_int(root, p + "head_dim", self.head_dim)
        _check_divides(root, p + "head_dim", self.head_dim, self.embedding_dim, "embedding_dim")
        if self.head_dim % 2 != 0:
            _fail(
                root,
                p + "head_dim",
                "must be even (RoPE rotates pairs of dimensions)",
                self.head_dim,
            )
        _check_bool(root, p + "qk_norm", self.qk_norm)
        _check_bool(root, p + "causal", self.causal)
        _check_positive_float(root, p + "theta", self.theta)
        _check_positive_int(root, p + "ffn_multiple_of", self.ffn_multiple_of)
        _check_positive_float(
            root, p + "ffn_dim_multiplier", self.ffn_dim_multiplier, allow_none=True
        )
        _check_bool(root, p + "use_bias", self.use_bias)
        _check_bool(root, p + "scan_blocks", self.scan_blocks)
        _check_choice(root, p + "attention_backend", self.attention_backend, ATTENTION_BACKENDS)
        _check_bool(
            root, p + "mask_across_document_boundaries", self.mask_across_document_boundaries
        )
        _check_choice(root, p + "dtype", self.dtype, DTYPES)
        _check_rate(root, p + "dropout_rate", self.dropout_rate)
        _check_bool(root, p + "add_embedding_dropout", self.add_embedding_dropout)
        _check_positive_float(root, p + "logits_soft_cap", self.logits_soft_cap, allow_none=True)
        if not isinstance(self.parallel, ParallelConfig):
            _fail(root, p + "parallel", "must be a ParallelConfig", self.parallel)
        self.parallel._validate(root, p + "parallel.")
        if self.parallel.model_axis_size != 1:
            _fail(
                root,
                p + "parallel.model_axis_size",
                "must be 1: the Llama baseline has no tensor parallelism",
                self.parallel.model_axis_size,
            )
        _check_positive_or_unset(root, p + "context_length", self.context_length)
        _check_bool(root, p + "query_scale_quirk", self.query_scale_quirk)
        if self.ffn_hidden_dim <= 0:
            _fail(
                root,
                p + "ffn_dim_multiplier",
                "gives an empty FFN hidden dim",
                self.ffn_dim_multiplier,
            )

    def validate(self) -> None:
        """Full check (the same as at construction); for symmetry with `xLSTMLMModelConfig.validate`."""
        self._validate(type(self).__name__, "")

    @property
    def _dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)
