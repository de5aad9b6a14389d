"""Side-by-side timings against the peers, inside `xlstm-eqx bench`: the train step against
xlstm-jax's own trainer, greedy generation against transformers' `xLSTMForCausalLM` (the cell
against mlstm-kernels lives in `benchmarks/cell.py`).

The peers' code is imported lazily, from the runners in ``benchmarks/peers/`` (loaded by path,
like the other benchmark scripts): this module imports neither flax, torch nor xlstm-jax, so it
type-checks and its tests run without the peers. A peer that cannot be imported is reported in
one line and its rows are left out; our own rows are printed either way.

Every comparison alternates the two sides in one process (`alternate`): warm-up calls of both,
then rounds of ``ours, peer``, each side's round the median of several timed calls; the figure
per side is the median of its rounds and the ratio is ``peer / ours`` (> 1: we are faster).
"""

import dataclasses
import importlib.util
import os
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

from ..core.timing import median_seconds
from ..generation import decode, prefill
from ..llama.config import LlamaConfig
from ..models import train_flops_per_token
from ..training.config import TrainConfig
from ..training.optim import trainable_params
from ..xlstm.config import xLSTMLMModelConfig
from ..xlstm.model import xLSTMLMModel
from .train_setup import preset_model_config, train_step_setup


Timer = Callable[[Callable[[], Any], int], float]


# alternation


@dataclasses.dataclass(frozen=True)
class Alternation:
    """Per-round median seconds of our side and the peer's, in the order they ran."""

    ours_rounds: tuple[float, ...]
    peer_rounds: tuple[float, ...]

    @property
    def ours_s(self) -> float:
        return statistics.median(self.ours_rounds)

    @property
    def peer_s(self) -> float:
        return statistics.median(self.peer_rounds)

    @property
    def ratio(self) -> float:
        """Peer time over our time: above 1 when we are faster."""
        return self.peer_s / self.ours_s


def _seconds_per_call(fn: Callable[[], Any], calls: int) -> float:
    return median_seconds(fn, calls)


def alternate(
    ours: Callable[[], Any],
    peer: Callable[[], Any],
    *,
    rounds: int = 3,
    calls: int = 3,
    warmup: int = 1,
    timer: Timer = _seconds_per_call,
) -> Alternation:
    """Time `ours` and `peer` in alternation: `warmup` untimed calls of each (ours first), then
    `rounds` rounds of ``timer(ours, calls)`` followed by ``timer(peer, calls)`` (by default the
    median wall time of `calls` calls, each blocked until its result is ready)."""
    if rounds < 1 or calls < 1 or warmup < 0:
        raise ValueError(f"alternate: rounds {rounds}, calls {calls} >= 1, warmup {warmup} >= 0")
    for _ in range(warmup):
        jax.block_until_ready(ours())
        jax.block_until_ready(peer())
    ours_rounds, peer_rounds = [], []
    for _ in range(rounds):
        ours_rounds.append(timer(ours, calls))
        peer_rounds.append(timer(peer, calls))
    return Alternation(tuple(ours_rounds), tuple(peer_rounds))


# the peers' runners (benchmarks/peers/*.py)


def repo_root() -> Path:
    """The checkout the benchmark scripts are read from: ``$XLSTM_EQX_REPO`` or this package's."""
    env = os.environ.get("XLSTM_EQX_REPO")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2]


def load_script(name: str) -> Any:
    """The module ``benchmarks/<name>.py`` of the checkout (`repo_root`), loaded by path."""
    path = repo_root() / "benchmarks" / f"{name}.py"
    if not path.is_file():
        raise FileNotFoundError(
            f"bench {name}: benchmark script {path} not found; the cell, generate and peer "
            "benchmarks run from a repository checkout (set XLSTM_EQX_REPO to its root)"
        )
    module_name = "_xlstm_eqx_bench_" + name.replace("/", "_")
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"bench {name}: cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_peer(runner: str, what: str) -> tuple[Any | None, str | None]:
    """``(runner module, None)`` when ``benchmarks/peers/<runner>.py`` loads and its
    ``import_peer()`` imports the peer, else ``(None, note)`` with a one-line note saying why its
    rows are left out."""
    try:
        module = load_script(f"peers/{runner}")
        module.import_peer()
    except Exception as err:  # noqa: BLE001 - any failure means "peer not available"
        reason = f"{type(err).__name__}: {err}".splitlines()[0][:160]
        return None, f"# {what} not importable ({reason}): its rows are skipped"
    return module, None


# train step vs xlstm-jax


TRAIN_PEER_MODELS = ("xlstm", "llama")


def our_train_step(
    model_name: str, size: str, seq_len: int, batch_size: int
) -> tuple[Any, Callable[[], Any], int]:
    """``(config, one_step, parameter count)`` of the trainer's own jitted step."""
    config, model, opt_state, step, inputs = train_step_setup(model_name, size, seq_len, batch_size)
    n_params = sum(x.size for x in jax.tree.leaves(trainable_params(model)))

    def one_step() -> Any:
        nonlocal model, opt_state
        model, opt_state, loss, _ = step(inputs, model, opt_state)
        return loss

    return config, one_step, int(n_params)


def compare_train(
    peer: Any | None,
    *,
    seq_len: int,
    batch_size: int = 1,
    size: str = "small",
    models: Sequence[str] = TRAIN_PEER_MODELS,
    peak_flops: float,
    rounds: int = 3,
    calls: int = 3,
) -> list[dict[str, Any]]:
    """Our train step against xlstm-jax's (`peer`: the ``benchmarks/peers/xlstm_jax_train.py``
    module, or None for no peer: then no rows) for the presets ``f"{size}_{model}"``, same
    architecture on both sides, B=`batch_size`, S=`seq_len`, float32. One row per model: both
    parameter counts, median ms per step, the ratio, and both MFUs against `peak_flops` (FLOPs
    per token of the shared architecture, `train_flops_per_token`)."""
    if peer is None:
        return []
    rows = []
    for model_name in models:
        config, ours, n_ours = our_train_step(model_name, size, seq_len, batch_size)
        train = TrainConfig(model=model_name, seq_len=seq_len, batch_size=batch_size, steps=1000)
        theirs, n_peer = peer.reference_train_step(config, seq_len, batch_size, train)
        result = alternate(ours, theirs, rounds=rounds, calls=calls, warmup=1)
        flops = train_flops_per_token(config, seq_len) * seq_len * batch_size
        rows.append(
            {
                "model": model_name,
                "preset": f"{size}_{model_name}",
                "layer": _layer_kind(config),
                "params": n_ours,
                "peer_params": n_peer,
                "seq_len": seq_len,
                "batch_size": batch_size,
                "ms": 1e3 * result.ours_s,
                "peer_ms": 1e3 * result.peer_s,
                "ratio": result.ratio,
                "mfu": flops / result.ours_s / peak_flops,
                "peer_mfu": flops / result.peer_s / peak_flops,
                "peak_tflops": peak_flops / 1e12,
                "rounds": len(result.ours_rounds),
            }
        )
    return rows


def _layer_kind(config: xLSTMLMModelConfig | LlamaConfig) -> str:
    block = getattr(config, "mlstm_block", None)
    return "llama" if block is None else str(block.mlstm.layer_type)


def _note_and_any_rows(rows: list[dict[str, Any]], note: str | None) -> bool:
    """Print the note (why a peer's rows are absent), if any; whether there are rows."""
    if note is not None:
        print(note, flush=True)
    return bool(rows)


def print_train_comparison(rows: list[dict[str, Any]], note: str | None = None) -> None:
    """The train-step table against xlstm-jax (or the note saying why it is absent)."""
    if not _note_and_any_rows(rows, note):
        return
    r0 = rows[0]
    print(
        f"# train step vs xlstm-jax's LLMTrainer (fwd+bwd+clip+AdamW), B={r0['batch_size']} "
        f"S={r0['seq_len']}, float32; median of {r0['rounds']} alternated rounds; matmul peak "
        f"{r0['peak_tflops'] * 1e3:.1f} GFLOP/s; ratio = xlstm-jax / ours (> 1: we are faster)"
    )
    print(
        f"{'model':<8} {'layer':<9} {'params':>10} {'xj params':>10} {'ms/step':>9} "
        f"{'xj ms':>9} {'ratio':>7} {'MFU':>7} {'xj MFU':>7}"
    )
    for r in rows:
        print(
            f"{r['model']:<8} {r['layer']:<9} {r['params']:>10,} {r['peer_params']:>10,} "
            f"{r['ms']:>9.1f} {r['peer_ms']:>9.1f} {r['ratio']:>6.2f}x {r['mfu']:>7.1%} "
            f"{r['peer_mfu']:>7.1%}",
            flush=True,
        )


# generation vs transformers


def compare_generate(
    peer: Any | None,
    *,
    context: int = 1024,
    batch_sizes: Sequence[int] = (1, 16),
    new_tokens: int = 32,
    size: str = "small",
    rounds: int = 3,
    calls: int = 3,
) -> list[dict[str, Any]]:
    """Greedy decoding of `new_tokens` tokens after a `context`-token random prompt (prefill not
    timed) by our xLSTM (``f"{size}_xlstm"``, random weights) and by transformers'
    `xLSTMForCausalLM` holding the same weights (`peer`: the
    ``benchmarks/peers/hf_generate.py`` module; None: no rows). One row per batch size: both
    parameter counts, median ms per token on each side, the ratio, and the share of generated
    tokens on which the two sides agree (a check that they run the same model; near-ties of
    random weights may differ in the last digits and then diverge)."""
    if peer is None:
        return []
    config = preset_model_config("xlstm", size, context + new_tokens)
    assert isinstance(config, xLSTMLMModelConfig)
    model = xLSTMLMModel(config, key=jr.key(0))
    n_ours = sum(x.size for x in jax.tree.leaves(trainable_params(model)))
    hf_model, n_peer = peer.hf_model_from_ours(model, config)
    rows = []
    for batch_size in batch_sizes:
        prompt = jr.randint(jr.key(batch_size), (batch_size, context), 0, config.vocab_size)
        logits, state = jit_prefill(model, prompt, context + new_tokens)
        peer_decode = peer.greedy_decoder(hf_model, jax.device_get(prompt), new_tokens)
        ours_tokens = np.asarray(greedy_decode(model, state, logits, new_tokens))
        same = float(np.mean(ours_tokens == np.asarray(peer_decode())))
        result = alternate(
            lambda s=state, x=logits: greedy_decode(model, s, x, new_tokens),
            peer_decode,
            rounds=rounds,
            calls=calls,
            warmup=0,  # both sides ran once above
        )
        rows.append(
            {
                "batch_size": batch_size,
                "context": context,
                "new_tokens": new_tokens,
                "params": int(n_ours),
                "peer_params": int(n_peer),
                "ms_per_token": 1e3 * result.ours_s / new_tokens,
                "peer_ms_per_token": 1e3 * result.peer_s / new_tokens,
                "ratio": result.ratio,
                "same_tokens": same,
                "rounds": len(result.ours_rounds),
            }
        )
    return rows


@eqx.filter_jit
def jit_prefill(model: Any, prompt: jax.Array, cache_size: int) -> tuple[jax.Array, Any]:
    """`xlstm_eqx.generation.prefill`, jitted: last logits ``(B, V)`` and the decode state."""
    return prefill(model, prompt, cache_size)


@eqx.filter_jit
def greedy_decode(model: Any, state: Any, logits: jax.Array, num_tokens: int) -> jax.Array:
    """``(B, num_tokens)`` greedy tokens from the prefill's state and last logits (one scan)."""
    return decode(model, state, logits, None, num_tokens, jnp.ones((), jnp.float32), None, None)


def print_generate_comparison(rows: list[dict[str, Any]], note: str | None = None) -> None:
    """The per-token generation table against transformers (or the note saying why it is
    absent)."""
    if not _note_and_any_rows(rows, note):
        return
    r0 = rows[0]
    print(
        f"# greedy generation vs transformers' xLSTMForCausalLM (torch, CPU, float32), context "
        f"{r0['context']}, {r0['new_tokens']} new tokens, prefill not timed; median of "
        f"{r0['rounds']} alternated rounds; ratio = transformers / ours (> 1: we are faster)"
    )
    print(
        f"{'batch':>5} {'params':>10} {'hf params':>10} {'ms/token':>9} {'hf ms/tok':>9} "
        f"{'ratio':>7} {'same tokens':>11}"
    )
    for r in rows:
        print(
            f"{r['batch_size']:>5} {r['params']:>10,} {r['peer_params']:>10,} "
            f"{r['ms_per_token']:>9.3f} {r['peer_ms_per_token']:>9.3f} {r['ratio']:>6.2f}x "
            f"{r['same_tokens']:>11.0%}",
            flush=True,
        )
