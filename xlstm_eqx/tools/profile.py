"""Where a compiled step spends its time: a `jax.profiler` trace of a few calls, each XLA op's
time attributed to the part of the model it came from and to the forward, backward or update
phase.

Attribution uses the op's ``op_name`` metadata, which carries JAX's name stack: the modules set
`jax.named_scope` on their ``__call__`` (``FeedForward``, ``mLSTMLayer``, ``mLSTMCell``, ...; the
same names a Flax profile shows for the reference), and autodiff wraps it in ``jvp(...)`` for the
forward and ``transpose(jvp(...))`` for the backward. The innermost known scope names the part.
Ops outside the differentiated function (the optimizer; constants XLA hoisted out of the model)
count as "update". Ops XLA left without an ``op_name`` (copies it inserted, matmuls it
rewrote) take the nearest one in the HLO graph (`hlo_instructions`); what finds none is "other".

``xlstm-eqx bench profile`` prints the tables for the train step of ``small_xlstm`` /
``small_llama`` (`profile_train_step`).
"""

import dataclasses
import glob
import gzip
import json
import os
import re
import tempfile
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import jax

from ..core.timing import median_seconds
from .train_setup import train_step_setup


# named scope set by a module -> the row it is counted in
PARTS: dict[str, str] = {
    "mLSTMCell": "mLSTM cell",
    "sLSTMCell": "sLSTM cell",
    "mLSTMLayer": "mLSTM layer (projections, gates)",
    "sLSTMLayer": "sLSTM layer (projections, gates)",
    "CausalConv1d": "causal conv",
    "SelfAttention": "attention",
    "FeedForward": "feed-forward",
    "FFNBlock": "feed-forward",
    "Norm": "norms",
    "MultiHeadNorm": "norms",
    "Embedding": "embedding",
    "LMHead": "LM head",
}


_UNSCOPED = "loss, residuals, scan glue"


_UPDATE = "optimizer (clip, AdamW)"


_OTHER = "other (no op_name found)"


_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([^\s=]+)\s*=\s*(.+?)\s+([a-z][\w\-]*)\(")


_OP_NAME = re.compile(r'op_name="([^"]*)"')


_OPERAND = re.compile(r"%([\w.\-]+)")


_CALLED = re.compile(
    r"\b(?:calls|body|condition|to_apply)=(%?[\w.\-]+)|branch_computations=\{([^}]*)\}"
)


@dataclasses.dataclass(frozen=True)
class OpTime:
    """One HLO instruction: per-call self time (summed over the threads that ran it)."""

    name: str
    opcode: str
    shape: str
    phase: str  # "fwd" | "bwd" | "update" | "other"
    part: str
    op_name: str
    ms: float
    count: int  # executions per call (ops inside loops run many times)


@dataclasses.dataclass(frozen=True)
class StepProfile:
    step_ms: float  # median wall time of one call
    ops: list[OpTime]  # sorted, slowest first
    xla_flops: float | None  # XLA's cost analysis of the program (loop bodies counted once)
    xla_bytes: float | None

    @property
    def op_ms(self) -> float:
        return float(sum(op.ms for op in self.ops))

    def parts(self) -> list[dict[str, Any]]:
        """Rows ``{part, fwd, bwd, update, other, total, share}`` in ms per call, largest first."""
        table: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        for op in self.ops:
            table[op.part][op.phase] += op.ms
        total = self.op_ms or 1.0
        rows = []
        for part, by_phase in table.items():
            row: dict[str, Any] = {"part": part}
            for phase in ("fwd", "bwd", "update", "other"):
                row[phase] = by_phase.get(phase, 0.0)
            row["total"] = sum(by_phase.values())
            row["share"] = row["total"] / total
            rows.append(row)
        return sorted(rows, key=lambda r: -r["total"])


def _phase(op_name: str) -> str:
    if "transpose(jvp(" in op_name:
        return "bwd"
    if "jvp(" in op_name:
        return "fwd"
    if op_name.startswith("jit("):
        return "update"
    return "other"


_WRAPPED = re.compile(r"^(?:[\w.]+\()+([\w.]+)\)+$")  # "transpose(jvp(FeedForward))"


def _part(op_name: str, phase: str) -> str:
    for scope in reversed(op_name.split("/")):
        wrapped = _WRAPPED.match(scope)
        if wrapped is not None:
            scope = wrapped.group(1)
        if scope in PARTS:
            return PARTS[scope]
    if phase == "update":
        return _UPDATE
    return _UNSCOPED if phase in ("fwd", "bwd") else _OTHER


def hlo_instructions(hlo_text: str) -> dict[str, tuple[str, str, str]]:
    """``{instruction name: (opcode, result type, op_name)}`` of a compiled HLO module's text.

    An instruction without an ``op_name`` (XLA drops some, e.g. on the batched matmuls it
    rewrites) takes the nearest one found, breadth first: in the computation it calls (root
    first), then from the instructions using its result and the instruction calling its own
    computation (a ``while``, ``fusion``, ``call``...). Its time then counts for the part of the
    model it serves.
    """
    raw: dict[str, tuple[str, str, str]] = {}
    computation_of: dict[str, str] = {}
    caller_of: dict[str, str] = {}
    callees_of: dict[str, list[str]] = defaultdict(list)
    members: dict[str, list[str]] = defaultdict(list)  # computation -> its instructions, root first
    users_of: dict[str, list[str]] = defaultdict(list)
    computation = ""
    for line in hlo_text.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{"):
            header = line.split()
            computation = (header[1] if header[0] == "ENTRY" else header[0]).lstrip("%")
            continue
        match = _INSTRUCTION.match(line)
        if match is None:
            continue
        name, shape, opcode = match.groups()
        op_name = _OP_NAME.search(line)
        raw[name] = (opcode, shape, op_name.group(1) if op_name else "")
        computation_of[name] = computation
        if line.lstrip().startswith("ROOT"):
            members[computation].insert(0, name)
        else:
            members[computation].append(name)
        for operand in _OPERAND.findall(line.split("=", 1)[1]):
            users_of[operand].append(name)
        for single, several in _CALLED.findall(line):
            for callee in [single] if single else several.split(","):
                callee = callee.strip().lstrip("%")
                caller_of.setdefault(callee, name)
                callees_of[name].append(callee)

    def from_callees(name: str) -> str:
        for callee in callees_of.get(name, ()):
            for member in members.get(callee, ()):
                if raw[member][2]:
                    return raw[member][2]
        return ""

    def inherited(name: str) -> str:
        queue, seen = [name], {name}
        while queue and len(seen) <= 64:
            current = queue.pop(0)
            own = raw[current][2] or from_callees(current)
            if own:
                return own
            caller = caller_of.get(computation_of[current])
            for near in [*users_of.get(current, ()), *([caller] if caller else [])]:
                if near in raw and near not in seen:
                    seen.add(near)
                    queue.append(near)
        return ""

    return {name: (opcode, shape, inherited(name)) for name, (opcode, shape, _) in raw.items()}


def _hlo_op(event: dict[str, Any]) -> str | None:
    args = event.get("args")
    return args.get("hlo_op") if isinstance(args, dict) else None


def trace_self_times(trace_events: list[dict[str, Any]], names: set[str]) -> dict[str, list[float]]:
    """Self time (µs) of each complete event whose op is in `names`, per execution: an event's
    duration minus that of the counted events nested inside it on the same thread.

    An event's op is its name (XLA:CPU names its thunk events after the HLO instruction). Where
    events carry ``args["hlo_op"]`` (GPU kernels, whose names are the kernels'), only those
    events are counted, by that op, so host-side launch events are not counted twice. The GPU
    path follows the trace format; it has not been run on a GPU here.
    """
    complete = [e for e in trace_events if e.get("ph") == "X"]
    device = [e for e in complete if _hlo_op(e) in names]
    if device:
        complete = [{**e, "name": _hlo_op(e)} for e in device]
    by_thread: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for event in complete:
        if event.get("name") in names:
            by_thread[(event.get("pid"), event.get("tid"))].append(event)
    out: dict[str, list[float]] = defaultdict(list)
    for events in by_thread.values():
        events.sort(key=lambda e: (float(e["ts"]), -float(e.get("dur", 0.0))))
        stack: list[list[Any]] = []  # [end, name, self time]
        for event in events:
            start, dur = float(event["ts"]), float(event.get("dur", 0.0))
            while stack and stack[-1][0] <= start:
                _, name, self_time = stack.pop()
                out[name].append(self_time)
            if stack:
                stack[-1][2] -= dur
            stack.append([start + dur, event["name"], dur])
        for _, name, self_time in stack:
            out[name].append(self_time)
    return out


def _read_trace(logdir: str) -> list[dict[str, Any]]:
    files = sorted(
        glob.glob(os.path.join(logdir, "**", "*.trace.json.gz"), recursive=True),
        key=os.path.getmtime,
    )
    if not files:
        raise RuntimeError(f"profile: jax.profiler wrote no *.trace.json.gz under {logdir}")
    with gzip.open(files[-1], "rt") as fh:
        data = json.load(fh)
    return data["traceEvents"] if isinstance(data, dict) else data


def profile_calls(
    run: Callable[[], Any], compiled: Any, *, calls: int = 3, logdir: str | None = None
) -> StepProfile:
    """Trace `calls` calls of ``run()`` (which must execute `compiled` once and block until it
    is done; it is called once more before, untraced, as a warm-up)."""
    if calls < 1:
        raise ValueError(f"profile: calls must be >= 1, got {calls}")
    compiled = getattr(compiled, "compiled", compiled)  # eqx.filter_jit's wrapper
    instructions = hlo_instructions(compiled.as_text())
    cost = compiled.cost_analysis() or {}
    if isinstance(cost, list):  # older jax returned one dict per program
        cost = cost[0] if cost else {}
    run()  # warm-up, untraced
    with tempfile.TemporaryDirectory() as tmp:
        directory = logdir or tmp
        with jax.profiler.trace(directory):
            step_s = median_seconds(run, calls)
        self_times = trace_self_times(_read_trace(directory), set(instructions))
    ops = []
    for name, durations in self_times.items():
        opcode, shape, op_name = instructions[name]
        phase = _phase(op_name)
        ops.append(
            OpTime(
                name=name,
                opcode=opcode,
                shape=shape,
                phase=phase,
                part=_part(op_name, phase),
                op_name=op_name,
                ms=sum(durations) / 1e3 / calls,
                count=round(len(durations) / calls),
            )
        )
    ops.sort(key=lambda op: -op.ms)
    return StepProfile(
        step_ms=1e3 * step_s,
        ops=ops,
        xla_flops=None if cost.get("flops") is None else float(cost["flops"]),
        xla_bytes=None if cost.get("bytes accessed") is None else float(cost["bytes accessed"]),
    )


def profile_train_step(
    model: str = "xlstm",
    *,
    size: str = "small",
    seq_len: int = 2048,
    batch_size: int = 1,
    calls: int = 3,
    logdir: str | None = None,
) -> StepProfile:
    """Profile the trainer's jitted step (forward + backward + clipping + AdamW) of the preset
    ``f"{size}_{model}"`` on random tokens, as `xlstm_eqx.tools.bench.bench_train` times it."""

    try:
        _, params, opt_state, step, inputs = train_step_setup(model, size, seq_len, batch_size)
    except ValueError as err:
        raise ValueError(f"profile: {err}") from None
    compiled = step.lower(inputs, params, opt_state).compile()
    state = [params, opt_state]

    def run() -> None:
        new_params, new_opt_state, loss, _ = compiled(inputs, *state)
        jax.block_until_ready(loss)
        state[:] = [new_params, new_opt_state]

    return profile_calls(run, compiled, calls=calls, logdir=logdir)


def print_profile(
    profile: StepProfile, *, title: str = "", top: int = 12, analytic_flops: float | None = None
) -> None:
    """The per-part table (ms per call by phase) and the `top` slowest single ops;
    `analytic_flops` (e.g. `train_flops_per_token` x tokens) is printed beside XLA's count."""
    op_ms = profile.op_ms
    print(
        f"# {title}wall {profile.step_ms:.1f} ms/call; op time summed over threads {op_ms:.1f} ms",
        flush=True,
    )
    if profile.xla_flops is not None:
        print(
            f"# XLA cost analysis: {profile.xla_flops / 1e9:.2f} GFLOP, "
            f"{(profile.xla_bytes or 0) / 2**30:.2f} GiB accessed (loop bodies counted once)"
            + (
                ""
                if analytic_flops is None
                else f"; counted analytically {analytic_flops / 1e9:.2f} GFLOP"
            )
        )
    print(f"{'part':<42} {'fwd ms':>8} {'bwd ms':>8} {'other ms':>8} {'total':>8} {'share':>7}")
    for row in profile.parts():
        other = row["other"]
        upd = row["update"] + other
        print(
            f"{row['part']:<42} {row['fwd']:>8.1f} {row['bwd']:>8.1f} {upd:>8.1f} "
            f"{row['total']:>8.1f} {row['share']:>7.1%}"
        )
    print(f"\n{'slowest ops':<42} {'ms':>8} {'calls':>6} {'phase':>6}  {'opcode':<10} shape")
    for op in profile.ops[:top]:
        print(
            f"{op.name[:42]:<42} {op.ms:>8.2f} {op.count:>6} {op.phase:>6}  {op.opcode:<10} "
            f"{op.shape[:40]}  [{op.part}]",
            flush=True,
        )
