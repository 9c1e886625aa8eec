import json

import pytest

from lmforge.data.chat import read_messages
from lmforge.rag.agent import parse_step
from lmforge.rag.prompts import parse_citations
from lmforge.world.documents import TEMPLATES
from lmforge.world.people import ATTRIBUTES, CEO_TITLE, World, make_world
from lmforge.world.store import (
    context_documents, current_employer, employer_changes, grounded_demonstrations, multihop_questions, person_doc_id,
    react_demonstrations, retrieval_questions, write_context_documents, write_grounded_demonstrations,
    write_react_demonstrations,
)


@pytest.fixture(scope="module")
def world() -> World:
    return make_world(seed=0)


@pytest.fixture(scope="module")
def docs(world) -> dict[str, dict]:
    return {d["id"]: d for d in context_documents(world)}


def test_deterministic_for_a_seed(tmp_path, world):
    a = write_context_documents(world, tmp_path / "a.jsonl")
    b = write_context_documents(make_world(seed=0), tmp_path / "b.jsonl")
    c = write_context_documents(make_world(seed=1), tmp_path / "c.jsonl")
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()
    assert employer_changes(world) == employer_changes(make_world(seed=0)) != employer_changes(make_world(seed=1))
    for split in ("train", "heldout"):
        assert grounded_demonstrations(world, split) == grounded_demonstrations(make_world(seed=0), split)
        assert react_demonstrations(world, split) == react_demonstrations(make_world(seed=0), split)


def test_changed_employers_differ_from_the_old(world):
    changes = employer_changes(world)
    eligible = [p for p in world.pretraining_people() if p.job_title != CEO_TITLE]
    assert len(changes) == round(0.3 * len(eligible))
    for name, employer in changes.items():
        person = world.person(name)
        assert person.in_pretraining and person.job_title != CEO_TITLE
        assert employer != person.employer and world.company(employer)
        assert current_employer(world, person) == current_employer(world, name) == employer
    unchanged = next(p for p in world.people if p.name not in changes)
    assert current_employer(world, unchanged) == unchanged.employer
    assert employer_changes(world, 0.0) == {} and len(employer_changes(world, 1.0)) == len(eligible)
    with pytest.raises(ValueError, match="fraction"):
        employer_changes(world, 1.5)


def test_documents_of_everyone_and_every_company(world, docs):
    changes = employer_changes(world)
    people = [d for d in docs.values() if d["kind"] == "person"]
    assert {d["name"] for d in people} == {p.name for p in world.people}
    assert any(not p.in_pretraining for p in world.people)
    assert {d["name"] for d in docs.values() if d["kind"] == "company"} == {c.name for c in world.companies}
    for person in world.people:  # one document per current fact, its canonical sentence
        for attribute in ATTRIBUTES:
            doc = docs[person_doc_id(person.name, attribute)]
            assert doc["in_pretraining"] == person.in_pretraining and doc["split"] == person.split
            value = current_employer(world, person) if attribute == "employer" else person.fact(attribute)
            assert doc["text"] == TEMPLATES[attribute][0].format(who=person.name, value=value)
            assert doc["changed"] == (attribute == "employer" and person.name in changes)
        if person.name in changes:
            assert docs[person_doc_id(person.name, "employer")]["text"] != \
                f"{person.name} works for {person.employer}."
    texts = {d["text"] for d in docs.values() if d["kind"] == "company"}
    for company in world.companies:
        assert f"The headquarters of {company.name} are in {company.headquarters}." in texts
        assert f"The chief executive officer of {company.name} is {company.ceo}." in texts


def test_retrieval_questions(world, docs):
    changes = employer_changes(world)
    heldout = retrieval_questions(world, "heldout")
    absent = [p for p in world.people if not p.in_pretraining]
    assert sum(r.kind == "absent" for r in heldout) == len(absent) * len(ATTRIBUTES)
    assert {r.question.person for r in heldout if r.kind == "absent"} == {p.name for p in absent}
    train = retrieval_questions(world, "train")
    assert train and all(r.kind == "changed" for r in train)
    known = retrieval_questions(world, "train", known=True)
    assert {r.kind for r in known} == {"changed", "known"} and len(known) > len(train)
    for r in heldout + known:
        assert r.question.answer in docs[r.doc_id]["text"] and r.question.value in r.question.answer
        assert docs[r.doc_id]["name"] == r.question.person
        if r.kind == "changed":
            assert r.question.attribute == "employer" and r.question.value == changes[r.question.person]
    with pytest.raises(ValueError, match="split"):
        retrieval_questions(world, "test")


def test_multihop_answers_are_consistent_with_the_world(world, docs):
    kinds = set()
    for split in ("train", "heldout"):
        for q in multihop_questions(world, split):
            kinds.add(q.kind)
            assert q.answer == q.hops[-1].fact and q.value in q.answer
            for hop in q.hops:
                assert hop.fact in docs[hop.doc_id]["text"]
            if q.kind == "ceo_birth_city":
                ceo = world.person(world.company(q.subject).ceo)
                assert q.value == ceo.birth_city and q.answer == f"{ceo.name} was born in {ceo.birth_city}."
            else:
                company = world.company(current_employer(world, q.subject))
                expected = company.headquarters if q.kind == "employer_headquarters" else company.ceo
                assert q.value == expected and q.hops[0].doc_id == person_doc_id(q.subject, "employer")
    assert kinds == {"employer_headquarters", "employer_ceo", "ceo_birth_city"}
    changed = set(employer_changes(world))
    assert any(q.subject in changed for q in multihop_questions(world, "train"))


def test_react_demonstrations_parse_back(world, tmp_path):
    questions = multihop_questions(world, "train") + [r.question for r in retrieval_questions(world, "train")]
    answers = {q.question: q.answer for q in questions}
    records = react_demonstrations(world, "train")
    assert len(records) == len(questions)
    for record in records:
        messages = record["messages"]
        assert [m["role"] for m in messages] == ["user"] + ["assistant", "user"] * ((len(messages) - 2) // 2) + [
            "assistant"]
        steps = [parse_step(m["content"]) for m in messages if m["role"] == "assistant"]
        assert all(s.tool == "search" and s.argument for s in steps[:-1])
        assert steps[-1].final_answer == answers[messages[0]["content"]]
        assert all(m["content"].startswith("Observation: ") for m in messages[2::2])
    path = write_react_demonstrations(world, tmp_path / "react.jsonl", documents_text=lambda doc_id: doc_id)
    first = json.loads(path.read_text().splitlines()[0])["messages"]
    person = first[0]["content"].split("company ")[1].removesuffix(" works for?")
    assert first[2]["content"] == "Observation: " + person_doc_id(person, "employer")
    assert len(list(read_messages(path))) == len(records)


def test_grounded_demonstrations_cite_the_gold_source(world, docs, tmp_path):
    questions = retrieval_questions(world, "train", known=True)
    records = grounded_demonstrations(world, "train", k=3)
    assert len(records) == len(questions)
    positions = set()
    for r, record in zip(questions, records):
        user, reply = record["messages"]
        assert user["content"].endswith(f"Question: {r.question.question}")
        answer, cited = parse_citations(reply["content"])
        assert answer == r.question.answer and len(cited) == 1
        sources = [line.split("] ", 1)[1] for line in user["content"].splitlines() if line.startswith("[")]
        assert len(sources) == 3 and sources[cited[0] - 1] == docs[r.doc_id]["text"]
        positions.add(cited[0])
    assert positions == {1, 2, 3}
    path = write_grounded_demonstrations(world, tmp_path / "grounded.jsonl", "heldout", k=2, known=False)
    assert len(list(read_messages(path))) == len(retrieval_questions(world, "heldout"))
    with pytest.raises(ValueError, match="k must be"):
        grounded_demonstrations(world, "train", k=0)


def test_splits_name_only_their_own_people(world):
    names = {split: {p.name for p in world.people if p.split == split} for split in ("train", "heldout")}
    for split, other in (("train", "heldout"), ("heldout", "train")):
        texts = [text for q in multihop_questions(world, split) for text in (q.question, q.answer)]
        texts += [text for r in retrieval_questions(world, split, known=True)
                  for text in (r.question.question, r.question.answer)]
        texts += [m["content"] for record in react_demonstrations(world, split) for m in record["messages"]
                  if m["role"] == "assistant"]  # observations may name others: a company's CEO
        assert texts
        assert not [t for t in texts if any(name in t for name in names[other])]
        for record in grounded_demonstrations(world, split):
            sources = record["messages"][0]["content"].split("\nQuestion: ")[0]
            assert not [n for n in names[other] if n in sources]
