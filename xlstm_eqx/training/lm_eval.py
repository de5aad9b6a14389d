"""Downstream evaluation with the lm-eval harness (`lm-eval`, an optional extra): an `LM` adapter
over a model and its tokenizer, and `run_lm_eval`, what `xlstm-eqx eval --tasks` runs.

Scoring (`loglikelihood`, `loglikelihood_rolling`): the text is tokenized as a whole and split
where the context ends (trailing spaces of the context go to the continuation), the
end-of-document token is put in front (the state a document starts from in training), and every
continuation token is scored exactly once, from the model's logits, in windows of at most
`max_length` (the model's `context_length`) tokens: the continuation is cut, from its end, into
groups of at most `max_length` tokens, and each group is predicted from the `max_length` tokens
before its last one (a context longer than the window is cut from the left). Windows are right-
padded to a power-of-two length and batched, so a causal model computes exactly the logits of the
unpadded window, with a handful of compiled shapes.

Generation (`generate_until`): greedy, through the library's `stream_generate` (recurrent state or
KV cache; a full-forward loop for models without either), stopping at the first of the request's
`until` strings (cut off) or after `max_gen_toks` tokens; the prompt keeps its last
`max_length - max_gen_toks` tokens.

During training (`--lm-eval-tasks`, `TrainingLMEval` run by `hooks.LMEvalHook`): the same adapter
over the step's model; the task index is built once, when the run starts (`check_lm_eval_tasks`).
"""

import datetime
import functools
import json
import os
from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

from ..core.files import write_atomic
from ..data.tokenizer import Tokenizer, resolve_eod_id
from ..generation import stream_generate
from .config import TrainConfig
from .evaluate import has_decode_api, sample_tokens


def import_lm_eval(flag: str = "--tasks") -> Any:
    """The `lm_eval` package, or an ImportError saying that `flag` needs it and how to get it."""
    try:
        import lm_eval
        import lm_eval.api.model
    except ImportError as e:
        raise ImportError(
            f"{flag} needs the optional package `lm-eval` (pip install 'xlstm_eqx[eval]')"
        ) from e
    return lm_eval


def score_windows(
    tokens: Sequence[int], first: int, max_length: int
) -> list[tuple[list[int], int]]:
    """The windows that score tokens `first…` of `tokens`, each token once: `(window, k)` where
    the model reads `window[:-1]` and the last `k` targets `window[-k:]` are scored."""
    if first < 1:
        raise ValueError("the first token has nothing before it to be predicted from")
    out = []
    end = len(tokens)
    while end > first:
        k = min(max_length, end - first)
        start = max(0, end - 1 - max_length)
        out.append((list(tokens[start:end]), k))
        end -= k
    return out[::-1]


def _bucket(n: int, max_length: int) -> int:
    size = 16
    while size < n:
        size *= 2
    return min(size, max(max_length, n))


@eqx.filter_jit
def _window_logprobs(model: Any, inputs: jax.Array, targets: jax.Array) -> tuple[Any, Any]:
    logits = model(inputs).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    greedy = jnp.argmax(logits, axis=-1) == targets
    return picked, greedy


class LMEvalAdapter:
    """The methods of lm-eval's `LM` over `model` (any causal LM of this library: tokens `(B, S)`
    → logits `(B, S, V)`) and `tokenizer`. `as_lm()` returns the `lm_eval.api.model.LM` instance
    (a subclass made when lm-eval is imported)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Tokenizer,
        *,
        max_length: int,
        batch_size: int = 8,
        eod_token: str = "",
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.batch_size = int(batch_size)
        self.prefix_id = resolve_eod_id(tokenizer, eod_token)
        if self.prefix_id is None:
            raise ValueError("scoring needs an end-of-document token to start from; not 'none'")

    # tokens

    def _encode(self, text: str) -> list[int]:
        return [int(t) for t in self.tokenizer.encode(text)] if text else []

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Context and continuation tokens: the whole text tokenized once, split where the
        context's own tokens end."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self._encode(context + continuation)
        ctx = self._encode(context)
        return whole[: len(ctx)], whole[len(ctx) :]

    # scoring

    def score(self, items: Sequence[tuple[list[int], int]]) -> list[tuple[float, bool]]:
        """`(log-probability, all greedy)` of the last `n` tokens of each token list (whose other
        tokens are the context), in batched windows."""
        jobs = []  # (item, window, k)
        for i, (tokens, n) in enumerate(items):
            if n < 1:
                raise ValueError("nothing to score: an empty continuation")
            for window, k in score_windows(tokens, len(tokens) - n, self.max_length):
                jobs.append((i, window, k))
        total = [0.0] * len(items)
        greedy = [True] * len(items)
        order = sorted(range(len(jobs)), key=lambda j: -len(jobs[j][1]))
        for b in range(0, len(order), self.batch_size):
            chunk = [jobs[j] for j in order[b : b + self.batch_size]]
            width = _bucket(max(len(w) - 1 for _, w, _ in chunk), self.max_length)
            inputs = np.zeros((self.batch_size, width), np.int32)
            targets = np.zeros((self.batch_size, width), np.int32)
            for r, (_, w, _) in enumerate(chunk):
                inputs[r, : len(w) - 1] = w[:-1]
                targets[r, : len(w) - 1] = w[1:]
            logp, hit = _window_logprobs(self.model, jnp.asarray(inputs), jnp.asarray(targets))
            logp, hit = np.asarray(logp, np.float64), np.asarray(hit)
            for r, (i, w, k) in enumerate(chunk):
                end = len(w) - 1
                total[i] += float(logp[r, end - k : end].sum())
                greedy[i] = greedy[i] and bool(hit[r, end - k : end].all())
        return list(zip(total, greedy, strict=True))

    def loglikelihood(self, requests: Sequence[Any]) -> list[tuple[float, bool]]:
        items = []
        for req in requests:
            context, continuation = req.args
            ctx, cont = self.encode_pair(context, continuation)
            items.append(([self.prefix_id, *ctx, *cont], len(cont)))
        return self.score(items)

    def loglikelihood_rolling(self, requests: Sequence[Any]) -> list[float]:
        items = []
        for req in requests:
            tokens = self._encode(req.args[0])
            items.append(([self.prefix_id, *tokens], len(tokens)))
        return [lp for lp, _ in self.score(items)]

    # generation

    def _greedy_tokens(self, prompt: list[int], max_new: int):
        if has_decode_api(self.model):
            yield from (
                int(t[0])
                for t in stream_generate(
                    self.model, jnp.asarray(prompt, jnp.int32)[None, :], max_new, temperature=0.0
                )
            )
        else:
            yield from sample_tokens(
                self.model,
                prompt,
                max_new,
                window=self.max_length,
                temperature=0.0,
                key=jr.key(0),
            )

    def generate_until(self, requests: Sequence[Any]) -> list[str]:
        out = []
        for req in requests:
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or []
            if isinstance(until, str):
                until = [until]
            max_new = int(kwargs.get("max_gen_toks", 256))
            keep = max(1, self.max_length - max_new)
            prompt = [self.prefix_id, *self._encode(context)][-keep:]
            ids: list[int] = []
            text = ""
            for tok in self._greedy_tokens(prompt, max_new):
                ids.append(tok)
                text = self.tokenizer.decode(np.asarray(ids, np.int32))
                if any(s and s in text for s in until):
                    break
            cuts = [text.index(s) for s in until if s and s in text]
            out.append(text[: min(cuts)] if cuts else text)
        return out

    def as_lm(self) -> Any:
        lm_eval = import_lm_eval()
        adapter = self

        class XLSTMEqxLM(lm_eval.api.model.LM):
            def __init__(self) -> None:
                super().__init__()

            def loglikelihood(self, requests, disable_tqdm: bool = False):
                return adapter.loglikelihood(requests)

            def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
                return adapter.loglikelihood_rolling(requests)

            def generate_until(self, requests, disable_tqdm: bool = False):
                return adapter.generate_until(requests)

        return XLSTMEqxLM()


def run_lm_eval(
    adapter: LMEvalAdapter,
    tasks: Sequence[str],
    out_dir: str,
    *,
    include_path: str | None = None,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    name: str = "",
) -> tuple[dict[str, Any], str]:
    """lm-eval's `simple_evaluate` of `tasks` on the adapter; its results JSON is written to
    `out_dir/lm_eval/<name or results_<time>.json>`. Returns (results, path)."""
    manager = task_manager(tuple(tasks), include_path)
    results = evaluate_tasks(adapter, tasks, manager, limit=limit, num_fewshot=num_fewshot)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = os.path.join(out_dir, "lm_eval", name or f"results_{stamp}.json")
    write_results(results, path)
    return results, path


@functools.cache
def task_manager(
    tasks: tuple[str, ...],
    include_path: str | None,
    flags: tuple[str, str] = ("--tasks", "--include-path"),
) -> Any:
    """lm-eval's task index that holds every task of `tasks` (made once per arguments: indexing
    lm-eval's own tasks takes about 20 s), else an error naming the unknown one. `flags`: the
    options the errors name (the tasks', the include path's)."""
    import_lm_eval(flags[0])
    from lm_eval.tasks import TaskManager

    if include_path is not None and not os.path.isdir(include_path):
        raise FileNotFoundError(f"{flags[1]} {include_path!r} is not a directory")
    return _task_manager(TaskManager, list(tasks), include_path, flags)


def evaluate_tasks(
    adapter: LMEvalAdapter,
    tasks: Sequence[str],
    manager: Any,
    *,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
) -> dict[str, Any]:
    """lm-eval's results of `tasks` (found in `manager`) on the adapter's model."""
    lm_eval = import_lm_eval()
    results = lm_eval.simple_evaluate(
        model=adapter.as_lm(),
        tasks=list(tasks),
        limit=limit,
        num_fewshot=num_fewshot,
        task_manager=manager,
        log_samples=False,
        bootstrap_iters=0,
        torch_random_seed=None,
    )
    if results is None:
        raise RuntimeError("lm-eval returned no results")
    return results


def write_results(results: dict[str, Any], path: str) -> None:
    """lm-eval's results as JSON at `path`, written atomically (its folder made if needed)."""
    from lm_eval.utils import handle_non_serializable

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    text = json.dumps(results, indent=2, default=handle_non_serializable) + "\n"
    write_atomic(path, lambda f: f.write(text.encode("utf-8")))


def score_table(results: dict[str, Any]) -> dict[str, float]:
    """`{"lm_eval/<task>/<metric>": value}`: every numeric score of lm-eval's results (their
    standard errors and the sample counts left out), for the metrics trackers."""
    scores = {}
    for task, metrics in sorted(results.get("results", {}).items()):
        for key, value in metrics.items():
            metric = key.removesuffix(",none")
            if "_stderr" in metric or metric == "sample_len" or isinstance(value, bool):
                continue
            if isinstance(value, int | float):
                scores[f"lm_eval/{task}/{metric}"] = float(value)
    return scores


def _task_manager(
    manager_cls: Any, tasks: list[str], include_path: str | None, flags: tuple[str, str]
) -> Any:
    """lm-eval's task index holding every name of `tasks`, else a ValueError naming the first
    unknown one. Tasks that are all plain tasks of --include-path are found without indexing
    lm-eval's own few thousand (about 20 s); a YAML file there that cannot be read (lm-eval
    skips it silently) is an error naming the file, the line and why."""
    if include_path:
        own = manager_cls(include_path=include_path, include_defaults=False)
        missing = [t for t in tasks if t not in own.all_subtasks]
        if not missing:
            return own
        why = _unreadable_task_files(include_path)
        if why:
            more = f" (and {len(why) - 1} more)" if len(why) > 1 else ""
            raise ValueError(f"{flags[0]} {missing[0]!r}: {why[0]}{more}")
    manager = manager_cls(include_path=include_path) if include_path else manager_cls()
    known = set(manager.all_tasks)
    unknown = [t for t in tasks if t not in known and not os.path.isfile(t)]
    if unknown:
        where = f"lm-eval or {flags[1]} {include_path!r}" if include_path else "lm-eval"
        raise ValueError(
            f"{flags[0]}: {unknown[0]!r} is not a task, group or tag of {where} (`lm-eval ls "
            f"tasks` lists them; {flags[1]} DIR adds your own YAML tasks)"
        )
    return manager


def _unreadable_task_files(include_path: str) -> list[str]:
    """One line for each YAML file under `include_path` that lm-eval's loader cannot read."""
    try:
        from lm_eval.tasks._yaml_loader import load_yaml
    except ImportError:  # another lm-eval layout: nothing more to say
        return []
    problems = []
    for root, _, files in sorted(os.walk(include_path)):
        for name in sorted(files):
            if not name.endswith((".yaml", ".yml")):
                continue
            path = os.path.join(root, name)
            try:
                load_yaml(path, resolve_func=False)
            except Exception as e:  # lm-eval's loader raises what YAML and its checks raise
                problems.append(f"task file {path!r} cannot be read: {' '.join(str(e).split())}")
    return problems


# during training (--lm-eval-tasks)

LM_EVAL_FLAGS = ("--lm-eval-tasks", "--lm-eval-include-path")


def lm_eval_task_names(spec: str) -> tuple[str, ...]:
    """The task names of a comma-separated `--lm-eval-tasks`."""
    return tuple(t.strip() for t in spec.split(",") if t.strip())


def check_lm_eval_tasks(cfg: TrainConfig) -> None:
    """At the start of a run with `--lm-eval-tasks`: lm-eval is importable, the include path a
    directory and every task known (errors name the flags), so a run never fails at its first
    evaluation for these. The task index is kept for the run's evaluations."""
    tasks = lm_eval_task_names(cfg.lm_eval_tasks)
    if tasks:
        task_manager(tasks, cfg.lm_eval_include_path or None, LM_EVAL_FLAGS)


class TrainingLMEval:
    """`--lm-eval-tasks` at a step: ``(step, model) -> {"lm_eval/<task>/<metric>": score}``;
    lm-eval's results JSON goes to `out_dir/lm_eval/step_<step>.json` when `writer`."""

    def __init__(
        self, cfg: TrainConfig, tokenizer: Tokenizer, max_length: int, out_dir: str, writer: bool
    ):
        self.tasks = lm_eval_task_names(cfg.lm_eval_tasks)
        self.manager = task_manager(self.tasks, cfg.lm_eval_include_path or None, LM_EVAL_FLAGS)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.batch_size = cfg.batch_size
        self.eod_token = cfg.eod_token
        self.limit = cfg.lm_eval_limit
        self.out_dir = out_dir
        self.writer = writer

    def __call__(self, step: int, model: Any) -> dict[str, float]:
        adapter = LMEvalAdapter(
            model,
            self.tokenizer,
            max_length=self.max_length,
            batch_size=self.batch_size,
            eod_token=self.eod_token,
        )
        results = evaluate_tasks(adapter, self.tasks, self.manager, limit=self.limit)
        if self.writer:
            write_results(results, os.path.join(self.out_dir, "lm_eval", f"step_{step:08d}.json"))
        return score_table(results)
