"""Orbax checkpoints: exact round trips, keep-last-N, asynchronous saves, named mismatches, the older
.npz format refused; and on simulated devices (subprocesses, ``tests/training/checkpoint_worker.py``): a
fsdp=8 run restored onto tp=2 x dp=4 and onto one device, resume on the same mesh (bit-identical)
and on another (float32 noise), two processes each writing their own shards, a SIGTERM on one of
two processes, and a SIGKILL at a random moment."""

import dataclasses
import json
import os
import pathlib
import random
import subprocess
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.corpus import write_corpus
from tests.multiprocess import collect, free_port, once_per_session, start_worker, worker_result
from tests.training.test_checkpoint import Net, example_trees, same_tree
from xlstm_eqx.training import (
    CheckpointError,
    CheckpointStore,
    TrainConfig,
    checkpoint as npz_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    load_metadata,
    load_run,
    read_metrics,
    restore_checkpoint,
    save_checkpoint,
    train,
)


ROOT = pathlib.Path(__file__).resolve().parents[2]


# --- one process, one device ---------------------------------------------------------------------


@pytest.mark.slow
def test_round_trip_bit_exact_into_a_skeleton(tmp_path, getkey):
    net, opt_state = example_trees(getkey())
    meta = {"data_position": 12, "rng_key": [1, 2], "run_config": {"a": [1, 2.5, None]}}
    path = save_checkpoint(tmp_path, 5, {"model": net, "opt_state": opt_state}, meta)
    assert os.path.basename(path) == "step_00000005"
    skeleton = eqx.filter_eval_shape(Net, (3, 4, 2), key=getkey())
    opt_skeleton = jax.eval_shape(lambda: opt_state)
    trees, got_meta = restore_checkpoint(path, {"model": skeleton, "opt_state": opt_skeleton})
    same_tree(trees["model"], net)
    same_tree(trees["opt_state"], opt_state)
    assert trees["model"].name == "net" and trees["model"].scale.dtype == jnp.bfloat16
    assert got_meta == meta
    saved = load_metadata(path)
    assert saved["step"] == 5
    assert saved["trees"]["model"][0] == {
        "path": ".layers[0].weight",
        "shape": [4, 3],
        "dtype": "float32",
    }
    assert {d for x in jax.tree.leaves(trees) for d in x.devices()} == {jax.devices()[0]}
    assert latest_checkpoint(tmp_path) == path


def test_keep_last_n_async_and_never_overwritten(tmp_path, getkey):
    net, _ = example_trees(getkey())
    with CheckpointStore(tmp_path, keep=2) as store:
        for step in (1, 2, 3, 4):
            x = net.layers[0].weight * step  # a fresh buffer, deleted as soon as save returns
            store.save(
                step, {"model": eqx.tree_at(lambda n: n.layers[0].weight, net, x)}, {"i": step}
            )
            x.delete()  # what a donating train step does: the save must already hold a copy
        with pytest.raises(CheckpointError, match="step_00000004.*not overwritten"):
            store.wait()
            store.save(4, {"model": net})
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 4]
    assert sorted(os.listdir(tmp_path)) == ["step_00000003", "step_00000004"]
    trees, meta = restore_checkpoint(latest_checkpoint(tmp_path), {"model": net})
    np.testing.assert_array_equal(trees["model"].layers[0].weight, net.layers[0].weight * 4)
    assert meta == {"i": 4}


def test_mismatches_are_named(tmp_path, getkey):
    net, _ = example_trees(getkey())
    path = save_checkpoint(tmp_path, 1, {"model": net})
    wider = Net((3, 5, 2), key=getkey())
    with pytest.raises(CheckpointError, match=r"model\.layers\[0\]\.weight.*\[4, 3\].*\[5, 3\]"):
        restore_checkpoint(path, {"model": wider})
    deeper = Net((3, 4, 2, 2), key=getkey())
    with pytest.raises(CheckpointError, match=r"model\.layers\[2\]\.weight: missing"):
        restore_checkpoint(path, {"model": deeper})
    shallower = Net((3, 4), key=getkey())
    with pytest.raises(CheckpointError, match=r"model\.layers\[1\]\.weight: in the checkpoint but"):
        restore_checkpoint(path, {"model": shallower})
    with pytest.raises(CheckpointError, match="no tree 'opt_state'"):
        restore_checkpoint(path, {"model": net, "opt_state": net})
    f32 = eqx.tree_at(lambda n: n.scale, net, jnp.ones((2,), jnp.float32))
    with pytest.raises(
        CheckpointError, match=r"scale: checkpoint has bfloat16\[2\], expected float32"
    ):
        restore_checkpoint(path, {"model": f32})
    with pytest.raises(ValueError, match="skeleton"):
        save_checkpoint(tmp_path, 2, {"model": eqx.filter_eval_shape(lambda: net)})


def test_unreadable_checkpoints(tmp_path, getkey):
    net, _ = example_trees(getkey())
    with pytest.raises(CheckpointError, match="does not exist"):
        restore_checkpoint(tmp_path / "nothing", {"model": net})
    path = save_checkpoint(tmp_path, 1, {"model": net})
    meta_path = os.path.join(path, "meta", "metadata")
    good = pathlib.Path(meta_path).read_text()
    pathlib.Path(meta_path).write_text("{truncated")
    with pytest.raises(CheckpointError, match="cannot read meta/metadata"):
        load_metadata(path)
    pathlib.Path(meta_path).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(CheckpointError, match="not an xlstm_eqx-orbax-checkpoint"):
        load_metadata(path)
    pathlib.Path(meta_path).write_text(json.dumps({**json.loads(good), "version": 99}))
    with pytest.raises(CheckpointError, match="version 99"):
        load_metadata(path)
    pathlib.Path(meta_path).write_text(good)
    for f in (pathlib.Path(path) / "model").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=r"cannot read model/"):
        restore_checkpoint(path, {"model": net})


def test_no_pickle_in_files(tmp_path, getkey):
    net, opt_state = example_trees(getkey())
    path = save_checkpoint(tmp_path, 3, {"model": net, "opt_state": opt_state})
    for f in pathlib.Path(path).rglob("*"):
        if f.is_file():
            assert not f.name.endswith((".pkl", ".pickle")), f
            head = f.read_bytes()[:2]
            assert not (
                head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")
            ), f


def _data(tmp_path):
    return write_corpus(tmp_path)


def test_older_npz_checkpoints_get_a_clear_error(tmp_path, getkey):
    """A run directory from the .npz era: resuming or training into it says so; `load_run` still
    reads it."""
    from xlstm_eqx.models import MODEL_FAMILIES
    from xlstm_eqx.presets import tiny_xlstm

    config = dataclasses.replace(tiny_xlstm(), vocab_size=256)
    model = MODEL_FAMILIES["xlstm"].build(config, key=getkey())
    out = tmp_path / "run"
    run = {"model_kind": "xlstm", "model_config": config.to_dict()}
    npz_checkpoint.save_checkpoint(out / "checkpoints", 4, {"model": model}, {"run_config": run})
    cfg = TrainConfig(
        model="xlstm", preset="tiny", data=[_data(tmp_path)], out=str(out), steps=2, progress=False
    )
    for resume in (False, True):
        with pytest.raises(CheckpointError, match=r"older \.npz format.*step_00000004/meta\.json"):
            train(dataclasses.replace(cfg, resume=resume), log=lambda m: None)
    with pytest.raises(CheckpointError, match=r"older \.npz format"):
        CheckpointStore(out / "checkpoints")
    assert list_checkpoints(out / "checkpoints") == []
    loaded, _, step = load_run(str(out))
    assert step == 4
    same_tree(eqx.filter(loaded, eqx.is_array), eqx.filter(model, eqx.is_array))


# --- simulated devices: one process with 8, two processes with 4 each --------------------------------


def _start(args: list[str], devices: int, cwd: pathlib.Path) -> subprocess.Popen:
    return start_worker("tests.training.checkpoint_worker", args, devices, cwd)


def _run_workers(tmp: pathlib.Path) -> dict:
    data = _data(tmp)
    port = free_port()
    procs = {
        "mesh8": _start(["mesh8", data, str(tmp / "mesh8")], 8, tmp),
        "proc0": _start(["procs", data, str(tmp / "procs"), "0", "2", str(port)], 4, tmp),
        "proc1": _start(["procs", data, str(tmp / "procs"), "1", "2", str(port)], 4, tmp),
    }
    out = {name: collect(name, p, timeout=900) for name, p in procs.items()}
    out["procs_dir"] = str(tmp / "procs")
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Run the workers once per session, concurrently."""
    return once_per_session(tmp_path_factory, "orbax_checkpoint", _run_workers)


@pytest.mark.slow
def test_fsdp8_checkpoint_restores_onto_tp2_dp4_and_one_device(results):
    r = worker_result(results["mesh8"])
    assert r["full_specs"][".token_embedding.embedding"] == "('fsdp',)"  # trained FSDP-sharded
    assert r["equal"] == {"tp_model": True, "one_model": True, "tp_opt_vs_one": True}
    assert r["tp_specs"][".token_embedding.embedding"] == "(None, 'tp')"
    assert r["tp_specs"][".lm_head.kernel"] == "(None, 'tp')"
    assert r["one_devices"] == ["cpu:0"]


@pytest.mark.slow
def test_restore_never_places_a_whole_sharded_leaf_on_one_device(results):
    r = worker_result(results["mesh8"])
    assert r["tp_whole"] == []  # every leaf has its target sharding; split leaves come back split
    # What restoring left alive on each device is exactly its shards: no stray whole copies.
    assert r["tp_live_added"] == r["tp_restored_per_device"]
    assert max(r["tp_restored_per_device"].values()) < 0.6 * r["tp_total_bytes"]
    # Born sharded: a fresh model + optimizer state is created in its shardings, the same way.
    assert r["born_whole"] == []
    assert r["born_live_added"] == r["born_per_device"]


@pytest.mark.slow
def test_resume_same_mesh_bit_identical_other_mesh_within_noise(results):
    r = worker_result(results["mesh8"])
    assert r["same_mesh_losses"] == r["full_losses"]
    np.testing.assert_allclose(r["other_mesh_losses"], r["full_losses"], rtol=1e-5)
    assert r["other_mesh_specs"][".token_embedding.embedding"] == "(None, 'tp')"


@pytest.mark.slow
def test_two_processes_each_write_their_own_shards(results):
    r0, r1 = worker_result(results["proc0"]), worker_result(results["proc1"])
    assert (r0["process_index"], r1["process_index"]) == (0, 1)
    assert r0["devices"] == r1["devices"] == 8
    assert r0["a_losses"] == r1["a_losses"]
    np.testing.assert_allclose(
        r0["a_losses"], worker_result(results["mesh8"])["full_losses"], rtol=1e-5
    )
    step = pathlib.Path(results["procs_dir"]) / "a" / "checkpoints" / "step_00000006"
    for item in ("model", "opt_state"):
        sizes = []
        for i in (0, 1):
            files = [f for f in (step / item / f"ocdbt.process_{i}").rglob("*") if f.is_file()]
            sizes.append(sum(f.stat().st_size for f in files))
        # Each process wrote about half (FSDP over both): nothing was gathered to one writer.
        assert min(sizes) > 0.35 * sum(sizes), (item, sizes)
    for r in (r0, r1):  # restored across both processes onto tp=2 x dp=4: the same leaves
        assert r["tp_step"] == 6 and r["tp_equal"] is True and r["tp_whole"] == []
        assert r["tp_specs"][".token_embedding.embedding"] == "(None, 'tp')"


@pytest.mark.slow
def test_sigterm_on_one_of_two_processes_saves_the_same_step_everywhere(results):
    """Process 1 alone gets SIGTERM during step 3: both processes finish step 3, save it
    together and stop; the resumed run logs the losses of the run that never stopped."""
    r0, r1 = worker_result(results["proc0"]), worker_result(results["proc1"])
    for r in (r0, r1):
        assert r["b_interrupted"] is True
        assert r["b_checkpoints"] == [3]
        assert r["b_resumed_losses"] == {str(s): r["a_losses"][s - 1] for s in (4, 5, 6)}
    assert r0["b_metrics_steps"] == [1, 2, 3, 4, 5, 6]
    assert r0["b_metrics_losses"] == r0["a_losses"]


@pytest.mark.slow
def test_sigkill_at_a_random_moment_then_resume_is_exact(tmp_path):
    """A run writing a checkpoint every step is SIGKILLed at a random moment: the newest
    complete checkpoint loads, no partial one is listed, and resuming from it logs the losses of
    a run that never stopped, bit for bit."""
    from tests.training.checkpoint_worker import KILLME, worker_config

    data = _data(tmp_path)
    out = tmp_path / "kill"
    proc = _start(["killme", data, str(out)], 1, tmp_path)
    root = out / "k" / "checkpoints"
    deadline = time.monotonic() + 600
    while not list_checkpoints(root):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no checkpoint within 600 s"
        time.sleep(0.05)
    delay = random.uniform(0.0, 1.0)
    time.sleep(delay)
    proc.kill()
    _, err = proc.communicate()
    assert proc.returncode == -9, f"the run ended before the kill (delay {delay:.2f} s)\n{err}"
    done = list_checkpoints(root)
    assert done, delay
    for _, path in done:
        assert load_metadata(path)["step"] >= 1
    cfg = worker_config(data, str(out), "k", **KILLME)
    quiet = dataclasses.replace(cfg, checkpoint_every=100)  # fewer saves from here on
    resumed = train(dataclasses.replace(quiet, resume=True), log=lambda m: None)
    full = train(dataclasses.replace(quiet, out=str(tmp_path / "full")), log=lambda m: None)
    rows = read_metrics(os.path.join(cfg.out, "metrics.jsonl"))
    assert [r["step"] for r in rows] == list(range(1, KILLME["steps"] + 1)), delay
    assert [r["loss"] for r in rows] == [full.losses[s] for s in sorted(full.losses)], delay
    assert min(resumed.losses) == done[-1][0] + 1


# --- what `xlstm-eqx info --mesh --hosts` reports ------------------------------------------------


def test_memory_report_per_host_and_checkpoint_7b():
    from xlstm_eqx import get_preset
    from xlstm_eqx.parallel import memory_report, parse_mesh_spec

    cfg = get_preset("mLSTMv1_7B")
    pc = parse_mesh_spec("fsdp=8,tp=4", cfg.parallel)
    r = memory_report(cfg, pc, hosts=4)
    total = r.param_bytes + r.opt_bytes
    assert r.checkpoint_bytes == total and 76.7 < total / 2**30 < 76.8
    assert r.param_bytes_per_host == 8 * r.param_bytes_per_device
    assert r.opt_bytes_per_host == 8 * r.opt_bytes_per_device
    # Each host writes and reads back about a quarter: nothing goes through one host.
    assert total / 4 <= r.checkpoint_bytes_written_per_host < 1.01 * total / 4
    assert total / 4 <= r.checkpoint_bytes_read_per_host < 1.01 * total / 4
    one = memory_report(cfg, pc)
    assert one.checkpoint_bytes_written_per_host == one.checkpoint_bytes_read_per_host == total


def test_memory_report_per_host_by_hand():
    """dp=8 over 2 hosts: every host holds (and reads back) everything, and writes half of it."""
    from xlstm_eqx.core import ParallelConfig
    from xlstm_eqx.parallel import memory_report
    from xlstm_eqx.presets import tiny_llama

    r = memory_report(tiny_llama(), ParallelConfig(data_axis_size=8), hosts=2)
    total = r.param_bytes + r.opt_bytes
    assert r.param_bytes_per_device == r.param_bytes
    assert r.checkpoint_bytes_read_per_host == total
    assert abs(r.checkpoint_bytes_written_per_host - total / 2) <= 1
    with pytest.raises(ValueError, match="hosts=3"):
        memory_report(tiny_llama(), ParallelConfig(data_axis_size=8), hosts=3)


def test_info_mesh_hosts(capsys):
    from xlstm_eqx.cli import main

    assert main(["info", "--preset", "mLSTMv1_7B", "--mesh", "fsdp=8,tp=4", "--hosts", "4"]) == 0
    out = capsys.readouterr().out
    assert "per host (4 host(s) x 8 devices): 19.23 GiB" in out
    assert "checkpoint: 76.73 GiB; each host writes 19.18 GiB" in out


# --- interop at size --------------------------------------------------------------------------------


@pytest.mark.slow
def test_from_hf_pretrained_places_each_tensor_in_its_sharding(results):
    r = worker_result(results["mesh8"])
    assert r["hf_equal"] is True
    assert r["hf_whole"] == []  # every leaf in the rules' sharding; split ones never whole
    assert "fsdp" in r["hf_specs"][".token_embedding.embedding"]


def test_to_hf_shards_at_5gb_like_save_pretrained():
    import argparse
    import inspect

    from xlstm_eqx.cli.convert import add_convert_arguments
    from xlstm_eqx.interop import to_hf

    assert inspect.signature(to_hf).parameters["max_shard_bytes"].default == 5 * 10**9
    parser = argparse.ArgumentParser()
    add_convert_arguments(parser)
    action = next(a for a in parser._actions if a.dest == "max_shard_size")
    assert action.default == 5 * 10**9


XJ_ORBAX = ROOT / "tests" / "fixtures" / "interop" / "xlstm_jax_mlstm_v1_orbax"


@pytest.mark.parametrize(
    "where", ["", "checkpoints", "checkpoints/checkpoint_3", "checkpoints/checkpoint_3/params"]
)
def test_xlstm_jax_orbax_checkpoint_from_8_devices_reads_on_one(where):
    """xlstm-jax's trainer layout saved from 8 simulated devices, read in this one-device process:
    the reference's parameters exactly, and its logits."""
    from xlstm_eqx.interop import from_xlstm_jax, load_xlstm_jax_params
    from xlstm_eqx.interop.runs import read_model_config
    from xlstm_eqx.interop.xlstm_jax import flatten_params

    params = flatten_params(load_xlstm_jax_params(XJ_ORBAX / where))
    ref = flatten_params(load_xlstm_jax_params(XJ_ORBAX.parent / "xlstm_jax_mlstm_v1"))
    assert sorted(params) == sorted(ref)
    for k in ref:
        np.testing.assert_array_equal(params[k], ref[k], err_msg=k)
    if where == "":
        model = from_xlstm_jax(params, read_model_config(str(XJ_ORBAX / "config.json")))
        with np.load(XJ_ORBAX / "expected.npz", allow_pickle=False) as exp:
            logits = np.asarray(eqx.filter_jit(model.__call__)(jnp.asarray(exp["input_ids"])))
            assert np.max(np.abs(logits - exp["logits"])) <= 1e-4
