"""Pretraining corpora: token files and packed samples.

Documents are the texts of corpus files (`lmforge.io.find_files`, `read_texts`) and Hub datasets
(`lmforge.data.hub_datasets`); `lmforge.data.streaming` reads them without token files.
`tokenize_corpus` writes them, each followed by EOS, into two flat token files `train.bin` and
`val.bin` (raw uint16 or uint32 arrays, as nanoGPT does) beside `meta.json`. `PackedSequences`
reads such a file through a memory map as fixed-length (input, target) samples, and `get_batch`
gathers them into tensors (`lmforge.data.sampling.OrderSampler` orders them).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lmforge.console import Progress
from lmforge.data.hub_datasets import is_hub_dataset, texts
from lmforge.io import PathLike, chunks, find_files, read_texts
from lmforge.tokenizer import Tokenizer

if TYPE_CHECKING:  # torch is imported where it is used: reading and tokenizing corpora never need it
    import torch

SPLITS = ("train", "val")
UINT16_VOCAB_LIMIT = 65536  # larger vocabularies have ids that need uint32
CHUNK_CHARS = 1 << 18  # characters of text handed to a worker at a time


# ---- tokenizing into token files ----------------------------------------------------------------

@dataclass
class CorpusInfo:
    """What `tokenize_corpus` wrote: the contents of `meta.json`."""

    dtype: str
    vocab_size: int
    eos_id: int
    num_tokens: dict[str, int]  # per split: "train", "val"
    num_documents: dict[str, int]
    skipped_empty_documents: int  # empty or whitespace-only documents, not written
    sources: list[str]
    tokenizer_dir: str
    val_fraction: float
    seed: int
    split: str = "train"  # of the Hub datasets among the sources
    column: str = "text"

    @classmethod
    def load(cls, out_dir: PathLike) -> CorpusInfo:
        path = Path(out_dir) / "meta.json"
        if not path.is_file():
            raise FileNotFoundError(f"no meta.json in {out_dir}: run tokenize_corpus into it first")
        return cls(**json.loads(path.read_text("utf-8")))


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype holding every id of the vocabulary: uint16 up to 65536 tokens."""
    return np.dtype(np.uint16 if vocab_size <= UINT16_VOCAB_LIMIT else np.uint32)


def in_validation(seed: int, index: int, val_fraction: float) -> bool:
    """Whether document `index` is held out: a hash of (seed, index), read as a number in [0, 1),
    is below `val_fraction`. Stable across runs, machines and worker counts."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < val_fraction


def source_names(paths: PathLike | Sequence[PathLike]) -> list[str]:
    """The corpus's sources as `CorpusInfo` records them: each file (folders searched, see `find_files`) by its
    absolute path, each Hub dataset by its reference; a missing file is an error here, before any reading."""
    names: list[str] = []
    for source in [paths] if isinstance(paths, (str, Path)) else paths:
        names += [str(source)] if is_hub_dataset(source) else [str(f.resolve()) for f in find_files(source)]
    return names


def corpus_documents(paths: PathLike | Sequence[PathLike], *, split: str = "train", column: str = "text",
                     streaming: bool = False) -> Iterator[str]:
    """The documents of corpus files, folders and Hub datasets (`split`, the string column `column`), in order;
    `streaming` reads a Hub dataset's rows as they are needed instead of preparing it on disk first."""
    for source in [paths] if isinstance(paths, (str, Path)) else paths:
        if is_hub_dataset(source):
            yield from texts(source, split=split, column=column, streaming=streaming)
        else:
            for file in find_files(source):
                yield from read_texts(file, column)


def tokenize_corpus(paths: PathLike | Sequence[PathLike], tokenizer_dir: PathLike, out_dir: PathLike, *,
                    val_fraction: float = 0.05, seed: int = 0, workers: int = 2, split: str = "train",
                    column: str = "text", show_progress: bool = True) -> CorpusInfo:
    """Tokenize the documents of `paths` (files, folders, Hub datasets: see `corpus_documents`) into
    `out_dir/train.bin`, `val.bin` and `meta.json`.

    Each document's tokens are followed by the tokenizer's EOS; documents keep their corpus order
    within each split whatever the number of `workers` (processes, one tokenizer thread each).
    Document i goes to validation when `in_validation(seed, i, val_fraction)`; should that leave
    a split empty while there are two documents or more (and `val_fraction > 0`), the last
    document moves there. Empty or whitespace-only documents are skipped and counted in the meta.
    Every file is written under a temporary name and renamed when complete, `meta.json` last.
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    sources = source_names(paths)
    tokenizer = Tokenizer.from_dir(tokenizer_dir)
    if tokenizer.eos_id is None:
        raise ValueError(f"the tokenizer in {tokenizer_dir} has no eos_token; documents must be separated by one")
    dtype = token_dtype(tokenizer.vocab_size)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    temp = {split: out_dir / f"{split}.bin.{os.getpid()}.tmp" for split in SPLITS}
    writer = _SplitWriter(temp, dtype, seed, val_fraction)
    try:
        with Progress(desc="tokenizing", unit="tok", unit_scale=True, disable=not show_progress) as bar:
            documents = writer.non_empty(corpus_documents(paths, split=split, column=column))
            for tokens, lengths in _encode_in_workers(documents, tokenizer_dir, dtype, workers):
                writer.write(tokens, lengths)
                bar.update(len(tokens))
                bar.set_postfix(docs=sum(writer.num_documents.values()), refresh=False)
        writer.close()
        if not any(writer.num_documents.values()):
            raise ValueError(f"empty corpus: no non-empty documents in {sources}")
        writer.ensure_both_splits()
    except BaseException:
        writer.close()
        for path in temp.values():
            path.unlink(missing_ok=True)
        raise
    info = CorpusInfo(
        dtype=dtype.name, vocab_size=tokenizer.vocab_size, eos_id=tokenizer.eos_id,
        num_tokens=writer.num_tokens, num_documents=writer.num_documents, skipped_empty_documents=writer.skipped,
        sources=sources, tokenizer_dir=str(Path(tokenizer_dir).resolve()),
        val_fraction=val_fraction, seed=seed, split=split, column=column,
    )
    (out_dir / "meta.json").unlink(missing_ok=True)  # no stale meta beside new token files, even after a crash
    for split in SPLITS:
        os.replace(temp[split], out_dir / f"{split}.bin")
    meta_temp = out_dir / f"meta.json.{os.getpid()}.tmp"
    meta_temp.write_text(json.dumps(asdict(info), indent=2) + "\n", encoding="utf-8")
    os.replace(meta_temp, out_dir / "meta.json")
    return info


class _SplitWriter:
    """Appends tokenized documents to the temporary train and val files, keeping counts."""

    def __init__(self, paths: dict[str, Path], dtype: np.dtype, seed: int, val_fraction: float) -> None:
        self.paths, self.dtype, self.seed, self.val_fraction = paths, dtype, seed, val_fraction
        self.files = {split: path.open("wb") for split, path in paths.items()}
        self.num_tokens = dict.fromkeys(SPLITS, 0)
        self.num_documents = dict.fromkeys(SPLITS, 0)
        self.last_length = dict.fromkeys(SPLITS, 0)  # tokens of each split's last document
        self.skipped = 0

    def non_empty(self, documents: Iterable[str]) -> Iterator[str]:
        """`documents` less the empty ones (counted in `skipped`)."""
        for text in documents:
            if text.strip():
                yield text
            else:
                self.skipped += 1

    def write(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        first = sum(self.num_documents.values())
        held_out = np.array([in_validation(self.seed, first + i, self.val_fraction) for i in range(len(lengths))])
        token_held_out = np.repeat(held_out, lengths)
        for split, docs, mask in (("train", ~held_out, ~token_held_out), ("val", held_out, token_held_out)):
            if docs.any():
                self.files[split].write(tokens[mask].tobytes())
                self.num_tokens[split] += int(lengths[docs].sum())
                self.num_documents[split] += int(docs.sum())
                self.last_length[split] = int(lengths[docs][-1])

    def close(self) -> None:
        for f in self.files.values():
            f.close()

    def ensure_both_splits(self) -> None:
        """Train is never empty; val is not either when held out from two documents or more."""
        total = sum(self.num_documents.values())
        if self.num_documents["train"] == 0:
            self._move_last("val", "train")
        elif self.num_documents["val"] == 0 and self.val_fraction > 0 and total >= 2:
            self._move_last("train", "val")

    def _move_last(self, source: str, target: str) -> None:
        """Move the last document of `source` (the corpus's last: `target` is empty) to `target`."""
        length = self.last_length[source]
        size = self.paths[source].stat().st_size
        keep = size - length * self.dtype.itemsize
        with self.paths[source].open("rb") as f:
            f.seek(keep)
            self.paths[target].write_bytes(f.read())
        os.truncate(self.paths[source], keep)
        for counts, amount in ((self.num_tokens, length), (self.num_documents, 1)):
            counts[source] -= amount
            counts[target] += amount
        self.last_length[target] = length


_worker: tuple[Any, int, np.dtype] | None = None  # in each worker process: (tokenizers backend, EOS id, dtype)


def _init_worker(tokenizer_dir: str, dtype: str) -> None:
    global _worker
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker: the processes are the parallelism
    tokenizer = Tokenizer.from_dir(tokenizer_dir)
    _worker = (tokenizer.backend, tokenizer.eos_id, np.dtype(dtype))


def _encode_chunk(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The tokens of `texts`, each followed by EOS, concatenated; and each one's length with its EOS."""
    assert _worker is not None, "_init_worker has not run in this process"
    backend, eos, dtype = _worker
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)  # _fast: no offsets (tokenizers>=0.21)
    ids = [encoding.ids for encoding in encode(texts, add_special_tokens=False)]
    lengths = np.array([len(x) + 1 for x in ids], dtype=np.int64)
    tokens = np.fromiter(chain.from_iterable(x + [eos] for x in ids), dtype=dtype, count=int(lengths.sum()))
    return tokens, lengths


def _encode_in_workers(documents: Iterator[str], tokenizer_dir: PathLike, dtype: np.dtype,
                       workers: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """`_encode_chunk` results for chunks of `documents`, in order, with a bounded number in flight."""
    with multiprocessing.get_context().Pool(workers, _init_worker, (str(tokenizer_dir), dtype.name)) as pool:
        pending: deque[Any] = deque()
        for chunk in chunks(documents, CHUNK_CHARS):
            pending.append(pool.apply_async(_encode_chunk, (chunk,)))
            if len(pending) > 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


# ---- reading token files ------------------------------------------------------------------------

class PackedSequences:
    """Fixed-length training samples over a token file, read through a read-only memory map.

    Documents lie back to back, separated by EOS. Sample i is the window
    `tokens[i * seq_len : i * seq_len + seq_len + 1]`: its first `seq_len` tokens are the input,
    its last `seq_len` the targets. Consecutive windows share one token; the tail is dropped.
    """

    def __init__(self, bin_path: PathLike, seq_len: int, dtype: str | np.dtype) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be at least 1, got {seq_len}")
        self.path, self.seq_len, self.dtype = Path(bin_path), seq_len, np.dtype(dtype)
        size = self.path.stat().st_size
        if size % self.dtype.itemsize:
            raise ValueError(f"{self.path}: {size} bytes is not a whole number of {self.dtype} tokens; wrong dtype?")
        self.num_tokens = size // self.dtype.itemsize
        if self.num_tokens < seq_len + 1:
            raise ValueError(f"{self.path} has {self.num_tokens} tokens, too few for one sample: "
                             f"seq_len {seq_len} needs at least {seq_len + 1}")
        self._tokens: np.memmap | None = None

    @classmethod
    def from_corpus(cls, out_dir: PathLike, split: str, seq_len: int) -> PackedSequences:
        """The `split` ("train" or "val") of a directory written by `tokenize_corpus`."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return cls(Path(out_dir) / f"{split}.bin", seq_len, CorpusInfo.load(out_dir).dtype)

    @property
    def tokens(self) -> np.memmap:
        """The whole token file (mapped on first use, so instances pickle cheaply to other processes)."""
        if self._tokens is None:
            self._tokens = np.memmap(self.path, dtype=self.dtype, mode="r")
        return self._tokens

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tokens": None}

    def __len__(self) -> int:
        return (self.num_tokens - 1) // self.seq_len

    def window(self, index: int) -> np.ndarray:
        """The `seq_len + 1` tokens of sample `index` (a view of the memory map)."""
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} out of range for {len(self)} samples")
        start = index * self.seq_len
        return self.tokens[start : start + self.seq_len + 1]

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(input, target) of sample `index` as int64 arrays of length `seq_len`."""
        window = self.window(index).astype(np.int64)
        return window[:-1], window[1:]


def get_batch(dataset: PackedSequences, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets of the samples `indices`, as int64 tensors of shape (len(indices), seq_len)."""
    import torch

    windows = np.stack([dataset.window(i) for i in indices]).astype(np.int64)
    return torch.from_numpy(windows[:, :-1].copy()), torch.from_numpy(windows[:, 1:].copy())
