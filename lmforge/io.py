"""Reading input files: JSONL records with errors that name file, line and field, JSON files, and
the texts of corpus files (`.txt` split on blank lines, the `text` field of `.jsonl` records, the
`text` column of `.parquet`, or another field or column by name), found in files and folders."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")

PathLike = str | Path


# ---- JSON and JSONL ------------------------------------------------------------------------------


class RecordError(ValueError):
    """A malformed record: `path:line: field 'name': problem`."""

    def __init__(self, path: str | Path, line: int, field: str, problem: str) -> None:
        super().__init__(f"{path}:{line}: field '{field}': {problem}")


def jsonl_records(path: PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line; a line that is not a JSON object is an error."""
    path = Path(path)
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise RecordError(path, line_no, "<record>", f"not valid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise RecordError(path, line_no, "<record>", "expected a JSON object")
            yield line_no, record


def read_json(path: PathLike) -> Any:
    """The contents of a JSON file; invalid JSON is an error naming the file and the line."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None


# ---- corpus files --------------------------------------------------------------------------------


def find_files(paths: PathLike | Iterable[PathLike]) -> list[Path]:
    """The corpus files in `paths`: files as given, folders searched recursively (sorted by path)."""
    paths = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        elif not path.exists():
            raise FileNotFoundError(f"no such file or directory: {path}")
        elif path.suffix not in TEXT_SUFFIXES:
            raise ValueError(f"{path}: unsupported file type (expected one of {', '.join(TEXT_SUFFIXES)})")
        else:
            files.append(path)
    if not files:
        raise ValueError(f"empty corpus: no {', '.join(TEXT_SUFFIXES)} files in {[str(p) for p in paths]}")
    return files


def read_texts(path: PathLike, column: str = "text") -> Iterator[str]:
    """The texts (documents) of one `.txt`, `.jsonl` or `.parquet` file (its field or column `column`), in
    file order."""
    path = Path(path)
    if path.suffix == ".txt":
        return read_txt(path)
    readers = {".jsonl": read_jsonl, ".parquet": read_parquet}
    if path.suffix not in readers:
        raise ValueError(f"{path}: unsupported file type (expected one of {', '.join(TEXT_SUFFIXES)})")
    return readers[path.suffix](path, column)


def iter_texts(paths: PathLike | Iterable[PathLike]) -> Iterator[str]:
    """The texts of every corpus file in `paths` (see `find_files`), file after file."""
    for path in find_files(paths):
        yield from read_texts(path)


def read_lines(path: PathLike) -> Iterator[str]:
    """The lines of a UTF-8 text file, newlines kept; bytes that are not UTF-8 are an error naming the file."""
    with open(path, encoding="utf-8") as f:
        try:
            yield from f
        except UnicodeDecodeError as exc:
            bad = exc.object[exc.start : exc.end]
            raise ValueError(f"{path}: not valid UTF-8 text ({exc.reason}: {bad!r}); "
                             "re-encode the file as UTF-8") from None


def read_txt(path: PathLike) -> Iterator[str]:
    """Documents of a text file: the runs of lines between blank (empty or whitespace-only) lines,
    without their last newline. A file with no blank line is one document."""
    lines: list[str] = []
    for line in read_lines(path):
        if line.strip():
            lines.append(line)
        elif lines:
            yield "".join(lines).removesuffix("\n")
            lines = []
    if lines:
        yield "".join(lines).removesuffix("\n")


def read_jsonl(path: PathLike, field: str = "text") -> Iterator[str]:
    """The string field `field` of each record of a JSON Lines file; blank lines are skipped."""
    for lineno, line in enumerate(read_lines(path), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}, line {lineno}: invalid JSON ({exc.msg}); "
                             f"expected an object with a string field '{field}'") from None
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
            raise ValueError(f"{path}, line {lineno}: field '{field}' is missing or not a string")
        yield record[field]


def read_parquet(path: PathLike, column: str = "text") -> Iterator[str]:
    """The string column `column` of a Parquet file (needs pyarrow)."""
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise ImportError(f"reading {path} needs pyarrow (pip install pyarrow)") from exc
    try:
        parquet = pq.ParquetFile(path)
    except (OSError, ValueError) as exc:  # pyarrow's ArrowIOError / ArrowInvalid
        raise ValueError(f"{path}: not a readable Parquet file ({exc})") from None
    if column not in parquet.schema_arrow.names:
        raise ValueError(f"{path}: no '{column}' column (columns: {parquet.schema_arrow.names})")
    values = (v for batch in parquet.iter_batches(columns=[column]) for v in batch.column(0).to_pylist())
    for row, value in enumerate(values, start=1):
        if not isinstance(value, str):
            raise ValueError(f"{path}, row {row}: field '{column}' is not a string")
        yield value


def chunks(texts: Iterable[str], max_chars: int) -> Iterator[list[str]]:
    """Consecutive groups of `texts` of about `max_chars` characters (at least one text each)."""
    chunk: list[str] = []
    size = 0
    for text in texts:
        chunk.append(text)
        size += len(text)
        if size >= max_chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def read_config_json(path: str | Path) -> tuple[dict[str, Any], str]:
    """A model directory's `config.json` and its path (for error messages); a missing one names the directory."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no config.json; is {path} a model directory?")
    return read_json(file), str(file)
