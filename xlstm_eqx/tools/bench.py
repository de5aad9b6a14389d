"""Benchmarks: the train step of the xLSTM LM against Llama (tokens/s, peak memory, MFU), and the
`xlstm-eqx bench [cell|train|generate|profile|all]` command that also runs the scripts in
`benchmarks/` (profile: `xlstm_eqx.tools.profile`) and, where the peers are installed
(benchmarks/peers/README.md), times ours beside them in the same run (`xlstm_eqx.tools.peers`:
the train step against xlstm-jax, generation against transformers; the cell script compares with
mlstm-kernels itself).

MFU = (model FLOPs per token, counted analytically by `train_flops_per_token`) x (tokens/s)
divided by the FLOP/s of a large float32 `jnp.dot` timed in the same process (`matmul_flops`).
"""

import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import jax.random as jr

from ..core.timing import median_seconds, peak_bytes
from ..models import MODEL_FAMILIES, train_flops_per_token
from ..training.optim import trainable_params
from .peers import (
    compare_generate,
    compare_train,
    load_peer,
    load_script,
    print_generate_comparison,
    print_train_comparison,
)
from .profile import print_profile, profile_train_step
from .train_setup import preset_model_config, train_step_setup


BENCHMARKS = ("cell", "train", "generate", "profile", "all", "gpu")


def matmul_flops(n: int = 2048, repeats: int = 5) -> float:
    """Measured FLOP/s of a float32 ``(n, n) @ (n, n)`` product (``2 n^3`` FLOPs), median of
    `repeats` after a warm-up call: the machine's practical matmul peak for MFU."""
    a = jr.normal(jr.key(1), (n, n), jnp.float32)
    b = jr.normal(jr.key(2), (n, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    return 2.0 * n**3 / median_seconds(lambda: dot(a, b), repeats, warmup=1)


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
    `xlstm_eqx.training.step.optimizer_and_step`) on random byte tokens
    ``(1, batch_size, seq_len+1)``.

    Models are the presets ``f"{size}_{model}"`` (``small_xlstm`` / ``small_llama``, 3.35M
    parameters each; ``tiny_*`` for tests), context raised to `seq_len` if needed. One row per
    model: median step time of `steps` timed steps after one warm-up (compile) step, tokens/s,
    XLA-planned peak bytes (an extra compile, if `memory`), FLOPs per token and MFU against
    `peak_flops` (measured with `matmul_flops(matmul_n)` in this process when not given).
    """
    _check_train_arguments(seq_len, batch_size, steps, models)
    if peak_flops is None:
        peak_flops = matmul_flops(matmul_n)
    rows = []
    for model_name in models:
        row = _bench_train_model(
            model_name, size, seq_len, batch_size, steps, memory=memory, peak_flops=peak_flops
        )
        rows.append(row)
        if verbose:
            print(f"# {model_name}: {row['step_ms']:.1f} ms/step", flush=True)
    base = rows[-1]["tokens_per_s"] if rows else 1.0
    for row in rows:
        row["vs_last"] = row["tokens_per_s"] / base
    return rows


def _check_train_arguments(
    seq_len: int, batch_size: int, steps: int, models: Sequence[str]
) -> None:
    """Positive integer sizes and known model families, or `ValueError` naming the first bad one."""
    for name, value in (("seq_len", seq_len), ("batch_size", batch_size), ("steps", steps)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"bench_train: {name} must be a positive integer, got {value!r}")
    for model_name in models:
        if model_name not in MODEL_FAMILIES:
            raise ValueError(
                f"bench_train: unknown model {model_name!r}; known: {sorted(MODEL_FAMILIES)}"
            )


def _bench_train_model(
    model_name: str,
    size: str,
    seq_len: int,
    batch_size: int,
    steps: int,
    *,
    memory: bool,
    peak_flops: float,
) -> dict[str, Any]:
    """One row of `bench_train`: compile, then time `steps` train steps of one model."""
    config, model, opt_state, step, inputs = train_step_setup(model_name, size, seq_len, batch_size)
    n_params = sum(x.size for x in jax.tree.leaves(trainable_params(model)))
    peak = None
    if memory:
        peak = peak_bytes(step.lower(inputs, model, opt_state).compile())
    start = time.perf_counter()
    model, opt_state, loss, _ = step(inputs, model, opt_state)
    jax.block_until_ready(loss)
    compile_s = time.perf_counter() - start

    def one_step() -> Any:
        nonlocal model, opt_state, loss
        model, opt_state, loss, _ = step(inputs, model, opt_state)
        return loss

    step_s = median_seconds(one_step, steps)
    tokens = batch_size * seq_len
    flops_tok = train_flops_per_token(config, seq_len)
    tps = tokens / step_s
    return {
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


# the `bench` command


def _load_script(name: str) -> Any:
    return load_script(name)


def peer_section(
    runner: str,
    what: str,
    compare: Callable[[Any], list[dict[str, Any]]],
    show: Callable[[list[dict[str, Any]], str | None], None],
) -> None:
    """One side-by-side table against a peer: its rows, or a one-line note where the peer is not
    importable or its side fails (our own tables are printed either way)."""
    peer, note = load_peer(runner, what)
    try:
        rows = compare(peer)
    except Exception as err:  # noqa: BLE001 - a failing peer must not end the whole run
        rows, reason = [], f"{type(err).__name__}: {err}".splitlines()[0][:160]
        note = f"# {what}: the side-by-side run failed ({reason}): its rows are skipped"
    show(rows, note)


def run_bench(
    which: str,
    quick: bool = False,
    *,
    seq_len: int | None = None,
    model: str = "xlstm",
    size: str = "small",
) -> int:
    """Run one benchmark (`cell`, `train`, `generate`, `profile`) or `all` (all four; the
    profile of the `model` train step), printing one table each, and for train and generate the
    side-by-side table against the peer where it is installed (`xlstm_eqx.tools.peers`).
    `quick` shrinks sizes and repeats (a smoke run, minutes on a CPU); `size` picks the
    train/profile/generate presets."""
    if which not in BENCHMARKS:
        raise ValueError(f"bench: unknown benchmark {which!r}; choose one of {BENCHMARKS}")
    names = ("cell", "train", "generate", "profile") if which == "all" else (which,)
    print(f"# jax {jax.__version__} on {jax.devices()[0].device_kind}", flush=True)
    for name in names:
        print(f"\n## {name}", flush=True)
        s = seq_len if seq_len is not None else (256 if quick else 2048)  # train and profile
        if name == "profile":
            profile = profile_train_step(model, size=size, seq_len=s, calls=2 if quick else 3)
            flops = train_flops_per_token(preset_model_config(model, size, s), s) * s
            print_profile(
                profile,
                title=f"{size}_{model} train step, B=1 S={s}: ",
                analytic_flops=flops,
            )
        elif name == "train":
            rows = bench_train(seq_len=s, steps=2 if quick else 5, size=size)
            print_train_table(rows)
            peak_flops = rows[0]["peak_tflops"] * 1e12
            calls = 2 if quick else 3
            peer_section(
                "xlstm_jax_train",
                "xlstm-jax",
                functools.partial(
                    compare_train, seq_len=s, size=size, peak_flops=peak_flops, calls=calls
                ),
                print_train_comparison,
            )
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
            peer_section(
                "hf_generate",
                "transformers' xLSTM",
                functools.partial(
                    compare_generate,
                    context=128 if quick else 1024,
                    new_tokens=8 if quick else 32,
                    size=size,
                    calls=2 if quick else 3,
                ),
                print_generate_comparison,
            )
    return 0
