import gc
import os
import subprocess

import equinox as eqx
import hypothesis
import jax
import jax.random as jr
import pytest

from tests.corpus import write_corpus
from tests.multiprocess import FAST_XLA


jax.config.update("jax_numpy_dtype_promotion", "strict")

# Compile fast (about 30% of the suite's time): read when the backend starts, i.e. at the first
# computation, after this module loads; subprocesses (CLI, notebooks, workers) inherit it.
# XLSTM_EQX_TEST_FULL_XLA=1 keeps XLA's defaults.
if not os.environ.get("XLSTM_EQX_TEST_FULL_XLA") and "optimization_level" not in os.environ.get(
    "XLA_FLAGS", ""
):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_XLA}".strip()

# The CLI turns on JAX's persistent compilation cache (a user-level folder by default): tests
# never write to the home directory; the cache tests point it at tmp_path themselves.
os.environ["XLSTM_EQX_CACHE_DIR"] = "off"

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Each compiled XLA:CPU executable holds a few memory mappings (about six) for as long as JAX's
# caches keep it. A test worker compiles thousands of programs, and past the kernel's limit
# (vm.max_map_count, 65530 by default) the next compilation crashes the worker with a segfault
# inside LLVM. Dropping the caches once a worker holds half that many keeps it far below.
_MAPS = "/proc/self/maps"
_MAPS_LIMIT = 30_000


def _mapping_count() -> int:
    with open(_MAPS, "rb") as f:
        return sum(1 for _ in f)


@pytest.fixture(autouse=True)
def _bounded_compiled_executables():
    yield
    if os.path.exists(_MAPS) and _mapping_count() > _MAPS_LIMIT:
        jax.clear_caches()
        eqx.clear_caches()
        gc.collect()


def _tree(root: str) -> list[tuple[str, int]]:
    return sorted(
        (os.path.join(d, f), os.stat(os.path.join(d, f)).st_mtime_ns)
        for d, _, files in os.walk(root)
        for f in files
    )


def _git_status() -> str:
    return subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all"],
        cwd=_ROOT,
        capture_output=True,
        text=True,
    ).stdout


@pytest.fixture(scope="session", autouse=True)
def _no_test_writes_into_the_checkout():
    """`runs/` of the working tree is the user's (the README's first command writes there), and
    nothing else git would show may appear either. The git check runs under CI only (a fresh
    clone): in a working checkout its developer edits files while the tests run."""
    runs = os.path.join(_ROOT, "runs")
    before, status = _tree(runs), _git_status() if os.environ.get("CI") else ""
    yield
    assert _tree(runs) == before, f"a test wrote into {runs!r}; use tmp_path"
    if os.environ.get("CI"):
        assert _git_status() == status, f"tests left files in the checkout:\n{_git_status()}"


hypothesis.settings.register_profile(
    "ci", max_examples=12, deadline=None, derandomize=True, print_blob=True
)
hypothesis.settings.register_profile("dev", max_examples=12, deadline=None, print_blob=True)
hypothesis.settings.register_profile("deep", max_examples=200, deadline=None, print_blob=True)
# the fast tier (`-m "not slow"`, README "Tests: the fast tier and the full suite"): every property
# still runs, on fewer examples; the full suite draws the profile's 12
hypothesis.settings.register_profile("fast", max_examples=4, deadline=None, print_blob=True)
hypothesis.settings.load_profile(
    os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev")
)


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("markexpr") == "not slow" and "HYPOTHESIS_PROFILE" not in os.environ:
        hypothesis.settings.load_profile("fast")


def tree_allclose(x, y, *, rtol=1e-5, atol=1e-8) -> bool:
    return bool(eqx.tree_equal(x, y, typematch=True, rtol=rtol, atol=atol))


class _KeyGen:
    def __init__(self, seed: int):
        self._key = jr.key(seed)

    def __call__(self):
        self._key, sub = jr.split(self._key)
        return sub


@pytest.fixture(scope="session", autouse=True)
def _caches_in_tmp(tmp_path_factory):
    """Token stores, Hugging Face and W&B files go to the session's temporary directory (never the
    working tree or the user's cache), and nothing reaches for the network. Set in os.environ, so
    subprocesses started by tests inherit it."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    os.environ["XLSTM_EQX_DATA_CACHE_DIR"] = str(root / "token_stores")
    os.environ["HF_DATASETS_CACHE"] = str(root / "hf_datasets_cache")
    os.environ["HF_HOME"] = str(root / "hf_home")
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ[name] = "1"
    os.environ["WANDB_MODE"] = "offline"
    os.environ["WANDB_SILENT"] = "true"
    os.environ["TRACKIO_DIR"] = str(root / "trackio")


@pytest.fixture
def data_file(tmp_path):
    """The small training corpus (`tests/corpus.py`) as a file under `tmp_path/data/`."""
    return write_corpus(tmp_path / "data")


@pytest.fixture
def getkey():
    return _KeyGen(0)
