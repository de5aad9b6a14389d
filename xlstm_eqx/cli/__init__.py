"""The `xlstm-eqx` command line: `train`, `eval`, `generate`, `info`, `convert`, `bench`.

Every `TrainConfig` field is a `train` flag (`seq_len` → `--seq-len`, booleans as
`--progress/--no-progress`, `--data` repeatable). Values are resolved in this order, later wins:
the dataclass defaults, the run's saved `DIR/config.json` (with `--resume`), a `--config` JSON or
YAML file (TrainConfig fields, or a run's whole `config.json`), then the flags given.

Subcommands are registered in `COMMANDS` (name → (help, add_arguments, run)); each lives in its
own module of this package (`convert` in `cli/convert.py`, `bench` in `cli/bench.py`).
"""

import argparse
import errno
import sys
from collections.abc import Callable, Sequence

from ..core.compile_cache import CACHE_ENV, enable_compile_cache
from ..core.console import silence_stdout
from . import bench, convert
from .common import DefaultsHelpFormatter, one_line, resolve_train_config, user_errors
from .convert import convert_main, generate_main
from .generate import add_generate_arguments, run_generate_command
from .info import add_info_arguments, run_info_command
from .train import add_eval_arguments, add_train_arguments, run_eval_command, run_train_command


__all__ = [
    "COMMANDS",
    "build_parser",
    "convert_main",
    "generate_main",
    "main",
    "resolve_train_config",
]


Command = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]


COMMANDS: dict[str, Command] = {
    "train": (
        "train a model (no arguments: the small xLSTM on the stdlib corpus)",
        add_train_arguments,
        run_train_command,
    ),
    "eval": (
        "held-out loss and bits per byte of a saved run, or lm-eval tasks (--tasks)",
        add_eval_arguments,
        run_eval_command,
    ),
    "generate": (
        "stream text sampled from a saved run",
        add_generate_arguments,
        run_generate_command,
    ),
    "info": ("parameter count and configuration of a model", add_info_arguments, run_info_command),
    "convert": (
        "convert checkpoints between transformers (hf), xlstm-jax and this library (eqx)",
        convert.add_convert_arguments,
        convert.run_convert,
    ),
    "bench": (
        "benchmarks: cell | train | generate | profile | all (time, tokens/s, memory, MFU, "
        "ratios vs peers, where the train step spends its time) | gpu (check and time "
        "everything on one GPU)",
        bench.add_bench_arguments,
        bench.run_bench_command,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xlstm-eqx", description="xLSTM (and Llama) language models in Equinox."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_, add_arguments, _) in COMMANDS.items():
        p = sub.add_parser(
            name,
            help=help_,
            description=help_,
            formatter_class=DefaultsHelpFormatter,
        )
        add_arguments(p)
        p.add_argument(
            "--compile-cache",
            metavar="DIR",
            default=None,
            help="JAX persistent compilation cache folder ('off': none; default: "
            f"${CACHE_ENV}, else ~/.cache/xlstm_eqx/jax)",
        )
    return parser


def _version() -> str:
    """The installed distribution's version (the package metadata, not a copy of it)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("xlstm_eqx")
    except PackageNotFoundError:
        return "unknown (not installed)"


# Operating-system errors about the place written to, not the program: one line, no traceback.
_OS_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.ENOTDIR}
)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `xlstm-eqx` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _, _, run = COMMANDS[args.command]
    try:
        enable_compile_cache(args.compile_cache)
        status = run(args)
        sys.stdout.flush()  # here, where a closed pipe is caught, not at the interpreter's exit
        return status
    except BrokenPipeError:  # `generate … | head`: the reader has what it wanted; stop quietly
        silence_stdout()
        return 0
    except user_errors() as e:
        print(f"xlstm-eqx {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in _OS_ERRNOS:
            raise
        where = f": {e.filename!r}" if e.filename else ""
        print(f"xlstm-eqx {args.command}: error: {e.strerror}{where}", file=sys.stderr)
        return 2
    except ImportError as e:
        print(f"xlstm-eqx {args.command}: error: {e}", file=sys.stderr)
        return 2
    except MemoryError as e:  # numpy's allocation error names the array's shape and size
        print(
            f"xlstm-eqx {args.command}: error: out of host memory ({one_line(e)}); "
            "lower --batch-size or --seq-len",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        return 130
