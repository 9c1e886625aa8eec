"""The built-in world's multi-task mixture for encoder-decoder (T5) instruction tuning: summarize a
biography into one line, and answer a question about a biography given as context.

Inputs follow T5's task prefixes: "summarize: <biography>" -> `summary(person)` ("Alice Okafor, born
1987 in Port Alder, works for Bluepeak Systems as a data analyst."), and "question: <question>
context: <biography>" -> the bare value ("Port Alder"). People are split as the world splits them
(`Person.split`): tuning data from the "train" people, evaluation from the "heldout" ones, every one of
them (read from their context, so whether pretraining saw them does not matter). Biographies are freshly
drawn wordings (`documents.biography` with a random template per sentence), from a generator of their own
per split and seed, so an evaluation biography is not a pretraining document verbatim. Records are
`{"input", "target"}`, the format of `lmforge.data.seq2seq`; everything is deterministic for a seed.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from lmforge.world.documents import QUESTIONS, biography, write_jsonl
from lmforge.world.people import ATTRIBUTES, Person, Split, World, article

SUMMARIZE_PREFIX = "summarize: "
QA_INPUT = "question: {question} context: {context}"


@dataclass(frozen=True)
class Seq2SeqPair:
    input: str
    target: str
    person: str
    task: str  # "summarize" or "qa"

    def record(self) -> dict[str, str]:
        return {"input": self.input, "target": self.target}


def summary(person: Person) -> str:
    """A person's one-line summary: name, birth year and city, employer and job title."""
    return (f"{person.name}, born {person.birth_date.year} in {person.birth_city}, works for {person.employer} "
            f"as {article(person.job_title)} {person.job_title}.")


def split_people(world: World, split: Split) -> list[Person]:
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    return [p for p in world.people if p.split == split]


def summarization_pairs(world: World, split: Split, *, biographies: int = 1, seed: int = 0) -> list[Seq2SeqPair]:
    """`biographies` differently worded biographies of each person of `split`, each to the person's summary."""
    if biographies < 1:
        raise ValueError(f"biographies must be at least 1, got {biographies}")
    rng = random.Random(f"{world.seed}-summarize-{split}-{seed}")
    return [Seq2SeqPair(SUMMARIZE_PREFIX + biography(p, world, rng), summary(p), p.name, "summarize")
            for p in split_people(world, split) for _ in range(biographies)]


def qa_pairs(world: World, split: Split, *, attributes: Iterable[str] = ATTRIBUTES, seed: int = 0,
             ) -> list[Seq2SeqPair]:
    """For each person of `split` and each of `attributes`, one question (a random phrasing of
    `documents.QUESTIONS`) about a freshly worded biography, answered with the bare value."""
    attributes = list(attributes)
    for attribute in attributes:
        if attribute not in ATTRIBUTES:
            raise ValueError(f"attribute must be one of {ATTRIBUTES}, got {attribute!r}")
    rng = random.Random(f"{world.seed}-qa-{split}-{seed}")
    pairs = []
    for person in split_people(world, split):
        context = biography(person, world, rng)
        for attribute in attributes:
            question = rng.choice(QUESTIONS[attribute]).format(who=person.name)
            pairs.append(Seq2SeqPair(QA_INPUT.format(question=question, context=context), person.fact(attribute),
                                     person.name, "qa"))
    return pairs


def write_seq2seq_data(world: World, out_dir: str | Path, split: Split = "train", *, biographies: int = 2,
                       seed: int = 0) -> dict[str, Path]:
    """Write the mixture's two datasets of `split` as `{"input", "target"}` JSONL: `summarize.jsonl`
    (`biographies` per person) and `qa.jsonl` (every attribute); their paths by task name."""
    out_dir = Path(out_dir)
    return {
        "summarize": write_jsonl(out_dir / "summarize.jsonl",
                                 (p.record() for p in summarization_pairs(world, split, biographies=biographies,
                                                                          seed=seed))),
        "qa": write_jsonl(out_dir / "qa.jsonl", (p.record() for p in qa_pairs(world, split, seed=seed))),
    }
