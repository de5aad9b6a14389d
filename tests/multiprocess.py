"""Running test workers in subprocesses: simulated CPU devices, two-process runs, and results
computed once per test session and shared between pytest-xdist workers."""

import fcntl
import json
import os
import pathlib
import re
import socket
import subprocess
import sys
from collections.abc import Callable

import pytest


ROOT = pathlib.Path(__file__).resolve().parents[1]
# Compile fast: test programs are small and most run once, so XLA's optimisation passes cost more
# than they save. conftest.py sets these for the whole test run (subprocesses inherit them).
FAST_XLA = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
# Opt-in, for workers whose every check has a tolerance: XLA:CPU's older loop emitter for
# elementwise fusions compiles about 3x faster than its MLIR fusion emitters (a one-device tiny
# mLSTM value_and_grad: 6.2 s -> 1.9 s of compile CPU; run time alike), but it rounds the same
# expression differently from one program to another, which breaks the suite's bit-exact
# comparisons of two programs (tests/cell/test_chunkwise_vjp.py, test_edge_cases.py fail with it).
TOLERANT_XLA = "--xla_cpu_use_fusion_emitters=false"
_DEVICE_COUNT = re.compile(r"--xla_force_host_platform_device_count=\S*")


def worker_env(devices: int, xla_flags: str = "") -> dict[str, str]:
    """This process's environment for a subprocess with `devices` simulated CPU devices: the same
    XLA flags otherwise (so a loss computed there equals one computed here, bit for bit) unless
    `xla_flags` adds some (e.g. `TOLERANT_XLA`), and this checkout first on the path."""
    env = dict(os.environ)
    flags = _DEVICE_COUNT.sub("", env.get("XLA_FLAGS", "")).split() + xla_flags.split()
    env["XLA_FLAGS"] = " ".join([f"--xla_force_host_platform_device_count={devices}", *flags])
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    )
    env["JAX_PLATFORMS"] = "cpu"
    return env


def start_worker(
    module: str,
    args: list[str],
    devices: int,
    cwd: str | os.PathLike,
    xla_flags: str = "",
    **popen,
) -> subprocess.Popen:
    """`python -m module *args` with `devices` simulated devices (and `xla_flags`: `worker_env`).
    `cwd`: a temporary folder, so a relative default path can never reach the checkout."""
    popen.setdefault("stdout", subprocess.PIPE)
    popen.setdefault("stderr", subprocess.PIPE)
    return subprocess.Popen(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=worker_env(devices, xla_flags),
        text=True,
        **popen,
    )


def run_script(
    name: str,
    code: str,
    devices: int,
    cwd: str | os.PathLike,
    timeout: float,
    xla_flags: str = "",
) -> dict:
    """`python -c code` with `devices` simulated devices (and `xla_flags`: `worker_env`): its
    ``RESULT {json}``, or the calling test fails with the script's own message (`collect`)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=cwd,
        env=worker_env(devices, xla_flags),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    return worker_result(collect(name, proc, timeout))


def collect(name: str, proc: subprocess.Popen, timeout: float) -> dict | str:
    """The worker's last ``RESULT {json}`` line, or a string that says why there is none (the test
    that reads it fails with that text)."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        return f"{name}: timed out after {timeout:.0f} s\n{err[-3000:]}"
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return f"{name}: exit {proc.returncode}\n{out[-2000:]}\n{err[-6000:]}"
    return json.loads(lines[-1][len("RESULT ") :])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def once_per_session(tmp_path_factory, name: str, compute: Callable[[pathlib.Path], dict]) -> dict:
    """`compute(folder)` run once per test session, even under pytest-xdist: the first worker to
    take the lock runs it and stores its JSON result beside the session's temporary directory;
    the others read that."""
    base = tmp_path_factory.getbasetemp()
    # Under xdist each worker's base is <session dir>/popen-gwN: share the session dir.
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    stored = shared / f"{name}_results.json"
    with open(shared / f"{name}_results.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if stored.exists():
                return json.loads(stored.read_text())
            folder = shared / f"{name}_runs"
            folder.mkdir(exist_ok=True)
            out = compute(folder)
            stored.write_text(json.dumps(out))
            return out
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def worker_result(value: dict | str) -> dict:
    """A worker's result as `collect` gave it, failing the calling test with the worker's own
    message if it had none."""
    if isinstance(value, str):
        pytest.fail(value)
    return value
