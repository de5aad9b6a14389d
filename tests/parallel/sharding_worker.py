"""Multi-device work for tests/parallel/test_sharding.py, run in subprocesses so that the rest of the suite
keeps its single CPU device.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m tests.parallel.sharding_worker equiv xlstm
    ... sharding_worker train DATA_FILE OUT_DIR
    ... sharding_worker dist DATA_FILE PROCESS_ID NUM_PROCESSES PORT   (2 devices per process)
    ... sharding_worker data DATA_FILE OUT_DIR PROCESS_ID NUM_PROCESSES PORT   (the batch loader)

Each mode prints one line ``RESULT <json>`` with the numbers; the assertions live in the tests.
"""

import dataclasses
import json
import os
import sys
import time


def _setup() -> None:
    import jax
    from jaxtyping import install_import_hook

    jax.config.update("jax_numpy_dtype_promotion", "strict")
    # The same runtime checks as the pytest run (pyproject addopts).
    install_import_hook("xlstm_eqx", "beartype.beartype")


# ----------------------------------------------------------------------------------------------
# models under test


def _models() -> dict:
    from xlstm_eqx.core import ParallelConfig
    from xlstm_eqx.llama import LlamaTransformer
    from xlstm_eqx.presets import tiny_llama, tiny_xlstm, tiny_xlstm_slstm
    from xlstm_eqx.xlstm import xLSTMLMModel

    def mixed():
        # "mlstm" layer (dense gates, conv, headwise q/k/v) + an sLSTM block, unscanned.
        return dataclasses.replace(tiny_xlstm_slstm(), num_blocks=2, slstm_at=[1])

    xlstm_fsdp = ["Embed", "LMHead", "mLSTMBlock"]
    return {
        # name: (config factory, model class, parallel config template)
        "xlstm_v1": (
            tiny_xlstm,
            xLSTMLMModel,
            ParallelConfig(fsdp_modules=xlstm_fsdp, fsdp_min_weight_size=128),
        ),
        "xlstm_mixed": (
            mixed,
            xLSTMLMModel,
            ParallelConfig(fsdp_modules=xlstm_fsdp, fsdp_min_weight_size=128),
        ),
        "llama": (
            tiny_llama,
            LlamaTransformer,
            ParallelConfig(
                fsdp_modules=["Embed", "LMHead", "TransformerBlock"], fsdp_min_weight_size=128
            ),
        ),
    }


# fsdp=8 last: its train step donates buffers that the placed copies may share with `model`.
MESHES = ("dp=8", "tp=2,dp=4", "fsdp=4,tp=2", "fsdp=8")


def _tree_rel_errors(a, b) -> tuple[float, float]:
    """(max over leaves of ||a-b|| / ||b||, max over leaves of max|a-b| / max|b|)."""
    import jax
    import numpy as np

    norm_rel, max_rel = 0.0, 0.0
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x = np.asarray(x, np.float64)
        y = np.asarray(y, np.float64)
        scale = float(np.linalg.norm(y)) or 1.0
        norm_rel = max(norm_rel, float(np.linalg.norm(x - y)) / scale)
        big = float(np.max(np.abs(y))) or 1.0
        max_rel = max(max_rel, float(np.max(np.abs(x - y))) / big)
    return norm_rel, max_rel


def _parallel_config_cls():
    from xlstm_eqx.core import ParallelConfig

    return ParallelConfig


def _specs_of(tree) -> dict[str, str]:
    import jax

    return {
        jax.tree_util.keystr(p): str(tuple(x.sharding.spec))
        for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def _batch(vocab: int, shape):
    import numpy as np

    rng = np.random.default_rng(0)
    return rng.integers(0, vocab, size=shape).astype(np.int32)


# ----------------------------------------------------------------------------------------------
# equiv: loss and gradients on each mesh vs one device; the parameter specs; the FSDP HLO


def run_equiv(names: list[str]) -> dict:
    import equinox as eqx
    import jax
    import jax.random as jr

    from xlstm_eqx.parallel import (
        count_all_gathers,
        gather_at_use,
        init_sharded,
        make_mesh,
        named_shardings,
        opt_state_specs,
        param_partition_specs,
        parse_mesh_spec,
        place_global,
        shard_model,
    )
    from xlstm_eqx.training import (
        TrainConfig,
        make_optimizer,
        make_train_step,
        next_token_loss,
        trainable_params,
    )

    out: dict = {}
    models = _models()
    for name in names:
        make_config, cls, base = models[name]
        config = make_config()
        res: dict = {"meshes": {}}
        t0 = time.perf_counter()
        key = jr.key(0)
        one = make_mesh(parse_mesh_spec("dp=1", base), devices=jax.devices()[:1])
        model = init_sharded(cls, config, key=key, mesh=one, parallel_config=base)
        # Born sharded on 8 devices: the same values as the one-device init.
        pc_init = parse_mesh_spec("fsdp=4,tp=2", base)
        born = init_sharded(cls, config, key=key, mesh=make_mesh(pc_init), parallel_config=pc_init)
        res["init_equal"] = bool(eqx.tree_equal(jax.device_get(born), jax.device_get(model)))
        res["init_specs"] = _specs_of(eqx.filter(born, eqx.is_array))
        del born
        tokens = _batch(config.vocab_size, (8, 17))
        key_loss = jr.key(1)

        def loss(m, b, k):
            return next_token_loss(m, b, k)

        ref_fn = jax.jit(lambda m, b, k: eqx.filter_value_and_grad(loss)(m, b, k))
        ref_loss, ref_grads = ref_fn(model, jax.device_put(tokens, jax.devices()[0]), key_loss)
        ref_grads = jax.device_get(ref_grads)
        res["ref_loss"] = float(ref_loss)
        res["seconds_ref"] = round(time.perf_counter() - t0, 1)

        for spec in MESHES:
            t1 = time.perf_counter()
            pc = parse_mesh_spec(spec, base)
            mesh = make_mesh(pc)
            specs = param_partition_specs(model, pc)
            sharded = shard_model(model, mesh, specs)
            entry: dict = {"param_specs": _specs_of(eqx.filter(sharded, eqx.is_array))}
            if spec == "fsdp=8":
                # The full sharded train step: its gradients, its output layout and its HLO.
                opt = make_optimizer(TrainConfig(steps=10, lr=1e-2, warmup_steps=0), model)
                with jax.numpy_dtype_promotion("standard"):
                    opt_state = opt.init(trainable_params(model))
                ospecs = opt_state_specs(opt_state, trainable_params(model), specs)
                step = make_train_step(
                    opt,
                    mesh=mesh,
                    parallel_config=pc,
                    model_specs=specs,
                    opt_specs=ospecs,
                    return_grads=True,
                )
                args = step.place_inputs((tokens[None], key_loss), sharded, opt_state)
                compiled = step.core.lower(*args).compile()
                hlo = compiled.compiled.as_text()
                new_model, _, loss_val, _, grads = compiled(*args)
                entry["out_specs"] = _specs_of(eqx.filter(new_model, eqx.is_array))
                gathers = count_all_gathers(hlo)
                entry["all_gathers"] = [[d, list(s)] for d, s in gathers]
                entry["param_shapes"] = {
                    jax.tree_util.keystr(p): list(x.shape)
                    for p, x in jax.tree_util.tree_flatten_with_path(
                        eqx.filter(model, eqx.is_array)
                    )[0]
                }
                entry["all_reduces"] = sum(" all-reduce(" in line for line in hlo.splitlines())
            else:
                msh = named_shardings(specs, mesh)

                def sharded_loss(m, b, k, specs=specs, mesh=mesh, pc=pc):
                    return next_token_loss(gather_at_use(m, specs, mesh, pc), b, k)

                def value_and_grad(m, b, k, f=sharded_loss, msh=msh):
                    value, grads = eqx.filter_value_and_grad(f)(m, b, k)
                    return value, eqx.filter_shard(grads, msh)

                fn = jax.jit(value_and_grad)
                batch = place_global(tokens, jax.sharding.NamedSharding(mesh, _bspec(pc)))
                loss_val, grads = fn(sharded, batch, key_loss)
            entry["grad_specs"] = _specs_of(grads)
            entry["loss"] = float(loss_val)
            entry["loss_rel"] = abs(float(loss_val) - res["ref_loss"]) / abs(res["ref_loss"])
            entry["grad_norm_rel"], entry["grad_max_rel"] = _tree_rel_errors(
                jax.device_get(grads), ref_grads
            )
            entry["seconds"] = round(time.perf_counter() - t1, 1)
            res["meshes"][spec] = entry
        out[name] = res
    return out


def _bspec(pc):
    from xlstm_eqx.parallel import batch_spec

    return batch_spec(pc)


# ----------------------------------------------------------------------------------------------
# train: the trainer's loop with the sharded step; checkpoints across meshes


def _train_config(data_file: str, out: str):
    from xlstm_eqx.training import TrainConfig

    return TrainConfig(
        model="xlstm",
        preset="tiny",
        data=[data_file],
        seq_len=16,
        batch_size=8,
        grad_accum=2,
        steps=3,
        lr=1e-2,
        warmup_steps=1,
        log_every=1,
        eval_every=100,
        eval_batches=1,
        checkpoint_every=100,
        progress=False,
        sample_tokens=0,
        out=out,
    )


def run_train(data_file: str, out_dir: str, mesh_spec: str) -> dict:
    import equinox as eqx
    import jax
    import jax.random as jr

    from xlstm_eqx import models as _registry, training as _train
    from xlstm_eqx.parallel import (
        make_mesh,
        named_shardings,
        opt_state_specs,
        param_partition_specs,
        parse_mesh_spec,
    )
    from xlstm_eqx.training import (
        latest_checkpoint,
        restore_checkpoint,
        save_checkpoint,
        shard_train_state,
        train_state as _train_state,
    )

    res: dict = {}
    t0 = time.perf_counter()
    quiet = lambda msg: None  # noqa: E731
    single = _train.train(_train_config(data_file, os.path.join(out_dir, "single")), log=quiet)
    res["seconds_single"] = round(time.perf_counter() - t0, 1)

    # The trainer's loop with its step replaced by the sharded one (what `--mesh` wires in).
    original = _train_state.optimizer_and_step
    placed: dict = {}

    def sharded_optimizer_and_step(cfg, model, model_config, family):
        optimizer, _ = original(cfg, model, model_config, family)
        with jax.numpy_dtype_promotion("standard"):
            opt_state = optimizer.init(_train.trainable_params(model))
        m, o, step, mesh = shard_train_state(mesh_spec, model, opt_state, optimizer)
        placed["mesh"] = mesh
        placed["model_specs"] = _specs_of(eqx.filter(m, eqx.is_array))

        def counted(inputs, model, opt_state):
            model, opt_state, loss, gnorm = step.core(inputs, model, opt_state)
            placed["after_step_specs"] = _specs_of(eqx.filter(model, eqx.is_array))
            return model, opt_state, loss, gnorm

        # (the loader places batches on the mesh: `step.batch_sharding`)
        return optimizer, dataclasses.replace(step, core=counted)

    t1 = time.perf_counter()
    _train_state.optimizer_and_step = sharded_optimizer_and_step
    try:
        meshed = _train.train(_train_config(data_file, os.path.join(out_dir, "mesh")), log=quiet)
    finally:
        _train_state.optimizer_and_step = original
    res["seconds_mesh"] = round(time.perf_counter() - t1, 1)
    rows = {}
    for name in ("single", "mesh"):
        with open(os.path.join(out_dir, name, "metrics.jsonl")) as f:
            rows[name] = [json.loads(line) for line in f if line.strip()]
    res["losses_single"] = [r["loss"] for r in rows["single"]]
    res["losses_mesh"] = [r["loss"] for r in rows["mesh"]]
    res["grad_norms_single"] = [r["grad_norm"] for r in rows["single"]]
    res["grad_norms_mesh"] = [r["grad_norm"] for r in rows["mesh"]]
    res["eval_single"] = single.eval_loss
    res["eval_mesh"] = meshed.eval_loss
    res["mesh_shape"] = dict(placed["mesh"].shape)
    res["mesh_model_specs"] = placed["model_specs"]
    res["mesh_after_step_specs"] = placed["after_step_specs"]
    res["final_params_rel"] = _tree_rel_errors(
        jax.device_get(eqx.filter(meshed.model, eqx.is_array)),
        jax.device_get(eqx.filter(single.model, eqx.is_array)),
    )

    # Checkpoints across meshes: the mesh run's checkpoint → fsdp=8 → save → tp=2×dp=4 → one
    # device.
    t2 = time.perf_counter()
    family = _registry.MODEL_FAMILIES["xlstm"]
    config = meshed.model_config
    optimizer = _train.make_optimizer(_train_config(data_file, ""), meshed.model, config, family)
    skel = eqx.filter_eval_shape(family.build, config, key=jr.key(0))
    params = _train.trainable_params(meshed.model)
    with jax.numpy_dtype_promotion("standard"):
        opt_skel = jax.eval_shape(optimizer.init, params)
    base = config.parallel or _parallel_config_cls()()
    base = dataclasses.replace(
        base, fsdp_modules=["Embed", "LMHead", "mLSTMBlock"], fsdp_min_weight_size=128
    )

    def layouts(spec: str):
        pc = parse_mesh_spec(spec, base)
        mesh = make_mesh(pc)
        specs = param_partition_specs(skel, pc)
        ospecs = opt_state_specs(opt_skel, params, specs)
        return {"model": named_shardings(specs, mesh), "opt_state": named_shardings(ospecs, mesh)}

    ckpt = latest_checkpoint(os.path.join(out_dir, "mesh", "checkpoints"))
    templates = {"model": skel, "opt_state": opt_skel}
    on_fsdp, _ = restore_checkpoint(ckpt, templates, layouts("fsdp=8"))
    res["fsdp8_specs"] = _specs_of(eqx.filter(on_fsdp["model"], eqx.is_array))
    path = save_checkpoint(os.path.join(out_dir, "resharded"), 7, on_fsdp, {"step": 7})
    on_tp, meta = restore_checkpoint(path, templates, layouts("tp=2,dp=4"))
    res["tp_specs"] = _specs_of(eqx.filter(on_tp["model"], eqx.is_array))
    res["tp_opt_specs"] = sorted(
        set(_specs_of(eqx.filter(on_tp["opt_state"], eqx.is_array)).values())
    )
    plain, _ = restore_checkpoint(path, templates)
    res["plain_devices"] = sorted(
        {str(d) for x in jax.tree.leaves(eqx.filter(plain, eqx.is_array)) for d in x.devices()}
    )
    res["ckpt_meta_step"] = meta.get("step")
    trained = eqx.filter(meshed.model, eqx.is_array)
    res["roundtrip_equal"] = {
        "fsdp8": bool(
            eqx.tree_equal(
                jax.device_get(eqx.filter(on_fsdp["model"], eqx.is_array)), jax.device_get(trained)
            )
        ),
        "tp2dp4": bool(
            eqx.tree_equal(
                jax.device_get(eqx.filter(on_tp["model"], eqx.is_array)), jax.device_get(trained)
            )
        ),
        "single": bool(
            eqx.tree_equal(
                jax.device_get(eqx.filter(plain["model"], eqx.is_array)), jax.device_get(trained)
            )
        ),
        "opt_tp2dp4": bool(
            eqx.tree_equal(jax.device_get(on_tp["opt_state"]), jax.device_get(plain["opt_state"]))
        ),
    }
    res["seconds_ckpt"] = round(time.perf_counter() - t2, 1)

    # FSDP gathers in fsdp_gather_dtype: the weights the model sees are rounded to bfloat16.
    # (On CPU, XLA widens bfloat16 collectives back to float32, so the HLO cannot show it.)
    t3 = time.perf_counter()
    import jax.numpy as jnp

    from xlstm_eqx.parallel import init_sharded
    from xlstm_eqx.presets import tiny_xlstm
    from xlstm_eqx.training import make_train_step
    from xlstm_eqx.xlstm import xLSTMLMModel

    pc = parse_mesh_spec("fsdp=8", dataclasses.replace(base, fsdp_gather_dtype="bfloat16"))
    mesh = make_mesh(pc)
    model = init_sharded(xLSTMLMModel, tiny_xlstm(), key=jr.key(0), mesh=mesh, parallel_config=pc)
    plain = jax.device_put(model, jax.devices()[0])
    opt = _train.make_optimizer(_train_config(data_file, ""), model)
    with jax.numpy_dtype_promotion("standard"):
        opt_state = opt.init(_train.trainable_params(model))
    specs = param_partition_specs(model, pc)
    ospecs = opt_state_specs(opt_state, _train.trainable_params(model), specs)
    step = make_train_step(opt, mesh=mesh, parallel_config=pc, model_specs=specs, opt_specs=ospecs)
    tokens = _batch(64, (1, 8, 17))

    def rounded(x, spec):
        if "fsdp" in str(spec):
            return x.astype(jnp.bfloat16).astype(jnp.float32)
        return x

    flat_specs = jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))
    arrays, static = eqx.partition(plain, eqx.is_array)
    leaves, treedef = jax.tree.flatten(arrays)
    plain_rounded = eqx.combine(
        jax.tree.unflatten(
            treedef, [rounded(x, s) for x, s in zip(leaves, flat_specs, strict=True)]
        ),
        static,
    )
    k0 = jr.split(jr.key(0), 1)[0]
    loss_fn = eqx.filter_jit(_train.next_token_loss)
    res["loss_rounded_ref"] = float(loss_fn(plain_rounded, jnp.asarray(tokens[0]), k0))
    res["loss_f32_ref"] = float(loss_fn(plain, jnp.asarray(tokens[0]), k0))
    # (last: the step donates the model's buffers, which `plain` may share)
    res["loss_bf16_gather"] = float(step((tokens, jr.key(0)), model, opt_state)[2])
    res["seconds_bf16"] = round(time.perf_counter() - t3, 1)
    return res


# ----------------------------------------------------------------------------------------------
# dist: two processes, JAX CPU collectives, data parallel over both


def run_dist(data_file: str, process_id: int, num_processes: int, port: int) -> dict:
    import jax

    from xlstm_eqx.parallel import initialize_distributed

    up = initialize_distributed(
        f"localhost:{port}", num_processes, process_id, cpu_collectives="gloo"
    )
    import jax.random as jr
    import numpy as np

    from xlstm_eqx import models as _registry, training as _train
    from xlstm_eqx.training import prepare as _prepare, shard_train_state, step as _step

    # Never the default out (runs/xlstm in the working tree): a real run there makes `prepare_run`
    # refuse ("already holds a run"), and tests must not write into the checkout.
    cfg = _train_config(data_file, os.path.join(os.path.dirname(data_file), f"prep{process_id}"))
    p = _prepare.prepare_run(cfg)
    family = _registry.MODEL_FAMILIES[p.kind]
    init_key, loop_key = jr.split(jr.key(cfg.seed))
    model = family.build(p.model_config, key=init_key)
    optimizer, _ = _step.optimizer_and_step(cfg, model, p.model_config, family)
    with jax.numpy_dtype_promotion("standard"):
        opt_state = optimizer.init(_train.trainable_params(model))
    model, opt_state, step, mesh = shard_train_state("dp=-1", model, opt_state, optimizer)
    losses, norms = [], []
    for i in range(1, cfg.steps + 1):
        pos = (i - 1) * cfg.grad_accum
        batch = np.stack([p.sampler.batch(pos + a) for a in range(cfg.grad_accum)])
        model, opt_state, loss, gnorm = step((batch, jr.fold_in(loop_key, i)), model, opt_state)
        losses.append(float(loss))
        norms.append(float(gnorm))
    # The trainer's own loop, as `xlstm-eqx train --mesh fsdp=-1` runs it on every process:
    # FSDP over both processes, evaluation, orbax checkpoints (each process writes its shards)
    # and the end-of-run sample, all into one shared directory.
    run_dir = os.path.join(os.path.dirname(data_file), "dist_train")
    tcfg = dataclasses.replace(
        _train_config(data_file, run_dir),
        mesh="fsdp=-1",
        eval_every=2,
        checkpoint_every=2,
        sample_tokens=4,
        sample_temperature=0.0,
    )
    result = _train.train(tcfg, log=lambda msg: None)
    return {
        "trainer_losses": [result.losses[s] for s in sorted(result.losses)],
        "trainer_eval_loss": result.eval_loss,
        "trainer_sample": result.sample,
        "run_dir": run_dir,
        "initialized": up,
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "local_devices": jax.local_device_count(),
        "global_devices": jax.device_count(),
        "mesh": dict(mesh.shape),
        "losses": losses,
        "grad_norms": norms,
    }


# ----------------------------------------------------------------------------------------------
# data: the trainer's batch loader over processes (each reads only its own rows of every batch)


def run_data(data_file: str, out_dir: str, process_id: int, num_processes: int, port: int) -> dict:
    """`train()` of the toy model from `tests/training/test_train.py` on the token store, data-parallel over
    every device of `num_processes` processes (one process: no mesh), recording the rows of each
    batch that this process read."""
    import jax

    from xlstm_eqx.parallel import initialize_distributed

    if num_processes > 1:
        initialize_distributed(
            f"localhost:{port}", num_processes, process_id, cpu_collectives="gloo"
        )
    _setup()
    import tests.training.test_train  # noqa: F401 - registers the "toy" model family
    from xlstm_eqx.data import BatchSampler
    from xlstm_eqx.training import TrainConfig, train

    reads: list = []
    original = BatchSampler.rows

    def rows(self, index, start, stop):
        reads.append([int(index), int(start), int(stop)])
        return original(self, index, start, stop)

    BatchSampler.rows = rows
    cfg = TrainConfig(
        model="toy",
        preset="tiny",
        data=[data_file],
        seq_len=16,
        batch_size=8,
        steps=4,
        lr=1e-2,
        warmup_steps=1,
        log_every=1,
        eval_every=4,
        eval_batches=1,
        checkpoint_every=2,
        progress=False,
        sample_tokens=0,
        out=out_dir,
        mesh="dp=-1" if num_processes > 1 else "",
    )
    result = train(cfg, log=lambda msg: None)
    return {
        "losses": [result.losses[s] for s in sorted(result.losses)],
        "eval_loss": result.eval_loss,
        "reads": reads,
        "process_index": jax.process_index(),
        "devices": jax.device_count(),
    }


def main(argv: list[str]) -> None:
    mode = argv[0]
    if mode == "dist":
        # Collectives must be chosen before the backend starts: no JAX work before initialize.
        out = run_dist(argv[1], int(argv[2]), int(argv[3]), int(argv[4]))
    elif mode == "data":
        out = run_data(argv[1], argv[2], int(argv[3]), int(argv[4]), int(argv[5]))
    else:
        _setup()
        if mode == "equiv":
            out = run_equiv(argv[1:])
        elif mode == "train":
            out = run_train(argv[1], argv[2], argv[3])
        else:
            raise SystemExit(f"unknown mode {mode!r}")
    print("RESULT " + json.dumps(out, default=str), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
