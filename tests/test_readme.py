"""The README, executed: every shell and Python block runs, in order, as written.

The blocks run in a fresh copy of this checkout (the files git would commit, in a new repository),
from its root with the relative paths the README writes, one `bash -euo pipefail` (or `python`)
process per block, like a user pasting them one after another. At the end the copy's
`git status` must be clean: no example writes anything git would show.

What may change, and only this:
- the size knob (`shrink`): every `xlstm-eqx train` gets the tiny preset, short sequences, fewer
  steps (`--steps N` becomes `--steps max(3, N // 100)`, keeping their order; a new run without
  `--steps` is shrunk from the default `TrainConfig.steps` the same way) and a capped corpus;
- `pip install -e ".[EXTRAS]"` is not run (the test environment is already installed, and
  installing the copy would move this environment's editable install): each named extra must
  exist in `pyproject.toml` with every requirement installed;
- the user's own text the README points at (`data/my_corpus/**/*.txt`, `data/notes.jsonl`) is
  written first.

A block preceded by `<!-- readme: not run, REASON -->` needs hardware CI has not (GPUs, several
hosts) or is the suite itself (`<!-- readme: ci -->`, which must be the command `.ci/run` runs):
it is checked without running, by `bash -n` and by parsing each `xlstm-eqx` command with the CLI's
own parser (so a renamed or removed flag still fails here).
"""

import dataclasses
import importlib.metadata
import os
import pathlib
import re
import resource
import shlex
import shutil
import subprocess
import sys
import time
import tomllib

import pytest
from packaging.requirements import Requirement

from xlstm_eqx.cli import build_parser
from xlstm_eqx.training import TrainConfig


ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

_FENCE = re.compile(r"^```(\w*)\s*$")
_DIRECTIVE = re.compile(r"^<!--\s*readme:\s*(.*?)\s*-->\s*$")


@dataclasses.dataclass(frozen=True)
class Block:
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    directive: str  # "" (run), "ci", or "not run, REASON"


def readme_blocks(text: str) -> list[Block]:
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        j = i + 1
        while j < len(lines) and not lines[j].startswith("```"):
            j += 1
        k = i - 1
        while k >= 0 and not lines[k].strip():
            k -= 1
        d = _DIRECTIVE.match(lines[k]) if k >= 0 else None
        blocks.append(
            Block(i + 1, m.group(1), "\n".join(lines[i + 1 : j]) + "\n", d.group(1) if d else "")
        )
        i = j + 1
    return blocks


def logical_lines(script: str) -> list[str]:
    """Shell lines with backslash continuations joined."""
    out, cur = [], ""
    for line in script.splitlines():
        if line.endswith("\\"):
            cur += line[:-1] + " "
            continue
        out.append(cur + line)
        cur = ""
    if cur:
        out.append(cur)
    return out


_STEPS_FLAGS = ["--preset", "tiny", "--seq-len", "32", "--batch-size", "4"]
_STEPS_FLAGS += ["--eval-batches", "1", "--sample-tokens", "24"]
_STEPS_FLAGS += ["--max-data-bytes", "400000", "--warmup-steps", "1"]


def shell_words(line: str) -> list[str]:
    """A shell line's words and operators (`&&`, `;`, `|`, ...), quotes resolved, comment dropped."""
    lex = shlex.shlex(line, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    return list(lex)


_OPERATORS = ("&&", "||", ";", "|", "&")


def simple_commands(line: str) -> list[list[str]]:
    """The words of each command of a shell line."""
    commands: list[list[str]] = [[]]
    for tok in shell_words(line):
        if tok in _OPERATORS:
            commands.append([])
        else:
            commands[-1].append(tok)
    return [c for c in commands if c]


def _fewer_steps(steps: int) -> int:
    return max(3, steps // 100)


def _shrink_train(words: list[str]) -> list[str]:
    out = []
    for i, word in enumerate(words):
        prev = words[i - 1] if i else ""
        if prev == "--steps":
            word = str(_fewer_steps(int(word)))
        elif prev == "--profile-steps":
            word = "2:3"
        out.append(word)
    if "--steps" not in words and "--resume" not in words:  # the default, made small
        out += ["--steps", str(_fewer_steps(TrainConfig().steps))]
    if "--init-from" in words:  # the source's architecture: no --preset
        return out + _STEPS_FLAGS[2:]
    return out + _STEPS_FLAGS


def shrink(line: str) -> str:
    """The size knob: each `xlstm-eqx train` command made small, everything else as written."""
    if "xlstm-eqx train" not in line:
        return line
    parts, words = [], []
    for tok in [*shell_words(line), ";"]:
        if tok not in _OPERATORS:
            words.append(tok)
            continue
        is_train = "xlstm-eqx" in words and words[words.index("xlstm-eqx") + 1 :][:1] == ["train"]
        parts.append(shlex.join(_shrink_train(words) if is_train else words))
        parts.append(tok)
        words = []
    return " ".join(parts[:-1])


_PIP = re.compile(r"(?:python -m )?pip install -e \"\.\[([\w,-]+)\]\"(?: [\w-]+)*")


def check_extras_installed(names: str) -> str:
    """Each extra exists in pyproject.toml and its requirements are installed; returns `true`."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    for name in names.split(","):
        assert name in extras, f"README installs extra {name!r}, which pyproject.toml lacks"
        for spec in extras[name]:
            req = Requirement(spec)
            try:
                version = importlib.metadata.version(req.name)
            except importlib.metadata.PackageNotFoundError:
                pytest.fail(f"extra {name!r}: {req.name} is not installed")
            assert req.specifier.contains(version, prereleases=True), (
                f"extra {name!r}: {req.name} {version} does not satisfy {spec}"
            )
    return "true"


def parse_commands(block: Block) -> None:
    """A block that does not run: its shell syntax and every `xlstm-eqx` command are valid."""
    if block.lang == "bash":
        proc = subprocess.run(["bash", "-n"], input=block.text, capture_output=True, text=True)
        assert proc.returncode == 0, f"README line {block.line}: {proc.stderr}"
    for line in logical_lines(block.text):
        for words in simple_commands(line):
            if "xlstm-eqx" in words:
                argv = words[words.index("xlstm-eqx") + 1 :]
                try:
                    build_parser().parse_args(argv)
                except SystemExit:
                    pytest.fail(f"README line {block.line}: `xlstm-eqx {shlex.join(argv)}`")


def _checkout_copy(dest: pathlib.Path) -> None:
    """The files git would commit (tracked and new, not ignored), in a new repository."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for rel in filter(None, listed.split("\0")):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "copy"]):
        subprocess.run([*git, *args], cwd=dest, check=True, capture_output=True)


def _children_cpu_seconds() -> float:
    """CPU time of the finished subprocesses: the cost of a block on a loaded machine."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _users_own_text(root: pathlib.Path) -> None:
    for i, sub in enumerate(["a", "a/b", "c"]):
        d = root / "data" / "my_corpus" / sub
        d.mkdir(parents=True, exist_ok=True)
        (d / f"notes{i}.txt").write_text(f"def f{i}(x):\n    return x * {i}\n" * 200)
    rows = [f'{{"text": "line {i}: the quick brown fox"}}\n' for i in range(300)]
    (root / "data" / "notes.jsonl").write_text("".join(rows))


def test_readme_directives_are_known():
    blocks = readme_blocks(README.read_text())
    assert len(blocks) >= 10
    for b in blocks:
        assert b.lang in ("bash", "python"), f"README line {b.line}: fence language {b.lang!r}"
        assert b.directive in ("", "ci") or re.fullmatch(r"not run, .{10,}", b.directive), (
            f"README line {b.line}: unknown directive {b.directive!r}"
        )


def test_shrink_makes_every_new_run_small():
    def steps(line: str) -> list[str]:
        words = simple_commands(shrink(line))[-1]
        return [words[i + 1] for i, w in enumerate(words) if w == "--steps"]

    assert steps("xlstm-eqx train --out r") == [str(max(3, TrainConfig().steps // 100))]
    assert steps("a && xlstm-eqx train --steps 2000") == ["20"]
    assert steps("xlstm-eqx train --out r --resume") == []  # a resume keeps the run's own steps
    assert shrink("xlstm-eqx eval --out r") == "xlstm-eqx eval --out r"


def test_readme_ci_block_is_what_ci_runs():
    (ci,) = [b for b in readme_blocks(README.read_text()) if b.directive == "ci"]
    assert ci.text.strip() in (ROOT / ".ci" / "run").read_text()


@pytest.mark.parametrize(
    "block",
    [b for b in readme_blocks(README.read_text()) if b.directive],
    ids=lambda b: f"line{b.line}",
)
def test_readme_block_not_run_still_parses(block):
    parse_commands(block)


@pytest.mark.slow
def test_readme_runs_in_order_as_written(tmp_path):
    clone = tmp_path / "clone"
    clone.mkdir()
    _checkout_copy(clone)
    _users_own_text(clone)
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    env["XLSTM_EQX_CACHE_DIR"] = str(tmp_path / "compile_cache")  # one cache for every run
    env.pop("PYTEST_XDIST_WORKER", None)
    env.pop("PYTEST_CURRENT_TEST", None)
    for i, block in enumerate(readme_blocks(README.read_text())):
        if block.directive:
            continue
        if block.lang == "python":
            script = tmp_path / f"block{i}.py"
            script.write_text(block.text)
            cmd = [sys.executable, str(script)]
        else:
            lines = [
                shrink(_PIP.sub(lambda m: check_extras_installed(m.group(1)), line))
                for line in logical_lines(block.text)
            ]
            cmd = ["bash", "-euo", "pipefail", "-c", "\n".join(lines)]
        t0, cpu0 = time.perf_counter(), _children_cpu_seconds()
        proc = subprocess.run(cmd, cwd=clone, env=env, capture_output=True, text=True, timeout=900)
        wall, cpu = time.perf_counter() - t0, _children_cpu_seconds() - cpu0
        print(f"README block at line {block.line}: {wall:.1f} s ({cpu:.1f} s CPU)")
        assert proc.returncode == 0, (
            f"README block at line {block.line} failed ({proc.returncode}):\n"
            f"{cmd[-1]}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"
        )
    shutil.rmtree(clone / "data" / "my_corpus")
    os.remove(clone / "data" / "notes.jsonl")
    status = subprocess.run(
        ["git", "status", "--porcelain"], cwd=clone, capture_output=True, text=True, check=True
    ).stdout
    assert status == "", f"the README's commands left files git shows:\n{status}"
    summary = clone / "runs" / "xlstm" / "summary.json"
    assert summary.is_file(), "the main job wrote no runs/xlstm/summary.json"
