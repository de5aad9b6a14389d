"""What the commands share: one-line user errors, dataclass fields as flags, and resolving a
`TrainConfig` from defaults, a saved run, a config file and flags (later wins)."""

import argparse
import dataclasses
import json
import os
import types
import typing
from collections.abc import Callable
from typing import Any

from ..core.files import read_mapping_file
from ..training.checkpoint import CheckpointError
from ..training.config import TrainConfig


# Errors that are the user's input at fault: printed as one message, no traceback.
def _user_errors() -> tuple[type[BaseException], ...]:

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

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--config file {path!r} does not exist")
    d = read_mapping_file(path, "--config file")
    if isinstance(d.get("train"), dict) and "model_config" in d:  # a run's config.json
        d = d["train"]
    return d


def resolve_train_config(args: argparse.Namespace) -> Any:
    """Defaults < the run's saved config (with --resume) < --config file < flags."""

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
