"""The config base: typed dataclass fields, validated against their annotations; dict/JSON/YAML
round trip; hashing.

A config class is a `Config` subclass decorated with `@configclass` (`@configclass_kw` for keyword-only
fields). Its field annotations say what each field accepts, and one checker validates every field
against its annotation (`_spec` builds it once per field, `check_value` runs it):

- `Literal[...]`: one of the listed values (of the same type: `True` is not `1`);
- `int`: an int, not a bool; `float`: a finite int or float, not a bool; `bool`; `str`; `None`;
- `X | Y`: either; `list[X]`, `tuple[X, Y]`, `tuple[X, ...]`, `dict[K, V]`: element-wise;
- a config class: an instance, validated in turn (errors name the field by its dotted path,
  `"parallel.model_axis_size"`).

A constraint beyond the type is declared with the field, `field(default=default, check=POSITIVE)`;
relations between fields (divisibility, "exactly one of") are checked by each class's
`_cross_check`. Every error is a `ValueError`
`"{Root}: invalid field '{dotted.path}': {message}, got {value!r}"`.

Constructor arguments are checked BEFORE `__init__` runs (`_ConfigMeta.__call__`), then once
more, with the derived fields, after `_derive` (`__post_init__`). The early check is what keeps
the error a `ValueError` naming the field when `__init__` is wrapped by a runtime type checker:
the jaxtyping import hook (`--jaxtyping-packages=xlstm_eqx,beartype.beartype`, as the tests run)
wraps a dataclass's `__init__` in `jaxtyped(typechecker=beartype)`, which checks the arguments
against the annotations before the body (and so `__post_init__`) runs, and would otherwise
raise its own `TypeCheckError` first. Before that check, arguments are brought into the form
their annotation names when the conversion is lossless — an int for a `float` (stored as
float), a list for a `tuple[...]` and a tuple for a `list[...]` (JSON and YAML have only lists)
— so what passes the checker also passes the hook.
"""

import copy
import dataclasses
import functools
import inspect
import math
import types
import typing
from collections.abc import Callable
from typing import (
    Any,
    ClassVar,
    Literal,
    NamedTuple,
    NoReturn,
    TypeVar,
    Union,
    get_args,
    get_origin,
)


# Choices shared by several configs


DType = Literal["float32", "bfloat16", "float16"]
"""Compute / parameter dtype names."""

NormType = Literal["layernorm", "rmsnorm"]

InitDistribution = Literal["normal", "truncated_normal", "uniform"]

OutputInitFn = Literal["small", "wang", "wang2", "zeros"]

ActFn = Literal["gelu", "relu", "relu^2", "sigmoid", "swish", "selu"]
"""Activation names (the keys of `nn.functional.ACTIVATIONS`)."""


# Constraints declared with a field


@dataclasses.dataclass(frozen=True)
class Check:
    """A constraint on a field's value beyond its annotation: `test(value)` must hold (it is only
    called on values of the annotated type, never on None). `text` says what the value must be,
    with `{a}` for the annotated type with its article ("an int") and `{n}` without ("int")."""

    test: Callable[[Any], bool]
    text: str


POSITIVE = Check(lambda v: v > 0, "a positive {n}")
NON_NEGATIVE = Check(lambda v: v >= 0, "{a} >= 0")
POSITIVE_OR_UNSET = Check(lambda v: v > 0 or v == -1, "a positive {n}, or -1 for unset")
"""Sizes whose reference default is -1 ("set by a parent" / "unbounded")."""
RATE = Check(lambda v: 0 <= v < 1, "{a} in [0, 1)")
NON_EMPTY = Check(lambda v: len(v) > 0, "a non-empty {n}")


def field(
    default: Any = dataclasses.MISSING,
    *,
    default_factory: Any = dataclasses.MISSING,
    check: Check | None = None,
    help: str = "",
) -> Any:
    """A config field: `dataclasses.field(default / default_factory)` with an optional constraint
    `check` on its value (see `Check`), validated with the annotation, and an optional `help`
    (the text of the field's command-line flag, where it has one)."""
    metadata: dict[str, Any] = {} if check is None else {"check": check}
    if help:
        metadata["help"] = help
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


# The checker


def fail_field(root: str, path: str, message: str, value: Any = dataclasses.MISSING) -> NoReturn:
    """Raise the `ValueError` for invalid field `path` of config `root` (module docstring)."""
    got = "" if value is dataclasses.MISSING else f", got {value!r}"
    raise ValueError(f"{root}: invalid field '{path}': {message}{got}")


def is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


# The predicates are lambdas built once per annotation: the import hook wraps every `def` in a
# type-checking wrapper (whose per-call cost would dominate a config's validation), and these
# take and return nothing the hook could check.
_SCALARS: dict[Any, Callable[[Any], bool]] = {
    int: lambda v: isinstance(v, int) and not isinstance(v, bool),
    float: lambda v: (
        (isinstance(v, int) and not isinstance(v, bool))
        or (isinstance(v, float) and math.isfinite(v))
    ),
    bool: lambda v: isinstance(v, bool),
    str: lambda v: isinstance(v, str),
    type(None): lambda v: v is None,
    Any: lambda v: True,
}


@functools.cache
def _predicate(tp: Any) -> Callable[[Any], bool]:
    """Whether a value is of annotation `tp` (containers element-wise; a config instance counts
    whatever its fields hold: those are checked by its own `_validate`)."""
    if tp in _SCALARS:
        return _SCALARS[tp]
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        return lambda v: any(type(v) is type(choice) and v == choice for choice in args)
    if _is_union(tp):
        alts = tuple(_predicate(alt) for alt in args)
        return lambda v: any(ok(v) for ok in alts)
    if origin is list:
        item = _predicate(args[0])
        return lambda v: isinstance(v, list) and all(map(item, v))
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        item = _predicate(args[0])
        return lambda v: isinstance(v, tuple) and all(map(item, v))
    if origin is tuple:
        items = tuple(_predicate(a) for a in args)
        return lambda v: (
            isinstance(v, tuple)
            and len(v) == len(items)
            and all(ok(x) for ok, x in zip(items, v, strict=True))
        )
    if origin is dict:
        key, val = _predicate(args[0]), _predicate(args[1])
        return lambda v: isinstance(v, dict) and all(key(k) and val(x) for k, x in v.items())
    if isinstance(tp, type):
        return lambda v: isinstance(v, tp)
    raise TypeError(f"config annotation {tp!r} is not supported")


def _matches(value: Any, tp: Any) -> bool:
    return _predicate(tp)(value)


def _coerce(value: Any, tp: Any) -> Any:
    """`value` in the form its annotation names, where the conversion is lossless: an int for a
    `float` becomes a float, a list for a `tuple[...]` a tuple, a tuple for a `list[...]` a list
    (element-wise). Anything else is returned as is (for the checker to report)."""
    alts = get_args(tp) if _is_union(tp) else (tp,)
    if is_int(value):
        return float(value) if float in alts and int not in alts else value
    if not isinstance(value, (list, tuple)):
        return value
    for alt in alts:
        origin, args = get_origin(alt), get_args(alt)
        if origin is list:
            new: Any = [_coerce(x, args[0]) for x in value]
        elif origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            new = tuple(_coerce(x, args[0]) for x in value)
        elif origin is tuple and len(args) == len(value):
            new = tuple(map(_coerce, value, args))
        else:
            continue
        if _matches(new, alt):
            return new
    return value


_NOUNS: dict[Any, tuple[str, str]] = {
    int: ("an int", "ints"),
    float: ("a finite number", "finite numbers"),
    bool: ("a bool", "bools"),
    str: ("a string", "strings"),
}


def _article(name: str) -> str:
    """ "a" or "an" before `name`, read as spoken ("an mLSTMCellConfig", "a LlamaConfig")."""
    initialism = len(name) > 1 and name[1].isupper()
    vowel_sounds = "aefhilmnorsx" if initialism else "aeiou"
    return "an" if name[0].lower() in vowel_sounds else "a"


def _noun(tp: Any, plural: bool = False) -> str:
    """What a value of annotation `tp` is, in words ("an int", "a list of strings")."""
    if tp in _NOUNS:
        return _NOUNS[tp][plural]
    if tp is type(None):
        return "None"
    if tp is Any:
        return "any values" if plural else "any value"
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        return repr(args[0]) if len(args) == 1 and not plural else f"one of {args!r}"
    if _is_union(tp):
        return _join_or([_noun(alt, plural) for alt in args])
    if origin is list:
        return ("lists of " if plural else "a list of ") + _noun(args[0], True)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return ("tuples of " if plural else "a tuple of ") + _noun(args[0], True)
        if len(args) == 2 and args[0] == args[1]:
            return ("pairs of " if plural else "a pair of ") + _noun(args[0], True)
        inner = ", ".join(_noun(a) for a in args)
        return ("tuples" if plural else "a tuple") + f" ({inner})"
    if origin is dict:
        parts = [
            f"{_noun(t).split(' ', 1)[-1]} {what}"
            for t, what in zip(args, ("keys", "values"), strict=True)
            if t is not Any
        ]
        return ("dicts" if plural else "a dict") + (" with " + " and ".join(parts) if parts else "")
    if isinstance(tp, type):
        return f"{tp.__name__} instances" if plural else f"{_article(tp.__name__)} {tp.__name__}"
    raise TypeError(f"config annotation {tp!r} is not supported")


def _join_or(parts: list[str]) -> str:
    if len(parts) <= 2:
        return " or ".join(parts)
    return ", ".join(parts[:-1]) + ", or " + parts[-1]


def _describe(tp: Any, check: Check | None = None) -> str:
    """The error message for a value that is not of annotation `tp` or fails `check`."""
    alts = list(get_args(tp)) if _is_union(tp) else [tp]
    optional = type(None) in alts
    rest = [alt for alt in alts if alt is not type(None)]
    choices = tuple(c for alt in rest if get_origin(alt) is Literal for c in get_args(alt))
    if choices:  # the Literal alternatives as one list of choices, where the first one was
        i = next(i for i, alt in enumerate(rest) if get_origin(alt) is Literal)
        rest = [alt for alt in rest if get_origin(alt) is not Literal]
        rest.insert(i, Literal[choices])
    if check is not None:
        if len(rest) != 1:
            raise TypeError(f"a field with a check must have one type (or None), not {tp!r}")
        a = _noun(rest[0])
        parts = [check.text.format(a=a, n=a.split(" ", 1)[1] if " " in a else a)]
    elif optional and len(rest) == 1 and get_origin(rest[0]) is Literal:
        return f"must be one of {get_args(rest[0]) + (None,)!r}"
    else:
        parts = [_noun(alt) for alt in rest]
    if optional:
        parts.append("None")
    return "must be " + _join_or(parts)


class _FieldSpec(NamedTuple):
    """A config field as the checker needs it (built once per class by `@configclass`)."""

    tp: Any  # the annotation
    ok: Callable[[Any], bool]  # of type `tp` and passes the field's check
    message: str  # what the value must be, for the error
    config_cls: "type[Config] | None"  # the config class named in `tp`, for `from_dict`
    coerce: bool  # whether `_coerce` may change a value of this field


def check_value(root: str, path: str, value: Any, tp: Any, check: Check | None = None) -> None:
    """The field check: `value` must be of annotation `tp` and pass `check` (when not None); a
    config instance is then validated field by field under `path`. (`Config` runs the same
    check from each field's `_FieldSpec`, built once per class.)"""
    _check_spec(root, path, value, _spec(tp, check))


@functools.cache
def _spec(tp: Any, check: Check | None) -> _FieldSpec:
    is_type, test = _predicate(tp), None if check is None else check.test
    ok = is_type if test is None else (lambda v: is_type(v) and (v is None or test(v)))
    coerce = any(x is float or get_origin(x) in (list, tuple) for x in _walk(tp))
    return _FieldSpec(tp, ok, _describe(tp, check), _config_class_in(tp), coerce)


def _walk(tp: Any) -> list[Any]:
    """`tp` and every annotation nested in it."""
    return [tp] + [x for arg in get_args(tp) if arg is not Ellipsis for x in _walk(arg)]


def _check_spec(root: str, path: str, value: Any, spec: _FieldSpec) -> None:
    if not spec.ok(value):
        fail_field(root, path, spec.message, value)
    if isinstance(value, Config):
        value._validate(root, path + ".")


# The base class


def _freeze(obj: Any) -> Any:
    """A hashable image of a config value (lists -> tuples, dicts -> sorted item tuples)."""
    if isinstance(obj, Config):
        return (type(obj).__name__,) + tuple(
            (f.name, _freeze(getattr(obj, f.name))) for f in dataclasses.fields(obj)
        )
    if isinstance(obj, dict):
        return tuple(sorted((str(k), _freeze(v)) for k, v in obj.items()))
    if isinstance(obj, (list, tuple)):
        return tuple(_freeze(x) for x in obj)
    return obj


def _to_jsonable(obj: Any) -> Any:
    if isinstance(obj, Config):
        return obj.to_dict()
    if isinstance(obj, dict):
        return {str(k): _to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_jsonable(x) for x in obj]
    return obj


_C = TypeVar("_C", bound="Config")


class _ConfigMeta(type):
    """Checks a config's constructor arguments against the field annotations before `__init__`
    runs (see the module docstring for why), after bringing them into their annotated form."""

    # Unannotated return: a type checker then reads the constructor's signature from the
    # dataclass (`configclass`'s `dataclass_transform`), as it would without this metaclass.
    def __call__(cls, *args: Any, **kwargs: Any):
        specs: dict[str, _FieldSpec] | None = cls.__dict__.get("_specs")
        if specs is None:  # not a `@configclass` class
            return super().__call__(*args, **kwargs)
        config_cls = typing.cast("type[Config]", cls)
        bound = inspect.signature(config_cls).bind(*args, **kwargs)  # `__signature__`
        for name, value in bound.arguments.items():
            spec = specs[name]
            if spec.config_cls is not None and isinstance(value, dict):
                value = bound.arguments[name] = spec.config_cls.from_dict(value)
            elif spec.coerce and (type(value) is int or isinstance(value, (list, tuple))):
                value = bound.arguments[name] = _coerce(value, spec.tp)
            if not spec.ok(value):
                config_cls._invalid_field(cls.__name__, name, spec.message, value)
            if isinstance(value, Config):
                value._validate(cls.__name__, name + ".")
        return super().__call__(*bound.args, **bound.kwargs)


class Config(metaclass=_ConfigMeta):
    """Mixin: annotation-driven validation, dict round trip, hashing.

    `_derive()` computes derived fields and pushes values into children; `_validate(root,
    prefix)` checks every field against its annotation and declared constraint, recursing into
    nested configs, then runs `_cross_check(root, prefix)`, the class's checks between fields;
    both raise `ValueError` for the first invalid field, named by its dotted path.
    """

    _specs: ClassVar[dict[str, _FieldSpec]]
    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]  # set by `@configclass`

    def __post_init__(self) -> None:
        self._derive()
        self._validate(type(self).__name__, "")

    def _derive(self) -> None:
        pass

    def _validate(self, root: str, prefix: str) -> None:
        for name, spec in type(self)._specs.items():  # `_check_spec`, inlined: the hot loop
            value = getattr(self, name)
            if not spec.ok(value):
                self._invalid_field(root, prefix + name, spec.message, value)
            if isinstance(value, Config):
                value._validate(root, prefix + name + ".")
        self._cross_check(root, prefix)

    @classmethod
    def _invalid_field(
        cls, root: str, path: str, message: str, value: Any = dataclasses.MISSING
    ) -> NoReturn:
        """Raise the error for an invalid field: `fail_field`'s wording, unless a class words
        its errors its own way (`TrainConfig` names the command-line flag)."""
        fail_field(root, path, message, value)

    def _cross_check(self, root: str, prefix: str) -> None:
        pass

    def __hash__(self) -> int:
        return hash(_freeze(self))

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable nested dict of every field (tuples become lists)."""
        return {f.name: _to_jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls: type[_C], d: dict[str, Any]) -> _C:
        """Rebuild a config from `to_dict()` output (also after a JSON or YAML round trip)."""
        if not isinstance(d, dict):
            raise ValueError(f"{cls.__name__}.from_dict: expected a dict, got {type(d).__name__}")
        specs = cls._specs
        unknown = sorted(set(d) - set(specs))
        if unknown:
            raise ValueError(
                f"{cls.__name__}.from_dict: unknown field(default=s) {unknown}; known fields are {sorted(specs)}"
            )
        return cls(**d)  # the constructor parses the dicts of nested configs


def _config_class_in(tp: Any) -> type[Config] | None:
    alts = get_args(tp) if _is_union(tp) else (tp,)
    found = [a for a in alts if isinstance(a, type) and issubclass(a, Config)]
    if len(found) > 1:
        raise TypeError(f"a config field may name one config class, not {tp!r}")
    return found[0] if found else None


def _make_config(cls: type[_C], kw_only: bool) -> type[_C]:
    cls = dataclasses.dataclass(kw_only=kw_only)(cls)
    cls.__hash__ = Config.__hash__  # type: ignore[method-assign]  # eq dataclasses drop it
    hints = typing.get_type_hints(cls)
    cls._specs = {
        f.name: _spec(hints[f.name], f.metadata.get("check"))
        for f in dataclasses.fields(cls)  # type: ignore[arg-type]
    }
    init = inspect.signature(cls.__init__)
    cls.__signature__ = init.replace(  # type: ignore[attr-defined]
        parameters=list(init.parameters.values())[1:], return_annotation=inspect.Signature.empty
    )
    return cls


@typing.dataclass_transform(field_specifiers=(field,))
def configclass(cls: type[_C]) -> type[_C]:
    """`@dataclass` for a `Config` subclass: keeps `Config.__hash__` (an eq dataclass would set
    it to None) and records each field's annotation and constraint for the checker."""
    return _make_config(cls, kw_only=False)


@typing.dataclass_transform(kw_only_default=True, field_specifiers=(field,))
def configclass_kw(cls: type[_C]) -> type[_C]:
    """`configclass` with keyword-only fields."""
    return _make_config(cls, kw_only=True)


# Helpers of the config classes


def check_field_divides(root: str, path: str, divisor: int, dim: int, dim_name: str) -> None:
    if dim % divisor != 0:
        fail_field(root, path, f"must divide {dim_name}={dim}", divisor)


def _round_up_dim(factor: float | int, dim: int, multiple_of: int, round_up: bool) -> int:
    """`multiple_of * ceil(factor*dim / multiple_of)` (floor if not `round_up`), as the reference."""
    multiplier = factor * dim / multiple_of
    multiplier = math.ceil(multiplier) if round_up else math.floor(multiplier)
    return int(multiplier * multiple_of)


def proj_up_dim_of(
    embedding_dim: int, proj_factor: float, multiple_of: int, round_up: bool
) -> int | None:
    """The up-projection width of a layer or FFN by the rounding rule (docs/architecture.md, "From config to module"), or None while
    `embedding_dim` is unset (-1)."""
    if embedding_dim == -1:
        return None
    return _round_up_dim(proj_factor, embedding_dim, multiple_of, round_up)


def derived_copy(value: _C, parent: Config, *, block_idx: bool = True, **fields: Any) -> _C:
    """A nested config as its parent's `_derive` needs it: a copy (so parents never share a
    child) with the parent's `_num_blocks` (and `_block_idx` if `block_idx`) and `fields`
    pushed in, then derived."""
    value = copy.deepcopy(value)
    pushed = {"_num_blocks": getattr(parent, "_num_blocks", None)}
    if block_idx:
        pushed["_block_idx"] = getattr(parent, "_block_idx", None)
    pushed = {name: v for name, v in pushed.items() if v is not None} | fields
    for name, field_value in pushed.items():
        setattr(value, name, field_value)
    value._derive()
    return value
