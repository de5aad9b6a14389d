"""The safety of `forms.mlstm_recurrent_step` folded into the step: no `lax.cond`, no replacement.

The sequence forms choose a fast or careful path with a `lax.cond` on one finiteness predicate
(`forms.run_fast_or_careful`). For one token that costs more than it saves: on XLA:CPU the
conditional splits the step into separately run computations (small_xlstm decode at B=1: +30%
per token). Here the step runs on the inputs as they are, and NaN is added where an invalid value
reaches (`nonfinite.poison`), from flags read off the inputs and the state. That is exact: the step
is computed per (batch, head), so an invalid value only reaches outputs of its own (batch, head),
which the careful rules make NaN anyway (a bad q only h; a bad k, v, gate or state h and the new
state); an output it does not reach never sees it. The gates' -inf limits pass unchanged on both.
Under differentiation the careful path runs (`jax.custom_jvp`): the replacement keeps 0·inf out
of the gradients of the valid entries.
"""

import functools
from collections.abc import Callable
from typing import Any

import jax
from jaxtyping import Array

from .nonfinite import (
    bad_query_and_write,
    bad_state,
    poison,
    poison_state,
    sanitize,
    sanitize_state,
)


_Step = Callable[..., tuple[Array, Any]]
_Token = tuple[Array, Array, Array, Array, Array]


def step_with_nan_added(
    step: _Step, inputs: _Token, state: Any, *, eps: float, fast_path: bool = True
) -> tuple[Array, Any]:
    """`step(state, q, k, v, ĩ, f̄, eps)` -> (h (B, NH, DHV), new `mLSTMState`) with the edge-case
    rules applied: on the raw inputs (`fast_path`) or on the replaced ones (the careful path,
    forced by `fast_path=False` and always taken under differentiation). Same outputs and states
    on both, bit for bit."""
    careful = functools.partial(_careful, step, eps=eps)
    if not fast_path:
        return careful(inputs, state)

    @jax.custom_jvp
    def folded(inputs: _Token, state: Any) -> tuple[Array, Any]:
        return _nan_added(step(state, *inputs, eps), inputs, bad_state(state))

    @folded.defjvp
    def _differentiated(primals, tangents):
        return jax.jvp(careful, primals, tangents)

    return folded(inputs, state)


def _careful(step: _Step, inputs: _Token, state: Any, *, eps: float) -> tuple[Array, Any]:
    clean_state, state_is_bad = sanitize_state(state)
    return _nan_added(step(clean_state, *sanitize(*inputs), eps), inputs, state_is_bad)


def _nan_added(out: tuple[Array, Any], inputs: _Token, state_is_bad: Array) -> tuple[Array, Any]:
    """(h, new state) + NaN where an invalid input or state (flags (B, NH)) reaches."""
    h, new = out
    bad_query, bad_write = bad_query_and_write(*inputs)
    bad_write = bad_write | state_is_bad
    return poison(h, bad_write | bad_query), poison_state(new, bad_write)
