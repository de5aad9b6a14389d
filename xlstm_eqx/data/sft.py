"""Supervised fine-tuning examples: JSONL records checked, rendered and tokenized with a loss mask.

A record is a JSON object on one line with either
- `prompt` (a string, may be empty) and `completion` (a non-empty string): the loss is on the
  completion and the end-of-document token after it (so the model learns to stop), or
- `messages`: a chat, a non-empty list of `{"role": str, "content": str}` with at least one
  non-empty `assistant` turn, rendered with the tokenizer's chat template (Jinja2, as
  transformers renders it: `tokenizer_config.json`'s `chat_template`, or `chat_template.jinja`,
  beside the `tokenizer.json`); the loss is on the assistant turns as the template writes them
  (their end-of-turn text included).

Each bad record is an error naming the file, the line and the field, raised while the store is
built, before any training step.
"""

import json
import os
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple, cast

import numpy as np

from .sources import iter_jsonl
from .tokenizer import Tokenizer


class SFTRecordError(ValueError):
    """A JSONL record that is not a usable fine-tuning example (the message names file and line)."""


class SFTExample(NamedTuple):
    """One checked record: `segments` are `(text, is_target)` pairs in order (rendered already
    for chats); `where` is its `file:line`, for messages about it."""

    where: str
    segments: tuple[tuple[str, bool], ...]
    add_eod: bool  # prompt/completion: an end-of-document token closes the completion


def _fail(path: str, line: int, message: str) -> SFTRecordError:
    return SFTRecordError(f"{path}:{line}: {message}")


def _check_string(path: str, line: int, record: dict[str, Any], name: str) -> str:
    if name not in record:
        raise _fail(
            path,
            line,
            f"missing field {name!r} (a record has 'prompt' and 'completion', or 'messages')",
        )
    value = record[name]
    if not isinstance(value, str):
        raise _fail(path, line, f"field {name!r} must be a string, got {type(value).__name__}")
    return value


def _check_messages(path: str, line: int, messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise _fail(path, line, "field 'messages' must be a non-empty list of {role, content}")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _fail(path, line, f"field {where!r} must be an object, got {type(m).__name__}")
        for key in ("role", "content"):
            if not isinstance(m.get(key), str):
                got = type(m[key]).__name__ if key in m else "nothing"
                raise _fail(path, line, f"field '{where}.{key}' must be a string, got {got}")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" and m["content"] for m in out):
        raise _fail(path, line, "field 'messages' has no non-empty 'assistant' turn to train on")
    return out


def iter_records(path: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """`(line number, object)` for every non-blank line of a JSONL file (1-based lines), read by
    `iter_jsonl` (so FIFOs, devices, bad UTF-8 and too-deep JSON are errors naming the file)."""
    for number, record in iter_jsonl(path, SFTRecordError):
        if not isinstance(record, dict):
            raise _fail(
                path, number, f"a record must be a JSON object, got {type(record).__name__}"
            )
        yield number, cast(dict[str, Any], record)


def read_examples(
    paths: Sequence[str], template: "ChatTemplate | None", max_bytes: int | None = None
) -> Iterator[SFTExample]:
    """Every example of the JSONL files, checked (and chats rendered) in file and line order;
    with `max_bytes` (`--max-data-bytes`), only the whole examples whose text (UTF-8 bytes of
    their segments, as rendered) fits in it together: reading stops at the first one that would
    cross it (the lines after it are neither read nor checked)."""
    total = 0
    for example in _all_examples(paths, template):
        if max_bytes is not None:
            total += sum(len(text.encode("utf-8")) for text, _ in example.segments)
            if total > max_bytes:
                return
        yield example


def _all_examples(paths: Sequence[str], template: "ChatTemplate | None") -> Iterator[SFTExample]:
    for path in paths:
        for line, record in iter_records(path):
            where = f"{path}:{line}"
            if "messages" in record:
                messages = _check_messages(path, line, record["messages"])
                if template is None:
                    raise _fail(
                        path,
                        line,
                        "field 'messages' needs the tokenizer's chat template, and "
                        "the tokenizer has none (no 'chat_template' in a tokenizer_config.json "
                        "beside its tokenizer.json); use prompt/completion records or --tokenizer "
                        "a tokenizer with a chat template",
                    )
                yield SFTExample(where, template.segments(messages, where), False)
                continue
            prompt = _check_string(path, line, record, "prompt")
            completion = _check_string(path, line, record, "completion")
            if not completion:
                raise _fail(path, line, "field 'completion' is empty: nothing to train on")
            yield SFTExample(where, ((prompt, False), (completion, True)), True)


class ChatTemplate:
    """A chat template rendered with Jinja2 the way transformers does (a sandboxed environment,
    `trim_blocks`, `lstrip_blocks`, `raise_exception`, the special tokens as variables)."""

    def __init__(self, source: str, special_tokens: dict[str, str] | None = None):
        try:
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError as e:
            raise ImportError(
                "chat templates need the package `jinja2` (pip install 'xlstm-eqx[train]')"
            ) from e

        def raise_exception(message: str) -> None:
            raise ValueError(f"chat template: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        self.source = source
        self.special_tokens = dict(special_tokens or {})
        self._template = env.from_string(source)

    def render(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool) -> str:
        return self._template.render(
            messages=list(messages),
            add_generation_prompt=add_generation_prompt,
            **self.special_tokens,
        )

    def segments(
        self, messages: Sequence[dict[str, str]], where: str
    ) -> tuple[tuple[str, bool], ...]:
        """The rendered chat cut into `(text, is_assistant)` pieces: an assistant turn is what
        rendering it adds after the prompt for it (`add_generation_prompt=True`)."""
        out: list[tuple[str, bool]] = []
        done = ""
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self.render(messages[:i], True)
            upto = self.render(messages[: i + 1], False)
            if not before.startswith(done) or not upto.startswith(before):
                raise ValueError(
                    f"{where}: the chat template does not render the conversation turn by turn "
                    f"(the text before message {i} is not a prefix of the text with it), so the "
                    "assistant turns cannot be told apart"
                )
            out += [(before[len(done) :], False), (upto[len(before) :], True)]
            done = upto
        whole = self.render(messages, False)
        if not whole.startswith(done):
            raise ValueError(f"{where}: the chat template renders the whole chat differently")
        out.append((whole[len(done) :], False))
        return tuple((text, target) for text, target in out if text)


def _token_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def load_chat_template(tokenizer: Tokenizer) -> ChatTemplate | None:
    """The chat template beside a `tokenizer.json` (`chat_template` of `tokenizer_config.json`, a
    string or transformers' list of named templates, whose `default` is used; else
    `chat_template.jinja`), or None."""
    path = tokenizer.to_dict().get("path")
    if not isinstance(path, str):
        return None
    folder = os.path.dirname(path)
    config_path = os.path.join(folder, "tokenizer_config.json")
    config: dict[str, Any] = {}
    if os.path.isfile(config_path):
        with open(config_path, encoding="utf-8") as f:
            try:
                config = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{config_path}: not valid JSON ({e.msg})") from None
    source = config.get("chat_template")
    if isinstance(source, list):
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        source = named.get("default")
    jinja_path = os.path.join(folder, "chat_template.jinja")
    if source is None and os.path.isfile(jinja_path):
        with open(jinja_path, encoding="utf-8") as f:
            source = f.read()
    if source is None:
        return None
    if not isinstance(source, str):
        raise ValueError(f"{config_path}: 'chat_template' must be a string")
    special = {
        name: text
        for name in ("bos_token", "eos_token", "pad_token", "unk_token")
        if (text := _token_text(config.get(name))) is not None
    }
    return ChatTemplate(source, special)


def tokenize_example(
    tokenizer: Tokenizer, example: SFTExample, eod: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """`(ids, targets)` of one example, int32 and bool: each segment encoded on its own, so a
    target span starts and ends at a token boundary; the end-of-document token after a completion
    is a target. The first token is never a target (nothing in the example precedes it)."""
    ids: list[np.ndarray] = []
    targets: list[np.ndarray] = []
    for text, is_target in example.segments:
        enc = np.asarray(tokenizer.encode(text), np.int32)
        ids.append(enc)
        targets.append(np.full(len(enc), is_target))
    if example.add_eod and eod is not None:
        ids.append(np.asarray([eod], np.int32))
        targets.append(np.ones(1, bool))
    all_ids = np.concatenate(ids) if ids else np.zeros(0, np.int32)
    all_targets = np.concatenate(targets) if targets else np.zeros(0, bool)
    if len(all_targets):
        all_targets[0] = False
    return all_ids, all_targets
