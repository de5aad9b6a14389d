"""The lm-eval adapter: log-likelihoods equal a direct computation from the model's logits (also
for contexts and continuations longer than the model's window), rolling log-likelihoods, greedy
generation with stop strings, and a local multiple-choice task end to end through
`xlstm-eqx eval --tasks`."""

import dataclasses
import gc
import glob
import json
import logging
import math
import os
from types import SimpleNamespace

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from tests.corpus import TEXT
from tests.training.test_train import ToyConfig, ToyLM, quiet, toy_config
from xlstm_eqx.cli import main
from xlstm_eqx.data import ByteTokenizer
from xlstm_eqx.training import sample_tokens, train
from xlstm_eqx.training.lm_eval import LMEvalAdapter, score_windows


@eqx.filter_jit
def _forward(model, tokens):
    return model(tokens)


def _direct(model, tokens, n, L):
    """Log-probability of the last n tokens: the continuation cut from its end into groups of at
    most L tokens, each predicted by one plain forward pass over the L tokens before its end."""
    total, end, first = 0.0, len(tokens), len(tokens) - n
    while end > first:
        k = min(L, end - first)
        start = max(0, end - 1 - L)
        window = np.asarray(tokens[start:end], np.int32)
        logits = np.asarray(_forward(model, jnp.asarray(window[None, :-1]))[0], np.float64)
        m = logits.max(-1, keepdims=True)
        logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
        targets = window[1:]
        total += float(logp[np.arange(len(targets)), targets][-k:].sum())
        end -= k
    return total


def _random_text(rng, n):
    return "".join(rng.choice(list("abcde fgh.\n"), size=n))


def test_score_windows_cover_each_token_once():
    for n, first, L in [(10, 1, 4), (10, 7, 4), (3, 1, 8), (20, 2, 5)]:
        tokens = list(range(n))
        scored = []
        for window, k in score_windows(tokens, first, L):
            assert len(window) - 1 <= L and k <= len(window) - 1
            scored += window[-k:]
        assert scored == tokens[first:]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["toy", "xlstm"])
def test_loglikelihoods_equal_the_models_logits(family):
    if family == "toy":
        L, model = 8, ToyLM(ToyConfig(context_length=8), key=jr.key(0))
    else:
        from xlstm_eqx.models import MODEL_FAMILIES

        fam = MODEL_FAMILIES["xlstm"]
        config = dataclasses.replace(fam.presets()["tiny"](), vocab_size=256)
        L, model = config.context_length, fam.build(config, key=jr.key(0))
    adapter = LMEvalAdapter(model, ByteTokenizer(), max_length=L, batch_size=4)
    rng = np.random.default_rng(1)
    lengths = [(0, 1), (3, 2), (L + 5, 2), (L + 1, 2 * L + 1)]
    if family == "toy":  # (cheap: more shapes)
        lengths += [(L - 2, 3), (3 * L, 4), (2, L + 3)]
    pairs = [(_random_text(rng, a), _random_text(rng, b).strip() or "x") for a, b in lengths]
    requests = [SimpleNamespace(args=p) for p in pairs]
    got = adapter.loglikelihood(requests)
    for (ctx, cont), (lp, greedy) in zip(pairs, got, strict=True):
        c, t = adapter.encode_pair(ctx, cont)
        assert c + t == list((ctx + cont).encode())  # bytes: the split is exact
        want = _direct(model, [0, *c, *t], len(t), L)
        assert lp == pytest.approx(want, rel=1e-5, abs=1e-4), (len(ctx), len(cont))
        assert isinstance(greedy, bool)
    # rolling: every token of the text after the end-of-document token
    texts = [_random_text(rng, n) for n in ((5, L, 4 * L + 3) if family == "toy" else (2 * L,))]
    rolling = adapter.loglikelihood_rolling([SimpleNamespace(args=(t,)) for t in texts])
    for text, lp in zip(texts, rolling, strict=True):
        tokens = [0, *text.encode()]
        assert lp == pytest.approx(_direct(model, tokens, len(tokens) - 1, L), rel=1e-5, abs=1e-4)


def test_greedy_flag_and_trailing_space():
    model = ToyLM(ToyConfig(context_length=8), key=jr.key(3))
    adapter = LMEvalAdapter(model, ByteTokenizer(), max_length=8)
    ctx, cont = adapter.encode_pair("question: ", "answer")
    assert bytes(ctx) == b"question:" and bytes(cont) == b" answer"
    prompt = [0, *b"abc"]
    best = int(np.argmax(np.asarray(model(jnp.asarray([prompt]))[0, -1])))
    (lp, greedy), (_, not_greedy) = adapter.loglikelihood(
        [SimpleNamespace(args=("abc", chr(best))), SimpleNamespace(args=("abc", chr(best ^ 1)))]
    )
    assert greedy and not not_greedy and lp < 0


def test_generate_until_stops_at_the_first_stop_string():
    model = ToyLM(ToyConfig(context_length=32), key=jr.key(5))
    adapter = LMEvalAdapter(model, ByteTokenizer(), max_length=32)
    prompt = [0, *b"The "]
    ids = sample_tokens(model, prompt, 12, window=32, temperature=0.0, key=jr.key(0))
    full = bytes(ids).decode("utf-8", errors="replace")
    stop = full[5:7]
    (text,), (whole,) = (
        adapter.generate_until([SimpleNamespace(args=("The ", kw))])
        for kw in ({"until": [stop], "max_gen_toks": 12}, {"until": [], "max_gen_toks": 12})
    )
    assert text == full[: full.index(stop)]
    assert whole == full


def mc_task(tmp_path):
    """A local multiple-choice task: lm-eval's YAML over a local JSONL file."""
    docs = [
        {"question": "The quick brown", "choices": ["fox", "zebra", "liquor"], "answer": 0},
        {"question": "Pack my box with five dozen", "choices": ["jugs", "liquor"], "answer": 1},
        {"question": "How vexingly quick daft", "choices": ["dog", "zebras"], "answer": 1},
        {"question": "jumps over the lazy", "choices": ["dog", "box"], "answer": 0},
    ]
    data = tmp_path / "tasks" / "mc.jsonl"
    data.parent.mkdir()
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "tasks" / "toy_mc.yaml").write_text(
        "task: toy_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        # as the README's task: aggregation and higher_is_better given, so lm-eval warns nothing
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return str(tmp_path / "tasks"), docs


def mc_accuracy(model, docs):
    """The task's accuracy by hand: the choice with the highest log-likelihood after " "."""
    adapter = LMEvalAdapter(model, ByteTokenizer(), max_length=64)
    hits = []
    for d in docs:
        reqs = [SimpleNamespace(args=(d["question"], " " + c)) for c in d["choices"]]
        scores = [lp for lp, _ in adapter.loglikelihood(reqs)]
        hits.append(int(np.argmax(scores)) == d["answer"])
    return float(np.mean(hits))


def _orbax_task_left_to_gc(record: logging.LogRecord) -> bool:
    """asyncio's "Task exception was never retrieved" for one of orbax's reads."""
    text = record.getMessage() + (
        logging.Formatter().formatException(record.exc_info) if record.exc_info else ""
    )
    return record.name == "asyncio" and "never retrieved" in text and "orbax" in text


@pytest.mark.slow
def test_multiple_choice_task_through_the_cli(tmp_path, capsys, caplog):
    pytest.importorskip("lm_eval")
    data = tmp_path / "data.txt"
    data.write_text(TEXT)
    cfg = toy_config(tmp_path, str(data), steps=6, lr=3e-2)
    train(cfg, log=quiet)
    tasks, docs = mc_task(tmp_path)
    args = ["eval", "--out", cfg.out, "--tasks", "toy_mc", "--include-path", tasks]
    # An earlier test of the same worker that restored a damaged checkpoint can leave orbax's
    # failed read tasks to the garbage collector, which logs them on asyncio's logger whenever it
    # runs: collect them now, and leave such records out of what this command is judged by.
    gc.collect()
    with caplog.at_level(logging.WARNING):
        assert main([*args, "--limit", "4"]) == 0
    warned = [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING and not _orbax_task_left_to_gc(r)
    ]
    assert not warned, warned
    printed = capsys.readouterr().out
    assert "toy_mc" in printed and "acc" in printed
    (path,) = glob.glob(os.path.join(cfg.out, "lm_eval", "results_*.json"))
    with open(path) as f:
        results = json.load(f)
    acc = results["results"]["toy_mc"]["acc,none"]
    from xlstm_eqx.training import load_run

    assert acc == pytest.approx(mc_accuracy(load_run(cfg.out)[0], docs))
    assert math.isfinite(acc) and results["configs"]["toy_mc"]["output_type"] == "multiple_choice"
    # an unknown task directory is a one-line error
    assert main([*args[:-1], str(tmp_path / "none")]) == 2
    assert "--include-path" in capsys.readouterr().err
    # a transformers directory (its tokenizer has no end-of-document token: name one)
    hf = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "interop", "hf_small")
    hf_args = ["eval", "--hf", hf, "--out", str(tmp_path / "hf"), "--tasks", "toy_mc"]
    hf_args += ["--include-path", tasks, "--max-length", "32", "--limit", "2"]
    assert main(hf_args) == 2
    assert "--eod-token" in capsys.readouterr().err
    assert main([*hf_args, "--eod-token", "<unk>"]) == 0
    assert glob.glob(str(tmp_path / "hf" / "lm_eval" / "results_*.json"))
