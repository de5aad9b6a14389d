"""FIXME docstring."""

import copy
import dataclasses
import math
from collections.abc import Sequence
from typing import Any, ClassVar, TypeVar, no_type_check


# Allowed values

DTYPES = ("float32", "bfloat16", "float16")


NORM_TYPES = ("layernorm", "rmsnorm")


INIT_DISTRIBUTIONS = ("normal", "truncated_normal", "uniform")


OUTPUT_INIT_FNS = ("small", "wang", "wang2", "zeros")


ACT_FNS = ("gelu", "relu", "relu^2", "sigmoid", "swish", "selu")


# Helpers


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
