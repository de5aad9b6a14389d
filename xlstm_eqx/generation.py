"""Autoregressive generation for the xLSTM models and the Llama baseline.

prompt ``(B, P)`` → prefill → ``N`` new tokens, each from one decode step, inside one
``lax.scan``. Both steps are the model's one stateful call (docs/architecture.md, "Generation"):
``state = model.init_state(B)`` (``init_state(B, max_len)`` for a KV cache), then
``logits, state = model.call_with_state(tokens, state)`` for the prompt and for each new token
(``tokens`` of shape ``(B, 1)``):

- xLSTM (``xLSTMLMModel``): the prompt runs through the stateful form of the backend, which
  returns every block's state (mLSTM ``C``/``n``/``m``, sLSTM ``y``/``c``/``n``/``m``, the
  causal-conv windows); each new token is one recurrent step, whose cost does not depend on how
  long the context is.
- Llama (``LlamaTransformer``, ``has_kv_cache``): the prompt fills a KV cache of ``P + N``
  positions; each new token attends to the cache, so its cost grows with the context.

Token choice (``sample_logits``): **greedy (argmax) when ``temperature == 0`` or ``key is
None``**; otherwise logits / temperature, then optionally the ``top_k`` largest, then optionally
the smallest set of those whose probability mass reaches ``top_p`` (nucleus), then a categorical
draw. Everything on the sampling path is float32.

``generate`` compiles once per (model structure, B, P, N, top_k, greedy-or-not); temperature and
top_p are traced, so changing them does not recompile. ``stream_generate`` yields tokens as they
are produced, with one compiled prefill and one compiled step reused for every token;
``stream_text`` wraps it for text in, text pieces out (what ``xlstm-eqx generate`` prints).
"""

from collections.abc import Iterator
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jax.core import Tracer
from jaxtyping import Array, Float, Int, Key, PRNGKeyArray, PyTree

from .xlstm.blocks import xLSTMBlockStack
from .xlstm.mlstm_layer_v1 import fused_decode_layer, mLSTMLayerV1


# token choice


def sample_logits(
    logits: Float[Array, "B V"],
    key: PRNGKeyArray | None = None,
    *,
    temperature: float | int | Float[Array, ""] = 1.0,
    top_k: int | None = None,
    top_p: float | Float[Array, ""] | None = None,
) -> Int[Array, " B"]:
    """Next token per row from logits ``(B, V)`` → int32 ``(B,)``.

    Greedy (argmax, first index on ties) when ``key`` is None or ``temperature`` is exactly 0 (a
    Python number; a traced temperature is never treated as greedy). Otherwise a categorical draw
    from ``softmax(logits / temperature)`` restricted to the ``top_k`` largest logits (if given)
    and then to the smallest prefix of those, by decreasing probability, whose mass reaches
    ``top_p`` (if given; the most likely token is always kept). All in float32.
    """
    logits = logits.astype(jnp.float32)
    if key is None or (isinstance(temperature, int | float) and temperature == 0):
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / jnp.asarray(temperature, jnp.float32)
    if top_k is None and top_p is None:
        return jr.categorical(key, logits, axis=-1).astype(jnp.int32)
    k = logits.shape[-1] if top_k is None else min(int(top_k), logits.shape[-1])
    vals, idx = jax.lax.top_k(logits, k)  # sorted, largest first
    if top_p is not None:
        probs = jax.nn.softmax(vals, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        vals = jnp.where(mass_before < jnp.asarray(top_p, jnp.float32), vals, -jnp.inf)
    choice = jr.categorical(key, vals, axis=-1)
    return jnp.take_along_axis(idx, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


# the decode path: every model is driven through init_state and call_with_state


def has_decode_api(model: Any) -> bool:
    """Whether ``model`` can be decoded: it has ``init_state`` and ``call_with_state`` (the
    xLSTM models and the Llama baseline; docs/architecture.md, "Generation")."""
    return all(callable(getattr(model, name, None)) for name in ("init_state", "call_with_state"))


def has_kv_cache(model: Any) -> bool:
    """Whether the model's decode state is a KV cache, sized at ``init_state`` by ``max_len``."""
    return bool(getattr(model, "has_kv_cache", False))


def decode_step(
    model: Any, state: PyTree, token: Int[Array, " B"]
) -> tuple[Float[Array, "B V"], PyTree]:
    """One token per sequence through ``call_with_state``: next-token logits and the new state."""
    logits, state = model.call_with_state(token[:, None], state)
    return logits[:, 0], state


def prefill(
    model: Any, prompt: Int[Array, "B P"], cache_size: int
) -> tuple[Float[Array, "B V"], PyTree]:
    """Logits after the last prompt token and the decode state after it (a KV cache holds
    ``cache_size`` positions). The prompt but its last token goes through ``call_with_state`` in
    one call whose logits are unused, so the LM head runs on one position only; the last token is
    one ``decode_step``."""
    B, P = prompt.shape
    state = model.init_state(B, cache_size) if has_kv_cache(model) else model.init_state(B)
    if P > 1:
        _, state = model.call_with_state(prompt[:, :-1], state)
    return decode_step(model, state, prompt[:, -1])


UNSTACK_MAX_BYTES = 256 * 2**20
"""The largest scanned block stack (parameter bytes) that `decode_view` copies into a tuple of
blocks: below it the copy is cheap next to the per-token copies it saves; above it the copy
would be a second set of a large model's parameters in memory."""


def parameter_bytes(tree: PyTree) -> int:
    """Bytes of the array leaves of ``tree`` (shapes only: works on tracers too)."""
    leaves = jax.tree.leaves(eqx.filter(tree, eqx.is_array))
    return sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in leaves)


def decode_view(model: Any, state: PyTree) -> tuple[Any, PyTree]:
    """``(model, state)`` laid out for the token loop, prepared once per `generate` /
    `stream_generate` call (never stored): the same function, less work per token.

    - A scanned xLSTM block stack becomes a tuple of blocks and its stacked state a tuple of
      per-block states (`xLSTMBlockStack.unstacked`): a scanned step copies each block's
      parameters and its (B, NH, DHQK, DHV) memory out of the stacked arrays and writes a fresh
      stacked state, every token. Costs one copy of the stack's parameters per call, so only a
      stack whose parameters take at most `UNSTACK_MAX_BYTES` is unstacked: a large model keeps
      the scanned step rather than holding its parameters twice while it generates.
    - Each ``mlstm_v1`` layer gets its q, k, v and o kernels side by side (`fused_decode_layer`):
      one matrix product per token at B = 1 instead of four, bit for bit the same.

    Logits and states are those of ``model`` itself, bit for bit (tests/test_generation.py).
    """
    stack = getattr(model, "xlstm_block_stack", None)
    if isinstance(stack, xLSTMBlockStack) and parameter_bytes(stack) <= UNSTACK_MAX_BYTES:
        state = stack.unstack_state(state)
        model = eqx.tree_at(lambda m: m.xlstm_block_stack, model, stack.unstacked())

    def prepare(node: Any) -> Any:
        return fused_decode_layer(node) if isinstance(node, mLSTMLayerV1) else node

    model = jax.tree.map(prepare, model, is_leaf=lambda node: isinstance(node, mLSTMLayerV1))
    return model, state


def decode(
    model: Any,
    state: PyTree,
    logits: Float[Array, "B V"],
    keys: Key[Array, " N"] | None,
    num_tokens: int,
    temperature: Float[Array, ""],
    top_k: int | None,
    top_p: Float[Array, ""] | None,
) -> Int[Array, "B N"]:
    """``num_tokens`` tokens: the first from ``logits``, each later one from a ``decode_step`` on
    the previous token (one ``lax.scan``); ``keys`` is ``(num_tokens,)`` keys, or None for
    greedy."""

    def choose(step_logits: Array, key: PRNGKeyArray | None) -> Array:
        return sample_logits(step_logits, key, temperature=temperature, top_k=top_k, top_p=top_p)

    first = choose(logits, None if keys is None else keys[0])
    model, state = decode_view(model, state)  # once, outside the loop

    def body(
        carry: tuple[PyTree, Array], key: PRNGKeyArray | None
    ) -> tuple[tuple[PyTree, Array], Array]:
        step_state, token = carry
        step_logits, step_state = decode_step(model, step_state, token)
        next_token = choose(step_logits, key)
        return (step_state, next_token), next_token

    if num_tokens == 1:
        return first[:, None]
    xs = None if keys is None else keys[1:]
    _, rest = jax.lax.scan(body, (state, first), xs, length=num_tokens - 1)
    return jnp.concatenate([first[:, None], rest.T], axis=1)


@eqx.filter_jit
def _generate_jit(
    model: Any,
    prompt: Int[Array, "B P"],
    keys: Key[Array, " N"] | None,
    num_tokens: int,
    cache_size: int,
    temperature: Float[Array, ""],
    top_k: int | None,
    top_p: Float[Array, ""] | None,
) -> Int[Array, "B N"]:
    logits, state = prefill(model, prompt, cache_size)
    return decode(model, state, logits, keys, num_tokens, temperature, top_k, top_p)


# input checks


def _check(
    model: Any,
    prompt: Array,
    max_new_tokens: int,
    temperature: float | int,
    top_k: int | None,
    top_p: float | None,
    max_len: int | None,
) -> int:
    """Validate everything before any compilation; return the KV-cache size to use."""
    if not has_decode_api(model):
        raise TypeError(
            f"generate: {type(model).__name__} has no decode API (needs init_state and "
            "call_with_state, like xLSTMLMModel and LlamaTransformer)"
        )
    if prompt.ndim != 2:
        raise ValueError(f"prompt_tokens must have shape (B, P), got {prompt.shape}")
    B, P = prompt.shape
    if B < 1 or P < 1:
        raise ValueError(
            f"prompt_tokens needs B >= 1 and P >= 1 (at least one token), got {(B, P)}"
        )
    if not jnp.issubdtype(prompt.dtype, jnp.integer):
        raise ValueError(f"prompt_tokens must be integer token ids, got dtype {prompt.dtype}")
    _check_count(max_new_tokens)
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature}")
    vocab = int(model.vocab_size)
    if top_k is not None and not 1 <= top_k <= vocab:
        raise ValueError(f"top_k must be in [1, vocab_size={vocab}], got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if not isinstance(prompt, Tracer):
        lo, hi = int(jnp.min(prompt)), int(jnp.max(prompt))
        if lo < 0 or hi >= vocab:
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"prompt_tokens: token id {bad} is outside the vocabulary [0, vocab_size={vocab})"
            )
    return _cache_size(model, P, max_new_tokens, max_len)


def _check_count(max_new_tokens: int) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int | np.integer):
        raise ValueError(f"max_new_tokens must be an int, got {max_new_tokens!r}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if max_new_tokens > MAX_NEW_TOKENS:
        raise ValueError(
            f"max_new_tokens must be <= {MAX_NEW_TOKENS:,}, got {max_new_tokens:,} "
            "(generate in several calls for more)"
        )


def _cache_size(model: Any, prompt_len: int, max_new_tokens: int, max_len: int | None) -> int:
    """The KV-cache size: ``max_len`` (a KV-cache model only, holding prompt and new tokens),
    else prompt plus new tokens."""
    needed = prompt_len + max_new_tokens
    if max_len is None:
        return needed
    if not has_kv_cache(model):
        raise ValueError(
            f"max_len (the KV-cache size) applies to KV-cache models only, not {type(model).__name__}"
        )
    if max_len < needed:
        raise ValueError(
            f"prompt length {prompt_len} + max_new_tokens {max_new_tokens} = {needed} tokens do "
            f"not fit in a KV cache of max_len={max_len}"
        )
    return int(max_len)


def _sampling_keys(key: PRNGKeyArray | None, n: int, greedy: bool) -> Key[Array, " N"] | None:
    # Token i's key is fold_in(key, i): `stream_generate` derives each one when it is needed
    # (constant memory however many tokens), `generate` all at once; both draw the same tokens.
    if greedy or key is None:
        return None
    return jax.vmap(lambda i: jr.fold_in(key, i))(jnp.arange(n, dtype=jnp.uint32))


# public API

# The most tokens one call generates: a bound far past any context, below what the outputs
# (and a KV cache of prompt + new tokens) could hold.
MAX_NEW_TOKENS = 10_000_000


def generate(
    model: Any,
    prompt_tokens: Int[Array, "B P"],
    max_new_tokens: int,
    *,
    temperature: float | int = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    key: PRNGKeyArray | None = None,
    max_len: int | None = None,
) -> Int[Array, "B T"]:
    """The prompt followed by ``max_new_tokens`` generated tokens: int32 ``(B, P + N)``.

    ``model`` is an ``xLSTMLMModel`` (prefill with the stateful form of its backend, then one
    O(1)-in-context recurrent step per token) or a ``LlamaTransformer`` (KV cache of ``max_len``
    positions, default ``P + N``). Greedy when ``temperature == 0`` or ``key is None``; else
    sampled with ``top_k`` / ``top_p`` filtering (see ``sample_logits``), reproducible for a
    fixed ``key``. Raises ``ValueError`` for token ids outside ``[0, vocab_size)``, bad sampling
    parameters, or a prompt + new tokens that do not fit in ``max_len``.
    """
    cache_size = _check(model, prompt_tokens, max_new_tokens, temperature, top_k, top_p, max_len)
    prompt = prompt_tokens.astype(jnp.int32)
    if max_new_tokens == 0:
        return prompt
    greedy = key is None or temperature == 0
    new = _generate_jit(
        model,
        prompt,
        _sampling_keys(key, max_new_tokens, greedy),
        int(max_new_tokens),
        cache_size,
        jnp.asarray(1.0 if greedy else temperature, jnp.float32),
        top_k,
        None if top_p is None else jnp.asarray(top_p, jnp.float32),
    )
    return jnp.concatenate([prompt, new], axis=1)


@eqx.filter_jit
def _stream_prefill(
    model: Any,
    prompt: Int[Array, "B P"],
    key: PRNGKeyArray | None,
    cache_size: int,
    temperature: Float[Array, ""],
    top_k: int | None,
    top_p: Float[Array, ""] | None,
) -> tuple[Int[Array, " B"], PyTree]:
    logits, state = prefill(model, prompt, cache_size)
    tok = sample_logits(logits, key, temperature=temperature, top_k=top_k, top_p=top_p)
    return tok, state


@eqx.filter_jit
def _decode_view_jit(model: Any, state: PyTree) -> tuple[Any, PyTree]:
    return decode_view(model, state)


@eqx.filter_jit(donate="all-except-first")
def _stream_step(
    fixed: tuple[Any, PRNGKeyArray | None, Float[Array, ""], int | None, Float[Array, ""] | None],
    state: PyTree,
    token: Int[Array, " B"],
) -> tuple[Int[Array, " B"], PyTree]:
    """One token; ``fixed = (model, key, temperature, top_k, top_p)`` is not donated, the state
    and the previous token are (the KV cache is updated in place)."""
    model, key, temperature, top_k, top_p = fixed
    logits, state = decode_step(model, state, token)
    tok = sample_logits(logits, key, temperature=temperature, top_k=top_k, top_p=top_p)
    return tok, state


def stream_generate(
    model: Any,
    prompt_tokens: Int[Array, "B P"],
    max_new_tokens: int,
    *,
    temperature: float | int = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    key: PRNGKeyArray | None = None,
    max_len: int | None = None,
) -> Iterator[np.ndarray]:
    """Like ``generate``, but yields each new token as soon as it exists: ``max_new_tokens``
    NumPy int32 arrays of shape ``(B,)`` (host copies, so a consumer can print them at once).

    Same arguments, checks and token choice as ``generate``: with the same ``key`` it yields
    exactly ``generate(...)[:, P:]``. The checks run when this is called, not at the first
    ``next``. One compiled prefill and one compiled step (state buffers donated) serve every
    token, so a long stream does not recompile.
    """
    cache_size = _check(model, prompt_tokens, max_new_tokens, temperature, top_k, top_p, max_len)
    greedy = key is None or temperature == 0
    sample_key = None if greedy else key
    temp = jnp.asarray(1.0 if greedy else temperature, jnp.float32)
    p = None if top_p is None else jnp.asarray(top_p, jnp.float32)
    prompt = prompt_tokens.astype(jnp.int32)

    def tokens() -> Iterator[np.ndarray]:
        if max_new_tokens == 0:
            return
        k0 = None if sample_key is None else jr.fold_in(sample_key, 0)
        tok, state = _stream_prefill(model, prompt, k0, cache_size, temp, top_k, p)
        yield np.asarray(tok)
        step_model, state = _decode_view_jit(model, state)  # once per stream, not per token
        for i in range(1, max_new_tokens):
            ki = None if sample_key is None else jr.fold_in(sample_key, i)
            tok, state = _stream_step((step_model, ki, temp, top_k, p), state, tok)
            yield np.asarray(tok)

    return tokens()


def text_pieces(tokens: Iterator[np.ndarray], tokenizer: Any, num_tokens: int) -> Iterator[str]:
    """Decoded text of a token stream (batch 1), piece by piece: each piece is what the text of
    all tokens so far adds to what was already yielded. While the text ends in U+FFFD (an
    incomplete multi-byte character) it is held back, unless the stream has ended."""
    ids: list[int] = []
    emitted = 0
    for i, tok in enumerate(tokens):
        ids.append(int(np.asarray(tok).reshape(-1)[0]))
        text = tokenizer.decode(np.asarray(ids, np.int32))
        if text.endswith("\ufffd") and i < num_tokens - 1:
            continue
        if len(text) > emitted:
            yield text[emitted:]
            emitted = len(text)


def stream_text(
    model: Any,
    tokenizer: Any,
    prompt: str,
    max_new_tokens: int,
    *,
    temperature: float | int = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    key: PRNGKeyArray | None = None,
    max_len: int | None = None,
) -> Iterator[str]:
    """One continuation of the text ``prompt``, as text pieces while it is generated (for
    ``xlstm-eqx generate``). ``tokenizer`` has ``encode(str) -> ids`` and ``decode(ids) -> str``
    (the package's byte or ``tokenizer.json`` tokenizers). Joined, the pieces are
    ``tokenizer.decode`` of the new tokens; a multi-byte character is never split across pieces.
    Other arguments and checks as ``stream_generate``.
    """
    ids = np.asarray(tokenizer.encode(prompt), np.int32).reshape(-1)
    if ids.size == 0:
        raise ValueError(f"stream_text: the prompt {prompt!r} encodes to no tokens")
    tokens = stream_generate(
        model,
        jnp.asarray(ids)[None, :],
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        key=key,
        max_len=max_len,
    )
    return text_pieces(tokens, tokenizer, max_new_tokens)
