"""`xlstm-eqx generate`: sample from a run (or, with `--hf`, a transformers directory)."""

import argparse
import sys
from typing import Any

import jax.numpy as jnp
import jax.random as jr

from ..data.tokenizer import Tokenizer, tokenizer_from_dict
from ..generation import stream_generate
from ..interop.runs import load_hf_for_generation
from ..training.evaluate import load_run, run_tokenizer


# generate


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--out", metavar="DIR", help="the run whose model to sample")
    source.add_argument("--hf", metavar="DIR", help="a transformers xLSTMForCausalLM directory")
    p.add_argument(
        "--tokenizer",
        metavar="FILE|bytes",
        help="'bytes' or a tokenizer.json (default: the model's own)",
    )
    p.add_argument("--prompt", default="def ", help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    p.add_argument(
        "--top-k", type=int, default=None, help="keep the k most likely tokens (default: all)"
    )
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (default: off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--checkpoint", metavar="PATH", help="a checkpoint directory (default: newest)")


def run_generate_command(args: argparse.Namespace) -> int:

    if args.hf is not None:
        model, _, tokenizer = load_hf_for_generation(args.hf, tokenizer=args.tokenizer)
        if tokenizer is None:
            raise ValueError(
                f"--hf {args.hf!r} records no tokenizer; pass --tokenizer FILE (a tokenizer.json) "
                "or --tokenizer bytes"
            )
    else:
        model, run, _ = load_run(args.out, args.checkpoint)
        tokenizer, own = run_tokenizer(run, args.tokenizer, f"run {args.out!r}")
        if not own:
            _check_other_tokenizer(tokenizer, run, args)
    prompt = [int(t) for t in tokenizer.encode(args.prompt)]
    if not prompt:
        raise ValueError("--prompt must encode to at least one token")
    stream = stream_generate(
        model,
        jnp.asarray(prompt, jnp.int32)[None, :],
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        key=jr.key(args.seed),
    )
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    ids: list[int] = []
    shown = ""
    for tok in stream:
        ids.append(int(tok[0]))
        # Decode everything so far; hold back a trailing incomplete character (U+FFFD).
        text = tokenizer.decode(ids).rstrip("\ufffd")
        if text.startswith(shown) and len(text) > len(shown):
            sys.stdout.write(text[len(shown) :])
            sys.stdout.flush()
            shown = text
    rest = tokenizer.decode(ids)
    sys.stdout.write((rest[len(shown) :] if rest.startswith(shown) else "") + "\n")
    sys.stdout.flush()
    return 0


def _check_other_tokenizer(
    tokenizer: Tokenizer, run: dict[str, Any], args: argparse.Namespace
) -> None:
    """A `--tokenizer` that is not the run's: refused when the model can emit ids it cannot
    decode (before sampling, not mid-stream); else a warning line, as the text may be junk."""
    emits = int(run["model_config"]["vocab_size"])  # the padded embedding, at most
    what = f"its vocab_size {emits}"
    recorded = run.get("tokenizer")
    if isinstance(recorded, dict):
        try:  # the run's own tokenizer: the ids it was trained on
            emits = tokenizer_from_dict(recorded).vocab_size
            what = f"its tokenizer's vocabulary of {emits}"
        except (OSError, ValueError, ImportError):
            pass
    if tokenizer.vocab_size < emits:
        raise ValueError(
            f"--tokenizer {args.tokenizer!r} decodes {tokenizer.vocab_size} token ids, but run "
            f"{args.out!r} emits ids up to {emits - 1} ({what}); pass the run's tokenizer"
        )
    print(
        f"xlstm-eqx generate: warning: --tokenizer {args.tokenizer!r} is not the tokenizer run "
        f"{args.out!r} was trained with; the text may be meaningless",
        file=sys.stderr,
    )
