"""Evaluating and sampling a finished run: `load_run` (model, run config and step from a run
directory), `evaluate_run` (held-out loss and bits per byte), `sample_tokens`."""

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import PRNGKeyArray

from ..data.batch import batch_tokens
from ..data.corpus import (
    check_token_ids,
    eval_windows,
    load_corpus,
    unigram_bits_per_byte_from_counts,
)
from ..data.sources import Source, iter_capped_pieces, resolve_sources
from ..data.token_file import TokenFile
from ..data.tokenizer import (
    ByteTokenizer,
    HFTokenizer,
    Tokenizer,
    load_tokenizer,
    tokenizer_from_dict,
)
from ..generation import has_decode_api as has_decode_api  # re-exported for loop, lm_eval
from ..models import MODEL_FAMILIES
from . import checkpoint as npz_checkpoint, orbax_checkpoint
from .checkpoint import CheckpointError
from .config import TrainConfig
from .finetune import LoRASettings, with_finetuning
from .init_from import holds_trainable_only, restore_run_model
from .loss import bits_per_byte, evaluate_loss


# sampling for the end-of-run printout


def sample_tokens(
    model: Any,
    prompt: Sequence[int],
    num_tokens: int,
    *,
    window: int,
    temperature: float,
    key: PRNGKeyArray,
) -> list[int]:
    """Sample by recomputing a full forward pass per token (no recurrent state, no KV cache): the
    end-of-run printout's fallback for models without a decode API; see `xlstm_eqx.generation` otherwise.

    The sequence is right-padded to a fixed `window` so one compiled forward serves every step;
    with a causal model, the logits at the last real position ignore the padding.
    """
    tokens = list(prompt) or [0]

    @eqx.filter_jit
    def next_logits(model, buf, pos):
        logits = model(buf[None, :])[0]
        return jax.lax.dynamic_index_in_dim(logits, pos, axis=0, keepdims=False)

    for i in range(num_tokens):
        ctx = tokens[-window:]
        buf = np.zeros((window,), np.int32)
        buf[: len(ctx)] = ctx
        logits = next_logits(model, jnp.asarray(buf), jnp.asarray(len(ctx) - 1, jnp.int32))
        if temperature == 0:
            nxt = int(jnp.argmax(logits))
        else:
            nxt = int(jr.categorical(jr.fold_in(key, i), logits / temperature))
        tokens.append(nxt)
    return tokens[len(prompt) :] if prompt else tokens[1:]


# evaluation of a saved run


@dataclasses.dataclass
class EvalResult:
    step: int
    eval_loss: float
    bits_per_byte: float
    unigram_bits_per_byte: float | None
    num_tokens: int
    # What was scored out of what: `num_batches` × `batch_size` windows of `seq_len` tokens out of
    # `available_tokens` (the held-out split; with `--data`, the tokens read of it).
    available_tokens: int = 0
    num_batches: int = 0
    batch_size: int = 0
    seq_len: int = 0


def load_run(
    out_dir: str, checkpoint: str | None = None, *, shardings: Any = None
) -> tuple[Any, dict[str, Any], int]:
    """`(model, run_config, step)` from a run directory's newest (or the given) checkpoint.

    The model is read onto the first local device, or straight into ``shardings`` (a tree of
    ``Sharding``s for the model, e.g. from `mesh_layout`). Runs saved in the older ``.npz`` format
    are read too (onto one device). Without ``checkpoint``, a damaged newest checkpoint is
    skipped with a warning naming it (the newest intact one is read), and one pruned by a live
    run while being read is replaced by the newest one listed then (`read_newest`); a given
    ``checkpoint`` is read as it is, or fails with one line."""
    if checkpoint:
        return _load_checkpoint(checkpoint, shardings)
    if not os.path.isdir(out_dir):
        what = "not a directory" if os.path.exists(out_dir) else "no such directory"
        raise FileNotFoundError(f"no run in {out_dir!r} ({what})")
    root = os.path.join(out_dir, "checkpoints")

    def listing() -> list[str]:
        found = [path for _, path in orbax_checkpoint.list_checkpoints(root)]
        return found or orbax_checkpoint.npz_checkpoints(root)

    loaded, _, _ = orbax_checkpoint.read_newest(
        listing, lambda path: _load_checkpoint(path, shardings), where=root
    )
    return loaded


def _load_checkpoint(path: str, shardings: Any) -> tuple[Any, dict[str, Any], int]:
    npz = os.path.isfile(os.path.join(path, "meta.json"))
    fmt = npz_checkpoint if npz else orbax_checkpoint
    meta = fmt.load_metadata(path)
    run = meta.get("metadata", {}).get("run_config")
    if not isinstance(run, dict) or run.get("model_kind") not in MODEL_FAMILIES:
        raise CheckpointError(f"checkpoint {path!r} has no usable run configuration")
    family = MODEL_FAMILIES[run["model_kind"]]
    model_config = family.config_from_dict(run["model_config"])
    build = with_finetuning(family.build, LoRASettings.from_run_config(run))
    skeleton = eqx.filter_eval_shape(build, model_config, key=jr.key(0))
    if not npz and holds_trainable_only(run):  # LoRA from --init-from: the adapter + its base
        return restore_run_model(path, run, shardings)[0], run, int(meta["step"])
    if npz:
        trees, _ = npz_checkpoint.restore_checkpoint(path, {"model": skeleton})
    else:
        sh = None if shardings is None else {"model": shardings}
        trees, _ = orbax_checkpoint.restore_checkpoint(path, {"model": skeleton}, sh)
    return trees["model"], run, int(meta["step"])


def run_tokenizer(run: dict[str, Any], spec: str | None, where: str) -> tuple[Tokenizer, bool]:
    """`(tokenizer, is_the_runs_own)`: the run's recorded tokenizer, or `spec` (`--tokenizer`).
    A file whose sha256 is the recorded one is the run's own (a tokenizer.json that moved)."""
    recorded = run.get("tokenizer")
    if spec is None:
        if not isinstance(recorded, dict):
            raise ValueError(f"{where} records no tokenizer; pass --tokenizer FILE|bytes")
        return tokenizer_from_dict(recorded), True
    tok = load_tokenizer(spec)
    if not isinstance(recorded, dict):
        return tok, False
    if recorded.get("kind") == "bytes":
        return tok, isinstance(tok, ByteTokenizer)
    if recorded.get("kind") != "tokenizers" or not isinstance(tok, HFTokenizer):
        return tok, False
    sha = recorded.get("sha256")
    if sha is None:  # converted runs record the copied file's path only
        path = recorded.get("path")
        if isinstance(path, str) and os.path.isfile(path):
            sha = HFTokenizer(path).sha256
    return tok, sha == tok.sha256


def _data_prefix(
    sources: Sequence[Source], tokenizer: Any, eod: int | None, text_field: str, need: int
) -> tuple[np.ndarray, int]:
    """The first `need` tokens of `sources` (documents joined by `eod`) and the UTF-8 bytes they
    came from, read and tokenized piece by piece: only what the scored windows need is read."""
    parts: list[np.ndarray] = []
    count = nbytes = 0
    for text, starts in iter_capped_pieces(sources, text_field=text_field):
        if not text:
            continue
        if starts and parts and eod is not None:
            parts.append(np.asarray([eod], np.int32))
            count, nbytes = count + 1, nbytes + 1
        ids = np.asarray(tokenizer.encode(text), np.int32)
        parts.append(ids)
        count, nbytes = count + len(ids), nbytes + len(text.encode("utf-8"))
        if count >= need:
            break
    if not parts:
        raise ValueError(f"--data {[s.path for s in sources]!r} contains no text")
    return np.concatenate(parts), nbytes


def evaluate_run(
    out_dir: str,
    *,
    data: Sequence[str] | None = None,
    batch_size: int | None = None,
    max_batches: int | None = None,
    checkpoint: str | None = None,
    tokenizer: str | None = None,
) -> EvalResult:
    """Held-out loss and bits per byte of a saved run: on its own held-out split (the files the
    run recorded, checked against the run's record of them), or on the start of `data` if given
    (as many windows as asked for; the unigram baseline still uses the run's training text).
    `tokenizer` (`--tokenizer`) must be the run's own (its recorded hash: a moved file) for the
    held-out split; any tokenizer the model's vocabulary covers may score `data`."""
    sources = resolve_sources(data) if data else None  # a bad --data fails before the model loads
    model, run, step = load_run(out_dir, checkpoint)
    tok, own = run_tokenizer(run, tokenizer, f"run {out_dir!r}")
    vocab = int(run["model_config"]["vocab_size"])
    tcfg = _scoring_config(run, out_dir, sources)
    bs = batch_size or tcfg.batch_size
    nb = max_batches or tcfg.eval_batches
    if not own and sources is None:
        raise ValueError(
            f"--tokenizer {tokenizer!r} is not the tokenizer run {out_dir!r} was trained with: "
            "its held-out split cannot be scored with it; pass the "
            "run's tokenizer.json (or a copy of it), or --data FILE"
        )
    if sources is not None and (not own or not isinstance(run.get("train"), dict)):
        # No unigram baseline: no training text to count (a converted model), or not in the
        # tokens of this tokenizer.
        eod = getattr(tok, "eod_id", None)  # the tokenizer's own, if it has one
        tokens, tokens_per_byte = _scoring_data(sources, tok, eod, tcfg, bs * nb, vocab)
        return _score(model, step, tokens, tokens_per_byte, tcfg.seq_len, bs, nb, None)
    corpus = _run_corpus(run, tok, tcfg, out_dir)
    flags = None
    if sources:
        tokens, tokens_per_byte = _scoring_data(sources, tok, corpus.eod_id, tcfg, bs * nb, vocab)
        target_counts = np.bincount(tokens, minlength=vocab)
    else:
        tokens, tokens_per_byte = corpus.heldout_reader, corpus.heldout_tokens_per_byte
        target_counts = corpus.heldout_counts
        flags = corpus.heldout_flags  # a fine-tuning run: its packed rows and loss mask
    unigram = unigram_bits_per_byte_from_counts(
        corpus.train_counts, target_counts, vocab, tokens_per_byte
    )
    return _score(model, step, tokens, tokens_per_byte, tcfg.seq_len, bs, nb, unigram, flags)


def _scoring_config(
    run: dict[str, Any], out_dir: str, sources: Sequence[Source] | None
) -> TrainConfig:
    """The run's `TrainConfig`; a converted model records none (no training data): the defaults,
    the window no longer than its context, and ``--data`` is needed."""
    if isinstance(run.get("train"), dict):
        return TrainConfig.from_dict(run["train"])
    if sources is None:
        how = run.get("converted_from", {}).get("format", "another format")
        raise ValueError(
            f"run {out_dir!r} records no training data (converted from {how}); pass --data FILE"
        )
    ctx = run["model_config"].get("context_length")
    tcfg = TrainConfig()
    if isinstance(ctx, int) and ctx > 0:
        tcfg = dataclasses.replace(tcfg, seq_len=min(tcfg.seq_len, ctx))
    return tcfg


def _run_corpus(run: dict[str, Any], tok: Tokenizer, tcfg: TrainConfig, out_dir: str) -> Any:
    """The corpus the run trained on, checked against the run's record of it."""
    record = run.get("data") or {}
    # Runs made before the absolute paths were recorded: as typed, from this directory.
    cache = tcfg.data_cache or None
    store = record.get("store")
    if isinstance(store, str) and os.path.isabs(store):
        cache = os.path.dirname(store)
    return load_corpus(
        record.get("paths", tcfg.data),
        tok,
        text_field=tcfg.text_field,
        eval_fraction=tcfg.eval_fraction,
        max_bytes=tcfg.max_data_bytes,
        split=tcfg.data_split,
        eod_token=tcfg.eod_token,
        cache_dir=cache,
        expected=record.get("identity"),
        where=f"run {out_dir!r}",
        packed_row=tcfg.seq_len + 1 if tcfg.data_format == "sft" else None,
    )


def _scoring_data(
    sources: Sequence[Source],
    tokenizer: Tokenizer,
    eod: int | None,
    tcfg: TrainConfig,
    windows: int,
    vocab: int,
) -> tuple[np.ndarray, float]:
    """The tokens of the start of `sources` that `windows` windows score, and their tokens per
    UTF-8 byte; ids outside the model's vocabulary are an error."""
    tokens, nbytes = _data_prefix(
        sources, tokenizer, eod, tcfg.text_field, windows * tcfg.seq_len + 1
    )
    check_token_ids(tokens, vocab, what="evaluation data")
    return tokens, len(tokens) / max(1, nbytes)


def _score(
    model: Any,
    step: int,
    tokens: Any,
    tokens_per_byte: float,
    seq_len: int,
    batch_size: int,
    max_batches: int,
    unigram: float | None,
    flags: TokenFile | None = None,
) -> EvalResult:
    """Loss and bits per byte of `model` on up to `max_batches` batches of windows of `tokens`."""
    batches = eval_windows(
        tokens, seq_len=seq_len, batch_size=batch_size, max_batches=max_batches, flags=flags
    )
    loss = evaluate_loss(model, batches)
    return EvalResult(
        step=step,
        eval_loss=loss,
        bits_per_byte=bits_per_byte(loss, tokens_per_byte),
        unigram_bits_per_byte=unigram,
        num_tokens=int(sum(batch_tokens(b)[:, 1:].size for b in batches)),
        available_tokens=int(len(tokens)),
        num_batches=len(batches),
        batch_size=int(batch_tokens(batches[0]).shape[0]),
        seq_len=int(seq_len),
    )
