"""Untrusted files: safetensors headers, checkpoint ``meta.json`` and ``.npz`` members, transformers
``config.json`` (and shard index), xlstm-jax ``.npz`` parameters.

A malformed file may only end in a clean load or in the project's own error (`SafetensorsError`,
`InteropError`, `CheckpointError`) with a one-line message: never another exception type, never
an allocation the file's size does not justify. The hypothesis fuzzing and the cases that would
allocate gigabytes on a regression run in one subprocess under an address-space limit
(``RLIMIT_AS``, a few GiB above its baseline), so that an unbounded allocation is a
``MemoryError`` reported as a failure rather than a machine driven into swap.
"""

import dataclasses
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import warnings
import zipfile
from typing import Any

import hypothesis
import hypothesis.strategies as st
import jax.numpy as jnp
import numpy as np
import pytest

from xlstm_eqx.interop import (
    InteropError,
    from_hf_pretrained,
    from_xlstm_jax,
    load_xlstm_jax_params,
)
from xlstm_eqx.interop.safetensors_files import SafetensorsError, SafetensorsFile, save_file
from xlstm_eqx.training import CheckpointError, checkpoint as npz_checkpoint, orbax_checkpoint
from xlstm_eqx.training.checkpoint import load_metadata, restore_checkpoint, save_checkpoint


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "interop")


# ----------------------------------------------------------------------------------------------
# writing malformed files


class Raw(str):
    """JSON text spliced in verbatim (NaN, 1e400, 5000-digit numbers, deep nesting, ...)."""


class Pairs(list):
    """A JSON object as ``(key, value)`` pairs, so that keys may repeat."""


def dumps(value) -> str:
    """JSON text of ``value``, with `Raw` pieces and repeated `Pairs` keys kept as they are."""
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, Pairs):
        return "{" + ",".join(f"{json.dumps(k)}:{dumps(v)}" for k, v in value) + "}"
    if isinstance(value, dict):
        return dumps(Pairs(value.items()))
    if isinstance(value, list | tuple):
        return "[" + ",".join(dumps(v) for v in value) + "]"
    return json.dumps(value)


def mutate(obj, path: tuple, mode: str, raw: Raw):
    """``obj`` with the value at ``path`` replaced by ``raw`` (``mode="replace"``, which also adds a
    missing key), deleted (``"delete"``), or repeated with ``raw`` as the second value
    (``"duplicate"``). Paths that do not exist leave ``obj`` unchanged."""
    if not path:
        return raw
    head, rest = path[0], path[1:]
    if isinstance(obj, dict | Pairs) and isinstance(head, str):
        pairs = list(obj) if isinstance(obj, Pairs) else list(obj.items())
        if head not in [k for k, _ in pairs]:
            return Pairs(pairs + [(head, raw)]) if mode == "replace" and not rest else obj
        out = Pairs()
        for k, v in pairs:
            if k != head:
                out.append((k, v))
            elif rest:
                out.append((k, mutate(v, rest, mode, raw)))
            elif mode == "replace":
                out.append((k, raw))
            elif mode == "duplicate":
                out += [(k, v), (k, raw)]
        return out
    if isinstance(obj, list) and isinstance(head, int) and 0 <= head < len(obj):
        out = list(obj)
        if rest:
            out[head] = mutate(obj[head], rest, mode, raw)
        elif mode == "delete":
            del out[head]
        elif mode == "duplicate":
            out.insert(head, raw)
        else:
            out[head] = raw
        return out
    return obj


def write(path, data: bytes | str) -> None:
    with open(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)


def safetensors_bytes(header: bytes | str, data: bytes = b"", length: int | None = None) -> bytes:
    header = header.encode() if isinstance(header, str) else header
    return struct.pack("<Q", len(header) if length is None else length) + header + data


def npy_bytes(descr: str, shape: str, fortran: str = "False", data=b"", version: int = 1) -> bytes:
    """One ``.npy`` member with a hand-written header (the fields need not make sense)."""
    header = f"{{'descr': {descr}, 'fortran_order': {fortran}, 'shape': {shape}, }}"
    prefix = 10 if version == 1 else 12
    header += " " * (-(len(header) + 1 + prefix) % 64) + "\n"
    size = struct.pack("<H", len(header)) if version == 1 else struct.pack("<I", len(header))
    return b"\x93NUMPY" + bytes([version, 0]) + size + header.encode("latin1") + bytes(data)


def write_npz(path, members, *, compress: bool = False) -> None:
    """``members``: ``(member name, bytes)`` pairs, names may repeat."""
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with warnings.catch_warnings(), zipfile.ZipFile(path, "w", method) as z:
        warnings.simplefilter("ignore")  # "Duplicate name": wanted here
        for name, data in members:
            z.writestr(name, data)


def one_line(error: BaseException) -> str:
    msg = str(error)
    assert msg.strip() and len(msg.splitlines()) == 1, f"not a one-line message: {msg!r}"
    return msg


def clean_or(error: type[Exception], fn) -> str | None:
    """Run ``fn``: ``None`` for a clean return, the message of an ``error`` (which must be one
    line); any other exception propagates (a failure)."""
    try:
        fn()
    except error as e:
        return one_line(e)
    return None


def fixture_copy(name: str, dst) -> str:
    out = os.path.join(dst, name)
    shutil.copytree(os.path.join(FIXTURES, name), out)
    return out


def read_all(path) -> None:
    with SafetensorsFile(path) as f:
        for k in f.keys():
            f.read(k)


def template():
    """The small tree the checkpoint cases save and restore (its npz members: a000000 = ['b']
    bfloat16 (4,) stored as uint16, a000001 = ['n'] int32 (), a000002 = ['w'] float32 (3, 4))."""
    return {
        "w": jnp.arange(12, dtype=jnp.float32).reshape(3, 4),
        "b": jnp.asarray([1.5, -2.0, 0.25, 8.0], jnp.bfloat16),
        "n": jnp.asarray(7, jnp.int32),
    }


def save_small_checkpoint(root, tree=None) -> str:
    """The older single-file format (`training.checkpoint`), still read for runs made before."""
    return save_checkpoint(root, 1, {"model": template() if tree is None else tree}, {"k": [1]})


@dataclasses.dataclass(frozen=True)
class CheckpointFormat:
    """One checkpoint format's writer, reader and the JSON file it keeps its metadata in."""

    module: Any
    meta_file: str

    def save(self, root, tree=None) -> str:
        tree = template() if tree is None else tree
        return self.module.save_checkpoint(root, 1, {"model": tree}, {"k": [1]})


FORMATS = {
    "npz": CheckpointFormat(npz_checkpoint, "meta.json"),
    "orbax": CheckpointFormat(orbax_checkpoint, os.path.join("meta", "metadata")),
}


@pytest.fixture(params=list(FORMATS))
def ckpt_format(request) -> CheckpointFormat:
    """The checks on checkpoint files apply to both formats: the trainer's orbax checkpoints and
    the older `.npz` ones `load_run` still reads."""
    return FORMATS[request.param]


def rewrite_tensors(path, edit) -> None:
    with SafetensorsFile(path) as f:
        tensors = {k: f.read(k) for k in f.keys()}
    edit(tensors)
    save_file(tensors, path, {"format": "pt"})


def edit_json(path, edit) -> None:
    with open(path) as f:
        obj = json.load(f)
    edit(obj)
    write(path, json.dumps(obj))


# ----------------------------------------------------------------------------------------------
# safetensors


def _entry(dtype="U8", shape=(1,), offsets=(0, 1)) -> str:
    return dumps({"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)})


@pytest.mark.parametrize(
    "header, data",
    [
        pytest.param(
            dumps({"a": Raw(_entry("F32", (1,), (0, 4))), "b": Raw(_entry("F32", (1,), (0, 4)))}),
            4,
            id="overlapping-ranges",
        ),
        pytest.param(
            '{"a":' + _entry("F32", (1,), (0, 4)) + ',"a":' + _entry("F32", (1,), (0, 4)) + "}",
            4,
            id="repeated-name-same-entry",
        ),
        pytest.param(
            '{"a":' + _entry("F32", (1,), (0, 4)) + ',"a":' + _entry("U8", (4,), (0, 4)) + "}",
            4,
            id="repeated-name-other-dtype",
        ),
        pytest.param('{"a":{"dtype":"U8","shape":"12","data_offsets":[0,2]}}', 2, id="str-shape"),
        pytest.param(
            '{"a":{"dtype":"U8","shape":[true,true],"data_offsets":[0,1]}}', 1, id="bool-shape"
        ),
        pytest.param('{"a":' + _entry("U8", (-1, -1), (0, 1)) + "}", 1, id="negative-dims"),
        pytest.param(
            '{"a":{"dtype":"U8","shape":[1e400],"data_offsets":[0,1]}}', 1, id="infinite-dim"
        ),
        pytest.param('{"__metadata__":5,"a":' + _entry() + "}", 1, id="metadata-not-object"),
        pytest.param(
            '{"__metadata__":' + "[" * 100_000 + "]" * 100_000 + "}", 0, id="deep-nesting"
        ),
    ],
)
def test_malformed_safetensors_headers_are_refused(tmp_path, header, data):
    path = tmp_path / "t.safetensors"
    write(path, safetensors_bytes(header, bytes(data)))
    with pytest.raises(SafetensorsError) as e:
        read_all(path)
    assert "t.safetensors" in one_line(e.value)


def test_safetensors_written_here_are_read_by_the_reference_parser(tmp_path):
    """Our writer's files (bf16 included) are what the safetensors package reads."""
    from safetensors import safe_open

    tensors = {
        "x": np.asarray([[1.5, -2.25]], dtype=jnp.bfloat16),
        "y": np.arange(3, dtype=np.int32),
        "z": np.zeros((0, 2), np.float16),
    }
    path = tmp_path / "t.safetensors"
    save_file(tensors, path, {"k": "v"})
    with safe_open(path, framework="numpy") as f:
        assert f.metadata() == {"k": "v"} and sorted(f.keys()) == ["x", "y", "z"]
        for k, v in tensors.items():
            got = f.get_tensor(k)
            assert got.dtype == v.dtype and got.shape == v.shape
            np.testing.assert_array_equal(got, v)
    with SafetensorsFile(path) as f:
        assert f.keys() == ["x", "y", "z"]
        for k, v in tensors.items():
            got = f.read(k)
            assert got.dtype == v.dtype and got.flags.writeable
            np.testing.assert_array_equal(got, v)


# ----------------------------------------------------------------------------------------------
# non-finite weights


def test_hf_nan_weight_is_named(tmp_path):
    path = fixture_copy("hf_fused_tied", tmp_path)

    def edit(t):
        t["backbone.out_norm.weight"][3] = np.nan

    rewrite_tensors(os.path.join(path, "model.safetensors"), edit)
    with pytest.raises(InteropError, match=r"backbone\.out_norm\.weight.*non-finite") as e:
        from_hf_pretrained(path)
    one_line(e.value)


def test_xlstm_jax_inf_weight_is_named(tmp_path):
    path = os.path.join(fixture_copy("xlstm_jax_llama", tmp_path), "params.safetensors")
    name = "lm_head/out_dense/kernel"
    rewrite_tensors(path, lambda t: t[name].__setitem__((0, 1), -np.inf))
    config = xj_config("xlstm_jax_llama")
    with pytest.raises(InteropError, match=f"{name}.*non-finite") as e:
        from_xlstm_jax(load_xlstm_jax_params(path), config)
    one_line(e.value)


def test_checkpoint_nan_leaf_is_named(tmp_path, ckpt_format):
    tree = template()
    tree["w"] = tree["w"].at[1, 2].set(jnp.nan)
    path = ckpt_format.save(tmp_path, tree)
    with pytest.raises(CheckpointError, match=r"model\['w'\].*non-finite") as e:
        ckpt_format.module.restore_checkpoint(path, {"model": template()})
    one_line(e.value)


def xj_config(name: str):
    from xlstm_eqx import LlamaConfig, xLSTMLMModelConfig

    with open(os.path.join(FIXTURES, name, "config.json")) as f:
        d = json.load(f)
    cls = xLSTMLMModelConfig if d["model_kind"] == "xlstm" else LlamaConfig
    return cls.from_dict(d["model_config"])


@pytest.mark.parametrize(
    "names",
    [["a", "a/b"], ["a/b", "a"], ["a/" * 100_000 + "b"]],
    ids=["array-then-prefix", "prefix-then-array", "100k-levels"],
)
def test_xlstm_jax_parameter_names_must_form_a_tree(tmp_path, names):
    path = tmp_path / "params.safetensors"
    save_file({n: np.zeros(2, np.float32) for n in names}, path)
    with pytest.raises(InteropError, match="parameter name") as e:
        load_xlstm_jax_params(path)
    one_line(e.value)


def test_xlstm_jax_num_blocks_checked_against_the_parameters():
    import dataclasses

    from xlstm_eqx.interop import to_xlstm_jax

    config = xj_config("xlstm_jax_mlstm_v1")
    params = load_xlstm_jax_params(os.path.join(FIXTURES, "xlstm_jax_mlstm_v1"))
    params = to_xlstm_jax(from_xlstm_jax(params, config), scan_blocks=False)  # per-block names
    with pytest.raises(InteropError, match=r"num_blocks=5.*2 blocks") as e:
        from_xlstm_jax(params, dataclasses.replace(config, num_blocks=5))
    one_line(e.value)


# ----------------------------------------------------------------------------------------------
# transformers config.json


@pytest.mark.parametrize(
    "field, text",
    [
        ("norm_eps", "Infinity"),
        ("norm_eps", "1e400"),
        ("gate_soft_cap", "NaN"),
        ("vocab_size", "9" * 5000),
        ("hidden_size", str(2**40)),
        ("architectures", "5"),
        ("chunk_size", "[" * 100_000 + "]" * 100_000),
    ],
    ids=["inf-literal", "1e400", "nan", "5000-digits", "2^40", "not-a-list", "deep-nesting"],
)
def test_hf_config_values_are_bounded(tmp_path, field, text):
    path = fixture_copy("hf_fused_tied", tmp_path)
    cfg_path = os.path.join(path, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    if field == "hidden_size":  # both names of the width
        cfg["embedding_dim"] = Raw(text)
    write(cfg_path, dumps(mutate(cfg, (field,), "replace", Raw(text))))
    with pytest.raises(InteropError) as e:
        from_hf_pretrained(path)
    msg = one_line(e.value)
    assert field in msg or "config.json" in msg


def test_hf_num_hidden_layers_checked_against_the_weights(tmp_path):
    path = fixture_copy("hf_fused_tied", tmp_path)
    cfg_path = os.path.join(path, "config.json")
    edit_json(cfg_path, lambda c: c.update(num_hidden_layers=4, num_blocks=4))
    with pytest.raises(InteropError, match=r"num_hidden_layers=4.*3 blocks") as e:
        from_hf_pretrained(path)
    one_line(e.value)


def test_hf_shard_index_errors_are_one_line(tmp_path):
    path = fixture_copy("hf_small", tmp_path)
    index = os.path.join(path, "model.safetensors.index.json")
    edit_json(index, lambda i: i["weight_map"].update({"lm_head.weight": "config.json"}))
    with pytest.raises(InteropError, match="config.json") as e:
        from_hf_pretrained(path)
    one_line(e.value)
    edit_json(index, lambda i: i["weight_map"].update({"lm_head.weight": "a\x00b"}))
    with pytest.raises(InteropError) as e:
        from_hf_pretrained(path)
    one_line(e.value)


# ----------------------------------------------------------------------------------------------
# checkpoints: meta.json and npz members


@pytest.mark.parametrize(
    "path, mode, text",
    [
        (("trees",), "replace", "[]"),
        (("trees", "model"), "replace", "5"),
        (("trees", "model", 0, "path"), "delete", ""),
        (("trees", "model", 0, "shape"), "replace", '"abc"'),
        (("trees", "model", 2, "shape"), "replace", "[-3, -4]"),
        (("trees", "model", 1, "dtype"), "replace", '"object"'),
        (("step",), "replace", '"x"'),
        (("step",), "replace", "9" * 5000),
        (("metadata",), "replace", "5"),
        (("metadata", "k"), "replace", "NaN"),
        (("metadata", "k"), "replace", "[" * 100_000 + "]" * 100_000),
        (("format",), "duplicate", '"other"'),
    ],
    ids=[
        "trees-list",
        "tree-int",
        "no-path",
        "str-shape",
        "negative-shape",
        "object-dtype",
        "str-step",
        "5000-digit-step",
        "metadata-int",
        "nan",
        "deep-nesting",
        "repeated-key",
    ],
)
def test_malformed_checkpoint_metadata(tmp_path, ckpt_format, path, mode, text):
    ckpt = ckpt_format.save(tmp_path)
    meta_path = os.path.join(ckpt, ckpt_format.meta_file)
    with open(meta_path) as f:
        meta = json.load(f)
    write(meta_path, dumps(mutate(meta, path, mode, Raw(text))))
    with pytest.raises(CheckpointError) as e:
        ckpt_format.module.load_metadata(ckpt)
    assert ckpt_format.meta_file in one_line(e.value)
    with pytest.raises(CheckpointError) as e:
        ckpt_format.module.restore_checkpoint(ckpt, {"model": template()})
    one_line(e.value)


def test_checkpoint_mismatch_is_one_line(tmp_path, ckpt_format):
    ckpt = ckpt_format.save(tmp_path)
    other = dict(template(), w=jnp.zeros((4, 3), jnp.float32), x=jnp.zeros(2))
    with pytest.raises(CheckpointError, match=r"\['w'\].*\[3, 4\].*\[4, 3\]") as e:
        ckpt_format.module.restore_checkpoint(ckpt, {"model": other})
    assert "['x']: missing" in one_line(e.value)


def _ckpt_members(**replace) -> list[tuple[str, bytes]]:
    members = {
        "a000000.npy": npy_bytes("'<u2'", "(4,)", data=bytes(8)),
        "a000001.npy": npy_bytes("'<i4'", "()", data=bytes(4)),
        "a000002.npy": npy_bytes("'<f4'", "(3, 4)", data=np.arange(12, dtype="<f4").tobytes()),
    }
    members.update(replace)
    return list(members.items())


@pytest.mark.parametrize(
    "members, match",
    [
        (_ckpt_members(**{"a000002.npy": npy_bytes("'<f4'", "(4, 3)", data=bytes(48))}), "(4, 3)"),
        (
            _ckpt_members(**{"a000002.npy": npy_bytes("'<f8'", "(3, 4)", data=bytes(96))}),
            "f8|float64",
        ),
        (_ckpt_members(**{"a000001.npy": npy_bytes("'|O'", "()", data=bytes(8))}), "a000001"),
        (_ckpt_members(**{"a000002.npy": npy_bytes("'<f4'", "(3, 4)", data=bytes(20))}), "a000002"),
        (_ckpt_members()[:2], "a000002"),
        (_ckpt_members() + _ckpt_members()[:1], "a000000"),
    ],
    ids=["shape", "dtype", "object", "short-data", "missing", "repeated"],
)
def test_checkpoint_npz_members_checked(tmp_path, members, match):
    ckpt = save_small_checkpoint(tmp_path)
    write_npz(os.path.join(ckpt, "model.npz"), members)
    with pytest.raises(CheckpointError, match=match) as e:
        restore_checkpoint(ckpt, {"model": template()})
    one_line(e.value)


def test_checkpoint_npz_fortran_order_and_compressed_members_load(tmp_path):
    ckpt = save_small_checkpoint(tmp_path)
    w = np.arange(12, dtype="<f4").reshape(3, 4)
    fortran = npy_bytes("'<f4'", "(3, 4)", "True", data=np.asfortranarray(w).T.tobytes())
    write_npz(
        os.path.join(ckpt, "model.npz"),
        _ckpt_members(**{"a000002.npy": fortran}),
        compress=True,
    )
    trees, _ = restore_checkpoint(ckpt, {"model": template()})
    np.testing.assert_array_equal(np.asarray(trees["model"]["w"]), w)


# ----------------------------------------------------------------------------------------------
# under an address-space limit (one subprocess): declared sizes of gigabytes, and fuzzing

LIMIT_HEADROOM = 3 << 30  # bytes of address space above the subprocess's warmed-up baseline
CHILD = (
    "import sys; from tests.interop.test_file_formats import child_main; child_main(sys.argv[1])"
)

# case -> (error type, text the message must contain); each refused fast, without allocating.
HUGE_CASES = {
    "checkpoint-npz-2^33-elements": ("CheckpointError", "8589934592"),
    "xlstm-jax-npz-2^33-elements": ("InteropError", "8589934592"),
    "hf-num-hidden-layers-1e7": ("InteropError", "num_hidden_layers"),
    "hf-num-hidden-layers-1e9": ("InteropError", "num_hidden_layers"),
    "xlstm-jax-config-num-blocks-1e9": ("InteropError", "num_blocks"),
}


@pytest.mark.slow
def test_huge_sizes_and_fuzzing_under_an_address_space_limit(tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, *filter(None, env.get("PYTHONPATH", "").split(":"))])
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # nothing written into the working tree
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    result = json.loads(lines[-1][len("RESULT ") :])
    problems = []
    for case, (kind, text) in HUGE_CASES.items():
        r = result["huge"][case]
        if (
            r["type"] != kind
            or text not in r["message"]
            or len(r["message"].splitlines()) != 1
            or r["seconds"] > 10
            or r["rss_growth_mib"] > 256
        ):
            problems.append(f"{case}: {r}")
    problems += [f"{name}:\n{r}" for name, r in result["fuzz"].items() if r != "ok"]
    assert not problems, "\n".join(problems)
    assert set(result["fuzz"]) == {f.__name__ for f in FUZZERS}


# ---- the subprocess


def _rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _vm_size() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


def _measure(fn) -> dict:
    """Outcome of ``fn`` (error type and message), its time and peak-memory growth."""
    import signal
    import time

    def alarm(*_):
        raise TimeoutError("still running after 30 s")

    before, start = _rss_mib(), time.perf_counter()
    signal.signal(signal.SIGALRM, alarm)
    signal.alarm(30)
    try:
        fn()
        out = {"type": None, "message": ""}
    except Exception as e:  # recorded, judged by the test
        out = {"type": type(e).__name__, "message": str(e)[:600]}
    finally:
        signal.alarm(0)
    out["seconds"] = round(time.perf_counter() - start, 3)
    out["rss_growth_mib"] = round(_rss_mib() - before, 1)
    return out


class _Work:
    """The files the subprocess mutates: copies of the transformers fixtures, a small checkpoint
    and an xlstm-jax params.npz."""

    def __init__(self, root: str):
        self.root = root
        self.hf = fixture_copy("hf_fused_tied", root)
        self.hf_small = fixture_copy("hf_small", root)
        with open(os.path.join(self.hf, "config.json")) as f:
            self.hf_config = json.load(f)
        with open(os.path.join(self.hf_small, "model.safetensors.index.json")) as f:
            self.hf_index = json.load(f)
        self.ckpt = save_small_checkpoint(os.path.join(root, "ckpt"))
        with open(os.path.join(self.ckpt, "meta.json")) as f:
            self.meta = json.load(f)
        with open(os.path.join(self.ckpt, "model.npz"), "rb") as f:
            self.npz = f.read()
        self.params = os.path.join(root, "params.npz")
        self.safetensors = os.path.join(root, "fuzz.safetensors")

    def restore(self):
        return restore_checkpoint(self.ckpt, {"model": template()})

    def reset(self):
        write(os.path.join(self.ckpt, "meta.json"), json.dumps(self.meta))
        write(os.path.join(self.ckpt, "model.npz"), self.npz)
        write(os.path.join(self.hf, "config.json"), json.dumps(self.hf_config))
        index = os.path.join(self.hf_small, "model.safetensors.index.json")
        write(index, json.dumps(self.hf_index))


def _huge_cases(work: _Work) -> dict:
    def ckpt_npz():
        big = npy_bytes("'<f4'", f"({2**33},)", data=bytes(64))
        write_npz(os.path.join(work.ckpt, "model.npz"), _ckpt_members(**{"a000002.npy": big}))
        work.restore()

    def xlstm_npz():
        big = npy_bytes("'<f4'", f"({2**33},)", data=bytes(64))
        write_npz(work.params, [("lm_head/out_norm/scale.npy", big)])
        load_xlstm_jax_params(work.params)

    def hf_layers(n):
        def run():
            cfg = dict(work.hf_config, num_hidden_layers=n, num_blocks=n)
            write(os.path.join(work.hf, "config.json"), json.dumps(cfg))
            from_hf_pretrained(work.hf)

        return run

    def xlstm_config():
        from xlstm_eqx.interop import read_model_config

        with open(os.path.join(FIXTURES, "xlstm_jax_mlstm_v1", "config.json")) as f:
            d = json.load(f)
        d["model_config"]["num_blocks"] = 10**9
        write(os.path.join(work.root, "config.json"), json.dumps(d))
        read_model_config(os.path.join(work.root, "config.json"))

    cases = {
        "checkpoint-npz-2^33-elements": ckpt_npz,
        "xlstm-jax-npz-2^33-elements": xlstm_npz,
        "hf-num-hidden-layers-1e7": hf_layers(10**7),
        "hf-num-hidden-layers-1e9": hf_layers(10**9),
        "xlstm-jax-config-num-blocks-1e9": xlstm_config,
    }
    out = {}
    for name, fn in cases.items():
        out[name] = _measure(fn)
        work.reset()
    return out


# JSON values as text: atoms, huge and non-finite numbers, containers, deep nesting.
_NUMBERS = [
    "0", "-1", "1", "2", "3", "16", "32", "1.5", "0.5", "-0.0", "1e-6", "1e9",
    str(10**7), str(10**9), str(2**33), str(2**63), str(2**64 + 1),
    "1e400", "-1e400", "1e-400", "NaN", "Infinity", "-Infinity", "9" * 5000,
]  # fmt: skip
_KEYS = ["a", "b", "path", "shape", "dtype", "data_offsets", "__metadata__"]
_atoms = st.one_of(
    st.sampled_from(["null", "true", "false"]),
    st.sampled_from(_NUMBERS),
    st.integers(-(2**66), 2**66).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(json.dumps),
    st.text(max_size=6).map(json.dumps),
    st.sampled_from(['"float32"', '"bfloat16"', '"F32"', '"BF16"', '"fused"', '"../x"']),
).map(Raw)
_deep = st.builds(
    lambda n, kind: Raw("[" * n + "]" * n if kind else '{"a":' * n + "0" + "}" * n),
    st.sampled_from([64, 150, 1500, 100_000]),
    st.booleans(),
)
json_values = st.one_of(
    st.recursive(
        _atoms,
        lambda inner: st.one_of(
            st.lists(inner, max_size=4).map(lambda xs: Raw(dumps(xs))),
            st.lists(st.tuples(st.sampled_from(_KEYS), inner), max_size=4).map(
                lambda ps: Raw(dumps(Pairs(ps)))
            ),
        ),
        max_leaves=8,
    ),
    _deep,
)

_ST_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I32": 4, "U8": 1, "BOOL": 1, "C64": 8}


_ST_FIELDS = st.lists(
    st.sampled_from(["dtype", "shape", "data_offsets", "extra"]), max_size=2, unique=True
)
_ST_NAMES = st.sampled_from(_KEYS) | st.text(max_size=4)
_ST_SHAPES = st.lists(st.integers(0, 4), max_size=3)


@st.composite
def safetensors_files(draw) -> bytes:
    """Headers built field by field: valid entries (sequential or aliased byte ranges), some
    fields replaced by arbitrary JSON, repeated names, arbitrary metadata, a wrong length.
    (Strategies are built once, at import: hypothesis is slow on strategies made per draw.)"""
    entries, offset = [], 0
    alias = draw(st.booleans())
    for _ in range(draw(st.integers(0, 4))):
        name = draw(_ST_NAMES)
        dtype = draw(st.sampled_from(list(_ST_SIZES)))
        shape = draw(_ST_SHAPES)
        nbytes = math.prod(shape) * _ST_SIZES[dtype]
        start = 0 if alias else offset
        fields = {"dtype": dtype, "shape": shape, "data_offsets": [start, start + nbytes]}
        offset = max(offset, start + nbytes)
        for key in draw(_ST_FIELDS):
            fields[key] = draw(json_values)
        entries.append((name, draw(json_values) if draw(st.integers(0, 7)) == 0 else fields))
    if draw(st.booleans()):
        meta = {"format": "pt"} if draw(st.booleans()) else draw(json_values)
        entries.insert(draw(st.integers(0, len(entries))), ("__metadata__", meta))
    if entries and draw(st.booleans()):
        entries.append(entries[draw(st.integers(0, len(entries) - 1))])
    header = dumps(Pairs(entries)) if draw(st.integers(0, 9)) else draw(json_values)
    header = header.encode() + b" " * draw(st.integers(0, 7))
    data = bytes(offset if draw(st.booleans()) else draw(st.integers(0, offset + 16)))
    length = [len(header), draw(st.integers(0, len(header) + 8)), draw(st.integers(0, 2**64 - 1))]
    return safetensors_bytes(header, data, length[draw(st.sampled_from([0, 0, 1, 2]))])


_NPY_DESCRS = [
    "'<f4'", "'<u2'", "'<i4'", "'<f8'", "'>f4'", "'|O'", "'|b1'", "'<c8'", "'V4'", "'<U4'",
    "'M8[s]'", "[('a', '<f4')]", "('<f4', (2,))", "'garbage'", "5", "None",
]  # fmt: skip
_NPY_SHAPE_LIST = [
    "()", "(4,)", "(3, 4)", "(4, 3)", f"({2**33},)", "(-1,)", f"(3, {2**40}, 4)",
    f"({2**64},)", "'abc'", "(1.5,)", "[3, 4]", "(True,)", "None", "(" * 300 + ")" * 300,
]  # fmt: skip
_SHAPE_TEXTS = st.sampled_from(_NPY_SHAPE_LIST) | st.lists(st.integers(0, 5), max_size=3).map(
    lambda s: str(tuple(s))
)


@st.composite
def npz_members(draw) -> tuple[list[tuple[str, bytes]], bool]:
    """The checkpoint's three members, each kept or replaced by a hand-made (often lying) .npy
    header with data of any length, or raw bytes; members dropped, repeated or added."""
    members = []
    for name, good in _ckpt_members():
        kind = draw(st.sampled_from(["keep", "header", "header", "bytes"]))
        if kind == "header":
            shape = draw(_SHAPE_TEXTS)
            good = npy_bytes(
                draw(st.sampled_from(_NPY_DESCRS)),
                shape,
                draw(st.sampled_from(["False", "True", "0", "'x'"])),
                data=bytes(draw(st.integers(0, 64))),
                version=draw(st.sampled_from([1, 2, 3])),
            )
        elif kind == "bytes":
            good = draw(st.binary(max_size=64))
        members.append((draw(st.sampled_from([name, name, "x.npy", "a000000.npy"])), good))
    members = draw(st.permutations(members))
    if draw(st.booleans()):
        members = members[: draw(st.integers(0, len(members)))]
    return members, draw(st.booleans())


_HF_FIELDS = [
    "num_hidden_layers", "num_blocks", "hidden_size", "embedding_dim", "vocab_size", "num_heads",
    "chunk_size", "ffn_round_up_to_multiple_of", "ffn_proj_factor", "qk_dim_factor",
    "v_dim_factor", "norm_eps", "eps", "gate_soft_cap", "output_logit_soft_cap",
    "tie_word_embeddings", "weight_mode", "architectures", "model_type", "dtype", "torch_dtype",
    "context_length", "use_bias", "add_out_norm", "add_qk_norm",
]  # fmt: skip
_MODES = st.sampled_from(["replace", "replace", "replace", "delete", "duplicate"])
_SHARD_NAMES = st.sampled_from(
    ['"config.json"', '"../config.json"', '"model-00001-of-00005.safetensors"', '"."', '""',
     '"a\\u0000b"', '"missing.safetensors"', '"/etc/hostname"']
).map(Raw)  # fmt: skip


def _fuzz_settings(n: int):
    return hypothesis.settings(
        max_examples=n,
        deadline=None,
        database=None,
        suppress_health_check=list(hypothesis.HealthCheck),
    )


def fuzz_safetensors_headers(work: _Work):
    @_fuzz_settings(150)
    @hypothesis.given(data=safetensors_files())
    def run(data):
        write(work.safetensors, data)
        clean_or(SafetensorsError, lambda: read_all(work.safetensors))

    run()


def fuzz_checkpoint_meta(work: _Work):
    leaf = st.tuples(st.just("trees"), st.just("model"), st.integers(0, 3))
    paths = st.one_of(
        st.sampled_from([(), ("format",), ("version",), ("step",), ("trees",), ("metadata",)]),
        st.just(("trees", "model")),
        leaf,
        st.builds(lambda p, f: (*p, f), leaf, st.sampled_from(["path", "shape", "dtype", "x"])),
        st.builds(lambda p, i: (*p, "shape", i), leaf, st.integers(0, 2)),
        st.just(("metadata", "k")),
    )

    @_fuzz_settings(100)
    @hypothesis.given(path=paths, mode=_MODES, value=json_values)
    def run(path, mode, value):
        write(os.path.join(work.ckpt, "meta.json"), dumps(mutate(work.meta, path, mode, value)))
        clean_or(CheckpointError, lambda: load_metadata(work.ckpt))
        clean_or(CheckpointError, work.restore)

    run()
    work.reset()


def fuzz_npz_members(work: _Work):
    @_fuzz_settings(100)
    @hypothesis.given(drawn=npz_members())
    def run(drawn):
        members, compress = drawn
        write_npz(os.path.join(work.ckpt, "model.npz"), members, compress=compress)
        clean_or(CheckpointError, work.restore)
        write_npz(work.params, members, compress=compress)  # the template-free reader
        clean_or(InteropError, lambda: load_xlstm_jax_params(work.params))

    run()
    work.reset()


def fuzz_hf_config_and_index(work: _Work):
    config_edits = st.lists(
        st.tuples(
            st.sampled_from(_HF_FIELDS),
            _MODES,
            json_values | st.integers(-2, 64).map(lambda i: Raw(str(i))),
        ),
        min_size=1,
        max_size=3,
    )
    index_edits = st.lists(
        st.tuples(
            st.sampled_from(
                [("weight_map", "lm_head.weight"), ("weight_map",), ("metadata",), ("x",)]
                + [("weight_map", k) for k in list(work.hf_index["weight_map"])[:4]]
            ),
            _MODES,
            _SHARD_NAMES | json_values,
        ),
        min_size=1,
        max_size=2,
    )

    @_fuzz_settings(60)
    @hypothesis.given(target=st.sampled_from(["config", "index"]), data=st.data())
    def run(target, data):
        if target == "config":
            obj, path = work.hf_config, os.path.join(work.hf, "config.json")
            for field, mode, value in data.draw(config_edits):
                obj = mutate(obj, (field,), mode, value)
        else:
            obj = work.hf_index
            path = os.path.join(work.hf_small, "model.safetensors.index.json")
            for key, mode, value in data.draw(index_edits):
                obj = mutate(obj, key, mode, value)
        write(path, dumps(obj))
        try:
            clean_or(InteropError, lambda: from_hf_pretrained(os.path.dirname(path)))
        finally:
            work.reset()

    run()


FUZZERS = [
    fuzz_safetensors_headers,
    fuzz_checkpoint_meta,
    fuzz_npz_members,
    fuzz_hf_config_and_index,
]


def child_main(root: str) -> None:
    """The subprocess: warm up every loader, limit the address space, run the huge cases and the
    fuzzers, print ``RESULT <json>``."""
    import resource
    import traceback

    import tests.conftest  # noqa: F401  (the hypothesis profiles and JAX settings of the suite)

    warnings.simplefilter("error")
    warnings.filterwarnings("ignore", "mypy_extensions.TypedDict is deprecated", DeprecationWarning)
    # A failing example with 100k-deep nesting has a large repr: report it rather than fail on it.
    warnings.filterwarnings("ignore", "Generating overly large repr", Warning)
    work = _Work(root)
    from_hf_pretrained(work.hf)
    from_hf_pretrained(work.hf_small)
    work.restore()
    write_npz(work.params, [("a/b.npy", npy_bytes("'<f4'", "(2,)", data=bytes(8)))])
    load_xlstm_jax_params(work.params)
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (_vm_size() + LIMIT_HEADROOM, hard))
    result = {"huge": _huge_cases(work), "fuzz": {}}
    for fuzz in FUZZERS:
        try:
            fuzz(work)
            result["fuzz"][fuzz.__name__] = "ok"
        except Exception:
            result["fuzz"][fuzz.__name__] = traceback.format_exc()[-4000:]
        work.reset()
    print("RESULT " + json.dumps(result), flush=True)
