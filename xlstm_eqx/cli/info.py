"""`xlstm-eqx info`: a model's parameter count, configuration, and with `--mesh` its memory per
device and per host and what a checkpoint costs each host; with `--seq-len` / `--device-memory`
the activations of a train step per device (the sequence split over the mesh's cp axis), whether
it fits a device and the longest sequence that does."""

import argparse
import dataclasses
import json
import os
from collections.abc import Callable
from typing import Any, cast

import equinox as eqx
import jax.random as jr

from ..core.config import Config
from ..core.params import count_params
from ..data.tokenizer import load_tokenizer
from ..models import MODEL_FAMILIES, ModelConfig
from ..parallel.memory import (
    MemoryReport,
    activation_model,
    activation_report,
    decode_state_bytes,
    largest_seq_len,
    memory_report,
    size_text,
)
from ..training.config import TrainConfig, resolve_model_config
from ..training.finetune import LoRASettings, finetune_memory
from ..training.preflight import check_mesh


# info


#: (flag, type, default, metavar, help) of the activation and fit flags (`_context_lines`).
_CONTEXT_FLAGS: tuple[tuple[str, Callable[[str], Any], Any, str, str], ...] = (
    (
        "--seq-len",
        int,
        None,
        "S",
        "activations per device of a train step on S-token sequences, split over the mesh's cp "
        "axis (default with --device-memory: the config's context length)",
    ),
    (
        "--batch-per-device",
        int,
        1,
        "B",
        "with --seq-len: sequences per device (dp and fsdp split the batch; default: 1)",
    ),
    (
        "--device-memory",
        float,
        None,
        "GiB",
        "whether a train step fits a device of this many GiB, and the largest S that does",
    ),
)


def add_info_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="xlstm", help="'xlstm', 'llama', or a model-config file")
    p.add_argument("--preset", default="small", help="size preset (see --list-presets)")
    p.add_argument("--out", metavar="DIR", help="describe this run's model instead")
    p.add_argument(
        "--tokenizer",
        default=None,
        help="count with this tokenizer's vocabulary, as `train` would ('bytes' or a "
        "tokenizer.json; default: the preset's own vocabulary)",
    )
    p.add_argument("--list-presets", action="store_true", help="list the presets of each family")
    p.add_argument(
        "--mesh",
        metavar="SPEC",
        help="per-device and per-host memory and checkpoint bytes on a mesh, e.g. 'fsdp=8,tp=4'",
    )
    for flag, kind, default, metavar, text in _CONTEXT_FLAGS:
        p.add_argument(flag, type=_positive(kind), default=default, metavar=metavar, help=text)
    p.add_argument(
        "--lora-rank",
        type=_positive(int),
        default=None,
        metavar="R",
        help="also bytes per device of LoRA fine-tuning at rank R against full fine-tuning",
    )
    p.add_argument(
        "--lora-base-dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="with --lora-rank: the frozen base's stored dtype",
    )
    p.add_argument(
        "--hosts",
        type=int,
        default=1,
        metavar="N",
        help="with --mesh: the processes (hosts) sharing the mesh's devices (default: 1)",
    )


def _positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
        return value

    return parse


def _context_lines(
    config: ModelConfig, report: MemoryReport, args: argparse.Namespace
) -> list[str]:
    """Gradients, activations at ``--seq-len`` over the mesh's cp axis, the total per device and,
    with ``--device-memory``, whether it fits and the largest S that does."""
    pc = getattr(config, "parallel", None)
    cp = report.mesh.get(getattr(pc, "context_axis_name", "cp"), 1)
    model = activation_model(config, batch=args.batch_per_device)
    state = decode_state_bytes(config, args.batch_per_device)
    default_len = getattr(config, "context_length", -1)
    seq_len = args.seq_len or (default_len if default_len > 0 else 2048)
    activations = activation_report(model, seq_len, cp, state_bytes=state)
    grads = report.param_bytes_per_device
    fixed = report.total_bytes_per_device + grads
    total = fixed + activations.total_bytes
    lines = [
        f"  gradients:  {size_text(grads)} per device (float32, sharded as the parameters)",
        str(activations),
        f"per device in all: {size_text(total)} (parameters, gradients, optimizer state, activations; "
        "estimates from the traced backward, XLA's fusion keeps less)",
    ]
    if args.device_memory is not None:
        budget = int(args.device_memory * 2**30)
        verdict = "fits" if total <= budget else "does NOT fit"
        best = largest_seq_len(model, cp, budget, fixed_bytes=fixed, state_bytes=state)
        pow2 = 1 << (best.bit_length() - 1) if best else 0
        lines.append(
            f"device memory {args.device_memory:g} GiB: S={seq_len:,} {verdict}; the largest S "
            f"that fits on this mesh: {best:,} (power of two: {pow2:,})"
        )
    return lines


def _lora_lines(
    skeleton: Any, config: ModelConfig, args: argparse.Namespace, report: MemoryReport | None
) -> list[str]:
    """``--lora-rank``: full vs LoRA fine-tuning per device (training/finetune.py), with the
    activations of ``--seq-len`` when given."""
    settings = LoRASettings(args.lora_rank, float(args.lora_rank), base_dtype=args.lora_base_dtype)
    per_device = report.param_bytes_per_device if report else 4 * count_params(skeleton)
    activations = 0
    if report is not None and (args.seq_len or args.device_memory):
        pc = getattr(config, "parallel", None)
        cp = report.mesh.get(getattr(pc, "context_axis_name", "cp"), 1)
        seq_len = args.seq_len or max(getattr(config, "context_length", 2048), 1)
        state = decode_state_bytes(config, args.batch_per_device)
        model = activation_model(config, batch=args.batch_per_device)
        activations = activation_report(model, seq_len, cp, state_bytes=state).total_bytes
    memory = finetune_memory(skeleton, settings, per_device, activations)
    return memory.lines(args.device_memory)


def _summary_lines(d: dict[str, Any], prefix: str = "") -> list[str]:
    scalars = [(k, v) for k, v in d.items() if not isinstance(v, dict) and not k.startswith("_")]
    lines = [f"  {prefix}{k} = {v!r}" for k, v in scalars]
    for k, v in d.items():
        if isinstance(v, dict):
            lines += _summary_lines(v, prefix + k + ".")
    return lines


def _preset_listing() -> list[str]:
    """Each family's presets with their parameter counts (shapes only: nothing is allocated);
    names that stand for the same config share a line."""
    lines = []
    for kind, fam in sorted(MODEL_FAMILIES.items()):
        lines.append(f"{kind}:")
        groups: dict[int, list[str]] = {}
        fns: dict[int, Any] = {}
        for name, fn in fam.presets().items():
            key = next((k for k, f in fns.items() if f is fn or f() == fn()), id(fn))
            fns.setdefault(key, fn)
            groups.setdefault(key, []).append(name)
        rows = []
        for key, names in groups.items():
            skeleton = eqx.filter_eval_shape(fam.build, fns[key](), key=jr.key(0))
            n = count_params(skeleton)
            names = sorted(names, key=lambda s: (len(s), s))
            label = names[-1] + (f" ({', '.join(names[:-1])})" if len(names) > 1 else "")
            rows.append((n, label))
        for n, label in sorted(rows):
            lines.append(f"  {label:<40} {n:>15,} parameters ({_short(n)})")
    return lines


def _short(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f}B"
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def run_info_command(args: argparse.Namespace) -> int:
    config: ModelConfig
    if args.list_presets:
        for line in _preset_listing():
            print(line)
        return 0
    if args.out:
        path = os.path.join(args.out, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no run config at {path!r}")
        with open(path) as f:
            run = json.load(f)
        kind = run["model_kind"]
        config = MODEL_FAMILIES[kind].config_from_dict(run["model_config"])
        label = f"run {args.out}"
    else:
        tokenizer = args.tokenizer or "bytes"
        tcfg = TrainConfig(model=args.model, preset=args.preset, tokenizer=tokenizer)
        kind, config = resolve_model_config(tcfg, load_tokenizer(tokenizer))
        label = f"preset {args.preset!r}" if args.model in MODEL_FAMILIES else args.model
        if args.tokenizer is None and args.model in MODEL_FAMILIES:
            config = MODEL_FAMILIES[kind].presets()[args.preset]()  # as shipped
    skeleton = eqx.filter_eval_shape(MODEL_FAMILIES[kind].build, config, key=jr.key(0))
    n = count_params(skeleton)
    print(f"model: {kind} ({label})")
    print(f"parameters: {n:,} ({n / 1e6:.2f}M)")
    context = args.seq_len is not None or args.device_memory is not None
    report = None
    if args.mesh or context:
        parallel = check_mesh(args.mesh, config, what_if=True) if args.mesh else None
        if parallel is not None and isinstance(config, Config) and hasattr(config, "parallel"):
            config = cast(ModelConfig, dataclasses.replace(config, parallel=parallel))
        report = memory_report(config, parallel, hosts=args.hosts)
        print(report)
        if context:
            print("\n".join(_context_lines(config, report, args)))
        else:
            print("  (parameters and AdamW state only: gradients and activations come on top)")
    if args.lora_rank:
        print("\n".join(_lora_lines(skeleton, config, args, report)))
    print("config:")
    print("\n".join(_summary_lines(config.to_dict())))
    return 0
