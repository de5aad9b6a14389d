"""``xlstm-eqx convert`` and ``xlstm-eqx generate --hf``: checkpoint conversion and sampling from a
transformers directory, as ``argv -> exit status`` functions the main CLI dispatches to.

Formats (``--from`` / ``--to``):

- ``hf``: a transformers ``xLSTMForCausalLM`` directory (config.json + safetensors, optionally
  sharded with an index, optionally a ``tokenizer.json``);
- ``xlstm-jax``: reference Flax parameters — a ``.safetensors``/``.npz`` of flat ``a/b/c`` names,
  a directory holding ``params.safetensors``/``params.npz``, or an orbax checkpoint of the
  reference trainer (saved on any number of devices) — plus ``--config FILE``, the model config
  as JSON
  (``{"model_kind": "xlstm"|"llama", "model_config": {...}}``, our field names, which are the
  reference's), read from ``PATH/config.json`` when not given;
- ``eqx``: our own run layout — ``OUT/config.json`` (``model_kind``, ``model_config``, the
  tokenizer when known) and ``OUT/checkpoints/step_00000000/`` (an orbax checkpoint), which
  ``xlstm-eqx eval/generate --out OUT`` and `load_run` read; as input, any training run
  directory (its newest checkpoint).
- ``peft`` (output only): the LoRA adapter alone in PEFT's format (``adapter_config.json`` +
  ``adapter_model.safetensors``, transformers' module names) for
  ``peft.PeftModel.from_pretrained(xLSTMForCausalLM, dir)``.

A model with LoRA adapters (a ``--lora-rank`` run, or ``--from hf --adapter DIR``) is written
merged (``--merge-lora``: ``W + alpha/r · A B``, the base architecture, any format) or as its
adapter (``--to peft``).
"""

import argparse
import dataclasses
import os
import sys
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import jax.random as jr

from ..core.files import write_json_atomic
from ..data.tokenizer import load_tokenizer
from ..generation import generate
from ..interop.common import InteropError
from ..interop.hf import from_hf_pretrained, to_hf
from ..interop.peft import from_peft_pretrained, write_peft_adapter
from ..interop.runs import (
    family_name_of,
    hf_directory_tokenizer,
    load_hf_for_generation,
    read_eqx,
    read_model_config,
    save_eqx,
)
from ..interop.xlstm_jax import from_xlstm_jax, to_xlstm_jax, xlstm_jax_config
from ..interop.xlstm_jax_files import load_xlstm_jax_params, save_xlstm_jax_params
from ..training.finetune import has_lora, merge_lora


FORMATS = ("hf", "xlstm-jax", "eqx")
OUTPUT_FORMATS = (*FORMATS, "peft")


def _load(fmt: str, path: str, args: argparse.Namespace) -> tuple[Any, Any, str | None, int | None]:
    """``(model, config, tokenizer, step)``; the step of the checkpoint read (eqx only)."""
    if fmt == "hf":
        if args.adapter:
            model, config = from_peft_pretrained(path, args.adapter, dtype=args.dtype)
        else:
            model, config = from_hf_pretrained(path, dtype=args.dtype)
        return model, config, hf_directory_tokenizer(path), None
    if fmt == "xlstm-jax":
        cfg_path = args.config or os.path.join(
            path if os.path.isdir(path) else os.path.dirname(path), "config.json"
        )
        config = xlstm_jax_config(read_model_config(cfg_path))
        if args.dtype is not None:
            config = dataclasses.replace(config, dtype=args.dtype)
        return from_xlstm_jax(load_xlstm_jax_params(path), config), config, None, None
    return read_eqx(path)


def _convert_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="xlstm-eqx convert",
        description="Convert checkpoints between transformers (hf), xlstm-jax and xlstm_eqx (eqx).",
    )
    add_convert_arguments(p)
    return p


def add_convert_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from", dest="src", required=True, choices=FORMATS, help="input format")
    p.add_argument("--to", dest="dst", required=True, choices=OUTPUT_FORMATS, help="output format")
    p.add_argument("path", metavar="PATH", help="input checkpoint (directory or file)")
    p.add_argument("out", metavar="OUT", help="output directory (xlstm-jax: a .safetensors file)")
    p.add_argument(
        "--config",
        metavar="FILE",
        help="xlstm-jax input: model config JSON (default PATH/config.json)",
    )
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="compute dtype")
    p.add_argument(
        "--tokenizer",
        metavar="FILE|bytes",
        help="the tokenizer recorded with the output: 'bytes' or a tokenizer.json "
        "(default: the input's own, where it records one)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="write into a non-empty OUT (its files of the same names are replaced; never the "
        "input's own directory)",
    )
    p.add_argument(
        "--merge-lora",
        action="store_true",
        help="fold the input's LoRA adapters into its kernels and write the merged model",
    )
    p.add_argument(
        "--adapter",
        metavar="DIR",
        help="hf input: a PEFT LoRA adapter directory to load onto it",
    )
    p.add_argument(
        "--max-shard-size",
        type=int,
        default=5 * 10**9,
        metavar="BYTES",
        help="hf output: safetensors shards of at most this many bytes, with an index "
        "(default: 5 GB, as save_pretrained)",
    )


def _check_target(args: argparse.Namespace) -> None:
    """Refuse (before anything is read) an OUT that would overwrite the input, or another
    run's or model's files: OUT must be new or empty unless --force."""
    src = os.path.realpath(args.path)
    src_dir = src if os.path.isdir(src) else os.path.dirname(src)
    out = os.path.realpath(args.out)
    if out == src or out == src_dir or src_dir.startswith(out.rstrip(os.sep) + os.sep):
        raise ValueError(
            f"OUT {args.out!r} would overwrite the input {args.path!r}; choose a new directory"
        )
    if os.path.isdir(args.out):
        held = sorted(os.listdir(args.out))
        if held and not args.force:
            shown = ", ".join(held[:4]) + (", …" if len(held) > 4 else "")
            raise FileExistsError(
                f"OUT {args.out!r} is not empty (it holds {shown}); choose a new directory or "
                "pass --force to write into it"
            )
    elif os.path.exists(args.out) and not args.force:
        raise FileExistsError(f"OUT {args.out!r} exists; pass --force to replace it")


def run_convert(args: argparse.Namespace) -> int:
    _check_target(args)
    if args.tokenizer is not None:
        load_tokenizer(args.tokenizer)  # a bad --tokenizer fails before the model is read
    if args.adapter and args.src != "hf":
        raise ValueError("--adapter: a PEFT adapter goes onto an hf input (--from hf)")
    model, config, tokenizer, step = _load(args.src, args.path, args)
    model = _lora_for_output(model, args)
    tokenizer = args.tokenizer or tokenizer
    source = {"format": args.src, "path": os.path.abspath(args.path)}
    if args.dst == "peft":
        base = os.path.abspath(args.path) if args.src == "hf" else ""
        write_peft_adapter(model, args.out, base=base)
    elif args.dst == "eqx":
        save_eqx(model, config, args.out, tokenizer_file=tokenizer, source=source)
    elif args.dst == "hf":
        to_hf(
            model,
            config,
            args.out,
            max_shard_bytes=args.max_shard_size,
            tokenizer=tokenizer,
        )
    else:
        out = args.out
        if not out.endswith(".safetensors"):
            os.makedirs(out, exist_ok=True)
            run = {"model_kind": family_name_of(config), "model_config": config.to_dict()}
            write_json_atomic(os.path.join(out, "config.json"), run)
            out = os.path.join(out, "params.safetensors")
        save_xlstm_jax_params(to_xlstm_jax(model), out)
    what = args.path if step is None else f"{args.path} (step {step})"
    print(f"converted {args.src} {what} -> {args.dst} {args.out}")
    return 0


def _lora_for_output(model: Any, args: argparse.Namespace) -> Any:
    """The model to write: merged with ``--merge-lora``; a LoRA model otherwise only as its
    adapter (``--to peft``)."""
    adapted = has_lora(model)
    if args.merge_lora and args.dst == "peft":
        raise ValueError(
            "--merge-lora writes a merged model, --to peft the adapter alone: not both"
        )
    if args.merge_lora and not adapted:
        raise ValueError(f"--merge-lora: {args.path!r} holds no LoRA adapter")
    if args.dst == "peft" and not adapted:
        raise ValueError(f"--to peft: {args.path!r} holds no LoRA adapter")
    if adapted and args.dst != "peft" and not args.merge_lora:
        raise ValueError(
            f"{args.path!r} holds LoRA adapters: pass --merge-lora (the merged model) or "
            "--to peft (the adapter alone)"
        )
    return merge_lora(model) if args.merge_lora else model


def _run_guarded(run: Any, args: argparse.Namespace, prog: str) -> int:
    try:
        return run(args)
    except (InteropError, ValueError, FileNotFoundError, FileExistsError, ImportError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2


def convert_main(argv: Sequence[str] | None = None) -> int:
    """``xlstm-eqx convert --from hf|xlstm-jax|eqx --to eqx|hf|xlstm-jax PATH OUT``."""
    args = _convert_parser().parse_args(argv)
    return _run_guarded(run_convert, args, "xlstm-eqx convert")


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hf", required=True, metavar="PATH", help="transformers xLSTM directory")
    p.add_argument(
        "--tokenizer",
        metavar="FILE|bytes",
        help="'bytes' or a tokenizer.json (default: the directory's own)",
    )
    p.add_argument("--prompt", default=None, help="text to continue (needs a tokenizer)")
    p.add_argument("--prompt-ids", default=None, help="comma-separated token ids instead of text")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="compute dtype")
    p.add_argument("--ids", action="store_true", help="print token ids instead of text")


def run_generate(args: argparse.Namespace) -> int:

    model, _, tok = load_hf_for_generation(args.hf, dtype=args.dtype, tokenizer=args.tokenizer)
    if args.prompt_ids is not None:
        try:
            prompt = [int(t) for t in args.prompt_ids.split(",") if t.strip()]
        except ValueError:
            raise InteropError(
                f"--prompt-ids must be comma-separated ints, got {args.prompt_ids!r}"
            ) from None
    else:
        if tok is None:
            raise InteropError(
                f"{args.hf!r} records no tokenizer: pass --tokenizer FILE|bytes or --prompt-ids"
            )
        prompt = [int(t) for t in tok.encode(args.prompt or "")]
    if not prompt:
        raise InteropError("the prompt must have at least one token")
    greedy = args.temperature == 0
    out = generate(
        model,
        jnp.asarray(prompt, jnp.int32)[None, :],
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        key=None if greedy else jr.key(args.seed),
    )
    ids = [int(t) for t in out[0]]
    if args.ids or tok is None:
        print(",".join(str(t) for t in ids))
    else:
        print(tok.decode(ids))
    return 0


def generate_main(argv: Sequence[str] | None = None) -> int:
    """``xlstm-eqx generate --hf PATH [--prompt TEXT | --prompt-ids 1,2,3] ...``."""
    p = argparse.ArgumentParser(
        prog="xlstm-eqx generate", description="Generate from a transformers xLSTM directory."
    )
    add_generate_arguments(p)
    args = p.parse_args(argv)
    return _run_guarded(run_generate, args, "xlstm-eqx generate")
