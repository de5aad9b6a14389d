"""Printing to a stdout that may close under us (`xlstm-eqx train | head -1`): a closed pipe
stops the printing, never the program. Python's documented way: point stdout at os.devnull so
that later writes and the interpreter's final flush cannot fail."""

import os
import sys


def silence_stdout() -> None:
    """Send whatever stdout still holds, and every later write, to os.devnull."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # not a real file (captured, replaced)
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (stdout for the rest of the process)
    finally:
        os.close(devnull)


def print_line(message: str) -> None:
    """`print(message)`, flushed; once the reader has gone away, nothing (the caller goes on)."""
    try:
        print(message, flush=True)
    except BrokenPipeError:
        silence_stdout()
