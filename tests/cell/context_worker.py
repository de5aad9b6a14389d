"""Worker for tests/cell/test_context.py: context parallelism on simulated CPU devices.

Started with ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (tests/multiprocess.py); prints
one ``RESULT {json}`` line with, per case, the relative errors of the cp = 2, 4, 8 runs against the
one-device functions computed here in the same process.
"""

import dataclasses
import functools
import json
import sys
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from xlstm_eqx.cell import mlstm_chunkwise
from xlstm_eqx.cell.context import mlstm_chunkwise_context_parallel
from xlstm_eqx.llama.attention import SelfAttentionBlock, rope_sin_cos
from xlstm_eqx.nn.context import with_left_context
from xlstm_eqx.nn.conv import CausalConv1d
from xlstm_eqx.parallel import with_context_parallel
from xlstm_eqx.presets import tiny_llama, tiny_xlstm_slstm
from xlstm_eqx.xlstm import xLSTMLMModel

from .test_forms import make_inputs, rel_err


RESET = -25.0  # the mlstm layer's default reset_fgate_value (a document border)
Exchange = Literal["all_gather", "ppermute"]
SEQ4, SEQ3 = P(None, None, "cp", None), P(None, None, "cp")


def cp_mesh(cp: int) -> jax.sharding.Mesh:
    return jax.make_mesh((cp,), ("cp",), devices=jax.devices()[:cp], axis_types=(AxisType.Auto,))


def place(mesh: jax.sharding.Mesh, inputs) -> list[jax.Array]:
    """(q, k, v, ĩ, f̃) sharded over the sequence axis."""
    specs = (SEQ4, SEQ4, SEQ4, SEQ3, SEQ3)
    return [jax.device_put(x, NamedSharding(mesh, s)) for x, s in zip(inputs, specs, strict=True)]


def with_borders(f: np.ndarray, cp: int, s_local: int) -> np.ndarray:
    """Document borders (f̃ = RESET, and one exact reset f̃ = -inf) inside segments and exactly on
    segment boundaries (a segment's first token)."""
    f = f.copy()
    f[:, :, 2] = RESET  # inside rank 0's segment
    f[0, :, s_local] = RESET  # on the boundary between ranks 0 and 1
    f[1, 0, s_local * (cp - 1)] = -np.inf  # on the last boundary, one batch element and head
    f[:, 1, s_local * (cp - 1) + 1] = RESET  # inside the last segment
    return f


def loss_weights(seed: int, h_shape, dhqk: int, dhv: int):
    rng = np.random.default_rng(seed)
    b, nh = h_shape[:2]
    return (
        rng.standard_normal(h_shape).astype(np.float32),
        rng.standard_normal((b, nh, dhqk, dhv)).astype(np.float32),
        rng.standard_normal((b, nh, dhqk)).astype(np.float32),
    )


def _loss(h, final, weights):
    value = jnp.sum(jnp.where(weights[0] == 0, 0.0, h * weights[0])) + jnp.sum(final.c * weights[1])
    return value + jnp.sum(final.n * weights[2])


@functools.cache
def one_device(chunk: int):
    """jit of (weights, q, k, v, ĩ, f̃) -> ((loss, (h, final)), gradients)."""

    def loss(weights, *inputs):
        h, final = mlstm_chunkwise(*inputs, chunk_size=chunk)
        return _loss(h, final, weights), (h, final)

    return jax.jit(jax.value_and_grad(loss, argnums=(1, 2, 3, 4, 5), has_aux=True))


@functools.cache
def context_parallel(cp: int, chunk: int, exchange: Exchange = "all_gather"):
    """The loss of `one_device` with the cell split over cp devices; the final state kept per
    rank (stacked on a new leading axis: the same on every device) and averaged."""
    mesh = cp_mesh(cp)

    def local(*inputs):
        h, final = mlstm_chunkwise_context_parallel(
            *inputs, axis_name="cp", chunk_size=chunk, exchange=exchange
        )
        return h, jax.tree.map(lambda x: x[None], final)

    sharded = jax.shard_map(
        local, mesh=mesh, in_specs=(SEQ4, SEQ4, SEQ4, SEQ3, SEQ3), out_specs=(SEQ4, P("cp"))
    )

    def loss(weights, *inputs):
        h, finals = sharded(*inputs)
        # all_gather: the same final state on every rank; ppermute: on the last one only
        pick = (lambda x: jnp.mean(x, axis=0)) if exchange == "all_gather" else (lambda x: x[-1])
        final = jax.tree.map(pick, finals)
        return _loss(h, final, weights), (h, finals)

    fn = jax.jit(jax.value_and_grad(loss, argnums=(1, 2, 3, 4, 5), has_aux=True))
    return lambda weights, *inputs: fn(weights, *place(mesh, inputs))


def run_both(cp: int, chunk: int, inputs, weights, exchange: Exchange = "all_gather"):
    """(h, final, gradients) of one device and of cp devices (final: per rank), as NumPy."""
    (_, (h_ref, final_ref)), grads_ref = one_device(chunk)(weights, *inputs)
    (_, (h, finals)), grads = context_parallel(cp, chunk, exchange)(weights, *inputs)
    as_np = functools.partial(jax.tree.map, np.asarray)
    return as_np((h_ref, final_ref, grads_ref)), as_np((h, finals, grads))


def compare(cp: int, chunk: int, inputs, seed: int = 0, exchange: Exchange = "all_gather") -> dict:
    """Relative errors of h, the final (c, n), |Δm| and the five gradients; whether every rank
    returned the same final state."""
    b, nh, seq_len, dhqk = inputs[0].shape
    dhv = inputs[2].shape[-1]
    weights = loss_weights(seed, (b, nh, seq_len, dhv), dhqk, dhv)
    both = run_both(cp, chunk, inputs, weights, exchange)
    (h_ref, final_ref, grads_ref), (h, finals, grads) = both
    last = jax.tree.map(lambda x: x[-1], finals)
    leaves = jax.tree.leaves(finals)
    same = all(bool(np.array_equal(x, x[-1:].repeat(cp, 0), equal_nan=True)) for x in leaves)
    out = {
        "h": rel_err(h, h_ref),
        "c": rel_err(last.c, final_ref.c),
        "n": rel_err(last.n, final_ref.n),
        "m": float(np.max(np.abs(last.m - final_ref.m))),
        "same_final_on_every_rank": same,
        "finite": bool(np.all(np.isfinite(h)) and all(np.all(np.isfinite(g)) for g in grads)),
    }
    for name, g, g_ref in zip("qkvif", grads, grads_ref, strict=True):
        out[f"d{name}"] = rel_err(g, g_ref)
    return out


def cell_cases() -> dict:
    """Per cp and S_local (a multiple of the chunk and not; shorter than a chunk): errors with
    document borders inside segments and on boundaries."""
    results = {}
    chunk = 4
    for cp, s_local in [(2, 6), (4, 8), (8, 3)]:  # S_local: not a multiple of 4, one, < 4
        inputs = make_inputs(cp + s_local, 2, 2, cp * s_local, 8, 6, (-5.0, 5.0), (-2.0, 8.0))
        inputs = (*inputs[:4], with_borders(inputs[4], cp, s_local))
        results[f"cp{cp}_s{s_local}"] = compare(cp, chunk, inputs)
        if cp == 8 and s_local == 3:
            results["cp8_s3_ppermute"] = compare(cp, chunk, inputs, exchange="ppermute")
    return results


def extreme_cases() -> dict:
    """The gate ranges and infinities of tests/cell/test_edge_cases.py on cp = 4."""
    cp, s_local, chunk = 4, 8, 4  # the shapes of cell_cases' cp4_s8: compiled once
    results = {}
    for name, i_range, f_range in [
        ("wide", (-30.0, 50.0), (-50.0, 30.0)),
        ("extreme", (20.0, 50.0), (-50.0, -20.0)),
    ]:
        inputs = make_inputs(7, 2, 2, cp * s_local, 8, 6, i_range, f_range)
        results[name] = compare(cp, chunk, inputs)
    q, k, v, i, f = make_inputs(8, 2, 2, cp * s_local, 8, 6, (-5.0, 5.0), (-2.0, 8.0))
    i[0, 1, :] = -np.inf  # a head that never writes: an empty memory through every segment
    i[1, 0, s_local : 2 * s_local] = -np.inf  # a segment that writes nothing
    f[1, 1, 3 * s_local] = -np.inf  # a reset on a boundary
    f[0, 0, 5] = np.inf  # forgets nothing
    results["infinite_gates"] = compare(cp, chunk, (q, k, v, i, f))
    return results


def invalid_input_case() -> dict:
    """A NaN key in rank 1's segment: every output before it equals the one-device output and is
    finite, every output from it on is NaN, and the gradient of the outputs before it is finite
    and equal to the one-device gradient (nothing leaks backwards through the exchange)."""
    cp, s_local, chunk = 4, 8, 4
    q, k, v, i, f = make_inputs(9, 2, 2, cp * s_local, 8, 6, (-5.0, 5.0), (-2.0, 8.0))
    bad_at = s_local + 2
    k[1, 0, bad_at, 3] = np.nan
    weights = loss_weights(1, (2, 2, cp * s_local, 6), 8, 6)
    weights[0][:, :, bad_at:] = 0.0  # the loss: outputs before the invalid token only
    weights[1][...], weights[2][...] = 0.0, 0.0
    (h_ref, _, grads_ref), (h, _, grads) = run_both(cp, chunk, (q, k, v, i, f), weights)
    return {
        "earlier_equal": rel_err(h[:, :, :bad_at], h_ref[:, :, :bad_at]),
        "later_nan": bool(np.all(np.isnan(h[1, 0, bad_at:]))),
        "nan_only_there": bool(np.all(np.isnan(h) == np.isnan(h_ref))),
        "grads_finite": all(bool(np.all(np.isfinite(g))) for g in grads),
        "grads_equal": max(rel_err(g, g_r) for g, g_r in zip(grads, grads_ref, strict=True)),
    }


def conv_halo_case(conv: CausalConv1d, cp: int, s_local: int) -> dict:
    """Relative errors of the conv's outputs and gradients (input, kernel, bias) with the halo on
    cp devices against the conv on the whole sequence."""
    x = np.random.default_rng(cp).standard_normal((2, cp * s_local, 5)).astype(np.float32)
    w = np.random.default_rng(cp + 1).standard_normal(x.shape).astype(np.float32)
    split = P(None, "cp", None)

    def local(conv, x):
        return with_left_context(conv, x, conv.kernel_size - 1, "cp")

    sharded = jax.shard_map(local, mesh=cp_mesh(cp), in_specs=(P(), split), out_specs=split)

    def loss(fn, conv, x):
        y = fn(conv, x)
        return jnp.sum(y * w), y

    grad = functools.partial(jax.value_and_grad, argnums=(0, 1), has_aux=True)
    (_, y), grads = jax.jit(grad(functools.partial(loss, sharded)))(conv, x)
    (_, y_ref), grads_ref = jax.jit(grad(functools.partial(loss, lambda c, x: c(x))))(conv, x)
    leaves, leaves_ref = jax.tree.leaves(grads), jax.tree.leaves(grads_ref)
    return {
        "y": rel_err(y, y_ref),
        "grads": max(rel_err(g, r) for g, r in zip(leaves, leaves_ref, strict=True)),
    }


def conv_halo_cases() -> dict:
    """`nn.context.with_left_context` around a `CausalConv1d` (K = 4) on cp = 2, 4, 8 devices, with
    S_local = K - 1 (the least one hop allows) and more; S_local < K - 1 is a ValueError."""
    conv = CausalConv1d(5, 4, key=jax.random.key(0))
    results: dict[str, object] = {
        f"cp{cp}_s{s_local}": conv_halo_case(conv, cp, s_local)
        for cp, s_local in [(2, 5), (4, 3), (8, 4)]
    }
    try:
        x = jnp.zeros((1, 8, 5))
        jax.shard_map(
            functools.partial(with_left_context, conv, length=3, axis_name="cp"),
            mesh=cp_mesh(4),
            in_specs=P(None, "cp", None),
            out_specs=P(None, "cp", None),
        )(x)
        results["short_segment_error"] = ""
    except ValueError as error:
        results["short_segment_error"] = str(error)
    return results


def model_case() -> dict:
    """The hooks: a tiny model of ``mlstm`` layers (conv + cell, memory reset at borders) with
    `parallel.with_context_parallel` inside a shard_map on cp = 4 against one device: logits of
    ``__call__`` and, from a non-zero state, ``call_with_state``'s logits and the last device's
    state after the whole sequence (what a cp prefill keeps)."""
    cfg = tiny_xlstm_slstm()
    assert cfg.mlstm_block is not None
    layer = dataclasses.replace(cfg.mlstm_block.mlstm, conv1d_kernel_size=4)
    cell = dataclasses.replace(layer.mlstm_cell, reset_at_document_boundaries=True)
    block = dataclasses.replace(cfg.mlstm_block, mlstm=dataclasses.replace(layer, mlstm_cell=cell))
    cfg = dataclasses.replace(cfg, slstm_at=[], slstm_block=None, num_blocks=2, mlstm_block=block)
    model = xLSTMLMModel(cfg, key=jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 32), 0, cfg.vocab_size)
    borders = jnp.zeros((2, 32), bool).at[:, 8].set(True).at[0, 13].set(True)
    start = model.call_with_state(tokens[:, :5], model.init_state(2))[1]  # a non-zero state
    mesh, split = cp_mesh(4), P(None, "cp")
    on_cp = with_context_parallel(model, "cp")

    def local(tokens, borders, state):
        logits = on_cp(tokens, document_borders=borders)
        logits_s, state = on_cp.call_with_state(tokens, state, document_borders=borders)
        return logits, logits_s, jax.tree.map(lambda x: x[None], state)

    run = jax.shard_map(
        local, mesh=mesh, in_specs=(split, split, P()), out_specs=(split, split, P("cp"))
    )
    logits, logits_s, states = jax.jit(run)(tokens, borders, start)
    ref = model(tokens, document_borders=borders)
    ref_s, ref_state = model.call_with_state(tokens, start, document_borders=borders)
    last = jax.tree.map(lambda x: x[-1], states)
    leaves = zip(jax.tree.leaves(last), jax.tree.leaves(ref_state), strict=True)
    return {
        "logits": rel_err(logits, ref),
        "logits_with_state": rel_err(logits_s, ref_s),
        "state": max(rel_err(a, b) for a, b in leaves),
    }


def llama_attention_case() -> dict:
    """The Llama attention block with ``context_axis`` set (`llama.context`: K/V all-gathered,
    the causal mask offset by the segment) on cp = 4 against one device: outputs and input
    gradients, with document masks (each device numbering its own borders, as the model does)."""
    block = with_context_parallel(SelfAttentionBlock(tiny_llama(), key=jax.random.key(0)), "cp")
    one = with_context_parallel(block, None)
    cp, seq_len = 4, 16
    x = jax.random.normal(jax.random.key(1), (2, seq_len, block.num_heads * block.head_dim))
    positions = jnp.broadcast_to(jnp.arange(seq_len), (2, seq_len))
    sin, cos = rope_sin_cos(positions, block.head_dim, block.theta)
    borders = np.zeros((2, seq_len), bool)
    borders[0, [3, 8]] = True  # inside a segment, on a boundary
    borders[1, 12] = True
    ids = np.cumsum(borders, axis=1)
    local_ids = np.cumsum(borders.reshape(2, cp, -1), axis=2).reshape(2, seq_len)
    split, split3 = P(None, "cp"), P(None, "cp", None)

    def loss(fn, x, ids):
        y = fn(x, sin, cos, ids)
        return jnp.sum(y * jnp.cos(jnp.arange(y.size).reshape(y.shape))), y

    sharded = jax.shard_map(
        block, mesh=cp_mesh(cp), in_specs=(split3, split3, split3, split), out_specs=split3
    )
    grad = functools.partial(jax.value_and_grad, has_aux=True)
    (_, y), dx = jax.jit(grad(functools.partial(loss, sharded)))(x, jnp.asarray(local_ids))
    (_, y_ref), dx_ref = jax.jit(grad(functools.partial(loss, one)))(x, jnp.asarray(ids))
    return {"y": rel_err(y, y_ref), "dx": rel_err(dx, dx_ref)}


def main() -> None:
    jax.config.update("jax_numpy_dtype_promotion", "strict")
    result = {
        "devices": jax.device_count(),
        "cell": cell_cases(),
        "extreme": extreme_cases(),
        "invalid": invalid_input_case(),
        "conv": conv_halo_cases(),
        "model": model_case(),
        "llama": llama_attention_case(),
    }
    print("RESULT " + json.dumps(result))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
