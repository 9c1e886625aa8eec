"""Datasets by Hugging Face Hub name, wherever a recipe takes a data path: `hf:org/name[:config][@revision]`.

Rows are read through `datasets` (and its cache): from the Hub when online, or, with `HF_HUB_OFFLINE=1`,
from the dataset repository's snapshot in the standard Hub cache (`HF_HUB_CACHE`), read as a local folder.
`streaming=True` reads rows as they are needed, without preparing the dataset on disk. A column mapping
(`{field lmforge reads: the dataset's column}`) renames fields whose names differ; it applies to local
JSONL files as well. Rows are numbered from 1, so errors read `hf:org/name[train]:17: field 'x': ...`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from lmforge.console import on_terminal
from lmforge.hub import explained, hub_options, quiet_unless_terminal
from lmforge.io import PathLike, RecordError, jsonl_records

PREFIX = "hf:"
_REFERENCE = re.compile(r"hf:(?P<repo>[\w.-]+/[\w.-]+)(?::(?P<config>[\w.-]+))?(?:@(?P<revision>[\w./-]+))?")


@dataclass(frozen=True)
class HubDataset:
    """A dataset repository on the Hub, one of its configurations and a revision (branch, tag or commit)."""

    repo_id: str
    config: str | None = None
    revision: str | None = None

    def __str__(self) -> str:
        return (f"{PREFIX}{self.repo_id}" + (f":{self.config}" if self.config else "")
                + (f"@{self.revision}" if self.revision else ""))


class DataSource(BaseModel):
    """A JSONL file, or a Hub dataset by name and the split to read; `columns` renames fields."""

    model_config = ConfigDict(extra="forbid")

    path: Path = Field(description="a JSONL file, or a Hub dataset: hf:org/name[:config][@revision]")
    split: str = Field("train", description="the split to read, for a Hub dataset")
    columns: dict[str, str] = Field({}, description="field lmforge reads -> the column that holds it (e.g. "
                                                    "{prompt: question}), where the names differ")


def is_hub_dataset(source: PathLike) -> bool:
    """Whether a data path names a Hub dataset (`hf:...`)."""
    return str(source).startswith(PREFIX)


def parse_hub_dataset(source: PathLike) -> HubDataset:
    """`hf:org/name[:config][@revision]` as a `HubDataset`; a malformed reference is an error showing the form."""
    match = _REFERENCE.fullmatch(str(source))
    if match is None:
        raise ValueError(f"{source}: not a Hub dataset reference of the form hf:org/name[:config][@revision]")
    return HubDataset(match["repo"], match["config"], match["revision"])


def label(source: PathLike, split: str) -> str:
    """How errors name a source: a file's path, or a Hub dataset with its split."""
    return f"{source}[{split}]" if is_hub_dataset(source) else str(source)


def load_split(source: PathLike, split: str, *, streaming: bool = False) -> Any:
    """One split of a Hub dataset as a `datasets.Dataset` (an `IterableDataset` when `streaming`)."""
    dataset = parse_hub_dataset(source)
    try:
        import datasets
    except ImportError as e:
        raise ImportError(f"{source}: reading Hub datasets needs the datasets package (pip install datasets)") from e
    path, revision = location(dataset)
    if not on_terminal():
        datasets.disable_progress_bars()
    with quiet_unless_terminal(), _named(source):
        return datasets.load_dataset(path, dataset.config, split=split, revision=revision, streaming=streaming)


def split_names(source: PathLike) -> list[str]:
    """The splits of a Hub dataset's configuration."""
    import datasets

    dataset = parse_hub_dataset(source)
    path, revision = location(dataset)
    with quiet_unless_terminal(), _named(source):
        return datasets.get_dataset_split_names(path, dataset.config, revision=revision)


def location(dataset: HubDataset) -> tuple[str, str | None]:
    """Where `datasets` reads a Hub dataset: its id and revision, or offline its snapshot in the Hub cache."""
    options = hub_options()
    if options["local_files_only"]:
        return str(cached_snapshot(dataset, options)), None  # the snapshot holds the revision's files
    return dataset.repo_id, dataset.revision


def cached_snapshot(dataset: HubDataset, options: dict[str, Any]) -> Path:
    """The dataset repository's snapshot in the Hub cache (offline: nothing is downloaded)."""
    from huggingface_hub import snapshot_download

    with explained(str(dataset), dataset.repo_id, dataset.revision, options):
        return Path(snapshot_download(dataset.repo_id, repo_type="dataset", revision=dataset.revision, **options))


@contextmanager
def _named(source: PathLike) -> Iterator[None]:
    """`datasets`' errors (an unknown split or configuration, a missing repository) as one line naming `source`."""
    try:
        yield
    except (ValueError, FileNotFoundError, ConnectionError) as e:
        raise type(e)(f"{source}: {e}") from None


def renamed(record: Mapping[str, Any], columns: Mapping[str, str], error: Any) -> dict[str, Any]:
    """`record` with each mapped column under the field name lmforge reads (`columns`: field -> column)."""
    if not columns:
        return dict(record)
    out = {k: v for k, v in record.items() if k not in columns.values()}
    for field, column in columns.items():
        if column not in record:
            raise error(column, f"missing (the column mapping reads '{field}' from it)")
        out[field] = record[column]
    return out


def read_records(source: PathLike, *, split: str = "train", columns: Mapping[str, str] | None = None,
                 ) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line or row number, record) of a JSONL file or a Hub dataset's split, columns renamed by `columns`."""
    columns = columns or {}
    if not is_hub_dataset(source):
        for line_no, record in jsonl_records(source):
            yield line_no, renamed(record, columns, partial(RecordError, Path(source), line_no))
        return
    name = label(source, split)
    for row, record in enumerate(load_split(source, split), start=1):
        yield row, renamed(record, columns, partial(RecordError, name, row))


def texts(source: PathLike, *, split: str = "train", column: str = "text", streaming: bool = False) -> Iterator[str]:
    """The string column `column` of a Hub dataset's split, row by row; a row without a string there is an error."""
    name = label(source, split)
    dataset = load_split(source, split, streaming=streaming)
    for row, record in enumerate(dataset, start=1):
        value = record.get(column)
        if not isinstance(value, str):
            problem = "missing" if column not in record else "not a string"
            columns = f" (columns: {', '.join(record)})" if column not in record else ""
            raise RecordError(name, row, column, problem + columns)
        yield value
