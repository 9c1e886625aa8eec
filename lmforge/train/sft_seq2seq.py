"""The encoder-decoder side of `lmforge sft`: a T5 base (told apart by its config.json, `is_seq2seq`) trains
on (input, target) pairs (`lmforge.data.seq2seq`) with the cross-entropy of the target tokens, in the same
loop, with the same adapters, checkpoints and resume as a decoder.

A recipe's `data` section is read as the base needs it: `max_len`/`packing` are a decoder's,
`max_source_len`/`max_target_len` and per-dataset `prefix` an encoder-decoder's; a section with neither
fits both, and one with both is an error."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from torch import Tensor, nn
from tqdm.auto import tqdm

from lmforge.checkpoint import read_tensors
from lmforge.data import seq2seq as s2s
from lmforge.data.sampling import MixtureSource
from lmforge.seq2seq import Seq2SeqConfig
from lmforge.seq2seq_checkpoint import IGNORED, save_seq2seq
from lmforge.tokenizer import Tokenizer
from lmforge.train.distributed import unwrap
from lmforge.train.loop import ModelFiles, TrainConfig

DECODER_ONLY = ("max_len", "packing")
SEQ2SEQ_ONLY = ("max_source_len", "max_target_len", "prefix")


def data_fields(data: Any) -> set[str]:
    """The fields a `data` section (a dict, or a data config) sets, its datasets' fields included."""
    if isinstance(data, BaseModel):
        data = data.model_dump(exclude_unset=True)
    if not isinstance(data, dict):
        return set()
    fields = set(data)
    for spec in data.get("datasets") or []:
        fields |= set(spec) if isinstance(spec, dict) else set()
    return fields


def data_kind(data: Any) -> str:
    """Which data config reads a `data` section: the encoder-decoder's if it sets one of its own fields."""
    return "Seq2SeqDataConfig" if data_fields(data) & set(SEQ2SEQ_ONLY) else "SFTDataConfig"


def check_data_kind(data: Any) -> None:
    """A `data` section may set a decoder's fields or an encoder-decoder's, not both."""
    fields = data_fields(data)
    decoder, seq2seq = sorted(fields & set(DECODER_ONLY)), sorted(fields & set(SEQ2SEQ_ONLY))
    if decoder and seq2seq:
        raise ValueError(f"data sets {decoder[0]} (decoder-only bases) and {seq2seq[0]} (encoder-decoder bases); "
                         "keep the fields of the base's kind")


def data_for_base(data: BaseModel, seq2seq: bool, base: Path, decoder_data: type[BaseModel]) -> BaseModel:
    """The recipe's `data` section as the base's kind reads it (`s2s.Seq2SeqDataConfig` for an encoder-decoder,
    else `decoder_data`); a field of the other kind is an error naming it."""
    target = s2s.Seq2SeqDataConfig if seq2seq else decoder_data
    if isinstance(data, target):
        return data
    wrong = sorted(data_fields(data) & set(DECODER_ONLY if seq2seq else SEQ2SEQ_ONLY))
    if wrong:
        kind, use = ("an encoder-decoder", "max_source_len and max_target_len") if seq2seq else \
            ("a decoder-only", "max_len (and packing)")
        raise ValueError(f"data.{wrong[0]}: {base} is {kind} model; its data section uses {use}")
    return target.model_validate(data.model_dump(exclude_unset=True))


class Seq2SeqModelFiles(ModelFiles):
    """Checkpoints of full encoder-decoder fine-tuning: a `T5ForConditionalGeneration` directory `model/`."""

    def save(self, model: nn.Module, out: Path, state: dict[str, Tensor], tokenizer: Any) -> None:
        save_seq2seq(unwrap(model), out / "model", tokenizer=tokenizer, state_dict=state)

    def load(self, model: nn.Module, checkpoint: Path) -> dict[str, Tensor]:
        state = {k: v for k, v in read_tensors(checkpoint / "model").items() if k not in IGNORED}
        if unwrap(model).config.tie_word_embeddings:  # one tensor on disk, both names in the state dict
            state["lm_head.weight"] = state["shared.weight"]
        return state


def seq2seq_batches(data: s2s.Seq2SeqDataConfig, tokenizer: Tokenizer, config: Seq2SeqConfig, train: TrainConfig,
                    world_size: int) -> tuple[MixtureSource, list[dict[str, Tensor]], list[list[int]]]:
    """Training batches, validation batches and sample prompts (the first validation inputs) of the pairs."""
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    start = config.decoder_start_token_id
    examples, val = s2s.load_data(data, tokenizer, train.seed)
    for spec, found in zip(data.datasets, examples):
        if not found:
            raise ValueError(f"{spec.path}: no training examples left after holding out validation pairs")
        report_truncated(spec.path, found, data)
    source = s2s.mixture_source(examples, data, pad_id=pad, decoder_start_id=start,
                                global_batch=train.global_batch_size(world_size), seed=train.seed)
    batches = s2s.validation_batches(val, train.micro_batch_size, data.eval_batches, pad_id=pad,
                                     decoder_start_id=start) if val else []
    return source, batches, [e.input_ids for e in (val or examples[0])[:4]]


def report_truncated(path: Path, examples: Sequence[s2s.Seq2SeqExample], data: s2s.Seq2SeqDataConfig) -> None:
    cut = sum(e.truncated for e in examples)
    if cut:
        tqdm.write(f"{path}: {cut} pairs cut to {data.max_source_len} input / {data.max_target_len} target tokens")
