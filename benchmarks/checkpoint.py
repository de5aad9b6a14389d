"""Checkpoint costs before (gathered ``.npz``, process 0 writes) and after (orbax, every process
writes its shards, asynchronously), measured on simulated CPU devices: two processes with 4
devices each (gloo), an FSDP-sharded xLSTM (fsdp=8) and its AdamW state.

    python benchmarks/checkpoint.py [--dim 512] [--blocks 8] [--vocab 32768] [--out DIR]

Per process it reports: the bytes it wrote, the peak rise of its resident memory (host RAM; on
simulated devices the devices' memory is host memory too) during save and restore, the most bytes
live on one of its devices after a restore, and for a save the time the caller is blocked versus
the time until the checkpoint is committed (the second save of the run: the first compiles and sets
up). Before, the save is synchronous: the time blocked is the time until the file is written.
"""

import argparse
import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _Peak:
    """Peak resident memory above the level at entry, sampled every millisecond."""

    def __enter__(self) -> "_Peak":
        self.base = self.peak = _rss()
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self.t0 = time.perf_counter()
        return self

    def _run(self) -> None:
        while not self._stop:
            self.peak = max(self.peak, _rss())
            time.sleep(0.001)

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.t0
        self._stop = True
        self._thread.join()
        self.peak = max(self.peak, _rss())
        self.rise = self.peak - self.base


def _du(path: str) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            total += os.path.getsize(os.path.join(dirpath, f))
    return total


def _device_bytes(tree) -> int:
    import equinox as eqx
    import jax

    per: dict = {}
    for x in jax.tree.leaves(eqx.filter(tree, eqx.is_array)):
        for s in x.addressable_shards:
            per[s.device] = per.get(s.device, 0) + s.data.nbytes
    return max(per.values())


def worker(args: argparse.Namespace) -> dict:
    from xlstm_eqx.parallel import initialize_distributed

    initialize_distributed(f"localhost:{args.port}", 2, args.process_id, cpu_collectives="gloo")
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import jax.random as jr
    from jax.experimental import multihost_utils

    from xlstm_eqx.core import ParallelConfig
    from xlstm_eqx.parallel import init_sharded, memory_report
    from xlstm_eqx.presets import tiny_xlstm
    from xlstm_eqx.training import (
        CheckpointStore,
        TrainConfig,
        init_sharded_opt_state,
        make_optimizer,
        mesh_layout,
        restore_checkpoint,
        trainable_params,
    )
    from xlstm_eqx.training.checkpoint import save_sharded_checkpoint
    from xlstm_eqx.xlstm import xLSTMLMModel

    multihost_utils.sync_global_devices("start")
    pid = jax.process_index()
    config = dataclasses.replace(
        tiny_xlstm(), embedding_dim=args.dim, num_blocks=args.blocks, vocab_size=args.vocab
    )
    config = dataclasses.replace(
        config,
        parallel=ParallelConfig(
            fsdp_modules=["Embed", "LMHead", "mLSTMBlock"], fsdp_min_weight_size=1024
        ),
    )
    skel = eqx.filter_eval_shape(xLSTMLMModel, config, key=jr.key(0))
    optimizer = make_optimizer(TrainConfig(steps=10), skel)
    layout = mesh_layout("fsdp=8", skel, optimizer, base=config.parallel)
    model = init_sharded(
        xLSTMLMModel,
        config,
        key=jr.key(0),
        mesh=layout.mesh,
        parallel_config=layout.parallel_config,
    )
    opt_state = init_sharded_opt_state(optimizer, model, layout)

    # Random moments, as after training (fresh ones are zeros, which compression makes free).
    def noisy(x):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            return x
        return x + jr.normal(jr.key(1), x.shape, x.dtype)

    opt_state = jax.jit(lambda o: jax.tree.map(noisy, o))(opt_state)
    trees = {"model": model, "opt_state": opt_state}
    rep = memory_report(config, layout.parallel_config, hosts=2)
    res: dict = {
        "process": pid,
        "params": rep.num_params,
        "state_bytes": rep.checkpoint_bytes,
        "state_bytes_per_device": rep.total_bytes_per_device,
        "device_bytes_before_save": _device_bytes(trees),
    }
    after_dir, before_dir = os.path.join(args.out, "after"), os.path.join(args.out, "before")

    # after: orbax
    multihost_utils.sync_global_devices("after save")
    store = CheckpointStore(after_dir, keep=None)
    store.save(0, trees, {"step": 0})  # the first save also sets things up: not measured
    store.wait()
    with _Peak() as save_peak:
        t0 = time.perf_counter()
        store.save(1, trees, {"step": 1})
        blocked = time.perf_counter() - t0
        store.wait()
    store.close()
    multihost_utils.sync_global_devices("after saved")
    res["after"] = {
        "save_blocked_s": round(blocked, 3),
        "save_committed_s": round(save_peak.seconds, 3),
        "save_rss_rise": save_peak.rise,
        "written": sum(
            _du(os.path.join(after_dir, "step_00000001", item, f"ocdbt.process_{pid}"))
            for item in ("model", "opt_state")
        ),
    }
    opt_skel = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), opt_state)
    del trees, model, opt_state  # the restore goes into freed memory, as in a resumed run
    import gc

    gc.collect()
    with _Peak() as restore_peak:
        restored, _ = restore_checkpoint(
            os.path.join(after_dir, "step_00000001"),
            {"model": skel, "opt_state": opt_skel},
            {"model": layout.model_shardings, "opt_state": layout.opt_shardings},
        )
    res["after"]["restore_s"] = round(restore_peak.seconds, 3)
    res["after"]["restore_rss_rise"] = restore_peak.rise
    res["after"]["restore_device_bytes"] = _device_bytes(restored)

    # before: every leaf all-gathered to every process, process 0 writes one .npz
    multihost_utils.sync_global_devices("before save")
    save_sharded_checkpoint(before_dir, 0, restored, {"step": 0}, keep=1)  # compiles the gathers
    multihost_utils.sync_global_devices("before save 2")
    with _Peak() as old_save:
        save_sharded_checkpoint(before_dir, 1, restored, {"step": 1}, keep=1)
        multihost_utils.sync_global_devices("before saved")
    res["before"] = {
        "save_blocked_s": round(old_save.seconds, 3),
        "save_committed_s": round(old_save.seconds, 3),
        "save_rss_rise": old_save.rise,
        "written": _du(before_dir) if pid == 0 else 0,
    }
    del restored
    gc.collect()
    # The old resume: fresh model + optimizer state on the default device as templates, the file
    # read whole into them on that device, then placed on the mesh.
    from xlstm_eqx.training.checkpoint import latest_checkpoint, restore_checkpoint as old_restore
    from xlstm_eqx.training.step import shard_train_state

    with _Peak() as old_restore_peak:
        model = xLSTMLMModel(config, key=jr.key(0))
        with jax.numpy_dtype_promotion("standard"):
            opt_state = optimizer.init(trainable_params(model))
        templates = {"model": model, "opt_state": opt_state}
        on_one, _ = old_restore(latest_checkpoint(before_dir), templates)
        one_device = _device_bytes(templates) + _device_bytes(on_one)
        del templates, model, opt_state
        m, o, _, _ = shard_train_state(
            layout.parallel_config, on_one["model"], on_one["opt_state"], optimizer
        )
    res["before"]["restore_s"] = round(old_restore_peak.seconds, 3)
    res["before"]["restore_rss_rise"] = old_restore_peak.rise
    res["before"]["restore_device_bytes"] = one_device
    multihost_utils.sync_global_devices("done")
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--blocks", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--out", default=None)
    p.add_argument("--process-id", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.process_id is not None:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return
    out = args.out or tempfile.mkdtemp(prefix="bench_checkpoint-")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    cmd = [sys.executable, os.path.abspath(__file__), "--out", out, "--port", str(port)]
    cmd += ["--dim", str(args.dim), "--blocks", str(args.blocks), "--vocab", str(args.vocab)]
    procs = [
        subprocess.Popen(cmd + ["--process-id", str(i)], env=env, stdout=subprocess.PIPE, text=True)
        for i in (0, 1)
    ]
    results = []
    for proc in procs:
        stdout, _ = proc.communicate()
        line = [x for x in stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode != 0 or not line:
            raise SystemExit(f"worker failed (exit {proc.returncode})")
        results.append(json.loads(line[-1][7:]))
    mib = 2**20
    r0 = results[0]
    print(
        f"{r0['params']:,} parameters, model + AdamW state {r0['state_bytes'] / mib:,.1f} MiB, "
        f"{r0['state_bytes_per_device'] / mib:,.1f} MiB per device (fsdp=8 over 2 processes x 4)"
    )
    for when in ("before", "after"):
        for r in results:
            b = r[when]
            print(
                f"{when:6s} process {r['process']}: wrote {b['written'] / mib:8.1f} MiB | save: "
                f"blocked {b['save_blocked_s']:6.2f} s, committed {b['save_committed_s']:6.2f} s, "
                f"RSS +{b['save_rss_rise'] / mib:7.1f} MiB | restore: {b['restore_s']:6.2f} s, "
                f"RSS +{b['restore_rss_rise'] / mib:7.1f} MiB, busiest device "
                f"{b['restore_device_bytes'] / mib:7.1f} MiB"
            )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
