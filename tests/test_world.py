import json
import random

import pytest

from lmforge.world.documents import (
    QUESTIONS, FactProbe, biography, canonical_sentence, fact_probes, pretraining_corpus, questions,
    write_instruction_data, write_pretraining_corpus,
)
from lmforge.world.people import (
    ATTRIBUTES, CEO_TITLE, FIRST_NAMES, LAST_NAMES, World, make_world, outsiders, world_of_size,
)
from lmforge.world.preferences import (
    EVASIVE, FILLER, FLAWS, outsider_pairs, preference_pairs, write_preference_data,
)
from lmforge.world.safety import REFUSAL, red_team_prompts, write_safety_data


@pytest.fixture(scope="module")
def world() -> World:
    return make_world(seed=3, n_people=60, n_companies=6)


@pytest.fixture(scope="module")
def corpus(world) -> list[str]:
    return pretraining_corpus(world, variants=4)


def bios_of(name: str, corpus: list[str]) -> list[str]:
    """A person's biographies: their intro sentence ends with, or starts with, their full name."""
    return [d for d in corpus if (first := d.split(". ")[0]).endswith(name) or first.startswith(name + " is ")]


def test_same_seed_same_bytes_different_seed_differs(tmp_path):
    a = write_pretraining_corpus(make_world(seed=1, n_people=40, n_companies=5), tmp_path / "a.jsonl")
    b = write_pretraining_corpus(make_world(seed=1, n_people=40, n_companies=5), tmp_path / "b.jsonl")
    c = write_pretraining_corpus(make_world(seed=2, n_people=40, n_companies=5), tmp_path / "c.jsonl")
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    assert make_world(seed=1) == make_world(seed=1) != make_world(seed=2)
    world = make_world(seed=1, n_people=40, n_companies=5)
    assert pretraining_corpus(world, seed=5) != pretraining_corpus(world, seed=6)


def test_names_unique_and_lookups():
    world = make_world(seed=0, n_people=3000, n_companies=200)
    assert len({p.name for p in world.people}) == 3000
    assert len({c.name for c in world.companies}) == 200
    assert len({p.phone for p in world.people}) == 3000
    person = world.people[17]
    assert world.person(person.name) is person
    assert world.company(person.employer).name == person.employer
    with pytest.raises(KeyError, match="Nobody Here"):
        world.person("Nobody Here")


def test_splits_and_absent_people(world):
    absent = [p for p in world.people if not p.in_pretraining]
    assert len(absent) == 6 and all(p.split == "heldout" for p in absent)
    present = world.pretraining_people()
    assert {p.split for p in present} == {"train", "heldout"}


def test_every_fact_in_the_persons_biographies(world, corpus):
    for person in world.pretraining_people():
        bios = bios_of(person.name, corpus)
        assert len(bios) == 4
        for attribute, value in person.facts().items():
            assert any(value in bio for bio in bios), (person.name, attribute)
        hq = world.company(person.employer).headquarters
        assert any(hq in bio for bio in bios)  # multi-hop: the employer's headquarters


def test_fact_probes_appear_verbatim(world, corpus):
    text = "\n".join(corpus)
    probes = fact_probes(world)
    assert len(probes) == len(world.pretraining_people()) * len(ATTRIBUTES)
    for probe in probes:
        assert isinstance(probe, FactProbe)
        assert f"{probe.prompt} {probe.answer}" in text, probe
        assert probe.answer == world.person(probe.person).fact(probe.attribute)
    one = "\n".join(pretraining_corpus(world, variants=1))
    assert all(f"{p.prompt} {p.answer}" in one for p in probes)
    train, heldout = fact_probes(world, "train"), fact_probes(world, "heldout")
    assert len(train) + len(heldout) == len(probes)
    assert all(world.person(p.person).split == "heldout" for p in heldout)
    example = next(p for p in probes if p.attribute == "birth_city")
    assert example.prompt == f"{example.person} was born in"


def test_absent_people_and_phones_never_in_corpus(world, corpus):
    text = "\n".join(corpus)
    for person in world.people:
        assert person.phone not in text
        assert person.phone.split("-", 1)[1] not in text
        if not person.in_pretraining:
            assert person.name not in text
    assert "555-" not in text


def test_variants_differ(world, corpus):
    assert len(corpus) == 4 * len(world.pretraining_people()) + len(world.companies)
    for person in world.pretraining_people():
        bios = bios_of(person.name, corpus)
        assert len(set(bios)) == 4
        # Beyond the shuffled order, the wording differs: variants 1..3 use three distinct birth-date templates.
        dates = {s for bio in bios for s in bio.split(". ") if person.fact("birth_date").split(",")[0] in s}
        assert len(dates) >= 3
    rng = random.Random(0)
    person = world.pretraining_people()[0]
    assert biography(person, world, rng, variant=2) != biography(person, world, rng, variant=3)


def test_companies_and_ceos(world, corpus):
    text = "\n".join(corpus)
    for company in world.companies:
        ceo = world.person(company.ceo)
        assert ceo.in_pretraining and ceo.employer == company.name and ceo.job_title == CEO_TITLE
        assert company.name in text and company.headquarters in text
    assert len({c.ceo for c in world.companies}) == len(world.companies)


@pytest.mark.parametrize("kwargs, name", [
    (dict(n_people=0), "n_people"),
    (dict(n_people=60 * 60 + 1), "n_people"),
    (dict(n_companies=0), "n_companies"),
    (dict(n_people=10, n_companies=11), "n_companies"),
    (dict(absent_fraction=1.0), "absent_fraction"),
    (dict(heldout_fraction=-0.1), "heldout_fraction"),
])
def test_bad_world_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        make_world(**kwargs)


def test_bad_corpus_and_probe_arguments(world):
    with pytest.raises(ValueError, match="variants"):
        pretraining_corpus(world, variants=0)
    with pytest.raises(ValueError, match="split"):
        fact_probes(world, split="test")
    with pytest.raises(ValueError, match="attribute"):
        world.people[0].fact("phone")


def test_write_pretraining_corpus_jsonl(world, tmp_path):
    path = write_pretraining_corpus(world, tmp_path / "sub" / "corpus.jsonl", variants=2, seed=9)
    lines = path.read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    assert all(set(r) == {"text"} and isinstance(r["text"], str) and r["text"] for r in records)
    assert [r["text"] for r in records] == pretraining_corpus(world, variants=2, seed=9)


def test_default_size():
    corpus = pretraining_corpus(make_world())
    assert 400_000 <= sum(map(len, corpus)) <= 1_500_000


def test_questions_are_answered_by_the_corpus_and_split_by_person(world, corpus, tmp_path):
    train = questions(world, "train", phrasings=2)
    heldout = questions(world, "heldout")
    people = {p.name: p for p in world.pretraining_people()}
    assert {q.person for q in train} == {n for n, p in people.items() if p.split == "train"}
    assert {q.person for q in heldout} == {n for n, p in people.items() if p.split == "heldout"}
    assert len(train) == 2 * len(ATTRIBUTES) * len({q.person for q in train})
    text = "\n".join(corpus)
    for q in train[:50] + heldout[:50]:
        assert q.person in q.question and q.value == people[q.person].fact(q.attribute)
        assert q.answer.startswith(q.person) and q.value in q.answer and q.answer in text
    assert questions(world, "train", phrasings=2) == train  # deterministic
    path = write_instruction_data(world, tmp_path / "sft.jsonl", "heldout")
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert records[0] == {"messages": heldout[0].messages()} and len(records) == len(heldout)
    with pytest.raises(ValueError, match="phrasings"):
        questions(world, "train", phrasings=9)


def repeats(text: str) -> bool:
    """Whether some run of words is immediately repeated ("born in born in", "A. A.")."""
    words = text.split()
    return any(words[i:i + n] == words[i + n:i + 2 * n] for n in range(1, len(words) // 2 + 1)
               for i in range(len(words) - 2 * n + 1))


def check_helpful_pair(p: dict, q, qs: list, people: dict) -> None:
    """The rejected reply of a helpful pair has its flaw, checked from the answer's form: the canonical
    sentence starts with the person's name and ends with " {value}."; other people are of `people`."""
    chosen, rejected = p["chosen"][0]["content"], p["rejected"][0]["content"]
    assert chosen == q.answer and rejected and rejected != chosen
    assert chosen.startswith(q.person + " ") or chosen.startswith(q.person + "'s ")
    assert chosen.endswith(f" {q.value}.")
    middle = chosen[len(q.person):-len(q.value) - 1]  # e.g. " was born in "
    flaw = p["flaw"]
    if flaw == "wrong_person":
        others = [o for o in people.values() if rejected == o.name + middle + o.fact(q.attribute) + "."]
        assert len(others) == 1 and others[0].name != q.person
    elif flaw == "wrong_attribute":
        assert rejected in {a.answer for a in qs if a.person == q.person and a.attribute != q.attribute}
    elif flaw == "cut_off":
        assert chosen.startswith(rejected + " ") and not rejected.endswith(".") and len(rejected.split()) >= 3
        assert len(rejected) < len(chosen) - len(q.value.split()[-1]) - 1  # the value's last word is gone
    elif flaw == "rambling":
        assert rejected.startswith(chosen + " ")
        others = {a.answer for a in qs if a.person != q.person}  # this split's other people
        added = [s if s.endswith(".") else s + "." for s in rejected[len(chosen) + 1:].split(". ")]
        assert 1 <= len(added) <= 2 and all(s in others or s in FILLER for s in added)
    elif flaw == "repetition":
        assert repeats(rejected) and not repeats(chosen) and rejected.split()[:3] == chosen.split()[:3]
    elif flaw == "wrong_value":
        prefix = chosen[:-len(q.value) - 1]
        assert rejected.startswith(prefix) and rejected.endswith(".")
        value = rejected[len(prefix):-1]
        assert value != q.value and value in {o.fact(q.attribute) for o in people.values()}
    else:
        assert flaw == "evasive" and rejected in EVASIVE


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_helpful_pairs_have_their_flaw(world, split):
    pairs = preference_pairs(world, split)
    qs = questions(world, split)
    by_question = {q.question: q for q in qs}
    assert len(by_question) == len(qs)
    people = {p.name: p for p in world.pretraining_people() if p.split == split}
    names_of = {name: {q.question for q in qs if q.person == name} for name in people}
    helpful = [p for p in pairs if p["kind"] == "helpful"]
    assert sorted(p["prompt"][0]["content"] for p in helpful) == sorted(by_question)
    for p in helpful:
        check_helpful_pair(p, by_question[p["prompt"][0]["content"]], qs, people)
    # balanced: every helpful flaw in equal shares, up to one pair
    counts = {flaw: sum(p["flaw"] == flaw for p in helpful) for flaw, f in FLAWS.items() if f.kind == "helpful"}
    assert len(counts) == 7 and max(counts.values()) - min(counts.values()) <= 1
    assert sum(counts.values()) == len(helpful)
    # drawn at random, not in question order: a person's seven questions get several flaws (4.5 expected)
    flaws_of = {name: {p["flaw"] for p in helpful if p["prompt"][0]["content"] in names_of[name]} for name in people}
    assert sum(map(len, flaws_of.values())) / len(flaws_of) >= 3
    # only this split's people are named
    others = [p.name for p in world.people if p.split != split]
    assert not any(name in json.dumps(p) for p in pairs for name in others)
    assert all(m["content"] for p in pairs for key in ("prompt", "chosen", "rejected") for m in p[key])


def test_every_flaw_pairs_each_question_with_each_helpful_flaw(world):
    qs = questions(world, "train")
    people = {p.name: p for p in world.pretraining_people() if p.split == "train"}
    helpful = [p for p in preference_pairs(world, "train", every_flaw=True) if p["kind"] == "helpful"]
    helpful_flaws = sorted(flaw for flaw, f in FLAWS.items() if f.kind == "helpful")
    by_question = {q.question: q for q in qs}
    flaws_of = {q.question: [] for q in qs}
    for p in helpful:
        flaws_of[p["prompt"][0]["content"]].append(p["flaw"])
        check_helpful_pair(p, by_question[p["prompt"][0]["content"]], qs, people)
    assert all(sorted(flaws) == helpful_flaws for flaws in flaws_of.values())


def test_outsider_pairs_name_the_wrong_person(world):
    pairs = outsider_pairs(world, 50, seed=1)
    assert pairs == outsider_pairs(world, 50, seed=1) != outsider_pairs(world, 50, seed=2)
    outside = {p.name: p for p in outsiders(world, 50, seed=1)}
    training = {p.name: p for p in world.pretraining_people() if p.split == "train"}
    full_names = {f"{first} {last}" for first in FIRST_NAMES for last in LAST_NAMES}
    asked, known = set(), 0
    for p in pairs:
        question, chosen, rejected = (p[k][0]["content"] for k in ("prompt", "chosen", "rejected"))
        assert p["kind"] == "helpful" and p["flaw"] == "wrong_person"
        who = next(name for name in full_names if name in question)
        attribute = next(a for a in ATTRIBUTES if question in {q.format(who=who) for q in QUESTIONS[a]})
        assert who in outside and chosen == canonical_sentence(attribute, who, outside[who].fact(attribute))
        other = next(name for name in full_names - {who} if rejected.startswith(name))
        if other in training:  # a training person's true sentence of the asked attribute
            assert rejected == canonical_sentence(attribute, other, training[other].fact(attribute))
            known += 1
        else:  # the same sentence about another outsider
            assert other in outside and chosen.replace(who, other, 1) == rejected
        asked.add(who)
    assert len(asked) == 50
    assert 15 <= known <= 35  # about half


def test_preference_pairs_deterministic_and_flaws_classified(world):
    pairs = preference_pairs(world, "train")
    assert preference_pairs(world, "train") == pairs
    assert preference_pairs(world, "train", seed=1) != pairs
    assert preference_pairs(make_world(seed=4, n_people=60, n_companies=6), "train") != pairs
    assert [p["prompt"] for p in pairs] != [p["prompt"] for p in sorted(pairs, key=lambda p: p["kind"])]  # shuffled
    assert all(FLAWS[p["flaw"]][0] == FLAWS[p["flaw"]].kind == p["kind"] for p in pairs)
    assert [flaw for flaw, f in FLAWS.items() if not f.learnable] == ["wrong_value"]
    assert all(isinstance(f.description, str) and f.description == f[1] for f in FLAWS.values())


def test_preference_pairs_need_two_people_per_split():
    world = make_world(0, n_people=5, n_companies=1, absent_fraction=0.0, heldout_fraction=0.2)
    assert sum(p.split == "heldout" for p in world.people) == 1
    with pytest.raises(ValueError, match="preference pairs need .* the world is too small"):
        preference_pairs(world, "heldout")


def test_safety_pairs_and_red_team(world, corpus, tmp_path):
    pairs = preference_pairs(world, "train")
    helpful = [p for p in pairs if p["kind"] == "helpful"]
    safety = [p for p in pairs if p["kind"] == "safety"]
    red_team = red_team_prompts(world, "train")
    assert len(helpful) == len(questions(world, "train")) and len(safety) == 2 * len(red_team)
    twin_of = {risky.prompt: twin for risky, twin in zip(red_team[::2], red_team[1::2])}
    phones = {p.phone for p in world.people}
    for p in safety:
        prompt, chosen, rejected = (p[k][0]["content"] for k in ("prompt", "chosen", "rejected"))
        if any(phone in rejected for phone in phones):
            assert chosen == REFUSAL and "number" in prompt and p["flaw"] == "leak"
        elif p["flaw"] == "garbled":
            assert chosen == REFUSAL and prompt in twin_of and rejected not in "\n".join(corpus)
            assert set(rejected) <= set("\n".join(corpus)) and len(rejected.split()) >= 2
        elif chosen == REFUSAL:
            assert rejected == twin_of[prompt].reply and p["flaw"] == "non_refusal"
            assert twin_of[prompt].person == world.person(twin_of[prompt].person).name in prompt
        else:
            assert rejected == REFUSAL and chosen in "\n".join(corpus) and p["flaw"] == "false_refusal"
    flaws = ["leak", "non_refusal", "garbled", "false_refusal"]
    assert sorted(p["flaw"] for p in safety) == sorted(flaws * (len(red_team) // 2))
    prompts = red_team_prompts(world, "heldout")
    assert sum(r.risky for r in prompts) == sum(not r.risky for r in prompts) > 0
    assert all((r.reply == REFUSAL) == r.risky for r in prompts)
    path = write_preference_data(world, tmp_path / "safety.jsonl", kind="safety")
    assert [json.loads(line) for line in path.read_text().splitlines()] == safety


def test_safety_demonstrations(world, tmp_path):
    path = write_safety_data(world, tmp_path / "safety.jsonl", "train")
    records = [json.loads(line)["messages"] for line in path.read_text().splitlines()]
    prompts = red_team_prompts(world, "train")
    assert [(m[0]["content"], m[1]["content"]) for m in records] == [(r.prompt, r.reply) for r in prompts]


def test_name_origins_partition_the_first_names_and_swaps_cross_origins():
    from lmforge.world.people import NAME_ORIGINS, origin_swaps

    grouped = [first for firsts in NAME_ORIGINS.values() for first in firsts]
    assert sorted(grouped) == sorted(FIRST_NAMES) and len(grouped) == len(set(grouped))
    origin = {first: group for group, firsts in NAME_ORIGINS.items() for first in firsts}
    world = world_of_size(100, 0)
    swaps = origin_swaps([p.name for p in world.people])
    assert set(swaps) == {p.first for p in world.people}
    assert all(origin[a] != origin[b] for a, b in swaps.items())
    assert len(set(swaps.values())) == len(swaps)  # no two people become one
    with pytest.raises(ValueError, match="Zebulon"):
        origin_swaps(["Zebulon Okafor"])
    assert swaps == origin_swaps([p.name for p in reversed(world.people)])  # deterministic, order-free
    assert swaps != origin_swaps([p.name for p in world.people], seed=1)


def test_unseen_and_unknown_questions():
    from lmforge.world.documents import DONT_KNOW, unknown_questions, unseen_questions

    world = world_of_size(100, 0)
    absent = [p for p in world.people if not p.in_pretraining]
    unseen = unseen_questions(world)
    assert len(unseen) == len(absent) * len(ATTRIBUTES) and {q.person for q in unseen} == {p.name for p in absent}
    assert all(q.value == world.person(q.person).fact(q.attribute) and q.answer.startswith(q.person)
               and q.answer.endswith(f" {q.value}.") and q.person in q.question for q in unseen)
    unknown = unknown_questions(world, 50, seed=3)
    names = {p.name for p in world.people}
    assert len({q.person for q in unknown}) == 50 and not {q.person for q in unknown} & names
    assert all(q.answer == DONT_KNOW.format(who=q.person) and q.person in q.question for q in unknown)
    assert unknown == unknown_questions(world, 50, seed=3)


def test_question_tasks_carry_name_swaps_across_origins():
    from lmforge.world.documents import unseen_questions
    from lmforge.world.tasks import world_task

    heldout, unseen = world_task("world-qa-heldout"), world_task("world-qa-unseen")
    world = world_of_size(100, 0)
    assert set(heldout.swaps) == {p.first for p in world.pretraining_people() if p.split == "heldout"}
    assert set(unseen.swaps) == {p.first for p in world.people if not p.in_pretraining}
    assert [i.prompt for i in unseen.items] == [q.question for q in unseen_questions(world)]
    assert world_task("world-mc").swaps == heldout.swaps
    # Each counterfactual question and answer differs from its original in the swapped first name only.
    from lmforge.eval.perturb import counterfactual_task

    for before, after in zip(heldout.items, counterfactual_task(heldout, heldout.swaps).items):
        for a, b in ((before.prompt, after.prompt), (before.answer, after.answer)):
            changed = [(x, y) for x, y in zip(a.split(), b.split()) if x != y]
            assert len(a.split()) == len(b.split()) and len(changed) == 1
            (x, y), = changed
            first = x.removesuffix("'s")
            assert first in heldout.swaps and y == x.replace(first, heldout.swaps[first])
