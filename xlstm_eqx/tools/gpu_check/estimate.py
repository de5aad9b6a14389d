"""The GPU check's expected duration per part, from FLOPs at assumed throughputs plus compiles at
assumed seconds each (`--estimate`; nothing is run).
"""

from typing import Any

import equinox as eqx
import jax.random as jr

from ...core import count_params
from ...models import MODEL_FAMILIES, train_flops_per_token
from ...presets import get_preset
from ...xlstm.model import xLSTMLMModel
from .context import CONTEXT_SEQ_LEN, context_config, context_sizes
from .kernels import layer_shape, peer_chunk
from .settings import (
    FULL,
    QUICK,
    AttentionCase,
    CheckSettings,
    attention_flops,
    chunkwise_flops,
    pallas_chunk,
)
from .train import family_name, with_context


# Duration estimate (no measurement)

#: Assumptions of `estimate_durations` for an H100/H200-class GPU. Not measurements: the run's
#: own numbers replace them. Throughputs in TFLOP/s (bandwidth in GB/s), compiles in seconds.
ASSUMED: dict[str, float] = {
    "reference_f32_tflops": 20.0,  # correctness: float32 at precision 'highest' (no TF32)
    "kernel_tflops": 100.0,  # chunkwise forms, bf16 in, f32 math: far below the matmul peak
    "train_tflops": 300.0,  # ~30% of a 989 TFLOP/s bf16 peak
    "prefill_tflops": 200.0,
    "decode_gbps": 2000.0,  # decode is bandwidth-bound: weights + state/KV cache per token
    "compile_cell_s": 2.0,  # one jit of the pure-JAX chunkwise form (fwd or fwd+bwd)
    "compile_pallas_s": 3.0,  # the Pallas/Triton kernels (2 kernels fwd, 4 fwd+bwd)
    "compile_peer_triton_s": 4.0,  # mlstm-kernels' Triton kernels through jax_triton
    "compile_peer_native_s": 12.0,  # mlstm-kernels' JAX form (unrolled chunk loop)
    "compile_attention_s": 1.5,
    "compile_auto_s": 6.0,  # `fastest_chunkwise_backend`: two fwd+bwd compiles + timing
    "compile_train_s": 20.0,  # one train step of a 165M model (blocks scanned)
    "compile_prefill_s": 6.0,
    "compile_decode_s": 4.0,
    "compile_context_s": 6.0,  # a 2-block xLSTM's fwd+bwd, on one device or a cp mesh
    "startup_s": 20.0,  # imports, device start, the bf16 matmul
}


def _estimate_correctness(settings: CheckSettings) -> list[dict[str, Any]]:
    out = []
    for case in settings.correctness_cases:
        if isinstance(case, AttentionCase):
            flops = 3.0 * attention_flops(case.b, case.s, case.nh, case.hd) * 4  # ref + 3
            compiles = 4
            compile_s = compiles * ASSUMED["compile_attention_s"]
        else:
            fwd = chunkwise_flops(case.b, case.nh, case.s, case.dhqk, case.dhv, case.chunk)
            flops = 2 * 3.0 * fwd  # reference and kernels, forward+backward once each
            compiles = 2
            compile_s = ASSUMED["compile_cell_s"] + ASSUMED["compile_pallas_s"]
        compute_s = flops / (ASSUMED["reference_f32_tflops"] * 1e12)
        out.append(
            {
                "case": case.label(),
                "compiles": compiles,
                "flops": flops,
                "compute_s": compute_s,
                "compile_s": compile_s,
            }
        )
    return out


_COMPILE_KEY = {
    "chunkwise": "compile_cell_s",
    "chunkwise_pallas": "compile_pallas_s",
    "mk triton_xl_chunk": "compile_peer_triton_s",
    "mk native (JAX)": "compile_peer_native_s",
}


def _estimate_kernels(settings: CheckSettings) -> list[dict[str, Any]]:
    out = []
    runs = settings.kernel_repeats + 1
    for layer, s in settings.kernel_shapes:
        nh, dhqk, dhv = layer_shape(layer)
        b = max(1, settings.kernel_tokens // s)
        forms = {
            "chunkwise": min(settings.kernel_chunk, s),
            "chunkwise_pallas": pallas_chunk(settings.kernel_chunk, s),
        }
        for name in ("mk triton_xl_chunk", "mk native (JAX)"):
            if "native" in name and s not in settings.peer_native_seq_lens:
                continue
            forms[name] = peer_chunk(name, s, settings.kernel_chunk, settings.peer_max_chunks)
        passes = settings.kernel_passes
        for name, chunk in forms.items():
            flops = runs * sum(
                chunkwise_flops(b, nh, s, dhqk, dhv, chunk, backward=p == "fwd+bwd") for p in passes
            )
            out.append(
                {
                    "case": f"{layer} S{s} {name} {', '.join(passes)}",
                    "compiles": len(passes),
                    "flops": flops,
                    "compute_s": flops / (ASSUMED["kernel_tflops"] * 1e12),
                    "compile_s": len(passes) * ASSUMED[_COMPILE_KEY[name]],
                }
            )
        out.append(
            {
                "case": f"{layer} S{s} auto",
                "compiles": 2,
                "flops": 0.0,
                "compute_s": 0.0,
                "compile_s": ASSUMED["compile_auto_s"],
            }
        )
    return out


def _estimate_train(settings: CheckSettings) -> list[dict[str, Any]]:
    out = []
    context = max(settings.train_seq_lens)
    probed: set[str] = set()
    for s in settings.train_seq_lens:
        for preset in settings.train_models:
            config = with_context(get_preset(preset), context)
            tokens = settings.train_max_tokens  # upper bound: the batch search may stop lower
            flops = (settings.train_repeats + 2) * tokens * train_flops_per_token(config, s)
            # a plan at B=1 for the model's first S, then the predicted batch (more compiles if
            # the prediction was off)
            compiles = 1 if preset in probed else 2
            probed.add(preset)
            compile_s = compiles * ASSUMED["compile_train_s"]
            if family_name(config) == "xlstm":
                compile_s += ASSUMED["compile_auto_s"]
            out.append(
                {
                    "case": f"{preset} S{s}",
                    "compiles": compiles,
                    "flops": flops,
                    "compute_s": flops / (ASSUMED["train_tflops"] * 1e12),
                    "compile_s": compile_s,
                }
            )
    return out


def _estimate_generate(settings: CheckSettings) -> list[dict[str, Any]]:
    out = []
    n_new = settings.gen_new_tokens
    top = max(settings.gen_contexts) + n_new
    decoded: set[tuple[str, int]] = set()
    for batch in settings.gen_batches:
        for context in settings.gen_contexts:
            for preset in settings.gen_models:
                config = with_context(get_preset(preset), top)
                llama = family_name(config) == "llama"
                model = eqx.filter_eval_shape(
                    MODEL_FAMILIES[family_name(config)].build, config, key=jr.key(0)
                )
                n_params = count_params(model)
                d, layers = config.embedding_dim, config.num_blocks
                flops = 2.0 * n_params * batch * context
                state_bytes = 0.0
                if llama:  # chunks attend to the whole cache; the cache is read per new token
                    flops += 4.0 * batch * context * (context + n_new) * d * layers
                    state_bytes = 2 * 2.0 * layers * batch * (context + n_new) * d
                per_token = (4.0 * n_params + state_bytes) / (ASSUMED["decode_gbps"] * 1e9)
                compute_s = flops / (ASSUMED["prefill_tflops"] * 1e12)
                compute_s += (settings.gen_repeats + 1) * n_new * per_token
                compiles = 1
                compile_s = ASSUMED["compile_prefill_s"]
                if llama or (preset, batch) not in decoded:
                    compiles += 1
                    compile_s += ASSUMED["compile_decode_s"]
                    decoded.add((preset, batch))
                out.append(
                    {
                        "case": f"{preset} B{batch} C{context}",
                        "compiles": compiles,
                        "flops": flops,
                        "compute_s": compute_s,
                        "compile_s": compile_s,
                    }
                )
    return out


def _estimate_context(settings: CheckSettings) -> list[dict[str, Any]]:
    """The `context` part on a machine with 8 GPUs (one GPU skips it): per cp, the one-device
    and the cp step compiled and run a few times."""
    del settings
    seq_len = CONTEXT_SEQ_LEN[1]
    config = context_config(seq_len)
    n = count_params(eqx.filter_eval_shape(xLSTMLMModel, config, key=jr.key(0)))
    flops = 6.0 * n * seq_len * 5  # forward+backward, one device and cp, warm-up and 3 repeats
    return [
        {
            "case": f"context parallel cp={cp} S={seq_len}",
            "compiles": 2,
            "flops": flops,
            "compute_s": flops / (ASSUMED["train_tflops"] * 1e12),
            "compile_s": 2 * ASSUMED["compile_context_s"],
        }
        for cp in context_sizes(8)
    ]


def estimate_durations(settings: CheckSettings | None = None) -> dict[str, Any]:
    """Expected seconds of each part of a run (default: the full GPU run), from analytic FLOPs at
    the throughputs in `ASSUMED` plus (number of compiles) x (assumed seconds per compile); and
    which cases would fall past the part's budget. Runs nothing on the device (model sizes come
    from `eqx.filter_eval_shape`)."""
    settings = settings or FULL
    makers = {
        "correctness": _estimate_correctness,
        "kernels": _estimate_kernels,
        "train": _estimate_train,
        "generate": _estimate_generate,
        "context": _estimate_context,
    }
    parts = {}
    for name, make in makers.items():
        cases = make(settings)
        elapsed = 0.0  # as the run would go: a case starts only while the budget is not spent
        past = []
        for case in cases:
            case["total_s"] = case["compute_s"] + case["compile_s"]
            if elapsed > settings.budgets_s[name]:
                past.append(case["case"])
            else:
                elapsed += case["total_s"]
        parts[name] = {
            "cases": len(cases),
            "compiles": sum(c["compiles"] for c in cases),
            "compute_s": sum(c["compute_s"] for c in cases),
            "compile_s": sum(c["compile_s"] for c in cases),
            "all_cases_s": sum(c["total_s"] for c in cases),
            "expected_s": elapsed,
            "budget_s": settings.budgets_s[name],
            "expected_timed_out": past,
            "rows": cases,
        }
    return {
        "mode": "quick" if settings is QUICK else "full" if settings is FULL else "custom",
        "assumed": dict(ASSUMED),
        "parts": parts,
        "all_cases_s": ASSUMED["startup_s"] + sum(p["all_cases_s"] for p in parts.values()),
        "expected_s": ASSUMED["startup_s"] + sum(p["expected_s"] for p in parts.values()),
    }


def format_estimate(est: dict[str, Any]) -> str:
    """`estimate_durations` as the text `--estimate` prints."""
    lines = [
        f"# Estimated duration of the {est['mode']} run on an H100/H200-class GPU "
        "(assumptions, not measurements):",
        "# " + ", ".join(f"{k}={v:g}" for k, v in est["assumed"].items()),
        f"{'part':<12} {'cases':>5} {'compiles':>8} {'compute s':>9} {'compile s':>9} "
        f"{'all cases s':>11} {'budget s':>8} {'expected s':>10}",
    ]
    for name, p in est["parts"].items():
        lines.append(
            f"{name:<12} {p['cases']:>5} {p['compiles']:>8} {p['compute_s']:>9.1f} "
            f"{p['compile_s']:>9.1f} {p['all_cases_s']:>11.1f} {p['budget_s']:>8.0f} "
            f"{p['expected_s']:>10.1f}"
        )
    lines.append(
        f"expected wall time {est['expected_s']:.0f} s (all cases: {est['all_cases_s']:.0f} s), "
        f"incl. {est['assumed']['startup_s']:g} s start-up; a part starts no case once its budget "
        "is spent"
    )
    for name, p in est["parts"].items():
        for case in p["rows"]:
            mark = "  (expected to time out)" if case["case"] in p["expected_timed_out"] else ""
            lines.append(
                f"  {name:<11} {case['case']:<58} {case['compiles']:>2} compiles "
                f"{case['total_s']:>6.1f} s{mark}"
            )
    return "\n".join(lines)
