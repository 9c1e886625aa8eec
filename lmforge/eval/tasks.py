"""Evaluation tasks: JSONL records, exemplar pools and prompts (zero/few-shot, chain of thought, chat).

A task is a JSONL file of one kind of record (the kind is read from the first record):
- generation `{"prompt", "answer"}` (optional `"rationale"`, shown in chain-of-thought exemplars),
- multiple choice `{"question", "choices", "answer_index"}`,
- perplexity `{"text"}`.
Other fields are kept out of the way (ignored). Few-shot exemplars come from a separate pool, never
from the test records: for a file `NAME.jsonl` the sibling `NAME.exemplars.jsonl`, for a directory
its `train.jsonl` (the test records being its `test.jsonl`). A malformed record is a `RecordError`
naming the file, the line and the field."""

from __future__ import annotations

import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

from lmforge.data.hub_datasets import label, parse_hub_dataset, read_records, split_names
from lmforge.io import RecordError
from lmforge.tokenizer import Message

Kind = Literal["generation", "choice", "perplexity"]
COT_CUE = "Let's think step by step."
FEWSHOT_SEPARATOR = "\n\n"
_ANSWER_IS = re.compile(r"answer is:?\s*(.+)", re.IGNORECASE)
_SENTENCE_END = re.compile(r"\.(?=\s|$)")


@dataclass(frozen=True)
class GenerationItem:
    prompt: str
    answer: str
    rationale: str | None = None


@dataclass(frozen=True)
class ChoiceItem:
    question: str
    choices: tuple[str, ...]
    answer_index: int


@dataclass(frozen=True)
class TextItem:
    text: str


Item = GenerationItem | ChoiceItem | TextItem
KIND_OF: dict[type, Kind] = {GenerationItem: "generation", ChoiceItem: "choice", TextItem: "perplexity"}


@dataclass(frozen=True)
class Task:
    """Test items of one kind, the exemplar pool few-shot prompts draw from, how a prompt or
    question reads outside chat mode (`template`, with `{}` for it), and the counterfactual term
    swaps fairness evaluation makes in its prompts and references (none: pronouns)."""

    name: str
    items: list[Item]
    exemplars: list[Item] = field(default_factory=list)
    template: str = "{}"
    exemplar_source: str = "no exemplar pool"
    swaps: dict[str, str] = field(default_factory=dict)

    @property
    def kind(self) -> Kind:
        return KIND_OF[type(self.items[0])]


# ---- reading task files ------------------------------------------------------------------------


def read_task_file(path: str | Path, *, split: str = "test", columns: Mapping[str, str] | None = None) -> list[Item]:
    """The records of a task JSONL file (or a Hub dataset's `split`, fields renamed by `columns`), all of the
    kind of its first record."""
    items: list[Item] = []
    kind: Kind | None = None
    for line_no, record in read_records(path, split=split, columns=columns):
        error = partial(RecordError, label(path, split), line_no)
        kind = kind or _detect(record, error)
        items.append(PARSERS[kind](record, error))
    if not items:
        raise ValueError(f"{label(path, split)}: no records")
    return items


def task_files(path: str | Path) -> tuple[Path, Path]:
    """(test records, exemplar pool, which may not exist) of a task file or directory."""
    path = Path(path)
    if path.is_dir():
        test, pool = path / "test.jsonl", path / "train.jsonl"
        if not test.is_file():
            raise FileNotFoundError(f"task directory {path} has no test.jsonl")
    else:
        test, pool = path, path.with_name(path.name.removesuffix(".jsonl") + ".exemplars.jsonl")
    return test, pool


def load_task_file(path: str | Path) -> Task:
    """A task from a JSONL file or a directory, with its exemplar pool if there is one."""
    test, pool = task_files(path)
    items = read_task_file(test)
    exemplars = read_task_file(pool) if pool.is_file() else []
    check_exemplar_kind(items, exemplars, pool)
    name = Path(path).name.removesuffix(".jsonl")
    return Task(name, items, exemplars, exemplar_source=str(pool) if pool.is_file() else f"no {pool}")


def load_hub_task(source: str, *, split: str = "test", columns: Mapping[str, str] | None = None,
                  exemplar_split: str = "train") -> Task:
    """A task from a Hub dataset: the items of `split`, few-shot exemplars from `exemplar_split` if it has one."""
    items = read_task_file(source, split=split, columns=columns)
    pool = exemplar_split != split and exemplar_split in split_names(source)
    exemplars = read_task_file(source, split=exemplar_split, columns=columns) if pool else []
    check_exemplar_kind(items, exemplars, label(source, exemplar_split))
    name = parse_hub_dataset(source).repo_id.split("/")[-1]
    return Task(name, items, exemplars, exemplar_source=label(source, exemplar_split) if pool else
                f"no {exemplar_split} split")


def check_exemplar_kind(items: list[Item], exemplars: list[Item], where: str | Path) -> None:
    """Exemplars of a task must be of its items' kind."""
    if exemplars and KIND_OF[type(exemplars[0])] != KIND_OF[type(items[0])]:
        raise ValueError(f"{where}: {KIND_OF[type(exemplars[0])]} exemplars for a {KIND_OF[type(items[0])]} task")


def _detect(record: dict[str, Any], error: Any) -> Kind:
    if "choices" in record or "question" in record:
        return "choice"
    if "prompt" in record or "answer" in record:
        return "generation"
    if "text" in record:
        return "perplexity"
    raise error("<record>", "expected {'prompt', 'answer'} (generation), {'question', 'choices', 'answer_index'} "
                            "(multiple choice) or {'text'} (perplexity)")


def _string(record: dict[str, Any], name: str, error: Any) -> str:
    value = record.get(name)
    if not isinstance(value, str):
        raise error(name, "missing" if value is None else f"must be a string, got {type(value).__name__}")
    return value


def _generation(record: dict[str, Any], error: Any) -> GenerationItem:
    prompt = _string(record, "prompt", error)
    if not prompt.strip():
        raise error("prompt", "empty")
    rationale = _string(record, "rationale", error) if record.get("rationale") is not None else None
    return GenerationItem(prompt, _string(record, "answer", error), rationale)


def _choice(record: dict[str, Any], error: Any) -> ChoiceItem:
    question = _string(record, "question", error)
    choices = record.get("choices")
    if not isinstance(choices, list) or len(choices) < 2:
        raise error("choices", "must be a list of at least two strings")
    for i, choice in enumerate(choices):
        if not isinstance(choice, str) or not choice:
            raise error(f"choices[{i}]", "must be a non-empty string")
    index = record.get("answer_index")
    if not isinstance(index, int) or isinstance(index, bool):
        raise error("answer_index", "missing" if index is None else "must be an integer")
    if not 0 <= index < len(choices):
        raise error("answer_index", f"{index} is out of range for {len(choices)} choices (0 to {len(choices) - 1})")
    return ChoiceItem(question, tuple(choices), index)


def _text(record: dict[str, Any], error: Any) -> TextItem:
    text = _string(record, "text", error)
    if not text:
        raise error("text", "empty")
    return TextItem(text)


PARSERS = {"generation": _generation, "choice": _choice, "perplexity": _text}


# ---- prompts -----------------------------------------------------------------------------------


def check_shots(task: Task, shots: int) -> None:
    """Raise a clear error when `shots` exemplars cannot be drawn for this task."""
    if shots < 0:
        raise ValueError(f"shots must be >= 0, got {shots}")
    if shots and task.kind == "perplexity":
        raise ValueError("perplexity tasks take no few-shot exemplars")
    if shots > len(task.exemplars):
        hint = "" if task.exemplars else (" (put them in NAME.exemplars.jsonl beside a task file NAME.jsonl, "
                                          "or train.jsonl in a task directory)")
        raise ValueError(f"{shots} shots asked for but the exemplar pool has {len(task.exemplars)} records: "
                         f"{task.exemplar_source}{hint}")


def draw_exemplars(task: Task, item: Item, shots: int, rng: random.Random) -> list[Item]:
    """`shots` exemplars for one test item, drawn without replacement; never the item itself."""
    pool = [e for e in task.exemplars if _key(e) != _key(item)]
    if shots > len(pool):
        raise ValueError(f"{shots} shots asked for but only {len(pool)} exemplars differ from a test item "
                         f"({task.exemplar_source})")
    return rng.sample(pool, shots)


def _key(item: Item) -> str:
    return item.prompt if isinstance(item, GenerationItem) else item.question if isinstance(item, ChoiceItem) else ""


def target(item: GenerationItem, cot: bool) -> str:
    """An exemplar's answer as the model should write it."""
    if not cot:
        return item.answer
    end = "" if item.answer.endswith((".", "!", "?")) else "."
    return (f"{item.rationale} " if item.rationale else "") + f"The answer is {item.answer}{end}"


def generation_text(task: Task, item: GenerationItem, exemplars: Sequence[GenerationItem], cot: bool) -> str:
    """A raw-text prompt: exemplars `prompt answer` separated by blank lines, then the test prompt."""
    cue = f" {COT_CUE}" if cot else ""
    shots = [f"{task.template.format(e.prompt)}{cue} {target(e, cot)}" for e in exemplars]
    return FEWSHOT_SEPARATOR.join([*shots, task.template.format(item.prompt) + cue])


def generation_messages(item: GenerationItem, exemplars: Sequence[GenerationItem], cot: bool) -> list[Message]:
    """A chat: each exemplar a user turn and the assistant's answer, then the test prompt as a user turn."""
    cue = f"\n{COT_CUE}" if cot else ""
    messages = []
    for e in exemplars:
        messages += [{"role": "user", "content": e.prompt + cue}, {"role": "assistant", "content": target(e, cot)}]
    return messages + [{"role": "user", "content": item.prompt + cue}]


def choice_context(task: Task, item: ChoiceItem, exemplars: Sequence[ChoiceItem]) -> str:
    """The raw-text context every choice of `item` continues (after a space)."""
    shots = [f"{task.template.format(e.question)} {e.choices[e.answer_index]}" for e in exemplars]
    return FEWSHOT_SEPARATOR.join([*shots, task.template.format(item.question)])


def choice_messages(item: ChoiceItem, exemplars: Sequence[ChoiceItem]) -> list[Message]:
    """The chat every choice of `item` continues as the assistant's reply."""
    messages = []
    for e in exemplars:
        messages += [{"role": "user", "content": e.question},
                     {"role": "assistant", "content": e.choices[e.answer_index]}]
    return messages + [{"role": "user", "content": item.question}]


def extract_answer(output: str, cot: bool) -> str:
    """The answer in a generated text: after the last "the answer is" (chain of thought; else its last
    line), or the whole text stripped."""
    text = output.strip()
    if not cot:
        return text
    matches = _ANSWER_IS.findall(text)
    if matches:
        return _SENTENCE_END.split(matches[-1])[0].strip()
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""
