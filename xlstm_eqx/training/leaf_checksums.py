"""Checksums of checkpoint arrays, recorded in the JSON item at save and compared after a restore.

A damaged shard that still decodes (a flipped bit, a chunk read back as fill value) is caught. Per leaf: two
wrapping uint32 sums over the elements of a mix (murmur3's finaliser) of each element's bits with
its flat index. Integer sums do not depend on the order of the reduction, so the value is the same
on any mesh and number of processes; any change to a single element changes both sums (the mix is a
bijection), and 64 bits make a chance match negligible.
"""

import hashlib
import json
import re
from typing import Any

import jax
import jax.numpy as jnp

from ..core.untrusted import printable
from .checkpoint import CheckpointError


__all__ = [
    "CHECKSUM",
    "META_DIGEST",
    "check_checksum_record",
    "check_meta_digest",
    "leaf_checksums",
    "leaf_facts",
    "verify_leaves",
    "with_meta_digest",
]

CHECKSUM = "fmix32x2"


def _fmix(h: Any) -> Any:
    h = h ^ (h >> jnp.uint32(16))
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> jnp.uint32(13))
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> jnp.uint32(16))


def _bits32(x: Any) -> Any:
    """The bits of each element as uint32 (a trailing axis of 2 for 64-bit dtypes)."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        return jnp.stack([_bits32(jnp.real(x)), _bits32(jnp.imag(x))], axis=-1)
    size = jnp.dtype(x.dtype).itemsize
    if size >= 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    narrow = jnp.uint8 if size == 1 else jnp.uint16
    return jax.lax.bitcast_convert_type(x, narrow).astype(jnp.uint32)


def _leaf_checksum(x: Any) -> Any:
    bits = _bits32(x)
    index = jnp.zeros(bits.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(bits.ndim)):
        iota = jax.lax.broadcasted_iota(jnp.uint32, bits.shape, axis)
        index = index + iota * jnp.uint32(stride % 2**32)
        stride *= bits.shape[axis]
    key = _fmix(index + jnp.uint32(0x9E3779B9))
    first = jnp.sum(_fmix(bits ^ key), dtype=jnp.uint32)
    second = jnp.sum(_fmix(bits + _fmix(key ^ jnp.uint32(0x7F4A7C15))), dtype=jnp.uint32)
    return jnp.stack([first, second])


@jax.jit
def _finite_andleaf_checksums(leaves: list[Any]) -> tuple[list[Any], list[Any]]:
    finite = [
        jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.bool_(True)
        for x in leaves
    ]
    return finite, [_leaf_checksum(x) for x in leaves]


def leaf_facts(leaves: list[Any]) -> list[tuple[bool, str]]:
    """``(all finite, checksum)`` of each leaf, computed on the devices that hold it (one call per
    set of devices); only two booleans' and integers' worth per leaf reach the host."""
    groups: dict[frozenset, list[int]] = {}
    for i, x in enumerate(leaves):
        groups.setdefault(frozenset(x.sharding.device_set), []).append(i)
    out: list[tuple[bool, str]] = [(True, "")] * len(leaves)
    for idx in (batch for group in groups.values() for batch in _batches(leaves, group)):
        finite, sums = jax.device_get(_finite_andleaf_checksums([leaves[i] for i in idx]))
        for i, ok, (a, b) in zip(idx, finite, sums, strict=True):
            out[i] = (bool(ok), f"{int(a):08x}{int(b):08x}")
    return out


# Bytes of leaves checked by one compiled call: the call's temporaries (the mixed bits of every
# element) grow with them, so a whole model at once peaked at ~2.5x its size beside it.
_BATCH_BYTES = 64 * 2**20


def _batches(leaves: list[Any], indices: list[int]) -> list[list[int]]:
    """``indices`` in runs of at most `_BATCH_BYTES` of leaves (a bigger leaf alone): small
    models take one call, a large one's temporaries stay near one batch's size."""
    out: list[list[int]] = [[]]
    size = 0
    for i in indices:
        nbytes = int(leaves[i].size) * leaves[i].dtype.itemsize
        if out[-1] and size + nbytes > _BATCH_BYTES:
            out.append([])
            size = 0
        out[-1].append(i)
        size += nbytes
    return [b for b in out if b]


def leaf_checksums(leaves: list[Any]) -> list[str]:
    return [c for _, c in leaf_facts(leaves)]


def verify_leaves(
    path: str, name: str, paths: list[str], leaves: list[Any], expected: dict[str, str] | None
) -> None:
    """Name the first restored leaf (in tree order) whose checksum differs from the one recorded
    at save (``expected``; None for checkpoints that predate checksums), else the first holding
    a NaN or inf (a diverged checkpoint would otherwise only show up as ``loss nan`` later)."""
    facts = leaf_facts(leaves)
    if expected is not None:
        for p, x, (_, got) in zip(paths, leaves, facts, strict=True):
            if expected[p] != got:
                raise CheckpointError(
                    f"checkpoint {path!r} is damaged: {name}{p} {x.dtype}{list(x.shape)} does "
                    "not match the checksum recorded when it was saved"
                )
    for p, x, (finite, _) in zip(paths, leaves, facts, strict=True):
        if not finite:
            raise CheckpointError(
                f"checkpoint {path!r}: {name}{p} {x.dtype}{list(x.shape)} holds non-finite "
                "values (NaN or inf)"
            )


def check_checksum_record(meta: dict[str, Any], where: str) -> None:
    sums = meta.get("checksums")
    if sums is None:
        return
    if meta.get("checksum") != CHECKSUM or not isinstance(sums, dict):
        raise CheckpointError(f"{where}: 'checksums' are not {CHECKSUM} checksums per tree")
    for name, values in sums.items():
        leaves = meta["trees"].get(name)
        if (
            leaves is None
            or not isinstance(values, list)
            or len(values) != len(leaves)
            or not all(isinstance(v, str) and re.fullmatch(r"[0-9a-f]{16}", v) for v in values)
        ):
            raise CheckpointError(
                f"{where}: checksums.{printable(str(name))[:40]} must list one 16-hex-digit "
                "checksum per leaf of that tree"
            )


# The JSON item's own checksum: an edited value (a step, a data position) is damage, not data.

META_DIGEST = "meta_sha256"


def _meta_digest(meta: dict[str, Any]) -> str:
    body = {k: v for k, v in meta.items() if k != META_DIGEST}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def with_meta_digest(meta: dict[str, Any]) -> dict[str, Any]:
    """``meta`` as the JSON it is read back as, plus the SHA-256 of its canonical form."""
    plain = json.loads(json.dumps(meta, allow_nan=False))
    return {**plain, META_DIGEST: _meta_digest(plain)}


def check_meta_digest(meta: dict[str, Any], path: str, item: str) -> None:
    """A JSON item whose content no longer has the digest recorded in it is damaged (items
    written before digests were recorded have none and are not checked)."""
    if META_DIGEST in meta and meta[META_DIGEST] != _meta_digest(meta):
        raise CheckpointError(
            f"checkpoint {path!r} is damaged: {item} does not match the checksum recorded in it "
            f"({META_DIGEST})"
        )
