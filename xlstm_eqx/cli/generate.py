"""`xlstm-eqx generate`: sample from a run (or, with `--hf`, a transformers directory)."""

import argparse
import sys

import jax.numpy as jnp
import jax.random as jr

from ..data.tokenizer import load_tokenizer, tokenizer_from_dict
from ..generation import stream_generate
from ..interop.runs import load_hf_for_generation
from ..training.evaluate import load_run


# generate


def _generate_arguments(p: argparse.ArgumentParser) -> None:
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


def _generate_run(args: argparse.Namespace) -> int:

    if args.hf is not None:
        model, _, tokenizer = load_hf_for_generation(args.hf, tokenizer=args.tokenizer)
        if tokenizer is None:
            raise ValueError(
                f"--hf {args.hf!r} records no tokenizer; pass --tokenizer FILE (a tokenizer.json) "
                "or --tokenizer bytes"
            )
    else:
        model, run, _ = load_run(args.out, args.checkpoint)
        if args.tokenizer is not None:
            tokenizer = load_tokenizer(args.tokenizer)
        elif "tokenizer" in run:
            tokenizer = tokenizer_from_dict(run["tokenizer"])
        else:
            raise ValueError(f"run {args.out!r} records no tokenizer; pass --tokenizer FILE|bytes")
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
