"""Context parallelism on 8 simulated CPU devices: XLA's memory plan of the train step per cp.

    python benchmarks/context_parallel.py [--seq-lens 8192 16384 32768 65536] [--cps 1 2 4 8]
                                          [--budget-mib 1024] [--out FILE]

The trainer's step (`make_train_step` on a mesh ``cp=N``: N devices, batch 1, the sequence split
over them) of a small xLSTM ("mlstm" layers: causal conv and mLSTM cell, chunkwise form, chunk
64, float32) is compiled, never run, for each S and cp, and read three ways:

1. `Compiled.memory_analysis()` per device: temporaries and arguments, in MiB.
2. The largest S (a multiple of 1024 · cp) whose planned temporaries fit ``--budget-mib`` per
   device (default 1 GiB), predicted from the table's line and confirmed by compiling it: it
   should grow about linearly with cp.
3. The bytes the step exchanges (the operands of every collective in the compiled HLO, per
   device): the state combine (all-gather of segment states, its transpose reduce-scatter in the
   backward, the conv halo's collective-permute) apart from the gradient all-reduce, against the
   temporaries cp saves relative to cp=1 at the same S.

Also printed: `xlstm-eqx info`'s estimate (`parallel.memory.activation_report`) beside XLA's plan
at cp=1, to show how far the traced-residual estimate is from what XLA keeps.
"""

import os


# 8 devices; XLA's fast-compile settings halve the compile time (~40 s a step on the loaded 2-core
# machine) and leave the memory plan as it is (cp=1, S=8192 / 16384: 848.2 / 1697.6 MiB of
# temporaries either way).
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
).strip()

import argparse  # noqa: E402 - XLA_FLAGS must be set before jax is imported
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jax.random as jr  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from xlstm_eqx.parallel.memory import (  # noqa: E402
    activation_model,
    activation_report,
    decode_state_bytes,
)
from xlstm_eqx.tools.gpu_check.context import context_config  # noqa: E402
from xlstm_eqx.training.optim import trainable_params  # noqa: E402
from xlstm_eqx.training.step import make_train_step_for, mesh_layout  # noqa: E402
from xlstm_eqx.xlstm import xLSTMLMModel  # noqa: E402
from xlstm_eqx.xlstm.config import xLSTMLMModelConfig  # noqa: E402


MIB = 2**20


def _abstract(tree: Any, shardings: Any) -> Any:
    """``tree``'s arrays as ShapeDtypeStructs carrying ``shardings`` (nothing allocated)."""

    def leaf(x: Any, sh: Any) -> Any:
        if not eqx.is_array_like(x) or not hasattr(x, "shape"):
            return x
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh)

    return jax.tree.map(leaf, tree, shardings, is_leaf=lambda x: x is None)


def compile_step(config: xLSTMLMModelConfig, cp: int, seq_len: int) -> Any:
    """The train step on a ``cp``-device mesh (dp=1) for one sequence of ``seq_len`` tokens,
    compiled from shapes alone."""
    optimizer = optax.adamw(1e-3)
    skeleton = eqx.filter_eval_shape(xLSTMLMModel, config, key=jr.key(0))
    spec = f"dp=1,cp={cp}" if cp > 1 else "dp=1"
    layout = mesh_layout(spec, skeleton, optimizer, devices=jax.devices()[:cp])
    step = make_train_step_for(layout, optimizer)
    with jax.numpy_dtype_promotion("standard"):
        opt_shapes = jax.eval_shape(optimizer.init, trainable_params(skeleton))
    model = _abstract(skeleton, layout.model_shardings)
    opt_state = _abstract(opt_shapes, layout.opt_shardings)
    batch = jax.ShapeDtypeStruct((1, 1, seq_len + 1), jnp.int32, sharding=step.batch_sharding)
    key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=NamedSharding(layout.mesh, P()))
    arrays, static = eqx.partition(model, lambda x: isinstance(x, jax.ShapeDtypeStruct))

    def run(inputs: Any, arrays: Any, opt_state: Any) -> Any:  # jax.jit reads the shardings
        return step.core(inputs, eqx.combine(arrays, static), opt_state)

    return jax.jit(run).lower((batch, key), arrays, opt_state).compile()


class Planner:
    """`compile_step` per (cp, S), cached (``cache``)."""

    def __init__(self, config: xLSTMLMModelConfig):
        self.config = config
        self.cache: dict[tuple[int, int], Any] = {}

    def __call__(self, cp: int, seq_len: int) -> Any:
        if (cp, seq_len) not in self.cache:
            self.cache[cp, seq_len] = compile_step(self.config, cp, seq_len)
        return self.cache[cp, seq_len]


_COLLECTIVE = re.compile(
    r"\s(all-gather|all-reduce|reduce-scatter|collective-permute|all-to-all)(?:-start)?\("
)
_ARRAY = re.compile(r"([a-z]+[0-9]*)\[([0-9,]*)\]")
_BYTES = {"f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "pred": 1, "s8": 1, "u8": 1}


def collective_bytes(hlo_text: str) -> dict[str, int]:
    """Bytes per device of each collective kind in a compiled HLO module: the size of each
    collective's result (for an all-gather the gathered array, for a reduce-scatter its shard)."""
    out: dict[str, int] = {}
    for line in hlo_text.splitlines():
        m = _COLLECTIVE.search(line)
        if not m or "=" not in line[: m.start()]:
            continue
        size = 0  # the result type(s): between '=' and the op (a tuple for combined ops)
        for dtype, dims in _ARRAY.findall(line[line.index("=") + 1 : m.start()]):
            n = 1
            for d in dims.split(","):
                n *= int(d) if d else 1
            size += n * _BYTES.get(dtype, 4)
        out[m.group(1)] = out.get(m.group(1), 0) + size
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[8192, 16384, 32768, 65536])
    parser.add_argument("--cps", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--budget-mib", type=float, default=1024.0)
    parser.add_argument("--out", help="also write the printed table here")
    args = parser.parse_args()
    lines: list[str] = []

    def say(text: str) -> None:
        print(text, flush=True)
        lines.append(text)

    config = context_config(2**22, embedding_dim=128, num_blocks=1)
    started = time.perf_counter()
    say(
        f"# jax {jax.__version__}, {jax.device_count()} simulated CPU devices; train step of a "
        "1-block 'mlstm' xLSTM (D=128, 4 heads, chunkwise chunk 64, float32, vocab 256), batch 1, "
        "AdamW; compiled, never run. Per device, MiB."
    )
    plan = Planner(config)

    say(f"{'S':>7} {'cp':>3} {'temp MiB':>10} {'args MiB':>10} {'temp x cp / temp(cp=1)':>23}")
    for seq_len in args.seq_lens:
        base = None
        for cp in args.cps:
            m = plan(cp, seq_len).memory_analysis()
            base = m.temp_size_in_bytes if cp == 1 else base
            ratio = f"{m.temp_size_in_bytes * cp / base:23.2f}" if base else f"{'':>23}"
            say(
                f"{seq_len:>7} {cp:>3} {m.temp_size_in_bytes / MIB:>10.1f} "
                f"{m.argument_size_in_bytes / MIB:>10.1f} {ratio}"
            )
    say("")
    _largest(args, plan, say)
    say("")
    _exchange(args, config, plan, say)
    say(f"# {time.perf_counter() - started:.0f} s")
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            f.write("\n".join(lines) + "\n")
        os.replace(tmp, args.out)


def _largest(args: argparse.Namespace, plan: Any, say: Any) -> None:
    """Per cp: the planned temporaries are linear in S (the table's two longest S give the
    line), so the line predicts the largest S (a multiple of 1024 cp); one compile confirms that
    it fits (0 if not; the table shows the line is exact)."""
    budget = args.budget_mib * MIB
    say(f"largest S whose planned temporaries fit {args.budget_mib:g} MiB per device:")
    say(f"{'cp':>3} {'max S':>9} {'/ max S(cp=1)':>14} {'compiles to confirm':>20}")
    first = None
    s1, s2 = sorted(args.seq_lens)[-2:]
    for cp in args.cps:
        step = 1024 * cp

        def temp(seq_len: int, cp: int = cp) -> int:
            return plan(cp, seq_len).memory_analysis().temp_size_in_bytes

        slope = (temp(s2) - temp(s1)) / (s2 - s1)
        guess = max(int((budget - (temp(s1) - slope * s1)) / slope) // step * step, step)
        before = len(plan.cache)
        best = guess if temp(guess) <= budget else 0
        first = best if first is None else first
        ratio = best / first if first else 0.0
        say(f"{cp:>3} {best:>9,} {ratio:>14.2f} {len(plan.cache) - before:>20}")


def _exchange(args: argparse.Namespace, config: xLSTMLMModelConfig, plan: Any, say: Any) -> None:
    say("bytes exchanged per step per device (collective results in the compiled HLO), KiB:")
    say(f"{'S':>7} {'cp':>3} {'state+halo':>14} {'grad all-reduce':>16} {'temp saved vs cp=1':>19}")
    for seq_len in args.seq_lens:
        base = plan(1, seq_len).memory_analysis().temp_size_in_bytes
        for cp in args.cps:
            if cp == 1:
                continue
            compiled = plan(cp, seq_len)
            kinds = collective_bytes(compiled.as_text())
            state = sum(v for k, v in kinds.items() if k != "all-reduce")
            saved = base - compiled.memory_analysis().temp_size_in_bytes
            say(
                f"{seq_len:>7} {cp:>3} {state / 1024:>14,.1f} "
                f"{kinds.get('all-reduce', 0) / 1024:>16,.1f} {saved / 1024:>19,.0f}"
            )
    seq_len = args.seq_lens[0]
    estimate = activation_report(
        activation_model(config), seq_len, 1, state_bytes=decode_state_bytes(config)
    )
    xla = plan(1, seq_len).memory_analysis().temp_size_in_bytes
    say(
        f"# xlstm-eqx info's estimate at S={seq_len}, cp=1: {estimate.total_bytes / MIB:.1f} MiB "
        f"of activations vs XLA's planned temporaries {xla / MIB:.1f} MiB"
    )


if __name__ == "__main__":
    sys.exit(main())
