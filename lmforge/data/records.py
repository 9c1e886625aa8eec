"""JSONL records with their line numbers, and the error that names file, line and field."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class RecordError(ValueError):
    """A malformed record: `path:line: field 'name': problem`."""

    def __init__(self, path: Path, line: int, field: str, problem: str) -> None:
        super().__init__(f"{path}:{line}: field '{field}': {problem}")


def jsonl_records(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
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
