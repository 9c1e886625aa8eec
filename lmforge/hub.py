"""Checkpoints by Hugging Face Hub name: `org/name` or `org/name@revision` (a branch, tag or commit).

`resolve_checkpoint` turns such a reference into a snapshot directory of the standard Hub cache
(`HF_HUB_CACHE`, else `HF_HOME/hub`), downloading through `huggingface_hub` only the files lmforge
reads: config, generation config, tokenizer files and chat template, PEFT's adapter files and the
safetensors weights the index names (never `.bin`/`.pt` pickles, GGUF, ONNX or Flax files). An
existing local path always wins; anything that is neither an existing path nor an `org/name` id is
returned as a path, for the loader's own "not a model directory" error. `HF_HUB_OFFLINE=1` reads
the cache only; `HF_ENDPOINT` and tokens (`HF_TOKEN`, the saved login) are huggingface_hub's own.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lmforge.console import on_terminal

INDEX = "model.safetensors.index.json"
ADAPTER_CONFIG = "adapter_config.json"
# Everything lmforge reads beside the weights: small files, fetched first.
METADATA_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                  "special_tokens_map.json", "chat_template.jinja", "tokenizer.model", "vocab.json", "merges.txt",
                  INDEX, ADAPTER_CONFIG)
LOGIN = "log in with `hf auth login` (or `huggingface-cli login`), or set HF_TOKEN"

_resolved: dict[tuple[str, str | None, str, str, bool], Path] = {}  # this process's Hub look-ups


def parse_hub_id(reference: str | Path) -> tuple[str, str | None] | None:
    """(repo id, revision or None) of an `org/name[@revision]` reference; None for anything else."""
    text = Path(reference).as_posix() if isinstance(reference, Path) else str(reference)
    repo_id, at, revision = text.partition("@")
    if repo_id.count("/") != 1 or (at and not revision):
        return None
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return None
    return repo_id, revision or None


def hub_id(reference: str | Path) -> tuple[str, str | None] | None:
    """`parse_hub_id` of a reference that is not an existing local path (which always wins)."""
    return None if Path(reference).exists() else parse_hub_id(reference)


def resolve_checkpoint(reference: str | Path, revision: str | None = None) -> Path:
    """The local directory of a checkpoint reference: an existing path as it is; an `org/name[@rev]`
    Hub id (or `org/name` with `revision`) as its snapshot in the Hub cache, downloaded if needed;
    anything else as a path (for the loader's error). Hub errors are one-line `ValueError`s naming the
    reference; a snapshot neither cached nor downloadable (offline, no connection) a `FileNotFoundError`."""
    parsed = hub_id(reference)
    if parsed is None:
        return Path(reference)
    repo_id, revision = parsed[0], parsed[1] or revision
    options = hub_options()
    key = (repo_id, revision, options["cache_dir"], options["endpoint"], options["local_files_only"])
    if key in _resolved and _resolved[key].is_dir():
        return _resolved[key]
    with explained(str(reference), repo_id, revision, options), quiet_unless_terminal():
        _resolved[key] = _download(repo_id, revision, options)
    return _resolved[key]


def hub_options() -> dict[str, Any]:
    """Cache, endpoint and offline mode from the environment as it is now (huggingface_hub reads
    its own copies once, at import)."""
    from huggingface_hub import constants

    home = os.environ.get("HF_HOME")
    cache = os.environ.get("HF_HUB_CACHE") or (os.path.join(home, "hub") if home else constants.HF_HUB_CACHE)
    offline = (os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or "").upper() in (
        "1", "ON", "YES", "TRUE")
    endpoint = (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
    return {"cache_dir": os.path.expanduser(cache), "endpoint": endpoint, "local_files_only": offline}


def _download(repo_id: str, revision: str | None, options: dict[str, Any]) -> Path:
    """The snapshot of `repo_id` at `revision` with the metadata files, then the weights they name."""
    from huggingface_hub import snapshot_download

    snapshot = Path(snapshot_download(repo_id, revision=revision, allow_patterns=list(METADATA_FILES), **options))
    # the folder is named by its commit: the weights come from the same commit, with no second look-up
    snapshot_download(repo_id, revision=snapshot.name, allow_patterns=weight_names(snapshot), **options)
    return snapshot


def weight_names(folder: Path) -> list[str]:
    """The safetensors files a loader reads from `folder`: the shards its index names, the adapter's
    weights, or `model.safetensors`."""
    if (folder / INDEX).is_file():
        try:
            return sorted(set(json.loads((folder / INDEX).read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError):
            return []  # the loader names the broken index
    if (folder / ADAPTER_CONFIG).is_file():
        return ["adapter_model.safetensors"]
    return ["model.safetensors"]


@contextmanager
def quiet_unless_terminal() -> Iterator[None]:
    """huggingface_hub's download bars on a terminal only."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    if on_terminal() or are_progress_bars_disabled():
        yield
        return
    disable_progress_bars()
    try:
        yield
    finally:
        enable_progress_bars()


@contextmanager
def explained(reference: str, repo_id: str, revision: str | None, options: dict[str, Any]) -> Iterator[None]:
    """huggingface_hub's errors as one line naming `reference` and what to do."""
    from huggingface_hub.errors import (
        GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled, RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    not_found = (f"{reference}: no such local directory, and no Hub repository {repo_id} (check the name; for a "
                 f"private repository {LOGIN})")
    try:
        yield
    except GatedRepoError:
        raise ValueError(f"{reference}: {repo_id} is a gated Hub repository; accept its conditions on "
                         f"{options['endpoint']}/{repo_id} and {LOGIN}") from None
    except RepositoryNotFoundError:
        raise ValueError(not_found) from None
    except RevisionNotFoundError:
        raise ValueError(f"{reference}: the Hub repository {repo_id} has no revision {revision!r} (check the "
                         "branch, tag or commit)") from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        why = ("HF_HUB_OFFLINE is set: unset it to download it" if options["local_files_only"]
               else "the Hub could not be reached: check the connection, or HF_ENDPOINT")
        raise FileNotFoundError(f"{reference}: no such local directory, and {repo_id}"
                                f"{'@' + revision if revision else ''} is not in the Hub cache "
                                f"{options['cache_dir']} ({why})") from None
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status == 401:  # the Hub's answer for a missing repository as for a private one
            raise ValueError(not_found) from None
        raise ValueError(f"{reference}: the Hub answered HTTP {status} for {repo_id} ({LOGIN} if it is private or "
                         "gated)") from None
