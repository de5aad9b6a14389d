"""``xlstm-eqx convert`` and ``xlstm-eqx generate --hf``: checkpoint conversion and sampling from a
transformers directory, as ``argv -> exit status`` functions the main CLI dispatches to.

Formats (``--from`` / ``--to``):

- ``hf``: a transformers ``xLSTMForCausalLM`` directory (config.json + safetensors, optionally
  sharded with an index, optionally a ``tokenizer.json``);
- ``xlstm-jax``: reference Flax parameters — a ``.safetensors``/``.npz`` of flat ``a/b/c`` names,
  a directory holding ``params.safetensors``/``params.npz``, or an orbax checkpoint (with the
  optional orbax package) — plus ``--config FILE``, the model config as JSON
  (``{"model_kind": "xlstm"|"llama", "model_config": {...}}``, our field names, which are the
  reference's), read from ``PATH/config.json`` when not given;
- ``eqx``: our own run layout — ``OUT/config.json`` (``model_kind``, ``model_config``, the
  tokenizer when known) and ``OUT/checkpoints/step_00000000/`` (`save_checkpoint`), which
  ``xlstm-eqx eval/generate --out OUT`` and `_train.load_run` read.
"""

import argparse
import json
import os
import shutil
import sys
from collections.abc import Sequence
from typing import Any

from ._common import MAX_BLOCKS, InteropError, load_json, printable


__all__ = ["convert_main", "generate_main", "load_eqx", "load_hf_for_generation", "save_eqx"]

FORMATS = ("hf", "xlstm-jax", "eqx")


def _kind_of(config: Any) -> str:
    from .._configs import LlamaConfig, xLSTMLMModelConfig

    if isinstance(config, xLSTMLMModelConfig):
        return "xlstm"
    if isinstance(config, LlamaConfig):
        return "llama"
    raise InteropError(f"unknown model config type {type(config).__name__}")


def read_model_config(path: str) -> Any:
    """A model config from JSON: ``{"model_kind", "model_config"}`` (a run's config.json or a
    fixture's) or a bare config dict (Llama if it has ``head_dim`` and no ``mlstm_block``)."""
    from .._configs import LlamaConfig, xLSTMLMModelConfig

    if not os.path.isfile(path):
        raise InteropError(f"model config {path!r} does not exist")
    d = load_json(path, max_bytes=16 * 1024 * 1024)
    if not isinstance(d, dict):
        raise InteropError(f"model config {path!r} must hold a JSON object")
    if "model_kind" in d and "model_config" in d:
        kind, d = d["model_kind"], d["model_config"]
    else:
        kind = "llama" if "head_dim" in d and "mlstm_block" not in d else "xlstm"
    classes = {"xlstm": xLSTMLMModelConfig, "llama": LlamaConfig}
    if not isinstance(kind, str) or kind not in classes:
        raise InteropError(
            f"model config {path!r}: unknown model_kind {printable(repr(kind))[:60]}"
        )
    if not isinstance(d, dict):
        raise InteropError(f"model config {path!r}: model_config must be a JSON object")
    blocks = d.get("num_blocks")
    if isinstance(blocks, int) and blocks > MAX_BLOCKS:  # before a per-block list is made
        raise InteropError(f"model config {path!r}: num_blocks={blocks} is more than {MAX_BLOCKS}")
    try:
        return classes[kind].from_dict(d)
    except ValueError as e:
        raise InteropError(f"model config {path!r}: {printable(str(e))}") from None


def save_eqx(
    model: Any,
    config: Any,
    out: str,
    *,
    tokenizer_file: str | None = None,
    source: dict[str, Any] | None = None,
) -> str:
    """Write ``model`` as our run layout under ``out`` (see the module docstring)."""
    from .._checkpoint import save_checkpoint

    os.makedirs(out, exist_ok=True)
    run: dict[str, Any] = {"model_kind": _kind_of(config), "model_config": config.to_dict()}
    if tokenizer_file is not None:
        dst = os.path.join(out, "tokenizer.json")
        if os.path.abspath(tokenizer_file) != os.path.abspath(dst):
            shutil.copyfile(tokenizer_file, dst)
        run["tokenizer"] = {"kind": "tokenizers", "path": os.path.abspath(dst)}
    if source:
        run["converted_from"] = source
    save_checkpoint(
        os.path.join(out, "checkpoints"),
        0,
        {"model": model},
        {"step": 0, "run_config": run},
        keep=None,
    )
    tmp = os.path.join(out, "config.json.tmp")
    with open(tmp, "w") as f:
        json.dump(run, f, indent=2)
    os.replace(tmp, os.path.join(out, "config.json"))
    return out


def load_eqx(path: str) -> tuple[Any, Any, str | None]:
    """``(model, config, tokenizer file or None)`` from our run layout."""
    from .._train import MODEL_FAMILIES, load_run

    model, run, _ = load_run(path)
    config = MODEL_FAMILIES[run["model_kind"]].config_from_dict(run["model_config"])
    tok = run.get("tokenizer") or {}
    tok_file = tok.get("path") if tok.get("kind") == "tokenizers" else None
    return model, config, tok_file


def _hf_tokenizer(path: str) -> str | None:
    f = os.path.join(path, "tokenizer.json")
    return f if os.path.isfile(f) else None


def _load(fmt: str, path: str, args: argparse.Namespace) -> tuple[Any, Any, str | None]:
    if fmt == "hf":
        from ._hf import from_hf_pretrained

        model, config = from_hf_pretrained(path, dtype=args.dtype)
        return model, config, _hf_tokenizer(path)
    if fmt == "xlstm-jax":
        from ._xlstm_jax import from_xlstm_jax, load_xlstm_jax_params, xlstm_jax_config

        cfg_path = args.config or os.path.join(
            path if os.path.isdir(path) else os.path.dirname(path), "config.json"
        )
        config = xlstm_jax_config(read_model_config(cfg_path))
        if args.dtype is not None:
            import dataclasses

            config = dataclasses.replace(config, dtype=args.dtype)
        return from_xlstm_jax(load_xlstm_jax_params(path), config), config, None
    return load_eqx(path)


def _convert_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="xlstm-eqx convert",
        description="Convert checkpoints between transformers (hf), xlstm-jax and xlstm_eqx (eqx).",
    )
    add_convert_arguments(p)
    return p


def add_convert_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from", dest="src", required=True, choices=FORMATS, help="input format")
    p.add_argument("--to", dest="dst", required=True, choices=FORMATS, help="output format")
    p.add_argument("path", metavar="PATH", help="input checkpoint (directory or file)")
    p.add_argument("out", metavar="OUT", help="output directory (xlstm-jax: a .safetensors file)")
    p.add_argument(
        "--config",
        metavar="FILE",
        help="xlstm-jax input: model config JSON (default PATH/config.json)",
    )
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="compute dtype")
    p.add_argument(
        "--max-shard-size",
        type=int,
        metavar="BYTES",
        help="hf output: split the safetensors into shards of at most this many bytes",
    )


def run_convert(args: argparse.Namespace) -> int:
    model, config, tokenizer = _load(args.src, args.path, args)
    source = {"format": args.src, "path": os.path.abspath(args.path)}
    if args.dst == "eqx":
        save_eqx(model, config, args.out, tokenizer_file=tokenizer, source=source)
    elif args.dst == "hf":
        from ._hf import to_hf

        to_hf(
            model,
            config,
            args.out,
            max_shard_bytes=args.max_shard_size,
            tokenizer_dir=None if tokenizer is None else os.path.dirname(tokenizer),
        )
    else:
        from ._xlstm_jax import save_xlstm_jax_params, to_xlstm_jax

        out = args.out
        if not out.endswith(".safetensors"):
            os.makedirs(out, exist_ok=True)
            with open(os.path.join(out, "config.json"), "w") as f:
                json.dump(
                    {"model_kind": _kind_of(config), "model_config": config.to_dict()}, f, indent=2
                )
            out = os.path.join(out, "params.safetensors")
        save_xlstm_jax_params(to_xlstm_jax(model), out)
    print(f"converted {args.src} {args.path} -> {args.dst} {args.out}")
    return 0


def _run_guarded(run: Any, args: argparse.Namespace, prog: str) -> int:
    try:
        return run(args)
    except (InteropError, ValueError, FileNotFoundError, ImportError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2


def convert_main(argv: Sequence[str] | None = None) -> int:
    """``xlstm-eqx convert --from hf|xlstm-jax|eqx --to eqx|hf|xlstm-jax PATH OUT``."""
    args = _convert_parser().parse_args(argv)
    return _run_guarded(run_convert, args, "xlstm-eqx convert")


# ----------------------------------------------------------------------------------------------
# generate --hf


def load_hf_for_generation(
    path: str, *, dtype: str | None = None, tokenizer: str | None = None
) -> tuple[Any, Any, Any]:
    """``(model, config, tokenizer or None)`` of a transformers directory; the tokenizer is
    ``tokenizer`` (a ``tokenizer.json`` path) or ``PATH/tokenizer.json`` if present."""
    from .._tokenizer import HFTokenizer
    from ._hf import from_hf_pretrained

    model, config = from_hf_pretrained(path, dtype=dtype)
    tok_file = tokenizer or _hf_tokenizer(path)
    return model, config, None if tok_file is None else HFTokenizer(tok_file)


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hf", required=True, metavar="PATH", help="transformers xLSTM directory")
    p.add_argument(
        "--tokenizer", metavar="FILE", help="tokenizer.json (default: PATH/tokenizer.json)"
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
    import jax.numpy as jnp
    import jax.random as jr

    from .._generate import generate

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
                f"{args.hf!r} has no tokenizer.json: pass --tokenizer FILE or --prompt-ids"
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
