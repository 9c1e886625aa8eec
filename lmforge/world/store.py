"""The built-in world's context store: documents of current facts, and questions that need them.

After pretraining, some people changed employer (`employer_changes`); the store holds one document
per current fact: each public attribute of every person (including the people left out of
pretraining) as the canonical sentence of `documents.TEMPLATES`, and each company's industry,
headquarters and chief executive officer. So the canonical answer to a question is the text of
the document that answers it, and a grounded answer is a matter of finding and copying it.

From them: `retrieval_questions` (about people absent from pretraining, and about changed
employers), `multihop_questions` ("Where was the chief executive officer of X born?"), and SFT
records teaching the grounded-answer format (`grounded_demonstrations`) and the ReAct agent's
format (`react_demonstrations`). A question belongs to the split of the people it names, so
held-out questions name no train-split person and vice versa. Everything is deterministic for
the world's seed.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lmforge.rag.agent import format_action, format_final, format_observation
from lmforge.rag.prompts import cite, grounded_messages
from lmforge.world.documents import QUESTIONS, Question, canonical_sentence, write_jsonl
from lmforge.world.people import ATTRIBUTES, CEO_TITLE, Company, Person, Split, World, article

CHANGED_FRACTION = 0.3
AS_OF = 2026
COMPANY_FACTS = {
    "industry": "{company} is {a} {value} company.",
    "headquarters": "The headquarters of {company} are in {value}.",
    "ceo": "The chief executive officer of {company} is {value}.",
}
# What an agent looks for when it asks about an attribute (its thought before the search).
NEEDS = {
    "birth_date": "the birth date of {who}", "birth_city": "the birthplace of {who}",
    "university": "the university {who} attended", "major": "what {who} majored in",
    "employer": "the company {who} works for", "job_title": "the job title of {who}",
    "hobby": "the favorite hobby of {who}",
}
MULTIHOP_QUESTIONS = {
    "employer_headquarters": "Where is the headquarters of the company {who} works for?",
    "employer_ceo": "Who is the chief executive officer of the company {who} works for?",
    "ceo_birth_city": "Where was the chief executive officer of {company} born?",
}


# ---- current facts ------------------------------------------------------------------------------------

def employer_changes(world: World, fraction: float = CHANGED_FRACTION) -> dict[str, str]:
    """Person name → new employer for `fraction` of the in-pretraining people who are not CEOs
    (drawn with the world's seed); the new employer is always a different company."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    rng = random.Random(f"{world.seed}-employer-changes")
    eligible = [p for p in world.pretraining_people() if p.job_title != CEO_TITLE]
    changes = {}
    for person in rng.sample(eligible, round(len(eligible) * fraction)):
        others = [c.name for c in world.companies if c.name != person.employer]
        if others:
            changes[person.name] = rng.choice(others)
    return changes


def current_employer(world: World, person: Person | str) -> str:
    """The person's employer now: the new one if it changed after pretraining."""
    person = world.person(person) if isinstance(person, str) else person
    return employer_changes(world).get(person.name, person.employer)


def current_facts(person: Person, changes: dict[str, str]) -> dict[str, str]:
    """The person's public attributes now: `Person.facts` with the employer from `changes`
    (`employer_changes(world)`) where it changed."""
    return {**person.facts(), "employer": changes.get(person.name, person.employer)}


def _company_fact(key: str, company: Company) -> str:
    value = {"industry": company.industry, "headquarters": company.headquarters, "ceo": company.ceo}[key]
    return COMPANY_FACTS[key].format(company=company.name, value=value, a=article(value))


# ---- documents ----------------------------------------------------------------------------------------

def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def person_doc_id(name: str, attribute: str) -> str:
    return f"person-{_slug(name)}/{attribute}"


def company_doc_id(name: str, key: str) -> str:
    return f"company-{_slug(name)}/{key}"


def context_documents(world: World) -> list[dict]:
    """The store's documents as JSONL-ready records `{"id", "text", "kind", "name", ...}`: one per
    current fact of a person (a canonical sentence, marked `as_of`) and of a company."""
    changes = employer_changes(world)
    docs = []
    for person in world.people:
        facts = current_facts(person, changes)
        for attribute in ATTRIBUTES:
            docs.append({"id": person_doc_id(person.name, attribute),
                         "text": canonical_sentence(attribute, person.name, facts[attribute]), "kind": "person",
                         "name": person.name, "attribute": attribute, "split": person.split,
                         "in_pretraining": person.in_pretraining, "as_of": AS_OF,
                         "changed": attribute == "employer" and person.name in changes})
    for company in world.companies:
        for key in COMPANY_FACTS:
            docs.append({"id": company_doc_id(company.name, key), "text": _company_fact(key, company),
                         "kind": "company", "name": company.name, "attribute": key, "as_of": AS_OF})
    return docs


def write_context_documents(world: World, path: str | Path) -> Path:
    """Write `context_documents(world)` as JSONL, one document per line."""
    return write_jsonl(path, context_documents(world))


# ---- questions ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RetrievalQuestion:
    """A question the store answers: `doc_id` names the document holding its answer sentence.
    `kind` is "absent" (the person is not in pretraining), "changed" (the employer changed after
    pretraining) or "known" (a fact pretraining also taught)."""

    question: Question
    doc_id: str
    kind: Literal["absent", "changed", "known"]


def retrieval_questions(world: World, split: Split, *, known: bool = False, seed: int = 0) -> list[RetrievalQuestion]:
    """Questions whose right answer needs the store, about the people of `split`: every public
    attribute of the people absent from pretraining (all "heldout"), and the employer of the people
    whose employer changed (answered with the new one). With `known`, also the other facts of the
    split's pretraining people (material for teaching the grounded format). One phrasing each,
    drawn with `seed`; answers are canonical sentences."""
    _check_split(split)
    changes = employer_changes(world)
    rng = random.Random(f"{world.seed}-retrieval-questions-{seed}")
    out = []
    for person in world.people:
        if person.split != split:
            continue
        facts = current_facts(person, changes)
        for attribute in ATTRIBUTES:
            if not person.in_pretraining:
                kind = "absent"
            elif attribute == "employer" and person.name in changes:
                kind = "changed"
            elif known:
                kind = "known"
            else:
                continue
            value = facts[attribute]
            question = Question(rng.choice(QUESTIONS[attribute]).format(who=person.name),
                                canonical_sentence(attribute, person.name, value), value, person.name, attribute)
            out.append(RetrievalQuestion(question, person_doc_id(person.name, attribute), kind))
    return out


@dataclass(frozen=True)
class Hop:
    """One retrieval step: what the agent needs, the query it searches, the document that answers
    it and the sentence of that document it uses."""

    need: str
    query: str
    doc_id: str
    fact: str


@dataclass(frozen=True)
class MultiHopQuestion:
    question: str  # e.g. "Where was the chief executive officer of Bluepeak Labs born?"
    answer: str  # the canonical sentence, the last hop's fact
    value: str  # the bare value, e.g. "Port Alder"
    kind: Literal["employer_headquarters", "employer_ceo", "ceo_birth_city"]
    subject: str  # the person or company the question names
    hops: tuple[Hop, ...]


def multihop_questions(world: World, split: Split) -> list[MultiHopQuestion]:
    """Two-hop questions over the store: the headquarters and the CEO of the company a person works
    for now (person → company), and the birthplace of a company's CEO (company → CEO). A question
    is in `split` when every person its question and answer name is in that split."""
    _check_split(split)
    changes = employer_changes(world)
    out = []
    for person in world.people:
        if person.split != split:
            continue
        company = world.company(changes.get(person.name, person.employer))
        need = NEEDS["employer"].format(who=person.name)
        employer_hop = Hop(need, need, person_doc_id(person.name, "employer"),
                           canonical_sentence("employer", person.name, company.name))
        hop = _company_hop("headquarters", company)
        out.append(MultiHopQuestion(MULTIHOP_QUESTIONS["employer_headquarters"].format(who=person.name),
                                    hop.fact, company.headquarters, "employer_headquarters", person.name,
                                    (employer_hop, hop)))
        if world.person(company.ceo).split == split:
            hop = _company_hop("ceo", company)
            out.append(MultiHopQuestion(MULTIHOP_QUESTIONS["employer_ceo"].format(who=person.name), hop.fact,
                                        company.ceo, "employer_ceo", person.name, (employer_hop, hop)))
    for company in world.companies:
        ceo = world.person(company.ceo)
        if ceo.split != split:
            continue
        fact = canonical_sentence("birth_city", ceo.name, ceo.birth_city)
        hops = (_company_hop("ceo", company),
                Hop(NEEDS["birth_city"].format(who=ceo.name), NEEDS["birth_city"].format(who=ceo.name),
                    person_doc_id(ceo.name, "birth_city"), fact))
        out.append(MultiHopQuestion(MULTIHOP_QUESTIONS["ceo_birth_city"].format(company=company.name), fact,
                                    ceo.birth_city, "ceo_birth_city", company.name, hops))
    return out


def _company_hop(key: Literal["headquarters", "ceo"], company: Company) -> Hop:
    topic = "headquarters" if key == "headquarters" else "chief executive officer"
    return Hop(f"the {topic} of {company.name}", f"{topic} of {company.name}", company_doc_id(company.name, key),
               _company_fact(key, company))


# ---- demonstrations -----------------------------------------------------------------------------------

def react_messages(question: str, hops: Iterable[Hop], answer: str,
                   documents_text: Callable[[str], str]) -> list[dict[str, str]]:
    """A worked ReAct conversation: per hop, a thought (the previous hop's fact and what is needed
    next) with `search[query]` and the observation `documents_text(doc_id)`; then the final answer."""
    messages = [{"role": "user", "content": question}]
    previous = ""
    for hop in hops:
        thought = f"{previous} I need to find {hop.need}.".strip()
        messages.append({"role": "assistant", "content": format_action(thought, "search", hop.query)})
        messages.append({"role": "user", "content": format_observation(documents_text(hop.doc_id))})
        previous = hop.fact
    messages.append({"role": "assistant", "content": format_final(previous, answer)})
    return messages


def react_demonstrations(world: World, split: Split, documents_text: Callable[[str], str] | None = None, *,
                         single_hop: bool = True) -> list[dict]:
    """SFT records `{"messages": [...]}` in the agent's chat format: each multi-hop question of
    `split` worked through with one search per hop, and (with `single_hop`) each retrieval question
    with one search. `documents_text` maps a document id to the observation its search shows
    (e.g. the text of the store's chunk); by default the document's text."""
    if documents_text is None:
        texts = {d["id"]: d["text"] for d in context_documents(world)}
        documents_text = texts.__getitem__
    records = [{"messages": react_messages(q.question, q.hops, q.answer, documents_text)}
               for q in multihop_questions(world, split)]
    if single_hop:
        for r in retrieval_questions(world, split):
            q = r.question
            need = NEEDS[q.attribute].format(who=q.person)
            hop = Hop(need, need, r.doc_id, q.answer)
            records.append({"messages": react_messages(q.question, [hop], q.answer, documents_text)})
    return records


def grounded_demonstrations(world: World, split: Split, k: int = 3, *, known: bool = True,
                            seed: int = 0) -> list[dict]:
    """SFT records for grounded answering: the user message is `grounded_messages(question, sources)`
    with the gold document among `k - 1` distractors such as retrieval returns (another fact of the
    same person, or the same fact of another person of the split), in a seeded random order; the
    reply is `"<canonical answer> [n]"` citing the gold one. Questions are
    `retrieval_questions(world, split, known=known)`."""
    _check_split(split)
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    docs = [d for d in context_documents(world) if d["kind"] == "person" and d["split"] == split]
    texts = {d["id"]: d["text"] for d in docs}
    same_person: dict[str, list[str]] = {}
    same_attribute: dict[str, list[str]] = {}
    for d in docs:
        same_person.setdefault(d["name"], []).append(d["id"])
        same_attribute.setdefault(d["attribute"], []).append(d["id"])
    rng = random.Random(f"{world.seed}-grounded-{split}-{seed}")
    records = []
    for r in retrieval_questions(world, split, known=known, seed=seed):
        q = r.question
        candidates = [d for d in same_person[q.person] + same_attribute[q.attribute] if d != r.doc_id]
        sources = [r.doc_id] + rng.sample(candidates, min(k - 1, len(candidates)))
        rng.shuffle(sources)
        messages = grounded_messages(r.question.question, [texts[d] for d in sources])
        messages.append({"role": "assistant", "content": cite(r.question.answer, sources.index(r.doc_id) + 1)})
        records.append({"messages": messages})
    return records


def write_react_demonstrations(world: World, path: str | Path, split: Split = "train", **kwargs) -> Path:
    """Write `react_demonstrations(world, split, **kwargs)` as SFT JSONL."""
    return write_jsonl(path, react_demonstrations(world, split, **kwargs))


def write_grounded_demonstrations(world: World, path: str | Path, split: Split = "train", **kwargs) -> Path:
    """Write `grounded_demonstrations(world, split, **kwargs)` as SFT JSONL."""
    return write_jsonl(path, grounded_demonstrations(world, split, **kwargs))


def _check_split(split: str) -> None:
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")

