"""The encoder-decoder side of `lmforge pretrain`: a T5 preset (or a T5 directory to continue) learns T5's
span-corruption objective (`lmforge.data.span_corruption`) on the tokenized corpus, in the same loop.
`data.seq_len` is the encoder's input length (T5: 512); the tokenizer needs T5's sentinel tokens
(`lmforge.tokenizer.train_t5_tokenizer`)."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel

from lmforge.data.corpus import CorpusInfo, PackedSequences
from lmforge.data.sampling import SampledSource
from lmforge.data.seq2seq import collate, validation_batches
from lmforge.data.span_corruption import SpanCorruptedChunks
from lmforge.presets import SEQ2SEQ_PRESETS, seq2seq_preset
from lmforge.seq2seq import Seq2SeqLM
from lmforge.seq2seq_checkpoint import is_seq2seq, load_seq2seq
from lmforge.tokenizer import Tokenizer
from lmforge.train.loop import TrainConfig


def is_seq2seq_spec(spec: Any) -> bool:
    """Whether a pretraining `model` section names an encoder-decoder: a T5 preset or a T5 directory."""
    if spec.init_from is not None:
        return is_seq2seq(spec.init_from)
    return spec.preset in SEQ2SEQ_PRESETS


def build_seq2seq(spec: Any, tokenizer: Tokenizer, seed: int) -> Seq2SeqLM:
    """The model to pretrain: loaded from `init_from`, or a preset (with overrides) sized to the tokenizer
    and initialised as T5 is."""
    if spec.init_from is not None:
        return load_seq2seq(spec.init_from, dtype=torch.float32)
    special = {"pad_token_id": tokenizer.pad_id, "eos_token_id": tokenizer.eos_id,
               "decoder_start_token_id": tokenizer.pad_id}
    missing = [name for name, value in special.items() if value is None]
    if missing:
        raise ValueError(f"data.tokenizer has no {missing[0].removesuffix('_id').replace('_token', ' token')}; "
                         "an encoder-decoder needs T5's <pad> and </s> (train it with train_t5_tokenizer)")
    model = Seq2SeqLM(seq2seq_preset(spec.preset, vocab_size=tokenizer.vocab_size, **special, **spec.overrides))
    model.init_weights(seed)
    return model


def span_corruption_batches(corpus_dir: Path, data: BaseModel, tokenizer: Tokenizer, model: Seq2SeqLM,
                            train: TrainConfig, world_size: int,
                            ) -> tuple[SampledSource, list[dict[str, torch.Tensor]], list[list[int]], int]:
    """Training batches, validation batches, sample prompts (the first corrupted validation inputs) and
    the tokens of the original text per chunk."""
    info = CorpusInfo.load(corpus_dir)
    pad, start = model.config.pad_token_id or 0, model.config.decoder_start_token_id
    chunks = {split: SpanCorruptedChunks(PackedSequences(corpus_dir / f"{split}.bin", 1, info.dtype).tokens,
                                         tokenizer, inputs_length=data.seq_len, seed=train.seed)
              for split in ("train", "val")}
    for split, found in chunks.items():
        if not len(found):
            raise ValueError(f"{corpus_dir / f'{split}.bin'}: fewer tokens than one chunk of "
                             f"{found.tokens_length} (data.seq_len {data.seq_len} after span corruption)")
    train_chunks, val_chunks = chunks["train"], chunks["val"]
    make_batch = partial(_batch, train_chunks, pad_id=pad, decoder_start_id=start)
    source = SampledSource(len(train_chunks), make_batch, train.global_batch_size(world_size), train.seed)
    val = [val_chunks[i] for i in range(min(len(val_chunks), train.micro_batch_size * data.eval_batches))]
    batches = validation_batches(val, train.micro_batch_size, data.eval_batches, pad_id=pad, decoder_start_id=start)
    return source, batches, [e.input_ids for e in val[:4]], train_chunks.tokens_length


def _batch(chunks: SpanCorruptedChunks, indices: list[int], *, pad_id: int,
           decoder_start_id: int) -> dict[str, torch.Tensor]:
    return collate([chunks[i] for i in indices], pad_id, decoder_start_id)
