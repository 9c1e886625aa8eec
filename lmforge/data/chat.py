"""Supervised fine-tuning data: the JSONL formats people already have, rendered with the model's
chat template into token ids and labels that take the loss on assistant tokens only.

Record formats (TRL's and Alpaca's):
- `{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}`
- `{"instruction": ..., "input": ... (optional), "output": ...}` (Alpaca)
- `{"prompt": ..., "completion": ...}`, each a string or a list of messages.

A record that fits none of them, or has no assistant turn, is an error naming the file, the line
and the field. Prompt files (for sampling: PPO, rejection sampling) hold `{"prompt": text |
messages}` or `{"messages": ...}` records, or any SFT record where asked."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.data.hub_datasets import label, read_records
from lmforge.io import RecordError
from lmforge.tokenizer import Message, Tokenizer

ROLES = ("system", "user", "assistant")
IGNORE = -100  # the label of a position that takes no loss (PyTorch's cross-entropy ignore_index)


def read_messages(path: str | Path, *, split: str = "train", columns: Mapping[str, str] | None = None,
                  ) -> Iterator[tuple[int, list[Message]]]:
    """(line or row number, conversation) for each record of an SFT JSONL file (blank lines skipped) or a
    Hub dataset's split, fields renamed by `columns`."""
    name = label(path, split)
    for line_no, record in read_records(path, split=split, columns=columns):
        messages = to_messages(record, partial(RecordError, name, line_no))
        if not any(m["role"] == "assistant" for m in messages):
            raise RecordError(name, line_no, "messages", "no assistant turn to learn from")
        yield line_no, messages


def to_messages(record: Mapping[str, Any], error: Any) -> list[Message]:
    """One record in any supported format as a list of messages; `error(field, problem)` builds
    the exception to raise."""
    if "messages" in record:
        return check_messages(record["messages"], "messages", error)
    if "conversations" in record:
        return check_messages(record["conversations"], "conversations", error)
    if "instruction" in record or "output" in record:
        for field in ("instruction", "output"):
            if not isinstance(record.get(field), str):
                raise error(field, "Alpaca records need string 'instruction' and 'output'")
        extra = record.get("input") or ""
        if not isinstance(extra, str):
            raise error("input", "must be a string")
        user = record["instruction"] + (f"\n\n{extra}" if extra.strip() else "")
        return [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]
    if "prompt" in record or "completion" in record:
        prompt, completion = record.get("prompt"), record.get("completion")
        if isinstance(prompt, str) and isinstance(completion, str):
            return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        if isinstance(prompt, list) and isinstance(completion, list):
            return check_messages(prompt, "prompt", error) + check_messages(completion, "completion", error)
        field = "prompt" if not isinstance(prompt, (str, list)) else "completion"
        raise error(field, "'prompt' and 'completion' must both be strings or both be lists of messages")
    raise error("<record>", "expected 'messages', Alpaca's 'instruction'/'output', or 'prompt'/'completion'")


def check_messages(messages: Any, field: str, error: Any) -> list[Message]:
    """A list of `{"role", "content"}` messages (ShareGPT's `{"from", "value"}` read as such), checked."""
    if not isinstance(messages, list) or not messages:
        raise error(field, "must be a non-empty list of messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise error(f"{field}[{i}]", "must be an object with 'role' and 'content'")
        if "from" in m and "role" not in m:
            m = sharegpt_message(m, f"{field}[{i}]", error)
        if m.get("role") not in ROLES:
            raise error(f"{field}[{i}].role", f"must be one of {', '.join(ROLES)}, got {m.get('role')!r}")
        if not isinstance(m.get("content"), str):
            raise error(f"{field}[{i}].content", "must be a string")
        out.append({"role": m["role"], "content": m["content"]})
    return out


SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}


def sharegpt_message(message: Mapping[str, Any], field: str, error: Any) -> Message:
    """ShareGPT's `{"from": "human"|"gpt"|"system", "value": ...}` as a `{"role", "content"}` message."""
    if message["from"] not in SHAREGPT_ROLES:
        raise error(f"{field}.from", f"must be one of {', '.join(SHAREGPT_ROLES)}, got {message['from']!r}")
    return {"role": SHAREGPT_ROLES[message["from"]], "content": message.get("value")}


@dataclass
class Example:
    """One tokenized conversation: `labels[t]` is the token after `input_ids[t]` where that token
    belongs to an assistant turn, IGNORE elsewhere."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False


def encode(tokenizer: Tokenizer, messages: Sequence[Message], max_len: int) -> Example | None:
    """Render and shift one conversation, cut to `max_len` inputs; None if no assistant token is left."""
    ids, mask = tokenizer.render_chat(messages)
    truncated = len(ids) > max_len + 1
    ids, mask = ids[: max_len + 1], mask[: max_len + 1]
    labels = [t if m else IGNORE for t, m in zip(ids[1:], mask[1:])]
    if all(label == IGNORE for label in labels):
        return None
    return Example(ids[:-1], labels, truncated)


@dataclass
class SFTData:
    """The tokenized examples of one file, and how many were cut or dropped to fit `max_len`."""

    path: str  # the file, or the Hub dataset and split
    examples: list[Example]
    truncated: int
    dropped: int

    @classmethod
    def load(cls, path: str | Path, tokenizer: Tokenizer, max_len: int, *, split: str = "train",
             columns: Mapping[str, str] | None = None) -> SFTData:
        examples, truncated, dropped = [], 0, 0
        for _, messages in read_messages(path, split=split, columns=columns):
            example = encode(tokenizer, messages, max_len)
            if example is None:
                dropped += 1  # its assistant turns lie wholly beyond max_len
                continue
            truncated += example.truncated
            examples.append(example)
        if not examples:
            raise ValueError(f"{label(path, split)}: no usable examples (dropped {dropped} whose answers lie beyond "
                             f"{max_len} tokens)")
        return cls(label(path, split), examples, truncated, dropped)


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its longest example (padding after the text changes nothing before it)."""
    longest = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), longest), IGNORE, dtype=torch.long)
    for row, e in enumerate(examples):
        ids[row, : len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[row, : len(e.labels)] = torch.tensor(e.labels)
    return {"input_ids": ids, "labels": labels}


def length_groups(batch: dict[str, torch.Tensor], min_saving: float = 0.25) -> list[dict[str, torch.Tensor]]:
    """A right-padded causal batch as two sub-batches of rows of similar length, each cut after its last
    labelled position, when that computes at least `min_saving` fewer positions than the whole batch so
    cut; else the whole batch so cut. Exact for a causal model: a logit depends only on the tokens up to
    it, so the positions after a row's last label change none of its loss terms."""
    labels = batch["labels"]
    positions = torch.arange(1, labels.shape[1] + 1).expand_as(labels)
    lengths = (positions * (labels != IGNORE)).amax(dim=1).clamp(min=1).tolist()
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    longest = lengths[order[-1]]
    cost = {k: k * lengths[order[k - 1]] + (len(order) - k) * longest for k in range(1, len(order))}
    split = min(cost, key=cost.get, default=None)
    if split is not None and cost[split] <= (1 - min_saving) * len(order) * longest:
        groups = [sorted(order[:split]), sorted(order[split:])]
        return [{k: v[rows][:, : max(lengths[r] for r in rows)] for k, v in batch.items()} for rows in groups]
    return [{k: v[:, :longest] for k, v in batch.items()}]


def pack(examples: Sequence[Example], seq_len: int) -> list[Example]:
    """Concatenate examples into rows of exactly `seq_len` (the last partial row dropped). Examples
    attend to the ones before them in a row, as in TRL's classic packing; no loss crosses a boundary."""
    ids = np.fromiter((t for e in examples for t in e.input_ids), dtype=np.int64)
    labels = np.fromiter((t for e in examples for t in e.labels), dtype=np.int64)
    rows = len(ids) // seq_len
    return [Example(ids[r * seq_len : (r + 1) * seq_len].tolist(), labels[r * seq_len : (r + 1) * seq_len].tolist())
            for r in range(rows)]


def padding_id(tokenizer: Tokenizer) -> int:
    """The id batches are right-padded with: the tokenizer's pad token, else its EOS, else 0."""
    for candidate in (tokenizer.pad_id, tokenizer.eos_id):
        if candidate is not None:
            return candidate
    return 0


def response_prompts(examples: Sequence[Example], n: int = 4) -> list[list[int]]:
    """The prompt part (every token before the first labelled one) of the first `n` examples."""
    prompts = []
    for example in examples[:n]:
        first = next((t for t, label in enumerate(example.labels) if label != IGNORE), None)
        if first is not None:
            prompts.append(example.input_ids[: first + 1])
    return prompts


# ---- prompts -------------------------------------------------------------------------------------


@dataclass
class Prompt:
    """A conversation to reply to, and where it was read (`path`, `line`); `risky` marks a prompt
    whose answer the safety reward model scores."""

    messages: list[Message]
    risky: bool = False
    path: Path | None = None
    line: int | None = None


def read_prompts(path: str | Path, *, sft_records: bool = False, split: str = "train") -> list[Prompt]:
    """Prompts from JSONL (or a Hub dataset's `split`): `{"prompt": text | messages}` (prompt files,
    preference pairs) or `{"messages": ...}` (up to its last user turn), with an optional `risky` flag;
    with `sft_records`, any SFT record too (its conversation before the last assistant turn). Blank
    lines are skipped."""
    prompts = []
    for line_no, record in read_records(path, split=split):
        messages = prompt_messages(record, partial(RecordError, label(path, split), line_no), sft_records)
        prompts.append(Prompt(messages, bool(record.get("risky", False)), Path(path), line_no))
    if not prompts:
        raise ValueError(f"{label(path, split)}: no prompts")
    return prompts


def prompt_messages(record: Mapping[str, Any], error: Any, sft_records: bool) -> list[Message]:
    """The conversation of one prompt record that the reply continues; `error(field, problem)`
    builds the exception to raise."""
    if "prompt" in record and "completion" not in record:
        value = record["prompt"]
        if isinstance(value, str):
            if not value.strip():
                raise error("prompt", "empty")
            return [{"role": "user", "content": value}]
        messages = check_messages(value, "prompt", error)
        if messages[-1]["role"] == "assistant":
            raise error("prompt", "ends with an assistant turn: nothing is left to answer")
        return messages
    if not sft_records and "messages" not in record:
        raise error("prompt", "records need 'prompt' (text or messages) or 'messages'")
    messages = to_messages(record, error)
    while messages and messages[-1]["role"] == "assistant":
        messages.pop()
    if not messages:
        raise error("messages", "no turn before an assistant turn to use as the prompt")
    return messages
