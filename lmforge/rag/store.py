"""The context store: documents cut into chunks, their embeddings, and search over them, in one directory.

`store.sqlite` is the source of truth: settings (embedding model, chunking, index kind), documents
(id, content hash, metadata) and chunks (text and vector). Each `add` or `remove` is one SQLite
transaction that also bumps a generation counter. The faiss index is a cache of the vectors, written
to `index-<generation>.faiss` through a temporary file and a rename; when opening or searching, an
index file of another generation, or one missing, unreadable or not matching the chunks, is rebuilt
from the vectors. So a process killed at any moment leaves the store exactly as it was before or
after the call it was in, and several processes may share a store.

Search is dense (inner product of unit vectors, i.e. cosine: exact with the flat index, approximate
with HNSW), BM25 (`bm25s`, built in memory on first use), or hybrid: reciprocal rank fusion of both.
HNSW cannot delete, so a write that removes or replaces chunks rebuilds its graph (a minute at 100k chunks).
A store refuses an embedding model other than the one it was built with: their dimensions differ, or
the model's vector for a fixed probe sentence differs from the one recorded."""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np

from lmforge.console import Progress
from lmforge.rag.bm25 import BM25Index, Ranking, fuse
from lmforge.rag.documents import Document, RAGError, check_chunking, split_into_chunks
from lmforge.rag.embed import Embedder, load_embedder

Mode = Literal["dense", "bm25", "hybrid"]
IndexKind = Literal["flat", "hnsw"]
MODES = ("dense", "bm25", "hybrid")
INDEX_KINDS = ("flat", "hnsw")
FORMAT = 1
DB_NAME = "store.sqlite"
PROBE_TEXT = "The quick brown fox jumps over the lazy dog near the riverbank at dawn."
PROBE_MIN_COSINE = 0.999
HYBRID_CANDIDATES = 20  # each ranking fused in hybrid search retrieves at least this many chunks
HNSW_M, HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH = 32, 80, 64
EMBED_STEP = 256  # chunks per progress-bar step
INDEX_FILE = re.compile(r"index-(\d+)\.faiss")

SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE documents (doc_id TEXT PRIMARY KEY, hash TEXT NOT NULL, metadata TEXT NOT NULL);
CREATE TABLE chunks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    doc_id TEXT NOT NULL REFERENCES documents(doc_id),
    position INTEGER NOT NULL,
    text TEXT NOT NULL,
    vector BLOB NOT NULL
);
CREATE INDEX chunks_doc ON chunks(doc_id);
"""


@dataclass(frozen=True)
class IndexStats:
    """What one `Store.add` did: documents added, replaced (content changed) and unchanged (skipped),
    chunks removed with the replaced documents, and chunks embedded and stored."""

    added: int
    replaced: int
    unchanged: int
    removed_chunks: int
    chunks: int


@dataclass(frozen=True)
class Hit:
    """One retrieved chunk: `score` is the cosine (dense), the BM25 score, or the fused score (hybrid);
    `rank` starts at 1; `metadata` is the document's; `position` the chunk's place in its document."""

    chunk_id: int
    doc_id: str
    text: str
    metadata: dict[str, Any]
    score: float
    rank: int
    position: int


class Store:
    """A context store directory; make one with `Store.create`, open one with `Store.open`.
    Safe to share between threads (calls are serialised) and processes (SQLite locking)."""

    def __init__(self, path: Path, db: sqlite3.Connection, embedder: Embedder, meta: dict[str, Any]) -> None:
        self.path, self._db, self.embedder = path, db, embedder
        self.index_kind: IndexKind = meta["index"]
        self.chunk_tokens: int = meta["chunk_tokens"]
        self.overlap: int = meta["overlap"]
        self.model_name: str = meta["model_name"]
        self._lock = threading.RLock()
        self._index: Any = None
        self._generation = -1
        self._bm25: BM25Index | None = None

    @staticmethod
    def is_store(path: str | Path) -> bool:
        """Whether `path` holds a store (a directory with a `store.sqlite`)."""
        return (Path(path) / DB_NAME).is_file()

    @classmethod
    def create(cls, path: str | Path, embedder: Embedder | None = None, *, index: IndexKind = "flat",
               chunk_tokens: int = 128, overlap: int = 32) -> Store:
        """A new, empty store in `path` (absent or an empty directory), for `embedder` (default:
        all-MiniLM-L6-v2), with a flat (exact) or HNSW (approximate) index."""
        path = Path(path)
        if index not in INDEX_KINDS:
            raise RAGError(f"unknown index kind {index!r} (choose from {', '.join(INDEX_KINDS)})")
        if cls.is_store(path):
            raise RAGError(f"{path}: already a context store (open it instead)")
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise RAGError(f"{path}: a new store needs an empty or absent directory")
        embedder = embedder or load_embedder()
        check_chunking(chunk_tokens, overlap)
        if chunk_tokens + 2 > embedder.max_tokens:  # the model adds two special tokens, e.g. [CLS] and [SEP]
            raise RAGError(f"chunk_tokens={chunk_tokens} is too long for {embedder.name}, which reads at most "
                           f"{embedder.max_tokens} tokens (special tokens included)")
        meta = {"format": FORMAT, "model_name": embedder.name, "model_path": str(getattr(embedder, "path", "")),
                "dim": embedder.dim, "probe": _probe(embedder).tolist(), "index": index,
                "chunk_tokens": chunk_tokens, "overlap": overlap, "generation": 0}
        path.mkdir(parents=True, exist_ok=True)
        # Build the database beside its final name and rename it: a store exists completely or not at all.
        tmp = path / f"{DB_NAME}.tmp{os.getpid()}"
        tmp.unlink(missing_ok=True)
        db = sqlite3.connect(tmp)
        with db:
            db.executescript(SCHEMA)
            db.executemany("INSERT INTO meta VALUES (?, ?)", [(k, json.dumps(v)) for k, v in meta.items()])
        db.execute("PRAGMA journal_mode=WAL")
        db.close()
        os.replace(tmp, path / DB_NAME)
        return cls.open(path, embedder)

    @classmethod
    def open(cls, path: str | Path, embedder: Embedder | None = None) -> Store:
        """The store in `path`, with `embedder` (default: the model it was built with, if its directory
        is still there, else all-MiniLM-L6-v2), which must be the store's model."""
        path = Path(path)
        if not cls.is_store(path):
            what = "no such directory" if not path.exists() else f"no {DB_NAME} in it"
            raise RAGError(f"{path}: not a context store ({what}); make one with Store.create / `lmforge rag index`")
        db = sqlite3.connect(path / DB_NAME, timeout=60, isolation_level=None, check_same_thread=False)
        try:
            meta = {k: json.loads(v) for k, v in db.execute("SELECT key, value FROM meta")}
            if meta.get("format") != FORMAT:
                raise RAGError(f"{path}: store format {meta.get('format')!r}, this lmforge reads format {FORMAT}")
        except (sqlite3.DatabaseError, json.JSONDecodeError) as e:
            db.close()
            raise RAGError(f"{path}: not a context store ({DB_NAME}: {e})") from None
        except RAGError:
            db.close()
            raise
        if embedder is None:
            stored = Path(meta["model_path"]) if meta["model_path"] else None
            embedder = load_embedder(stored if stored is not None and stored.is_dir() else None)
        same = embedder.dim == meta["dim"] and float(np.dot(_probe(embedder), meta["probe"])) >= PROBE_MIN_COSINE
        if not same:
            db.close()
            raise RAGError(f"{path}: this store was built with the embedding model {meta['model_name']} "
                           f"({meta['dim']} dimensions), not {embedder.name} ({embedder.dim} dimensions); "
                           f"open it with its model, or index into a new store")
        store = cls(path, db, embedder, meta)
        with store._lock, store._reading():
            store._sync_index()
        return store

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        """The number of chunks."""
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM chunks").fetchone()[0]

    def documents(self) -> list[str]:
        """The document ids, sorted."""
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT doc_id FROM documents ORDER BY doc_id")]

    def add(self, documents: Iterable[Document], progress: bool = True) -> IndexStats:
        """Add documents: a new id is chunked, embedded and stored; an id already stored with the same
        text and metadata is skipped; one with other content has its chunks replaced. All or nothing."""
        documents = list(documents)
        hashes = {}
        for doc in documents:
            if not isinstance(doc.doc_id, str) or not doc.doc_id:
                raise RAGError(f"document id {doc.doc_id!r}: expected a non-empty string")
            if doc.doc_id in hashes:
                raise RAGError(f"document id {doc.doc_id!r} is given twice")
            if not doc.text.strip():
                raise RAGError(f"document {doc.doc_id!r}: empty text")
            hashes[doc.doc_id] = _content_hash(doc)
        with self._lock:
            stored = dict(self._db.execute("SELECT doc_id, hash FROM documents"))
        changed = [doc for doc in documents if stored.get(doc.doc_id) != hashes[doc.doc_id]]
        if not changed:
            return IndexStats(0, 0, len(documents), 0, 0)
        pieces = [(doc.doc_id, position, text) for doc in changed for position, text in
                  enumerate(split_into_chunks(doc.text, self.embedder.tokenizer, self.chunk_tokens, self.overlap))]
        vectors = self._embed([text for _, _, text in pieces], progress)
        added = replaced = 0
        with self._lock:
            with self._writing():
                generation = self._db_generation()
                old_ids = []
                for doc in changed:
                    old_ids += [r[0] for r in self._db.execute("SELECT id FROM chunks WHERE doc_id = ?", (doc.doc_id,))]
                    self._db.execute("DELETE FROM chunks WHERE doc_id = ?", (doc.doc_id,))
                    existed = self._db.execute("DELETE FROM documents WHERE doc_id = ?", (doc.doc_id,)).rowcount
                    replaced, added = replaced + existed, added + 1 - existed
                    self._db.execute("INSERT INTO documents VALUES (?, ?, ?)",
                                     (doc.doc_id, hashes[doc.doc_id], json.dumps(doc.metadata, ensure_ascii=False)))
                first = 1 + self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM sqlite_sequence WHERE name = 'chunks'"
                                             ).fetchone()[0]
                ids = np.arange(first, first + len(pieces), dtype=np.int64)
                self._db.executemany("INSERT INTO chunks VALUES (?, ?, ?, ?, ?)",
                                     ((int(i), d, p, t, _blob(v)) for i, (d, p, t), v in zip(ids, pieces, vectors)))
                self._set_generation(generation + 1)
            self._apply(generation, np.array(old_ids, np.int64), ids, vectors)
        return IndexStats(added, replaced, len(documents) - len(changed), len(old_ids), len(pieces))

    def remove(self, doc_id: str) -> int:
        """Remove a document and its chunks; returns how many chunks went."""
        with self._lock:
            with self._writing():
                generation = self._db_generation()
                old_ids = np.array([r[0] for r in self._db.execute("SELECT id FROM chunks WHERE doc_id = ?",
                                                                   (doc_id,))], np.int64)
                self._db.execute("DELETE FROM chunks WHERE doc_id = ?", (doc_id,))
                if not self._db.execute("DELETE FROM documents WHERE doc_id = ?", (doc_id,)).rowcount:
                    raise RAGError(f"{self.path}: no document {doc_id!r} in this store")
                self._set_generation(generation + 1)
            self._apply(generation, old_ids, np.zeros(0, np.int64), np.zeros((0, self.embedder.dim), np.float32))
        return len(old_ids)

    def search(self, query: str, k: int = 4, mode: Mode = "dense") -> list[Hit]:
        """The `k` chunks best matching `query`, best first."""
        return self.search_many([query], k, mode)[0]

    def search_many(self, queries: Sequence[str], k: int = 4, mode: Mode = "dense") -> list[list[Hit]]:
        """`search` for each query, with the queries embedded together."""
        if mode not in MODES:
            raise RAGError(f"unknown search mode {mode!r} (choose from {', '.join(MODES)})")
        if k < 1:
            raise RAGError(f"k must be at least 1, got {k}")
        queries = list(queries)
        if not queries:
            return []
        vectors = self.embedder.encode(queries) if mode != "bm25" else None
        with self._lock, self._reading():
            self._sync_index()
            if mode == "dense":
                rankings = self._dense(vectors, k)
            elif mode == "bm25":
                rankings = self._bm25_rank(queries, k)
            else:
                n = max(k, HYBRID_CANDIDATES)
                rankings = [fuse(d, s)[:k] for d, s in zip(self._dense(vectors, n), self._bm25_rank(queries, n))]
            return self._hits(rankings)

    # --- the faiss index

    def _sync_index(self) -> None:
        """Make the in-memory index match the database (inside a transaction): keep it, read the index
        file of the database's generation, or rebuild it from the stored vectors and write that file."""
        generation = self._db_generation()
        if self._index is not None and generation == self._generation:
            return
        self._bm25 = None
        ids = np.array([r[0] for r in self._db.execute("SELECT id FROM chunks ORDER BY id")], np.int64)
        index = self._read_index(generation, ids)
        if index is None:
            blobs = [r[0] for r in self._db.execute("SELECT vector FROM chunks ORDER BY id")]
            vectors = np.frombuffer(b"".join(blobs), np.float32).reshape(len(ids), self.embedder.dim)
            index = self._build_index(ids, vectors)
            self._write_index(index, generation)
        self._index, self._generation = index, generation

    def _index_file(self, generation: int) -> Path:
        return self.path / f"index-{generation}.faiss"

    def _read_index(self, generation: int, ids: np.ndarray) -> Any:
        """The index file of this generation if it holds exactly these ids, else None."""
        try:
            index = faiss.read_index(str(self._index_file(generation)))
        except RuntimeError:  # missing or unreadable
            return None
        if not isinstance(index, faiss.IndexIDMap2) or index.d != self.embedder.dim or index.ntotal != len(ids) \
                or not np.array_equal(np.sort(faiss.vector_to_array(index.id_map)), ids):
            return None
        self._tune(index)
        return index

    def _build_index(self, ids: np.ndarray, vectors: np.ndarray) -> Any:
        if self.index_kind == "flat":
            inner = faiss.IndexFlatIP(self.embedder.dim)
        else:
            inner = faiss.IndexHNSWFlat(self.embedder.dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
            inner.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        index = faiss.IndexIDMap2(inner)
        index.add_with_ids(vectors, ids)
        self._tune(index)
        return index

    def _tune(self, index: Any, k: int = 0) -> None:
        if self.index_kind == "hnsw":
            faiss.downcast_index(index.index).hnsw.efSearch = max(HNSW_EF_SEARCH, k)

    def _write_index(self, index: Any, generation: int) -> None:
        """Write the index file of this generation atomically, and delete older ones. Best effort: the
        file is a cache, rebuilt from the database when missing (a read-only store still opens)."""
        final = self._index_file(generation)
        tmp = final.with_name(f"{final.name}.tmp{os.getpid()}")
        try:
            faiss.write_index(index, str(tmp))
            os.replace(tmp, final)
            for old in self.path.glob("index-*.faiss*"):
                match = INDEX_FILE.match(old.name)
                if match and int(match[1]) < generation:
                    old.unlink(missing_ok=True)
        except (OSError, RuntimeError):
            tmp.unlink(missing_ok=True)

    def _apply(self, generation: int, removed: np.ndarray, ids: np.ndarray, vectors: np.ndarray) -> None:
        """After a write committed as `generation + 1`: update the index in memory and on disk."""
        self._bm25 = None
        if generation != self._generation:  # another process wrote in between: reload from the database
            with self._reading():
                self._sync_index()
            return
        try:
            if len(removed) and self.index_kind == "hnsw":  # HNSW cannot delete: rebuild it
                self._index = None
                with self._reading():
                    self._sync_index()
                return
            if len(removed):
                self._index.remove_ids(removed)
            self._index.add_with_ids(vectors, ids)
        except BaseException:
            self._index = None  # rebuilt on next use
            raise
        self._generation = generation + 1
        self._write_index(self._index, self._generation)

    # --- retrieval

    def _dense(self, vectors: np.ndarray, n: int) -> list[Ranking]:
        """Per query vector, the top `n` (chunk id, cosine)."""
        if self._index.ntotal == 0:
            return [[] for _ in vectors]
        self._tune(self._index, n)
        scores, ids = self._index.search(vectors, min(n, self._index.ntotal))
        return [[(int(i), float(s)) for i, s in zip(row_ids, row_scores) if i >= 0]
                for row_ids, row_scores in zip(ids, scores)]

    def _bm25_rank(self, queries: list[str], n: int) -> list[Ranking]:
        """Per query, the top `n` (chunk id, BM25 score) with a positive score."""
        if self._bm25 is None:
            rows = self._db.execute("SELECT id, text FROM chunks ORDER BY id").fetchall()
            self._bm25 = BM25Index([i for i, _ in rows], [t for _, t in rows])
        return self._bm25.rank(queries, n)

    def _hits(self, rankings: list[Ranking]) -> list[list[Hit]]:
        wanted = sorted({i for ranking in rankings for i, _ in ranking})
        rows = {}
        for start in range(0, len(wanted), 500):  # stay under SQLite's limit on query parameters
            part = wanted[start:start + 500]
            rows.update((r[0], r[1:]) for r in self._db.execute(
                "SELECT c.id, c.doc_id, c.position, c.text, d.metadata FROM chunks c JOIN documents d "
                f"ON c.doc_id = d.doc_id WHERE c.id IN ({','.join('?' * len(part))})", part))
        return [[Hit(i, rows[i][0], rows[i][2], json.loads(rows[i][3]), score, rank, rows[i][1])
                 for rank, (i, score) in enumerate(ranking, 1)] for ranking in rankings]

    # --- database

    def _embed(self, texts: list[str], progress: bool) -> np.ndarray:
        """Embeddings of `texts`, longest first in steps (less padding), with a progress bar."""
        vectors = np.empty((len(texts), self.embedder.dim), np.float32)
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        with Progress(total=len(texts), unit="chunk", desc="embedding", disable=not progress or not texts) as bar:
            for start in range(0, len(texts), EMBED_STEP):
                step = order[start:start + EMBED_STEP]
                vectors[step] = self.embedder.encode([texts[i] for i in step])
                bar.update(len(step))
        return vectors

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """One write transaction, taking the database's write lock at once."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    @contextmanager
    def _reading(self) -> Iterator[None]:
        """One read transaction: a consistent snapshot (nested inside another transaction: that one)."""
        if self._db.in_transaction:
            yield
            return
        self._db.execute("BEGIN")
        try:
            yield
        finally:
            self._db.execute("COMMIT")

    def _db_generation(self) -> int:
        return json.loads(self._db.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()[0])

    def _set_generation(self, generation: int) -> None:
        self._db.execute("UPDATE meta SET value = ? WHERE key = 'generation'", (json.dumps(generation),))


def _probe(embedder: Embedder) -> np.ndarray:
    return embedder.encode([PROBE_TEXT])[0]


def _content_hash(doc: Document) -> str:
    try:
        content = json.dumps([doc.text, doc.metadata], sort_keys=True, ensure_ascii=False)
    except TypeError as e:
        raise RAGError(f"document {doc.doc_id!r}: metadata is not JSON ({e})") from None
    return hashlib.sha256(content.encode()).hexdigest()


def _blob(vector: np.ndarray) -> bytes:
    return vector.tobytes()
