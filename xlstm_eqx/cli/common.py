"""What the commands share: one-line user errors, dataclass fields as flags, and resolving a
`TrainConfig` from defaults, a saved run, a config file and flags (later wins)."""

import argparse
import dataclasses
import os
import types
import typing
from collections.abc import Callable
from typing import Any

from ..core.files import read_mapping_file
from ..data.tokenizer import ByteTokenizer
from ..training.checkpoint import CheckpointError
from ..training.config import SEQ_LEN, TrainConfig, resolve_model_config
from ..training.init_from import open_init_source


def one_line(e: BaseException) -> str:
    """An error's message on one line (a multi-line message's lines joined by '; ')."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return "; ".join(lines) if lines else type(e).__name__


# Errors that are the user's input at fault: printed as one message, no traceback.
def user_errors() -> tuple[type[BaseException], ...]:

    return (ValueError, FileNotFoundError, FileExistsError, IsADirectoryError, CheckpointError)


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, unless the help already names one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_ = action.help or ""
        if (
            "default" in help_.lower()
            or action.default is argparse.SUPPRESS
            or not action.option_strings
            or action.required
            or isinstance(action, argparse._HelpAction | argparse._VersionAction)
        ):
            return help_
        shown = "none" if action.default is None else "%(default)r"
        if isinstance(action.default, bool) or action.nargs == 0:
            shown = "%(default)s"
        return f"{help_} (default: {shown})" if help_ else f"(default: {shown})"


def _field_parser(tp: Any) -> tuple[Callable[[str], Any], bool]:
    """(string → value, is_optional) for a dataclass field type."""
    optional = False
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        tp = args[0]
    base = (
        str if typing.get_origin(tp) is typing.Literal else {int: int, float: float, str: str}[tp]
    )

    def parse(text: str) -> Any:
        if optional and text.lower() in ("none", "null"):
            return None
        try:
            return base(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {base.__name__}, got {text!r}") from None

    return parse, optional


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field of `cls`; unset flags stay out of the namespace (SUPPRESS)."""
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        help_ = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        if "default" not in help_.lower():  # one default per flag: the help's own, else this
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
            choices = _literal_choices(f.type)
            parser.add_argument(
                flag,
                type=parse,
                default=argparse.SUPPRESS,
                metavar=f.name.upper() if choices is None else None,
                choices=choices,
                help=help_,
            )


def _literal_choices(tp: Any) -> tuple[Any, ...] | None:
    """The values of a `Literal[...]` field type (a flag's choices), None for any other type."""
    return typing.get_args(tp) if typing.get_origin(tp) is typing.Literal else None


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
            run = read_mapping_file(saved, "run config")
            train = run.get("train", {})
            if not isinstance(train, dict):
                raise ValueError(f"run config {saved!r}: 'train' must be a mapping")
            values.update(train)
    if getattr(args, "config", None):
        values.update(_load_mapping(args.config))
    values.update(flags)
    cfg = TrainConfig.from_dict(values)
    if "seq_len" not in values:  # not chosen: as long as the model allows, up to SEQ_LEN
        cfg = dataclasses.replace(cfg, seq_len=min(SEQ_LEN, _context_length(cfg)))
    return cfg


def _context_length(cfg: TrainConfig) -> int:
    """The context length of the model `cfg` names (SEQ_LEN where it has none or is no model):
    a bad --model or --preset is reported later, where it always is."""
    try:
        if cfg.init_from:  # the source's (or --context-length)
            config = open_init_source(cfg.init_from).config
            if cfg.context_length is not None:
                return cfg.context_length
        else:
            _, config = resolve_model_config(cfg, ByteTokenizer())
    except (ValueError, OSError, TypeError, KeyError):
        return SEQ_LEN
    ctx = getattr(config, "context_length", None)
    return ctx if isinstance(ctx, int) and ctx > 0 else SEQ_LEN
