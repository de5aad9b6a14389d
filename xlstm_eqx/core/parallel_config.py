"""`ParallelConfig`: the device mesh layout and the FSDP / remat choices (docs/architecture.md, "Mesh and batch")."""

from typing import ClassVar

from .config import NON_EMPTY, NON_NEGATIVE, Check, Config, DType, configclass_kw, fail_field, field


AXIS_SIZE = Check(
    lambda v: v > 0 or v == -1, "a positive {n} or -1 (fill with the remaining devices)"
)


# ParallelConfig (docs/architecture.md, "Mesh and batch")


@configclass_kw
class ParallelConfig(Config):
    """Mesh layout (dp, fsdp, pp, cp, tp) and FSDP/remat choices."""

    data_axis_size: int = field(default=-1, check=AXIS_SIZE)
    """Size of the data-parallel mesh axis; -1 takes the devices the other axes leave (at most
    one axis size may be -1)."""
    fsdp_axis_size: int = field(default=1, check=AXIS_SIZE)
    """Size of the FSDP axis (parameters of `fsdp_modules` sharded over it)."""
    pipeline_axis_size: int = field(default=1, check=AXIS_SIZE)
    """Size of the pipeline axis (kept for the reference's layout; no pipelining here)."""
    model_axis_size: int = field(default=1, check=AXIS_SIZE)
    """Size of the tensor-parallel axis (heads and FFN width split over it)."""
    context_axis_size: int = field(default=1, check=AXIS_SIZE)
    """Size of the context-parallel axis (the sequence split over it: each device runs its segment
    and the segments' small recurrent states are exchanged). The mesh has this axis only when the
    size is not 1."""
    data_axis_name: str = field(default="dp", check=NON_EMPTY)
    """Name of the data-parallel mesh axis (the five axis names must differ)."""
    fsdp_axis_name: str = field(default="fsdp", check=NON_EMPTY)
    """Name of the FSDP mesh axis."""
    pipeline_axis_name: str = field(default="pp", check=NON_EMPTY)
    """Name of the pipeline mesh axis."""
    model_axis_name: str = field(default="tp", check=NON_EMPTY)
    """Name of the tensor-parallel mesh axis."""
    context_axis_name: str = field(default="cp", check=NON_EMPTY)
    """Name of the context-parallel mesh axis."""
    remat: list[str] = field(default_factory=list)
    """Module names rematerialised in the backward pass ("mLSTMBlock", "xLSTMResBlock",
    "FFNResBlock"; Llama: "TransformerBlock", "AttnBlock", "FFNBlock")."""
    fsdp_modules: list[str] = field(default_factory=list)
    """Module names whose parameters are sharded over the FSDP axis (e.g. "Embed", "LMHead")."""
    fsdp_min_weight_size: int = field(default=2**18, check=NON_NEGATIVE)
    """Arrays with at most this many elements (per tensor-parallel shard) are not FSDP-sharded."""
    fsdp_gather_dtype: DType | None = None
    """Dtype the FSDP all-gather of parameters runs in (None: the parameter dtype)."""
    fsdp_grad_scatter_dtype: DType | None = None
    """Dtype the FSDP reduce-scatter of gradients runs in (None: the gradient dtype)."""
    tp_async_dense: bool = False
    """The reference's asynchronous tensor-parallel dense layers (accepted, no effect here)."""

    _AXES: ClassVar[tuple[str, ...]] = ("data", "fsdp", "pipeline", "context", "model")

    def _cross_check(self, root: str, prefix: str) -> None:
        filled = [f"{a}_axis_size" for a in self._AXES if getattr(self, f"{a}_axis_size") == -1]
        if len(filled) > 1:
            fail_field(
                root, prefix + filled[1], f"at most one axis size may be -1, but {filled} are"
            )
        names: list[str] = []
        for axis in self._AXES:
            name = f"{axis}_axis_name"
            value = getattr(self, name)
            if value in names:
                fail_field(
                    root, prefix + name, f"must differ from the other axis names {names}", value
                )
            names.append(value)


def tp_size(parallel: ParallelConfig | None) -> int:
    """Tensor-parallel size known from the config (1 if unset or inferred with -1)."""
    if parallel is None or parallel.model_axis_size == -1:
        return 1
    return parallel.model_axis_size
