"""Evaluation tasks generated from the built-in world, deterministically for its seed and size.

- `world-qa-heldout`: questions about the held-out people (whose facts only pretraining taught),
  answered by generation and scored by exact match; exemplars are training-people questions.
- `world-qa-unseen`: questions about the people left out of pretraining, whom the model never read about
  (closed-book nobody can know the answers: the task for hallucinations and "I don't know").
- `world-qa-train`: questions about the training people, in other phrasings than the fine-tuning
  data's; exemplars are held-out-people questions.
- `world-mc`: each fact of a held-out person as multiple choice: the corpus's own phrasing ("Alice
  Okafor was born in") and four values of that attribute, the true one and three other people's;
  exemplars are the training people's facts.
- `world-bios`: a perplexity set of freshly worded biographies of the held-out people (those left
  out of pretraining among them).
- `world-summarize-heldout`: "summarize: <biography>" of each held-out person, answered with its
  one-line summary (for an encoder-decoder model; ROUGE-1/2/L); exemplars are the training people's.
- `world-qa-context-heldout`: "question: <q> context: <biography>" about each held-out person's
  attributes, answered with the bare value (exact match); exemplars are the training people's.

`WORLD_TASKS` maps each name to a builder from a `World`; `register_tasks` registers them with
`lmforge.eval.registry` for a world of a given seed and size (the command line's `--world-seed` and
`--world-people`). The question tasks carry counterfactual swaps of their people's first names for
first names of other origins (fairness evaluation)."""

from __future__ import annotations

import random
from collections.abc import Callable
from functools import partial

from lmforge.eval.registry import register_task
from lmforge.eval.tasks import ChoiceItem, GenerationItem, Task, TextItem
from lmforge.world.documents import biography, fact_probes, questions, unseen_questions
from lmforge.world.people import ATTRIBUTES, Split, World, origin_swaps, world_of_size
from lmforge.world.seq2seq import Seq2SeqPair, qa_pairs, summarization_pairs

QA_TEMPLATE = "Question: {}\nAnswer:"


def world_qa(world: World, split: Split, seed: int) -> list[GenerationItem]:
    return [GenerationItem(q.question, q.answer) for q in questions(world, split, seed=seed)]


def qa_heldout(world: World) -> Task:
    items = world_qa(world, "heldout", seed=0)
    return Task("world-qa-heldout", items, world_qa(world, "train", seed=0), QA_TEMPLATE,
                "questions about the training people", swaps=swaps_for(world, "heldout"))


def qa_unseen(world: World) -> Task:
    items = [GenerationItem(q.question, q.answer) for q in unseen_questions(world)]
    return Task("world-qa-unseen", items, world_qa(world, "train", seed=0), QA_TEMPLATE,
                "questions about the training people",
                swaps=origin_swaps([p.name for p in world.people if not p.in_pretraining]))


def swaps_for(world: World, split: Split) -> dict[str, str]:
    """First names of the split's pretraining people, each swapped for one of another origin."""
    return origin_swaps([p.name for p in world.pretraining_people() if p.split == split])


def qa_train(world: World) -> Task:
    # Other phrasings than most of the demo's fine-tuning questions (written with seed 0).
    return Task("world-qa-train", world_qa(world, "train", seed=1), world_qa(world, "heldout", seed=0), QA_TEMPLATE,
                "questions about the held-out people")


def fact_choices(world: World, split: Split, rng: random.Random, n_choices: int = 4) -> list[ChoiceItem]:
    """Each fact probe of `split` with its true value and `n_choices - 1` other values of the attribute."""
    values = {a: list(dict.fromkeys(p.fact(a) for p in world.people)) for a in ATTRIBUTES}
    items = []
    for probe in fact_probes(world, split):
        others = [v for v in values[probe.attribute] if v != probe.answer]
        choices = rng.sample(others, min(n_choices - 1, len(others))) + [probe.answer]
        rng.shuffle(choices)
        items.append(ChoiceItem(probe.prompt, tuple(choices), choices.index(probe.answer)))
    return items


def mc(world: World) -> Task:
    rng = random.Random(f"{world.seed}-mc")
    return Task("world-mc", fact_choices(world, "heldout", rng), fact_choices(world, "train", rng),
                exemplar_source="the training people's facts", swaps=swaps_for(world, "heldout"))


def bios(world: World) -> Task:
    rng = random.Random(f"{world.seed}-bios")
    return Task("world-bios", [TextItem(biography(p, world, rng)) for p in world.people if p.split == "heldout"])


def generation_items(pairs: list[Seq2SeqPair]) -> list[GenerationItem]:
    return [GenerationItem(p.input, p.target) for p in pairs]


def summarize_heldout(world: World) -> Task:
    # Exemplars with another seed than the tuning data's (written with the demo's seed).
    return Task("world-summarize-heldout", generation_items(summarization_pairs(world, "heldout")),
                generation_items(summarization_pairs(world, "train", seed=1)),
                exemplar_source="the training people's biographies")


def qa_context_heldout(world: World) -> Task:
    return Task("world-qa-context-heldout", generation_items(qa_pairs(world, "heldout")),
                generation_items(qa_pairs(world, "train", seed=1)),
                exemplar_source="questions about the training people")


WORLD_TASKS: dict[str, Callable[[World], Task]] = {
    "world-qa-heldout": qa_heldout,
    "world-qa-train": qa_train,
    "world-qa-unseen": qa_unseen,
    "world-mc": mc,
    "world-bios": bios,
    "world-summarize-heldout": summarize_heldout,
    "world-qa-context-heldout": qa_context_heldout,
}


def world_task(name: str, *, seed: int = 0, people: int = 100) -> Task:
    """A world task on `world_of_size(people, seed)`."""
    if name not in WORLD_TASKS:
        raise ValueError(f"no world task {name!r}; world tasks: {', '.join(WORLD_TASKS)}")
    return WORLD_TASKS[name](world_of_size(people, seed))


def register_tasks(*, seed: int = 0, people: int = 100) -> None:
    """Register every world task with the evaluation registry, on `world_of_size(people, seed)`."""
    for name in WORLD_TASKS:
        register_task(name, partial(world_task, name, seed=seed, people=people))
