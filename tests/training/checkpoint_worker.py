"""Multi-device work for tests/test_orbax_checkpoint.py, run in subprocesses (simulated CPU
devices) so that the rest of the suite keeps its single device.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m tests.checkpoint_worker mesh8 DATA OUT
    ... checkpoint_worker procs DATA OUT PROCESS_ID NUM_PROCESSES PORT   (4 devices per process)
    ... checkpoint_worker killme DATA OUT                                 (1 device; SIGKILLed)

Each mode prints one line ``RESULT <json>``; the assertions live in the tests.
"""

import dataclasses
import json
import os
import shutil
import signal
import sys


# A tiny xLSTM whose embedding, head and blocks are FSDP-sharded (the tiny preset shards nothing).
FSDP = {"fsdp_modules": ["Embed", "LMHead", "mLSTMBlock"], "fsdp_min_weight_size": 128}


# The run that is SIGKILLed (the test resumes it and runs it whole in its own process).
KILLME = dict(steps=12, checkpoint_every=1, model="xlstm", preset="tiny")


def _model_file(out: str) -> str:
    from xlstm_eqx.presets import tiny_xlstm

    d = tiny_xlstm().to_dict()
    d["parallel"] = {**(d.get("parallel") or {}), **FSDP}
    d["vocab_size"] = None  # the tokenizer's (bytes: 256)
    path = os.path.join(out, "tiny_fsdp.json")
    os.makedirs(out, exist_ok=True)
    tmp = f"{path}.{os.getpid()}"  # both processes write it: never read half of it
    with open(tmp, "w") as f:
        json.dump({"kind": "xlstm", **d}, f)
    os.replace(tmp, path)
    return path


def worker_config(data: str, out: str, run: str, **kw):
    from xlstm_eqx.training import TrainConfig

    base = dict(
        model=_model_file(out),
        data=[data],
        seq_len=16,
        batch_size=8,
        steps=6,
        lr=1e-2,
        warmup_steps=1,
        log_every=1,
        eval_every=100,
        eval_batches=1,
        checkpoint_every=2,
        progress=False,
        sample_tokens=0,
        out=os.path.join(out, run),
    )
    base.update(kw)
    return TrainConfig(**base)


def _quiet(msg: str) -> None:
    pass


def _specs_of(tree) -> dict[str, str]:
    import equinox as eqx
    import jax

    return {
        jax.tree_util.keystr(p): str(tuple(x.sharding.spec))
        for p, x in jax.tree_util.tree_flatten_with_path(eqx.filter(tree, eqx.is_array))[0]
        if hasattr(x.sharding, "spec")
    }


def _losses(result) -> list[float]:
    return [result.losses[s] for s in sorted(result.losses)]


def _templates(cfg):
    """Skeletons of the run's model and optimizer state (nothing allocated), and the family."""
    import equinox as eqx
    import jax
    import jax.random as jr

    from xlstm_eqx.models import MODEL_FAMILIES
    from xlstm_eqx.training import make_optimizer, trainable_params
    from xlstm_eqx.training.prepare import prepare_run

    # As a `--resume` that asks for one more step would (a resume must continue the run).
    p = prepare_run(dataclasses.replace(cfg, resume=True, steps=cfg.steps + 1))
    family = MODEL_FAMILIES[p.kind]
    skel = eqx.filter_eval_shape(family.build, p.model_config, key=jr.key(0))
    optimizer = make_optimizer(cfg, skel, p.model_config, family)
    with jax.numpy_dtype_promotion("standard"):
        opt_skel = jax.eval_shape(optimizer.init, trainable_params(skel))
    return {"model": skel, "opt_state": opt_skel}, optimizer, p.model_config


def _live_bytes_per_device() -> dict[str, int]:
    import jax

    out: dict[str, int] = {}
    for a in jax.live_arrays():
        for s in a.addressable_shards:
            key = str(s.device)
            out[key] = out.get(key, 0) + s.data.nbytes
    return out


def _array_bytes(tree) -> int:
    import equinox as eqx
    import jax

    return int(sum(x.nbytes for x in jax.tree.leaves(eqx.filter(tree, eqx.is_array))))


def _per_device_bytes(tree) -> dict[str, int]:
    import equinox as eqx
    import jax

    out: dict[str, int] = {}
    for x in jax.tree.leaves(eqx.filter(tree, eqx.is_array)):
        for s in x.addressable_shards:
            out[str(s.device)] = out.get(str(s.device), 0) + s.data.nbytes
    return out


def _whole_on_one_device(tree, shardings) -> list[str]:
    """Leaves whose target sharding splits them but that came back whole on some device."""
    import equinox as eqx
    import jax

    bad = []
    flat_t = jax.tree_util.tree_flatten_with_path(eqx.filter(tree, eqx.is_array))[0]
    flat_s = dict(
        (jax.tree_util.keystr(p), s)
        for p, s in jax.tree_util.tree_flatten_with_path(
            shardings, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding)
        )[0]
    )
    for p, x in flat_t:
        want = flat_s[jax.tree_util.keystr(p)]
        if x.sharding != want:
            bad.append(f"{jax.tree_util.keystr(p)}: sharding {x.sharding} != {want}")
            continue
        split = want.shard_shape(x.shape) != tuple(x.shape)
        if split and any(tuple(s.data.shape) == tuple(x.shape) for s in x.addressable_shards):
            bad.append(f"{jax.tree_util.keystr(p)}: whole on a device")
    return bad


# ----------------------------------------------------------------------------------------------
# mesh8: one process, 8 devices


def run_mesh8(data: str, out: str) -> dict:
    import gc

    import equinox as eqx
    import jax

    from xlstm_eqx.training import (
        init_sharded_opt_state,
        latest_checkpoint,
        mesh_layout,
        restore_checkpoint,
        train,
    )

    res: dict = {}
    cfg = worker_config(data, out, "full", mesh="fsdp=8")
    full = train(cfg, log=_quiet)
    res["full_losses"] = _losses(full)
    res["full_specs"] = _specs_of(full.model)
    trained = jax.device_get(eqx.filter(full.model, eqx.is_array))

    # Interrupted at step 2, resumed on the same mesh and on tp=2 x dp=4.
    cfg_b = dataclasses.replace(cfg, out=os.path.join(out, "b"), checkpoint_every=100)
    first = train(cfg_b, stop_after_step=2, log=_quiet)
    shutil.copytree(cfg_b.out, os.path.join(out, "c"))
    second = train(dataclasses.replace(cfg_b, resume=True), log=_quiet)
    res["same_mesh_losses"] = _losses(first) + _losses(second)
    other = train(
        dataclasses.replace(cfg_b, out=os.path.join(out, "c"), resume=True, mesh="tp=2,dp=4"),
        log=_quiet,
    )
    res["other_mesh_losses"] = _losses(first) + _losses(other)
    res["other_mesh_specs"] = _specs_of(other.model)
    del first, second, other, full
    gc.collect()

    # The final fsdp=8 checkpoint restored onto tp=2 x dp=4 and onto one device.
    templates, optimizer, model_config = _templates(cfg)
    ckpt = latest_checkpoint(os.path.join(cfg.out, "checkpoints"))
    layout = mesh_layout("tp=2,dp=4", templates["model"], optimizer, base=model_config.parallel)
    shardings = {"model": layout.model_shardings, "opt_state": layout.opt_shardings}
    before = _live_bytes_per_device()
    on_tp, _ = restore_checkpoint(ckpt, templates, shardings)
    after = _live_bytes_per_device()
    res["tp_live_added"] = {d: after.get(d, 0) - before.get(d, 0) for d in after}
    res["tp_restored_per_device"] = _per_device_bytes(on_tp)
    res["tp_total_bytes"] = _array_bytes(jax.device_get(on_tp))
    res["tp_whole"] = _whole_on_one_device(on_tp["model"], shardings["model"]) + (
        _whole_on_one_device(on_tp["opt_state"], shardings["opt_state"])
    )
    res["tp_specs"] = _specs_of(on_tp["model"])
    one, _ = restore_checkpoint(ckpt, templates)
    res["one_devices"] = sorted(
        {str(d) for x in jax.tree.leaves(eqx.filter(one, eqx.is_array)) for d in x.devices()}
    )
    res["equal"] = {
        "tp_model": bool(
            eqx.tree_equal(jax.device_get(eqx.filter(on_tp["model"], eqx.is_array)), trained)
        ),
        "one_model": bool(
            eqx.tree_equal(jax.device_get(eqx.filter(one["model"], eqx.is_array)), trained)
        ),
        "tp_opt_vs_one": bool(
            eqx.tree_equal(jax.device_get(on_tp["opt_state"]), jax.device_get(one["opt_state"]))
        ),
    }
    del on_tp, one
    gc.collect()

    # Born sharded: a fresh optimizer state is created in its shardings.
    from xlstm_eqx.parallel import init_sharded
    from xlstm_eqx.xlstm import xLSTMLMModel

    before = _live_bytes_per_device()
    model = init_sharded(
        xLSTMLMModel,
        model_config,
        key=jax.random.key(0),
        mesh=layout.mesh,
        parallel_config=layout.parallel_config,
    )
    opt_state = init_sharded_opt_state(optimizer, model, layout)
    after = _live_bytes_per_device()
    res["born_live_added"] = {d: after.get(d, 0) - before.get(d, 0) for d in after}
    res["born_per_device"] = _per_device_bytes({"m": model, "o": opt_state})
    res["born_whole"] = _whole_on_one_device(opt_state, layout.opt_shardings)
    del model, opt_state

    # Interop at size: a transformers checkpoint read straight into fsdp=8 shardings.
    import pathlib

    from xlstm_eqx.core import ParallelConfig
    from xlstm_eqx.interop import from_hf_pretrained
    from xlstm_eqx.parallel import (
        make_mesh,
        named_shardings,
        param_partition_specs,
        parse_mesh_spec,
    )

    hf = pathlib.Path(__file__).parents[1] / "fixtures" / "interop" / "hf_small"
    pc = parse_mesh_spec("fsdp=8", ParallelConfig(**FSDP))
    mesh = make_mesh(pc)
    plain, _ = from_hf_pretrained(hf)
    placed, _ = from_hf_pretrained(hf, mesh=mesh, parallel=pc)
    want = named_shardings(param_partition_specs(placed, pc), mesh)
    res["hf_whole"] = _whole_on_one_device(placed, want)
    res["hf_specs"] = _specs_of(placed)
    res["hf_equal"] = bool(
        eqx.tree_equal(
            jax.device_get(eqx.filter(placed, eqx.is_array)),
            jax.device_get(eqx.filter(plain, eqx.is_array)),
        )
    )
    return res


# ----------------------------------------------------------------------------------------------
# procs: two processes, 4 devices each


def run_procs(data: str, out: str, process_id: int, num_processes: int, port: int) -> dict:
    from xlstm_eqx.parallel import initialize_distributed

    initialize_distributed(f"localhost:{port}", num_processes, process_id, cpu_collectives="gloo")
    import equinox as eqx
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    from xlstm_eqx.training import (
        latest_checkpoint,
        list_checkpoints,
        mesh_layout,
        read_metrics,
        restore_checkpoint,
        train,
        train_state as _train_state,
    )

    # The CPU collectives (gloo) are set up at the first one, which must find the other process
    # within 30 s: meet here, while both are equally far, not after unequal work on a busy machine.
    multihost_utils.sync_global_devices("checkpoint_worker start")
    res: dict = {"process_index": jax.process_index(), "devices": jax.device_count()}
    cfg = worker_config(data, out, "a", mesh="fsdp=8")
    a = train(cfg, log=_quiet)
    res["a_losses"] = _losses(a)
    res["a_specs"] = _specs_of(a.model)

    def gathered(tree):
        return [
            np.asarray(multihost_utils.process_allgather(x, tiled=True))
            for x in jax.tree.leaves(eqx.filter(tree, eqx.is_array))
        ]

    trained = gathered(a.model)
    # Restored across both processes onto tp=2 x dp=4: the same leaves, in the new layout.
    templates, optimizer, model_config = _templates(cfg)
    layout = mesh_layout("tp=2,dp=4", templates["model"], optimizer, base=model_config.parallel)
    shardings = {"model": layout.model_shardings, "opt_state": layout.opt_shardings}
    ckpt = latest_checkpoint(os.path.join(cfg.out, "checkpoints"))
    on_tp, meta = restore_checkpoint(ckpt, templates, shardings)
    res["tp_step"] = meta["step"]
    res["tp_equal"] = all(
        np.array_equal(x, y) for x, y in zip(gathered(on_tp["model"]), trained, strict=True)
    )
    res["tp_whole"] = _whole_on_one_device(on_tp["model"], shardings["model"])
    res["tp_specs"] = _specs_of(on_tp["model"])
    del on_tp

    # Preemption: only process 1 gets SIGTERM (during step 3); both save step 3 and stop.
    cfg_b = dataclasses.replace(cfg, out=os.path.join(out, "b"), checkpoint_every=100)
    original = _train_state.make_train_step_for

    def signalled(*args, **kwargs):
        step = original(*args, **kwargs)
        calls = {"n": 0}

        def core(*placed):
            calls["n"] += 1
            if calls["n"] == 3 and jax.process_index() == 1:
                os.kill(os.getpid(), signal.SIGTERM)
            return step.core(*placed)

        return dataclasses.replace(step, core=core)

    _train_state.make_train_step_for = signalled
    try:
        train(cfg_b, log=_quiet)
        res["b_interrupted"] = False
    except KeyboardInterrupt:
        res["b_interrupted"] = True
    finally:
        _train_state.make_train_step_for = original
    res["b_checkpoints"] = [s for s, _ in list_checkpoints(os.path.join(cfg_b.out, "checkpoints"))]
    resumed = train(dataclasses.replace(cfg_b, resume=True), log=_quiet)
    res["b_resumed_losses"] = {str(k): v for k, v in resumed.losses.items()}
    rows = read_metrics(os.path.join(cfg_b.out, "metrics.jsonl"))
    res["b_metrics_steps"] = [r["step"] for r in rows]
    res["b_metrics_losses"] = [r["loss"] for r in rows]
    return res


# ----------------------------------------------------------------------------------------------
# killme: trains with a checkpoint every step until SIGKILLed


def run_killme(data: str, out: str) -> dict:
    import time

    from xlstm_eqx.training import train, train_state as _train_state

    # Steps padded to >= 0.3 s, so that the kill lands mid-run on an idle machine too (the
    # numbers are untouched).
    original = _train_state.optimizer_and_step

    def slow(*args, **kwargs):
        optimizer, step = original(*args, **kwargs)

        def padded(*a):
            time.sleep(0.3)
            return step.core(*a)

        return optimizer, dataclasses.replace(step, core=padded)

    _train_state.optimizer_and_step = slow
    train(worker_config(data, out, "k", **KILLME), log=_quiet)
    return {}


def main(argv: list[str]) -> None:
    mode = argv[0]
    if mode == "procs":
        # Collectives must be chosen before the backend starts: no JAX work before initialize.
        out = run_procs(argv[1], argv[2], int(argv[3]), int(argv[4]), int(argv[5]))
    else:
        import jax

        jax.config.update("jax_numpy_dtype_promotion", "strict")
        if mode == "mesh8":
            out = run_mesh8(argv[1], argv[2])
        elif mode == "killme":
            out = run_killme(argv[1], argv[2])
        else:
            raise SystemExit(f"unknown mode {mode!r}")
    print("RESULT " + json.dumps(out, default=str), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
