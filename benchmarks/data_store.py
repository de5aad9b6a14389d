"""Peak memory and time of loading a corpus and training 20 steps: the token store against the
loader of an older checkout (which reads every file into one string and tokenizes it at once).

    python benchmarks/data_store.py [--work /tmp/xlstm_data_bench] [--bytes-corpus-mib 1024]
        [--bpe-corpus-mib 50] [--legacy-src DIR] [--rss-cap-gib 12]

Two corpora are generated under `--work` (word salad with a Zipf vocabulary, so BPE has work to
do): `text/*.txt` (`--bytes-corpus-mib`, 4 MiB files, each a document) for the byte tokenizer, and
`docs.jsonl` (`--bpe-corpus-mib`, ~16 KiB documents) with a byte-level BPE `tokenizer.json`
(8192 tokens, `<|endoftext|>`) trained here on its first 8 MiB.

Each measurement is a fresh `python` process (`_child`) that loads the corpus (`load_corpus`:
for the store, a build into an empty cache, then a reuse) and runs `train()` for 20 steps of the
tiny xLSTM (seq_len 64, batch 16); it reports its own peak RSS (`ru_maxrss`, which counts the
pages of the memory-mapped token files it touched). `--legacy-src DIR` is a source tree of the
old loader (e.g. `git archive 9cb6c09 | tar -x -C DIR`): measured the same way, killed by the
parent if its RSS passes `--rss-cap-gib` (reported as "> cap").
"""

import argparse
import glob
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time


HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


# corpora


def _words(rng, n: int) -> list[bytes]:
    letters = list(b"abcdefghijklmnopqrstuvwxyz")
    out = []
    for _ in range(n):
        k = int(rng.integers(1, 10))
        out.append(bytes(rng.choice(letters, size=k).tolist()))
    return out


def _salad(rng, vocab: list[bytes], probs, nbytes: int) -> bytes:
    """About `nbytes` of lines of Zipf-distributed words."""
    import numpy as np

    chunks, size = [], 0
    while size < nbytes:
        idx = rng.choice(len(vocab), size=4096, p=probs)
        words = [vocab[i] for i in idx]
        lines = [b" ".join(words[j : j + 12]) for j in range(0, len(words), 12)]
        block = b"\n".join(lines) + b"\n"
        chunks.append(block)
        size += len(block)
    del np
    return b"".join(chunks)[:nbytes]


def make_corpora(work: str, bytes_mib: int, bpe_mib: int) -> dict[str, str]:
    import numpy as np

    rng = np.random.default_rng(0)
    vocab = _words(rng, 20000)
    ranks = np.arange(1, len(vocab) + 1, dtype=np.float64)
    probs = (1.0 / ranks) / (1.0 / ranks).sum()
    text_dir = os.path.join(work, "text")
    done = os.path.join(text_dir, ".complete")
    if not os.path.exists(done) or open(done).read() != str(bytes_mib):
        shutil.rmtree(text_dir, ignore_errors=True)
        os.makedirs(text_dir)
        per_file = 4 << 20
        block = _salad(rng, vocab, probs, 16 << 20)  # reused with rotations: generation is slow
        for i in range((bytes_mib << 20) // per_file):
            off = (i * 7919 * 4096) % (len(block) - per_file)
            with open(os.path.join(text_dir, f"part_{i:05d}.txt"), "wb") as f:
                f.write(b"file %d\n" % i + block[off : off + per_file - 16])
        with open(done, "w") as f:
            f.write(str(bytes_mib))
    jsonl = os.path.join(work, "docs.jsonl")
    tok_path = os.path.join(work, "tokenizer.json")
    if not os.path.exists(jsonl) or os.path.getsize(jsonl) < (bpe_mib << 20) * 0.9:
        text = _salad(rng, vocab, probs, bpe_mib << 20).decode()
        with open(jsonl, "w") as f:
            for i in range(0, len(text), 16384):
                f.write(json.dumps({"text": text[i : i + 16384], "id": i}) + "\n")
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=8192,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            special_tokens=["<|endoftext|>"],
            show_progress=False,
        )
        sample = text[: 8 << 20]
        tok.train_from_iterator(
            [sample[i : i + 65536] for i in range(0, len(sample), 65536)], trainer
        )
        tok.save(tok_path)
    return {"text": os.path.join(text_dir, "*.txt"), "jsonl": jsonl, "tokenizer": tok_path}


# one measurement (a fresh process)


def child(args: argparse.Namespace) -> None:
    from xlstm_eqx.data import load_corpus, load_tokenizer
    from xlstm_eqx.training import TrainConfig, train

    tokenizer = load_tokenizer(args.tokenizer)
    t0 = time.perf_counter()
    corpus = load_corpus([args.data], tokenizer, text_field="text")
    load_s = time.perf_counter() - t0
    tokens = len(corpus.train) + len(corpus.heldout)
    del corpus
    cfg = TrainConfig(
        model="xlstm",
        preset="tiny",
        data=[args.data],
        tokenizer=args.tokenizer,
        seq_len=64,
        batch_size=16,
        steps=20,
        warmup_steps=2,
        log_every=10,
        eval_every=20,
        eval_batches=1,
        checkpoint_every=1000,
        progress=False,
        sample_tokens=0,
        out=args.out,
    )
    t1 = time.perf_counter()
    train(cfg, log=lambda _: None)
    train_s = time.perf_counter() - t1
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        "RESULT "
        + json.dumps(
            {"load_s": load_s, "train_s": train_s, "peak_rss_kib": peak_kib, "tokens": tokens}
        ),
        flush=True,
    )


def _rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def measure(src: str, data: str, tokenizer: str, cache: str, out: str, cap_gib: float) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    env["XLSTM_EQX_DATA_CACHE_DIR"] = cache
    env["JAX_PLATFORMS"] = "cpu"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, os.path.abspath(__file__), "_child", "--data", data]
    cmd += ["--tokenizer", tokenizer, "--out", out]
    proc = subprocess.Popen(
        cmd, env=env, cwd=src, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    peak = [0]
    killed = [False]

    def watch() -> None:
        while proc.poll() is None:
            rss = _rss_kib(proc.pid)
            peak[0] = max(peak[0], rss)
            if rss > cap_gib * (1 << 20):
                killed[0] = True
                proc.kill()
            time.sleep(0.1)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    t0 = time.perf_counter()
    stdout, stderr = proc.communicate()
    t.join()
    wall = time.perf_counter() - t0
    if killed[0]:
        return {"killed": True, "peak_rss_kib": peak[0], "wall_s": wall}
    lines = [x for x in stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"measurement failed ({proc.returncode}):\n{stderr[-3000:]}")
    r = json.loads(lines[-1][len("RESULT ") :])
    r["wall_s"] = wall
    return r


def _fmt(r: dict, cap: float) -> str:
    gib = r["peak_rss_kib"] / (1 << 20)
    if r.get("killed"):
        return f"peak RSS > {cap:.1f} GiB (killed after {r['wall_s']:.0f} s)"
    return (
        f"peak RSS {gib:5.2f} GiB, load {r['load_s']:8.2f} s, 20 steps {r['train_s']:6.1f} s, "
        f"{r['tokens']:,} tokens"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd")
    c = sub.add_parser("_child")
    c.add_argument("--data", required=True)
    c.add_argument("--tokenizer", required=True)
    c.add_argument("--out", required=True)
    parser.add_argument("--work", default="/tmp/xlstm_data_bench")
    parser.add_argument("--bytes-corpus-mib", type=int, default=1024)
    parser.add_argument("--bpe-corpus-mib", type=int, default=50)
    parser.add_argument("--legacy-src", default="", help="source tree of the old loader")
    parser.add_argument("--rss-cap-gib", type=float, default=12.0)
    parser.add_argument("--only", choices=["bytes", "bpe"], default=None)
    parser.add_argument("--skip-store", action="store_true", help="measure the legacy loader only")
    parser.add_argument(
        "--baseline",
        action="store_true",
        help="also the same 20 steps on a 1 MiB corpus: what the process needs besides the data",
    )
    args = parser.parse_args()
    if args.cmd == "_child":
        child(args)
        return

    os.makedirs(args.work, exist_ok=True)
    t0 = time.perf_counter()
    corpora = make_corpora(args.work, args.bytes_corpus_mib, args.bpe_corpus_mib)
    print(f"corpora ready in {time.perf_counter() - t0:.0f} s under {args.work}")
    cases = [
        ("bytes", f"{args.bytes_corpus_mib} MiB text, byte tokenizer", corpora["text"], "bytes"),
        (
            "bpe",
            f"{args.bpe_corpus_mib} MiB JSONL, BPE tokenizer.json",
            corpora["jsonl"],
            corpora["tokenizer"],
        ),
    ]
    for name, title, data, tok in cases:
        if args.only and name != args.only:
            continue
        print(f"\n{title}")
        cache = os.path.join(args.work, f"cache_{name}")
        out = os.path.join(args.work, f"run_{name}")
        if args.baseline:
            small = os.path.join(args.work, f"small_{name}" + os.path.splitext(data)[1])
            with open(glob.glob(data)[0], "rb") as f, open(small, "wb") as g:
                g.write(f.read(1 << 20).rsplit(b"\n", 1)[0] + b"\n")
            base = measure(ROOT, small, tok, cache + "_small", out, args.rss_cap_gib)
            print(f"  baseline, 1 MiB of it:     {_fmt(base, args.rss_cap_gib)}")
        if args.skip_store:
            if args.legacy_src:
                legacy = measure(args.legacy_src, data, tok, cache, out, args.rss_cap_gib)
                print(f"  legacy loader:             {_fmt(legacy, args.rss_cap_gib)}")
            continue
        shutil.rmtree(cache, ignore_errors=True)
        first = measure(ROOT, data, tok, cache, out, args.rss_cap_gib)
        print(f"  store, first run (build):  {_fmt(first, args.rss_cap_gib)}")
        second = measure(ROOT, data, tok, cache, out, args.rss_cap_gib)
        print(f"  store, second run (reuse): {_fmt(second, args.rss_cap_gib)}")
        with open(os.path.join(cache, os.listdir(cache)[0], "index.json")) as f:
            index = json.load(f)
        print(
            f"  store build time (index): {index['build_seconds']:.1f} s, "
            f"{index['num_documents']:,} documents, split by {index['split']}"
        )
        if args.legacy_src:
            legacy = measure(args.legacy_src, data, tok, cache, out, args.rss_cap_gib)
            print(f"  legacy loader:             {_fmt(legacy, args.rss_cap_gib)}")


if __name__ == "__main__":
    main()
