"""Corpus tokenization speed: lmforge's `tokenize_corpus` vs Hugging Face `tokenizers` by hand.

A synthetic corpus (random words with Zipf-like frequencies, in sentences and paragraphs of
varied length, split over a few `.txt` files with blank lines between documents) is written to a
temporary folder and a byte-level BPE tokenizer is trained on it. Then the corpus is tokenized
into token files by `tokenize_corpus` with 1 and 2 worker processes, and by the reference a user
would otherwise write: read the documents, `Tokenizer.encode_batch` them in batches in this one
process (the library's own thread pool uses every core), append EOS and write one token file.
The table also shows `encode_batch_fast` (no character offsets), which the RESULT lines do not use.
All times include reading and writing. Prints a table, then one `RESULT` line per worker count.
"""

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from lmforge.data.corpus import CorpusInfo, token_dtype, tokenize_corpus
from lmforge.io import chunks, iter_texts
from lmforge.tokenizer import Tokenizer, train_tokenizer


def make_documents(megabytes: float, seed: int) -> list[str]:
    """About `megabytes` of synthetic documents: random words with Zipf-like frequencies, in sentences
    and paragraphs of varied length, some with numbers."""
    rng = random.Random(seed)
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    weights = [13, 9, 8, 8, 7, 7, 6, 6, 6, 4, 4, 3, 3, 2, 2, 2, 2, 2, 2, 1, 1, 1, 1, 1, 1, 1]
    words = ["".join(rng.choices(letters, weights, k=rng.randint(1, 11))) for _ in range(30000)]
    cumulative = np.cumsum(1 / np.arange(1, len(words) + 1)).tolist()  # Zipf's law
    docs, size = [], 0
    while size < megabytes * 1e6:
        sentences = []
        for _ in range(max(1, int(rng.lognormvariate(2.0, 1.0)))):
            sentence = rng.choices(words, cum_weights=cumulative, k=rng.randint(4, 25))
            if rng.random() < 0.2:
                sentence.insert(rng.randrange(len(sentence)), str(rng.randint(0, 10**rng.randint(1, 6))))
            sentences.append(" ".join(sentence).capitalize() + rng.choice(".....?!;"))
        docs.append(" ".join(sentences) if rng.random() < 0.7 else "\n".join(sentences))
        size += len(docs[-1]) + 2
    return docs


def make_corpus(root: Path, megabytes: float, files: int, seed: int, pool_megabytes: float = 50.0) -> list[Path]:
    """Write about `megabytes` of documents into `files` text files under `root`, blank lines between
    documents. Beyond `pool_megabytes` the documents are drawn again, in random order, from a pool of
    that size (a large corpus is written in seconds, and tokenizes as fast as fresh text would)."""
    pool = make_documents(min(megabytes, pool_megabytes), seed)
    rng = random.Random(seed)
    budget = int(megabytes * 1e6 / files)
    paths = []
    for f in range(files):
        path = root / f"part{f}.txt"
        with path.open("w", encoding="utf-8") as out:
            size, first = 0, f * len(pool) // files
            while size < budget:
                order = range(first, len(pool)) if first else rng.sample(range(len(pool)), len(pool))
                first = 0
                for i in order:
                    out.write(pool[i] + "\n\n")
                    size += len(pool[i]) + 2
                    if size >= budget:
                        break
        paths.append(path)
    return paths


def reference(files: list[Path], tokenizer_dir: Path, out: Path, batch_docs: int, method: str) -> np.ndarray:
    """What a user would write with `tokenizers` alone: `method` ("encode_batch" or "encode_batch_fast",
    which skips character offsets) over batches of documents as they are read, EOS after each document,
    tokens appended to one file. Returns the token counts per id (to compare with lmforge's files)."""
    tokenizer = Tokenizer.from_dir(tokenizer_dir)
    encode, eos, dtype = getattr(tokenizer.backend, method), tokenizer.eos_id, token_dtype(tokenizer.vocab_size)
    counts = np.zeros(tokenizer.vocab_size, dtype=np.int64)
    with out.open("wb") as f:
        for batch in chunks(iter_texts(files), batch_docs * 600):  # ~600 characters a document
            ids = [encoding.ids + [eos] for encoding in encode(batch, add_special_tokens=False)]
            tokens = np.fromiter((t for x in ids for t in x), dtype=dtype, count=sum(map(len, ids)))
            counts += np.bincount(tokens, minlength=tokenizer.vocab_size)
            f.write(tokens.tobytes())
    return counts


def best_time(fn, repeats: int) -> tuple[float, object]:
    """Best wall time of `repeats` calls, and the last call's result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def peak_rss(command: list[str]) -> tuple[float, float]:
    """Run `command` in a fresh process; its wall time and the peak resident memory (MB) of the largest
    process it started (itself or a worker)."""
    probe = ("import json, resource, subprocess, sys, time; t = time.perf_counter(); "
             "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
             "print(json.dumps([time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss]))")
    out = subprocess.run([sys.executable, "-c", probe, *command], check=True, capture_output=True, text=True)
    seconds, kilobytes = json.loads(out.stdout.strip().splitlines()[-1])
    return seconds, kilobytes / 1024


def memory_rows(root: Path, files: list[Path], steps: list[int]) -> list[tuple[str, float, float]]:
    """Peak memory of `tokenize_corpus` over the whole corpus, and of streamed pretraining (a micro model)
    for each number of `steps`: flat memory means the same peak whatever the corpus size or the steps."""
    tokenize = ("from lmforge.data.corpus import tokenize_corpus; import sys; "
                "tokenize_corpus(sys.argv[1:-2], sys.argv[-2], sys.argv[-1], workers=2, show_progress=False)")
    rows = [("tokenize_corpus, 2 workers", *peak_rss([sys.executable, "-c", tokenize, *map(str, files),
                                                       str(root / "tok"), str(root / "memory-tokens")]))]
    config = Path(__file__).resolve().parents[1] / "configs" / "pretrain-tiny.yaml"
    for n in steps:
        command = [sys.executable, "-m", "lmforge.cli", "pretrain", "--config", str(config), f"out_dir={root}/run-{n}",
                   f"data.paths=[{root / 'corpus'}]", f"data.tokenizer={root / 'tok'}", "data.streaming=true",
                   "model.preset=micro", "model.overrides={}", f"train.steps={n}", "train.warmup_steps=1",
                   f"train.eval_every={n}", f"train.save_every={n}", "train.log_every=10", "data.seq_len=128"]
        rows.append((f"pretrain, streamed, {n} steps (micro model)", *peak_rss(command)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megabytes", type=float, default=20.0, help="size of the synthetic corpus in MB of text")
    parser.add_argument("--files", type=int, default=4, help="number of .txt files the corpus is split into")
    parser.add_argument("--vocab-size", type=int, default=8192, help="vocabulary size of the trained BPE tokenizer")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2],
                        help="worker process counts to measure tokenize_corpus with")
    parser.add_argument("--batch-docs", type=int, default=1024,
                        help="documents per encode_batch call in the references")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per case (the best is kept)")
    parser.add_argument("--memory-steps", type=int, nargs="*", default=[20, 80],
                        help="also measure peak memory: of tokenize_corpus, and of streamed pretraining for "
                             "these numbers of steps (none: skip)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic corpus")
    parser.add_argument("--dir", type=Path, default=None,
                        help="where to write the corpus (default a temporary folder; a large one needs the disk)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        (root / "corpus").mkdir()
        start = time.perf_counter()
        files = make_corpus(root / "corpus", args.megabytes, args.files, args.seed)
        megabytes = sum(f.stat().st_size for f in files) / 1e6
        print(f"corpus: {megabytes:.1f} MB in {len(files)} files ({time.perf_counter() - start:.1f} s to write)")
        start = time.perf_counter()
        train_tokenizer(files[0], args.vocab_size, root / "tok", show_progress=False)
        print(f"tokenizer: vocab {args.vocab_size} trained on {files[0].name} in {time.perf_counter() - start:.1f} s\n")

        rows = []
        for method in ("encode_batch", "encode_batch_fast"):  # the first is the reference of the RESULT lines
            seconds, counts = best_time(
                lambda: reference(files, root / "tok", root / "reference.bin", args.batch_docs, method), args.repeats)
            rows.append((f"tokenizers {method} ({os.cpu_count()} threads)", "-", seconds))
        ref_seconds, ref_counts = rows[0][2], counts
        results = []
        for workers in args.workers:
            out = root / f"w{workers}"
            seconds, info = best_time(lambda: tokenize_corpus(files, root / "tok", out, workers=workers,
                                                              show_progress=False), args.repeats)
            assert isinstance(info, CorpusInfo)
            mine = sum(np.bincount(np.fromfile(out / f"{s}.bin", dtype=info.dtype), minlength=len(ref_counts))
                       for s in ("train", "val"))
            if not np.array_equal(mine, ref_counts):
                raise SystemExit(f"workers={workers}: tokens differ from the reference's")
            rows.append(("lmforge tokenize_corpus", str(workers), seconds))
            results.append((workers, seconds))
            shutil.rmtree(out)
        (root / "reference.bin").unlink()
        memory = memory_rows(root, files, args.memory_steps) if args.memory_steps else []

    n = int(ref_counts.sum())
    print(f"{n:,} tokens ({megabytes / n * 1e6:.2f} bytes/token)")
    print(f"{'implementation':<40} {'workers':>7} {'seconds':>8} {'tok/s':>12} {'MB/s':>7}")
    for name, workers, seconds in rows:
        print(f"{name:<40} {workers:>7} {seconds:>8.2f} {n / seconds:>12,.0f} {megabytes / seconds:>7.2f}")
    if memory:
        print(f"\n{'peak memory of the largest process':<48} {'seconds':>8} {'peak RSS MB':>12}")
        for name, seconds, rss in memory:
            print(f"{name:<48} {seconds:>8.1f} {rss:>12,.0f}")
    print()
    for workers, seconds in results:
        ours, ref = n / seconds, n / ref_seconds
        print(f"RESULT tokenize_w{workers} lmforge={ours:.1f} reference={ref:.1f} unit=tok/s ratio={ours / ref:.2f}")


if __name__ == "__main__":
    main()
