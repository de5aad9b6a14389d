"""Benchmarks: the train step of the xLSTM LM against Llama (tokens/s, peak memory, MFU), and the
`xlstm-eqx bench [cell|train|generate|profile|all]` command that also runs the scripts in
`benchmarks/` (profile: `xlstm_eqx._profile`).

MFU = (model FLOPs per token, counted analytically by `train_flops_per_token`) x (tokens/s)
divided by the FLOP/s of a large float32 `jnp.dot` timed in the same process (`matmul_flops`).
"""

import argparse
import dataclasses
import importlib.util
import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

from ._presets import get_preset


__all__ = [
    "add_bench_arguments",
    "bench_train",
    "matmul_flops",
    "matmul_param_count",
    "median_seconds",
    "print_train_table",
    "run_bench",
    "run_bench_command",
    "train_flops_per_token",
    "train_step_setup",
]

BENCHMARKS = ("cell", "train", "generate", "profile", "all")


# ----------------------------------------------------------------------------------------------
# FLOP counting


def _family(config: Any) -> str:
    return "llama" if type(config).__name__ == "LlamaConfig" else "xlstm"


def matmul_param_count(config: Any) -> int:
    """Parameters that take part in a matrix product per token: every array whose field name ends
    in `kernel` (dense, headwise, gate, conv and LM-head kernels, stacked or not), plus the
    embedding table when it doubles as the LM head (`tie_weights`). The embedding lookup itself
    is a gather and is not counted. Counted on `eqx.filter_eval_shape` (no memory, no compute)."""
    from ._train import MODEL_FAMILIES

    model = eqx.filter_eval_shape(MODEL_FAMILIES[_family(config)].build, config, key=jr.key(0))
    total = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(model)[0]:
        if not hasattr(leaf, "shape") or len(leaf.shape) < 2:
            continue
        names = [p.name for p in path if isinstance(p, jax.tree_util.GetAttrKey)]
        if names and names[-1].endswith("kernel"):
            total += int(np.prod(leaf.shape))
    if getattr(config, "tie_weights", False):
        total += config.vocab_size * config.embedding_dim
    return total


def _mlstm_dims(config: Any) -> tuple[int, int, int]:
    """(NH, DHQK, DHV) of the xLSTM model's mLSTM layers."""
    from ._mlstm import _layer_dims, _v1_dims

    layer = config.mlstm_block.mlstm
    if layer.layer_type == "mlstm_v1":
        qk_dim, v_dim = _v1_dims(layer)
    else:
        _, qk_dim, v_dim, _ = _layer_dims(layer)
    nh = layer.num_heads
    return nh, qk_dim // nh, v_dim // nh


def train_flops_per_token(config: Any, seq_len: int) -> float:
    """Model FLOPs of one training token (forward + backward = 3x forward), counted analytically.

    Dense part (both families): ``6 * N`` with ``N = matmul_param_count(config)`` (2 FLOPs per
    multiply-add, x3 for forward + backward).

    Sequence mixing, per mixing layer (x3 for training), counting what is computed (masked
    entries of causal matrices included, since they are computed):
    - Llama (dense XLA attention, full S x S scores): ``12 * S * NH * head_dim`` per token
      (QK^T ``2 S D_att`` + AV ``2 S D_att``, forward).
    - mLSTM (NH heads, DHQK, DHV per head), per head per token, forward:
      ``2 * L * (DHQK + DHV)`` for the L x L within-chunk (or S x S) score and value products,
      plus ``4 * DHQK * DHV + 4 * DHQK`` for the state (chunk k^T v and k sums into C, n;
      q C and q n reads). ``L = min(chunk_size, S)`` for "chunkwise"/"chunkwise_pallas"/"auto";
      ``L = S`` and no state term for "parallel_stabilized"; ``L = 0`` for "recurrent".
      Times 3 * NH * (number of mLSTM blocks).
    sLSTM blocks count only through their kernels (the dense part). Norms, gates' elementwise
    math, softmax and the loss are not counted (the usual MFU convention).
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be a positive integer, got {seq_len}")
    dense = 6.0 * matmul_param_count(config)
    if _family(config) == "llama":
        nh = config.embedding_dim // config.head_dim
        mix = config.num_blocks * 12.0 * seq_len * nh * config.head_dim
        return dense + mix
    nh, dqk, dv = _mlstm_dims(config)
    backend = config.mlstm_block.mlstm.mlstm_cell.backend
    name = backend.name
    if name in ("chunkwise", "chunkwise_pallas", "auto"):
        window = min(int(backend.kwargs.get("chunk_size", 64)), seq_len)
        state = 4.0 * dqk * dv + 4.0 * dqk
    elif name == "parallel_stabilized":
        window, state = seq_len, 0.0
    elif name == "recurrent":
        window, state = 0, 4.0 * dqk * dv + 4.0 * dqk
    else:
        raise ValueError(f"train_flops_per_token: unknown mLSTM backend {name!r}")
    num_mlstm = config.num_blocks - len(config.slstm_at or [])
    mix = num_mlstm * 3.0 * nh * (2.0 * window * (dqk + dv) + state)
    return dense + mix


# ----------------------------------------------------------------------------------------------
# timing


def median_seconds(fn: Callable[[], Any], repeats: int, *, warmup: int = 0) -> float:
    """Median wall seconds of `repeats` calls of ``fn()``, each timed until its result is ready
    (`jax.block_until_ready`), after `warmup` untimed calls (compilation)."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_flops(n: int = 2048, repeats: int = 5) -> float:
    """Measured FLOP/s of a float32 ``(n, n) @ (n, n)`` product (``2 n^3`` FLOPs), median of
    `repeats` after a warm-up call: the machine's practical matmul peak for MFU."""
    a = jr.normal(jr.key(1), (n, n), jnp.float32)
    b = jr.normal(jr.key(2), (n, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    return 2.0 * n**3 / median_seconds(lambda: dot(a, b), repeats, warmup=1)


def _peak_bytes(compiled: Any) -> int | None:
    compiled = getattr(compiled, "compiled", compiled)  # eqx.filter_jit wraps jax's Compiled
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return None
    if m is None:
        return None
    return (
        m.temp_size_in_bytes
        + m.argument_size_in_bytes
        + m.output_size_in_bytes
        - m.alias_size_in_bytes
    )


def _train_config(model: str, size: str, seq_len: int) -> Any:
    config = get_preset(f"{size}_{model}")
    if config.context_length < seq_len:
        config = dataclasses.replace(config, context_length=seq_len)
    return config


def train_step_setup(model_name: str, size: str, seq_len: int, batch_size: int) -> tuple[Any, ...]:
    """The trainer's own jitted step (`xlstm_eqx._train._optimizer_and_step`) for the preset
    ``f"{size}_{model_name}"`` (context raised to `seq_len` if needed) with its model, optimizer
    state and inputs: random tokens ``(1, batch_size, seq_len+1)`` and a key.
    Returns ``(config, model, opt_state, step, inputs)``; ``step(inputs, model, opt_state)``."""
    from ._train import MODEL_FAMILIES, TrainConfig, _optimizer_and_step, trainable_params

    if model_name not in MODEL_FAMILIES:
        raise ValueError(f"unknown model {model_name!r}; known: {sorted(MODEL_FAMILIES)}")
    family = MODEL_FAMILIES[model_name]
    config = _train_config(model_name, size, seq_len)
    model = family.build(config, key=jr.key(0))
    cfg = TrainConfig(model=model_name, seq_len=seq_len, batch_size=batch_size, steps=1000)
    optimizer, step = _optimizer_and_step(cfg, model, config, family)
    opt_state = optimizer.init(trainable_params(model))
    batch = jr.randint(jr.key(1), (1, batch_size, seq_len + 1), 0, config.vocab_size, jnp.int32)
    return config, model, opt_state, step, (batch, jr.key(2))


def bench_train(
    seq_len: int = 2048,
    batch_size: int = 1,
    steps: int = 5,
    models: Sequence[str] = ("xlstm", "llama"),
    *,
    size: str = "small",
    memory: bool = True,
    peak_flops: float | None = None,
    matmul_n: int = 2048,
    verbose: bool = False,
) -> list[dict[str, Any]]:
    """Time the trainer's own jitted train step (forward + backward + grad clip + AdamW,
    `xlstm_eqx._train._optimizer_and_step`) on random byte tokens ``(1, batch_size, seq_len+1)``.

    Models are the presets ``f"{size}_{model}"`` (``small_xlstm`` / ``small_llama``, 3.35M
    parameters each; ``tiny_*`` for tests), context raised to `seq_len` if needed. One row per
    model: median step time of `steps` timed steps after one warm-up (compile) step, tokens/s,
    XLA-planned peak bytes (an extra compile, if `memory`), FLOPs per token and MFU against
    `peak_flops` (measured with `matmul_flops(matmul_n)` in this process when not given).
    """
    from ._train import MODEL_FAMILIES, trainable_params

    for name, value in (("seq_len", seq_len), ("batch_size", batch_size), ("steps", steps)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"bench_train: {name} must be a positive integer, got {value!r}")
    for model_name in models:
        if model_name not in MODEL_FAMILIES:
            raise ValueError(
                f"bench_train: unknown model {model_name!r}; known: {sorted(MODEL_FAMILIES)}"
            )
    if peak_flops is None:
        peak_flops = matmul_flops(matmul_n)
    rows = []
    for model_name in models:
        config, model, opt_state, step, inputs = train_step_setup(
            model_name, size, seq_len, batch_size
        )
        n_params = sum(x.size for x in jax.tree.leaves(trainable_params(model)))
        peak = None
        if memory:
            peak = _peak_bytes(step.lower(inputs, model, opt_state).compile())
        start = time.perf_counter()
        model, opt_state, loss, _ = step(inputs, model, opt_state)
        jax.block_until_ready(loss)
        compile_s = time.perf_counter() - start

        def one_step() -> Any:
            nonlocal model, opt_state, loss
            model, opt_state, loss, _ = step(inputs, model, opt_state)  # noqa: B023 - called here
            return loss

        step_s = median_seconds(one_step, steps)
        tokens = batch_size * seq_len
        flops_tok = train_flops_per_token(config, seq_len)
        tps = tokens / step_s
        row = {
            "model": model_name,
            "preset": f"{size}_{model_name}",
            "params": int(n_params),
            "seq_len": seq_len,
            "batch_size": batch_size,
            "step_ms": 1e3 * step_s,
            "compile_s": compile_s,
            "tokens_per_s": tps,
            "peak_mb": None if peak is None else peak / 2**20,
            "flops_per_token": flops_tok,
            "model_tflops": flops_tok * tps / 1e12,
            "peak_tflops": peak_flops / 1e12,
            "mfu": flops_tok * tps / peak_flops,
            "loss": float(loss),
        }
        rows.append(row)
        if verbose:
            print(f"# {model_name}: {row['step_ms']:.1f} ms/step", flush=True)
    base = rows[-1]["tokens_per_s"] if rows else 1.0
    for row in rows:
        row["vs_last"] = row["tokens_per_s"] / base
    return rows


def print_train_table(rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    r0 = rows[0]
    print(
        f"# train step (fwd+bwd+AdamW), B={r0['batch_size']} S={r0['seq_len']}, float32; "
        f"measured matmul peak {r0['peak_tflops'] * 1e3:.1f} GFLOP/s"
    )
    vs = "vs " + rows[-1]["model"]
    print(
        f"{'model':<8} {'params':>10} {'ms/step':>10} {'tok/s':>10} {'peak MiB':>9} "
        f"{'MFLOP/tok':>10} {'GFLOP/s':>9} {'MFU':>7} {vs:>9}"
    )
    for r in rows:
        peak = "-" if r["peak_mb"] is None else f"{r['peak_mb']:.1f}"
        print(
            f"{r['model']:<8} {r['params']:>10,} {r['step_ms']:>10.1f} {r['tokens_per_s']:>10,.0f} "
            f"{peak:>9} {r['flops_per_token'] / 1e6:>10.2f} {r['model_tflops'] * 1e3:>9.2f} "
            f"{r['mfu']:>7.1%} {r['vs_last']:>8.2f}x",
            flush=True,
        )


# ----------------------------------------------------------------------------------------------
# the `bench` command


def _repo_root() -> Path:
    env = os.environ.get("XLSTM_EQX_REPO")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent


def _load_script(name: str) -> Any:
    path = _repo_root() / "benchmarks" / f"{name}.py"
    if not path.is_file():
        raise FileNotFoundError(
            f"bench {name}: benchmark script {path} not found; the cell and generate benchmarks "
            "run from a repository checkout (set XLSTM_EQX_REPO to its root)"
        )
    spec = importlib.util.spec_from_file_location(f"_xlstm_eqx_bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def run_bench(
    which: str,
    quick: bool = False,
    *,
    seq_len: int | None = None,
    model: str = "xlstm",
    size: str = "small",
) -> int:
    """Run one benchmark (`cell`, `train`, `generate`, `profile`) or `all` (all four; the
    profile of the `model` train step), printing one table each. `quick` shrinks sizes and
    repeats (a smoke run, minutes on a CPU); `size` picks the train/profile presets."""
    if which not in BENCHMARKS:
        raise ValueError(f"bench: unknown benchmark {which!r}; choose one of {BENCHMARKS}")
    names = ("cell", "train", "generate", "profile") if which == "all" else (which,)
    print(f"# jax {jax.__version__} on {jax.devices()[0].device_kind}", flush=True)
    for name in names:
        print(f"\n## {name}", flush=True)
        s = seq_len if seq_len is not None else (256 if quick else 2048)  # train and profile
        if name == "profile":
            from ._profile import print_profile, profile_train_step

            profile = profile_train_step(model, size=size, seq_len=s, calls=2 if quick else 3)
            flops = train_flops_per_token(_train_config(model, size, s), s) * s
            print_profile(
                profile,
                title=f"{size}_{model} train step, B=1 S={s}: ",
                analytic_flops=flops,
            )
        elif name == "train":
            rows = bench_train(seq_len=s, steps=2 if quick else 5, size=size)
            print_train_table(rows)
        elif name == "cell":
            module = _load_script("cell")
            seq_lens = [256, 1024] if quick else [256, 1024, 4096, 16384]
            if seq_len is not None:
                seq_lens = [seq_len]
            module.run(seq_lens, 2 if quick else 5, 8.0, 64, jnp.dtype("float32"))
        else:
            module = _load_script("generate")
            argv = ["--contexts", "128", "512"] if quick else []
            if quick:
                argv += ["--new-tokens", "8", "--repeats", "2"]
            module.main(argv)
    return 0


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "which", nargs="?", default="all", choices=BENCHMARKS, help="benchmark to run"
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    parser.add_argument(
        "--seq-len", type=int, default=None, help="train/cell/profile sequence length override"
    )
    parser.add_argument(
        "--model",
        default="xlstm",
        choices=("xlstm", "llama"),
        help="the model whose train step `profile` traces",
    )
    parser.add_argument(
        "--size",
        default="small",
        choices=("tiny", "small"),
        help="presets for train/profile: {size}_xlstm and {size}_llama",
    )


def run_bench_command(args: argparse.Namespace) -> int:
    return run_bench(args.which, args.quick, seq_len=args.seq_len, model=args.model, size=args.size)
