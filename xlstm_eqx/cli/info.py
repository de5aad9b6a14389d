"""`xlstm-eqx info`: a model's parameter count, configuration, and with `--mesh` its memory per
device and per host and what a checkpoint costs each host."""

import argparse
import json
import os
from typing import Any

import equinox as eqx
import jax.random as jr

from ..core.params import count_params
from ..data.tokenizer import load_tokenizer
from ..models import MODEL_FAMILIES
from ..parallel.memory import memory_report
from ..parallel.mesh import parse_mesh_spec
from ..training.config import TrainConfig, resolve_model_config


# info


def _info_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="xlstm", help="'xlstm', 'llama', or a model-config file")
    p.add_argument("--preset", default="small", help="size preset (default: small)")
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
    p.add_argument(
        "--hosts",
        type=int,
        default=1,
        metavar="N",
        help="with --mesh: the processes (hosts) sharing the mesh's devices (default: 1)",
    )


def _summary_lines(d: dict[str, Any], prefix: str = "") -> list[str]:
    scalars = [(k, v) for k, v in d.items() if not isinstance(v, dict) and not k.startswith("_")]
    lines = [f"  {prefix}{k} = {v!r}" for k, v in scalars]
    for k, v in d.items():
        if isinstance(v, dict):
            lines += _summary_lines(v, prefix + k + ".")
    return lines


def _info_run(args: argparse.Namespace) -> int:

    if args.list_presets:
        for name, fam in sorted(MODEL_FAMILIES.items()):
            print(f"{name}: {', '.join(sorted(fam.presets(), key=str.lower))}")
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
    if args.mesh:
        parallel = parse_mesh_spec(args.mesh, getattr(config, "parallel", None))
        print(memory_report(config, parallel, hosts=args.hosts))
    print("config:")
    print("\n".join(_summary_lines(config.to_dict())))
    return 0
