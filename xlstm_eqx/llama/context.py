"""Attention with the sequence split over a mesh axis (docs/architecture.md, "Context parallelism"):
all-gathered keys and values. Inside a `jax.shard_map` with the axis manual, device r holds the
queries, keys and values of tokens [r·S_local, (r+1)·S_local); `lax.all_gather` over the axis
gives every device all keys and values (the transpose, a reduce-scatter, returns their
gradients), and the causal mask is offset by the segment's position. Memory per device: the
(S_local, S) logits of its queries and the gathered K/V, against (S, S) on one device.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int


def global_segment_ids(
    segment_ids: Int[Array, "B S_local"], axis_name: str
) -> tuple[Int[Array, "B S_local"], Int[Array, "B S"]]:
    """(this segment's ids, all ids) numbered over the whole sequence, from per-segment document
    indices (each device's cumulative count of its own borders, as the model computes them):
    each segment's ids are offset by the borders counted in the segments before it."""
    gathered = jax.lax.all_gather(segment_ids, axis_name, axis=1)  # (B, cp, S_local)
    last = gathered[..., -1]  # borders counted in each segment
    offsets = jnp.cumsum(last, axis=1) - last
    numbered = gathered + offsets[..., None]
    rank = jax.lax.axis_index(axis_name)
    mine = jax.lax.dynamic_index_in_dim(numbered, rank, axis=1, keepdims=False)
    return mine, numbered.reshape(numbered.shape[0], -1)


def context_parallel_attention(
    q: Float[Array, "B S_local NH hd"],
    k: Float[Array, "B S_local NH hd"],
    v: Float[Array, "B S_local NH hd"],
    *,
    axis_name: str,
    causal: bool,
    segment_ids: Int[Array, "B S_local"] | None = None,
) -> Float[Array, "B S_local NH hd"]:
    """softmax(q kᵀ) v (q pre-scaled) of this device's queries against the keys and values of the
    whole sequence (all-gathered over `axis_name`); causal with this segment's offset; with
    `segment_ids` (per-segment document indices, `global_segment_ids`) within a document only.
    Logits and softmax in float32 (float64 for float64 inputs); a masked logit gets a large
    negative value, as in the one-device core."""
    keys, values = (jax.lax.all_gather(x, axis_name, axis=1, tiled=True) for x in (k, v))
    seg_len, seq_len = q.shape[1], keys.shape[1]
    acc = jnp.float64 if q.dtype == jnp.float64 else jnp.float32
    logits = jnp.einsum("bthd,bshd->bhts", q, keys, preferred_element_type=acc)
    mask: Bool[Array, "..."] = jnp.ones((1, 1, seg_len, seq_len), bool)
    if causal:
        first = jax.lax.axis_index(axis_name) * seg_len
        query_pos = first + jnp.arange(seg_len)
        mask = mask & (jnp.arange(seq_len)[None, :] <= query_pos[:, None])
    if segment_ids is not None:
        mine, everyone = global_segment_ids(segment_ids, axis_name)
        mask = mask & (mine[:, None, :, None] == everyone[:, None, None, :])
    logits = jnp.where(mask, logits, jnp.asarray(-0.7 * float(jnp.finfo(acc).max), acc))
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("bhts,bshd->bthd", probs.astype(values.dtype), values)
