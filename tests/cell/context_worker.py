"""Worker for tests/cell/test_context.py: context parallelism on simulated CPU devices.

Started with ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (tests/multiprocess.py); prints
one ``RESULT {json}`` line with, per case, the relative errors of the cp = 2, 4, 8 runs against the
one-device functions computed here in the same process.
"""

import functools
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from xlstm_eqx.cell import mlstm_chunkwise
from xlstm_eqx.cell.context import mlstm_chunkwise_context_parallel
from xlstm_eqx.nn.context import with_left_context
from xlstm_eqx.nn.conv import CausalConv1d

from .test_forms import make_inputs, rel_err


RESET = -25.0  # the mlstm layer's default reset_fgate_value (a document border)
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
def context_parallel(cp: int, chunk: int):
    """The loss of `one_device` with the cell split over cp devices; the final state kept per
    rank (stacked on a new leading axis: the same on every device) and averaged."""
    mesh = cp_mesh(cp)

    def local(*inputs):
        h, final = mlstm_chunkwise_context_parallel(*inputs, axis_name="cp", chunk_size=chunk)
        return h, jax.tree.map(lambda x: x[None], final)

    sharded = jax.shard_map(
        local, mesh=mesh, in_specs=(SEQ4, SEQ4, SEQ4, SEQ3, SEQ3), out_specs=(SEQ4, P("cp"))
    )

    def loss(weights, *inputs):
        h, finals = sharded(*inputs)
        final = jax.tree.map(lambda x: jnp.mean(x, axis=0), finals)
        return _loss(h, final, weights), (h, finals)

    fn = jax.jit(jax.value_and_grad(loss, argnums=(1, 2, 3, 4, 5), has_aux=True))
    return lambda weights, *inputs: fn(weights, *place(mesh, inputs))


def run_both(cp: int, chunk: int, inputs, weights):
    """(h, final, gradients) of one device and of cp devices (final: per rank), as NumPy."""
    (_, (h_ref, final_ref)), grads_ref = one_device(chunk)(weights, *inputs)
    (_, (h, finals)), grads = context_parallel(cp, chunk)(weights, *inputs)
    as_np = functools.partial(jax.tree.map, np.asarray)
    return as_np((h_ref, final_ref, grads_ref)), as_np((h, finals, grads))


def compare(cp: int, chunk: int, inputs, seed: int = 0) -> dict:
    """Relative errors of h, the final (c, n), |Δm| and the five gradients; whether every rank
    returned the same final state."""
    b, nh, seq_len, dhqk = inputs[0].shape
    dhv = inputs[2].shape[-1]
    weights = loss_weights(seed, (b, nh, seq_len, dhv), dhqk, dhv)
    (h_ref, final_ref, grads_ref), (h, finals, grads) = run_both(cp, chunk, inputs, weights)
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
    for cp, s_local in [(2, 8), (2, 6), (4, 8), (4, 6), (8, 4), (8, 3)]:
        inputs = make_inputs(cp + s_local, 2, 2, cp * s_local, 8, 6, (-5.0, 5.0), (-2.0, 8.0))
        inputs = (*inputs[:4], with_borders(inputs[4], cp, s_local))
        results[f"cp{cp}_s{s_local}"] = compare(cp, chunk, inputs)
    return results


def extreme_cases() -> dict:
    """The gate ranges and infinities of tests/cell/test_edge_cases.py on cp = 4."""
    cp, s_local, chunk = 4, 6, 4
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
    cp, s_local, chunk = 4, 6, 4
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


def main() -> None:
    jax.config.update("jax_numpy_dtype_promotion", "strict")
    result = {
        "devices": jax.device_count(),
        "cell": cell_cases(),
        "extreme": extreme_cases(),
        "invalid": invalid_input_case(),
        "conv": conv_halo_cases(),
    }
    print("RESULT " + json.dumps(result))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
