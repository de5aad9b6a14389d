"""Time and memory of the three mLSTM forms, and of the `mlstm-kernels` JAX chunkwise form if installed.

    python benchmarks/cell.py [--seq-lens 256 1024 4096 16384] [--repeats 5] [--budget-gb 8]

Forward and forward+backward (gradient of a weighted sum with respect to all five inputs), median
of `--repeats` runs after one warm-up call, `block_until_ready`. Memory is the compiled program's
peak as XLA plans it (arguments + outputs + temporaries, from `Compiled.memory_analysis()`); a
configuration whose plan exceeds `--budget-gb` is skipped and reported as such. B=1, NH=4,
DHQK=DHV=64, float32 by default. On a GPU the Pallas kernels (`chunkwise_pallas`) get rows too.
The peer runs with a larger chunk where S would need more than `--peer-max-chunks` chunks (its
compile time grows with the chunk count); such rows say so. With the peer installed, a last table
times our chunkwise form and the peer's in alternation (`--rounds` rounds of `--repeats` calls each,
medians): the ratio to quote.
"""

import argparse
import functools
import sys
import time
import types
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

import xlstm_eqx as X
from xlstm_eqx.core import median_seconds
from xlstm_eqx.core.timing import peak_bytes
from xlstm_eqx.tools.peers import alternate


def _ours(chunk_size: int) -> dict[str, Callable]:
    forms = {
        "chunkwise": lambda *a: X.mlstm_chunkwise(*a, chunk_size=chunk_size)[0],
        "parallel": lambda q, k, v, i, f: X.parallel_stabilized_simple(q, k, v, i, f),
        "recurrent": lambda q, k, v, i, f: X.mlstm_recurrent(q, k, v, i, f)[0],
    }
    if jax.default_backend() == "gpu":  # elsewhere the kernels run interpreted: not a timing
        forms["chunkwise_pallas"] = lambda q, k, v, i, f: X.mlstm_chunkwise_pallas(
            q, k, v, i, f, chunk_size=chunk_size
        )[0]
    return forms


PEER = "mlstm-kernels chunkwise"


def _peer() -> Callable[[int], Callable] | None:
    """mlstm-kernels' pure-JAX chunkwise form, by chunk size (it imports Triton glue at import
    time: stub it), or None when the package is not installed."""
    try:
        sys.modules.setdefault("jax_triton", types.ModuleType("jax_triton"))
        from mlstm_kernels.jax.chunkwise.native import mlstm_chunkwise__native_autograd
    except Exception as err:  # noqa: BLE001 - any import failure means "peer not available"
        print(f"# mlstm-kernels not available ({type(err).__name__}: {err}); peer rows skipped")
        return None

    def with_chunk(chunk_size: int) -> Callable:
        def peer(q, k, v, i, f):
            return mlstm_chunkwise__native_autograd(q, k, v, i, f, chunk_size=chunk_size)

        return peer

    return with_chunk


def peer_chunk_size(seq_len: int, chunk_size: int, max_chunks: int) -> int:
    """The peer's chunk size at `seq_len`: `chunk_size`, doubled until there are at most
    `max_chunks` chunks. Its chunk loop is a Python loop, unrolled into the program: at S=16384
    with chunk 64 (256 chunks) its forward+backward compile ran for over 10 minutes here."""
    size = chunk_size
    while -(-seq_len // size) > max_chunks:
        size *= 2
    return size


def _inputs(seq_len: int, dtype) -> tuple[jax.Array, ...]:
    rng = np.random.default_rng(0)
    q, k = rng.standard_normal((2, 1, 4, seq_len, 64))
    v = rng.standard_normal((1, 4, seq_len, 64))
    igate = rng.uniform(-5, 5, (1, 4, seq_len))
    fgate = rng.uniform(-2, 8, (1, 4, seq_len))
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v, igate, fgate))


def _compile(fn: Callable, backward: bool, args):
    if backward:
        weights = jnp.ones(args[2].shape, args[2].dtype)

        def loss(*a):
            return jnp.sum(fn(*a) * weights)

        target = jax.grad(loss, argnums=(0, 1, 2, 3, 4))
    else:
        target = fn
    return jax.jit(target).lower(*args).compile()


def _time(compiled, args, repeats: int) -> float:
    return median_seconds(lambda: compiled(*args), repeats, warmup=1)


def run(
    seq_lens,
    repeats: int,
    budget_gb: float,
    chunk_size: int,
    dtype,
    peer_max_chunks: int = 64,
    rounds: int = 3,
) -> list[dict]:
    peer = _peer()
    rows, side_by_side = [], []
    for seq_len in seq_lens:
        args = _inputs(seq_len, dtype)
        forms, notes = {}, {}
        if peer is not None:  # peer first: ratios print as we go
            size = peer_chunk_size(seq_len, chunk_size, peer_max_chunks)
            forms[PEER] = peer(size)
            if size != chunk_size:
                notes[PEER] = f"(chunk {size}: <= {peer_max_chunks} chunks, see --peer-max-chunks)"
        forms.update(_ours(chunk_size))
        programs = {}
        for name, fn in forms.items():
            for backward in (False, True):
                row = {"S": seq_len, "form": name, "pass": "fwd+bwd" if backward else "fwd"}
                start = time.perf_counter()
                compiled = programs[name, backward] = _compile(fn, backward, args)
                row["compile_s"] = time.perf_counter() - start
                peak = peak_bytes(compiled)
                row["peak_mb"] = None if peak is None else peak / 2**20
                if peak is not None and peak > budget_gb * 2**30:
                    row["ms"] = None
                    row["note"] = f"skipped: needs {peak / 2**30:.1f} GiB > {budget_gb} GiB"
                else:
                    row["ms"] = 1e3 * _time(compiled, args, repeats)
                    row["note"] = notes.get(name, "")
                rows.append(row)
                _print_row(row, rows)
        if peer is not None:
            side_by_side += _alternated(programs, args, seq_len, repeats, rounds)
    _print_side_by_side(side_by_side, rounds)
    return rows


def _alternated(programs: dict, args, seq_len: int, repeats: int, rounds: int) -> list[dict]:
    """Our chunkwise form and the peer's, both passes, timed in alternation (ours, peer, ours,
    ...: `rounds` rounds of `repeats` calls each), so a machine that slows down mid-run slows
    both sides alike."""
    out = []
    for backward in (False, True):
        ours, theirs = programs["chunkwise", backward], programs[PEER, backward]
        timing = alternate(
            functools.partial(ours, *args),
            functools.partial(theirs, *args),
            rounds=rounds,
            calls=repeats,
        )
        out.append(
            {
                "S": seq_len,
                "pass": "fwd+bwd" if backward else "fwd",
                "ours_ms": 1e3 * timing.ours_s,
                "peer_ms": 1e3 * timing.peer_s,
                "ratio": timing.ratio,
            }
        )
    return out


def _print_side_by_side(rows: list[dict], rounds: int) -> None:
    if not rows:
        return
    print(
        f"\n# chunkwise vs {PEER}, alternated: {rounds} rounds, medians (ratio > 1: we are faster)"
    )
    print(f"{'S':>6} {'pass':<8} {'ours ms':>10} {'peer ms':>10} {'ratio':>7}")
    for row in rows:
        print(
            f"{row['S']:>6} {row['pass']:<8} {row['ours_ms']:>10.2f} {row['peer_ms']:>10.2f} "
            f"{row['ratio']:>6.2f}x",
            flush=True,
        )


def _print_row(row: dict, rows: list[dict]) -> None:
    if len(rows) == 1:
        print(
            f"{'S':>6} {'form':<24} {'pass':<8} {'ms':>10} {'tok/s':>11} {'peak MiB':>9} "
            f"{'vs peer':>8} {'compile s':>9}"
        )
    ms = "-" if row["ms"] is None else f"{row['ms']:.2f}"
    tps = "-" if row["ms"] is None else f"{row['S'] / (row['ms'] / 1e3):,.0f}"
    peak = "-" if row["peak_mb"] is None else f"{row['peak_mb']:.1f}"
    peer = next(
        (
            r
            for r in rows
            if r["S"] == row["S"]
            and r["pass"] == row["pass"]
            and r["form"].startswith("mlstm-kernels")
        ),
        None,
    )
    ratio = ""
    if (
        peer is not None
        and peer["ms"]
        and row["ms"]
        and not row["form"].startswith("mlstm-kernels")
    ):
        ratio = f"{peer['ms'] / row['ms']:.2f}x"
    print(
        f"{row['S']:>6} {row['form']:<24} {row['pass']:<8} {ms:>10} {tps:>11} {peak:>9} "
        f"{ratio:>8} {row.get('compile_s', 0.0):>9.1f} {row['note']}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[256, 1024, 4096, 16384])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--budget-gb", type=float, default=8.0)
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument(
        "--peer-max-chunks",
        type=int,
        default=64,
        help="larger S runs the peer with a larger chunk (its compile time grows with chunks)",
    )
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument(
        "--rounds", type=int, default=3, help="alternated rounds of ours vs the peer's chunkwise"
    )
    args = parser.parse_args()
    print(
        f"# jax {jax.__version__} on {jax.devices()[0].device_kind}; B=1 NH=4 DHQK=DHV=64 {args.dtype}"
    )
    run(
        args.seq_lens,
        args.repeats,
        args.budget_gb,
        args.chunk_size,
        jnp.dtype(args.dtype),
        args.peer_max_chunks,
        args.rounds,
    )
    print("# 'vs peer' = mlstm-kernels time / our time for the same S and pass (>1: we are faster)")


if __name__ == "__main__":
    main()
