"""Context store speed: indexing throughput, query latency, and approximate indexes against exact search.

Chunks are synthetic one-person facts ("Alice Nora Moreau was born in Lanford in 1987. She studied
physics at ... and works as an accountant at Iron Peak Labs; she enjoys chess."), about 40 tokens of
all-MiniLM-L6-v2 each, one chunk per document. Questions ask for one fact of one person.

- Indexing: `Store.add` of N chunks with the real encoder (embedding, SQLite, faiss, index file),
  chunks per second of wall time. Sizes above `--embed-limit` are not embedded in full: their
  throughput is estimated from the embedding rate measured on the largest fully embedded size plus
  the measured time of `Store.add` with the vectors ready (SQLite, faiss, index file), and the vectors
  of the chunks beyond the embedded ones are drawn from a Gaussian with the mean and covariance of
  the real ones (unit length), so the store has the size and the anisotropy of a real one, but not its
  clusters: IVF's recall there is lower than on real vectors (`--embed-limit 100000` embeds everything,
  about twenty minutes on one core). The table says which size was filled how.
- Query latency, one question at a time (k=10): `Store.search` including the question's embedding,
  and the search part alone (faiss + reading the hits from SQLite) with the vector ready; p50 and
  p99 over `--queries` questions.
- At the largest size: faiss flat (exact) against HNSW (the store's `index="hnsw"`, M=32) and IVF-Flat
  (faiss directly; not a store option), recall@10 of each against flat's results for the same
  question vectors, and faiss search latency per query.
Ends with `RESULT` lines. The machine may be shared: the load average is printed first."""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import faiss
import numpy as np
import torch

from lmforge.rag.documents import Document
from lmforge.rag.embed import Embedder, load_embedder
from lmforge.rag.store import HNSW_EF_SEARCH, HNSW_M, Store
from lmforge.world.people import (
    CITIES, COMPANY_PREFIXES, COMPANY_STEMS, COMPANY_SUFFIXES, FIRST_NAMES, HOBBIES, JOB_TITLES, LAST_NAMES, MAJORS,
    UNIVERSITIES,
)


def synthetic_people(n: int, seed: int) -> tuple[list[str], list[tuple[str, str, str]]]:
    """`n` fact chunks about distinct people, and per chunk (name, city, job) for questions."""
    rng = random.Random(seed)
    picks = rng.sample(range(len(FIRST_NAMES) ** 2 * len(LAST_NAMES)), n)
    chunks, facts = [], []
    for pick in picks:
        first, rest = divmod(pick, len(FIRST_NAMES) * len(LAST_NAMES))
        second, last = divmod(rest, len(LAST_NAMES))
        name = f"{FIRST_NAMES[first]} {FIRST_NAMES[second]} {LAST_NAMES[last]}"
        she = rng.choice(["She", "He"])
        city, job = rng.choice(CITIES), rng.choice(JOB_TITLES)
        company = f"{rng.choice(COMPANY_PREFIXES)} {rng.choice(COMPANY_STEMS).title()} {rng.choice(COMPANY_SUFFIXES)}"
        chunks.append(f"{name} was born in {city} in {rng.randint(1950, 2002)}. {she} studied "
                      f"{rng.choice(MAJORS)} at {rng.choice(UNIVERSITIES)} and works as a {job} at {company}; "
                      f"{she.lower()} enjoys {rng.choice(HOBBIES)}.")
        facts.append((name, city, job))
    return chunks, facts


def questions_about(facts: Sequence[tuple[str, str, str]], count: int, seed: int) -> tuple[list[str], list[int]]:
    rng = random.Random(seed + 1)
    targets = rng.sample(range(len(facts)), min(count, len(facts)))
    templates = ["Where was {0} born?", "What does {0} do for a living?", "Which city is {0} from?",
                 "What is the job of {0}?"]
    return [rng.choice(templates).format(facts[t][0]) for t in targets], targets


class Replay:
    """An embedder that returns known vectors for known texts and asks the real model for the rest;
    also counts the seconds spent in `encode`."""

    def __init__(self, real: Embedder, texts: Sequence[str] = (), vectors: np.ndarray | None = None) -> None:
        self.real, self.name, self.dim, self.path = real, real.name, real.dim, real.path
        self.max_tokens, self.tokenizer = real.max_tokens, real.tokenizer
        self.known = dict(zip(texts, vectors)) if vectors is not None else {}
        self.seconds = 0.0

    def encode(self, texts: Sequence[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        start = time.perf_counter()
        missing = [t for t in texts if t not in self.known]
        self.known.update(zip(missing, self.real.encode(missing, batch_size)))
        out = np.array([self.known[t] for t in texts], np.float32).reshape(len(texts), self.dim)
        self.seconds += time.perf_counter() - start
        return out


def gaussian_like(real: np.ndarray, n: int, seed: int) -> np.ndarray:
    """`n` unit vectors from a Gaussian with the mean and covariance of the rows of `real`."""
    rng = np.random.default_rng(seed)
    mean = real.mean(0)
    factor = np.linalg.cholesky(np.cov(real, rowvar=False) + 1e-6 * np.eye(real.shape[1]))
    out = (mean + rng.standard_normal((n, real.shape[1])) @ factor.T).astype(np.float32)
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def percentiles(seconds: list[float]) -> tuple[float, float]:
    """p50 and p99 in milliseconds."""
    ms = sorted(s * 1000 for s in seconds)
    return statistics.median(ms), ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))]


def each_timed(fn: Callable[[int], object], count: int) -> list[float]:
    times = []
    for i in range(count):
        start = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000], help="store sizes in chunks")
    parser.add_argument("--embed-limit", type=int, default=10_000,
                        help="sizes up to this are embedded in full; larger ones are estimated (see above)")
    parser.add_argument("--queries", type=int, default=200, help="questions timed per store")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch and faiss (OpenMP) threads (default 1: on a busy two-core machine a second "
                             "thread made encoding three times slower, and single-query searches waited for it)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None,
                        help="directory for the stores, kept (default: a temporary one, removed at exit)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    sizes = sorted(args.sizes)
    scratch = tempfile.TemporaryDirectory(prefix="rag-bench-")  # removed when the benchmark exits
    workdir = args.out or Path(scratch.name)
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; torch threads {torch.get_num_threads()}; "
          f"stores in {workdir}")

    real = load_embedder()
    chunks, facts = synthetic_people(sizes[-1], args.seed)
    tokens = np.mean([len(real.tokenizer(c, add_special_tokens=False)["input_ids"]) for c in chunks[:500]])
    print(f"{real.name} ({real.dim} dimensions); chunks of {tokens:.0f} tokens on average")
    docs = [Document(f"c{i}", text, {}) for i, text in enumerate(chunks)]
    vectors = np.zeros((0, real.dim), np.float32)  # real embeddings of chunks[:len(vectors)]
    embed_rate = None
    indexing, latency, stores = [], [], {}

    for n in sizes:
        if n <= args.embed_limit:
            timed = Replay(real)
            store = Store.create(workdir / f"flat-{n}", timed)
            start = time.perf_counter()
            store.add(docs[:n], progress=False)
            seconds = time.perf_counter() - start
            embed_rate = n / timed.seconds
            vectors = filled = np.array([timed.known[c] for c in chunks[:n]], np.float32)
            how = "real encoder, every chunk"
            indexing.append(("flat", n, how, seconds, timed.seconds, n / seconds))
        else:
            if not len(vectors):
                raise SystemExit("--embed-limit must allow at least the smallest size to be embedded in full")
            filled = np.concatenate([vectors, gaussian_like(vectors, n - len(vectors), args.seed)])
            replay = Replay(real, chunks[:n], filled)
            store = Store.create(workdir / f"flat-{n}", replay)
            start = time.perf_counter()
            store.add(docs[:n], progress=False)
            insert = time.perf_counter() - start - replay.seconds
            how = f"estimated: embedding at {embed_rate:.0f}/s (measured on {len(vectors)}) + measured insert"
            indexing.append(("flat", n, how, n / embed_rate + insert, n / embed_rate, n / (n / embed_rate + insert)))
        stores[n] = store
        print(f"indexed {n} chunks ({how})", flush=True)

        questions, _ = questions_about(facts[:len(vectors)], args.queries, args.seed)
        store.search(questions[0])  # warm-up
        full = each_timed(lambda i: store.search(questions[i], k=10), len(questions))
        query_vectors = real.encode(questions)
        store.embedder = Replay(real, questions, query_vectors)
        search = each_timed(lambda i: store.search(questions[i], k=10), len(questions))
        store.search(questions[0], mode="hybrid")  # builds BM25
        hybrid = each_timed(lambda i: store.search(questions[i], k=10, mode="hybrid"), len(questions))
        latency.append(("flat", n, percentiles(full), percentiles(search), percentiles(hybrid)))

    # Approximate indexes at the largest size, on the flat store's vectors.
    n = sizes[-1]
    flat_store = stores[n]
    questions, _ = questions_about(facts[:len(vectors)], args.queries, args.seed)
    query_vectors = real.encode(questions)
    replay = Replay(real, chunks[:n] + questions, np.concatenate([filled, query_vectors]))
    hnsw = Store.create(workdir / f"hnsw-{n}", replay, index="hnsw")
    start = time.perf_counter()
    hnsw.add(docs[:n], progress=False)
    hnsw_build = time.perf_counter() - start - replay.seconds
    hnsw.search(questions[0])
    hnsw_search = each_timed(lambda i: hnsw.search(questions[i], k=10), len(questions))
    latency.append(("hnsw", n, None, percentiles(hnsw_search), None))
    indexing.append(("hnsw", n, "as flat, plus the HNSW graph", indexing[-1][4] + hnsw_build, indexing[-1][4],
                     n / (indexing[-1][4] + hnsw_build)))

    base = filled
    exact_index = faiss.IndexFlatIP(real.dim)
    exact_index.add(base)
    _, exact = exact_index.search(query_vectors, 10)

    def compare(name: str, index, build: float) -> tuple[str, float, float, float, float]:
        _, found = index.search(query_vectors, 10)
        recall = np.mean([len(set(f) & set(e)) / 10 for f, e in zip(found, exact)])
        p50, p99 = percentiles(each_timed(lambda i: index.search(query_vectors[i:i + 1], 10), len(query_vectors)))
        return name, recall, p50, p99, build

    rows = [compare("flat (exact)", exact_index, 0.0)]
    graph = faiss.IndexHNSWFlat(real.dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
    graph.hnsw.efConstruction = 80
    start = time.perf_counter()
    graph.add(base)
    graph_build = time.perf_counter() - start
    for ef in (HNSW_EF_SEARCH, 128):
        graph.hnsw.efSearch = ef
        rows.append(compare(f"HNSW M={HNSW_M} efSearch={ef}", graph, graph_build))
    nlist = int(4 * np.sqrt(n))
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(real.dim), real.dim, nlist, faiss.METRIC_INNER_PRODUCT)
    start = time.perf_counter()
    ivf.train(base)
    ivf.add(base)
    ivf_build = time.perf_counter() - start
    for nprobe in (8, 32):
        ivf.nprobe = nprobe
        rows.append(compare(f"IVF-Flat nlist={nlist} nprobe={nprobe}", ivf, ivf_build))

    # The HNSW store's own answers, against exact search over the same vectors.
    store_found = [[h.chunk_id for h in hits] for hits in hnsw.search_many(questions, k=10)]
    flat_found = [[h.chunk_id for h in hits] for hits in flat_store.search_many(questions, k=10)]
    store_recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(store_found, flat_found)])

    print("\nIndexing (Store.add: embedding, SQLite, faiss, index file)")
    print(f"{'index':<6}{'chunks':>8}  {'how':<72}{'total s':>9}{'embed s':>9}{'store s':>9}{'chunks/s':>10}")
    for kind, size, how, total, embed, rate in indexing:
        print(f"{kind:<6}{size:>8}  {how:<72}{total:>9.1f}{embed:>9.1f}{total - embed:>9.1f}{rate:>10.0f}")
    print("  store: chunking, SQLite (one transaction), faiss, writing the index file")
    print(f"\nQuery latency, one question at a time, k=10, {args.queries} questions (ms)")
    print(f"{'index':<6}{'chunks':>8}{'query p50':>11}{'p99':>8}{'search p50':>12}{'p99':>8}"
          f"{'hybrid p50':>12}{'p99':>8}")
    for kind, size, full, search, hybrid in latency:
        cells = [f"{x:>{w}.2f}" if x is not None else f"{'-':>{w}}"
                 for pair, widths in ((full, (11, 8)), (search, (12, 8)), (hybrid, (12, 8)))
                 for x, w in zip(pair or (None, None), widths)]
        print(f"{kind:<6}{size:>8}" + "".join(cells))
    print("  query: embedding included; search: faiss + reading the hits from SQLite (the vector ready); "
          "hybrid: search with BM25 and fusion")
    print(f"\nApproximate search at {n} chunks: recall@10 against flat, faiss search per query (ms)")
    print(f"{'index':<34}{'recall@10':>10}{'p50':>8}{'p99':>8}{'build s':>9}")
    for name, recall, p50, p99, build in rows:
        print(f"{name:<34}{recall:>10.3f}{p50:>8.3f}{p99:>8.3f}{build:>9.1f}")
    print(f"store index='hnsw' (efSearch={HNSW_EF_SEARCH}) against store index='flat': recall@10 {store_recall:.3f}")

    print()
    first = indexing[0]
    print(f"RESULT rag_index_{first[1] // 1000}k lmforge={first[5]:.0f} unit=chunks/s")
    for kind, size, full, search, _ in latency:
        if kind == "flat":
            print(f"RESULT rag_query_{size // 1000}k_p50 lmforge={full[0]:.2f} unit=ms search_only={search[0]:.2f}")
    flat_row, hnsw_row = rows[0], rows[1]
    print(f"RESULT rag_hnsw_{n // 1000}k lmforge={hnsw_row[2]:.3f} reference={flat_row[2]:.3f} unit=ms "
          f"speedup={flat_row[2] / hnsw_row[2]:.1f} recall@10={hnsw_row[1]:.3f}")


if __name__ == "__main__":
    main()
