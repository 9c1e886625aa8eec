"""Sequence-to-sequence (T5) fine-tuning data: (input text, target text) pairs from JSONL, tokenized
and batched as transformers' T5 recipe does (`run_summarization.py` + `DataCollatorForSeq2Seq` +
`T5ForConditionalGeneration._shift_right`).

Record formats:
- `{"input": ..., "target": ...}`, both strings;
- every SFT format of `lmforge.data.chat` (`messages`, Alpaca, `prompt`/`completion`), mapped to a
  pair. The target is the last assistant turn. The input is what precedes it: a lone user turn
  verbatim (so a one-turn chat, `{"prompt", "completion"}` with strings and Alpaca, whose user turn is
  instruction + "\\n\\n" + input, all give the same pair for the same text); anything longer (a system
  turn, earlier turns) one line per turn, "System: ...", "User: ...", "Assistant: ...", joined by
  newlines. The last user message alone would lose what a follow-up question refers to, and
  unlabelled lines would lose who said what; T5 and FLAN-T5 read plain text, so no chat markers.
  Turns after the last assistant turn are dropped; earlier assistant turns are input, not targets.

Each dataset of a mixture may carry a task prefix (T5's and FLAN's "summarize: ") put before every
input. Tokens: the input's ids + `</s>` cut to `max_source_len`, the target's ids + `</s>` cut to
`max_target_len` (`</s>` kept last, as a tokenizer with T5's `$A </s>` post-processor truncates).
Batches: `input_ids` right-padded with the pad id, `attention_mask`, `labels` (target ids, IGNORE on
padding) and `decoder_input_ids` (the labels shifted right behind the decoder start token, IGNORE
replaced by the pad id). No packing. A malformed record is an error naming file, line and field."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from lmforge.data.chat import IGNORE, to_messages
from lmforge.data.sampling import MixtureSource, holdout_split
from lmforge.data.hub_datasets import DataSource, label, read_records
from lmforge.io import RecordError
from lmforge.tokenizer import Message, Tokenizer

SFT_FIELDS = ("messages", "instruction", "output", "prompt", "completion")


class Seq2SeqDatasetSpec(DataSource):
    model_config = ConfigDict(extra="forbid")

    weight: float = Field(1.0, gt=0, description="share of the training examples drawn from this dataset")
    prefix: str = Field("", description="task prefix put before every input, e.g. 'summarize: '")


class Seq2SeqDataConfig(BaseModel):
    """The data section of a seq2seq fine-tuning recipe."""

    model_config = ConfigDict(extra="forbid")

    datasets: list[Seq2SeqDatasetSpec] = Field(min_length=1)
    val_path: Path | None = Field(None, description="validation pairs: a JSONL file or a Hub dataset (its "
                                                    "val_split; the first dataset's prefix and columns)")
    val_split: str = Field("test", description="the split of a Hub dataset val_path")
    val_fraction: float = Field(0.05, ge=0, lt=1, description="held out of the first dataset without val_path")
    max_source_len: int = Field(512, gt=1, description="longest input in tokens, </s> included (longer ones are cut)")
    max_target_len: int = Field(128, gt=1, description="longest target in tokens, </s> included (longer ones are cut)")
    eval_batches: int = Field(8, gt=0)


# ---- records -------------------------------------------------------------------------------------


@dataclass
class Pair:
    """One input/target pair and where it was read."""

    input: str
    target: str
    path: Path | None = None
    line: int = 0


def read_pairs(path: str | Path, prefix: str = "", *, split: str = "train",
               columns: Mapping[str, str] | None = None) -> list[Pair]:
    """Every record of a JSONL file (blank lines skipped) or a Hub dataset's split as a pair, `prefix` put
    before each input, fields renamed by `columns`."""
    pairs = []
    for line_no, record in read_records(path, split=split, columns=columns):
        source, target = record_pair(record, partial(RecordError, label(path, split), line_no))
        pairs.append(Pair(prefix + source, target, Path(path), line_no))
    if not pairs:
        raise ValueError(f"{label(path, split)}: no records")
    return pairs


def record_pair(record: Mapping[str, Any], error: Any) -> tuple[str, str]:
    """(input, target) of one record in any supported format; `error(field, problem)` builds the
    exception to raise."""
    if "target" in record or ("input" in record and not {"instruction", "output"} & record.keys()):
        for field in ("input", "target"):
            if not isinstance(record.get(field), str):
                raise error(field, "input/target records need string 'input' and 'target'")
        return record["input"], record["target"]
    if not any(field in record for field in SFT_FIELDS):
        raise error("<record>", "expected 'input'/'target', 'messages', Alpaca's 'instruction'/'output', "
                                "or 'prompt'/'completion'")
    field = "messages" if "messages" in record else "completion"
    return conversation_pair(to_messages(record, error), lambda problem: error(field, problem))


def conversation_pair(messages: Sequence[Message], error: Any) -> tuple[str, str]:
    """(input, target) of a conversation: the last assistant turn and what precedes it (see the module
    docstring); `error(problem)` builds the exception to raise."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise error("no assistant turn to learn from")
    context = messages[:last]
    if not context:
        raise error("no turn before the last assistant turn to use as the input")
    if len(context) == 1 and context[0]["role"] == "user":
        return context[0]["content"], messages[last]["content"]
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in context]
    return "\n".join(lines), messages[last]["content"]


# ---- tokens --------------------------------------------------------------------------------------


@dataclass
class Seq2SeqExample:
    """One tokenized pair: the encoder's `input_ids` and the target's ids (`labels`), each ending in `</s>`."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False


def encode_pairs(tokenizer: Tokenizer, pairs: Sequence[Pair], max_source_len: int,
                 max_target_len: int) -> list[Seq2SeqExample]:
    """Tokenize pairs: text ids + `</s>`, cut to the lengths with `</s>` kept last."""
    eos = tokenizer.eos_id
    if eos is None:
        raise ValueError("seq2seq data needs a tokenizer with an eos_token (T5's '</s>')")
    sources = tokenizer.encode_batch([p.input for p in pairs])
    targets = tokenizer.encode_batch([p.target for p in pairs])
    examples = []
    for source, target in zip(sources, targets):
        truncated = len(source) >= max_source_len or len(target) >= max_target_len
        examples.append(Seq2SeqExample([*source[: max_source_len - 1], eos], [*target[: max_target_len - 1], eos],
                                       truncated))
    return examples


def load_examples(path: str | Path, tokenizer: Tokenizer, config: Seq2SeqDataConfig, prefix: str = "", *,
                  split: str = "train", columns: Mapping[str, str] | None = None) -> list[Seq2SeqExample]:
    """The tokenized pairs of one file or Hub dataset split."""
    pairs = read_pairs(path, prefix, split=split, columns=columns)
    return encode_pairs(tokenizer, pairs, config.max_source_len, config.max_target_len)


def load_data(config: Seq2SeqDataConfig, tokenizer: Tokenizer,
              seed: int) -> tuple[list[list[Seq2SeqExample]], list[Seq2SeqExample]]:
    """Training examples per dataset and validation examples (`val_path`, or `val_fraction` of the
    first dataset held out), as `train.sft.load_data` splits chat data."""
    train = [load_examples(d.path, tokenizer, config, d.prefix, split=d.split, columns=d.columns)
             for d in config.datasets]
    if config.val_path is not None:
        first = config.datasets[0]
        val = load_examples(config.val_path, tokenizer, config, first.prefix, split=config.val_split,
                            columns=first.columns)
    else:
        train[0], val = holdout_split(train[0], config.val_fraction, seed)
    return train, val


# ---- batches -------------------------------------------------------------------------------------


def shift_right(labels: torch.Tensor, decoder_start_id: int, pad_id: int) -> torch.Tensor:
    """Decoder inputs for `labels`: the start token, then the labels without their last position;
    IGNORE becomes the pad id (teacher forcing, as `T5ForConditionalGeneration._shift_right`)."""
    shifted = torch.full_like(labels, decoder_start_id)
    shifted[..., 1:] = labels[..., :-1]
    return shifted.masked_fill(shifted == IGNORE, pad_id)


def collate(examples: Sequence[Seq2SeqExample], pad_id: int, decoder_start_id: int) -> dict[str, torch.Tensor]:
    """Right-pad inputs and targets to the batch's longest of each, as `DataCollatorForSeq2Seq`."""
    rows = len(examples)
    source_len = max(len(e.input_ids) for e in examples)
    target_len = max(len(e.labels) for e in examples)
    input_ids = torch.full((rows, source_len), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((rows, source_len), dtype=torch.long)
    labels = torch.full((rows, target_len), IGNORE, dtype=torch.long)
    for row, e in enumerate(examples):
        input_ids[row, : len(e.input_ids)] = torch.tensor(e.input_ids)
        attention_mask[row, : len(e.input_ids)] = 1
        labels[row, : len(e.labels)] = torch.tensor(e.labels)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "decoder_input_ids": shift_right(labels, decoder_start_id, pad_id)}


def mixture_source(train: Sequence[Sequence[Seq2SeqExample]], config: Seq2SeqDataConfig, *, pad_id: int,
                   decoder_start_id: int, global_batch: int, seed: int) -> MixtureSource:
    """Resumable training batches drawn from the datasets in proportion to their weights."""
    return MixtureSource(train, [d.weight for d in config.datasets],
                         partial(collate, pad_id=pad_id, decoder_start_id=decoder_start_id), global_batch, seed)


def validation_batches(examples: Sequence[Seq2SeqExample], batch_size: int, batches: int, *, pad_id: int,
                       decoder_start_id: int) -> list[dict[str, torch.Tensor]]:
    """The first `batches` batches of validation examples."""
    chosen = examples[: batch_size * batches]
    return [collate(chosen[start : start + batch_size], pad_id, decoder_start_id)
            for start in range(0, len(chosen), batch_size)]
