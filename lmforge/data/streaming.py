"""Pretraining on a stream: documents read, tokenized and packed as training needs them, never written
to token files, for corpora larger than the disk or memory (local files, or Hub datasets read with
`datasets`' streaming).

Non-empty documents are numbered in stream order and document i is held out for validation when
`in_validation(seed, i, val_fraction)`, as `tokenize_corpus` decides. The training documents' tokens,
each followed by EOS, form one stream cut into windows of `seq_len + 1` tokens that share one token
with the next (as `PackedSequences` reads a token file), taken in order: the k-th global batch holds
the next `global_batch` windows. At the end of the stream it starts again (the next epoch). The
position is the state: the epoch, the documents read in it and the tokens read but not yet used. A
resumed run reads the stream up to that position again (without tokenizing it) and goes on with
exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from itertools import islice
from typing import Any

import numpy as np
import torch

from lmforge.data.corpus import in_validation
from lmforge.tokenizer import Tokenizer

Batch = dict[str, torch.Tensor]
CHUNK_DOCUMENTS = 512  # documents tokenized at a time (encode_batch uses every core)


class StreamedSequences:
    """Global batches of packed training windows from a document stream (see the module docstring);
    `open_stream()` returns a fresh iterator over the documents from the stream's start."""

    def __init__(self, open_stream: Callable[[], Iterator[str]], tokenizer: Tokenizer, seq_len: int,
                 global_batch: int, *, seed: int = 0, val_fraction: float = 0.0) -> None:
        if tokenizer.eos_id is None:
            raise ValueError("streamed pretraining needs a tokenizer with an eos_token between documents")
        self.open_stream, self.tokenizer = open_stream, tokenizer
        self.seq_len, self.global_batch, self.seed, self.val_fraction = seq_len, global_batch, seed, val_fraction
        self.epoch = 0
        self.read = 0  # documents taken from the stream in this epoch, empty ones included
        self.kept = 0  # of them, the non-empty ones: the index `in_validation` decides by
        self.buffer = np.zeros(0, dtype=np.int64)  # tokens read and not yet used by a batch
        self._stream: Iterator[str] | None = None

    # ---- the stream ----------------------------------------------------------------------------

    def _documents(self) -> Iterator[str]:
        """The stream from the current position (opened, and read up to it, on first use)."""
        if self._stream is None:
            self._stream = islice(self.open_stream(), self.read, None)
        return self._stream

    def _fill(self, need: int) -> None:
        """Read and tokenize training documents until the buffer holds `need` tokens."""
        parts, have = [self.buffer], len(self.buffer)
        pass_tokens: int | None = None  # tokens read since the stream started over within this call
        while have < need:
            chunk = list(islice(self._documents(), CHUNK_DOCUMENTS))
            if not chunk:
                if pass_tokens == 0:
                    raise ValueError("the corpus stream holds no training documents (all empty or held out)")
                self.epoch, self.read, self.kept, self._stream, pass_tokens = self.epoch + 1, 0, 0, None, 0
                continue
            texts, self.kept = self._select(chunk, self.kept, held_out=False)
            self.read += len(chunk)
            tokens = self._encode(texts)
            parts.append(tokens)
            have += len(tokens)
            pass_tokens = None if pass_tokens is None else pass_tokens + len(tokens)
        self.buffer = np.concatenate(parts)

    def _select(self, chunk: list[str], index: int, *, held_out: bool) -> tuple[list[str], int]:
        """The non-empty documents of `chunk` in the training (or held-out) split, the first numbered
        `index`; and the number the next non-empty document gets."""
        chosen = []
        for text in chunk:
            if text.strip():
                if in_validation(self.seed, index, self.val_fraction) == held_out:
                    chosen.append(text)
                index += 1
        return chosen, index

    def _encode(self, texts: list[str]) -> np.ndarray:
        """The tokens of `texts`, each followed by EOS, concatenated."""
        if not texts:
            return np.zeros(0, dtype=np.int64)
        backend = self.tokenizer.backend
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)  # _fast: no offsets
        ids = [e.ids + [self.tokenizer.eos_id] for e in encode(texts, add_special_tokens=False)]
        return np.fromiter((t for x in ids for t in x), dtype=np.int64, count=sum(map(len, ids)))

    # ---- the batch source (see lmforge.train.loop.BatchSource) ---------------------------------

    def next_batch(self) -> Batch:
        """The next `global_batch` windows as `input_ids` and `labels` (the next tokens)."""
        n, length = self.global_batch, self.seq_len
        self._fill(n * length + 1)
        windows = np.lib.stride_tricks.sliding_window_view(self.buffer[: n * length + 1], length + 1)[::length]
        self.buffer = self.buffer[n * length :]  # the last window's last token starts the next one
        windows = torch.from_numpy(np.ascontiguousarray(windows))
        return {"input_ids": windows[:, :-1].clone(), "labels": windows[:, 1:].clone()}

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "read": self.read, "kept": self.kept, "buffer": torch.from_numpy(self.buffer)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.read, self.kept = int(state["epoch"]), int(state["read"]), int(state["kept"])
        self.buffer = state["buffer"].numpy().astype(np.int64)
        self._stream = None

    # ---- validation -----------------------------------------------------------------------------

    def validation_tokens(self, max_tokens: int) -> np.ndarray:
        """The first `max_tokens` tokens of the held-out documents (each followed by EOS), read from the
        stream's start (a separate pass, leaving the training position as it is)."""
        if self.val_fraction == 0:
            return np.zeros(0, dtype=np.int64)
        parts, have, index = [], 0, 0
        stream = self.open_stream()
        while have < max_tokens and (chunk := list(islice(stream, CHUNK_DOCUMENTS))):
            held, index = self._select(chunk, index, held_out=True)
            parts.append(self._encode(held))
            have += len(parts[-1])
        return np.concatenate(parts)[:max_tokens] if parts else np.zeros(0, dtype=np.int64)
