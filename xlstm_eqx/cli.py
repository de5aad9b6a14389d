"""The `xlstm-eqx` command line: `train`, `eval`, `generate`, `info`.

Every `TrainConfig` field is a `train` flag (`seq_len` → `--seq-len`, booleans as
`--progress/--no-progress`, `--data` repeatable). Values are resolved in this order, later wins:
the dataclass defaults, the run's saved `DIR/config.json` (with `--resume`), a `--config` JSON or
YAML file (TrainConfig fields, or a run's whole `config.json`), then the flags given.

Subcommands are registered in `COMMANDS` (name → (help, add_arguments, run)); `convert` and
`bench` plug in the same way once their code exists.
"""

import argparse
import dataclasses
import json
import os
import sys
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any


# Errors that are the user's input at fault: printed as one message, no traceback.
def _user_errors() -> tuple[type[BaseException], ...]:
    from ._checkpoint import CheckpointError

    return (ValueError, FileNotFoundError, FileExistsError, IsADirectoryError, CheckpointError)


def _field_parser(tp: Any) -> tuple[Callable[[str], Any], bool]:
    """(string → value, is_optional) for a dataclass field type."""
    optional = False
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        tp = args[0]
    base = {int: int, float: float, str: str}[tp]

    def parse(text: str) -> Any:
        if optional and text.lower() in ("none", "null"):
            return None
        try:
            return base(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {tp.__name__}, got {text!r}") from None

    return parse, optional


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field of `cls`; unset flags stay out of the namespace (SUPPRESS)."""
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        help_ = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        help_ = f"{help_} (default: {default!r})" if help_ else f"(default: {default!r})"
        if f.type is bool:
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_
            )
        elif typing.get_origin(f.type) is list:
            parser.add_argument(
                flag, action="append", default=argparse.SUPPRESS, metavar="VALUE", help=help_
            )
        else:
            parse, _ = _field_parser(f.type)
            parser.add_argument(
                flag, type=parse, default=argparse.SUPPRESS, metavar=f.name.upper(), help=help_
            )


def _load_mapping(path: str) -> dict[str, Any]:
    from ._train import read_mapping_file

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--config file {path!r} does not exist")
    d = read_mapping_file(path, "--config file")
    if isinstance(d.get("train"), dict) and "model_config" in d:  # a run's config.json
        d = d["train"]
    return d


def resolve_train_config(args: argparse.Namespace) -> Any:
    """Defaults < the run's saved config (with --resume) < --config file < flags."""
    from ._train import TrainConfig

    values: dict[str, Any] = {}
    flags = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(TrainConfig)
        if hasattr(args, f.name)
    }
    if flags.get("resume"):
        out = (
            flags.get("out")
            or TrainConfig(**{k: v for k, v in flags.items() if k == "model"}).out_dir()
        )
        saved = os.path.join(out, "config.json")
        if os.path.isfile(saved):
            with open(saved) as f:
                run = json.load(f)
            values.update(run.get("train", {}))
    if getattr(args, "config", None):
        values.update(_load_mapping(args.config))
    values.update(flags)
    cfg = TrainConfig.from_dict(values)
    return cfg


# ----------------------------------------------------------------------------------------------
# train


def _train_arguments(p: argparse.ArgumentParser) -> None:
    from ._train import TrainConfig

    p.add_argument(
        "--config", metavar="FILE", help="JSON/YAML file of TrainConfig fields (flags override it)"
    )
    add_dataclass_arguments(p, TrainConfig)


def _train_run(args: argparse.Namespace) -> int:
    from ._sharding import initialize_distributed
    from ._train import TrainingDivergedError, train

    initialize_distributed()  # multi-host runs (env vars / SLURM); nothing for one process

    cfg = resolve_train_config(args)
    try:
        train(cfg)
    except TrainingDivergedError as e:
        print(f"xlstm-eqx train: {e}", file=sys.stderr)
        return 1
    return 0


# ----------------------------------------------------------------------------------------------
# eval


def _eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, metavar="DIR", help="the run directory to evaluate")
    p.add_argument(
        "--data",
        action="append",
        metavar="PATH_OR_GLOB",
        help="evaluate on all of this text instead of the run's held-out split (repeatable)",
    )
    p.add_argument("--checkpoint", metavar="PATH", help="a checkpoint directory (default: newest)")
    p.add_argument("--batch-size", type=int, help="sequences per batch (default: the run's)")
    p.add_argument("--eval-batches", type=int, help="batches to evaluate (default: the run's)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")


def _eval_run(args: argparse.Namespace) -> int:
    from ._train import evaluate_run

    r = evaluate_run(
        args.out,
        data=args.data,
        batch_size=args.batch_size,
        max_batches=args.eval_batches,
        checkpoint=args.checkpoint,
    )
    if args.json:
        print(json.dumps(dataclasses.asdict(r)))
    else:
        print(
            f"step {r.step}: held-out loss {r.eval_loss:.4f} nats/token, "
            f"{r.bits_per_byte:.3f} bits/byte over {r.num_tokens:,} tokens "
            f"(unigram baseline {r.unigram_bits_per_byte:.3f} bits/byte)"
        )
    return 0


# ----------------------------------------------------------------------------------------------
# generate


def _generate_arguments(p: argparse.ArgumentParser) -> None:
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--out", metavar="DIR", help="the run whose model to sample")
    source.add_argument("--hf", metavar="DIR", help="a transformers xLSTMForCausalLM directory")
    p.add_argument("--tokenizer", metavar="FILE", help="tokenizer.json (default: the model's own)")
    p.add_argument("--prompt", default="def ", help="text to continue (default: 'def ')")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    p.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--checkpoint", metavar="PATH", help="a checkpoint directory (default: newest)")


def _generate_run(args: argparse.Namespace) -> int:
    import jax.numpy as jnp
    import jax.random as jr

    from ._generate import stream_generate
    from ._tokenizer import load_tokenizer, tokenizer_from_dict
    from ._train import load_run

    if args.hf is not None:
        from .interop import load_hf_for_generation

        model, _, tokenizer = load_hf_for_generation(args.hf, tokenizer=args.tokenizer)
        if tokenizer is None:
            raise ValueError(f"--hf {args.hf!r} has no tokenizer.json; pass --tokenizer FILE")
    else:
        model, run, _ = load_run(args.out, args.checkpoint)
        if args.tokenizer is not None:
            tokenizer = load_tokenizer(args.tokenizer)
        elif "tokenizer" in run:
            tokenizer = tokenizer_from_dict(run["tokenizer"])
        else:
            raise ValueError(f"run {args.out!r} records no tokenizer; pass --tokenizer FILE")
    prompt = [int(t) for t in tokenizer.encode(args.prompt)]
    if not prompt:
        raise ValueError("--prompt must encode to at least one token")
    stream = stream_generate(
        model,
        jnp.asarray(prompt, jnp.int32)[None, :],
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        key=jr.key(args.seed),
    )
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    ids: list[int] = []
    shown = ""
    for tok in stream:
        ids.append(int(tok[0]))
        # Decode everything so far; hold back a trailing incomplete character (U+FFFD).
        text = tokenizer.decode(ids).rstrip("\ufffd")
        if text.startswith(shown) and len(text) > len(shown):
            sys.stdout.write(text[len(shown) :])
            sys.stdout.flush()
            shown = text
    rest = tokenizer.decode(ids)
    sys.stdout.write((rest[len(shown) :] if rest.startswith(shown) else "") + "\n")
    sys.stdout.flush()
    return 0


# ----------------------------------------------------------------------------------------------
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
    p.add_argument("--mesh", metavar="SPEC", help="per-device memory on a mesh, e.g. 'fsdp=8,tp=4'")


def _summary_lines(d: dict[str, Any], prefix: str = "") -> list[str]:
    scalars = [(k, v) for k, v in d.items() if not isinstance(v, dict) and not k.startswith("_")]
    lines = [f"  {prefix}{k} = {v!r}" for k, v in scalars]
    for k, v in d.items():
        if isinstance(v, dict):
            lines += _summary_lines(v, prefix + k + ".")
    return lines


def _info_run(args: argparse.Namespace) -> int:
    import equinox as eqx
    import jax.random as jr

    from ._nn import count_params
    from ._tokenizer import load_tokenizer
    from ._train import MODEL_FAMILIES, TrainConfig, resolve_model_config

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
        from ._sharding import memory_report, parse_mesh_spec

        parallel = parse_mesh_spec(args.mesh, getattr(config, "parallel", None))
        print(memory_report(config, parallel))
    print("config:")
    print("\n".join(_summary_lines(config.to_dict())))
    return 0


# ----------------------------------------------------------------------------------------------

Command = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]

COMMANDS: dict[str, Command] = {
    "train": (
        "train a model (no arguments: the small xLSTM on the stdlib corpus)",
        _train_arguments,
        _train_run,
    ),
    "eval": ("held-out loss and bits per byte of a saved run", _eval_arguments, _eval_run),
    "generate": ("stream text sampled from a saved run", _generate_arguments, _generate_run),
    "info": ("parameter count and configuration of a model", _info_arguments, _info_run),
    "convert": (
        "convert checkpoints between transformers (hf), xlstm-jax and this library (eqx)",
        lambda p: _interop_cli().add_convert_arguments(p),
        lambda args: _interop_cli().run_convert(args),
    ),
    "bench": (
        "benchmarks: cell | train | generate | profile | all (time, tokens/s, memory, MFU, ratios vs peers, where the train step spends its time)",
        lambda p: _bench().add_bench_arguments(p),
        lambda args: _bench().run_bench_command(args),
    ),
}


def _bench() -> types.ModuleType:
    from . import _bench

    return _bench


def _interop_cli() -> types.ModuleType:
    from .interop import _cli

    return _cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xlstm-eqx", description="xLSTM (and Llama) language models in Equinox."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_, add_arguments, _) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `xlstm-eqx` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _, _, run = COMMANDS[args.command]
    try:
        return run(args)
    except _user_errors() as e:
        print(f"xlstm-eqx {args.command}: error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:
        print(f"xlstm-eqx {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
