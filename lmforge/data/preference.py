"""Preference data in TRL's format: JSONL records `{"prompt", "chosen", "rejected"}`, each a string
or a list of messages (a string prompt is a user turn; a string response an assistant turn).

Encoding renders prompt + response with the chat template; labels cover the final response only
(never earlier assistant turns of a multi-turn prompt). A malformed record, an empty or identical
chosen/rejected pair, or a prompt that leaves no room for the response is an error naming the
file, the line and the field."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from lmforge.data.chat import IGNORE, Example, check_messages
from lmforge.data.hub_datasets import label, read_records
from lmforge.io import RecordError
from lmforge.tokenizer import Message, Tokenizer


class PreferenceDataConfig(BaseModel):
    """Where a preference stage reads its pairs (the `data` section of reward and DPO recipes)."""

    model_config = ConfigDict(extra="forbid")

    train_path: Path = Field(description="preference JSONL: {'prompt', 'chosen', 'rejected'}, or a Hub dataset "
                                         "hf:org/name[:config][@revision]")
    val_path: Path | None = Field(None, description="validation pairs: a JSONL file or a Hub dataset")
    split: str = Field("train", description="the split of a Hub dataset train_path")
    val_split: str = Field("test", description="the split of a Hub dataset val_path")
    columns: dict[str, str] = Field({}, description="field lmforge reads -> the column that holds it (e.g. "
                                                    "{chosen: good}), where the names differ")
    val_fraction: float = Field(0.05, ge=0, lt=1, description="held out of train_path without val_path")
    max_len: int = Field(512, gt=1, description="longest prompt + response in tokens (responses are cut)")
    kind: str | None = Field(None, description="keep only records whose 'kind' is this (e.g. helpful, safety)")


@dataclass
class PreferencePair:
    prompt: list[Message]
    chosen: list[Message]
    rejected: list[Message]
    kind: str | None = None  # e.g. "helpful" or "safety" in the built-in world
    path: str | None = None  # the file, or the Hub dataset and split
    line: int = 0
    margin: float | None = None  # the record's own reward margin, if it has one (LLaMA-2's margin loss)


def read_pairs(path: str | Path, *, split: str = "train", columns: Mapping[str, str] | None = None,
               ) -> list[PreferencePair]:
    """Every record of a preference JSONL file (blank lines skipped) or a Hub dataset's split, fields renamed
    by `columns`."""
    name = label(path, split)
    pairs = []
    for line_no, record in read_records(path, split=split, columns=columns):
        error = partial(RecordError, name, line_no)
        prompt = _turns(record, "prompt", "user", error)
        chosen = _turns(record, "chosen", "assistant", error)
        rejected = _turns(record, "rejected", "assistant", error)
        if chosen == rejected:
            raise error("rejected", "identical to 'chosen': the pair expresses no preference")
        kind = record.get("kind")
        margin = record.get("margin")
        if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))
                                   or not math.isfinite(margin)):
            raise error("margin", f"must be a number, got {margin!r}")
        pairs.append(PreferencePair(prompt, chosen, rejected, kind if isinstance(kind, str) else None, name, line_no,
                                    None if margin is None else float(margin)))
    if not pairs:
        raise ValueError(f"{name}: no preference records")
    return pairs


def _turns(record: dict[str, Any], field: str, role: str, error: Any) -> list[Message]:
    if field not in record:
        raise error(field, "missing (records need 'prompt', 'chosen' and 'rejected')")
    value = record[field]
    if isinstance(value, str):
        if not value.strip():
            raise error(field, "empty")
        return [{"role": role, "content": value}]
    messages = check_messages(value, field, error)
    if role == "assistant" and not any(m["content"].strip() for m in messages):
        raise error(field, "empty")
    return messages


@dataclass
class EncodedPair:
    """Chosen and rejected conversations as examples whose labels cover the response only."""

    chosen: Example
    rejected: Example
    prompt_ids: list[int]  # the prompt rendered for generation (ends with the assistant header)


def encode_pair(tokenizer: Tokenizer, pair: PreferencePair, max_len: int) -> EncodedPair:
    """Render and label one pair; responses are cut to fit `max_len` inputs."""
    prompt_ids = tokenizer.encode_chat(pair.prompt)
    if len(prompt_ids) >= max_len:
        where = f"{pair.path}:{pair.line}: " if pair.path else ""
        raise ValueError(f"{where}field 'prompt': {len(prompt_ids)} tokens leave no room for a response within "
                         f"max_len {max_len}")
    return EncodedPair(response_example(tokenizer, pair.prompt, pair.chosen, len(prompt_ids), max_len),
                       response_example(tokenizer, pair.prompt, pair.rejected, len(prompt_ids), max_len), prompt_ids)


def response_example(tokenizer: Tokenizer, prompt: list[Message], response: list[Message], prompt_tokens: int,
                     max_len: int) -> Example:
    """prompt + response as an example labelled on the response's assistant tokens only."""
    ids, mask = tokenizer.render_chat(prompt + response)
    mask = [0] * prompt_tokens + mask[prompt_tokens:]
    truncated = len(ids) > max_len + 1
    ids, mask = ids[: max_len + 1], mask[: max_len + 1]
    return Example(ids[:-1], [t if m else IGNORE for t, m in zip(ids[1:], mask[1:])], truncated)
