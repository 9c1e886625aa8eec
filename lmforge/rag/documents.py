"""Documents for the context store, read from text, Markdown and JSONL files, and split into chunks.

`read_documents` takes files and folders: a `.txt` or `.md` file is one document (its id the resolved
path), a `.jsonl` file one document per line (`{"text": ..., "id": ...?, ...}`, the other fields kept
as metadata), a folder every such file below it (sorted; hidden files and folders skipped). Metadata
`source` is the file's resolved path, unless a JSONL record has a `source` of its own. Every problem is
a `RAGError` naming the file, and for JSONL the line and field. `split_into_chunks` cuts a text into
overlapping windows of the embedding model's tokens, each a substring of the text."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.io import RecordError, jsonl_records

TEXT_SUFFIXES = (".txt", ".md")
SUFFIXES = (*TEXT_SUFFIXES, ".jsonl")


class RAGError(ValueError):
    """Bad input to retrieval: a file, a record, a store or a setting (the message says which)."""


@dataclass(frozen=True)
class Document:
    doc_id: str
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)


def read_documents(paths: Iterable[str | Path]) -> list[Document]:
    """The documents in these files and folders, in order; ids are unique."""
    documents: list[Document] = []
    seen: dict[str, str] = {}
    for path in map(Path, paths):
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES and p.is_file()
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            found = [doc for f in files for doc in _read_file(f)]
            if not found:
                raise RAGError(f"{path}: no documents (no {', '.join(SUFFIXES)} files in this folder)")
        elif not path.exists():
            raise RAGError(f"{path}: no such file or folder")
        elif path.suffix not in SUFFIXES:
            raise RAGError(f"{path}: unsupported file type '{path.suffix}' (supported: {', '.join(SUFFIXES)})")
        else:
            found = _read_file(path)
        for doc, where in found:
            if doc.doc_id in seen:
                raise RAGError(f"{where}: document id {doc.doc_id!r} is used twice (first in {seen[doc.doc_id]})")
            seen[doc.doc_id] = where
            documents.append(doc)
    return documents


def _read_file(path: Path) -> list[tuple[Document, str]]:
    """The file's documents, each with where it was read (`path` or `path:line`)."""
    source = str(path.resolve())
    try:
        if path.suffix in TEXT_SUFFIXES:
            text = path.read_text(encoding="utf-8-sig")
            if not text.strip():
                raise RAGError(f"{path}: empty document")
            return [(Document(source, text, {"source": source}), str(path))]
        docs = [(_jsonl_document(path, source, line, record), f"{path}:{line}") for line, record in jsonl_records(path)]
    except UnicodeDecodeError as e:
        raise RAGError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise RAGError(f"{path}: cannot read ({e.strerror or e})") from None
    except RecordError as e:
        raise RAGError(str(e)) from None
    if not docs:
        raise RAGError(f"{path}: no documents (the file has no records)")
    return docs


def _jsonl_document(path: Path, source: str, line: int, record: dict[str, Any]) -> Document:
    text = record.pop("text", None)
    if not isinstance(text, str):
        problem = "missing" if text is None else f"expected a string, got {type(text).__name__}"
        raise RAGError(f"{path}:{line}: field 'text': {problem}")
    if not text.strip():
        raise RAGError(f"{path}:{line}: field 'text': empty document")
    doc_id = record.pop("id", None)
    if doc_id is None:
        doc_id = f"{source}:{line}"
    elif isinstance(doc_id, (str, int)) and not isinstance(doc_id, bool) and str(doc_id):
        doc_id = str(doc_id)
    else:
        raise RAGError(f"{path}:{line}: field 'id': expected a non-empty string or an integer, got {doc_id!r}")
    return Document(doc_id, text, {"source": source, **record})


def check_chunking(chunk_tokens: int, overlap: int) -> None:
    """Chunks need chunk_tokens >= 1 and 0 <= overlap < chunk_tokens."""
    if chunk_tokens < 1 or not 0 <= overlap < chunk_tokens:
        raise RAGError(f"chunking needs chunk_tokens >= 1 and 0 <= overlap < chunk_tokens "
                       f"(got chunk_tokens={chunk_tokens}, overlap={overlap})")


def split_into_chunks(text: str, tokenizer: Any, chunk_tokens: int = 128, overlap: int = 32) -> list[str]:
    """Overlapping windows of at most `chunk_tokens` tokens of `tokenizer` (a Hugging Face fast tokenizer,
    special tokens not counted), consecutive windows sharing at most `overlap` tokens. Each chunk is a
    substring of `text`. A window ends, where it can, at a paragraph break, else after a sentence, else
    between words (in the second half of the window, the latest such cut), and the next window starts
    likewise (within the overlap, the earliest such start)."""
    check_chunking(chunk_tokens, overlap)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    spans = [(a, b) for a, b in encoding["offset_mapping"] if b > a]
    if not spans:
        return [text.strip()] if text.strip() else []

    def boundary(t: int) -> int:
        """How good a cut between tokens t-1 and t is: 3 paragraph, 2 sentence, 1 word, 0 inside a word."""
        gap = text[spans[t - 1][1]:spans[t][0]]
        if not any(c.isspace() for c in gap):
            return 0
        if "\n\n" in gap:
            return 3
        return 2 if text[spans[t - 1][1] - 1] in ".!?" else 1

    chunks = []
    start, n = 0, len(spans)
    while True:
        end = min(start + chunk_tokens, n)
        if end < n:
            lowest = start + max(overlap + 1, chunk_tokens // 2)
            end = max(range(lowest, end + 1), key=lambda t: (boundary(t), t))
        chunks.append(text[spans[start][0]:spans[end - 1][1]])
        if end == n:
            return chunks
        # The next window starts at most `overlap` tokens back: at the earliest of the best boundaries there.
        start = max(range(end - overlap, end), key=lambda t: (boundary(t), -t)) if overlap else end
