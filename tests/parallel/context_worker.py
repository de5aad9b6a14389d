"""Multi-device work for tests/parallel/test_context_parallel.py (issue 23), run in a subprocess
with simulated CPU devices so that the rest of the suite keeps one device.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m tests.parallel.context_worker equiv mlstm [MESH ...]
    ... context_worker train

Prints one line ``RESULT <json>`` with the numbers; the assertions live in the tests.
"""

import dataclasses
import json
import sys


CHUNK = 4  # the chunkwise form's chunk size in the tiny models (segment lengths vs chunks)
MESHES = ("cp=8", "cp=4,dp=2", "cp=2,fsdp=2,tp=2")
# Per mesh: a sequence length S that is a multiple of cp × CHUNK and one that is not. Meshes with
# the same S share one one-device reference (3 references instead of 6: each costs a compile).
SEQ_LENGTHS = {
    "cp=8": {"multiple": 32, "not_multiple": 40},
    "cp=4,dp=2": {"multiple": 32, "not_multiple": 40},
    "cp=2,fsdp=2,tp=2": {"multiple": 32, "not_multiple": 20},
}


def _setup() -> None:
    import jax
    from jaxtyping import install_import_hook

    jax.config.update("jax_numpy_dtype_promotion", "strict")
    install_import_hook("xlstm_eqx", "beartype.beartype")  # as the pytest run (pyproject addopts)


def tiny_config(layer_type: str):
    """tiny_xlstm with one block of ``layer_type``, the chunkwise form (chunk `CHUNK`) and the memory
    reset at document borders."""
    from xlstm_eqx.cell.backend_config import mLSTMBackendNameAndKwargs
    from xlstm_eqx.presets import tiny_xlstm

    config = tiny_xlstm()
    layer = config.mlstm_block.mlstm
    cell = dataclasses.replace(
        layer.mlstm_cell,
        backend=mLSTMBackendNameAndKwargs(name="chunkwise", kwargs={"chunk_size": CHUNK}),
        reset_at_document_boundaries=True,
    )
    extra = {"qkv_proj_blocksize": 4} if layer_type == "mlstm" else {}
    layer = dataclasses.replace(layer, layer_type=layer_type, mlstm_cell=cell, **extra)
    block = dataclasses.replace(config.mlstm_block, mlstm=layer)
    return dataclasses.replace(config, mlstm_block=block, num_blocks=1)


def parallel_base():
    from xlstm_eqx.core import ParallelConfig

    return ParallelConfig(fsdp_modules=["Embed", "LMHead", "mLSTMBlock"], fsdp_min_weight_size=128)


def borders_for(batch: int, seq: int, cp: int):
    """Document borders ``(batch, seq + 1)``: row 0 starts documents on segment boundaries, row 1
    inside segments (and at token 0); the other rows none. The boundaries of cp are also those
    of every cp' dividing it (and row 1's positions stay inside their segments), so one set of
    borders serves all the meshes that share S."""
    import numpy as np

    seg = seq // cp
    borders = np.zeros((batch, seq + 1), bool)
    borders[0, seg::seg] = True  # every segment boundary
    borders[1, [0, seg + seg // 2 + 1, seq - 2]] = True
    return borders


def _loss(model, tokens, borders):
    import jax.numpy as jnp
    import optax

    logits = model(tokens[:, :-1], document_borders=borders[:, :-1])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), tokens[:, 1:])
    return jnp.mean(ce)


def _rel_errors(a, b) -> dict:
    """Loss: |a - b| / |b|; gradients: the largest over leaves of ||a - b|| / ||b|| and of
    max|a - b| / max|b| (float64 on the host)."""
    import jax
    import numpy as np

    norm_rel, max_rel = 0.0, 0.0
    for x, y in zip(jax.tree.leaves(a[1]), jax.tree.leaves(b[1]), strict=True):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        norm_rel = max(norm_rel, float(np.linalg.norm(x - y) / (np.linalg.norm(y) or 1.0)))
        max_rel = max(max_rel, float(np.max(np.abs(x - y)) / (np.max(np.abs(y)) or 1.0)))
    loss_rel = abs(float(a[0]) - float(b[0])) / abs(float(b[0]))
    return {"loss": loss_rel, "grad_norm_rel": norm_rel, "grad_max_rel": max_rel}


def run_equiv(layer_type: str, meshes: tuple[str, ...] = MESHES) -> dict:
    """Loss and gradients with document borders on each cp mesh vs one device, for a sequence
    length that is a multiple of cp × CHUNK and one that is not (`SEQ_LENGTHS`)."""
    import equinox as eqx
    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    from xlstm_eqx.parallel import (
        context_parallel,
        gather_at_use,
        make_mesh,
        param_partition_specs,
        parse_mesh_spec,
        shard_model,
    )
    from xlstm_eqx.xlstm import xLSTMLMModel

    config = tiny_config(layer_type)
    model = xLSTMLMModel(config, key=jax.random.key(0))
    one_device = eqx.filter_jit(eqx.filter_value_and_grad(_loss))
    pcs = {spec: parse_mesh_spec(spec, parallel_base()) for spec in meshes}
    largest_cp: dict[int, int] = {}  # per S: the largest cp using it (its borders serve all)
    for spec in meshes:
        for seq in SEQ_LENGTHS[spec].values():
            cp = pcs[spec].context_axis_size
            largest_cp[seq] = max(cp, largest_cp.get(seq, 1))
    rng = np.random.default_rng(0)
    inputs = {
        seq: (
            rng.integers(0, config.vocab_size, (4, seq + 1)).astype(np.int32),
            borders_for(4, seq, cp),
        )
        for seq, cp in largest_cp.items()
    }
    refs = {seq: jax.device_get(one_device(model, *batch)) for seq, batch in inputs.items()}
    out: dict = {}
    for spec in meshes:
        pc = pcs[spec]
        mesh = make_mesh(pc)
        specs = param_partition_specs(model, pc)
        sharded = shard_model(model, mesh, specs)

        def split_loss(m, tokens, borders, specs=specs, mesh=mesh, pc=pc):
            wrapped = context_parallel(gather_at_use(m, specs, mesh, pc), mesh, pc)
            return _loss(wrapped, tokens, borders)

        on_mesh = eqx.filter_jit(eqx.filter_value_and_grad(split_loss))
        batch_sharding = NamedSharding(mesh, P(("dp", "fsdp"), None))
        for kind, seq in SEQ_LENGTHS[spec].items():
            args = [jax.device_put(x, batch_sharding) for x in inputs[seq]]
            got = jax.device_get(on_mesh(sharded, *args))
            out[f"{spec}/{kind}"] = {"seq": seq, **_rel_errors(got, refs[seq])}
            print(f"{spec}/{kind}: {out[f'{spec}/{kind}']}", file=sys.stderr, flush=True)
    return out


def run_train() -> dict:
    """20 optimizer steps on cp=4 (dp=2 fills the 8 devices) and on one device from the same
    model and batches: the losses per step."""
    import jax
    import numpy as np

    from xlstm_eqx.training import TrainConfig, make_optimizer, make_train_step, trainable_params
    from xlstm_eqx.training.step import shard_train_state
    from xlstm_eqx.xlstm import xLSTMLMModel

    config = tiny_config("mlstm")
    cfg = TrainConfig(steps=20, lr=3e-3, warmup_steps=2)
    rng = np.random.default_rng(1)
    batches = [rng.integers(0, config.vocab_size, (1, 4, 33)).astype(np.int32) for _ in range(20)]
    losses: dict = {}
    for name in ("one", "cp=4"):
        model = xLSTMLMModel(config, key=jax.random.key(0))
        opt = make_optimizer(cfg, model)
        with jax.numpy_dtype_promotion("standard"):
            opt_state = opt.init(trainable_params(model))
        if name == "one":
            step = make_train_step(opt)
        else:
            model, opt_state, step, _ = shard_train_state(
                name, model, opt_state, opt, base=parallel_base()
            )
        run = []
        for i, batch in enumerate(batches):
            model, opt_state, loss, _ = step((batch, jax.random.key(i)), model, opt_state)
            run.append(float(loss))
        losses[name] = run
    return losses


def main(argv: list[str]) -> None:
    _setup()
    mode = argv[0]
    if mode == "equiv":
        result = run_equiv(argv[1], tuple(argv[2:]) or MESHES)
    elif mode == "train":
        result = run_train()
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
