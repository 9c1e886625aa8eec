"""`lmforge pretrain`: next-token prediction on a tokenized corpus, from scratch or a checkpoint; span
corruption for an encoder-decoder (`lmforge.train.pretrain_seq2seq`)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from lmforge.checkpoint import load_model
from lmforge.config import ModelConfig, load_recipe
from lmforge.presets import preset
from lmforge.data.corpus import CorpusInfo, PackedSequences, corpus_documents, get_batch, source_names, tokenize_corpus
from lmforge.data.sampling import SampledSource
from lmforge.data.streaming import StreamedSequences
from lmforge.model import Transformer
from lmforge.tokenizer import Tokenizer
from lmforge.train.distributed import Dist, barrier, init_distributed, wrap
from lmforge.train.loop import Trainer, TrainConfig, finish_run
from lmforge.train.losses import causal_lm_loss, seq2seq_lm_loss, validation_loss
from lmforge.train.pretrain_seq2seq import build_seq2seq, is_seq2seq_spec, span_corruption_batches
from lmforge.train.sft_seq2seq import Seq2SeqModelFiles


class ModelSpec(BaseModel):
    """A new model from a preset (with field overrides), or an existing HF directory to continue."""

    model_config = ConfigDict(extra="forbid")

    preset: str | None = "micro"
    overrides: dict[str, Any] = {}
    init_from: Path | None = None


class DataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    paths: list[Path] = Field(description="corpus files (.txt, .jsonl, .parquet), folders of them, and Hub "
                                          "datasets: hf:org/name[:config][@revision]")
    split: str = Field("train", description="the split of the Hub datasets")
    text_column: str = Field("text", description="the field or column that holds each document's text")
    streaming: bool = Field(False, description="read, tokenize and pack documents as training needs them, "
                                               "without token files (for corpora larger than disk or memory)")
    tokenizer: Path
    seq_len: int = Field(256, gt=0)
    val_fraction: float = Field(0.05, ge=0, lt=1)
    workers: int = Field(2, gt=0, description="tokenizing processes (not used when streaming)")
    eval_batches: int = Field(8, gt=0)


class PretrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    out_dir: Path
    model: ModelSpec = ModelSpec()
    data: DataConfig
    train: TrainConfig = TrainConfig()


def sequence_batch(sequences: PackedSequences, indices: list[int]) -> dict[str, torch.Tensor]:
    """The samples `indices` as a language-modelling batch: `input_ids` and their next tokens, `labels`."""
    x, y = get_batch(sequences, indices)
    return {"input_ids": x, "labels": y}


def validation_batches(sequences: PackedSequences, batch_size: int, batches: int) -> list[dict[str, torch.Tensor]]:
    """The first `batches` batches of validation samples, in file order."""
    n = min(len(sequences), batch_size * batches)
    return [sequence_batch(sequences, list(range(start, min(start + batch_size, n))))
            for start in range(0, n, batch_size)]


def corpus_is_current(corpus_dir: Path, data: DataConfig, seed: int) -> bool:
    """Whether `corpus_dir` already holds these files tokenized this way (so a resumed run reuses it)."""
    try:
        info = CorpusInfo.load(corpus_dir)
    except FileNotFoundError:
        return False
    return (info.sources, info.tokenizer_dir, info.val_fraction, info.seed, info.split, info.column) == (
        source_names(data.paths), str(data.tokenizer.resolve()), data.val_fraction, seed, data.split,
        data.text_column)


def build_model(spec: ModelSpec, tokenizer: Tokenizer, seq_len: int, seed: int) -> Transformer:
    if spec.init_from is not None:
        return load_model(spec.init_from, dtype=torch.float32)
    if spec.preset is None:
        raise ValueError("model: give a preset or init_from")
    fields: dict[str, Any] = dict(
        vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
        pad_token_id=tokenizer.pad_id,
    )
    fields.update(spec.overrides)
    config: ModelConfig = preset(spec.preset, **fields)
    if config.max_position_embeddings < seq_len:
        raise ValueError(f"data.seq_len {seq_len} exceeds the model's max_position_embeddings "
                         f"{config.max_position_embeddings}")
    model = Transformer(config)
    model.init_weights(seed)
    return model


def pretrain(config: PretrainConfig, *, resume: bool = False) -> Path:
    """Run pretraining; returns the final HF model directory."""
    started = time.perf_counter()
    env: Dist = init_distributed()
    data, out = config.data, config.out_dir
    corpus_dir = out / "data"
    if data.streaming and is_seq2seq_spec(config.model):
        raise ValueError("data.streaming: span corruption for an encoder-decoder reads token files; "
                         "set data.streaming=false")
    if env.is_main and not data.streaming and not corpus_is_current(corpus_dir, data, config.train.seed):
        tokenize_corpus(data.paths, data.tokenizer, corpus_dir, val_fraction=data.val_fraction,
                        seed=config.train.seed, workers=data.workers, split=data.split, column=data.text_column)
    barrier(env)
    tokenizer = Tokenizer.from_dir(data.tokenizer)

    cfg = config.train
    global_batch = cfg.global_batch_size(env.world_size)
    if data.streaming:
        model = build_model(config.model, tokenizer, data.seq_len, cfg.seed).to(env.device)
        source, val_batches, prompts = streamed_batches(data, tokenizer, global_batch, cfg)
        loss_fn, flops, files = causal_lm_loss, model.config.flops_per_token(data.seq_len), None
        tokens = cfg.steps * global_batch * data.seq_len
    elif is_seq2seq_spec(config.model):
        model = build_seq2seq(config.model, tokenizer, cfg.seed).to(env.device)
        source, val_batches, prompts, chunk_tokens = span_corruption_batches(corpus_dir, data, tokenizer, model, cfg,
                                                                             env.world_size)
        loss_fn, flops, files = seq2seq_lm_loss, None, Seq2SeqModelFiles()
        tokens = cfg.steps * global_batch * chunk_tokens
    else:
        info = CorpusInfo.load(corpus_dir)
        model = build_model(config.model, tokenizer, data.seq_len, cfg.seed).to(env.device)
        train_seqs = PackedSequences(corpus_dir / "train.bin", data.seq_len, info.dtype)
        val_seqs = PackedSequences(corpus_dir / "val.bin", data.seq_len, info.dtype)
        source = SampledSource(len(train_seqs), partial(sequence_batch, train_seqs), global_batch, cfg.seed)
        val_batches = validation_batches(val_seqs, cfg.micro_batch_size, data.eval_batches)
        prompts = document_openings(val_seqs.tokens, tokenizer.eos_id)
        loss_fn, flops, files = causal_lm_loss, model.config.flops_per_token(data.seq_len), None
        tokens = cfg.steps * global_batch * data.seq_len
    model = wrap(model, cfg.strategy, env)
    trainer = Trainer(model, cfg, source, loss_fn, out, env=env, tokenizer=tokenizer, flops_per_token=flops,
                      evaluate=validation_loss(val_batches, env.device, loss_fn) if val_batches else None,
                      files=files, run_config=config)
    trainer.run(resume=resume)
    finish_run(trainer, config, "Pretraining", started, tokens=tokens, sample_prompts=prompts)
    return out / "model"


def streamed_batches(data: DataConfig, tokenizer: Tokenizer, global_batch: int,
                     cfg: TrainConfig) -> tuple[StreamedSequences, list[dict[str, torch.Tensor]], list[list[int]]]:
    """The training stream, validation batches (the held-out documents' first windows) and sample prompts."""
    def open_stream() -> Iterator[str]:
        return corpus_documents(data.paths, split=data.split, column=data.text_column, streaming=True)

    source_names(data.paths)  # a missing file is an error now, not at the first batch
    source = StreamedSequences(open_stream, tokenizer, data.seq_len, global_batch, seed=cfg.seed,
                               val_fraction=data.val_fraction)
    n = cfg.micro_batch_size * data.eval_batches
    held_out = source.validation_tokens(n * data.seq_len + 1)
    starts = range(0, len(held_out) - data.seq_len, data.seq_len)  # windows as PackedSequences cuts a token file
    windows = torch.from_numpy(np.stack([held_out[s : s + data.seq_len + 1] for s in starts])) if starts else None
    batches = [] if windows is None else [{"input_ids": part[:, :-1], "labels": part[:, 1:]}
                                          for part in windows.split(cfg.micro_batch_size)]
    return source, batches, document_openings(held_out, tokenizer.eos_id)


def document_openings(tokens: np.ndarray, eos_id: int | None, n: int = 4, length: int = 12) -> list[list[int]]:
    """The first `length` tokens of the first `n` whole documents in a token stream (EOS-separated)."""
    if eos_id is None:
        return []
    head = np.asarray(tokens[: 200 * length * n])
    starts = (np.flatnonzero(head == eos_id) + 1).tolist()
    return [head[s : s + length].tolist() for s in starts
            if s + length <= len(head) and eos_id not in head[s : s + length]][:n]


def load_pretrain_config(path: str | Path, overrides: list[str]) -> PretrainConfig:
    return load_recipe(PretrainConfig, path, overrides)
