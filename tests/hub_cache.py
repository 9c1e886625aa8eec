"""Repositories laid out in a Hugging Face Hub cache by hand, as huggingface_hub writes them, for offline tests."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path


def cache_repo(cache: Path, repo_id: str, folder: Path, revision: str, refs: tuple[str, ...] = ("main",),
               repo_type: str = "model") -> Path:
    """`folder`'s files (sub-folders included) as the snapshot `revision` of `repo_id` in a Hub cache:
    content-addressed blobs, snapshot entries linking to them, refs naming the revision."""
    repo = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        blob = repo / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copyfile(file, blob)
        entry = snapshot / file.relative_to(folder)
        entry.parent.mkdir(parents=True, exist_ok=True)
        depth = len(file.relative_to(folder).parts) + 1  # up from the entry's folder to the repo
        entry.symlink_to(Path(*[".."] * depth, "blobs", blob.name))
    for ref in refs:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(revision)
    return snapshot
