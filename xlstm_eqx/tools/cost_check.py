"""The cost regression guard, `xlstm-eqx bench --check`: XLA's compiled cost analysis (FLOPs and
bytes accessed) of fixed small programs against the values committed in
``benchmarks/results/costs.json``.

Every entry is compiled, never run, so a busy machine cannot change its numbers: the cell forms
(forward and forward+backward), the trainer's own train step of three tiny models and one-token
`decode_step` of xLSTM and Llama. A value more than `TOLERANCE` above the committed one fails the
check; one more than `TOLERANCE` below it is a note suggesting ``--update`` (a deliberate commit
that says why the cost changed).

The file keeps one record per backend (``"cpu"``, ``"gpu"``, ...) with the jax and jaxlib versions
it was measured with. On a backend with no record the check compares nothing and exits with
`EXIT_NO_BASELINE` (3), distinct from a regression's `EXIT_REGRESSION` (1); ``--update`` on that
backend adds its record. Entries on one side only are notes, never failures.
"""

import dataclasses
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr

from ..cell.backend_config import mLSTMBackendNameAndKwargs
from ..cell.forms import mlstm_chunkwise, mlstm_recurrent, parallel_stabilized_simple
from ..cell.pallas import mlstm_chunkwise_pallas
from ..core.files import write_json_atomic
from ..core.timing import cost_analysis
from ..generation import decode_step
from ..llama.config import LlamaConfig
from ..models import build_model
from ..presets import tiny_llama, tiny_xlstm
from ..xlstm.config import xLSTMLMModelConfig
from ..xlstm.mlstm_config import mLSTMBlockConfig, mLSTMCellConfig, mLSTMLayerConfig
from .train_setup import train_step_setup, zeros_of_skeleton


TOLERANCE = 0.03
"""Relative growth of a cost that fails the check (and shrink that asks for ``--update``)."""
METRICS = {"flops": "flops", "bytes": "bytes accessed"}
"""The file's metric names -> the keys of XLA's cost analysis."""
EXIT_OK, EXIT_REGRESSION, EXIT_NO_BASELINE = 0, 1, 3

ModelConfig = TypeVar("ModelConfig", xLSTMLMModelConfig, LlamaConfig)

CELL_SHAPE = (1, 2, 64, 16)  # (B, NH, S, DH): small enough to compile in well under a second
CELL_CHUNK = 16
TRAIN_SEQ_LEN, TRAIN_BATCH = 64, 2
DECODE_BATCH, DECODE_CACHE = 1, 64
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
"""Compiler options of every entry: they change XLA:CPU's machine-code generation, not the
optimised HLO that the cost analysis reads (the same FLOPs and bytes), and halve the compile time."""

Costs = dict[str, dict[str, float]]
"""Entry name -> ``{"flops": ..., "bytes": ...}``."""


def default_costs_path() -> Path:
    """``benchmarks/results/costs.json`` of the checkout (``$XLSTM_EQX_REPO`` if set)."""
    root = os.environ.get("XLSTM_EQX_REPO") or Path(__file__).resolve().parents[2]
    return Path(root) / "benchmarks" / "results" / "costs.json"


# the entries: name -> a function compiling the program (never running it). XLA's cost analysis
# counts the body of a loop (`lax.scan`: the recurrent form, the chunkwise form's state scan)
# once, not once per iteration: a change inside it shows all the same. A `lax.cond` counts as
# its costliest branch (checked on jax 0.10.2): a cheap fast path beside a careful one shows no
# saving here, only a growth of either.


def _cell_forms() -> dict[str, Callable[..., Any]]:
    forms: dict[str, Callable[..., Any]] = {
        "chunkwise": lambda *a: mlstm_chunkwise(*a, chunk_size=CELL_CHUNK),
        "parallel": parallel_stabilized_simple,
        "recurrent": mlstm_recurrent,
    }
    # The Pallas kernels only on an accelerator: on CPU they run in Pallas interpret mode, whose
    # program (the kernel body unrolled over the grid in plain XLA) is not what a GPU runs.
    if jax.default_backend() != "cpu":
        forms["chunkwise_pallas"] = lambda *a: mlstm_chunkwise_pallas(*a, chunk_size=CELL_CHUNK)
    return forms


def _compile_cell(form: Callable[..., Any], backward: bool) -> Any:
    B, NH, S, DH = CELL_SHAPE
    qkv = jax.ShapeDtypeStruct((B, NH, S, DH), jnp.float32)
    gate = jax.ShapeDtypeStruct((B, NH, S), jnp.float32)

    def h_only(*args: Any) -> Any:
        out = form(*args)
        return out[0] if isinstance(out, tuple) else out

    def loss(*args: Any) -> Any:
        return jnp.sum(h_only(*args))

    fn = jax.grad(loss, argnums=(0, 1, 2, 3, 4)) if backward else form
    return jax.jit(fn).lower(qkv, qkv, qkv, gate, gate).compile(FAST_COMPILE)


def tiny_mlstm_config() -> xLSTMLMModelConfig:
    """`tiny_xlstm` with one "mlstm" (Mamba-style) block instead: 4 heads, no FFN, the chunkwise
    cell (chunk 16)."""
    backend = mLSTMBackendNameAndKwargs(name="chunkwise", kwargs={"chunk_size": CELL_CHUNK})
    cell = mLSTMCellConfig(backend=backend)
    layer = mLSTMLayerConfig(layer_type="mlstm", num_heads=4, mlstm_cell=cell)
    block = mLSTMBlockConfig(mlstm=layer)
    return one_block(dataclasses.replace(tiny_xlstm(), mlstm_block=block))


def one_block(config: ModelConfig) -> ModelConfig:
    """`config` with one block, unrolled: XLA's cost analysis counts a loop's body once, whatever
    its trip count, so a scan over blocks would hide nothing but compile slower."""
    return dataclasses.replace(config, num_blocks=1, scan_blocks=False)


def _compile_train(family: str, config: xLSTMLMModelConfig | LlamaConfig) -> Any:
    _, model, opt_state, step, inputs = train_step_setup(
        family, "tiny", TRAIN_SEQ_LEN, TRAIN_BATCH, config=config, abstract=True
    )
    return step.lower(inputs, model, opt_state).compile(FAST_COMPILE)


def _compile_decode(config: xLSTMLMModelConfig | LlamaConfig) -> Any:
    # zeros of the right shapes: nothing is initialised, the compiled program is the same
    model = zeros_of_skeleton(eqx.filter_eval_shape(lambda: build_model(config, key=jr.key(0))))
    sizes = (DECODE_BATCH, DECODE_CACHE) if isinstance(config, LlamaConfig) else (DECODE_BATCH,)
    state = zeros_of_skeleton(eqx.filter_eval_shape(lambda: model.init_state(*sizes)))
    token = jnp.zeros((DECODE_BATCH,), jnp.int32)
    return eqx.filter_jit(decode_step).lower(model, state, token).compile(FAST_COMPILE)


def cost_entries() -> dict[str, Callable[[], Any]]:
    """The checked programs of this backend: name -> a function returning the compiled program."""
    entries: dict[str, Callable[[], Any]] = {}
    for name, form in _cell_forms().items():
        for suffix, backward in (("forward", False), ("forward+backward", True)):
            entries[f"cell/{name}/{suffix}"] = lambda f=form, b=backward: _compile_cell(f, b)
    entries["train/xlstm-mlstm"] = lambda: _compile_train("xlstm", tiny_mlstm_config())
    entries["train/xlstm-mlstm_v1"] = lambda: _compile_train("xlstm", one_block(tiny_xlstm()))
    entries["train/llama"] = lambda: _compile_train("llama", one_block(tiny_llama()))
    entries["decode/xlstm-mlstm_v1"] = lambda: _compile_decode(one_block(tiny_xlstm()))
    entries["decode/llama"] = lambda: _compile_decode(one_block(tiny_llama()))
    return entries


def measure_costs(names: Sequence[str] | None = None) -> Costs:
    """Compile each entry (all of `cost_entries`, or `names`) and read its FLOPs and bytes."""
    entries = cost_entries()
    unknown = sorted(set(names or ()) - set(entries))
    if unknown:
        raise ValueError(f"bench --check: unknown entries {unknown}; known: {sorted(entries)}")

    def measure(name: str) -> dict[str, float]:
        analysis = cost_analysis(entries[name]())
        return {metric: analysis.get(key, math.nan) for metric, key in METRICS.items()}

    # Two threads: XLA compiles one program (no GIL held) while Python traces the next.
    chosen = list(names) if names is not None else list(entries)
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(chosen, pool.map(measure, chosen), strict=True))


# the comparison


@dataclasses.dataclass
class CostReport:
    """`compare_costs`' verdict: `failures` (growth beyond the tolerance) and `notes`."""

    failures: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    rows: list[str] = dataclasses.field(default_factory=list)


def cost_ratio(committed: float, measured: float) -> float:
    """``measured / committed``; 1 when both are 0, inf when only the committed one is."""
    if committed == 0:
        return 1.0 if measured == 0 else math.inf
    return measured / committed


def compare_costs(committed: Costs, measured: Costs, tolerance: float = TOLERANCE) -> CostReport:
    """Each measured metric against its committed value: a ratio above ``1 + tolerance`` is a
    failure, below ``1 - tolerance`` a note; an entry or metric on one side only is a note."""
    report = CostReport()
    for name in sorted(set(committed) - set(measured)):
        report.notes.append(f"{name}: committed but not measured here (removed or renamed?)")
    for name, metrics in measured.items():
        if name not in committed:
            report.notes.append(f"{name}: no committed value (bench --check --update records it)")
            continue
        for metric, value in metrics.items():
            if metric not in committed[name]:
                report.notes.append(f"{name} {metric}: no committed value")
                continue
            old = float(committed[name][metric])
            ratio = cost_ratio(old, value)
            line = (
                f"{name} {metric}: committed {old:,.0f}, measured {value:,.0f}, ratio {ratio:.3f}"
            )
            report.rows.append(line)
            if not ratio <= 1 + tolerance:  # NaN (no value measured) fails too
                report.failures.append(f"{line} (grew more than {tolerance:.0%})")
            elif ratio < 1 - tolerance:
                report.notes.append(
                    f"{line} (shrank more than {tolerance:.0%}: record it with "
                    "bench --check --update, saying why in the commit message)"
                )
    return report


# the file


def environment() -> dict[str, str]:
    """The backend and the versions a record is measured with."""
    try:
        jaxlib_version = version("jaxlib")
    except PackageNotFoundError:
        jaxlib_version = "unknown"
    return {"backend": jax.default_backend(), "jax": jax.__version__, "jaxlib": jaxlib_version}


def read_costs(path: Path) -> dict[str, Any]:
    """The whole costs file (``{"backends": {backend: record}}``); an empty one if absent."""
    if not path.is_file():
        return {"backends": {}}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not a costs file (not JSON: {err})") from None
    if not isinstance(data, dict) or not isinstance(data.get("backends"), dict):
        raise ValueError(f"{path}: not a costs file (no 'backends' object)")
    return data


def record_costs(path: Path, measured: Costs) -> None:
    """Replace this backend's record in `path` by `measured`; other backends' records stay."""
    missing = [
        name for name, metrics in measured.items() if not all(map(math.isfinite, metrics.values()))
    ]
    if missing:
        raise ValueError(f"bench --check --update: no cost analysis for {missing} on this backend")
    backends = read_costs(path)["backends"]
    env = environment()
    about = (
        "XLA cost analysis (compiled, never run) of the programs of xlstm_eqx.tools.cost_check; "
        "`xlstm-eqx bench --check` fails when one grows by more than 3%. Rewritten only by "
        "`xlstm-eqx bench --check --update`, in a commit that says why the costs changed."
    )
    data = {"about": about, "backends": backends}
    data["backends"][env["backend"]] = {
        "jax": env["jax"],
        "jaxlib": env["jaxlib"],
        "entries": {
            name: {metric: round(value) for metric, value in metrics.items()}
            for name, metrics in sorted(measured.items())
        },
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(str(path), data)


def run_cost_check(
    baseline: str | os.PathLike[str] | None = None,
    *,
    update: bool = False,
    names: Sequence[str] | None = None,
) -> int:
    """`xlstm-eqx bench --check [--update] [--baseline PATH]`: measure, then compare with (or,
    with `update`, record into) the baseline file; print the verdict; the exit code."""
    path = Path(baseline) if baseline is not None else default_costs_path()
    env = environment()
    measured = measure_costs(names)
    if update:
        record_costs(path, measured)
        print(f"bench --check: recorded {len(measured)} entries for {env['backend']} in {path}")
        return EXIT_OK
    record = read_costs(path)["backends"].get(env["backend"])
    if not isinstance(record, Mapping) or not record.get("entries"):
        print(
            f"bench --check: no committed costs for backend {env['backend']!r} in {path}; "
            "nothing compared (record them with bench --check --update on this backend)"
        )
        return EXIT_NO_BASELINE
    committed = {
        name: {metric: float(value) for metric, value in metrics.items()}
        for name, metrics in record["entries"].items()
    }
    report = compare_costs(committed, measured)
    versions = (
        f"committed with jax {record.get('jax')} / jaxlib {record.get('jaxlib')}, "
        f"measured with jax {env['jax']} / jaxlib {env['jaxlib']} on {env['backend']}"
    )
    print(f"# cost check against {path} ({versions})")
    for row in report.rows:
        print(f"  {row}")
    for note in report.notes:
        print(f"note: {note}")
    if report.failures:
        print(f"bench --check: {len(report.failures)} cost regressions ({versions}):")
        for failure in report.failures:
            print(f"FAIL {failure}")
        return EXIT_REGRESSION
    print(f"bench --check: ok, {len(report.rows)} costs within {TOLERANCE:.0%}")
    return EXIT_OK
