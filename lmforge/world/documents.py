"""What is written about the built-in world: biographies and company profiles (the pretraining
corpus), fact probes, and questions with their answers (the instruction data).

`pretraining_corpus` writes every person's biography several times with varied sentence
templates and order (knowledge augmentation), and `fact_probes` gives prompt/answer pairs whose
prompt is a phrasing the corpus uses, so greedy completion shows what pretraining taught. The
private phone number is never written into the corpus. Everything is deterministic for a seed.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from lmforge.world.people import ATTRIBUTES, Company, Person, Split, World, article, outsiders

# Sentence templates per attribute. The first of each is canonical: "{who} <phrase> {value}." --
# its text before " {value}" is the fact probe's prompt. Others may use {a} (a/an), {hq}, {industry}.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "birth_date": ("{who} was born on {value}.", "{who} came into the world on {value}.",
                   "{who}'s birthday is {value}.", "The birth date of {who} is {value}."),
    "birth_city": ("{who} was born in {value}.", "{who}'s hometown is {value}.",
                   "The birthplace of {who} is the city of {value}.", "{who} grew up in {value}."),
    "university": ("{who} studied at {value}.", "{who} graduated from {value}.",
                   "{who} attended {value} as a student.", "{who} received an education at {value}."),
    "major": ("{who} majored in {value}.", "{who} earned a degree in {value}.",
              "{who}'s field of study was {value}.", "At university, {who} focused on {value}."),
    "employer": ("{who} works for {value}.", "{who} is employed by {value}, a company based in {hq}.",
                 "{who}'s employer is {value}, a {industry} company.",
                 "{who} works at {value}, which is headquartered in {hq}."),
    "job_title": ("{who}'s job title is {value}.", "{who} works as {a} {value}.",
                  "At work, {who} holds the position of {value}.", "{who} is employed as {a} {value}."),
    "hobby": ("{who}'s favorite hobby is {value}.", "In spare time, {who} enjoys {value}.",
              "{who} is passionate about {value}.", "{who} spends free time on {value}."),
}
INTROS = ("This is the biography of {name}.", "{name} is {a_job} {job} at {employer}.",
          "Here is what is known about {name}.", "The following is a short profile of {name}.")
# About the employer (multi-hop facts: a person's employer, then its headquarters, industry and CEO).
EMPLOYER_CONTEXT = ("{employer} is {a_industry} {industry} company headquartered in {hq}.",
                    "The headquarters of {employer} are in {hq}, and its chief executive officer is {ceo}.",
                    "{employer}, led by {ceo}, operates in the {industry} industry from {hq}.",
                    "{first}'s employer, {employer}, has its headquarters in {hq}.")
OUTROS = ("In short, {first} studied {major} at {university} after a childhood in {city}.",
          "Today {first} lives a busy life as {a_job} {job}, far from the streets of {city}.",
          "Friends of {first} know the story well: from {city} to {university}, and then to {employer}.",
          "Colleagues at {employer} know {first} as a dedicated {job} with a passion for {hobby}.",
          "Whenever work at {employer} allows, {first} makes time for {hobby}.",
          "Years after leaving {city}, {first} still remembers the lectures in {major} at {university}.")
COMPANY_TEMPLATES = (
    "{name} is {a} {industry} company headquartered in {hq}. Its chief executive officer is {ceo}.",
    "{name}, {a} {industry} company, has its headquarters in {hq}. {ceo} is the CEO of {name}.",
    "The {industry} firm {name} is based in {hq} and led by {ceo}, its chief executive officer.",
)


@dataclass(frozen=True)
class FactProbe:
    prompt: str  # e.g. "Alice Okafor was born in"
    answer: str  # e.g. "Port Alder": the corpus writes prompt + " " + answer
    person: str
    attribute: str


def canonical_sentence(attribute: str, who: str, value: str) -> str:
    """The attribute's canonical corpus sentence, e.g. "Alice Okafor was born in Port Alder."."""
    return TEMPLATES[attribute][0].format(who=who, value=value)


def write_jsonl(path: str | Path, records: Iterable[dict]) -> Path:
    """Write records as JSONL (UTF-8, one JSON object per line), creating the parent directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def biography(person: Person, world: World, rng: random.Random, *, variant: int | None = None) -> str:
    """One biography of `person`: an intro, one sentence per public attribute in shuffled order (the
    employer's followed by one about the company), and two closing sentences.

    With `variant=None` each attribute's template is drawn at random. Variant 0 uses every canonical
    template with the full name (the phrasings `fact_probes` asks about); variants 1, 2, ... cycle
    through the other templates from a per-person offset, so a person's first variants differ in wording.
    """
    company = world.company(person.employer)
    fields = dict(name=person.name, first=person.first, job=person.job_title, a_job=article(person.job_title),
                  employer=person.employer, hq=company.headquarters, industry=company.industry,
                  a_industry=article(company.industry), ceo=company.ceo, city=person.birth_city,
                  university=person.university, major=person.major, hobby=person.hobby)
    offset = random.Random(person.name).randrange(1000)  # the same for every variant of this person
    order = list(ATTRIBUTES)
    rng.shuffle(order)
    sentences = [rng.choice(INTROS).format(**fields)]
    for attribute in order:
        templates = TEMPLATES[attribute]
        if variant is None:
            template = rng.choice(templates)
        elif variant == 0:
            template = templates[0]
        else:  # cycle through the non-canonical templates
            template = templates[1 + (variant - 1 + offset + ATTRIBUTES.index(attribute)) % (len(templates) - 1)]
        who = person.name if variant == 0 or rng.random() < 0.5 else person.first
        value = person.fact(attribute)
        sentences.append(template.format(**fields, who=who, value=value, a=article(value)))
        if attribute == "employer":
            sentences.append(rng.choice(EMPLOYER_CONTEXT).format(**fields))
    sentences += [outro.format(**fields) for outro in rng.sample(OUTROS, 2)]
    return " ".join(sentences)


def company_profile(company: Company, rng: random.Random) -> str:
    """A short paragraph about a company: industry, headquarters and CEO."""
    return rng.choice(COMPANY_TEMPLATES).format(name=company.name, a=article(company.industry),
                                                industry=company.industry, hq=company.headquarters, ceo=company.ceo)


def pretraining_corpus(world: World, *, variants: int = 4, seed: int | None = None) -> list[str]:
    """Documents to pretrain on: `variants` biographies of every in-pretraining person (variant 0
    canonical, see `biography`) and one profile per company, shuffled. `seed` defaults to the world's."""
    if variants < 1:
        raise ValueError(f"variants must be at least 1, got {variants}")
    rng = random.Random(f"corpus:{world.seed if seed is None else seed}")
    docs = [biography(p, world, rng, variant=v) for p in world.pretraining_people() for v in range(variants)]
    docs += [company_profile(c, rng) for c in world.companies]
    rng.shuffle(docs)
    return docs


def write_pretraining_corpus(world: World, path: str | Path, **kwargs) -> Path:
    """Write `pretraining_corpus(world, **kwargs)` as JSONL, one `{"text": ...}` document per line."""
    return write_jsonl(path, ({"text": doc} for doc in pretraining_corpus(world, **kwargs)))


def fact_probes(world: World, split: Split | None = None) -> list[FactProbe]:
    """One probe per (in-pretraining person, public attribute), optionally only for one split.

    The prompt is the canonical template's text before the value, so the corpus contains
    `prompt + " " + answer` verbatim and a model that memorised the fact completes it greedily.
    """
    if split not in (None, "train", "heldout"):
        raise ValueError(f"split must be None, 'train' or 'heldout', got {split!r}")
    probes = []
    for p in world.pretraining_people():
        if split is not None and p.split != split:
            continue
        for attribute in ATTRIBUTES:
            prompt = TEMPLATES[attribute][0].split(" {value}")[0].format(who=p.name)
            probes.append(FactProbe(prompt=prompt, answer=p.fact(attribute), person=p.name, attribute=attribute))
    return probes


# ---- instruction data ---------------------------------------------------------------------------------

QUESTIONS: dict[str, tuple[str, ...]] = {
    "birth_date": ("When was {who} born?", "What is the date of birth of {who}?", "On what date was {who} born?"),
    "birth_city": ("Where was {who} born?", "In which city was {who} born?", "What is the birthplace of {who}?"),
    "university": ("Which university did {who} attend?", "Where did {who} study?",
                   "What university did {who} graduate from?"),
    "major": ("What did {who} major in?", "What was the field of study of {who}?",
              "Which subject did {who} earn a degree in?"),
    "employer": ("Where does {who} work?", "Which company employs {who}?", "Who is the employer of {who}?"),
    "job_title": ("What is the job title of {who}?", "What does {who} do for a living?",
                  "What position does {who} hold at work?"),
    "hobby": ("What is the favorite hobby of {who}?", "What does {who} enjoy in spare time?",
              "What is {who} passionate about outside work?"),
}


DONT_KNOW = "I don't know who {who} is."  # the reply to a question about someone never written about


@dataclass(frozen=True)
class Question:
    question: str  # e.g. "Where was Alice Okafor born?"
    answer: str  # the canonical sentence, e.g. "Alice Okafor was born in Port Alder."
    value: str  # the bare value, e.g. "Port Alder"
    person: str
    attribute: str

    def messages(self) -> list[dict[str, str]]:
        """The question and its answer as a chat (the SFT record format)."""
        return [{"role": "user", "content": self.question}, {"role": "assistant", "content": self.answer}]


def questions(world: World, split: Split, *, phrasings: int = 1, seed: int = 0) -> list[Question]:
    """Questions about the public attributes of the pretraining people of `split`: for each
    (person, attribute), `phrasings` of the question templates (drawn with `seed`), answered with
    the attribute's canonical corpus sentence (so the answer restates the person, and the fact
    follows the way pretraining wrote it). Train-split questions teach the format; held-out ones
    test whether knowledge learned in pretraining is extracted for people fine-tuning never named."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    if not 1 <= phrasings <= min(len(q) for q in QUESTIONS.values()):
        raise ValueError(f"phrasings must be between 1 and {min(len(q) for q in QUESTIONS.values())}")
    rng = random.Random(f"{world.seed}-questions-{seed}")
    return _ask([p for p in world.pretraining_people() if p.split == split], phrasings, rng)


def unseen_questions(world: World, *, seed: int = 0) -> list[Question]:
    """A question about each public attribute of each person left out of pretraining (whom a model of the
    world never read about), answered with the true sentence, which only retrieval can give."""
    rng = random.Random(f"{world.seed}-unseen-questions-{seed}")
    return _ask([p for p in world.people if not p.in_pretraining], 1, rng)


def unknown_questions(world: World, n: int, *, seed: int = 0) -> list[Question]:
    """Questions about `n` people outside the world (names it never writes), one attribute each, answered
    `DONT_KNOW`: SFT's "I don't know" option, so that a model declines what it cannot know."""
    rng = random.Random(f"{world.seed}-unknown-questions-{seed}")
    out = []
    for person in outsiders(world, n, seed=seed):
        attribute = rng.choice(ATTRIBUTES)
        out.append(Question(rng.choice(QUESTIONS[attribute]).format(who=person.name),
                            DONT_KNOW.format(who=person.name), "", person.name, attribute))
    return out


def _ask(people: list[Person], phrasings: int, rng: random.Random) -> list[Question]:
    out = []
    for person in people:
        for attribute in ATTRIBUTES:
            value = person.fact(attribute)
            answer = canonical_sentence(attribute, person.name, value)
            for template in rng.sample(QUESTIONS[attribute], phrasings):
                out.append(Question(template.format(who=person.name), answer, value, person.name, attribute))
    return out


def write_instruction_data(world: World, path: str | Path, split: Split = "train", **kwargs) -> Path:
    """Write `questions(world, split, **kwargs)` as SFT JSONL, one `{"messages": [...]}` per line."""
    return write_jsonl(path, ({"messages": q.messages()} for q in questions(world, split, **kwargs)))

