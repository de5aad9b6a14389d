"""Longest trainable context of the mLSTM cell at a fixed memory budget, per remat policy.

    python benchmarks/remat.py [--budget-gib 2] [--heads 4] [--head-dim 64] [--chunk-size 64]
                               [--policies none full chunk_states pallas] [--time-at 4096]

For each policy the forward+backward program (gradient of a weighted sum of h with respect to q, k,
v and both gates) is compiled, not run, for growing S, and XLA's plan read from
`Compiled.memory_analysis()`: temporaries, and the total of arguments + outputs + temporaries
(- aliased). S doubles from `--granularity` until the plan exceeds the budget, then is bisected to a
multiple of `--granularity`; both criteria are searched. Then forward+backward is timed at
S = `--time-at` (median of `--repeats` after a warm-up) to show what each policy costs in time.
B=1, float32.

Policies: `none`, `full`, `chunk_states` are `mlstm_chunkwise_remat(remat=...)` (pure JAX);
`pallas` is `mlstm_chunkwise_pallas` (residuals: inputs + chunk states). Off GPU the Pallas kernels
run in interpret mode, whose plan and time say little about the GPU kernels.
"""

import argparse
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from xlstm_eqx.cell import mlstm_chunkwise_pallas, mlstm_chunkwise_remat
from xlstm_eqx.core import median_seconds


def _cell(policy: str, chunk_size: int) -> Callable:
    if policy == "pallas":
        return lambda *a: mlstm_chunkwise_pallas(*a, chunk_size=chunk_size)[0]
    return lambda *a: mlstm_chunkwise_remat(*a, chunk_size=chunk_size, remat=policy)[0]


def _train_fn(policy: str, chunk_size: int) -> Callable:
    cell = _cell(policy, chunk_size)

    def loss(q, k, v, i, f, w):
        return jnp.sum(cell(q, k, v, i, f) * w)

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))


def _specs(seq_len: int, heads: int, head_dim: int) -> list[jax.ShapeDtypeStruct]:
    token = jax.ShapeDtypeStruct((1, heads, seq_len, head_dim), jnp.float32)
    gate = jax.ShapeDtypeStruct((1, heads, seq_len), jnp.float32)
    return [token, token, token, gate, gate, token]


class _Planner:
    """Planned (total, temporary) bytes of the forward+backward program per (policy, S), cached."""

    def __init__(self, args):
        self.args = args
        self.plans: dict[tuple[str, int], tuple[int, int]] = {}

    def __call__(self, policy: str, seq_len: int) -> tuple[int, int]:
        key = (policy, seq_len)
        if key not in self.plans:
            args = self.args
            lowered = _train_fn(policy, args.chunk_size).lower(
                *_specs(seq_len, args.heads, args.head_dim)
            )
            analysis = lowered.compile().memory_analysis()
            total = (
                analysis.temp_size_in_bytes
                + analysis.argument_size_in_bytes
                + analysis.output_size_in_bytes
                - analysis.alias_size_in_bytes
            )
            self.plans[key] = (total, analysis.temp_size_in_bytes)
        return self.plans[key]


def longest_context(plan: _Planner, policy: str, which: int) -> int:
    """Largest S (multiple of the granularity) whose plan (0: total, 1: temporaries) fits."""
    args = plan.args
    budget = args.budget_gib * 2**30
    step = args.granularity
    fits, seq_len = 0, step
    while seq_len <= args.max_seq_len:  # doubling
        if plan(policy, seq_len)[which] > budget:
            break
        fits, seq_len = seq_len, 2 * seq_len
    else:
        return fits
    low, high = fits, seq_len  # low fits (or is 0), high does not
    while high - low > step:
        mid = (low + high) // 2 // step * step
        if plan(policy, mid)[which] > budget:
            high = mid
        else:
            low = mid
    return low


def time_train_step(policy: str, seq_len: int, args) -> float:
    rng = np.random.default_rng(0)
    inputs = [
        jnp.asarray(rng.standard_normal(s.shape), jnp.float32)
        for s in _specs(seq_len, args.heads, args.head_dim)
    ]
    inputs[4] = inputs[4] + 3.0  # forget gates mostly open
    compiled = _train_fn(policy, args.chunk_size).lower(*inputs).compile()
    return median_seconds(lambda: compiled(*inputs), args.repeats, warmup=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-gib", type=float, default=2.0)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--granularity", type=int, default=1024)
    parser.add_argument("--max-seq-len", type=int, default=2**22)
    parser.add_argument("--policies", nargs="+", default=["none", "full", "chunk_states", "pallas"])
    parser.add_argument("--time-at", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(
        f"# jax {jax.__version__} on {jax.devices()[0].device_kind}; mLSTM cell fwd+bwd, B=1 "
        f"NH={args.heads} DHQK=DHV={args.head_dim} chunk={args.chunk_size} float32; budget "
        f"{args.budget_gib} GiB of XLA-planned memory"
    )
    print(
        f"{'policy':<14} {'max S (temp)':>12} {'max S (total)':>13} {'temp KiB/tok':>12} "
        f"{'total KiB/tok':>13} {'ms @ S=' + str(args.time_at):>12} {'tok/s':>9}"
    )
    plan = _Planner(args)
    for policy in args.policies:
        by_temp = longest_context(plan, policy, 1)
        by_total = longest_context(plan, policy, 0)
        total, temp = plan(policy, by_total) if by_total else (0, 0)
        per_token = (total / by_total / 2**10, temp / by_total / 2**10) if by_total else (0, 0)
        seconds = time_train_step(policy, args.time_at, args)
        print(
            f"{policy:<14} {by_temp:>12} {by_total:>13} {per_token[1]:>12.1f} {per_token[0]:>13.1f} "
            f"{1e3 * seconds:>12.1f} {args.time_at / seconds:>9,.0f}",
            flush=True,
        )
    print(
        "# max S: longest context whose planned temporaries (temp) or arguments + outputs +"
        " temporaries (total) fit the budget; KiB/tok at the 'total' S"
    )
    if "pallas" in args.policies and jax.default_backend() != "gpu":
        print("# pallas ran in interpret mode (no GPU): its plan and time are not the GPU kernel's")


if __name__ == "__main__":
    main()
