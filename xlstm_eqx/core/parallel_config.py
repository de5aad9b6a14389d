"""FIXME docstring."""

import dataclasses
from typing import Any, ClassVar, no_type_check

from .config import (
    DTYPES,
    _check_bool,
    _check_choice,
    _check_nonneg_int,
    _Config,
    _config_kw,
    _fail,
    _is_int,
    _validate_child,
)


# ParallelConfig (§2.11)


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


def _validate_parallel(obj: Any, root: str, prefix: str) -> None:
    _validate_child(root, prefix + "parallel", obj.parallel, ParallelConfig, optional=True)
